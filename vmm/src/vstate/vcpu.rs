//! vCPUs: boot configuration, the run loop on a thread of its own, pause (a signal that
//! sets `immediate_exit`, so a vCPU about to enter the guest cannot miss it), and the
//! saved state in the order KVM wants it back.

use std::cell::Cell;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_regs, kvm_run, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Xsave,
};
use kvm_ioctls::{Cap, Kvm, VcpuExit, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::arch::x86_64::{boot, cpuid, msr};
use crate::devices::bus::Bus;
use crate::error::{Result, VmmError};
use crate::vstate::memory::GuestMemoryMmap;

/// LAPIC local vector table registers and delivery modes (for LINT0/LINT1 setup).
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

thread_local! {
    /// This thread's kvm_run page, for the pause signal's handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn pause_signal_handler(
    _num: libc::c_int,
    _info: *mut libc::siginfo_t,
    _unused: *mut libc::c_void,
) {
    KVM_RUN.with(|r| {
        let p = r.get();
        if !p.is_null() {
            // SAFETY: p is this thread's kvm_run mapping, set by the vCPU loop and valid
            // while it runs; writing immediate_exit is what KVM documents for this purpose.
            unsafe { std::ptr::write_volatile(&mut (*p).immediate_exit, 1) };
        }
    });
}

/// The signal that pauses vCPUs.
pub fn pause_signal() -> libc::c_int {
    SIGRTMIN()
}

/// Installs the pause signal's handler (once per process).
pub fn init_pause_signal() -> Result<()> {
    register_signal_handler(pause_signal(), pause_signal_handler)
        .map_err(|e| VmmError::io("registering the vCPU pause signal", e.into()))
}

#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    pub id: u8,
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub msrs: Vec<(u32, u64)>,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    /// The legacy 4 KiB XSAVE area...
    pub xsave: kvm_xsave,
    /// ...and what KVM_GET_XSAVE2 returns beyond it (state components past 4 KiB, such as
    /// AMX tiles); empty where the host's XSAVE area fits 4 KiB.
    pub xsave_extra: Vec<u32>,
    pub xcrs: kvm_xcrs,
    pub lapic: kvm_lapic_state,
    pub events: kvm_vcpu_events,
    pub mp_state: kvm_mp_state,
    pub debugregs: kvm_debugregs,
}

fn set_lint(lapic: &mut kvm_lapic_state) {
    let reg = |regs: &[std::os::raw::c_char], off: usize| {
        u32::from_le_bytes([
            regs[off] as u8,
            regs[off + 1] as u8,
            regs[off + 2] as u8,
            regs[off + 3] as u8,
        ])
    };
    for (off, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let v = (reg(&lapic.regs, off) & !0x700) | (mode << 8);
        for (i, b) in v.to_le_bytes().iter().enumerate() {
            lapic.regs[off + i] = *b as std::os::raw::c_char;
        }
    }
}

/// A vCPU ready to boot the kernel at `entry` (the boot vCPU gets the registers; the
/// others wait for the kernel's INIT/SIPI).
pub fn configure_for_boot(
    kvm: &Kvm,
    vcpu: &VcpuFd,
    id: u8,
    count: u8,
    entry: GuestAddress,
    mem: &GuestMemoryMmap,
) -> Result<()> {
    vcpu.set_cpuid2(&cpuid::vcpu_cpuid(kvm, id, count)?)
        .map_err(VmmError::kvm("set_cpuid2"))?;
    msr::set_boot_msrs(vcpu)?;
    vcpu.set_regs(&boot::boot_regs(entry))
        .map_err(VmmError::kvm("set_regs"))?;
    vcpu.set_fpu(&boot::boot_fpu())
        .map_err(VmmError::kvm("set_fpu"))?;
    let mut sregs = vcpu.get_sregs().map_err(VmmError::kvm("get_sregs"))?;
    boot::setup_sregs(mem, &mut sregs)?;
    vcpu.set_sregs(&sregs).map_err(VmmError::kvm("set_sregs"))?;
    let mut lapic = vcpu.get_lapic().map_err(VmmError::kvm("get_lapic"))?;
    set_lint(&mut lapic);
    vcpu.set_lapic(&lapic).map_err(VmmError::kvm("set_lapic"))?;
    Ok(())
}

/// u32 words of the XSAVE area past the legacy 4 KiB on this host (KVM_CAP_XSAVE2 gives
/// the whole area's size in bytes; 0 where the capability is missing).
fn xsave_extra_words(kvm: &Kvm) -> usize {
    let size = usize::try_from(kvm.check_extension_int(Cap::Xsave2)).unwrap_or(0);
    size.saturating_sub(std::mem::size_of::<kvm_xsave>())
        .div_ceil(std::mem::size_of::<u32>())
}

/// The XSAVE area: through KVM_GET_XSAVE2 when it is larger than 4 KiB here.
fn save_xsave(kvm: &Kvm, vcpu: &VcpuFd) -> Result<(kvm_xsave, Vec<u32>)> {
    let extra = xsave_extra_words(kvm);
    if extra == 0 {
        return Ok((
            vcpu.get_xsave().map_err(VmmError::kvm("get_xsave"))?,
            Vec::new(),
        ));
    }
    let mut x = Xsave::new(extra).map_err(|e| VmmError::Config(format!("xsave2: {e:?}")))?;
    // SAFETY: `x` has room for the size KVM_CAP_XSAVE2 reported, read just above; no XSTATE
    // feature is enabled dynamically by this process in between.
    unsafe { vcpu.get_xsave2(&mut x) }.map_err(VmmError::kvm("get_xsave2"))?;
    let legacy = kvm_xsave {
        region: x.as_fam_struct_ref().xsave.region,
        ..Default::default()
    };
    Ok((legacy, x.as_slice().to_vec()))
}

/// Sets a saved XSAVE area. KVM_SET_XSAVE reads as many bytes as *this* host's guest FPU
/// area has, so the buffer is always that large: the saved words, zero-padded (components
/// not in the saved XSTATE_BV are ignored). A saved area larger than this host's is refused.
fn restore_xsave(kvm: &Kvm, vcpu: &VcpuFd, s: &VcpuState) -> Result<()> {
    let extra = xsave_extra_words(kvm);
    if extra == 0 && s.xsave_extra.is_empty() {
        // SAFETY: this host's XSAVE area fits the 4 KiB kvm_xsave that KVM_SET_XSAVE reads.
        return unsafe { vcpu.set_xsave(&s.xsave) }.map_err(VmmError::kvm("set_xsave"));
    }
    if s.xsave_extra.len() > extra {
        return Err(VmmError::Config(format!(
            "the snapshot's XSAVE area ({} bytes) is larger than this host's ({} bytes)",
            4096 + 4 * s.xsave_extra.len(),
            4096 + 4 * extra
        )));
    }
    let mut x = Xsave::new(extra).map_err(|e| VmmError::Config(format!("xsave2: {e:?}")))?;
    // SAFETY: only the plain-data header of the FAM struct is written; its length stays.
    unsafe { x.as_mut_fam_struct() }.xsave.region = s.xsave.region;
    x.as_mut_slice()[..s.xsave_extra.len()].copy_from_slice(&s.xsave_extra);
    // SAFETY: `x` is as large as KVM_CAP_XSAVE2 says this host's XSAVE area is.
    unsafe { vcpu.set_xsave2(&x) }.map_err(VmmError::kvm("set_xsave2"))
}

pub fn save_state(kvm: &Kvm, vcpu: &VcpuFd, id: u8) -> Result<VcpuState> {
    let cpuid = vcpu
        .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(VmmError::kvm("get_cpuid2"))?;
    let (xsave, xsave_extra) = save_xsave(kvm, vcpu)?;
    Ok(VcpuState {
        id,
        cpuid: cpuid.as_slice().to_vec(),
        msrs: msr::save_msrs(kvm, vcpu)?,
        regs: vcpu.get_regs().map_err(VmmError::kvm("get_regs"))?,
        sregs: vcpu.get_sregs().map_err(VmmError::kvm("get_sregs"))?,
        xsave,
        xsave_extra,
        xcrs: vcpu.get_xcrs().map_err(VmmError::kvm("get_xcrs"))?,
        lapic: vcpu.get_lapic().map_err(VmmError::kvm("get_lapic"))?,
        events: vcpu
            .get_vcpu_events()
            .map_err(VmmError::kvm("get_vcpu_events"))?,
        mp_state: vcpu.get_mp_state().map_err(VmmError::kvm("get_mp_state"))?,
        debugregs: vcpu
            .get_debug_regs()
            .map_err(VmmError::kvm("get_debug_regs"))?,
    })
}

/// Sets a saved state in the order KVM needs: CPUID first; sregs (which carry the APIC base)
/// before the LAPIC; the LAPIC before the MSRs, because KVM drops a TSC-deadline MSR write
/// unless the LAPIC timer is already in TSC-deadline mode — restored the other way round, a
/// guest whose next timer was armed sleeps until some device interrupt happens to wake it;
/// events (pending exceptions) after regs, which clear them; mp_state; debug registers.
pub fn restore_state(kvm: &Kvm, vcpu: &VcpuFd, s: &VcpuState) -> Result<()> {
    let cpuid = CpuId::from_entries(&s.cpuid)
        .map_err(|e| VmmError::Config(format!("saved CPUID: {e:?}")))?;
    vcpu.set_cpuid2(&cpuid)
        .map_err(VmmError::kvm("set_cpuid2"))?;
    vcpu.set_sregs(&s.sregs)
        .map_err(VmmError::kvm("set_sregs"))?;
    vcpu.set_regs(&s.regs).map_err(VmmError::kvm("set_regs"))?;
    restore_xsave(kvm, vcpu, s)?;
    vcpu.set_xcrs(&s.xcrs).map_err(VmmError::kvm("set_xcrs"))?;
    vcpu.set_lapic(&s.lapic)
        .map_err(VmmError::kvm("set_lapic"))?;
    msr::restore_msrs(vcpu, &s.msrs)?;
    vcpu.set_vcpu_events(&s.events)
        .map_err(VmmError::kvm("set_vcpu_events"))?;
    vcpu.set_mp_state(s.mp_state)
        .map_err(VmmError::kvm("set_mp_state"))?;
    vcpu.set_debug_regs(&s.debugregs)
        .map_err(VmmError::kvm("set_debug_regs"))?;
    Ok(())
}

/// Why a vCPU stopped running the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuExitReason {
    /// The guest shut down (a triple fault on x86).
    Shutdown,
    /// KVM could not enter or continue the guest.
    Failed(String),
}

pub enum VcpuCommand {
    /// Stop running the guest, save this vCPU's state and wait.
    Pause,
    Resume,
    Stop,
}

pub enum VcpuResponse {
    Paused(Box<Result<VcpuState>>),
    Exited(usize, VcpuExitReason),
}

/// A vCPU running on its own thread.
pub struct VcpuHandle {
    pub thread: JoinHandle<()>,
    pub commands: Sender<VcpuCommand>,
}

impl VcpuHandle {
    /// Asks the vCPU to act on a command now: interrupts KVM_RUN.
    pub fn kick(&self) {
        let _ = self.thread.kill(pause_signal());
    }
}

/// A thread started ahead of a restore that waits to be given its vCPU (spawning is
/// then off the restore path).
pub struct ParkedThread {
    start: Sender<(VcpuRunner, Receiver<VcpuCommand>)>,
    thread: JoinHandle<()>,
}

impl ParkedThread {
    pub fn new() -> std::io::Result<Self> {
        let (start, rx) = std::sync::mpsc::channel::<(VcpuRunner, Receiver<VcpuCommand>)>();
        let thread = std::thread::Builder::new()
            .name("vcpu".into())
            .spawn(move || {
                if let Ok((runner, commands)) = rx.recv() {
                    runner.run(commands);
                }
            })?;
        Ok(Self { start, thread })
    }

    /// Hands the thread its vCPU; it starts running the guest.
    pub fn start(
        self,
        runner: VcpuRunner,
        commands: Receiver<VcpuCommand>,
    ) -> Result<JoinHandle<()>> {
        self.start
            .send((runner, commands))
            .map_err(|_| VmmError::Vcpu {
                id: 0,
                reason: "the parked vCPU thread is gone".into(),
            })?;
        Ok(self.thread)
    }
}

pub struct VcpuRunner {
    pub id: u8,
    pub fd: VcpuFd,
    pub kvm: Arc<Kvm>,
    pub pio: Bus,
    pub mmio: Bus,
    pub responses: Sender<VcpuResponse>,
    /// Written when this vCPU exits, to wake the event loop.
    pub exit_evt: EventFd,
}

impl VcpuRunner {
    pub fn spawn(self, commands: Receiver<VcpuCommand>) -> std::io::Result<JoinHandle<()>> {
        std::thread::Builder::new()
            .name(format!("vcpu{}", self.id))
            .spawn(move || self.run(commands))
    }

    fn exit(&self, reason: VcpuExitReason) {
        let _ = self
            .responses
            .send(VcpuResponse::Exited(self.id as usize, reason));
        let _ = self.exit_evt.write(1);
    }

    fn run(mut self, commands: Receiver<VcpuCommand>) {
        // Narrowed before the first guest instruction; a vCPU that cannot be is not run.
        if let Err(e) = crate::thread_filter::apply(crate::thread_filter::ThreadKind::Vcpu) {
            self.exit(VcpuExitReason::Failed(e));
            return;
        }
        KVM_RUN.with(|r| r.set(self.fd.get_kvm_run() as *mut kvm_run));
        loop {
            // A command sent before this thread published its kvm_run (so before the
            // signal could set immediate_exit) is seen here.
            if !self.handle_commands(&commands) {
                break;
            }
            let reason = match self.fd.run() {
                Ok(exit) => match exit {
                    VcpuExit::IoIn(port, data) => {
                        self.pio.read(u64::from(port), data);
                        None
                    }
                    VcpuExit::IoOut(port, data) => {
                        self.pio.write(u64::from(port), data);
                        None
                    }
                    VcpuExit::MmioRead(addr, data) => {
                        self.mmio.read(addr, data);
                        None
                    }
                    VcpuExit::MmioWrite(addr, data) => {
                        self.mmio.write(addr, data);
                        None
                    }
                    VcpuExit::Hlt => None,
                    VcpuExit::Shutdown => Some(VcpuExitReason::Shutdown),
                    VcpuExit::FailEntry(reason, cpu) => Some(VcpuExitReason::Failed(format!(
                        "KVM_EXIT_FAIL_ENTRY (hardware reason {reason:#x}, cpu {cpu})"
                    ))),
                    VcpuExit::InternalError => {
                        Some(VcpuExitReason::Failed("KVM_EXIT_INTERNAL_ERROR".into()))
                    }
                    VcpuExit::SystemEvent(kind, _) => {
                        Some(VcpuExitReason::Failed(format!("system event {kind}")))
                    }
                    other => Some(VcpuExitReason::Failed(format!("unexpected exit {other:?}"))),
                },
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.fd.set_kvm_immediate_exit(0);
                    if !self.handle_commands(&commands) {
                        break;
                    }
                    None
                }
                Err(e) => Some(VcpuExitReason::Failed(format!("KVM_RUN: {e}"))),
            };
            if let Some(reason) = reason {
                self.exit(reason);
                // Parked until told to stop (or to save state for a post-mortem).
                while let Ok(cmd) = commands.recv() {
                    match cmd {
                        VcpuCommand::Stop => break,
                        VcpuCommand::Pause => self.save_and_report(),
                        VcpuCommand::Resume => {}
                    }
                }
                break;
            }
        }
        KVM_RUN.with(|r| r.set(std::ptr::null_mut()));
    }

    fn save_and_report(&self) {
        let state = save_state(&self.kvm, &self.fd, self.id);
        let _ = self.responses.send(VcpuResponse::Paused(Box::new(state)));
    }

    /// Returns false when the vCPU should stop.
    fn handle_commands(&mut self, commands: &Receiver<VcpuCommand>) -> bool {
        while let Ok(cmd) = commands.try_recv() {
            match cmd {
                VcpuCommand::Stop => return false,
                VcpuCommand::Resume => {}
                VcpuCommand::Pause => {
                    self.save_and_report();
                    loop {
                        match commands.recv() {
                            Ok(VcpuCommand::Resume) => break,
                            Ok(VcpuCommand::Pause) => self.save_and_report(),
                            Ok(VcpuCommand::Stop) | Err(_) => return false,
                        }
                    }
                }
            }
        }
        true
    }
}

/// Creates vCPU `id` of `vm`.
pub fn create(vm: &VmFd, id: u8) -> Result<VcpuFd> {
    vm.create_vcpu(u64::from(id)).map_err(|e| VmmError::Vcpu {
        id: id as usize,
        reason: format!("create: {e}"),
    })
}

#[cfg(test)]
mod restore_tests {
    use super::*;
    use crate::vstate::vm;

    /// A vCPU's XSAVE area survives save -> restore into another VM, through KVM_GET_XSAVE2
    /// where this host's area is larger than 4 KiB and the legacy ioctls elsewhere.
    #[test]
    fn xsave_area_round_trips_between_vms() {
        let kvm = Kvm::new().expect("/dev/kvm (hardware virtualization or PVM)");
        let vm_a = vm::create_vm(&kvm).unwrap();
        let a = create(&vm_a, 0).unwrap();
        let (mut xsave, extra) = save_xsave(&kvm, &a).unwrap();
        assert_eq!(extra.len(), xsave_extra_words(&kvm));
        // x87 control word (bytes 0-1 of the legacy area) to a recognisable value, and
        // MXCSR (bytes 24-27); XSTATE_BV (byte 512) says x87 and SSE state are present, or
        // they would load as their init values.
        xsave.region[0] = (xsave.region[0] & !0xffff) | 0x027f;
        xsave.region[6] = 0x1f80 | 0x6000;
        xsave.region[128] |= 0b11;
        let state = VcpuState {
            xsave,
            xsave_extra: extra,
            ..save_state(&kvm, &a, 0).unwrap()
        };
        let vm_b = vm::create_vm(&kvm).unwrap();
        let b = create(&vm_b, 0).unwrap();
        restore_xsave(&kvm, &b, &state).unwrap();
        let (back, back_extra) = save_xsave(&kvm, &b).unwrap();
        assert_eq!(back.region[0] & 0xffff, 0x027f);
        assert_eq!(back.region[6], 0x1f80 | 0x6000);
        assert_eq!(back_extra.len(), state.xsave_extra.len());

        let too_big = VcpuState {
            xsave_extra: vec![0; xsave_extra_words(&kvm) + 16],
            ..state
        };
        assert!(restore_xsave(&kvm, &b, &too_big).is_err());
    }

    /// A LAPIC timer armed in TSC-deadline mode is still armed after save -> restore into
    /// another VM (KVM ignores the deadline MSR unless the LAPIC is restored first).
    #[test]
    fn an_armed_tsc_deadline_timer_survives_restore() {
        const LVTT: usize = 0x320;
        const SPURIOUS: usize = 0xf0;
        const TSC_DEADLINE_MODE: u32 = 0b10 << 17;
        let kvm = Kvm::new().expect("/dev/kvm (hardware virtualization or PVM)");
        let vm_a = vm::create_vm(&kvm).unwrap();
        let a = create(&vm_a, 0).unwrap();
        a.set_cpuid2(&cpuid::vcpu_cpuid(&kvm, 0, 1).unwrap())
            .unwrap();
        let mut lapic = a.get_lapic().unwrap();
        let reg = |l: &kvm_bindings::kvm_lapic_state, off: usize| {
            u32::from_le_bytes(std::array::from_fn(|i| l.regs[off + i] as u8))
        };
        let set = |l: &mut kvm_bindings::kvm_lapic_state, off: usize, v: u32| {
            for (i, b) in v.to_le_bytes().into_iter().enumerate() {
                l.regs[off + i] = b as _;
            }
        };
        let sv = reg(&lapic, SPURIOUS);
        set(&mut lapic, SPURIOUS, sv | 0x1ff);
        set(&mut lapic, LVTT, TSC_DEADLINE_MODE | 0xec);
        a.set_lapic(&lapic).unwrap();
        let deadline = 1u64 << 60;
        let msrs = kvm_bindings::Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
            index: msr::MSR_IA32_TSC_DEADLINE,
            data: deadline,
            ..Default::default()
        }])
        .unwrap();
        assert_eq!(a.set_msrs(&msrs).unwrap(), 1);
        let read_deadline = |v: &VcpuFd| {
            let mut m = kvm_bindings::Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
                index: msr::MSR_IA32_TSC_DEADLINE,
                ..Default::default()
            }])
            .unwrap();
            assert_eq!(v.get_msrs(&mut m).unwrap(), 1);
            m.as_slice()[0].data
        };
        assert_eq!(read_deadline(&a), deadline, "KVM took the deadline");

        let state = save_state(&kvm, &a, 0).unwrap();
        let vm_b = vm::create_vm(&kvm).unwrap();
        let b = create(&vm_b, 0).unwrap();
        restore_state(&kvm, &b, &state).unwrap();
        assert_eq!(
            reg(&b.get_lapic().unwrap(), LVTT) & (0b11 << 17),
            TSC_DEADLINE_MODE
        );
        assert_eq!(
            read_deadline(&b),
            deadline,
            "the restored timer is disarmed"
        );
    }
}
