//! The server name (SNI) of a TLS ClientHello, read without decrypting anything, for
//! routing TLS connections that pass through untouched. The bytes come from the network:
//! every length is checked against what is there and against the limits of the format.

/// Largest ClientHello accepted (it may span several records); real ones are < 2 KiB, with
/// post-quantum key shares a few KiB.
pub const MAX_HELLO: usize = 64 * 1024;
/// A TLS record's payload is at most 2^14 bytes (RFC 8446 5.1).
const MAX_RECORD: usize = 1 << 14;

#[derive(Debug, PartialEq, Eq)]
pub enum Hello {
    /// More bytes are needed to see the whole ClientHello.
    Incomplete,
    /// The ClientHello is complete; its host name, if it sent one.
    Complete(Option<String>),
}

/// Why the bytes are not a ClientHello this router can route.
#[derive(Debug, PartialEq, Eq)]
pub struct NotTls(pub &'static str);

struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], NotTls> {
        let end = self
            .at
            .checked_add(n)
            .filter(|e| *e <= self.buf.len())
            .ok_or(NotTls("a length runs past the ClientHello"))?;
        let s = &self.buf[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<usize, NotTls> {
        Ok(self.take(1)?[0] as usize)
    }
    fn u16(&mut self) -> Result<usize, NotTls> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]) as usize)
    }
    /// A vector with a `len_bytes`-byte length prefix.
    fn vec(&mut self, len_bytes: usize) -> Result<Reader<'a>, NotTls> {
        let n = match len_bytes {
            1 => self.u8()?,
            _ => self.u16()?,
        };
        Ok(Reader {
            buf: self.take(n)?,
            at: 0,
        })
    }
    fn done(&self) -> bool {
        self.at == self.buf.len()
    }
}

/// Looks at the first bytes a client sent: the SNI host name once the ClientHello is all
/// there, `Incomplete` before, or why it is not TLS.
pub fn client_hello_sni(buf: &[u8]) -> Result<Hello, NotTls> {
    // The handshake message, reassembled from as many handshake records as it spans.
    let mut message = Vec::new();
    let mut at = 0;
    loop {
        let Some(header) = buf.get(at..at + 5) else {
            return Ok(Hello::Incomplete);
        };
        if header[0] != 22 {
            return Err(NotTls("not a TLS handshake record"));
        }
        if header[1] != 3 {
            return Err(NotTls("not a TLS record version"));
        }
        let len = u16::from_be_bytes([header[3], header[4]]) as usize;
        if len == 0 || len > MAX_RECORD {
            return Err(NotTls("a TLS record of impossible length"));
        }
        let Some(payload) = buf.get(at + 5..at + 5 + len) else {
            return Ok(Hello::Incomplete);
        };
        message.extend_from_slice(payload);
        at += 5 + len;
        if message.len() >= 4 {
            if message[0] != 1 {
                return Err(NotTls("the first handshake message is not a ClientHello"));
            }
            let body = u32::from_be_bytes([0, message[1], message[2], message[3]]) as usize;
            if body + 4 > MAX_HELLO {
                return Err(NotTls("a ClientHello larger than 64 KiB"));
            }
            if message.len() >= body + 4 {
                return parse_hello(&message[4..body + 4]).map(Hello::Complete);
            }
        }
        if at >= MAX_HELLO + 5 * (MAX_HELLO / MAX_RECORD + 1) {
            return Err(NotTls("a ClientHello larger than 64 KiB"));
        }
    }
}

/// The host name in a ClientHello body (RFC 8446 4.1.2; server_name is RFC 6066 3).
fn parse_hello(body: &[u8]) -> Result<Option<String>, NotTls> {
    let mut r = Reader { buf: body, at: 0 };
    r.take(2)?; // legacy_version
    r.take(32)?; // random
    r.vec(1)?; // legacy_session_id
    r.vec(2)?; // cipher_suites
    r.vec(1)?; // legacy_compression_methods
    if r.done() {
        return Ok(None); // no extensions at all (TLS 1.0-era clients)
    }
    let mut exts = r.vec(2)?;
    let mut name = None;
    while !exts.done() {
        let kind = exts.u16()?;
        let mut data = exts.vec(2)?;
        if kind != 0 {
            continue;
        }
        if name.is_some() {
            return Err(NotTls("two server_name extensions"));
        }
        let mut list = data.vec(2)?;
        while !list.done() {
            let name_type = list.u8()?;
            let host = list.vec(2)?;
            if name_type == 0 && name.is_none() {
                name = Some(host_name(host.buf)?);
            }
        }
    }
    Ok(name)
}

/// A DNS host name as sent (ASCII letters, digits, '-', '.', at most 253), lower-cased.
fn host_name(raw: &[u8]) -> Result<String, NotTls> {
    let ok = !raw.is_empty()
        && raw.len() <= 253
        && raw
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
    if !ok {
        return Err(NotTls("a server name that is not a DNS host name"));
    }
    Ok(String::from_utf8_lossy(raw).to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ClientHello as a client builds it, with `sni` (if any) and padding of `pad` bytes
    /// in an extra extension, split into records of at most `record` bytes.
    fn hello(sni: Option<&str>, pad: usize, record: usize) -> Vec<u8> {
        let mut exts = Vec::new();
        if let Some(n) = sni {
            let mut list = vec![0u8];
            list.extend((n.len() as u16).to_be_bytes());
            list.extend(n.as_bytes());
            let mut data = (list.len() as u16).to_be_bytes().to_vec();
            data.extend(list);
            exts.extend(0u16.to_be_bytes());
            exts.extend((data.len() as u16).to_be_bytes());
            exts.extend(data);
        }
        exts.extend(21u16.to_be_bytes()); // padding
        exts.extend((pad as u16).to_be_bytes());
        exts.extend(vec![0u8; pad]);
        let mut body = vec![3, 3];
        body.extend([7u8; 32]);
        body.push(0);
        body.extend(2u16.to_be_bytes());
        body.extend([0x13, 0x01]);
        body.extend([1, 0]);
        body.extend((exts.len() as u16).to_be_bytes());
        body.extend(exts);
        let mut msg = vec![1];
        msg.extend(&(body.len() as u32).to_be_bytes()[1..]);
        msg.extend(body);
        let mut out = Vec::new();
        for chunk in msg.chunks(record) {
            out.extend([22, 3, 1]);
            out.extend((chunk.len() as u16).to_be_bytes());
            out.extend(chunk);
        }
        out
    }

    #[test]
    fn names_incomplete_and_multi_record_hellos() {
        let h = hello(Some("Guest.Test"), 10, MAX_RECORD);
        assert_eq!(
            client_hello_sni(&h),
            Ok(Hello::Complete(Some("guest.test".into())))
        );
        for cut in 0..h.len() {
            assert_eq!(
                client_hello_sni(&h[..cut]),
                Ok(Hello::Incomplete),
                "cut {cut}"
            );
        }
        // Split over records of 100 bytes, with a large extension.
        let h = hello(Some("a.test"), 3000, 100);
        assert_eq!(
            client_hello_sni(&h),
            Ok(Hello::Complete(Some("a.test".into())))
        );
        assert_eq!(
            client_hello_sni(&hello(None, 0, MAX_RECORD)),
            Ok(Hello::Complete(None))
        );
    }

    #[test]
    fn not_tls_is_named() {
        assert!(client_hello_sni(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").is_err());
        assert!(client_hello_sni(b"SSH-2.0-OpenSSH_9.2\r\n").is_err());
        assert!(client_hello_sni(&[22, 3, 1, 0xff, 0xff]).is_err());
        let mut bad = hello(Some("a.test"), 0, MAX_RECORD);
        bad[5] = 2; // a ServerHello
        assert!(client_hello_sni(&bad).is_err());
        assert!(client_hello_sni(&hello(Some("a b"), 0, MAX_RECORD)).is_err());
    }

    /// Hostile input: random bytes and mutations of real hellos never panic, and what is
    /// incomplete stays incomplete only while bytes are missing.
    #[test]
    fn random_and_mutated_input_never_panics() {
        let mut x = 0x2545f4914f6cdd1du64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let base = hello(Some("mutate.test"), 40, 64);
        for _ in 0..20000 {
            let mut b = base.clone();
            for _ in 0..(next() % 4 + 1) {
                let i = (next() as usize) % b.len();
                b[i] = next() as u8;
            }
            let cut = (next() as usize) % (b.len() + 1);
            let _ = client_hello_sni(&b[..cut]);
            let junk: Vec<u8> = (0..(next() % 300)).map(|_| next() as u8).collect();
            let _ = client_hello_sni(&junk);
        }
    }
}
