//! The block device proper: config space, request parsing and execution.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use virtio_queue::DescriptorChain;

use crate::devices::virtio::{QueueContext, VirtioDevice, TYPE_BLOCK};
use crate::vstate::memory::GuestMemoryMmap;

pub const SECTOR_SIZE: u64 = 512;
pub const QUEUE_SIZE: u16 = 256;
const VIRTIO_BLK_F_RO: u64 = 1 << 5;
const VIRTIO_BLK_T_IN: u32 = 0;
const VIRTIO_BLK_T_OUT: u32 = 1;
const VIRTIO_BLK_T_FLUSH: u32 = 4;
const VIRTIO_BLK_T_GET_ID: u32 = 8;
const VIRTIO_BLK_S_OK: u8 = 0;
const VIRTIO_BLK_S_IOERR: u8 = 1;
const VIRTIO_BLK_S_UNSUPP: u8 = 2;
const VIRTIO_BLK_ID_BYTES: usize = 20;
/// Largest single request (the driver never sends more than its max segments anyway).
const MAX_REQUEST_BYTES: usize = 16 << 20;

pub struct Block {
    pub(super) path: PathBuf,
    file: File,
    pub(super) capacity_sectors: u64,
    pub(super) serial: String,
}

impl Block {
    /// A read-only disk backed by `path`; `serial` is what the guest reads as its ID.
    pub fn open(path: &Path, serial: &str) -> std::io::Result<Self> {
        let file = File::open(path)?;
        let len = file.metadata()?.len();
        Ok(Self {
            path: path.to_path_buf(),
            file,
            capacity_sectors: len.div_ceil(SECTOR_SIZE),
            serial: serial.to_string(),
        })
    }

    pub fn capacity_sectors(&self) -> u64 {
        self.capacity_sectors
    }

    /// Executes one request; returns the bytes written into guest buffers.
    fn handle(&self, mem: &GuestMemoryMmap, chain: DescriptorChain<&GuestMemoryMmap>) -> u32 {
        let Ok(mut reader) = chain.clone().reader(mem) else {
            return 0;
        };
        let Ok(mut writer) = chain.writer(mem) else {
            return 0;
        };
        let mut header = [0u8; 16];
        if reader.read_exact(&mut header).is_err() {
            return 0;
        }
        let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let mut sector_bytes = [0u8; 8];
        sector_bytes.copy_from_slice(&header[8..16]);
        let sector = u64::from_le_bytes(sector_bytes);
        let writable = writer.available_bytes();
        if writable == 0 {
            return 0; // no room for the status byte: a malformed request
        }
        let Ok(mut status_writer) = writer.split_at(writable - 1) else {
            return 0;
        };
        let data_len = writable - 1;
        let status = match kind {
            VIRTIO_BLK_T_IN => self.read_into(sector, data_len, &mut writer),
            VIRTIO_BLK_T_OUT => VIRTIO_BLK_S_IOERR, // read-only
            VIRTIO_BLK_T_FLUSH => VIRTIO_BLK_S_OK,
            VIRTIO_BLK_T_GET_ID => {
                let mut id = [0u8; VIRTIO_BLK_ID_BYTES];
                let n = self.serial.len().min(VIRTIO_BLK_ID_BYTES);
                id[..n].copy_from_slice(&self.serial.as_bytes()[..n]);
                let n = data_len.min(VIRTIO_BLK_ID_BYTES);
                if writer.write_all(&id[..n]).is_ok() {
                    VIRTIO_BLK_S_OK
                } else {
                    VIRTIO_BLK_S_IOERR
                }
            }
            _ => VIRTIO_BLK_S_UNSUPP,
        };
        if status_writer.write_all(&[status]).is_err() {
            return writer.bytes_written() as u32;
        }
        (writer.bytes_written() + 1) as u32
    }

    fn read_into(&self, sector: u64, len: usize, writer: &mut virtio_queue::Writer<'_, ()>) -> u8 {
        let in_bounds = sector
            .checked_mul(SECTOR_SIZE)
            .and_then(|start| start.checked_add(len as u64).map(|end| (start, end)))
            .filter(|&(_, end)| end <= self.capacity_sectors * SECTOR_SIZE);
        let Some((start, _)) = in_bounds else {
            return VIRTIO_BLK_S_IOERR;
        };
        if len > MAX_REQUEST_BYTES || len as u64 % SECTOR_SIZE != 0 {
            return VIRTIO_BLK_S_IOERR;
        }
        let mut buf = vec![0u8; len.min(1 << 16)];
        let mut done = 0usize;
        while done < len {
            let n = buf.len().min(len - done);
            // The file may end inside its last sector: the rest reads as zeros.
            let got = match self.file.read_at(&mut buf[..n], start + done as u64) {
                Ok(g) => g,
                Err(_) => return VIRTIO_BLK_S_IOERR,
            };
            buf[got..n].fill(0);
            if writer.write_all(&buf[..n]).is_err() {
                return VIRTIO_BLK_S_IOERR;
            }
            done += n;
        }
        VIRTIO_BLK_S_OK
    }
}

impl VirtioDevice for Block {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        VIRTIO_BLK_F_RO
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_blk_config: only `capacity` (le64 at 0) is meaningful here.
        crate::devices::virtio::read_config_bytes(
            &self.capacity_sectors.to_le_bytes(),
            offset,
            data,
        );
    }

    fn process_queue(&mut self, ctx: &mut QueueContext, index: usize) {
        ctx.serve_requests(index, |mem, chain| self.handle(mem, chain));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::*;
    use crate::devices::virtio::Interrupt;
    use rand::{Rng, SeedableRng};
    use virtio_queue::QueueT;
    use vm_memory::{Bytes, GuestAddress};

    fn disk(sectors: usize) -> (tempfile::NamedTempFile, Vec<u8>) {
        let data: Vec<u8> = (0..sectors * 512).map(|i| (i * 7 % 251) as u8).collect();
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), &data).unwrap();
        (f, data)
    }

    fn header(mem: &GuestMemoryMmap, at: u64, kind: u32, sector: u64) {
        mem.write_obj(kind, GuestAddress(at)).unwrap();
        mem.write_obj(0u32, GuestAddress(at + 4)).unwrap();
        mem.write_obj(sector, GuestAddress(at + 8)).unwrap();
    }

    #[test]
    fn reads_ids_and_refuses_writes_and_bad_sectors() {
        let (f, data) = disk(8);
        let mut blk = Block::open(f.path(), "sm-layer-0").unwrap();
        assert_eq!(blk.capacity_sectors(), 8);
        let mut cfg = [0u8; 8];
        blk.read_config(0, &mut cfg);
        assert_eq!(u64::from_le_bytes(cfg), 8);
        let mem = memory();
        let mut tq = TestQueue::new(0);
        let mut queues = vec![tq.queue()];
        let irq = Interrupt::new().unwrap();
        let (h, d, s) = (DATA_START, DATA_START + 0x1000, DATA_START + 0x3000);

        // IN: sectors 2..4 split over two buffers.
        header(&mem, h, VIRTIO_BLK_T_IN, 2);
        tq.add_chain(
            &mem,
            &[
                (h, 16, false),
                (d, 512, true),
                (d + 512, 512, true),
                (s, 1, true),
            ],
        );
        // GET_ID
        header(&mem, h + 64, VIRTIO_BLK_T_GET_ID, 0);
        tq.add_chain(
            &mem,
            &[
                (h + 64, 16, false),
                (d + 0x1000, 20, true),
                (s + 1, 1, true),
            ],
        );
        // OUT on a read-only disk; IN past the end; an unknown type.
        header(&mem, h + 128, VIRTIO_BLK_T_OUT, 0);
        tq.add_chain(
            &mem,
            &[(h + 128, 16, false), (d, 512, false), (s + 2, 1, true)],
        );
        header(&mem, h + 192, VIRTIO_BLK_T_IN, 7);
        tq.add_chain(
            &mem,
            &[
                (h + 192, 16, false),
                (d + 0x1800, 1024, true),
                (s + 3, 1, true),
            ],
        );
        header(&mem, h + 256, 99, 0);
        tq.add_chain(&mem, &[(h + 256, 16, false), (s + 4, 1, true)]);

        let mut ctx = QueueContext {
            mem: &mem,
            queues: &mut queues,
            interrupt: &irq,
        };
        blk.process_queue(&mut ctx, 0);
        assert_eq!(tq.used_idx(&mem), 5);
        let mut got = vec![0u8; 1024];
        mem.read_slice(&mut got, GuestAddress(d)).unwrap();
        assert_eq!(got, data[1024..2048]);
        assert_eq!(tq.used_elem(&mem, 0).1, 1025);
        let mut id = [0u8; 20];
        mem.read_slice(&mut id, GuestAddress(d + 0x1000)).unwrap();
        assert_eq!(&id[..10], b"sm-layer-0");
        let status: [u8; 5] = mem.read_obj(GuestAddress(s)).unwrap();
        assert_eq!(
            status,
            [
                VIRTIO_BLK_S_OK,
                VIRTIO_BLK_S_OK,
                VIRTIO_BLK_S_IOERR,
                VIRTIO_BLK_S_IOERR,
                VIRTIO_BLK_S_UNSUPP
            ]
        );
        assert_eq!(irq.status.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    /// Random descriptor tables, rings and request headers: the device must never panic,
    /// never write outside guest memory, and keep the used ring consistent.
    #[test]
    fn fuzz_random_descriptor_chains() {
        let (f, _) = disk(64);
        let mut blk = Block::open(f.path(), "fuzz").unwrap();
        let mem = memory();
        let irq = Interrupt::new().unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed_b10c);
        let mut tq = TestQueue::new(0);
        let mut queues = vec![tq.queue()];
        let iterations = 100_000;
        let mut valid = 0u16;
        let shape = ChainFuzz {
            area: (DATA_START, 0x8000),
            max_len: 2048,
            max_descs: 4,
            p_write: 0.5,
            p_indirect: 0.03,
        };
        for _ in 0..iterations {
            let (head, addrs) = tq.write_random_chain(&mem, &mut rng, &shape);
            for addr in addrs {
                if rng.gen_bool(0.7) && fits(addr, 16) {
                    let kind = [0u32, 1, 4, 8, rng.gen()][rng.gen_range(0..5)];
                    let sector = if rng.gen_bool(0.8) {
                        rng.gen_range(0..80)
                    } else {
                        rng.gen()
                    };
                    header(&mem, addr, kind, sector);
                }
            }
            let real = tq.publish_fuzzed(&mem, &mut rng, head);
            valid = valid.wrapping_add(u16::from(real));
            let mut ctx = QueueContext {
                mem: &mem,
                queues: &mut queues,
                interrupt: &irq,
            };
            blk.process_queue(&mut ctx, 0);
        }
        // Every published chain was consumed; only chains with a bogus head index (which
        // cannot be named in the used ring) are missing from it.
        assert_eq!(queues[0].next_avail(), iterations as u16);
        assert_eq!(tq.used_idx(&mem), valid);
    }
}
