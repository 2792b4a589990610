//! The worker control protocol: the host (router, pool, library) and one
//! `supermachine-worker` process (one VM) over an inherited SOCK_SEQPACKET socketpair.
//! Every message is one frame in one packet; `Handoff` carries the client socket as
//! SCM_RIGHTS ancillary data on the same packet.

use serde::{Deserialize, Serialize};

use crate::ExitStatus;

/// What a published port carries, which decides what a client that cannot be served may be
/// sent: an HTTP client gets a 502 response; a TCP client only sees the connection close
/// (any byte would corrupt a protocol that is not HTTP).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum PortProtocol {
    /// Bytes pass untouched, none read before the handoff (docker's `-p` default).
    #[default]
    Tcp,
    /// The router read the request head to route it.
    Http,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WorkerRequest {
    /// Load the snapshot into the waiting VM monitor and run the guest.
    Restore,
    /// Bridge the attached client socket to `guest_port`, sending `prefix` (bytes the
    /// router already read from the client) first. `last`: stop the VM and exit once this
    /// connection closes (fresh-VM-per-connection isolation).
    Handoff {
        guest_port: u16,
        protocol: PortProtocol,
        prefix: Vec<u8>,
        last: bool,
        /// Names the connection in the `Closed` report.
        id: u64,
    },
    /// Accept connections on the attached listening socket yourself (single-image
    /// `--accept-in-workers` mode) and bridge each to `guest_port`.
    Listen {
        guest_port: u16,
        protocol: PortProtocol,
    },
    /// Stop the VM and exit.
    Stop,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum WorkerReply {
    /// The snapshot is verified and a VM monitor waits for it (sent once, unprompted).
    Prepared {
        monitor_pid: u32,
    },
    /// The guest runs and has a fresh clock and entropy.
    Ready {
        agent: String,
        restore_ms: f64,
        ready_ms: f64,
    },
    /// A handed-off connection is being served.
    HandedOff,
    /// A handed-off connection closed (unprompted); `bytes_to_client` were sent to it.
    Closed {
        id: u64,
        bytes_to_client: u64,
        /// Status code of the connection's first HTTP response, if it looked like one.
        status: Option<u16>,
    },
    Error {
        message: String,
    },
    /// The VM ended; the worker exits next.
    Exited {
        status: Option<ExitStatus>,
        detail: String,
    },
}

/// Largest worker message (one packet).
pub const MAX_WORKER_MESSAGE: usize = 256 * 1024;
