//! Building a microVM — from a config (boot) or from a `restore.snap` (restore) — in one
//! place, and running it: the event loop, pause + snapshot, stop.

use std::fs::File;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_ioctls::{IoEventAddress, Kvm, VmFd};
use linux_loader::cmdline::Cmdline;
use linux_loader::loader::{elf::Elf, KernelLoader};
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::{boot, layout::*};
use crate::devices::bus::Bus;
use crate::devices::legacy::i8042::ResetDevice;
use crate::devices::legacy::serial::{InputDrained, Output, SerialDevice, SerialDeviceState};
use crate::devices::legacy::serial_input::{SerialInput, StreamWatch};
use crate::devices::virtio::blk::{Block, BlockState};
use crate::devices::virtio::mmio::{MmioTransport, NOTIFY_REG_OFFSET};
use crate::devices::virtio::persist::MmioTransportState;
use crate::devices::virtio::vsock::{Vsock, VsockState};
use crate::devices::virtio::VirtioDevice;
use crate::devices::IrqTrigger;
use crate::error::{Result, VmmError};
use crate::event_loop::{EventLoop, Wake};
use crate::snapshot;
use crate::vstate::memory::{self, GuestMemoryMmap};
use crate::vstate::vcpu::{
    self, VcpuCommand, VcpuExitReason, VcpuHandle, VcpuResponse, VcpuRunner, VcpuState,
};
use crate::vstate::vm::{self, VmState};

#[derive(Debug, Clone)]
pub struct BlockConfig {
    pub path: PathBuf,
    /// What the guest reads as the disk's ID (`/sys/block/vdX/serial`).
    pub serial: String,
}

#[derive(Debug, Clone)]
pub struct VsockConfig {
    pub cid: u64,
    /// The host side: `CONNECT <port>\n` here reaches guest port `<port>`.
    pub uds_path: PathBuf,
}

/// The most vCPUs a microVM gets (the MP table and the APIC IDs are built for this many).
pub const MAX_VCPUS: u32 = 32;

/// Whether `vcpus` is a vCPU count a microVM can have; the message says the range.
pub fn check_vcpus(vcpus: u32) -> std::result::Result<u8, String> {
    match u8::try_from(vcpus) {
        Ok(n) if n >= 1 && u32::from(n) <= MAX_VCPUS => Ok(n),
        _ => Err(format!("{vcpus} vCPUs: must be 1 to {MAX_VCPUS}")),
    }
}

#[derive(Debug, Clone)]
pub struct MicroVmConfig {
    pub kernel: PathBuf,
    pub cmdline: String,
    pub initrd: Option<PathBuf>,
    pub memory_mib: u32,
    pub vcpus: u8,
    pub blocks: Vec<BlockConfig>,
    pub vsock: Option<VsockConfig>,
}

/// Why a microVM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest rebooted or powered off through the i8042 (`reboot=k`): a clean exit.
    Reset,
    /// The guest kernel panicked (seen on the console).
    GuestPanic,
    /// A triple fault.
    TripleFault,
    /// KVM could not run the guest.
    Failed(String),
}

#[derive(Serialize, Deserialize)]
enum DeviceKindState {
    Block(BlockState),
    Vsock(VsockState),
}

#[derive(Serialize, Deserialize)]
struct DeviceState {
    base: u64,
    irq: u32,
    transport: MmioTransportState,
    kind: DeviceKindState,
}

/// Everything but guest memory, as saved in `restore.snap`.
#[derive(Serialize, Deserialize)]
struct MicroVmState {
    vcpus: Vec<VcpuState>,
    vm: VmState,
    serials: Vec<SerialDeviceState>,
    devices: Vec<DeviceState>,
}

/// Host-side milestones of a restore.
#[derive(Debug, Clone, Default)]
pub struct RestorePhases {
    /// Snapshot opened, header and state verified, memory mapped.
    pub open: Duration,
    /// VM + vCPUs created (zero when they were prepared ahead).
    pub create: Duration,
    /// vCPU, VM and device state set, vCPU threads started.
    pub load: Duration,
    /// Part of `load`: vCPU + irqchip/PIT/clock state.
    pub cpu_state: Duration,
    /// Part of `load`: devices rebuilt and wired to KVM (irqfd, ioeventfd, vsock socket).
    pub devices: Duration,
    pub total: Duration,
}

/// Watches console output for a kernel panic.
struct PanicWatch {
    inner: Output,
    seen: Arc<AtomicBool>,
    tail: Vec<u8>,
}

const PANIC_MARK: &[u8] = b"Kernel panic - not syncing";

impl Write for PanicWatch {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.tail.extend_from_slice(buf);
        if self.tail.windows(PANIC_MARK.len()).any(|w| w == PANIC_MARK) {
            self.seen.store(true, Ordering::SeqCst);
        }
        let keep = self.tail.len().saturating_sub(PANIC_MARK.len());
        self.tail.drain(..keep);
        self.inner.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Where a virtio-mmio device sits and how many queues it has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceSlot {
    pub base: u64,
    pub irq: u32,
    pub queues: usize,
}

/// A slot's interrupt and queue-notification eventfds, registered with KVM (irqfd,
/// ioeventfd) — registration is slow on some hosts, so a prepared VM does it ahead.
struct PreparedSlot {
    slot: DeviceSlot,
    interrupt: crate::devices::virtio::Interrupt,
    queue_evts: Vec<EventFd>,
}

impl PreparedSlot {
    fn new(vm: &VmFd, slot: DeviceSlot) -> Result<Self> {
        let interrupt =
            crate::devices::virtio::Interrupt::new().map_err(|e| VmmError::io("eventfd", e))?;
        vm.register_irqfd(&interrupt.evt, slot.irq)
            .map_err(VmmError::kvm("register_irqfd (virtio)"))?;
        let mut queue_evts = Vec::with_capacity(slot.queues);
        for q in 0..slot.queues {
            let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmmError::io("eventfd", e))?;
            vm.register_ioevent(
                &evt,
                &IoEventAddress::Mmio(slot.base + NOTIFY_REG_OFFSET),
                q as u32,
            )
            .map_err(VmmError::kvm("register_ioevent"))?;
            queue_evts.push(evt);
        }
        Ok(Self {
            slot,
            interrupt,
            queue_evts,
        })
    }
}

fn serial_trigger(vm: &VmFd, irq: u32) -> Result<IrqTrigger> {
    let trigger = IrqTrigger::new().map_err(|e| VmmError::io("eventfd", e))?;
    vm.register_irqfd(&trigger.0, irq)
        .map_err(VmmError::kvm("register_irqfd (serial)"))?;
    Ok(trigger)
}

#[derive(Default)]
struct PreparedWiring {
    serial_triggers: Vec<IrqTrigger>,
    slots: Vec<PreparedSlot>,
    /// The vsock host socket, already listening.
    vsock: Option<crate::devices::virtio::vsock::Muxer>,
}

/// What a restore of a snapshot will need, known before it (a worker reads it once).
#[derive(Debug, Clone)]
pub struct RestoreLayout {
    pub vcpus: u8,
    pub memory_mib: u32,
    pub devices: Vec<DeviceSlot>,
    /// The snapshot has a vsock device (so the restored VM needs its own socket).
    pub vsock: bool,
}

impl RestoreLayout {
    /// Reads (and verifies) `path` to learn its layout. Not on the restore path.
    pub fn of(path: &Path) -> Result<Self> {
        let (file, state): (snapshot::SnapshotFile, MicroVmState) = snapshot::read_snapshot(path)?;
        let devices = state
            .devices
            .iter()
            .map(|d| DeviceSlot {
                base: d.base,
                irq: d.irq,
                queues: d.transport.queues.len(),
            })
            .collect();
        Ok(Self {
            vcpus: state.vcpus.len() as u8,
            memory_mib: (file.mem_size >> 20) as u32,
            devices,
            vsock: state
                .devices
                .iter()
                .any(|d| matches!(d.kind, DeviceKindState::Vsock(_))),
        })
    }
}

/// A VM + vCPUs created before the snapshot to restore is known (off the restore path).
pub struct PreparedVm {
    kvm: Arc<Kvm>,
    vm: VmFd,
    vcpus: Vec<kvm_ioctls::VcpuFd>,
    /// Guest address space already registered with KVM, if its size was known.
    memory: Option<memory::Reservation>,
    wiring: PreparedWiring,
    threads: Vec<vcpu::ParkedThread>,
}

impl PreparedVm {
    /// A VM with `vcpus` vCPUs and, if `memory_mib` is given, that much guest address space
    /// registered (a snapshot of that size then restores without registering memory).
    pub fn new(vcpus: u8, memory_mib: Option<u32>) -> Result<Self> {
        vcpu::init_pause_signal()?;
        let kvm = Arc::new(Kvm::new().map_err(VmmError::Kvm)?);
        let vm = vm::create_vm(&kvm)?;
        let vcpus = (0..vcpus)
            .map(|id| vcpu::create(&vm, id))
            .collect::<Result<Vec<_>>>()?;
        let memory = match memory_mib {
            Some(mib) => {
                let r = memory::Reservation::new((mib as usize) << 20)?;
                r.register(&vm)?;
                Some(r)
            }
            None => None,
        };
        Ok(Self {
            kvm,
            vm,
            vcpus,
            memory,
            wiring: PreparedWiring::default(),
            threads: Vec::new(),
        })
    }

    /// Everything a restore of `layout` needs that does not depend on the snapshot's
    /// contents: VM, vCPUs and their threads, registered guest address space, the serial
    /// and virtio interrupt and notification eventfds.
    /// `vsock_uds`: where the restored VM's vsock socket will listen (bound now).
    pub fn for_layout(layout: &RestoreLayout, vsock_uds: Option<&Path>) -> Result<Self> {
        let mut p = Self::new(layout.vcpus, Some(layout.memory_mib))?;
        if let Some(uds) = vsock_uds {
            // The CID is set from the snapshot at restore.
            let m = crate::devices::virtio::vsock::Muxer::new(3, uds)
                .map_err(|e| VmmError::io(format!("vsock socket {}", uds.display()), e))?;
            p.wiring.vsock = Some(m);
        }
        p.wiring.serial_triggers = vec![
            serial_trigger(&p.vm, COM1_IRQ)?,
            serial_trigger(&p.vm, COM2_IRQ)?,
        ];
        for slot in &layout.devices {
            p.wiring.slots.push(PreparedSlot::new(&p.vm, *slot)?);
        }
        for _ in 0..layout.vcpus {
            let t =
                vcpu::ParkedThread::new().map_err(|e| VmmError::io("spawning a vCPU thread", e))?;
            p.threads.push(t);
        }
        Ok(p)
    }
}

pub struct MicroVm {
    _kvm: Arc<Kvm>,
    vm: VmFd,
    mem: GuestMemoryMmap,
    _memfd: Option<File>,
    vcpus: Vec<VcpuHandle>,
    /// Unmapped last (after the vCPUs and the VM are gone): see `Drop`.
    reservation: Option<memory::Reservation>,
    responses: Receiver<VcpuResponse>,
    serials: Vec<Arc<Mutex<SerialDevice>>>,
    /// Host input feeding a UART (the control channel), if attached.
    serial_input: Option<SerialInput>,
    devices: Vec<(u64, u32, Arc<Mutex<MmioTransport>>)>,
    event_loop: EventLoop,
    /// Wakes the event loop for the VM's owner (see [`MicroVm::waker`]).
    waker: EventFd,
    exit_evt: EventFd,
    reset_evt: EventFd,
    panic_seen: Arc<AtomicBool>,
    exited: Option<ExitReason>,
    paused: bool,
}

/// A device to attach: what it is, or its saved state.
enum DeviceSpec<'a> {
    Block(&'a BlockConfig),
    Vsock(&'a VsockConfig),
    Restored(&'a DeviceState),
}

struct Wiring {
    /// vCPU threads started ahead (a prepared restore), handed their vCPUs by `start`.
    threads: Vec<vcpu::ParkedThread>,
    pio: Bus,
    mmio: Bus,
    serials: Vec<Arc<Mutex<SerialDevice>>>,
    devices: Vec<(u64, u32, Arc<Mutex<MmioTransport>>)>,
    reset_evt: EventFd,
}

fn evt_clone(e: &EventFd) -> Result<EventFd> {
    e.try_clone()
        .map_err(|e| VmmError::io("duplicating an eventfd", e))
}

/// Creates the devices, puts them on the buses and connects their interrupts (irqfd) and
/// queue notifications (ioeventfd) to KVM.
/// The guest-facing outputs and saved pieces `wire_devices` starts from.
struct WireInputs<'a> {
    /// Interrupt and notification eventfds already registered with KVM.
    prepared: PreparedWiring,
    console: Output,
    com2: Output,
    panic_seen: &'a Arc<AtomicBool>,
    serial_states: Option<&'a [SerialDeviceState]>,
    specs: &'a [DeviceSpec<'a>],
    vsock_uds_override: Option<&'a Path>,
}

fn wire_devices(vm: &VmFd, mem: &GuestMemoryMmap, inputs: WireInputs) -> Result<Wiring> {
    let WireInputs {
        prepared,
        console,
        com2,
        panic_seen,
        serial_states,
        specs,
        vsock_uds_override,
    } = inputs;
    let mut pio = Bus::default();
    let mut mmio = Bus::default();
    let mut serials = Vec::new();
    let console: Output = Box::new(PanicWatch {
        inner: console,
        seen: panic_seen.clone(),
        tail: Vec::new(),
    });
    let mut serial_triggers = prepared.serial_triggers.into_iter();
    let mut prepared_slots = prepared.slots;
    let mut prepared_muxer = prepared.vsock;
    for (i, (port, irq, out)) in [(COM1_PORT, COM1_IRQ, console), (COM2_PORT, COM2_IRQ, com2)]
        .into_iter()
        .enumerate()
    {
        let trigger = match serial_triggers.next() {
            Some(t) => t,
            None => serial_trigger(vm, irq)?,
        };
        let events =
            InputDrained(EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmmError::io("eventfd", e))?);
        let dev = match serial_states.and_then(|s| s.get(i)) {
            Some(state) => {
                SerialDevice::from_state(state, trigger, events, out).map_err(VmmError::Config)?
            }
            None => SerialDevice::new(trigger, events, out),
        };
        let dev = Arc::new(Mutex::new(dev));
        pio.insert(u64::from(port), 8, dev.clone());
        serials.push(dev);
    }
    let reset_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmmError::io("eventfd", e))?;
    pio.insert(
        u64::from(I8042_PORT),
        5,
        Arc::new(Mutex::new(ResetDevice::new(IrqTrigger(evt_clone(
            &reset_evt,
        )?)))),
    );

    let mut devices = Vec::new();
    for (i, spec) in specs.iter().enumerate() {
        let (base, irq) = match spec {
            DeviceSpec::Restored(s) => (s.base, s.irq),
            _ => mmio_slot(i),
        };
        let dev: Box<dyn VirtioDevice> =
            match spec {
                DeviceSpec::Block(b) => Box::new(
                    Block::open(&b.path, &b.serial)
                        .map_err(|e| VmmError::io(format!("opening {}", b.path.display()), e))?,
                ),
                DeviceSpec::Vsock(v) => Box::new(Vsock::new(v.cid, &v.uds_path).map_err(|e| {
                    VmmError::io(format!("vsock socket {}", v.uds_path.display()), e)
                })?),
                DeviceSpec::Restored(s) => match &s.kind {
                    DeviceKindState::Block(b) => {
                        Box::new(Block::restore(b).map_err(VmmError::Config)?)
                    }
                    DeviceKindState::Vsock(v) => {
                        let uds = vsock_uds_override.unwrap_or(&v.uds_path);
                        let restored = match prepared_muxer.take() {
                            Some(m) if m.uds_path() == uds => Vsock::restore_with(v, m),
                            _ => Vsock::restore(v, uds),
                        };
                        Box::new(restored.map_err(|e| {
                            VmmError::io(format!("vsock socket {}", uds.display()), e)
                        })?)
                    }
                },
            };
        let nq = dev.queue_max_sizes().len();
        // Eventfds registered with KVM ahead of time for this slot, or made now.
        let slot = match prepared_slots.iter().position(|p| {
            p.slot
                == DeviceSlot {
                    base,
                    irq,
                    queues: nq,
                }
        }) {
            Some(k) => prepared_slots.swap_remove(k),
            None => PreparedSlot::new(
                vm,
                DeviceSlot {
                    base,
                    irq,
                    queues: nq,
                },
            )?,
        };
        let (irq_evt, queue_evts) = (slot.interrupt, slot.queue_evts);
        let transport = match spec {
            DeviceSpec::Restored(s) => {
                MmioTransport::from_state(dev, mem.clone(), &s.transport, irq_evt, queue_evts)
                    .map_err(VmmError::Config)?
            }
            _ => MmioTransport::new(dev, mem.clone(), irq_evt, queue_evts)
                .map_err(|e| VmmError::io("virtio transport", e))?,
        };
        let t = Arc::new(Mutex::new(transport));
        mmio.insert(base, MMIO_DEVICE_SIZE, t.clone());
        devices.push((base, irq, t));
    }
    Ok(Wiring {
        threads: Vec::new(),
        pio,
        mmio,
        serials,
        devices,
        reset_evt,
    })
}

impl MicroVm {
    /// Boots `config`'s kernel. `console` gets ttyS0, `com2` ttyS1.
    pub fn boot(config: &MicroVmConfig, console: Output, com2: Output) -> Result<MicroVm> {
        vcpu::init_pause_signal()?;
        let mem_size = u64::from(config.memory_mib) << 20;
        if config.memory_mib < 16 || mem_size > MMIO_START {
            return Err(VmmError::Config(format!(
                "memory of {} MiB: must be 16 MiB to {} MiB",
                config.memory_mib,
                MMIO_START >> 20
            )));
        }
        check_vcpus(u32::from(config.vcpus)).map_err(VmmError::Config)?;
        let kvm = Arc::new(Kvm::new().map_err(VmmError::Kvm)?);
        let vmfd = vm::create_vm(&kvm)?;
        let (mem, memfd) = memory::create_memfd_memory(mem_size as usize)?;
        memory::register(&vmfd, &mem)?;

        let mut kernel = File::open(&config.kernel)
            .map_err(|e| VmmError::io(format!("opening {}", config.kernel.display()), e))?;
        let loaded =
            Elf::load(&mem, None, &mut kernel, Some(GuestAddress(HIMEM_START))).map_err(|e| {
                VmmError::Kernel {
                    path: config.kernel.clone(),
                    reason: e.to_string(),
                }
            })?;
        let initrd = match &config.initrd {
            Some(p) => {
                let data = std::fs::read(p)
                    .map_err(|e| VmmError::io(format!("reading {}", p.display()), e))?;
                let addr = boot::initrd_address(&mem, data.len())?;
                if addr.0 < loaded.kernel_end {
                    return Err(VmmError::Config(format!(
                        "the initrd ({} bytes) does not fit above the kernel",
                        data.len()
                    )));
                }
                mem.write_slice(&data, addr)
                    .map_err(|e| VmmError::Memory(e.to_string()))?;
                Some((addr, data.len()))
            }
            None => None,
        };

        let mut specs: Vec<DeviceSpec> = config.blocks.iter().map(DeviceSpec::Block).collect();
        if let Some(v) = &config.vsock {
            specs.push(DeviceSpec::Vsock(v));
        }
        let mut cmdline =
            Cmdline::new(CMDLINE_MAX_SIZE).map_err(|e| VmmError::Cmdline(e.to_string()))?;
        cmdline
            .insert_str(&config.cmdline)
            .map_err(|e| VmmError::Cmdline(e.to_string()))?;
        for i in 0..specs.len() {
            let (base, irq) = mmio_slot(i);
            cmdline
                .insert_str(format!("virtio_mmio.device=4K@{base:#x}:{irq}"))
                .map_err(|e| VmmError::Cmdline(e.to_string()))?;
        }
        linux_loader::loader::load_cmdline(&mem, GuestAddress(CMDLINE_START), &cmdline)
            .map_err(|e| VmmError::Cmdline(e.to_string()))?;
        let cmdline_len = cmdline
            .as_cstring()
            .map_err(|e| VmmError::Cmdline(e.to_string()))?
            .as_bytes()
            .len();
        boot::configure_zero_page(&mem, cmdline_len + 1, initrd)?;
        // Without ACPI, the MP table is how the kernel finds the other vCPUs (one vCPU
        // keeps the PIC's virtual-wire mode, which is also what the tests' kernel expects).
        if config.vcpus > 1 {
            crate::arch::x86_64::mptable::write_mptable(&mem, config.vcpus)?;
        }

        let panic_seen = Arc::new(AtomicBool::new(false));
        let wiring = wire_devices(
            &vmfd,
            &mem,
            WireInputs {
                prepared: PreparedWiring::default(),
                console,
                com2,
                panic_seen: &panic_seen,
                serial_states: None,
                specs: &specs,
                vsock_uds_override: None,
            },
        )?;
        let mut fds = Vec::new();
        for id in 0..config.vcpus {
            let fd = vcpu::create(&vmfd, id)?;
            vcpu::configure_for_boot(&kvm, &fd, id, config.vcpus, loaded.kernel_load, &mem)?;
            fds.push(fd);
        }
        Self::start(kvm, vmfd, mem, Some(memfd), fds, wiring, panic_seen)
    }

    fn start(
        kvm: Arc<Kvm>,
        vm: VmFd,
        mem: GuestMemoryMmap,
        memfd: Option<File>,
        fds: Vec<kvm_ioctls::VcpuFd>,
        mut wiring: Wiring,
        panic_seen: Arc<AtomicBool>,
    ) -> Result<MicroVm> {
        let mut parked = std::mem::take(&mut wiring.threads);
        let event_loop = EventLoop::new()?;
        let exit_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmmError::io("eventfd", e))?;
        event_loop.add_vcpu_exit(&exit_evt)?;
        event_loop.add_reset(&wiring.reset_evt)?;
        let waker = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmmError::io("eventfd", e))?;
        event_loop.add_waker(&waker)?;
        for (i, (_, _, t)) in wiring.devices.iter().enumerate() {
            event_loop.add_device(i, t)?;
        }
        let (resp_tx, responses) = channel();
        let mut vcpus = Vec::new();
        for (id, fd) in fds.into_iter().enumerate() {
            let (cmd_tx, cmd_rx) = channel();
            let runner = VcpuRunner {
                id: id as u8,
                fd,
                kvm: kvm.clone(),
                pio: wiring.pio.clone(),
                mmio: wiring.mmio.clone(),
                responses: resp_tx.clone(),
                exit_evt: evt_clone(&exit_evt)?,
            };
            let thread = match parked.pop() {
                Some(p) => p.start(runner, cmd_rx)?,
                None => runner
                    .spawn(cmd_rx)
                    .map_err(|e| VmmError::io("spawning a vCPU thread", e))?,
            };
            vcpus.push(VcpuHandle {
                thread,
                commands: cmd_tx,
            });
        }
        Ok(MicroVm {
            _kvm: kvm,
            vm,
            mem,
            _memfd: memfd,
            vcpus,
            reservation: None,
            responses,
            serials: wiring.serials,
            serial_input: None,
            devices: wiring.devices,
            event_loop,
            waker,
            exit_evt,
            reset_evt: wiring.reset_evt,
            panic_seen,
            exited: None,
            paused: false,
        })
    }

    /// Restores `path` (a `restore.snap`): guest memory is the file, mapped copy-on-write.
    /// `vsock_uds` replaces the saved vsock socket path (each VM needs its own).
    pub fn restore(
        path: &Path,
        prepared: Option<PreparedVm>,
        console: Output,
        com2: Output,
        vsock_uds: Option<&Path>,
    ) -> Result<(MicroVm, RestorePhases)> {
        let t0 = Instant::now();
        let (file, state): (snapshot::SnapshotFile, MicroVmState) = snapshot::read_snapshot(path)?;
        let open = t0.elapsed();

        let t1 = Instant::now();
        let prepared = match prepared {
            Some(p) => p,
            None => PreparedVm::new(state.vcpus.len() as u8, None)?,
        };
        let PreparedVm {
            kvm,
            vm: vmfd,
            mut vcpus,
            memory: reservation,
            wiring: wiring_ahead,
            threads,
        } = prepared;
        // Mapped over a prepared, registered reservation of the right size, or mapped and
        // registered now.
        let (mem, reservation) = match reservation {
            Some(r) if r.size() as u64 == file.mem_size => {
                (r.map_snapshot(&file.file, file.mem_offset)?, Some(r))
            }
            _ => {
                let m = file.map_memory()?;
                memory::register(&vmfd, &m)?;
                (m, None)
            }
        };
        while vcpus.len() < state.vcpus.len() {
            vcpus.push(vcpu::create(&vmfd, vcpus.len() as u8)?);
        }
        vcpus.truncate(state.vcpus.len());
        let create = t1.elapsed();

        let t2 = Instant::now();
        for (fd, s) in vcpus.iter().zip(&state.vcpus) {
            vcpu::restore_state(&kvm, fd, s)?;
        }
        vm::restore_state(&vmfd, &state.vm)?;
        let cpu_state = t2.elapsed();
        let specs: Vec<DeviceSpec> = state.devices.iter().map(DeviceSpec::Restored).collect();
        let panic_seen = Arc::new(AtomicBool::new(false));
        let wiring = wire_devices(
            &vmfd,
            &mem,
            WireInputs {
                prepared: wiring_ahead,
                console,
                com2,
                panic_seen: &panic_seen,
                serial_states: Some(&state.serials),
                specs: &specs,
                vsock_uds_override: vsock_uds,
            },
        )?;
        for (_, _, t) in &wiring.devices {
            t.lock().unwrap_or_else(|p| p.into_inner()).resume();
        }
        let devices = t2.elapsed() - cpu_state;
        let mut wiring = wiring;
        wiring.threads = threads;
        let mut vm = Self::start(kvm, vmfd, mem, None, vcpus, wiring, panic_seen)?;
        vm.reservation = reservation;
        let load = t2.elapsed();
        Ok((
            vm,
            RestorePhases {
                open,
                create,
                cpu_state,
                devices,
                load,
                total: t0.elapsed(),
            },
        ))
    }

    /// Runs the event loop for up to `timeout` (or until something happens when `None`).
    /// Returns why the VM stopped, once it has.
    pub fn run(&mut self, timeout: Option<Duration>) -> Result<Option<ExitReason>> {
        if self.exited.is_some() {
            return Ok(self.exited.clone());
        }
        let ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as i32);
        for wake in self.event_loop.wait(ms)? {
            match wake {
                Wake::Queue { device, queue } => {
                    if let Some((_, _, t)) = self.devices.get(device) {
                        let mut t = t.lock().unwrap_or_else(|p| p.into_inner());
                        if let Some(e) = t.queue_evts.get(queue) {
                            let _ = e.read();
                        }
                        t.process_queue(queue);
                    }
                }
                Wake::Backend { device } => {
                    if let Some((_, _, t)) = self.devices.get(device) {
                        t.lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .process_backend();
                    }
                }
                Wake::VcpuExit => {
                    let _ = self.exit_evt.read();
                    while let Ok(r) = self.responses.try_recv() {
                        if let VcpuResponse::Exited(id, reason) = r {
                            self.exited = Some(match reason {
                                VcpuExitReason::Shutdown => ExitReason::TripleFault,
                                VcpuExitReason::Failed(why) => {
                                    ExitReason::Failed(format!("vCPU {id}: {why}"))
                                }
                            });
                        }
                    }
                }
                Wake::Woken => {
                    let _ = self.waker.read();
                }
                Wake::SerialInput | Wake::SerialDrained => {
                    if let Some(input) = self.serial_input.as_mut() {
                        let fd = input.stream_fd();
                        let watch = if wake == Wake::SerialInput {
                            input.on_readable()
                        } else {
                            input.on_drained()
                        };
                        match watch {
                            StreamWatch::Read => self.event_loop.watch_serial_input(fd, true)?,
                            StreamWatch::Pause => self.event_loop.watch_serial_input(fd, false)?,
                            StreamWatch::Closed => {
                                let _ = self.event_loop.remove(fd);
                            }
                        }
                    }
                }
                Wake::Reset => {
                    let _ = self.reset_evt.read();
                    self.exited = Some(if self.panic_seen.load(Ordering::SeqCst) {
                        ExitReason::GuestPanic
                    } else {
                        ExitReason::Reset
                    });
                }
            }
        }
        Ok(self.exited.clone())
    }

    /// Pauses every vCPU (each saves its own state) and writes `restore.snap` at `path`.
    /// The VM stays paused; [`MicroVm::resume`] continues it.
    pub fn pause_and_snapshot(&mut self, path: &Path) -> Result<u64> {
        let mut states = Vec::with_capacity(self.vcpus.len());
        for v in &self.vcpus {
            let _ = v.commands.send(VcpuCommand::Pause);
            v.kick();
        }
        self.paused = true;
        let deadline = Instant::now() + Duration::from_secs(10);
        while states.len() < self.vcpus.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.responses.recv_timeout(left) {
                Ok(VcpuResponse::Paused(s)) => states.push((*s)?),
                Ok(VcpuResponse::Exited(id, reason)) => {
                    return Err(VmmError::Vcpu {
                        id,
                        reason: format!("exited while pausing: {reason:?}"),
                    })
                }
                Err(_) => {
                    return Err(VmmError::Vcpu {
                        id: states.len(),
                        reason: "did not pause within 10 s".into(),
                    })
                }
            }
        }
        states.sort_by_key(|s| s.id);
        let state = MicroVmState {
            vcpus: states,
            vm: vm::save_state(&self.vm)?,
            serials: self
                .serials
                .iter()
                .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).state())
                .collect(),
            devices: self
                .devices
                .iter()
                .map(|(base, irq, t)| {
                    let t = t.lock().unwrap_or_else(|p| p.into_inner());
                    let kind = device_kind_state(t.device());
                    kind.map(|kind| DeviceState {
                        base: *base,
                        irq: *irq,
                        transport: t.state(),
                        kind,
                    })
                })
                .collect::<Result<Vec<_>>>()?,
        };
        snapshot::write_snapshot(path, &state, &self.mem)
    }

    pub fn resume(&mut self) {
        if self.paused {
            for v in &self.vcpus {
                let _ = v.commands.send(VcpuCommand::Resume);
            }
            self.paused = false;
        }
    }

    /// Feeds what the host writes to `stream` into UART `index` (0: ttyS0, 1: ttyS1) as
    /// the guest reads it. At most one UART takes host input.
    pub fn attach_serial_input(&mut self, index: usize, stream: UnixStream) -> Result<()> {
        let Some(serial) = self.serials.get(index) else {
            return Err(VmmError::Config(format!("no UART {index}")));
        };
        if self.serial_input.is_some() {
            return Err(VmmError::Config("a UART already takes host input".into()));
        }
        let drained = serial
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .input_drained_evt()
            .map_err(|e| VmmError::io("duplicating an eventfd", e))?;
        let input = SerialInput::new(stream, serial.clone(), drained);
        self.event_loop
            .add_serial_input(input.stream_fd(), input.drained_fd())?;
        self.serial_input = Some(input);
        Ok(())
    }

    /// An eventfd that, written, makes [`MicroVm::run`] return: how another thread gets
    /// the attention of the one running the VM.
    pub fn waker(&self) -> Result<EventFd> {
        evt_clone(&self.waker)
    }

    /// Input for the guest's ttyS0.
    pub fn console_input(&self, bytes: &[u8]) -> usize {
        self.serials
            .first()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).enqueue(bytes))
            .unwrap_or(0)
    }

    pub fn guest_memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }
}

/// The saved form of a device, by what it is.
fn device_kind_state(d: &dyn VirtioDevice) -> Result<DeviceKindState> {
    if let Some(b) = d.as_any().downcast_ref::<Block>() {
        Ok(DeviceKindState::Block(b.save()))
    } else if let Some(v) = d.as_any().downcast_ref::<Vsock>() {
        Ok(DeviceKindState::Vsock(v.save()))
    } else {
        Err(VmmError::Config(format!(
            "device type {} cannot be saved",
            d.device_type()
        )))
    }
}

impl Drop for MicroVm {
    fn drop(&mut self) {
        for v in &self.vcpus {
            let _ = v.commands.send(VcpuCommand::Stop);
            v.kick();
        }
        for v in self.vcpus.drain(..) {
            let _ = v.thread.join();
        }
        // The devices hold guest memory; the reservation goes after them.
        self.devices.clear();
        self.serials.clear();
        let _ = self.reservation.take();
    }
}
