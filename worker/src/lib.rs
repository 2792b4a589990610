//! Workers: one VM per OS process, so a crashing or hostile guest takes down its own worker
//! only. [`Worker`] is the host's handle; [`process`] is the worker binary's side. The
//! worker verifies the snapshot and starts the VM monitor (waiting for state) as soon as it
//! is spawned, so `restore` is only "load and continue".

mod channel;
mod client;
pub mod process;

pub use client::{Worker, WorkerState, WorkerTimings};

/// The one answer to an HTTP client whose connection no VM could serve: the worker could
/// not reach the guest port, the worker died before any response, or the router found no
/// worker to take it.
pub(crate) const BAD_GATEWAY: &[u8] =
    b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
