//! supermachine-worker: one VM. [`Vm`] drives a backend machine (boot, restore, the guest
//! agent, exec, published ports, snapshot) in the calling process; the `supermachine-worker`
//! binary ([`process`]) hosts one VM per OS process, so a crashing or hostile guest takes
//! down its own worker only; [`Worker`] is the host's handle on such a process, and
//! [`Spares`] keeps workers ready ahead of demand.
//!
//! The `supermachine` crate is the public API over this one; its types (`Vm`, `Error`,
//! `ExecBuilder`, ...) are these, re-exported. The other `pub` modules are for the
//! supermachine crates (router, CLI) and follow no stability promise.

pub mod agent;
mod agent_relay;
pub mod boot;
mod channel;
mod client;
mod error;
mod exec;
mod forward;
pub mod guest_artifacts;
pub mod jail;
pub mod process;
pub mod run_dir;
pub mod snapshot;
mod spares;
mod vm;
pub mod volume;

pub use agent::GuestStream;
pub use boot::{BootInputs, BootReport, BootRequest, BootTimings};
pub use client::{find_worker_binary, Worker, WorkerState, WorkerTimings};
pub use error::Error;
pub use exec::{ExecBuilder, ExecChild, ExecOutcome, ExecStdin, ExecStdinWriter};
pub use forward::TcpForwarder;
pub use jail::JailConfig;
pub use spares::Spares;
pub use supermachine_protocol::worker::PortProtocol;
pub use vm::{OutputSink, PreparedRestore, Vm};
pub use volume::{Access, Volume, VolumeError};

/// The one answer to an HTTP client whose connection no VM could serve: the worker could
/// not reach the guest port, the worker died before any response, or the router found no
/// worker to take it.
pub const BAD_GATEWAY: &[u8] =
    b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
