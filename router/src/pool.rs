//! Workers for one image. `shared`: long-lived VMs serve many connections, least-loaded
//! first, between `min` and `max` of them, idle extras stopped after `idle_timeout`.
//! `fresh`: every connection gets a VM restored just for it and destroyed when it closes;
//! `min` restored VMs wait ready (a [`Spares`]) so a client never waits for a restore. A
//! background thread replaces dead workers (counted as crashes) and refills.

use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use supermachine_worker::snapshot::Snapshot;
use supermachine_worker::{Error, PortProtocol, Spares, Worker};

use crate::metrics::Metrics;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isolation {
    Shared,
    Fresh,
}

#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub min: usize,
    pub max: usize,
    pub idle_timeout: Duration,
    pub isolation: Isolation,
    /// Host directories every VM of the pool gets (bound to its snapshot's volume slots).
    pub volumes: Vec<supermachine_worker::Volume>,
}

struct Slot {
    worker: Worker,
    last_busy: Instant,
}

#[derive(Default)]
struct Inner {
    /// Shared: VMs serving connections. Fresh: unused.
    serving: Vec<Slot>,
    /// Fresh: VMs serving their one connection; they exit when it closes.
    draining: Vec<Worker>,
    /// Shared: restores in flight by the maintainer.
    starting: usize,
    /// Shared: every VM was busy at a handoff; add one if below `max`.
    grow: bool,
    /// Shared: some worker of this pool ever got ready.
    ever_ready: bool,
    /// Shared: restores that failed before any worker got ready.
    failures_before_ready: u32,
}

/// Restores that may fail in a row, before any worker of a pool got ready, until the pool
/// counts as unable to start (a missing worker binary, a jail the system refuses, a
/// snapshot the backend cannot restore): then the router stops with the error instead of
/// retrying without end.
pub(crate) const STARTUP_FAILURES: u32 = 3;

pub struct ImagePool {
    dir: PathBuf,
    guest_port: u16,
    /// What the connections handed to this pool's workers carry.
    protocol: PortProtocol,
    config: PoolConfig,
    metrics: Arc<Metrics>,
    inner: Mutex<Inner>,
    /// Fresh: `min` restored VMs waiting for their one connection.
    ready: Option<Arc<Spares>>,
    wake: Condvar,
    stopping: AtomicBool,
    /// `--accept-in-workers`: the listening socket every worker accepts on.
    listener: Option<std::net::TcpListener>,
    /// The maintainer thread; `shutdown` waits for it, so no worker it is restoring at
    /// that moment outlives the pool (and gets SIGKILLed, leaving its run dir behind).
    maintainer: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Set (and `unable` notified) once the pool has failed to start its first worker
    /// [`STARTUP_FAILURES`] times in a row: the last error.
    startup_error: Mutex<Option<String>>,
    unable: tokio::sync::Notify,
}

type HandoffError = (Error, Option<TcpStream>);

impl ImagePool {
    pub fn start(
        dir: PathBuf,
        config: PoolConfig,
        protocol: PortProtocol,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<ImagePool>, Error> {
        Self::start_with(dir, config, protocol, metrics, None)
    }

    fn start_with(
        dir: PathBuf,
        config: PoolConfig,
        protocol: PortProtocol,
        metrics: Arc<Metrics>,
        listener: Option<std::net::TcpListener>,
    ) -> Result<Arc<ImagePool>, Error> {
        let snapshot = Snapshot::open(&dir)?;
        let guest_port = snapshot.meta.guest_port;
        let ready = match config.isolation {
            Isolation::Shared => None,
            Isolation::Fresh => {
                let (d, m, v) = (dir.clone(), metrics.clone(), config.volumes.clone());
                let l = match &listener {
                    Some(l) => Some(
                        l.try_clone()
                            .map_err(|e| Error::io("sharing the listening socket", e))?,
                    ),
                    None => None,
                };
                Some(Spares::start(
                    config.min,
                    Box::new(move || restore_worker(&d, &v, guest_port, protocol, &m, l.as_ref())),
                ))
            }
        };
        let pool = Arc::new(ImagePool {
            dir,
            guest_port,
            protocol,
            config,
            metrics,
            inner: Mutex::new(Inner::default()),
            ready,
            wake: Condvar::new(),
            stopping: AtomicBool::new(false),
            listener,
            maintainer: Mutex::new(None),
            startup_error: Mutex::new(None),
            unable: tokio::sync::Notify::new(),
        });
        let weak = Arc::downgrade(&pool);
        let handle = std::thread::spawn(move || maintain(weak));
        if let Ok(mut m) = pool.maintainer.lock() {
            *m = Some(handle);
        }
        Ok(pool)
    }

    /// Resolves with the error once this pool has failed to start its first worker
    /// [`STARTUP_FAILURES`] times in a row (never, for one that got a worker ready).
    pub async fn unable_to_start(&self) -> String {
        loop {
            if let Some(e) = self.startup_error.lock().ok().and_then(|f| f.clone()) {
                return format!("no worker for {} could start: {e}", self.dir.display());
            }
            self.unable.notified().await;
        }
    }

    fn restore_one(&self) -> Result<Worker, Error> {
        restore_worker(
            &self.dir,
            &self.config.volumes,
            self.guest_port,
            self.protocol,
            &self.metrics,
            self.listener.as_ref(),
        )
    }

    /// Every worker of this pool accepts on `listener` itself (the router stays out of the
    /// data path entirely). Call before the first worker starts.
    pub fn start_accepting(
        dir: PathBuf,
        config: PoolConfig,
        protocol: PortProtocol,
        metrics: Arc<Metrics>,
        listener: std::net::TcpListener,
    ) -> Result<Arc<ImagePool>, Error> {
        Self::start_with(dir, config, protocol, metrics, Some(listener))
    }

    /// Hands `stream` (with `prefix` already read from it) to a worker.
    pub fn handoff(&self, stream: TcpStream, prefix: &[u8]) -> Result<(), HandoffError> {
        match self.config.isolation {
            Isolation::Shared => self.handoff_shared(stream, prefix),
            Isolation::Fresh => self.handoff_fresh(stream, prefix),
        }
    }

    fn handoff_shared(&self, stream: TcpStream, prefix: &[u8]) -> Result<(), HandoffError> {
        let lock_err = || Error::Worker("pool lock poisoned".into());
        let mut inner = match self.inner.lock() {
            Ok(i) => i,
            Err(_) => return Err((lock_err(), Some(stream))),
        };
        // Least-loaded live worker; a new one if all are busy and there is room.
        let pick = inner
            .serving
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.worker.state().exited.load(Ordering::SeqCst))
            .min_by_key(|(_, s)| s.worker.state().active.load(Ordering::SeqCst))
            .map(|(i, s)| (i, s.worker.state().active.load(Ordering::SeqCst)));
        let grow = match pick {
            None => true,
            Some((_, active)) => {
                active > 0 && inner.serving.len() + inner.starting < self.config.max
            }
        };
        let index = if grow && pick.is_none() {
            drop(inner);
            let w = match self.restore_one() {
                Ok(w) => w,
                Err(e) => return Err((e, Some(stream))),
            };
            inner = match self.inner.lock() {
                Ok(i) => i,
                Err(_) => return Err((lock_err(), Some(stream))),
            };
            inner.serving.push(Slot {
                worker: w,
                last_busy: Instant::now(),
            });
            inner.serving.len() - 1
        } else {
            if grow {
                // Serve now on the least-loaded VM; add capacity in the background.
                inner.grow = true;
                self.wake.notify_all();
            }
            pick.map(|(i, _)| i).unwrap_or(0)
        };
        let slot = &mut inner.serving[index];
        slot.last_busy = Instant::now();
        let clone = stream.try_clone().ok();
        slot.worker
            .handoff(stream, self.guest_port, self.protocol, prefix)
            .map_err(|e| (e, clone))
    }

    fn handoff_fresh(&self, stream: TcpStream, prefix: &[u8]) -> Result<(), HandoffError> {
        let ready = self.ready.as_ref().and_then(|r| r.take());
        let mut w = match ready {
            Some(w) => w,
            None => match self.restore_one() {
                Ok(w) => w,
                Err(e) => return Err((e, Some(stream))),
            },
        };
        let clone = stream.try_clone().ok();
        w.handoff_with(stream, self.guest_port, self.protocol, prefix, true)
            .map_err(|e| (e, clone))?;
        if let Ok(mut i) = self.inner.lock() {
            i.draining.push(w);
        }
        Ok(())
    }

    /// Connections being served by this pool's workers.
    pub fn active_connections(&self) -> usize {
        let Ok(i) = self.inner.lock() else { return 0 };
        i.serving
            .iter()
            .map(|s| s.worker.state().active.load(Ordering::SeqCst))
            .sum::<usize>()
            + i.draining
                .iter()
                .map(|w| w.state().active.load(Ordering::SeqCst))
                .sum::<usize>()
    }

    /// (state, count) for the metrics.
    pub fn worker_states(&self) -> Vec<(&'static str, usize)> {
        let Ok(i) = self.inner.lock() else {
            return vec![];
        };
        let (ready, starting) = self
            .ready
            .as_ref()
            .map(|r| (r.len(), r.starting()))
            .unwrap_or_default();
        vec![
            ("serving", i.serving.len()),
            ("ready", ready),
            ("draining", i.draining.len()),
            ("starting", i.starting + starting),
        ]
    }

    /// Host addresses of the guest agents of live workers (for `exec` into a daemon).
    pub fn agent_endpoints(&self) -> Vec<supermachine_backend::AgentEndpoint> {
        let Ok(i) = self.inner.lock() else {
            return vec![];
        };
        let mut endpoints: Vec<_> = i
            .serving
            .iter()
            .filter_map(|s| s.worker.agent_endpoint())
            .collect();
        if let Some(r) = &self.ready {
            r.for_each(|w| endpoints.extend(w.agent_endpoint()));
        }
        endpoints
    }

    /// Worker process ids (for tests and operators).
    pub fn worker_pids(&self) -> Vec<u32> {
        let Ok(i) = self.inner.lock() else {
            return vec![];
        };
        let mut pids: Vec<u32> = i
            .serving
            .iter()
            .map(|s| s.worker.pid())
            .chain(i.draining.iter().map(|w| w.pid()))
            .collect();
        if let Some(r) = &self.ready {
            r.for_each(|w| pids.push(w.pid()));
        }
        pids
    }

    /// Stops every worker.
    pub fn shutdown(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.wake.notify_all();
        let maintainer = self.maintainer.lock().ok().and_then(|mut m| m.take());
        if let Some(h) = maintainer {
            let _ = h.join();
        }
        if let Some(r) = &self.ready {
            r.shutdown();
        }
        let workers: Vec<Worker> = match self.inner.lock() {
            Ok(mut i) => {
                let mut v: Vec<Worker> = i.serving.drain(..).map(|s| s.worker).collect();
                v.append(&mut i.draining);
                v
            }
            Err(_) => vec![],
        };
        for w in workers {
            w.stop();
        }
    }
}

/// Restores a worker for `dir`; with `listener`, it accepts there itself.
fn restore_worker(
    dir: &std::path::Path,
    volumes: &[supermachine_worker::Volume],
    guest_port: u16,
    protocol: PortProtocol,
    metrics: &Arc<Metrics>,
    listener: Option<&std::net::TcpListener>,
) -> Result<Worker, Error> {
    let t = Instant::now();
    let mut w = Worker::spawn_with(dir, &supermachine_worker::JailConfig::current(), volumes)?;
    let m = metrics.clone();
    w.on_closed(Arc::new(move |status| m.response(status)));
    w.restore()?;
    metrics.restored(t.elapsed());
    if let Some(l) = listener {
        w.listen_on(l, guest_port, protocol)?;
    }
    Ok(w)
}

/// Logs why a worker died (a seccomp violation names its syscall) and counts seccomp kills.
/// Outside the pool's lock: the worker's control socket closes before its process is
/// reaped (the jail's waiter removes the cgroup first), so the status may take a moment.
fn report_death(metrics: &Metrics, mut w: Worker) {
    let deadline = Instant::now() + Duration::from_secs(5);
    let reason = loop {
        if let Some(r) = w.exit_reason() {
            break r;
        }
        if Instant::now() > deadline {
            break "its VM stopped; the worker process is still running".to_string();
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    if reason.contains("SIGSYS") {
        metrics.seccomp_kills.fetch_add(1, Ordering::Relaxed);
    }
    tracing::warn!(pid = w.pid(), %reason, "worker died");
}

/// Shared pools: replaces dead workers, refills to `min`, retires idle extras, grows on
/// demand. Fresh pools: counts spares that died as crashes, retires finished VMs.
fn maintain(pool: Weak<ImagePool>) {
    loop {
        let Some(p) = pool.upgrade() else { return };
        if p.stopping.load(Ordering::SeqCst) {
            return;
        }
        let mut to_stop = Vec::new();
        let mut dead = Vec::new();
        let need = {
            let Ok(mut i) = p.inner.lock() else { return };
            // Dead workers: crashes, except fresh VMs that finished their connection.
            let before = i.serving.len();
            let mut k = 0;
            while k < i.serving.len() {
                if i.serving[k].worker.is_alive() {
                    k += 1;
                } else {
                    dead.push(i.serving.remove(k).worker);
                }
            }
            let spares_died = p.ready.as_ref().map(|r| r.take_deaths()).unwrap_or(0);
            let crashed = (before - i.serving.len()) as u64 + spares_died;
            if crashed > 0 {
                p.metrics
                    .worker_crashes
                    .fetch_add(crashed, Ordering::Relaxed);
                tracing::warn!(crashed, "workers died; replacing them");
            }
            i.draining.retain_mut(|w| w.is_alive());
            let now = Instant::now();
            for s in i.serving.iter_mut() {
                if s.worker.state().active.load(Ordering::SeqCst) > 0 {
                    s.last_busy = now;
                }
            }
            if p.config.isolation == Isolation::Shared {
                let min = p.config.min;
                while i.serving.len() > min {
                    let idle = i.serving.iter().position(|s| {
                        s.worker.state().active.load(Ordering::SeqCst) == 0
                            && now - s.last_busy > p.config.idle_timeout
                    });
                    match idle {
                        Some(pos) => to_stop.push(i.serving.swap_remove(pos).worker),
                        None => break,
                    }
                }
                let have = i.serving.len() + i.starting;
                let want = have < p.config.min || (i.grow && have < p.config.max);
                i.grow = false;
                if want {
                    i.starting += 1;
                }
                want
            } else {
                // Fresh pools' ready VMs are kept by their `Spares`.
                false
            }
        };
        for w in to_stop {
            w.stop();
        }
        for w in dead {
            report_death(&p.metrics, w);
        }
        if need {
            let result = p.restore_one();
            if p.stopping.load(Ordering::SeqCst) {
                // Shut down while restoring: this worker is no one's to stop but ours.
                if let Ok(w) = result {
                    w.stop();
                }
                return;
            }
            if let Ok(mut i) = p.inner.lock() {
                i.starting = i.starting.saturating_sub(1);
                match result {
                    Ok(w) => {
                        i.ever_ready = true;
                        i.serving.push(Slot {
                            worker: w,
                            last_busy: Instant::now(),
                        })
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "restoring a worker failed");
                        if !i.ever_ready {
                            i.failures_before_ready += 1;
                            if i.failures_before_ready >= STARTUP_FAILURES {
                                if let Ok(mut f) = p.startup_error.lock() {
                                    *f = Some(e.to_string());
                                }
                                p.unable.notify_one();
                            }
                        }
                        drop(i);
                        std::thread::sleep(Duration::from_millis(500));
                    }
                }
            }
            continue;
        }
        let Ok(i) = p.inner.lock() else { return };
        let _ = p.wake.wait_timeout(i, Duration::from_millis(100));
    }
}
