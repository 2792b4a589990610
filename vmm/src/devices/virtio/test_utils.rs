//! A hand-driven split virtqueue in test guest memory: the tests play the guest driver
//! (write descriptors, publish them in the avail ring, read the used ring), and the fuzz
//! tests write whatever they like into the same structures.

use rand::Rng;
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

/// How a fuzz test shapes the random chains it throws at a device.
pub struct ChainFuzz {
    /// Most buffers land in `area.0 .. area.0 + area.1`; the rest anywhere in u64.
    pub area: (u64, u64),
    /// Most lengths are below this; the rest any u32.
    pub max_len: u32,
    pub max_descs: u16,
    pub p_write: f64,
    pub p_indirect: f64,
}

impl TestQueue {
    /// Writes a chain of random descriptors (addresses, lengths, flags; now and then a
    /// `next` that points anywhere) at a random head. Returns the head and the addresses.
    pub fn write_random_chain(
        &self,
        mem: &GuestMemoryMmap,
        rng: &mut impl Rng,
        f: &ChainFuzz,
    ) -> (u16, Vec<u64>) {
        let n = rng.gen_range(1..=f.max_descs);
        let head = rng.gen_range(0..QSIZE);
        let mut addrs = Vec::with_capacity(n as usize);
        for i in 0..n {
            let addr = if rng.gen_bool(0.85) {
                f.area.0 + rng.gen_range(0..f.area.1)
            } else {
                rng.gen()
            };
            let len = if rng.gen_bool(0.85) {
                rng.gen_range(0..f.max_len)
            } else {
                rng.gen()
            };
            let mut flags = if rng.gen_bool(f.p_write) { F_WRITE } else { 0 };
            if i + 1 < n {
                flags |= F_NEXT;
            }
            if rng.gen_bool(f.p_indirect) {
                flags |= F_INDIRECT;
            }
            let next = if rng.gen_bool(0.9) {
                (head + i + 1) % QSIZE
            } else {
                rng.gen()
            };
            self.write_desc(mem, head + i, addr, len, flags, next);
            addrs.push(addr);
        }
        (head, addrs)
    }

    /// Publishes `head` — or, now and then, a random index that may name no descriptor.
    /// Returns whether the published index is a real one (only those reach the used ring).
    pub fn publish_fuzzed(&mut self, mem: &GuestMemoryMmap, rng: &mut impl Rng, head: u16) -> bool {
        let published = if rng.gen_bool(0.98) { head } else { rng.gen() };
        self.publish(mem, published);
        published < QSIZE
    }
}

/// Whether `len` bytes at `addr` are inside the test memory.
pub fn fits(addr: u64, len: usize) -> bool {
    addr.checked_add(len as u64)
        .is_some_and(|e| e < MEM_SIZE as u64)
}
