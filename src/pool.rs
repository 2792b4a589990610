//! A pool of prepared workers for one snapshot: each spare worker has verified the snapshot
//! and started its VM monitor, so `acquire` is a restore and nothing else. A [`PooledVm`]
//! is used once: dropping it stops its VM, and a background thread prepares a replacement.

use std::ops::Deref;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::Duration;

use crate::worker::{Worker, WorkerTimings};
use crate::Error;

struct Spares {
    workers: Vec<Worker>,
    last_error: Option<String>,
}

pub struct Pool {
    dir: PathBuf,
    target: usize,
    spares: Mutex<Spares>,
    changed: Condvar,
}

impl Pool {
    /// A pool keeping `spare` prepared workers for the snapshot in `dir`.
    pub fn new(dir: PathBuf, spare: usize) -> Arc<Pool> {
        let pool = Arc::new(Pool {
            dir,
            target: spare,
            spares: Mutex::new(Spares {
                workers: Vec::new(),
                last_error: None,
            }),
            changed: Condvar::new(),
        });
        let weak = Arc::downgrade(&pool);
        std::thread::spawn(move || refill(weak));
        pool
    }

    /// A restored VM: from a spare worker when one is ready, else from a new one.
    pub fn acquire(self: &Arc<Self>) -> Result<PooledVm, Error> {
        let spare = {
            let mut s = self
                .spares
                .lock()
                .map_err(|_| Error::Worker("pool lock poisoned".into()))?;
            let w = s.workers.pop();
            self.changed.notify_all();
            w
        };
        let mut worker = match spare {
            Some(w) => w,
            None => Worker::spawn(&self.dir)?,
        };
        let timings = worker.restore()?;
        Ok(PooledVm {
            worker: Some(worker),
            timings,
            pool: Arc::downgrade(self),
        })
    }

    /// Prepared workers waiting right now.
    pub fn spare_count(&self) -> usize {
        self.spares.lock().map(|s| s.workers.len()).unwrap_or(0)
    }

    /// The last error the refill thread hit (a broken snapshot, a missing binary).
    pub fn last_error(&self) -> Option<String> {
        self.spares.lock().ok().and_then(|s| s.last_error.clone())
    }
}

fn refill(pool: Weak<Pool>) {
    loop {
        let Some(p) = pool.upgrade() else { return };
        let need = {
            let Ok(s) = p.spares.lock() else { return };
            let (s, _) = match p
                .changed
                .wait_timeout_while(s, Duration::from_millis(200), |s| {
                    s.workers.len() >= p.target
                }) {
                Ok(r) => r,
                Err(_) => return,
            };
            s.workers.len() < p.target
        };
        if need {
            let result = Worker::spawn(&p.dir);
            if let Ok(mut s) = p.spares.lock() {
                match result {
                    Ok(w) => {
                        s.workers.push(w);
                        s.last_error = None;
                    }
                    Err(e) => s.last_error = Some(e.to_string()),
                }
            }
            // Back off a failing spawn instead of spinning.
            if p.last_error().is_some() {
                drop(p);
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
}

/// A VM from a [`Pool`]; it derefs to its [`Worker`] (connect, exec). Dropping it discards
/// the VM; the pool refills in the background.
pub struct PooledVm {
    worker: Option<Worker>,
    timings: WorkerTimings,
    pool: Weak<Pool>,
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
        if let Some(p) = self.pool.upgrade() {
            p.changed.notify_all();
        }
    }
}
