//! What a snapshot keeps of a virtio-mmio transport and its queues.

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QueueStateSer {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx: bool,
}

impl QueueStateSer {
    pub fn from_queue(q: &Queue) -> Self {
        Self {
            max_size: q.max_size(),
            size: q.size(),
            ready: q.ready(),
            desc_table: q.desc_table(),
            avail_ring: q.avail_ring(),
            used_ring: q.used_ring(),
            next_avail: q.next_avail(),
            next_used: q.next_used(),
            event_idx: q.event_idx_enabled(),
        }
    }

    /// A queue from saved (untrusted) values; virtio-queue validates sizes and alignment.
    pub fn to_queue(&self) -> Result<Queue, String> {
        Queue::try_from(QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        })
        .map_err(|e| format!("saved queue state: {e:?}"))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MmioTransportState {
    pub features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    pub queue_sel: u32,
    pub status: u32,
    pub activated: bool,
    pub interrupt_status: u32,
    pub queues: Vec<QueueStateSer>,
}
