//! The host's handle on one worker process.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use supermachine_backend::AgentEndpoint;
use supermachine_protocol::worker::{WorkerReply, WorkerRequest};

use super::channel;
use crate::agent::AgentClient;
use crate::exec::ExecBuilder;
use crate::Error;

/// What one restore in a worker cost.
#[derive(Debug, Clone, Copy)]
pub struct WorkerTimings {
    /// Load state + resume (the monitor was started ahead of time).
    pub restore: Duration,
    /// Restore request -> guest ready (clock and entropy refreshed), seen by the worker.
    pub ready: Duration,
}

pub struct Worker {
    child: Child,
    control: UnixDatagram,
    monitor_pid: u32,
    agent: Option<AgentClient>,
}

/// `supermachine-worker`: `$SUPERMACHINE_WORKER`, else next to the running executable
/// (or one directory up, for test binaries in target/*/deps).
pub fn find_worker_binary() -> Result<PathBuf, Error> {
    if let Some(p) = std::env::var_os("SUPERMACHINE_WORKER") {
        return Ok(PathBuf::from(p));
    }
    let exe =
        std::env::current_exe().map_err(|e| Error::io("locating the running executable", e))?;
    let mut candidates = Vec::new();
    if let Some(d) = exe.parent() {
        candidates.push(d.join("supermachine-worker"));
        if let Some(up) = d.parent() {
            candidates.push(up.join("supermachine-worker"));
        }
    }
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| Error::Io {
            context: format!(
                "supermachine-worker not found (looked at {})",
                candidates
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        })
}

fn protocol_error(what: &str, got: impl std::fmt::Debug) -> Error {
    Error::Worker(format!("{what}: unexpected reply {got:?}"))
}

impl Worker {
    /// Spawns a worker for the snapshot in `dir` and waits until its VM monitor is ready
    /// for the state.
    pub fn spawn(dir: &Path) -> Result<Worker, Error> {
        let exe = find_worker_binary()?;
        let (host, worker) =
            channel::pair().map_err(|e| Error::io("creating the worker socket", e))?;
        let worker_fd = worker.as_raw_fd();
        let mut cmd = Command::new(&exe);
        cmd.arg("--snapshot").arg(dir).arg("--control-fd").arg("3");
        cmd.stdin(Stdio::null());
        // SAFETY: dup2 is async-signal-safe; the descriptor is valid in the child.
        unsafe {
            cmd.pre_exec(move || {
                if worker_fd == 3 {
                    // dup2 onto itself keeps close-on-exec: clear it instead.
                    if libc::fcntl(3, libc::F_SETFD, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                } else if libc::dup2(worker_fd, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| Error::io(format!("starting {}", exe.display()), e))?;
        drop(worker);
        let mut w = Worker {
            child,
            control: host,
            monitor_pid: 0,
            agent: None,
        };
        match w.recv()? {
            WorkerReply::Prepared { monitor_pid } => w.monitor_pid = monitor_pid,
            WorkerReply::Error { message } => return Err(Error::Worker(message)),
            other => return Err(protocol_error("waiting for the worker to prepare", other)),
        }
        Ok(w)
    }

    fn recv(&mut self) -> Result<WorkerReply, Error> {
        match channel::recv::<WorkerReply>(&self.control) {
            Ok(Some((m, _))) => Ok(m),
            Ok(None) => Err(Error::Worker(format!("worker {} exited", self.child.id()))),
            Err(e) => Err(Error::Worker(format!("worker {}: {e}", self.child.id()))),
        }
    }

    fn send(&self, req: &WorkerRequest, fd: Option<i32>) -> Result<(), Error> {
        channel::send(&self.control, req, fd)
            .map_err(|e| Error::Worker(format!("worker {}: {e}", self.child.id())))
    }

    /// Restores the VM; returns once the guest is ready.
    pub fn restore(&mut self) -> Result<WorkerTimings, Error> {
        self.send(&WorkerRequest::Restore, None)?;
        match self.recv()? {
            WorkerReply::Ready {
                agent,
                restore_ms,
                ready_ms,
            } => {
                let addr: SocketAddr = agent
                    .parse()
                    .map_err(|_| Error::Worker(format!("bad agent address {agent:?}")))?;
                self.agent = Some(AgentClient::new(AgentEndpoint::Tcp(addr)));
                Ok(WorkerTimings {
                    restore: Duration::from_secs_f64(restore_ms / 1000.0),
                    ready: Duration::from_secs_f64(ready_ms / 1000.0),
                })
            }
            WorkerReply::Error { message } => Err(Error::Worker(message)),
            other => Err(protocol_error("restoring", other)),
        }
    }

    /// Passes `client` to the worker (SCM_RIGHTS), which bridges it to `guest_port` after
    /// sending `prefix`. Our copy of the socket is closed when this returns.
    pub fn handoff(
        &mut self,
        client: impl AsRawFd,
        guest_port: u16,
        prefix: &[u8],
    ) -> Result<(), Error> {
        self.send(
            &WorkerRequest::Handoff {
                guest_port,
                prefix: prefix.to_vec(),
            },
            Some(client.as_raw_fd()),
        )?;
        drop(client);
        match self.recv()? {
            WorkerReply::HandedOff => Ok(()),
            WorkerReply::Error { message } => Err(Error::Worker(message)),
            other => Err(protocol_error("handing off a connection", other)),
        }
    }

    /// The worker process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The VM monitor's process id.
    pub fn monitor_pid(&self) -> u32 {
        self.monitor_pid
    }

    fn agent(&self) -> Result<&AgentClient, Error> {
        self.agent
            .as_ref()
            .ok_or_else(|| Error::Worker("the worker's VM is not restored yet".into()))
    }

    /// A byte stream to a guest port (straight to the guest agent, not through the worker).
    pub fn connect(&self, guest_port: u16) -> Result<std::net::TcpStream, Error> {
        self.agent()?
            .connect(guest_port)
            .map_err(|e| Error::Network(format!("connecting to guest port {guest_port}: {e}")))
    }

    pub fn exec_builder(&self) -> Result<ExecBuilder, Error> {
        Ok(ExecBuilder::new(self.agent()?.clone()))
    }

    /// Stops the VM and reaps the worker.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let _ = self.send(&WorkerRequest::Stop, None);
        for _ in 0..100 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.shutdown();
        }
    }
}
