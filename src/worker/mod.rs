//! Workers: one VM per OS process, so a crashing or hostile guest takes down its own worker
//! only. [`Worker`] is the host's handle; [`process`] is the worker binary's side. The
//! worker verifies the snapshot and starts the VM monitor (waiting for state) as soon as it
//! is spawned, so `restore` is only "load and continue".

mod channel;
mod client;
pub mod process;

pub use client::{Worker, WorkerState, WorkerTimings};
