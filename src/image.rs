//! The embedding API over snapshots: an [`Image`] is a baked snapshot; `start` restores a
//! VM from it.

use std::path::Path;

use crate::snapshot::Snapshot;
use crate::vm::{OutputSink, Vm};
use crate::Error;

/// Per-VM settings for a restore. Memory and vCPUs are the snapshot's.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct VmConfig {}

#[derive(Debug, Clone)]
pub struct Image {
    snapshot: Snapshot,
}

impl Image {
    /// Opens a snapshot directory (verified: see `Snapshot::open`).
    pub fn from_snapshot(dir: impl AsRef<Path>) -> Result<Image, Error> {
        Ok(Image {
            snapshot: Snapshot::open(dir.as_ref())?,
        })
    }

    pub fn snapshot(&self) -> &Snapshot {
        &self.snapshot
    }

    /// The port the workload listens on.
    pub fn guest_port(&self) -> u16 {
        self.snapshot.meta.guest_port
    }

    /// Restores a VM; its workload's output is discarded.
    pub fn start(&self, _config: &VmConfig) -> Result<Vm, Error> {
        Vm::restore(&self.snapshot, Box::new(|_, _| {}))
    }

    /// Restores a VM, sending its workload's output to `sink`.
    pub fn start_with_output(&self, _config: &VmConfig, sink: OutputSink) -> Result<Vm, Error> {
        Vm::restore(&self.snapshot, sink)
    }
}
