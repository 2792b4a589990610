//! The agent protocol: host <-> shim over one stream per request (a TCP connection through
//! QEMU's user-mode network today, an AF_VSOCK stream on the KVM backend later).
//!
//! The host opens a stream, sends one [`AgentRequest`] frame, and the rest of the stream
//! belongs to that request: exec streams [`ExecInput`] / [`ExecOutput`] frames, file
//! transfers stream [`DataChunk`]s, `Connect` turns the stream into raw bytes to a guest port.

use serde::{Deserialize, Serialize};

/// The shim's port inside the guest. Below 1024 so an unprivileged workload cannot take it;
/// the shim binds it before the workload starts.
pub const AGENT_PORT: u16 = 1023;

/// Largest data chunk either side puts in one frame.
pub const CHUNK_LEN: usize = 256 * 1024;

/// Version of this protocol; the shim announces it in [`Hello`].
pub const PROTOCOL_VERSION: u32 = 1;

/// The shim's first frame on every accepted stream. It proves the stream reached the shim
/// (QEMU's user-mode network accepts host connections on the guest's behalf and may reset
/// them before the guest sees them), so the host sends a request only after it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub version: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentRequest {
    /// Liveness check; answered with `Reply::Ok`.
    Ping,
    Exec(ExecRequest),
    /// Followed by `DataChunk`s; answered with `Reply` after `DataChunk::End`.
    WriteFile {
        path: String,
        mode: u32,
    },
    /// Answered with `DataChunk`s then `DataChunk::End`, or one `DataChunk::Error`.
    ReadFile {
        path: String,
        max_bytes: u64,
    },
    /// Sends `signum` to the workload.
    Signal {
        signum: i32,
    },
    SetTime {
        unix_nanos: u128,
    },
    AddEntropy {
        bytes: Vec<u8>,
    },
    /// After `Reply::Ok`, the stream carries raw bytes to TCP `port` on the guest's loopback.
    Connect {
        port: u16,
    },
    /// Answered when something listens on `port` (TCP, v4 or v6), or with an error after
    /// `timeout_ms`.
    WaitListening {
        port: u16,
        timeout_ms: u64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorKind {
    NotFound,
    PermissionDenied,
    AlreadyExists,
    InvalidInput,
    TimedOut,
    ConnectionRefused,
    TooLarge,
    Other,
}

impl ErrorKind {
    pub fn from_io(kind: std::io::ErrorKind) -> Self {
        use std::io::ErrorKind as K;
        match kind {
            K::NotFound => ErrorKind::NotFound,
            K::PermissionDenied => ErrorKind::PermissionDenied,
            K::AlreadyExists => ErrorKind::AlreadyExists,
            K::InvalidInput | K::InvalidData => ErrorKind::InvalidInput,
            K::TimedOut => ErrorKind::TimedOut,
            K::ConnectionRefused => ErrorKind::ConnectionRefused,
            _ => ErrorKind::Other,
        }
    }

    pub fn to_io(self) -> std::io::ErrorKind {
        use std::io::ErrorKind as K;
        match self {
            ErrorKind::NotFound => K::NotFound,
            ErrorKind::PermissionDenied => K::PermissionDenied,
            ErrorKind::AlreadyExists => K::AlreadyExists,
            ErrorKind::InvalidInput => K::InvalidInput,
            ErrorKind::TimedOut => K::TimedOut,
            ErrorKind::ConnectionRefused => K::ConnectionRefused,
            ErrorKind::TooLarge | ErrorKind::Other => K::Other,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    Ok,
    Error { kind: ErrorKind, message: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DataChunk {
    Data(Vec<u8>),
    End,
    Error { kind: ErrorKind, message: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    pub argv: Vec<String>,
    /// `KEY=VALUE`, applied over the image's environment.
    pub env: Vec<String>,
    /// Default: the image's WorkingDir.
    pub cwd: Option<String>,
    /// Default: the image's User.
    pub user: Option<String>,
    /// Run on a pseudo-terminal (stdout and stderr merge into stdout).
    pub tty: bool,
    /// (rows, cols) of the terminal.
    pub winsize: Option<(u16, u16)>,
    /// When false, stdin is /dev/null and no `ExecInput::Stdin` is expected.
    pub stdin: bool,
    /// Kill the process group after this long and report `timed_out`.
    pub timeout_ms: Option<u64>,
}

/// Host -> guest frames during an exec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExecInput {
    Stdin(Vec<u8>),
    CloseStdin,
    Resize { rows: u16, cols: u16 },
    Signal(i32),
}

/// Guest -> host frames during an exec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExecOutput {
    Started {
        pid: i32,
    },
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    /// Always the last frame.
    Exited {
        status: crate::ExitStatus,
        timed_out: bool,
    },
    /// The command could not be started (also the last frame).
    Failed {
        kind: ErrorKind,
        message: String,
    },
}
