//! The host's handle on one worker process.

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use supermachine_backend::AgentEndpoint;
use supermachine_protocol::worker::{PortProtocol, WorkerReply, WorkerRequest};

use crate::agent::AgentClient;
use crate::channel;
use crate::exec::ExecBuilder;
use crate::jail::JailConfig;
use crate::Error;
use supermachine_backend::spawn::children_of;

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
    /// After the restore a reader thread owns the socket's incoming side: replies to our
    /// requests arrive here, unprompted news (`Closed`, `Exited`) updates `state`.
    replies: Option<mpsc::Receiver<WorkerReply>>,
    state: Arc<WorkerState>,
    /// Our copies of handed-off client sockets, by connection id, until `Closed`.
    inflight: Arc<Mutex<Inflight>>,
    next_id: u64,
    /// Called with the first response's status code of every closed connection.
    on_closed: Option<Arc<dyn Fn(Option<u16>) + Send + Sync>>,
    /// Started in a jail: `child` is the waiter, the worker its child in a pid namespace.
    jailed: bool,
    /// The worker's TMPDIR, holding its VMs' run directories; removed after `Drop` has
    /// reaped the worker (fields drop after `drop` runs).
    _run_root: tempfile::TempDir,
}

/// Whether any data went out on this connection (the kernel's TCP_INFO of the socket the
/// worker wrote to: we share it). The router itself writes nothing before a handoff.
fn response_started(c: &std::net::TcpStream) -> bool {
    // SAFETY: tcp_info is plain old data; all-zero is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` and `len` are valid for writes of the sizes given; the fd is open.
    let r = unsafe {
        libc::getsockopt(
            c.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            &mut info as *mut libc::tcp_info as *mut libc::c_void,
            &mut len,
        )
    };
    r != 0 || info.tcpi_data_segs_out > 0
}

/// Our copies of the handed-off connections not closed yet, by id, with their protocol.
type Inflight = HashMap<u64, (std::net::TcpStream, PortProtocol)>;

/// The worker died: answer every HTTP connection it still held with a 502 and close them
/// all (a TCP client only sees the close).
fn fail_inflight(inflight: &Mutex<Inflight>) {
    use std::io::Write;
    let conns: Vec<(std::net::TcpStream, PortProtocol)> = match inflight.lock() {
        Ok(mut m) => m.drain().map(|(_, s)| s).collect(),
        Err(_) => return,
    };
    for (mut c, protocol) in conns {
        // Only a client that has seen no response yet can be told 502; one whose response
        // was under way just sees the connection end.
        if protocol == PortProtocol::Http && !response_started(&c) {
            let _ = c.write_all(super::BAD_GATEWAY);
        }
        let _ = c.shutdown(std::net::Shutdown::Both);
    }
}

/// What the host knows about a running worker without asking it.
#[derive(Debug, Default)]
pub struct WorkerState {
    /// Handed-off connections not yet closed.
    pub active: AtomicUsize,
    /// Connections served to completion.
    pub served: AtomicU64,
    /// The worker (or its VM) is gone.
    pub exited: AtomicBool,
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

/// The host pid of the descendant of `root` that is `ns_pid` in its own (innermost) pid
/// namespace (`NSpid`'s last field).
fn host_pid_in(root: u32, ns_pid: u32) -> Option<u32> {
    let mut queue = children_of(root);
    let mut seen = 0;
    while let Some(p) = queue.pop() {
        seen += 1;
        if seen > 4096 {
            return None;
        }
        let status = std::fs::read_to_string(format!("/proc/{p}/status")).unwrap_or_default();
        let inner = status
            .lines()
            .find_map(|l| l.strip_prefix("NSpid:"))
            .and_then(|v| v.split_whitespace().last())
            .and_then(|v| v.parse::<u32>().ok());
        if inner == Some(ns_pid) {
            return Some(p);
        }
        queue.extend(children_of(p));
    }
    None
}

/// How long a worker may take to answer a request after its restore.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

fn protocol_error(what: &str, got: impl std::fmt::Debug) -> Error {
    Error::Worker(format!("{what}: unexpected reply {got:?}"))
}

impl Worker {
    /// Spawns a worker for the snapshot in `dir` and waits until its VM monitor is ready
    /// for the state. Jailed as [`JailConfig::current`] says.
    pub fn spawn(dir: &Path) -> Result<Worker, Error> {
        Worker::spawn_with(dir, &JailConfig::current(), &[])
    }

    /// [`Worker::spawn`] with this jail, and `volumes` bound to the snapshot's slots (the
    /// jail binds each into the worker's root).
    pub fn spawn_with(
        dir: &Path,
        jail: &JailConfig,
        volumes: &[crate::Volume],
    ) -> Result<Worker, Error> {
        let exe = find_worker_binary()?;
        let (host, worker) =
            channel::pair().map_err(|e| Error::io("creating the worker socket", e))?;
        let worker_fd = worker.as_raw_fd();
        // The worker's VM run directories go under a directory of ours, removed once the
        // worker is reaped: a worker that was SIGKILLed cannot remove its own.
        let run_root = tempfile::Builder::new()
            .prefix("supermachine-run-")
            .tempdir()
            .map_err(|e| Error::io("creating the worker's run directory", e))?;
        let mut cmd = Command::new(&exe);
        cmd.arg("--snapshot").arg(dir).arg("--control-fd").arg("3");
        cmd.args(jail.to_args());
        if !volumes.is_empty() {
            let json = serde_json::to_string(volumes)
                .map_err(|e| Error::Worker(format!("encoding the volumes: {e}")))?;
            cmd.arg("--volumes").arg(json);
        }
        cmd.env("TMPDIR", run_root.path());
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
        let child = supermachine_backend::spawn::spawn_tied(cmd)
            .map_err(|e| Error::io(format!("starting {}", exe.display()), e))?;
        drop(worker);
        let mut w = Worker {
            child,
            control: host,
            monitor_pid: 0,
            agent: None,
            replies: None,
            state: Arc::new(WorkerState::default()),
            inflight: Arc::default(),
            next_id: 0,
            on_closed: None,
            jailed: jail.enabled,
            _run_root: run_root,
        };
        match w.recv()? {
            // A jailed worker counts pids in its own namespace: find the host's number.
            WorkerReply::Prepared { monitor_pid } if w.jailed => {
                w.monitor_pid = host_pid_in(w.child.id(), monitor_pid).unwrap_or(0)
            }
            WorkerReply::Prepared { monitor_pid } => w.monitor_pid = monitor_pid,
            WorkerReply::Error { message } => return Err(Error::Worker(message)),
            other => return Err(protocol_error("waiting for the worker to prepare", other)),
        }
        Ok(w)
    }

    fn recv(&mut self) -> Result<WorkerReply, Error> {
        if let Some(rx) = &self.replies {
            return rx
                .recv_timeout(REPLY_TIMEOUT)
                .map_err(|_| Error::Worker(format!("worker {} did not answer", self.child.id())));
        }
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
                let endpoint: AgentEndpoint = agent.parse().map_err(Error::Worker)?;
                self.agent = Some(AgentClient::new(endpoint));
                self.start_reader()?;
                Ok(WorkerTimings {
                    restore: Duration::from_secs_f64(restore_ms / 1000.0),
                    ready: Duration::from_secs_f64(ready_ms / 1000.0),
                })
            }
            WorkerReply::Error { message } => Err(Error::Worker(message)),
            other => Err(protocol_error("restoring", other)),
        }
    }

    fn start_reader(&mut self) -> Result<(), Error> {
        let sock = self
            .control
            .try_clone()
            .map_err(|e| Error::io("worker socket", e))?;
        let (tx, rx) = mpsc::channel();
        let state = self.state.clone();
        let inflight = self.inflight.clone();
        let on_closed = self.on_closed.clone();
        std::thread::spawn(move || loop {
            match channel::recv::<WorkerReply>(&sock) {
                Ok(Some((WorkerReply::Closed { id, status, .. }, _))) => {
                    if let Ok(mut m) = inflight.lock() {
                        m.remove(&id);
                    }
                    if let Some(cb) = &on_closed {
                        cb(status);
                    }
                    state.active.fetch_sub(1, Ordering::SeqCst);
                    state.served.fetch_add(1, Ordering::SeqCst);
                }
                Ok(Some((WorkerReply::Exited { .. }, _))) | Ok(None) | Err(_) => {
                    state.exited.store(true, Ordering::SeqCst);
                    fail_inflight(&inflight);
                    return;
                }
                Ok(Some((other, _))) => {
                    if tx.send(other).is_err() {
                        return;
                    }
                }
            }
        });
        self.replies = Some(rx);
        Ok(())
    }

    /// Passes `client` to the worker (SCM_RIGHTS), which bridges it to `guest_port` after
    /// sending `prefix`. Our copy of the socket is closed when this returns.
    pub fn handoff(
        &mut self,
        client: impl AsRawFd,
        guest_port: u16,
        protocol: PortProtocol,
        prefix: &[u8],
    ) -> Result<(), Error> {
        self.handoff_with(client, guest_port, protocol, prefix, false)
    }

    /// [`Worker::handoff`]; with `last`, the worker stops its VM and exits when this
    /// connection closes (a fresh VM per connection).
    pub fn handoff_with(
        &mut self,
        client: impl AsRawFd,
        guest_port: u16,
        protocol: PortProtocol,
        prefix: &[u8],
        last: bool,
    ) -> Result<(), Error> {
        let id = self.next_id;
        self.next_id += 1;
        let req = WorkerRequest::Handoff {
            guest_port,
            protocol,
            prefix: prefix.to_vec(),
            last,
            id,
        };
        // Keep our own handle until the worker reports the connection closed: if the
        // worker dies first, an HTTP client gets a 502 from us instead of a reset.
        if let Ok(dup) = nix::unistd::dup(client.as_raw_fd()) {
            // SAFETY: dup just returned this descriptor; nothing else owns it.
            let dup = unsafe { <std::net::TcpStream as std::os::fd::FromRawFd>::from_raw_fd(dup) };
            if let Ok(mut m) = self.inflight.lock() {
                m.insert(id, (dup, protocol));
            }
        }
        self.state.active.fetch_add(1, Ordering::SeqCst);
        let sent = self.send(&req, Some(client.as_raw_fd()));
        drop(client);
        let result = sent.and_then(|_| match self.recv()? {
            WorkerReply::HandedOff => Ok(()),
            WorkerReply::Error { message } => Err(Error::Worker(message)),
            other => Err(protocol_error("handing off a connection", other)),
        });
        if result.is_err() {
            self.state.active.fetch_sub(1, Ordering::SeqCst);
            if let Ok(mut m) = self.inflight.lock() {
                m.remove(&id);
            }
        }
        result
    }

    /// Registers a callback for every closed connection (with its first response's status
    /// code); set before `restore`.
    pub fn on_closed(&mut self, f: Arc<dyn Fn(Option<u16>) + Send + Sync>) {
        self.on_closed = Some(f);
    }

    /// Hands the worker a listening socket to accept on itself (`--accept-in-workers`).
    pub fn listen_on(
        &mut self,
        listener: &std::net::TcpListener,
        guest_port: u16,
        protocol: PortProtocol,
    ) -> Result<(), Error> {
        self.send(
            &WorkerRequest::Listen {
                guest_port,
                protocol,
            },
            Some(listener.as_raw_fd()),
        )?;
        match self.recv()? {
            WorkerReply::HandedOff => Ok(()),
            WorkerReply::Error { message } => Err(Error::Worker(message)),
            other => Err(protocol_error("handing over the listener", other)),
        }
    }

    /// Live counters (connections in flight, served, exited).
    pub fn state(&self) -> &Arc<WorkerState> {
        &self.state
    }

    /// False once the worker or its VM is gone.
    pub fn is_alive(&mut self) -> bool {
        !self.state.exited.load(Ordering::SeqCst) && matches!(self.child.try_wait(), Ok(None))
    }

    /// Where the guest agent is reached from the host, once restored.
    pub fn agent_endpoint(&self) -> Option<AgentEndpoint> {
        Some(self.agent.as_ref()?.endpoint().clone())
    }

    /// The worker process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The VM monitor's process id (the host's number): the jailed worker itself on kvm,
    /// its QEMU on the qemu backend.
    pub fn monitor_pid(&self) -> u32 {
        self.monitor_pid
    }

    /// The jailed worker process (the waiter's child), by the host's pid; `None` unjailed.
    pub fn jailed_pid(&self) -> Option<u32> {
        if !self.jailed {
            return None;
        }
        children_of(self.child.id()).into_iter().next()
    }

    /// How the worker ended, for logs: its exit code or signal, and for SIGSYS the
    /// syscall its seccomp filter refused. `None` while it runs.
    pub fn exit_reason(&mut self) -> Option<String> {
        use std::os::unix::process::ExitStatusExt;
        let status = self.child.try_wait().ok()??;
        Some(match status.signal() {
            Some(libc::SIGSYS) => {
                let path = self
                    ._run_root
                    .path()
                    .join(crate::jail::seccomp::VIOLATION_FILE);
                match std::fs::read_to_string(&path) {
                    Ok(n) if !n.trim().is_empty() => {
                        format!("killed by SIGSYS: seccomp refused syscall {}", n.trim())
                    }
                    _ => "killed by SIGSYS (seccomp)".to_string(),
                }
            }
            Some(sig) => format!("killed by signal {sig}"),
            None => format!("exited with {status}"),
        })
    }

    fn agent(&self) -> Result<&AgentClient, Error> {
        self.agent
            .as_ref()
            .ok_or_else(|| Error::Worker("the worker's VM is not restored yet".into()))
    }

    /// A byte stream to a guest port (straight to the guest agent, not through the worker).
    pub fn connect(&self, guest_port: u16) -> Result<crate::agent::GuestStream, Error> {
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
        // A graceful stop (VM down, run directory removed) takes milliseconds, but a loaded
        // host can stretch it past a second; SIGKILL would leave the run directory behind.
        for _ in 0..500 {
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
        // Reaped either way before `_run_root` goes (try_wait reaps an exited child).
        let _ = self.child.try_wait();
    }
}
