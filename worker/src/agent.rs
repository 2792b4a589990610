//! Host side of the agent protocol: one stream per request to the guest's shim.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use std::sync::{Arc, Mutex};
use supermachine_backend::AgentEndpoint;

use supermachine_protocol::agent::{
    AgentRequest, DataChunk, Hello, Reply, CHUNK_LEN, PROTOCOL_VERSION,
};
use supermachine_protocol::{write_frame, FrameError, FrameReader};

/// A byte stream to the guest: TCP through QEMU's forwarded port, or a unix stream through
/// the kvm backend's vsock socket (after its `CONNECT` handshake).
#[derive(Debug)]
pub enum GuestStream {
    Tcp(TcpStream),
    Vsock(UnixStream),
}

impl GuestStream {
    pub fn try_clone(&self) -> io::Result<GuestStream> {
        Ok(match self {
            GuestStream::Tcp(s) => GuestStream::Tcp(s.try_clone()?),
            GuestStream::Vsock(s) => GuestStream::Vsock(s.try_clone()?),
        })
    }

    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            GuestStream::Tcp(s) => s.shutdown(how),
            GuestStream::Vsock(s) => s.shutdown(how),
        }
    }

    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            GuestStream::Tcp(s) => s.set_read_timeout(t),
            GuestStream::Vsock(s) => s.set_read_timeout(t),
        }
    }

    /// Opens a stream to the agent's endpoint (for vsock: through the handshake).
    fn connect(endpoint: &AgentEndpoint, timeout: Duration) -> io::Result<GuestStream> {
        match endpoint {
            AgentEndpoint::Tcp(addr) => {
                let s = TcpStream::connect_timeout(addr, timeout)?;
                s.set_nodelay(true)?;
                Ok(GuestStream::Tcp(s))
            }
            AgentEndpoint::Vsock { uds, port } => {
                let mut s = UnixStream::connect(uds)?;
                s.set_read_timeout(Some(timeout))?;
                s.write_all(format!("CONNECT {port}\n").as_bytes())?;
                // One byte at a time: what follows the line is the guest's.
                let mut line = Vec::new();
                let mut b = [0u8];
                while line.len() < 64 {
                    match s.read(&mut b)? {
                        0 => break,
                        _ if b[0] == b'\n' => break,
                        _ => line.push(b[0]),
                    }
                }
                if line.starts_with(b"OK ") {
                    Ok(GuestStream::Vsock(s))
                } else if line.is_empty() {
                    Err(io::Error::new(
                        io::ErrorKind::ConnectionRefused,
                        format!("guest vsock port {port} refused the connection"),
                    ))
                } else {
                    Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "vsock handshake for port {port}: {:?}",
                            String::from_utf8_lossy(&line)
                        ),
                    ))
                }
            }
        }
    }
}

impl Read for GuestStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            GuestStream::Tcp(s) => s.read(buf),
            GuestStream::Vsock(s) => s.read(buf),
        }
    }
}

impl Write for GuestStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            GuestStream::Tcp(s) => s.write(buf),
            GuestStream::Vsock(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            GuestStream::Tcp(s) => s.flush(),
            GuestStream::Vsock(s) => s.flush(),
        }
    }
}

/// A stream whose write side can be closed alone (for the copy loops).
pub(crate) trait HalfClose: Read + Write {
    fn close_write(&self);
}

impl HalfClose for TcpStream {
    fn close_write(&self) {
        let _ = self.shutdown(Shutdown::Write);
    }
}

impl HalfClose for GuestStream {
    fn close_write(&self) {
        let _ = self.shutdown(Shutdown::Write);
    }
}

/// How many times a stream that never reached the shim is retried.
const HANDSHAKE_ATTEMPTS: u32 = 8;

/// Cheap to clone; every call opens its own stream.
#[derive(Debug, Clone)]
pub struct AgentClient {
    endpoint: AgentEndpoint,
    /// Serializes handshakes: QEMU's user-mode network listens with a tiny backlog and
    /// resets connections that overflow it.
    handshake: Arc<Mutex<()>>,
}

pub(crate) fn frame_io(e: FrameError) -> io::Error {
    match e {
        FrameError::Io(e) => e,
        other => io::Error::new(io::ErrorKind::InvalidData, other.to_string()),
    }
}

/// Reads the one `Reply` that ends a simple request.
fn read_reply(s: GuestStream) -> io::Result<()> {
    let reply: Reply = FrameReader::new(s)
        .read()
        .map_err(frame_io)?
        .ok_or_else(|| {
            io::Error::new(io::ErrorKind::UnexpectedEof, "the agent closed the stream")
        })?;
    reply_to_io(reply)
}

fn reply_to_io(r: Reply) -> io::Result<()> {
    match r {
        Reply::Ok => Ok(()),
        Reply::Error { kind, message } => Err(io::Error::new(kind.to_io(), message)),
    }
}

impl AgentClient {
    pub fn new(endpoint: AgentEndpoint) -> Self {
        Self {
            endpoint,
            handshake: Arc::new(Mutex::new(())),
        }
    }

    pub fn endpoint(&self) -> &AgentEndpoint {
        &self.endpoint
    }

    /// Opens a stream that reached the shim (its `Hello` arrived) and sends `req`. Streams
    /// that die before the `Hello` never carried a request, so retrying them is safe.
    pub fn open(&self, req: &AgentRequest) -> io::Result<GuestStream> {
        let mut last_err = None;
        for attempt in 0..HANDSHAKE_ATTEMPTS {
            if attempt > 0 {
                std::thread::sleep(Duration::from_millis(20 << attempt.min(5)));
            }
            match self.handshake() {
                Ok(mut s) => {
                    write_frame(&mut s, req).map_err(frame_io)?;
                    return Ok(s);
                }
                Err(e) if e.kind() == io::ErrorKind::Unsupported => return Err(e),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| io::Error::other("no attempt made")))
    }

    fn handshake(&self) -> io::Result<GuestStream> {
        let _serial = self
            .handshake
            .lock()
            .map_err(|_| io::Error::other("agent handshake lock poisoned"))?;
        let s = GuestStream::connect(&self.endpoint, Duration::from_secs(10))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut r = FrameReader::new(s);
        let hello: Hello = r.read().map_err(frame_io)?.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::ConnectionReset,
                "the agent closed the stream before its hello",
            )
        })?;
        if hello.version != PROTOCOL_VERSION {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!(
                    "guest agent speaks protocol {}, this host {}",
                    hello.version, PROTOCOL_VERSION
                ),
            ));
        }
        let s = r.into_inner();
        s.set_read_timeout(None)?;
        Ok(s)
    }

    fn simple(&self, req: &AgentRequest) -> io::Result<()> {
        read_reply(self.open(req)?)
    }

    pub fn signal(&self, signum: i32) -> io::Result<()> {
        self.simple(&AgentRequest::Signal { signum })
    }

    pub fn set_time(&self, unix_nanos: u128) -> io::Result<()> {
        self.simple(&AgentRequest::SetTime { unix_nanos })
    }

    pub fn add_entropy(&self, bytes: Vec<u8>) -> io::Result<()> {
        self.simple(&AgentRequest::AddEntropy { bytes })
    }

    pub fn wait_listening(&self, port: u16, timeout: Duration) -> io::Result<()> {
        self.simple(&AgentRequest::WaitListening {
            port,
            timeout_ms: timeout.as_millis() as u64,
        })
    }

    pub fn write_file(&self, path: &str, data: &[u8], mode: u32) -> io::Result<()> {
        let mut s = self.open(&AgentRequest::WriteFile {
            path: path.to_string(),
            mode,
        })?;
        for chunk in data.chunks(CHUNK_LEN) {
            write_frame(&mut s, &DataChunk::Data(chunk.to_vec())).map_err(frame_io)?;
        }
        write_frame(&mut s, &DataChunk::End).map_err(frame_io)?;
        read_reply(s)
    }

    pub fn read_file(&self, path: &str, max_bytes: u64) -> io::Result<Vec<u8>> {
        let s = self.open(&AgentRequest::ReadFile {
            path: path.to_string(),
            max_bytes,
        })?;
        let mut r = FrameReader::new(s);
        let mut out = Vec::new();
        loop {
            match r.read::<DataChunk>().map_err(frame_io)? {
                Some(DataChunk::Data(d)) => {
                    if out.len() as u64 + d.len() as u64 > max_bytes {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "the agent sent more than max_bytes",
                        ));
                    }
                    out.extend_from_slice(&d)
                }
                Some(DataChunk::End) => return Ok(out),
                Some(DataChunk::Error { kind, message }) => {
                    return Err(io::Error::new(kind.to_io(), message))
                }
                None => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the agent closed the stream mid-file",
                    ))
                }
            }
        }
    }

    /// A raw byte stream to `port` on the guest's loopback.
    pub fn connect(&self, port: u16) -> io::Result<GuestStream> {
        let s = self.open(&AgentRequest::Connect { port })?;
        let mut r = FrameReader::new(s);
        let reply: Reply = r.read().map_err(frame_io)?.ok_or_else(|| {
            io::Error::new(io::ErrorKind::UnexpectedEof, "the agent closed the stream")
        })?;
        reply_to_io(reply)?;
        // FrameReader reads exactly one frame, so nothing of the payload is buffered.
        Ok(r.into_inner())
    }
}

/// Copies until EOF, then half-closes the destination; returns the bytes copied.
pub(crate) fn pump(mut from: impl Read, mut to: impl HalfClose) -> u64 {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
                total += n as u64;
            }
        }
    }
    to.close_write();
    total
}
