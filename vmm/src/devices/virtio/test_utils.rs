//! A hand-driven split virtqueue in test guest memory: the tests play the guest driver
//! (write descriptors, publish them in the avail ring, read the used ring), and the fuzz
//! tests write whatever they like into the same structures.

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use crate::vstate::memory::{create_memfd_memory, GuestMemoryMmap};

pub const QSIZE: u16 = 256;
pub const MEM_SIZE: usize = 8 << 20;
/// Buffers the tests hand out live from here up.
pub const DATA_START: u64 = 0x10_0000;
pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;
pub const F_INDIRECT: u16 = 4;

pub fn memory() -> GuestMemoryMmap {
    create_memfd_memory(MEM_SIZE).unwrap().0
}

/// One queue's rings at fixed places (queue `n` is at `n * 0x10000`).
pub struct TestQueue {
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    avail_idx: u16,
    next_desc: u16,
}

impl TestQueue {
    pub fn new(n: u64) -> Self {
        let base = 0x1000 + n * 0x10000;
        Self {
            desc: base,
            avail: base + 0x1000 * 2,
            used: base + 0x1000 * 3,
            avail_idx: 0,
            next_desc: 0,
        }
    }

    pub fn queue(&self) -> Queue {
        let mut q = Queue::new(QSIZE).unwrap();
        q.set_size(QSIZE);
        q.set_desc_table_address(Some(self.desc as u32), Some(0));
        q.set_avail_ring_address(Some(self.avail as u32), Some(0));
        q.set_used_ring_address(Some(self.used as u32), Some(0));
        q.set_ready(true);
        q
    }

    /// Writes a raw descriptor at `index`.
    pub fn write_desc(
        &self,
        mem: &GuestMemoryMmap,
        index: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let at = GuestAddress(self.desc + u64::from(index % QSIZE) * 16);
        mem.write_obj(addr, at).unwrap();
        mem.write_obj(len, GuestAddress(at.0 + 8)).unwrap();
        mem.write_obj(flags, GuestAddress(at.0 + 12)).unwrap();
        mem.write_obj(next, GuestAddress(at.0 + 14)).unwrap();
    }

    /// Publishes `head` in the avail ring.
    pub fn publish(&mut self, mem: &GuestMemoryMmap, head: u16) {
        let slot = GuestAddress(self.avail + 4 + u64::from(self.avail_idx % QSIZE) * 2);
        mem.write_obj(head, slot).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2))
            .unwrap();
    }

    /// Adds a well-formed chain of `(addr, len, writable)` buffers; returns its head.
    pub fn add_chain(&mut self, mem: &GuestMemoryMmap, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (i, (addr, len, w)) in bufs.iter().enumerate() {
            let idx = self.next_desc;
            self.next_desc = (self.next_desc + 1) % QSIZE;
            let last = i + 1 == bufs.len();
            let flags = if *w { F_WRITE } else { 0 } | if last { 0 } else { F_NEXT };
            self.write_desc(mem, idx, *addr, *len, flags, self.next_desc);
        }
        self.publish(mem, head);
        head
    }

    pub fn used_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        mem.read_obj(GuestAddress(self.used + 2)).unwrap()
    }

    /// The `n`th used element: (head, len).
    pub fn used_elem(&self, mem: &GuestMemoryMmap, n: u16) -> (u32, u32) {
        let at = self.used + 4 + u64::from(n % QSIZE) * 8;
        (
            mem.read_obj(GuestAddress(at)).unwrap(),
            mem.read_obj(GuestAddress(at + 4)).unwrap(),
        )
    }
}
