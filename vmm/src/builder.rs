//! Building a microVM in one place, for the backend and the `supermachine-vmm` binary: from
//! a config (boot) or from a `restore.snap` (restore), with what can be prepared ahead of it.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_ioctls::{Kvm, VmFd};
use linux_loader::cmdline::Cmdline;
use linux_loader::loader::{elf::Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress};

use crate::arch::x86_64::boot;
use crate::arch::x86_64::layout::{
    CMDLINE_MAX_SIZE, CMDLINE_START, COM1_IRQ, COM2_IRQ, HIMEM_START, MMIO_START,
};
use crate::device_manager::{
    serial_trigger, wire_devices, DeviceSpec, PreparedSlot, PreparedWiring, WireInputs,
};
use crate::devices::legacy::serial::Output;
use crate::error::{Result, VmmError};
use crate::persist::MicroVmState;
use crate::vstate::memory;
use crate::vstate::vcpu;
use crate::vstate::vm;

pub use crate::device_manager::DeviceSlot;
pub use crate::devices::virtio::p9::FsConfig;
pub use crate::microvm::{ExitReason, MicroVm};

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
    /// virtio-9p exports, after the disks and vsock.
    pub filesystems: Vec<FsConfig>,
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
        let (file, state) = MicroVmState::read(path)?;
        Ok(Self {
            vcpus: state.vcpus.len() as u8,
            memory_mib: (file.mem_size >> 20) as u32,
            devices: state.device_slots(),
            vsock: state.has_vsock(),
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
        specs.extend(config.filesystems.iter().map(DeviceSpec::Fs));
        if specs.len() > crate::arch::x86_64::layout::MAX_MMIO_DEVICES {
            return Err(VmmError::Config(format!(
                "{} virtio devices: a VM has room for {}",
                specs.len(),
                crate::arch::x86_64::layout::MAX_MMIO_DEVICES
            )));
        }
        let mut cmdline =
            Cmdline::new(CMDLINE_MAX_SIZE).map_err(|e| VmmError::Cmdline(e.to_string()))?;
        cmdline
            .insert_str(&config.cmdline)
            .map_err(|e| VmmError::Cmdline(e.to_string()))?;
        for (i, spec) in specs.iter().enumerate() {
            let (base, irq) = spec.address(i);
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
                filesystems: &[],
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

    /// Restores `path` (a `restore.snap`): guest memory is the file, mapped copy-on-write.
    /// `vsock_uds` replaces the saved vsock socket path (each VM needs its own);
    /// `filesystems` binds saved virtio-9p devices, by tag, to host directories.
    pub fn restore(
        path: &Path,
        prepared: Option<PreparedVm>,
        console: Output,
        com2: Output,
        vsock_uds: Option<&Path>,
        filesystems: &[FsConfig],
    ) -> Result<(MicroVm, RestorePhases)> {
        let t0 = Instant::now();
        let (file, state) = MicroVmState::read(path)?;
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
                filesystems,
            },
        )?;
        for (_, _, t) in &wiring.devices {
            t.lock().unwrap_or_else(|p| p.into_inner()).resume();
        }
        let devices = t2.elapsed() - cpu_state;
        let mut wiring = wiring;
        wiring.threads = threads;
        let mut vm = Self::start(kvm, vmfd, mem, None, vcpus, wiring, panic_seen)?;
        vm.keep_reservation(reservation);
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
}
