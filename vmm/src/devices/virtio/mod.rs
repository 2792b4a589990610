//! virtio over MMIO: the transport (registers, feature negotiation, queue setup) and the
//! devices behind it. A device never sees MMIO; it gets its queues, guest memory and an
//! interrupt to raise, and processes a queue when the guest notifies it (an ioeventfd).

pub mod blk;
pub mod mmio;
pub mod p9;
pub mod persist;
#[cfg(test)]
pub mod test_utils;
pub mod vsock;

use std::os::unix::io::RawFd;
use std::sync::atomic::{AtomicU32, Ordering};

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use crate::vstate::memory::GuestMemoryMmap;

pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
pub const TYPE_BLOCK: u32 = 2;
pub const TYPE_9P: u32 = 9;
pub const TYPE_VSOCK: u32 = 19;
/// Interrupt status bit: a used ring was updated.
pub const INT_VRING: u32 = 1;

/// A device's interrupt: the status register the guest reads, and the irqfd that raises
/// the line.
pub struct Interrupt {
    pub status: AtomicU32,
    pub evt: EventFd,
}

impl Interrupt {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            status: AtomicU32::new(0),
            evt: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    pub fn signal_used_queue(&self) {
        self.status.fetch_or(INT_VRING, Ordering::SeqCst);
        if let Err(e) = self.evt.write(1) {
            tracing::warn!(error = %e, "raising a virtio interrupt");
        }
    }
}

/// Copies `config` from `offset` into `data` (a driver read of config space); bytes past
/// its end read as zero, whatever offset and length the guest asked for.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|o| config.get(o).copied())
            .unwrap_or(0);
    }
}

/// What a device works on once the driver has set it up.
pub struct QueueContext<'a> {
    pub mem: &'a GuestMemoryMmap,
    pub queues: &'a mut [Queue],
    pub interrupt: &'a Interrupt,
}

impl QueueContext<'_> {
    /// Request/response devices (blk, 9p): answers every chain queue `index` holds with
    /// `handle` (which returns the bytes it wrote), returns each to the used ring, and
    /// raises the interrupt once if any was returned and the driver wants to hear.
    pub fn serve_requests(
        &mut self,
        index: usize,
        mut handle: impl FnMut(&GuestMemoryMmap, DescriptorChain<&GuestMemoryMmap>) -> u32,
    ) {
        let Some(queue) = self.queues.get_mut(index) else {
            return;
        };
        let mem = self.mem;
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let len = handle(mem, chain);
            // A head index outside the queue cannot be returned: the guest's own loss.
            used |= queue.add_used(mem, head, len).is_ok();
        }
        if used && queue.needs_notification(mem).unwrap_or(true) {
            self.interrupt.signal_used_queue();
        }
    }
}

pub trait VirtioDevice: Send {
    fn device_type(&self) -> u32;
    /// For saving: the concrete device behind the trait.
    fn as_any(&self) -> &dyn std::any::Any;
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// Feature bits offered (VIRTIO_F_VERSION_1 is added by the transport).
    fn features(&self) -> u64;
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// The driver set DRIVER_OK; queues are valid from now on.
    fn activate(&mut self, _ctx: &mut QueueContext) {}
    /// The guest notified queue `index`.
    fn process_queue(&mut self, ctx: &mut QueueContext, index: usize);
    /// A host-side fd the event loop should watch for this device (vsock's muxer).
    fn backend_fd(&self) -> Option<RawFd> {
        None
    }
    /// `backend_fd` is readable.
    fn process_backend(&mut self, _ctx: &mut QueueContext) {}
    /// The driver reset the device.
    fn reset(&mut self) {}
}
