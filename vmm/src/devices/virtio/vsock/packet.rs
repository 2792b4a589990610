//! The vsock packet header (`struct virtio_vsock_hdr`, 44 bytes little-endian) and the
//! parsing of guest TX buffers into packets. A guest can put anything in a descriptor
//! chain: lengths are checked against the chain and a fixed maximum before any copy.

use std::io::Read;

pub const HDR_SIZE: usize = 44;
/// The largest payload accepted from the guest (Linux sends at most 64 KiB).
pub const MAX_PKT_DATA: u32 = 64 * 1024;

pub const TYPE_STREAM: u16 = 1;
pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;
pub const SHUTDOWN_RCV: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Header {
    pub fn from_bytes(b: &[u8; HDR_SIZE]) -> Self {
        let u64_at = |o: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(a)
        };
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        Self {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    pub fn to_bytes(&self) -> [u8; HDR_SIZE] {
        let mut b = [0u8; HDR_SIZE];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// A packet: header plus payload (only RW packets carry one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    pub hdr: Header,
    pub data: Vec<u8>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PacketError {
    /// The chain is shorter than a header.
    #[error("descriptor chain of {0} bytes is shorter than a vsock header")]
    ChainTooShortForHeader(usize),
    /// The header's `len` is over the limit.
    #[error("packet length {0} is over the {MAX_PKT_DATA} byte limit")]
    InvalidLen(u32),
    /// The header's `len` is more than the chain holds.
    #[error("packet length {0} but only {1} bytes in the descriptor chain")]
    ChainTooShortForData(u32, usize),
}

/// Reads one packet from a guest TX chain.
pub fn read_packet(reader: &mut impl ChainReader) -> Result<Packet, PacketError> {
    let avail = reader.available();
    if avail < HDR_SIZE {
        return Err(PacketError::ChainTooShortForHeader(avail));
    }
    let mut b = [0u8; HDR_SIZE];
    reader
        .read_exact(&mut b)
        .map_err(|_| PacketError::ChainTooShortForHeader(avail))?;
    let hdr = Header::from_bytes(&b);
    let mut data = Vec::new();
    if hdr.op == OP_RW {
        if hdr.len > MAX_PKT_DATA {
            return Err(PacketError::InvalidLen(hdr.len));
        }
        let left = reader.available();
        if hdr.len as usize > left {
            return Err(PacketError::ChainTooShortForData(hdr.len, left));
        }
        data.resize(hdr.len as usize, 0);
        reader
            .read_exact(&mut data)
            .map_err(|_| PacketError::ChainTooShortForData(hdr.len, left))?;
    }
    Ok(Packet { hdr, data })
}

/// A readable descriptor chain (virtio-queue's Reader; a byte slice in unit tests).
pub trait ChainReader: Read {
    fn available(&self) -> usize;
}

impl ChainReader for virtio_queue::Reader<'_, ()> {
    fn available(&self) -> usize {
        self.available_bytes()
    }
}

impl ChainReader for &[u8] {
    fn available(&self) -> usize {
        self.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_limits() {
        let h = Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 1234,
            dst_port: 80,
            len: 5,
            type_: TYPE_STREAM,
            op: OP_RW,
            flags: 0,
            buf_alloc: 4096,
            fwd_cnt: 7,
        };
        assert_eq!(Header::from_bytes(&h.to_bytes()), h);
        let mut bytes = h.to_bytes().to_vec();
        bytes.extend_from_slice(b"hello");
        let p = read_packet(&mut bytes.as_slice()).unwrap();
        assert_eq!(p.data, b"hello");
        assert_eq!(
            read_packet(&mut &bytes[..HDR_SIZE + 2]),
            Err(PacketError::ChainTooShortForData(5, 2))
        );
        assert_eq!(
            read_packet(&mut &bytes[..10]),
            Err(PacketError::ChainTooShortForHeader(10))
        );
        let mut big = Header {
            len: MAX_PKT_DATA + 1,
            ..h
        }
        .to_bytes()
        .to_vec();
        big.resize(HDR_SIZE + 100, 0);
        assert_eq!(
            read_packet(&mut big.as_slice()),
            Err(PacketError::InvalidLen(MAX_PKT_DATA + 1))
        );
    }
}
