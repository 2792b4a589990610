//! supermachine: run OCI images as hardware-isolated microVMs.
//!
//! The crate boots an image (registry, OCI layout or archive) in a fresh VM and runs its
//! command to completion ([`Vm::run_to_completion`]); snapshots, restore, the worker pool and the router
//! build on it. The pieces live in their own crates: `supermachine-bake` (image
//! preparation), `supermachine-backend` (the backend trait, QEMU, and the kvm backend over
//! `supermachine-vmm`, our own VMM), `supermachine-protocol` (wire types shared with the
//! guest), `supermachine-init` (the guest's PID 1), `supermachine-shim` (the guest agent).

mod agent;
pub mod boot;
pub mod cli;
mod error;
mod exec;
mod forward;
pub mod guest_artifacts;
mod image;
pub mod pool;
pub mod pull;
pub mod router;
pub mod run_dir;
pub mod snapshot;
mod vm;
pub mod worker;

pub use agent::GuestStream;
pub use boot::{BootReport, BootRequest, BootTimings};
pub use error::Error;
pub use exec::{ExecBuilder, ExecChild, ExecOutcome, ExecStdin, ExecStdinWriter};
pub use forward::TcpForwarder;
pub use image::{Image, OciImageBuilder, PullPolicy, VmConfig};
pub use pool::{Pool, PooledVm};
pub use pull::{PullOutcome, PullRequest};
pub use supermachine_backend::{Accel, AgentEndpoint, BackendChoice, BackendKind};
pub use supermachine_bake::{Cache, ImageRef, Overrides};
pub use supermachine_bake::{Platform, PullOptions};
pub use supermachine_protocol::ExitStatus;
pub use vm::{OutputSink, PreparedRestore, Vm};
pub use worker::{Worker, WorkerTimings};
