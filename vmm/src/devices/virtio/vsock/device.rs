//! The virtio-vsock device: queue 0 carries packets to the guest (RX), queue 1 packets
//! from it (TX), queue 2 events. The config space holds the guest's CID.

use std::io::Write;
use std::os::unix::io::RawFd;
use std::path::Path;

use virtio_queue::{QueueOwnedT, QueueT};

use super::muxer::Muxer;
use super::packet::{read_packet, HDR_SIZE};
use crate::devices::virtio::{QueueContext, VirtioDevice, TYPE_VSOCK};

pub const QUEUE_SIZE: u16 = 256;
const RXQ: usize = 0;
const TXQ: usize = 1;
const EVQ: usize = 2;
const EVENT_TRANSPORT_RESET: u32 = 0;

pub struct Vsock {
    pub(super) cid: u64,
    pub(super) muxer: Muxer,
    /// A TRANSPORT_RESET event is owed to the guest (set by restore).
    pub(super) reset_pending: bool,
}

impl Vsock {
    /// A vsock device for guest CID `cid`, reachable from the host at `uds_path`.
    pub fn new(cid: u64, uds_path: &Path) -> std::io::Result<Self> {
        Self::check_cid(cid)?;
        Ok(Self {
            cid,
            muxer: Muxer::new(cid, uds_path)?,
            reset_pending: false,
        })
    }

    pub(super) fn check_cid(cid: u64) -> std::io::Result<()> {
        if cid < 3 || cid > u64::from(u32::MAX) {
            return Err(std::io::Error::other(format!(
                "guest CID {cid} is reserved or too large"
            )));
        }
        Ok(())
    }

    pub fn cid(&self) -> u64 {
        self.cid
    }

    pub fn uds_path(&self) -> &Path {
        self.muxer.uds_path()
    }

    pub fn connection_count(&self) -> usize {
        self.muxer.connection_count()
    }

    /// Parses every chain the guest queued on TX and hands the packets to the muxer.
    fn process_tx(&mut self, ctx: &mut QueueContext) {
        let mem = ctx.mem;
        let Some(q) = ctx.queues.get_mut(TXQ) else {
            return;
        };
        let mut used = false;
        while let Some(chain) = q.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            match chain.reader(mem) {
                Ok(mut r) => match read_packet(&mut r) {
                    Ok(pkt) => self.muxer.send_pkt(pkt),
                    Err(e) => tracing::debug!(error = %e, "bad vsock tx packet dropped"),
                },
                Err(e) => tracing::debug!(error = ?e, "bad vsock tx chain dropped"),
            }
            used |= q.add_used(mem, head, 0).is_ok();
        }
        if used && q.needs_notification(mem).unwrap_or(true) {
            ctx.interrupt.signal_used_queue();
        }
    }

    /// Moves packets for the guest into the RX buffers it has posted.
    fn fill_rx(&mut self, ctx: &mut QueueContext) {
        let mem = ctx.mem;
        let Some(q) = ctx.queues.get_mut(RXQ) else {
            return;
        };
        let mut used = false;
        while self.muxer.has_rx() {
            let Some(chain) = q.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let mut w = match chain.writer(mem) {
                Ok(w) => w,
                Err(_) => {
                    let _ = q.add_used(mem, head, 0);
                    used = true;
                    continue;
                }
            };
            let cap = w.available_bytes();
            if cap < HDR_SIZE {
                let _ = q.add_used(mem, head, 0);
                used = true;
                continue;
            }
            let Some(pkt) = self.muxer.next_rx(cap - HDR_SIZE) else {
                q.go_to_previous_position();
                break;
            };
            let ok = w.write_all(&pkt.hdr.to_bytes()).is_ok() && w.write_all(&pkt.data).is_ok();
            let len = if ok { w.bytes_written() as u32 } else { 0 };
            if q.add_used(mem, head, len).is_err() {
                break;
            }
            used = true;
        }
        if used && q.needs_notification(mem).unwrap_or(true) {
            ctx.interrupt.signal_used_queue();
        }
    }

    fn send_reset_event(&mut self, ctx: &mut QueueContext) {
        if !self.reset_pending {
            return;
        }
        let mem = ctx.mem;
        let Some(q) = ctx.queues.get_mut(EVQ) else {
            return;
        };
        let Some(chain) = q.pop_descriptor_chain(mem) else {
            return;
        };
        let head = chain.head_index();
        let written = match chain.writer(mem) {
            Ok(mut w) => {
                if w.write_all(&EVENT_TRANSPORT_RESET.to_le_bytes()).is_ok() {
                    4
                } else {
                    0
                }
            }
            Err(_) => 0,
        };
        if q.add_used(mem, head, written).is_ok() {
            self.reset_pending = false;
            ctx.interrupt.signal_used_queue();
        }
    }
}

impl VirtioDevice for Vsock {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; 3]
    }

    fn features(&self) -> u64 {
        0
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_vsock_config { le64 guest_cid; }
        crate::devices::virtio::read_config_bytes(&self.cid.to_le_bytes(), offset, data);
    }

    fn activate(&mut self, ctx: &mut QueueContext) {
        self.send_reset_event(ctx);
        self.fill_rx(ctx);
    }

    fn process_queue(&mut self, ctx: &mut QueueContext, index: usize) {
        match index {
            TXQ => self.process_tx(ctx),
            EVQ => self.send_reset_event(ctx),
            _ => {}
        }
        self.fill_rx(ctx);
    }

    fn backend_fd(&self) -> Option<RawFd> {
        Some(self.muxer.epoll_fd())
    }

    fn process_backend(&mut self, ctx: &mut QueueContext) {
        self.muxer.process_events();
        self.fill_rx(ctx);
    }

    fn reset(&mut self) {
        self.muxer.reset();
    }
}
