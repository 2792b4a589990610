//! [`Vm`]: a running microVM booted from an image, with its workload running, reachable
//! through the guest agent: exec, files, signals, a byte stream to a guest port, TCP
//! forwarders. Dropping it kills the VM.

use std::net::SocketAddr;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime};

use supermachine_backend::{tail_of, AgentEndpoint, BootSpec, Disk, Machine};
use supermachine_bake::initramfs;
use supermachine_protocol::agent::AGENT_PORT;
use supermachine_protocol::{ExitStatus, FrameError, FrameReader, GuestEvent, HostCommand};

use crate::agent::{AgentClient, GuestStream};
use crate::boot::{BootInputs, BootReport, BootRequest, BootTimings};
use crate::exec::ExecBuilder;
use crate::forward::TcpForwarder;
use crate::run_dir::{new_run_dir, LiveRunDir};
use crate::Error;

pub use crate::boot::OutputSink;
pub use restore::PreparedRestore;

mod restore;

/// How long a restored guest may take to take its new clock and entropy.
const REFRESH_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a VM may take to power off after the workload exited.
const POWEROFF_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
enum Phase {
    Booting,
    Running,
    Exited(ExitStatus),
    Failed(String),
}

struct Shared {
    phase: Phase,
    /// init's answer to the post-restore refresh (empty: success).
    refreshed: Option<String>,
    agent_ready: bool,
    timings: BootTimings,
}

type State = Arc<(Mutex<Shared>, Condvar)>;

pub struct Vm {
    machine: Mutex<Box<dyn Machine>>,
    /// Write half of the control channel (host -> init commands).
    control: Mutex<Option<Box<dyn supermachine_backend::ControlChannel>>>,
    state: State,
    agent: Option<AgentClient>,
    backend_name: String,
    started: Instant,
    _live: LiveRunDir,
    _run_dir: tempfile::TempDir,
}

impl Vm {
    /// Boots the image and returns once the workload has started (and the agent answers).
    pub fn boot(req: &BootRequest, sink: OutputSink) -> Result<Vm, Error> {
        let started = Instant::now();
        let inputs = BootInputs::resolve(req)?;
        Vm::boot_from(req, inputs, started, sink)
    }

    /// Boots `req.image`, runs its command, writes its output to `stdout`/`stderr` as it
    /// comes, and returns its exit status. The VM is gone when this returns.
    pub fn run_to_completion(
        req: &BootRequest,
        stdout: Box<dyn std::io::Write + Send>,
        stderr: Box<dyn std::io::Write + Send>,
    ) -> Result<BootReport, Error> {
        let vm = Vm::boot(req, crate::boot::output_sink(stdout, stderr))?;
        let status = vm.wait()?;
        Ok(BootReport {
            status,
            timings: vm.timings(),
            backend: vm.backend_name().to_string(),
        })
    }

    /// Boots from inputs already resolved (a bake hashes exactly what it boots);
    /// `started` is when their resolution began.
    pub fn boot_from(
        req: &BootRequest,
        inputs: BootInputs,
        started: Instant,
        sink: OutputSink,
    ) -> Result<Vm, Error> {
        let BootInputs {
            kernel,
            init,
            shim,
            mut prepared,
        } = inputs;
        let selected = supermachine_backend::select::select(req.backend)?;
        let slots = selected
            .backend
            .volume_slots(prepared.run_config.layers.len());
        crate::volume::check_all(&req.volumes, slots, &selected.name)?;
        if req.snapshot_dir.is_some() && !req.volumes.is_empty() {
            return Err(Error::Bake(
                "a snapshot is baked without volumes: they are bound at restore".into(),
            ));
        }
        prepared.run_config.volumes = crate::volume::mounts(&req.volumes);
        let mut timings = BootTimings {
            prepare: started.elapsed(),
            ..Default::default()
        };

        let (run_dir, live) = new_run_dir(None)?;
        let initramfs_path = run_dir.path().join("initramfs.cpio");
        let file = std::fs::File::create(&initramfs_path)
            .map_err(|e| Error::io(format!("creating {}", initramfs_path.display()), e))?;
        use std::io::Write;
        initramfs::write(
            std::io::BufWriter::new(file),
            &init,
            shim.as_deref(),
            &prepared.run_config,
        )
        .and_then(|mut w| w.flush())
        .map_err(|e| Error::io("writing the initramfs", e))?;

        let mut spec = BootSpec {
            kernel,
            initramfs: initramfs_path,
            extra_cmdline: req.kernel_args.clone(),
            memory_mib: req.memory_mib,
            vcpus: req.vcpus,
            disks: layer_disks(
                &prepared.run_config.layers,
                prepared.layers.iter().map(|(p, _)| p.as_path()),
            )
            .map_err(Error::Guest)?,
            run_dir: run_dir.path().to_path_buf(),
            agent_port: shim.as_ref().map(|_| AGENT_PORT),
            memory_file: None,
            // A bake carries every slot the backend has, unbound; a boot its volumes.
            volumes: crate::volume::slots(
                &req.volumes,
                if req.snapshot_dir.is_some() { slots } else { 0 },
            ),
        };
        if let Some(dir) = &req.snapshot_dir {
            spec.memory_file = selected.backend.bake_memory_file(dir);
        }
        tracing::info!(backend = %selected.name, reason = %selected.reason, "backend");
        let backend_name = selected.name;
        let machine = selected.backend.boot(&spec)?;
        let t = machine.timings();
        timings.backend_start = t.monitor_ready - t.requested;
        let vm = Vm::assemble(
            machine,
            backend_name,
            started,
            live,
            run_dir,
            timings,
            Phase::Booting,
            req.boot_timeout,
            sink,
        )?;
        vm.wait_started()?;
        Ok(vm)
    }
}

impl Vm {
    fn send_command(&self, cmd: &HostCommand) -> Result<(), Error> {
        let mut c = self
            .control
            .lock()
            .map_err(|_| Error::Guest("control lock poisoned".into()))?;
        let w = c
            .as_mut()
            .ok_or_else(|| Error::Guest("the VM has no control channel".into()))?;
        supermachine_protocol::write_frame(w, cmd)
            .map_err(|e| Error::Guest(format!("control channel: {e}")))
    }

    /// The private directory holding this VM's sockets, console log and initramfs.
    pub fn run_dir(&self) -> &std::path::Path {
        self._run_dir.path()
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        mut machine: Box<dyn Machine>,
        backend_name: String,
        started: Instant,
        live: LiveRunDir,
        run_dir: tempfile::TempDir,
        timings: BootTimings,
        phase: Phase,
        boot_timeout: Duration,
        sink: OutputSink,
    ) -> Result<Vm, Error> {
        let t = machine.timings();
        let agent = machine.agent_endpoint().map(AgentClient::new);
        let channel = machine
            .take_channel()
            .ok_or_else(|| Error::Guest("the VM has no control channel".into()))?;
        let restored = matches!(phase, Phase::Running);
        let control = channel.try_clone_box().ok();
        let state: State = Arc::new((
            Mutex::new(Shared {
                phase,
                refreshed: None,
                agent_ready: restored,
                timings,
            }),
            Condvar::new(),
        ));
        {
            let state = state.clone();
            let monitor_ready = t.monitor_ready;
            std::thread::spawn(move || {
                follow_events(channel, sink, state, boot_timeout, monitor_ready, restored)
            });
        }
        let vm = Vm {
            control: Mutex::new(control),
            machine: Mutex::new(machine),
            state,
            agent,
            backend_name,
            started,
            _live: live,
            _run_dir: run_dir,
        };
        Ok(vm)
    }

    /// Blocks until the workload started (or the boot failed).
    fn wait_started(&self) -> Result<(), Error> {
        let (lock, cv) = &*self.state;
        let mut s = lock
            .lock()
            .map_err(|_| Error::Guest("state lock poisoned".into()))?;
        loop {
            match &s.phase {
                Phase::Booting => {}
                Phase::Running | Phase::Exited(_) => return Ok(()),
                Phase::Failed(msg) => return Err(self.crash_error(msg.clone())),
            }
            s = cv
                .wait(s)
                .map_err(|_| Error::Guest("state lock poisoned".into()))?;
        }
    }

    fn crash_error(&self, reason: String) -> Error {
        if let Some(msg) = reason.strip_prefix("fatal: ") {
            return Error::Guest(msg.to_string());
        }
        let mut m = match self.machine.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        // How the VM itself ended says more than the closed channel that noticed it.
        let reason = match m.wait_timeout(Duration::from_secs(2)) {
            Ok(Some(supermachine_backend::MachineExit::MonitorDied { detail })) => {
                format!("{reason}; the VM ended: {detail}")
            }
            _ => reason,
        };
        let console = tail_of(m.console_log(), 4000);
        let reason = if console.contains("Kernel panic") {
            format!("guest kernel panic ({reason})")
        } else {
            reason
        };
        Error::GuestCrashed { reason, console }
    }

    /// Waits for the workload to exit; the VM is stopped when this returns.
    pub fn wait(&self) -> Result<ExitStatus, Error> {
        let (lock, cv) = &*self.state;
        let phase = {
            let mut s = lock
                .lock()
                .map_err(|_| Error::Guest("state lock poisoned".into()))?;
            while matches!(s.phase, Phase::Booting | Phase::Running) {
                s = cv
                    .wait(s)
                    .map_err(|_| Error::Guest("state lock poisoned".into()))?;
            }
            s.phase.clone()
        };
        match phase {
            Phase::Exited(status) => {
                let mut m = self
                    .machine
                    .lock()
                    .map_err(|_| Error::Guest("machine lock poisoned".into()))?;
                let _ = m.wait_timeout(POWEROFF_GRACE)?;
                let _ = m.kill();
                Ok(status)
            }
            Phase::Failed(msg) => Err(self.crash_error(msg)),
            Phase::Booting | Phase::Running => unreachable!("loop above waits for an end phase"),
        }
    }

    /// The workload's exit status, if it has exited.
    pub fn try_status(&self) -> Option<ExitStatus> {
        let s = self.state.0.lock().ok()?;
        match s.phase {
            Phase::Exited(st) => Some(st),
            _ => None,
        }
    }

    /// Stops the VM gracefully: SIGTERM to the workload, then up to `grace` for it to exit
    /// (init powers the VM off when it does), then a kill.
    pub fn stop(&self, grace: Duration) -> Result<Option<ExitStatus>, Error> {
        if self.try_status().is_none() {
            let _ = self.workload_signal(15);
            let (lock, cv) = &*self.state;
            if let Ok(s) = lock.lock() {
                let _ = cv.wait_timeout_while(s, grace, |s| {
                    matches!(s.phase, Phase::Booting | Phase::Running)
                });
            }
        }
        let status = self.try_status();
        if status.is_some() {
            if let Ok(mut m) = self.machine.lock() {
                let _ = m.wait_timeout(Duration::from_secs(5));
            }
        }
        self.kill();
        Ok(status)
    }

    /// Stops the VM now.
    pub fn kill(&self) {
        if let Ok(mut m) = self.machine.lock() {
            let _ = m.kill();
        }
    }

    pub fn timings(&self) -> BootTimings {
        let mut t = self
            .state
            .0
            .lock()
            .map(|s| s.timings.clone())
            .unwrap_or_default();
        t.total = self.started.elapsed();
        t
    }

    pub fn backend_name(&self) -> &str {
        &self.backend_name
    }

    /// Which backend runs this VM.
    pub fn backend_kind(&self) -> supermachine_backend::BackendKind {
        match self.machine.lock() {
            Ok(m) => m.kind(),
            Err(p) => p.into_inner().kind(),
        }
    }

    /// The VM monitor's host pid.
    pub fn pid(&self) -> u32 {
        self.machine.lock().map(|m| m.pid()).unwrap_or(0)
    }

    fn agent(&self) -> Result<&AgentClient, Error> {
        self.agent
            .as_ref()
            .ok_or_else(|| Error::Exec("this VM has no guest agent".into()))
    }

    /// Where the guest agent is reached from the host (for `supermachine exec` from other
    /// processes).
    pub fn agent_endpoint(&self) -> Option<AgentEndpoint> {
        Some(self.agent.as_ref()?.endpoint().clone())
    }

    /// A byte stream to TCP `guest_port` on the guest's loopback.
    pub fn connect(&self, guest_port: u16) -> Result<GuestStream, Error> {
        self.agent()?
            .connect(guest_port)
            .map_err(|e| Error::Network(format!("connecting to guest port {guest_port}: {e}")))
    }

    /// Listens on 127.0.0.1:`host_port` (0: any free port) and forwards to `guest_port`.
    pub fn expose_tcp(&self, host_port: u16, guest_port: u16) -> Result<TcpForwarder, Error> {
        self.expose_tcp_on(SocketAddr::from(([127, 0, 0, 1], host_port)), guest_port)
    }

    pub fn expose_tcp_on(
        &self,
        listen: SocketAddr,
        guest_port: u16,
    ) -> Result<TcpForwarder, Error> {
        TcpForwarder::start(listen, self.agent()?.clone(), guest_port)
            .map_err(|e| Error::io(format!("listening on {listen}"), e))
    }

    /// Waits until something in the guest listens on `port`.
    pub fn wait_listening(&self, port: u16, timeout: Duration) -> Result<(), Error> {
        self.agent()?
            .wait_listening(port, timeout)
            .map_err(|e| Error::io(format!("waiting for guest port {port}"), e))
    }

    pub fn exec_builder(&self) -> ExecBuilder {
        ExecBuilder::new(self.agent.clone().unwrap_or_else(|| {
            AgentClient::new(AgentEndpoint::Tcp(SocketAddr::from(([127, 0, 0, 1], 0))))
        }))
    }

    /// Runs `argv` to completion (like `docker exec`).
    pub fn exec<I: IntoIterator<Item = S>, S: Into<String>>(
        &self,
        argv: I,
    ) -> Result<crate::ExecOutcome, Error> {
        self.agent()?;
        self.exec_builder().argv(argv).output()
    }

    pub fn write_file(&self, path: &str, data: &[u8], mode: u32) -> Result<(), std::io::Error> {
        self.agent()
            .map_err(std::io::Error::other)?
            .write_file(path, data, mode)
    }

    /// Reads a guest file of at most `max_bytes`; a missing file is `ErrorKind::NotFound`.
    pub fn read_file(&self, path: &str, max_bytes: u64) -> Result<Vec<u8>, std::io::Error> {
        self.agent()
            .map_err(std::io::Error::other)?
            .read_file(path, max_bytes)
    }

    /// Sets the guest's wall clock to the host's, through the agent.
    pub fn sync_clock(&self) -> Result<(), Error> {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        self.agent()?
            .set_time(now.as_nanos())
            .map_err(|e| Error::io("setting the guest clock", e))
    }

    /// Credits `bytes` (at most 4096) to the guest kernel's entropy pool, through the agent.
    pub fn add_entropy(&self, bytes: &[u8]) -> Result<(), Error> {
        self.agent()?
            .add_entropy(bytes.to_vec())
            .map_err(|e| Error::io("adding guest entropy", e))
    }

    /// Sends a signal to the workload.
    pub fn workload_signal(&self, signum: i32) -> Result<(), Error> {
        match self.agent()?.signal(signum) {
            Ok(()) => Ok(()),
            Err(e) => {
                // A signal that ends the workload powers the VM off, which can cut the
                // agent's reply: that is success, not failure.
                let (lock, cv) = &*self.state;
                if let Ok(s) = lock.lock() {
                    let _ = cv.wait_timeout_while(s, Duration::from_secs(3), |s| {
                        matches!(s.phase, Phase::Booting | Phase::Running)
                    });
                }
                if self.try_status().is_some() {
                    Ok(())
                } else {
                    Err(Error::io("signalling the workload", e))
                }
            }
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.kill();
    }
}

fn set_phase(state: &State, f: impl FnOnce(&mut Shared)) {
    let (lock, cv) = &**state;
    if let Ok(mut s) = lock.lock() {
        f(&mut s);
        cv.notify_all();
    }
}

/// Follows init's events on the control channel for the VM's whole life.
fn follow_events(
    channel: Box<dyn supermachine_backend::ControlChannel>,
    mut sink: OutputSink,
    state: State,
    boot_timeout: Duration,
    monitor_ready: Instant,
    restored: bool,
) {
    // Until init speaks, a silent guest is a hung boot. A restored guest spoke long ago.
    let timeout = if restored { None } else { Some(boot_timeout) };
    if channel.set_read_timeout(timeout).is_err() {
        set_phase(&state, |s| {
            s.phase = Phase::Failed("cannot arm the boot timeout".into())
        });
        return;
    }
    let mut frames = FrameReader::new(channel);
    let (mut t_init, mut t_workload) = if restored {
        (Some(monitor_ready), Some(monitor_ready))
    } else {
        (None, None)
    };
    loop {
        let event = match frames.read::<GuestEvent>() {
            Ok(Some(ev)) => ev,
            Ok(None) => {
                set_phase(&state, |s| {
                    if !matches!(s.phase, Phase::Exited(_)) {
                        s.phase = Phase::Failed("the guest closed its control channel".into())
                    }
                });
                return;
            }
            Err(FrameError::Io(e))
                if t_init.is_none()
                    && matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
            {
                set_phase(&state, |s| {
                    s.phase = Phase::Failed(format!(
                        "the guest did not start init within {boot_timeout:?}"
                    ))
                });
                return;
            }
            Err(e) => {
                set_phase(&state, |s| {
                    s.phase = Phase::Failed(format!("bad message from the guest: {e}"))
                });
                return;
            }
        };
        let now = Instant::now();
        match event {
            GuestEvent::InitStarted { uptime_ms } => {
                t_init = Some(now);
                let _ = frames.get_ref().set_read_timeout(None);
                set_phase(&state, |s| {
                    s.timings.kernel = Some(now - monitor_ready);
                    s.timings.guest_uptime_at_init_ms = Some(uptime_ms);
                });
            }
            GuestEvent::AgentReady { .. } => set_phase(&state, |s| s.agent_ready = true),
            GuestEvent::Refreshed { error } => set_phase(&state, |s| s.refreshed = Some(error)),
            GuestEvent::WorkloadStarted { .. } => {
                t_workload = Some(now);
                set_phase(&state, |s| {
                    s.timings.init = t_init.map(|t| now - t);
                    s.phase = Phase::Running;
                });
            }
            GuestEvent::Output { stream, data } => sink(stream, &data),
            GuestEvent::Exited { status, .. } => {
                set_phase(&state, |s| {
                    s.timings.workload = t_workload.map(|t| now - t);
                    s.phase = Phase::Exited(status);
                });
            }
            GuestEvent::Fatal { message } => {
                set_phase(&state, |s| {
                    s.phase = Phase::Failed(format!("fatal: {message}"))
                });
            }
        }
    }
}

/// The guest's layer disks: read-only, in the run config's order, each with the serial init
/// looks for. One path per layer, or an error saying how many are missing or extra.
pub(crate) fn layer_disks<'a>(
    mounts: &[supermachine_protocol::LayerMount],
    paths: impl ExactSizeIterator<Item = &'a std::path::Path>,
) -> Result<Vec<Disk>, String> {
    if mounts.len() != paths.len() {
        return Err(format!(
            "the run config names {} layers but {} layer files are given",
            mounts.len(),
            paths.len()
        ));
    }
    Ok(mounts
        .iter()
        .zip(paths)
        .map(|(m, path)| Disk {
            path: path.to_path_buf(),
            serial: m.serial.clone(),
            read_only: true,
        })
        .collect())
}
