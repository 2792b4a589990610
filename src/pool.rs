//! A pool of prepared workers for one snapshot: each spare worker has verified the snapshot
//! and started its VM monitor, so `acquire` is a restore and nothing else. A [`PooledVm`]
//! is used once: dropping it stops its VM, and a background thread prepares a replacement.

use std::ops::Deref;
use std::path::PathBuf;
use std::sync::Arc;

use supermachine_worker::{Spares, Worker, WorkerTimings};

use crate::Error;

pub struct Pool {
    dir: PathBuf,
    spares: Arc<Spares>,
}

impl Pool {
    /// A pool keeping `spare` prepared workers for the snapshot in `dir`.
    pub fn new(dir: PathBuf, spare: usize) -> Arc<Pool> {
        let d = dir.clone();
        let spares = Spares::start(spare, Box::new(move || Worker::spawn(&d)));
        Arc::new(Pool { dir, spares })
    }

    /// A restored VM: from a spare worker when one is ready, else from a new one.
    pub fn acquire(self: &Arc<Self>) -> Result<PooledVm, Error> {
        let mut worker = match self.spares.take() {
            Some(w) => w,
            None => Worker::spawn(&self.dir)?,
        };
        let timings = worker.restore()?;
        Ok(PooledVm {
            worker: Some(worker),
            timings,
        })
    }

    /// Prepared workers waiting right now.
    pub fn spare_count(&self) -> usize {
        self.spares.len()
    }

    /// The last error the refill thread hit (a broken snapshot, a missing binary).
    pub fn last_error(&self) -> Option<String> {
        self.spares.last_error()
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // No spare (or one being prepared) outlives the pool.
        self.spares.shutdown();
    }
}

/// A VM from a [`Pool`]; it derefs to its [`Worker`] (connect, exec). Dropping it discards
/// the VM; the pool refills in the background.
pub struct PooledVm {
    worker: Option<Worker>,
    timings: WorkerTimings,
}

impl PooledVm {
    pub fn timings(&self) -> WorkerTimings {
        self.timings
    }
}

impl Deref for PooledVm {
    type Target = Worker;
    fn deref(&self) -> &Worker {
        // Present until drop.
        self.worker.as_ref().expect("PooledVm used after drop")
    }
}

impl Drop for PooledVm {
    fn drop(&mut self) {
        if let Some(w) = self.worker.take() {
            // Stopping (15-25 ms) happens off the caller's path.
            std::thread::spawn(move || w.stop());
        }
    }
}
