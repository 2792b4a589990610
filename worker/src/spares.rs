//! Spare workers made ahead of demand: one background thread keeps `target` of them
//! waiting, replaces those that die while waiting, and hands them out one at a time. The
//! library's `Pool` keeps prepared workers here; the router's fresh pools restored ones.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::{Error, Worker};

/// How a spare is made: spawn (prepared), or spawn and restore.
pub type MakeWorker = dyn Fn() -> Result<Worker, Error> + Send + Sync;

#[derive(Default)]
struct Waiting {
    workers: Vec<Worker>,
    /// Spares being made right now.
    starting: usize,
    /// Spares that died while waiting, not yet collected by `take_deaths`.
    deaths: u64,
    last_error: Option<String>,
    stopping: bool,
}

pub struct Spares {
    target: usize,
    make: Box<MakeWorker>,
    waiting: Mutex<Waiting>,
    changed: Condvar,
    refiller: Mutex<Option<JoinHandle<()>>>,
}

impl Spares {
    /// Keeps `target` workers made by `make` waiting, from a background thread.
    pub fn start(target: usize, make: Box<MakeWorker>) -> Arc<Spares> {
        let spares = Arc::new(Spares {
            target,
            make,
            waiting: Mutex::new(Waiting::default()),
            changed: Condvar::new(),
            refiller: Mutex::new(None),
        });
        let weak = Arc::downgrade(&spares);
        let handle = std::thread::spawn(move || refill(weak));
        if let Ok(mut r) = spares.refiller.lock() {
            *r = Some(handle);
        }
        spares
    }

    fn lock(&self) -> Option<MutexGuard<'_, Waiting>> {
        self.waiting.lock().ok()
    }

    /// A live spare, if one is waiting; the refill thread starts its replacement.
    pub fn take(&self) -> Option<Worker> {
        let mut w = self.lock()?;
        let mut taken = None;
        while let Some(mut worker) = w.workers.pop() {
            if worker.is_alive() {
                taken = Some(worker);
                break;
            }
            w.deaths += 1;
        }
        self.changed.notify_all();
        taken
    }

    /// Spares waiting right now.
    pub fn len(&self) -> usize {
        self.lock().map(|w| w.workers.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Spares being made right now.
    pub fn starting(&self) -> usize {
        self.lock().map(|w| w.starting).unwrap_or(0)
    }

    /// The last error making a spare hit (a broken snapshot, a missing binary); cleared by
    /// the next success.
    pub fn last_error(&self) -> Option<String> {
        self.lock().and_then(|w| w.last_error.clone())
    }

    /// How many spares died while waiting since the last call (a crash count).
    pub fn take_deaths(&self) -> u64 {
        self.lock()
            .map(|mut w| std::mem::take(&mut w.deaths))
            .unwrap_or(0)
    }

    /// Calls `f` on each waiting spare (pids, agent addresses).
    pub fn for_each(&self, mut f: impl FnMut(&Worker)) {
        if let Some(w) = self.lock() {
            w.workers.iter().for_each(&mut f);
        }
    }

    /// Stops refilling, waits for a spare being made (so none outlives this call) and stops
    /// every waiting one.
    pub fn shutdown(&self) {
        if let Some(mut w) = self.lock() {
            w.stopping = true;
        }
        self.changed.notify_all();
        let handle = self.refiller.lock().ok().and_then(|mut r| r.take());
        if let Some(h) = handle {
            let _ = h.join();
        }
        let workers = self
            .lock()
            .map(|mut w| std::mem::take(&mut w.workers))
            .unwrap_or_default();
        for worker in workers {
            worker.stop();
        }
    }
}

fn refill(spares: Weak<Spares>) {
    loop {
        let Some(s) = spares.upgrade() else { return };
        let need = {
            let Some(mut w) = s.lock() else { return };
            if w.stopping {
                return;
            }
            let before = w.workers.len();
            w.workers.retain_mut(|worker| worker.is_alive());
            w.deaths += (before - w.workers.len()) as u64;
            let need = w.workers.len() + w.starting < s.target;
            if need {
                w.starting += 1;
            } else {
                // Woken by `take` and `shutdown`; the timeout notices deaths.
                let _ = s.changed.wait_timeout(w, Duration::from_millis(200));
            }
            need
        };
        if !need {
            continue;
        }
        let made = (s.make)();
        let Some(mut w) = s.lock() else { return };
        w.starting -= 1;
        if w.stopping {
            // Shut down while making it: this worker is no one's to stop but ours.
            drop(w);
            if let Ok(worker) = made {
                worker.stop();
            }
            return;
        }
        match made {
            Ok(worker) => {
                w.workers.push(worker);
                w.last_error = None;
            }
            Err(e) => {
                tracing::warn!(error = %e, "making a spare worker failed");
                w.last_error = Some(e.to_string());
                drop(w);
                // Back off a failing spawn instead of spinning.
                drop(s);
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
}
