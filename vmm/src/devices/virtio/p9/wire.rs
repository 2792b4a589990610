//! 9P2000.L on the wire: little-endian integers, strings as a u16 length and bytes, qids.
//! Decoding is bounds-checked (a short or lying message is an error, never a panic);
//! encoding builds one reply, whose size field is set when it is finished.

/// Message types (the T-message; its R-message is one more). 9P2000.L numbering.
pub mod msg {
    pub const RLERROR: u8 = 7;
    pub const TSTATFS: u8 = 8;
    pub const TLOPEN: u8 = 12;
    pub const TLCREATE: u8 = 14;
    pub const TSYMLINK: u8 = 16;
    pub const TMKNOD: u8 = 18;
    pub const TRENAME: u8 = 20;
    pub const TREADLINK: u8 = 22;
    pub const TGETATTR: u8 = 24;
    pub const TSETATTR: u8 = 26;
    pub const TXATTRWALK: u8 = 30;
    pub const TXATTRCREATE: u8 = 32;
    pub const TREADDIR: u8 = 40;
    pub const TFSYNC: u8 = 50;
    pub const TLOCK: u8 = 52;
    pub const TGETLOCK: u8 = 54;
    pub const TLINK: u8 = 70;
    pub const TMKDIR: u8 = 72;
    pub const TRENAMEAT: u8 = 74;
    pub const TUNLINKAT: u8 = 76;
    pub const TVERSION: u8 = 100;
    pub const TAUTH: u8 = 102;
    pub const TATTACH: u8 = 104;
    pub const TFLUSH: u8 = 108;
    pub const TWALK: u8 = 110;
    pub const TREAD: u8 = 116;
    pub const TWRITE: u8 = 118;
    pub const TCLUNK: u8 = 120;
    pub const TREMOVE: u8 = 122;
}

/// size[4] type[1] tag[2]
pub const HEADER_LEN: usize = 7;
/// A qid on the wire: type[1] version[4] path[8].
pub const QID_LEN: usize = 13;

pub const QTDIR: u8 = 0x80;
pub const QTSYMLINK: u8 = 0x02;
pub const QTFILE: u8 = 0x00;

/// A file's identity as the client sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Qid {
    pub kind: u8,
    pub version: u32,
    pub path: u64,
}

/// A message too short for what it claims to hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Truncated;

/// Reads the fields of one message body in order.
pub struct Decoder<'a> {
    buf: &'a [u8],
}

impl<'a> Decoder<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], Truncated> {
        if self.buf.len() < n {
            return Err(Truncated);
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    pub fn u8(&mut self) -> Result<u8, Truncated> {
        Ok(self.take(1)?[0])
    }

    pub fn u16(&mut self) -> Result<u16, Truncated> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    pub fn u32(&mut self) -> Result<u32, Truncated> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub fn u64(&mut self) -> Result<u64, Truncated> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    /// A string: u16 length, then that many bytes (not necessarily UTF-8: file names).
    pub fn string(&mut self) -> Result<&'a [u8], Truncated> {
        let n = self.u16()?;
        self.take(usize::from(n))
    }

    /// `n` raw bytes (Twrite's data).
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], Truncated> {
        self.take(n)
    }
}

/// Builds one reply: `new` reserves the header, `finish` fills it in.
pub struct Encoder {
    buf: Vec<u8>,
}

impl Encoder {
    pub fn new(kind: u8, tag: u16) -> Self {
        let mut buf = Vec::with_capacity(64);
        buf.extend_from_slice(&[0, 0, 0, 0, kind]);
        buf.extend_from_slice(&tag.to_le_bytes());
        Self { buf }
    }

    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.buf.push(v);
        self
    }

    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// A string; longer than a u16 can say is cut (only names and link targets, which
    /// the host's own limits keep far below that).
    pub fn string(&mut self, s: &[u8]) -> &mut Self {
        let s = &s[..s.len().min(usize::from(u16::MAX))];
        self.u16(s.len() as u16);
        self.buf.extend_from_slice(s);
        self
    }

    pub fn qid(&mut self, q: &Qid) -> &mut Self {
        self.u8(q.kind).u32(q.version).u64(q.path)
    }

    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(b);
        self
    }

    /// The whole message so far, for writing data into in place (Rread, Rreaddir).
    pub fn buffer(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.len() <= HEADER_LEN
    }

    pub fn finish(mut self) -> Vec<u8> {
        let n = self.buf.len() as u32;
        self.buf[..4].copy_from_slice(&n.to_le_bytes());
        self.buf
    }
}

/// An Rlerror: the request failed with Linux errno `ecode`.
pub fn error_reply(tag: u16, ecode: u32) -> Vec<u8> {
    let mut e = Encoder::new(msg::RLERROR, tag);
    e.u32(ecode);
    e.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_truncation() {
        let mut e = Encoder::new(msg::TWALK + 1, 0x1234);
        e.u16(1).qid(&Qid {
            kind: QTDIR,
            version: 7,
            path: 42,
        });
        e.string(b"name");
        let m = e.finish();
        assert_eq!(
            u32::from_le_bytes([m[0], m[1], m[2], m[3]]) as usize,
            m.len()
        );
        assert_eq!(m[4], msg::TWALK + 1);
        let mut d = Decoder::new(&m[HEADER_LEN..]);
        assert_eq!(d.u16(), Ok(1));
        assert_eq!(d.u8(), Ok(QTDIR));
        assert_eq!(d.u32(), Ok(7));
        assert_eq!(d.u64(), Ok(42));
        assert_eq!(d.string(), Ok(&b"name"[..]));
        assert_eq!(d.u8(), Err(Truncated));
        // A string whose length runs past the message.
        let mut d = Decoder::new(&[9, 0, b'a']);
        assert_eq!(d.string(), Err(Truncated));
    }
}
