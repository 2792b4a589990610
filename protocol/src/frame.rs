//! Length-prefixed frames: `u32` little-endian payload length, then the bincode (2.x,
//! standard config) encoding of one message. Lengths above [`MAX_FRAME_LEN`] are rejected
//! before anything is allocated.

use std::io::{self, Read, Write};

use serde::{de::DeserializeOwned, Serialize};

/// Largest payload either side accepts (output is chunked well below this).
pub const MAX_FRAME_LEN: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {0} bytes exceeds the {MAX_FRAME_LEN}-byte limit")]
    TooLarge(usize),
    #[error("frame payload is malformed: {0}")]
    Malformed(String),
    #[error("frame payload has {0} trailing bytes")]
    TrailingBytes(usize),
    #[error("stream ended inside a frame")]
    Truncated,
    #[error("i/o error on the frame stream: {0}")]
    Io(#[from] io::Error),
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_FRAME_LEN>()
}

/// Encodes `msg` as one frame (length prefix included).
pub fn encode_frame<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let payload = bincode::serde::encode_to_vec(msg, config())
        .map_err(|e| FrameError::Malformed(e.to_string()))?;
    if payload.len() > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge(payload.len()));
    }
    let mut out = Vec::with_capacity(4 + payload.len());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Decodes one frame from the front of `buf`. `Ok(None)`: more bytes are needed.
/// On success returns the message and how many bytes it used.
pub fn decode_frame<T: DeserializeOwned>(buf: &[u8]) -> Result<Option<(T, usize)>, FrameError> {
    let Some(len_bytes) = buf.get(..4) else {
        return Ok(None);
    };
    let len = u32::from_le_bytes([len_bytes[0], len_bytes[1], len_bytes[2], len_bytes[3]]) as usize;
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge(len));
    }
    let Some(payload) = buf.get(4..4 + len) else {
        return Ok(None);
    };
    let (msg, used) = bincode::serde::decode_from_slice::<T, _>(payload, config())
        .map_err(|e| FrameError::Malformed(e.to_string()))?;
    if used != len {
        return Err(FrameError::TrailingBytes(len - used));
    }
    Ok(Some((msg, 4 + len)))
}

/// Writes one frame and flushes it.
pub fn write_frame<W: Write + ?Sized, T: Serialize>(w: &mut W, msg: &T) -> Result<(), FrameError> {
    let bytes = encode_frame(msg)?;
    w.write_all(&bytes)?;
    w.flush()?;
    Ok(())
}

/// Reads frames from a byte stream.
pub struct FrameReader<R> {
    inner: R,
}

impl<R: Read> FrameReader<R> {
    pub fn new(inner: R) -> Self {
        Self { inner }
    }

    /// The next message; `Ok(None)` on a clean end of stream between frames.
    pub fn read<T: DeserializeOwned>(&mut self) -> Result<Option<T>, FrameError> {
        let mut len_bytes = [0u8; 4];
        match read_full(&mut self.inner, &mut len_bytes)? {
            0 => return Ok(None),
            4 => {}
            _ => return Err(FrameError::Truncated),
        }
        let len = u32::from_le_bytes(len_bytes) as usize;
        if len > MAX_FRAME_LEN {
            return Err(FrameError::TooLarge(len));
        }
        let mut payload = vec![0u8; len];
        if read_full(&mut self.inner, &mut payload)? != len {
            return Err(FrameError::Truncated);
        }
        let (msg, used) = bincode::serde::decode_from_slice::<T, _>(&payload, config())
            .map_err(|e| FrameError::Malformed(e.to_string()))?;
        if used != len {
            return Err(FrameError::TrailingBytes(len - used));
        }
        Ok(Some(msg))
    }

    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    pub fn into_inner(self) -> R {
        self.inner
    }
}

/// Reads until `buf` is full or the stream ends; returns the bytes read.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ExitStatus, GuestEvent, OutputStream};
    use rand::{Rng, SeedableRng};

    fn samples() -> Vec<GuestEvent> {
        vec![
            GuestEvent::InitStarted { uptime_ms: 812 },
            GuestEvent::Output {
                stream: OutputStream::Stderr,
                data: b"hi\n".to_vec(),
            },
            GuestEvent::Exited {
                status: ExitStatus::Signal(9),
                uptime_ms: 900,
            },
            GuestEvent::Fatal {
                message: "layer smlayer1 missing".into(),
            },
        ]
    }

    #[test]
    fn round_trip_stream_and_slice() {
        let mut wire = Vec::new();
        for ev in samples() {
            write_frame(&mut wire, &ev).unwrap();
        }
        let mut r = FrameReader::new(&wire[..]);
        for ev in samples() {
            assert_eq!(r.read::<GuestEvent>().unwrap(), Some(ev));
        }
        assert_eq!(r.read::<GuestEvent>().unwrap(), None);

        let (first, used) = decode_frame::<GuestEvent>(&wire).unwrap().unwrap();
        assert_eq!(first, samples()[0]);
        assert!(decode_frame::<GuestEvent>(&wire[..used - 1])
            .unwrap()
            .is_none());
    }

    #[test]
    fn oversized_length_rejected_without_allocation() {
        let wire = (u32::MAX).to_le_bytes();
        assert!(matches!(
            decode_frame::<GuestEvent>(&wire),
            Err(FrameError::TooLarge(_))
        ));
        let mut r = FrameReader::new(&wire[..]);
        assert!(matches!(
            r.read::<GuestEvent>(),
            Err(FrameError::TooLarge(_))
        ));
    }

    #[test]
    fn truncated_stream_is_an_error() {
        let wire = encode_frame(&samples()[1]).unwrap();
        for cut in 1..wire.len() {
            let mut r = FrameReader::new(&wire[..cut]);
            assert!(r.read::<GuestEvent>().is_err(), "cut at {cut}");
        }
    }

    /// Hostile input: random and mutated frames never panic the decoder.
    #[test]
    fn random_and_mutated_frames_never_panic() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
        let mut valid: Vec<Vec<u8>> = samples().iter().map(|e| encode_frame(e).unwrap()).collect();
        let exec = crate::agent::AgentRequest::Exec(crate::agent::ExecRequest {
            argv: vec!["sh".into(), "-c".into(), "true".into()],
            env: vec!["A=B".into()],
            cwd: Some("/".into()),
            user: None,
            tty: true,
            winsize: Some((24, 80)),
            stdin: true,
            timeout_ms: Some(5),
        });
        valid.push(encode_frame(&exec).unwrap());
        valid.push(encode_frame(&crate::agent::ExecInput::Stdin(vec![1, 2, 3])).unwrap());
        valid.push(encode_frame(&crate::agent::DataChunk::Data(vec![9; 40])).unwrap());
        for i in 0..100_000 {
            let buf: Vec<u8> = if i % 2 == 0 {
                let len = rng.gen_range(0..64);
                (0..len).map(|_| rng.gen()).collect()
            } else {
                let mut b = valid[i % valid.len()].clone();
                let idx = rng.gen_range(0..b.len());
                b[idx] = rng.gen();
                let keep = rng.gen_range(0..=b.len());
                b.truncate(keep);
                b
            };
            let _ = decode_frame::<GuestEvent>(&buf);
            let _ = FrameReader::new(&buf[..]).read::<GuestEvent>();
            // The agent's messages, both directions.
            let _ = decode_frame::<crate::agent::AgentRequest>(&buf);
            let _ = decode_frame::<crate::agent::ExecInput>(&buf);
            let _ = decode_frame::<crate::agent::ExecOutput>(&buf);
            let _ = decode_frame::<crate::agent::DataChunk>(&buf);
            let _ = decode_frame::<crate::agent::Reply>(&buf);
            let _ = FrameReader::new(&buf[..]).read::<crate::agent::AgentRequest>();
        }
    }
}
