//! The embedding API over snapshots: an [`Image`] is a baked snapshot; `start` restores a
//! VM from it.

use std::path::Path;
use std::sync::{Arc, OnceLock};

use crate::pool::{Pool, PooledVm};
use crate::snapshot::Snapshot;
use crate::vm::{OutputSink, Vm};
use crate::Error;

/// Per-VM settings for a restore.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct VmConfig {
    /// Must match the snapshot's when given (a restored VM keeps its baked size).
    pub memory_mib: Option<u32>,
    /// Must match the snapshot's when given.
    pub vcpus: Option<u32>,
    /// How long a restore may take before it fails.
    pub restore_timeout: std::time::Duration,
    /// Where the VM's sockets and logs go (default: the system temp dir).
    pub socket_dir: Option<std::path::PathBuf>,
}

impl Default for VmConfig {
    fn default() -> Self {
        Self {
            memory_mib: None,
            vcpus: None,
            restore_timeout: std::time::Duration::from_secs(30),
            socket_dir: None,
        }
    }
}

impl VmConfig {
    fn check(&self, snapshot: &Snapshot) -> Result<(), Error> {
        let m = &snapshot.meta;
        if self.memory_mib.is_some_and(|v| v != m.memory_mib)
            || self.vcpus.is_some_and(|v| v != m.vcpus)
        {
            return Err(Error::Image(supermachine_bake::BakeError::Layout {
                path: snapshot.dir.clone(),
                reason: format!(
                    "the snapshot was baked with {} MiB and {} vCPUs; a restore cannot change them (re-bake with `supermachine pull --memory/--vcpus`)",
                    m.memory_mib, m.vcpus
                ),
            }));
        }
        Ok(())
    }
}

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
    pub fn start(&self, config: &VmConfig) -> Result<Vm, Error> {
        self.start_with_output(config, Box::new(|_, _| {}))
    }

    /// Restores a VM, sending its workload's output to `sink`.
    pub fn start_with_output(&self, config: &VmConfig, sink: OutputSink) -> Result<Vm, Error> {
        config.check(&self.snapshot)?;
        Vm::prepare_restore_in(&self.snapshot, config.socket_dir.as_deref())?
            .resume_within(sink, config.restore_timeout)
    }
}
