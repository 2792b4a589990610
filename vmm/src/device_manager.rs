//! Where devices sit and how they are wired: virtio-mmio slots (address, IRQ, queues), UARTs
//! and the i8042 on the buses, irqfds and ioeventfds with KVM — for the builder.

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use kvm_ioctls::{IoEventAddress, VmFd};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::layout::{
    mmio_slot, COM1_IRQ, COM1_PORT, COM2_IRQ, COM2_PORT, I8042_PORT, MMIO_DEVICE_SIZE,
};
use crate::builder::{BlockConfig, VsockConfig};
use crate::devices::bus::Bus;
use crate::devices::legacy::i8042::ResetDevice;
use crate::devices::legacy::serial::{InputDrained, Output, SerialDevice, SerialDeviceState};
use crate::devices::virtio::blk::Block;
use crate::devices::virtio::mmio::{MmioTransport, NOTIFY_REG_OFFSET};
use crate::devices::virtio::p9::{FsConfig, P9};
use crate::devices::virtio::vsock::Vsock;
use crate::devices::virtio::VirtioDevice;
use crate::devices::IrqTrigger;
use crate::error::{Result, VmmError};
use crate::microvm::PanicWatch;
use crate::persist::{DeviceKindState, DeviceState};
use crate::vstate::memory::GuestMemoryMmap;
use crate::vstate::vcpu;

/// A virtio-mmio device on the bus: its base address, its IRQ and its transport.
pub(crate) type MmioDevice = (u64, u32, Arc<Mutex<MmioTransport>>);

/// Where a virtio-mmio device sits and how many queues it has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceSlot {
    pub base: u64,
    pub irq: u32,
    pub queues: usize,
}

/// A slot's interrupt and queue-notification eventfds, registered with KVM (irqfd,
/// ioeventfd) — registration is slow on some hosts, so a prepared VM does it ahead.
pub(crate) struct PreparedSlot {
    slot: DeviceSlot,
    interrupt: crate::devices::virtio::Interrupt,
    queue_evts: Vec<EventFd>,
}

impl PreparedSlot {
    pub(crate) fn new(vm: &VmFd, slot: DeviceSlot) -> Result<Self> {
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

pub(crate) fn serial_trigger(vm: &VmFd, irq: u32) -> Result<IrqTrigger> {
    let trigger = IrqTrigger::new().map_err(|e| VmmError::io("eventfd", e))?;
    vm.register_irqfd(&trigger.0, irq)
        .map_err(VmmError::kvm("register_irqfd (serial)"))?;
    Ok(trigger)
}

#[derive(Default)]
pub(crate) struct PreparedWiring {
    pub(crate) serial_triggers: Vec<IrqTrigger>,
    pub(crate) slots: Vec<PreparedSlot>,
    /// The vsock host socket, already listening.
    pub(crate) vsock: Option<crate::devices::virtio::vsock::Muxer>,
}

/// A device to attach: what it is, or its saved state.
pub(crate) enum DeviceSpec<'a> {
    Block(&'a BlockConfig),
    Vsock(&'a VsockConfig),
    Fs(&'a FsConfig),
    Restored(&'a DeviceState),
}

impl DeviceSpec<'_> {
    /// Where the device attached `index`th sits: its page's address and its IRQ (the one
    /// place this is decided; the boot command line announces the same).
    pub(crate) fn address(&self, index: usize) -> (u64, u32) {
        match self {
            DeviceSpec::Restored(s) => (s.base, s.irq),
            _ => mmio_slot(index),
        }
    }
}

pub(crate) struct Wiring {
    /// vCPU threads started ahead (a prepared restore), handed their vCPUs by `start`.
    pub(crate) threads: Vec<vcpu::ParkedThread>,
    pub(crate) pio: Bus,
    pub(crate) mmio: Bus,
    pub(crate) serials: Vec<Arc<Mutex<SerialDevice>>>,
    pub(crate) devices: Vec<MmioDevice>,
    pub(crate) reset_evt: EventFd,
}

fn fs_error(f: &FsConfig, e: std::io::Error) -> VmmError {
    match &f.root {
        Some(root) => VmmError::io(format!("virtio-9p {}: {}", f.tag, root.display()), e),
        None => VmmError::io(format!("virtio-9p {}", f.tag), e),
    }
}

pub(crate) fn evt_clone(e: &EventFd) -> Result<EventFd> {
    e.try_clone()
        .map_err(|e| VmmError::io("duplicating an eventfd", e))
}

/// The guest-facing outputs and saved pieces `wire_devices` starts from.
pub(crate) struct WireInputs<'a> {
    /// Interrupt and notification eventfds already registered with KVM.
    pub(crate) prepared: PreparedWiring,
    pub(crate) console: Output,
    pub(crate) com2: Output,
    pub(crate) panic_seen: &'a Arc<AtomicBool>,
    pub(crate) serial_states: Option<&'a [SerialDeviceState]>,
    pub(crate) specs: &'a [DeviceSpec<'a>],
    pub(crate) vsock_uds_override: Option<&'a Path>,
    /// What each restored virtio-9p device exports, by mount tag (unbound if absent).
    pub(crate) filesystems: &'a [FsConfig],
}

/// Creates the devices, puts them on the buses and connects their interrupts (irqfd) and
/// queue notifications (ioeventfd) to KVM.
pub(crate) fn wire_devices(vm: &VmFd, mem: &GuestMemoryMmap, inputs: WireInputs) -> Result<Wiring> {
    let WireInputs {
        prepared,
        console,
        com2,
        panic_seen,
        serial_states,
        specs,
        vsock_uds_override,
        filesystems,
    } = inputs;
    let mut pio = Bus::default();
    let mut mmio = Bus::default();
    let mut serials = Vec::new();
    let console: Output = Box::new(PanicWatch::new(console, panic_seen.clone()));
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
        let (base, irq) = spec.address(i);
        let dev: Box<dyn VirtioDevice> =
            match spec {
                DeviceSpec::Block(b) => Box::new(
                    Block::open(&b.path, &b.serial)
                        .map_err(|e| VmmError::io(format!("opening {}", b.path.display()), e))?,
                ),
                DeviceSpec::Vsock(v) => Box::new(Vsock::new(v.cid, &v.uds_path).map_err(|e| {
                    VmmError::io(format!("vsock socket {}", v.uds_path.display()), e)
                })?),
                DeviceSpec::Fs(f) => Box::new(P9::new(f).map_err(|e| fs_error(f, e))?),
                DeviceSpec::Restored(s) => match &s.kind {
                    DeviceKindState::Block(b) => {
                        Box::new(Block::restore(b).map_err(VmmError::Config)?)
                    }
                    DeviceKindState::P9(p) => Box::new(
                        P9::restore(p, filesystems)
                            .map_err(|e| VmmError::io(format!("virtio-9p {}", p.tag), e))?,
                    ),
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
