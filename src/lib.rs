//! supermachine: run OCI images as hardware-isolated microVMs.
//!
//! [`Image`] bakes an image (registry, OCI layout or archive) into a snapshot and restores
//! VMs from it; [`Vm`] boots one and runs its command ([`Vm::run_to_completion`]); [`Pool`]
//! keeps restored VMs one acquire away. The pieces live in their own crates:
//! `supermachine-worker` (one VM: the driver, the worker process, its handle),
//! `supermachine-router` (the HTTP ingress, with the `cli` feature), `supermachine-bake`
//! (image preparation), `supermachine-backend` (the backend trait, QEMU, and the kvm
//! backend over `supermachine-vmm`, our own VMM), `supermachine-protocol` (wire types
//! shared with the guest), `supermachine-init` and `supermachine-shim` (the guest's PID 1
//! and agent). The `cli` feature (default) builds the `supermachine` command; without it
//! the library pulls in no HTTP server, async runtime or argument parser.

mod image;
pub mod pool;
pub mod pull;

pub use image::{Image, OciImageBuilder, PullPolicy, VmConfig};
pub use pool::{Pool, PooledVm};
pub use pull::{PullOutcome, PullRequest};
pub use supermachine_backend::{Accel, AgentEndpoint, BackendChoice, BackendKind};
pub use supermachine_bake::{Cache, ImageRef, Overrides};
pub use supermachine_bake::{Platform, PullOptions};
pub use supermachine_protocol::ExitStatus;
pub use supermachine_worker::{boot, guest_artifacts, run_dir, snapshot};
pub use supermachine_worker::{
    Access, BootReport, BootRequest, BootTimings, Error, ExecBuilder, ExecChild, ExecOutcome,
    ExecStdin, ExecStdinWriter, GuestStream, JailConfig, OutputSink, PortProtocol, PreparedRestore,
    TcpForwarder, Vm, Volume, VolumeError, Worker, WorkerTimings,
};
