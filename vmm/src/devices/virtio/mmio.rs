//! The virtio-mmio transport (version 2): the register page a driver programs to negotiate
//! features and place queues, the interrupt status, and the device's config space above
//! 0x100. Every value the guest writes is range-checked here or by virtio-queue.

use std::sync::atomic::Ordering;

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::persist::{MmioTransportState, QueueStateSer};
use super::{Interrupt, QueueContext, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::devices::bus::BusDevice;
use crate::vstate::memory::GuestMemoryMmap;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR: u32 = 0x736d_7370; // "psms"

const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
const REG_QUEUE_NOTIFY: u64 = 0x050;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_AVAIL_LOW: u64 = 0x090;
const REG_QUEUE_AVAIL_HIGH: u64 = 0x094;
const REG_QUEUE_USED_LOW: u64 = 0x0a0;
const REG_QUEUE_USED_HIGH: u64 = 0x0a4;
const REG_CONFIG_GENERATION: u64 = 0x0fc;
const CONFIG_SPACE: u64 = 0x100;
/// The offset of QueueNotify, where the event loop's ioeventfds are registered.
pub const NOTIFY_REG_OFFSET: u64 = REG_QUEUE_NOTIFY;

const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FAILED: u32 = 0x80;

pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    /// One per queue; KVM signals it when the guest writes the queue's index to QueueNotify.
    pub queue_evts: Vec<EventFd>,
    pub interrupt: Interrupt,
    features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    status: u32,
    activated: bool,
}

impl MmioTransport {
    /// A transport for `device`, with its interrupt and queue eventfds (one per queue),
    /// which the caller registers with KVM (irqfd, ioeventfd).
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        interrupt: Interrupt,
        queue_evts: Vec<EventFd>,
    ) -> std::io::Result<Self> {
        let queues = device
            .queue_max_sizes()
            .into_iter()
            .map(|max| Queue::new(max).map_err(|e| std::io::Error::other(format!("{e:?}"))))
            .collect::<Result<Vec<_>, _>>()?;
        if queue_evts.len() != queues.len() {
            return Err(std::io::Error::other(format!(
                "{} queue eventfds for {} queues",
                queue_evts.len(),
                queues.len()
            )));
        }
        Ok(Self {
            device,
            mem,
            queues,
            queue_evts,
            interrupt,
            features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            status: 0,
            activated: false,
        })
    }

    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        self.device.as_mut()
    }

    pub fn is_activated(&self) -> bool {
        self.activated
    }

    fn offered_features(&self) -> u64 {
        self.device.features() | VIRTIO_F_VERSION_1
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        if self.status & STATUS_DRIVER_OK != 0 {
            return None; // queue setup is frozen once the device runs
        }
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn ctx_call(&mut self, f: impl FnOnce(&mut dyn VirtioDevice, &mut QueueContext)) {
        let mut ctx = QueueContext {
            mem: &self.mem,
            queues: &mut self.queues,
            interrupt: &self.interrupt,
        };
        f(self.device.as_mut(), &mut ctx);
    }

    /// The guest notified queue `index` (its ioeventfd fired).
    pub fn process_queue(&mut self, index: usize) {
        if self.activated && index < self.queues.len() {
            self.ctx_call(|d, ctx| d.process_queue(ctx, index));
        }
    }

    /// The device's backend fd is ready.
    pub fn process_backend(&mut self) {
        if self.activated {
            self.ctx_call(|d, ctx| d.process_backend(ctx));
        }
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        self.status = value;
        if value & STATUS_DRIVER_OK != 0 && !self.activated {
            let valid = self
                .queues
                .iter()
                .all(|q| !q.ready() || q.is_valid(&self.mem));
            if !valid {
                tracing::warn!("virtio driver set DRIVER_OK with an invalid queue");
                self.status |= STATUS_FAILED;
                return;
            }
            self.activated = true;
            self.ctx_call(|d, ctx| d.activate(ctx));
        }
    }

    fn reset(&mut self) {
        for q in &mut self.queues {
            q.reset();
        }
        self.status = 0;
        self.driver_features = 0;
        self.features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.activated = false;
        self.interrupt.status.store(0, Ordering::SeqCst);
        self.device.reset();
    }

    pub fn state(&self) -> MmioTransportState {
        MmioTransportState {
            features_sel: self.features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            status: self.status,
            activated: self.activated,
            interrupt_status: self.interrupt.status.load(Ordering::SeqCst),
            queues: self.queues.iter().map(QueueStateSer::from_queue).collect(),
        }
    }

    /// Rebuilds the transport around an already restored `device`. Queue states come from
    /// a file: each is validated by virtio-queue before use.
    pub fn from_state(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        state: &MmioTransportState,
        interrupt: Interrupt,
        queue_evts: Vec<EventFd>,
    ) -> Result<Self, String> {
        let mut t = Self::new(device, mem, interrupt, queue_evts).map_err(|e| e.to_string())?;
        if state.queues.len() != t.queues.len() {
            return Err(format!(
                "{} queues saved, the device has {}",
                state.queues.len(),
                t.queues.len()
            ));
        }
        for (q, s) in t.queues.iter_mut().zip(&state.queues) {
            *q = s.to_queue()?;
        }
        t.features_sel = state.features_sel;
        t.driver_features_sel = state.driver_features_sel;
        t.driver_features = state.driver_features;
        t.queue_sel = state.queue_sel;
        t.status = state.status;
        t.activated = state.activated;
        t.interrupt
            .status
            .store(state.interrupt_status, Ordering::SeqCst);
        Ok(t)
    }

    /// After a restore: let the device act on its (restored) queues, as on activation.
    pub fn resume(&mut self) {
        if self.activated {
            self.ctx_call(|d, ctx| d.activate(ctx));
        }
    }
}

fn read_u32(data: &[u8]) -> Option<u32> {
    data.try_into().ok().map(u32::from_le_bytes)
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            self.device.read_config(offset - CONFIG_SPACE, data);
            return;
        }
        if data.len() != 4 {
            data.fill(0);
            return;
        }
        let v = match offset {
            REG_MAGIC => MAGIC,
            REG_VERSION => VERSION,
            REG_DEVICE_ID => self.device.device_type(),
            REG_VENDOR_ID => VENDOR,
            REG_DEVICE_FEATURES => match self.features_sel {
                0 => self.offered_features() as u32,
                1 => (self.offered_features() >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => self
                .queues
                .get(self.queue_sel as usize)
                .map_or(0, |q| u32::from(q.max_size())),
            REG_QUEUE_READY => self
                .queues
                .get(self.queue_sel as usize)
                .map_or(0, |q| u32::from(q.ready())),
            REG_INTERRUPT_STATUS => self.interrupt.status.load(Ordering::SeqCst),
            REG_STATUS => self.status,
            REG_CONFIG_GENERATION => 0,
            _ => 0,
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            return; // no device has writable config
        }
        let Some(v) = read_u32(data) else { return };
        match offset {
            REG_DEVICE_FEATURES_SEL => self.features_sel = v,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            REG_DRIVER_FEATURES => {
                let offered = self.offered_features();
                match self.driver_features_sel {
                    0 => {
                        self.driver_features =
                            (self.driver_features & !0xffff_ffff) | (u64::from(v) & offered)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | ((u64::from(v) << 32) & offered)
                    }
                    _ => {}
                }
            }
            REG_QUEUE_SEL => self.queue_sel = v,
            REG_QUEUE_NUM => {
                if let (Some(q), Ok(n)) = (self.selected_queue(), u16::try_from(v)) {
                    q.set_size(n);
                }
            }
            REG_QUEUE_READY => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(v == 1);
                }
            }
            REG_QUEUE_NOTIFY => {
                // Normally swallowed by the ioeventfd (a 4-byte write of a queue index). One
                // that gets here (another width) is passed to the event loop the same way:
                // device work never runs on a vCPU thread, whose seccomp filter has no
                // sockets or files for it.
                if let Some(evt) = self.queue_evts.get(v as usize) {
                    let _ = evt.write(1);
                }
            }
            REG_INTERRUPT_ACK => {
                self.interrupt.status.fetch_and(!v, Ordering::SeqCst);
            }
            REG_STATUS => self.set_status(v),
            REG_QUEUE_DESC_LOW => {
                if let Some(q) = self.selected_queue() {
                    q.set_desc_table_address(Some(v), None)
                }
            }
            REG_QUEUE_DESC_HIGH => {
                if let Some(q) = self.selected_queue() {
                    q.set_desc_table_address(None, Some(v))
                }
            }
            REG_QUEUE_AVAIL_LOW => {
                if let Some(q) = self.selected_queue() {
                    q.set_avail_ring_address(Some(v), None)
                }
            }
            REG_QUEUE_AVAIL_HIGH => {
                if let Some(q) = self.selected_queue() {
                    q.set_avail_ring_address(None, Some(v))
                }
            }
            REG_QUEUE_USED_LOW => {
                if let Some(q) = self.selected_queue() {
                    q.set_used_ring_address(Some(v), None)
                }
            }
            REG_QUEUE_USED_HIGH => {
                if let Some(q) = self.selected_queue() {
                    q.set_used_ring_address(None, Some(v))
                }
            }
            _ => {}
        }
    }
}
