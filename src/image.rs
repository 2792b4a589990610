//! The embedding API over snapshots: an [`Image`] is a baked snapshot; `start` restores a
//! VM from it.

use std::path::Path;
use std::sync::{Arc, OnceLock};

use crate::pool::{Pool, PooledVm};
use crate::snapshot::Snapshot;
use crate::vm::{OutputSink, Vm};
use crate::Error;

/// Per-VM settings for a restore. Memory and vCPUs are the snapshot's.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct VmConfig {}

#[derive(Clone)]
pub struct Image {
    snapshot: Snapshot,
    pool: Arc<OnceLock<Arc<Pool>>>,
}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Image")
            .field("snapshot", &self.snapshot.dir)
            .finish()
    }
}

impl Image {
    /// Opens a snapshot directory (verified: see `Snapshot::open`).
    pub fn from_snapshot(dir: impl AsRef<Path>) -> Result<Image, Error> {
        Ok(Image {
            snapshot: Snapshot::open(dir.as_ref())?,
            pool: Arc::new(OnceLock::new()),
        })
    }

    pub fn snapshot(&self) -> &Snapshot {
        &self.snapshot
    }

    /// The port the workload listens on.
    pub fn guest_port(&self) -> u16 {
        self.snapshot.meta.guest_port
    }

    /// A VM from this image's pool of prepared workers (one spare kept ready). The VM is
    /// discarded when the `PooledVm` drops.
    pub fn acquire(&self) -> Result<PooledVm, Error> {
        self.pool
            .get_or_init(|| Pool::new(self.snapshot.dir.clone(), 1))
            .acquire()
    }

    /// Restores a VM in this process (its VM monitor is still a separate process);
    /// its workload's output is discarded.
    pub fn start(&self, _config: &VmConfig) -> Result<Vm, Error> {
        Vm::restore(&self.snapshot, Box::new(|_, _| {}))
    }

    /// Restores a VM, sending its workload's output to `sink`.
    pub fn start_with_output(&self, _config: &VmConfig, sink: OutputSink) -> Result<Vm, Error> {
        Vm::restore(&self.snapshot, sink)
    }
}
