//! The QEMU backend: Debian's `qemu-system-x86_64 -M microvm`, KVM where the host has
//! hardware virtualization and TCG elsewhere. QEMU is a child process this backend owns: it
//! gets SIGKILL when its parent thread dies (PR_SET_PDEATHSIG) and when the [`QemuMachine`]
//! is dropped, so no VM outlives its owner.
//!
//! Channels: the console is a file in the run dir; the control channel is a second 8250 UART
//! whose chardev connects to a unix socket we listen on *before* QEMU starts, so no guest
//! byte can be lost; QMP is a unix socket QEMU serves.

mod command;
pub mod qmp;
mod snapshot;

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::{
    accel::{self, Accel},
    tail_of, AgentEndpoint, Backend, BackendError, BackendKind, BootSpec, ControlChannel, Machine,
    MachineExit, MemoryFile, PendingRestore, RestoreTimings, SnapshotRecord, StartTimings,
};

use crate::files;
pub use command::QemuCommand;

/// Filesystem slots a VM baked on QEMU carries at most (the most volumes a restore binds).
pub const VOLUME_SLOTS: usize = 4;
/// virtio-mmio transports of `-M microvm` without its second IOAPIC (`acpi=off`): every
/// virtio device (rng, each disk, the agent's net, each volume slot) takes one.
const MMIO_TRANSPORTS: usize = 8;
/// The transports taken besides disks and volumes: virtio-rng and the agent's virtio-net.
const OTHER_DEVICES: usize = 2;

/// How long QEMU may take to start and connect the control channel.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// In a jailed worker: the uid (and gid) QEMU drops to once it has opened its files, or
/// `None` where it already starts as its VM's uid (a worker jailed in a user namespace).
static RUN_AS: std::sync::OnceLock<Option<(u32, u32)>> = std::sync::OnceLock::new();

/// Every QEMU this process starts from now on runs as `uid`:`gid` after its set-up (`-runas`)
/// under QEMU's own seccomp sandbox. For the worker's jail: QEMU must open the snapshot's
/// RAM file read-write (QEMU 7.2 has no read-only private RAM backend) before the drop.
pub fn run_jailed_as(uid: u32, gid: u32) {
    let _ = RUN_AS.set(Some((uid, gid)));
}

/// Every QEMU this process starts from now on runs under QEMU's own seccomp sandbox, as
/// the uid that starts it (it has nothing to drop).
pub fn run_sandboxed() {
    let _ = RUN_AS.set(None);
}

#[derive(Debug, Clone)]
pub struct QemuBackend {
    binary: PathBuf,
    accel: Accel,
}

impl QemuBackend {
    /// `qemu-system-x86_64` from PATH (or `SUPERMACHINE_QEMU`), accelerator auto-detected.
    pub fn new() -> Self {
        let binary = std::env::var_os("SUPERMACHINE_QEMU")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("qemu-system-x86_64"));
        Self {
            binary,
            accel: accel::detect(),
        }
    }

    pub fn with_accel(mut self, accel: Accel) -> Self {
        self.accel = accel;
        self
    }

    pub fn accel(&self) -> Accel {
        self.accel
    }
}

impl Default for QemuBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl Backend for QemuBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Qemu
    }

    fn volume_slots(&self, disks: usize) -> usize {
        VOLUME_SLOTS.min(MMIO_TRANSPORTS.saturating_sub(OTHER_DEVICES + disks))
    }

    fn boot(&self, spec: &BootSpec) -> Result<Box<dyn Machine>, BackendError> {
        Ok(Box::new(self.start(spec, false)?))
    }

    fn bake_memory_file(&self, dir: &Path) -> Option<MemoryFile> {
        Some(MemoryFile {
            path: dir.join(snapshot::MEMORY_FILE),
            shared: true,
        })
    }

    fn verify_snapshot(
        &self,
        dir: &Path,
        record: &SnapshotRecord,
        memory_mib: u32,
    ) -> Result<(), BackendError> {
        let state = dir.join(snapshot::STATE_FILE);
        files::check_size(&state, record.state_size)?;
        files::check_sha256(&state, &record.state_sha256)?;
        let ram = u64::from(memory_mib) << 20;
        if record.memory_size != ram {
            return Err(BackendError::InvalidSnapshot(format!(
                "{} recorded as {} bytes for {memory_mib} MiB of guest RAM",
                snapshot::MEMORY_FILE,
                record.memory_size
            )));
        }
        files::check_size(&dir.join(snapshot::MEMORY_FILE), ram)
    }

    fn prepare_restore(
        &self,
        spec: &BootSpec,
        dir: &Path,
    ) -> Result<Box<dyn PendingRestore>, BackendError> {
        let started = Instant::now();
        // Guest RAM is the snapshot's file, mapped copy-on-write (share=off).
        let mut spec = spec.clone();
        spec.memory_file = Some(MemoryFile {
            path: dir.join(snapshot::MEMORY_FILE),
            shared: false,
        });
        let mut machine = self.start(&spec, true)?;
        let qmp = match snapshot::prepare_incoming(&machine.paths.qmp) {
            Ok(q) => q,
            Err(e) => {
                let _ = machine.kill();
                // QEMU's own words say why it is not answering (it may have exited).
                let log = tail_of(&machine.paths.qemu_log, 2048);
                return Err(match log.trim() {
                    "" => e,
                    log => BackendError::Qmp(format!("{e}; qemu's log ends with:\n{log}")),
                });
            }
        };
        Ok(Box::new(QemuPendingRestore {
            machine,
            qmp,
            state: dir.join(snapshot::STATE_FILE),
            monitor_start: started.elapsed(),
        }))
    }
}

/// A QEMU started with `-incoming defer`, its QMP session open and `x-ignore-shared` set:
/// a restore is now only "load the state, continue".
struct QemuPendingRestore {
    machine: QemuMachine,
    qmp: qmp::QmpClient,
    /// The snapshot's migration stream.
    state: PathBuf,
    monitor_start: Duration,
}

impl PendingRestore for QemuPendingRestore {
    fn resume(self: Box<Self>) -> Result<(Box<dyn Machine>, RestoreTimings), BackendError> {
        let QemuPendingRestore {
            mut machine,
            mut qmp,
            state,
            monitor_start,
        } = *self;
        let loading = Instant::now();
        if let Err(e) = snapshot::load(&mut qmp, &state) {
            let _ = machine.kill();
            let log = tail_of(&machine.paths.qemu_log, 2000);
            return Err(BackendError::Restore(format!(
                "{e}; qemu log: {}",
                log.trim()
            )));
        }
        let timings = RestoreTimings {
            monitor_start,
            load_and_resume: loading.elapsed(),
        };
        Ok((Box::new(machine), timings))
    }

    fn monitor_pid(&self) -> u32 {
        self.machine.pid()
    }
}

impl QemuBackend {
    /// Starts QEMU (booting, or waiting for a migration stream when `incoming`).
    fn start(&self, spec: &BootSpec, incoming: bool) -> Result<QemuMachine, BackendError> {
        // The agent's host port is picked free just before QEMU binds it; another process
        // may win that race, so a failed forward is retried with a new port.
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.boot_once(spec, incoming) {
                Err(BackendError::EarlyExit { log, .. })
                    if attempt < 4 && log.contains("host forwarding") =>
                {
                    tracing::debug!(attempt, "agent port taken, retrying");
                    let _ = std::fs::remove_file(spec.run_dir.join("channel.sock"));
                }
                other => return other,
            }
        }
    }

    fn boot_once(&self, spec: &BootSpec, incoming: bool) -> Result<QemuMachine, BackendError> {
        let requested = Instant::now();
        spec.check_files()?;
        let paths = RunPaths::new(&spec.run_dir);
        let listener = UnixListener::bind(&paths.channel)
            .map_err(|e| BackendError::io(format!("binding {}", paths.channel.display()), e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| BackendError::io("control socket non-blocking", e))?;
        let agent = match spec.agent_port {
            Some(guest_port) => Some((free_local_port()?, guest_port)),
            None => None,
        };

        // What an unbound volume slot exports: an empty directory, read-only.
        if spec.volumes.iter().any(|v| v.host.is_none()) {
            std::fs::create_dir_all(&paths.no_volume).map_err(|e| {
                BackendError::io(format!("creating {}", paths.no_volume.display()), e)
            })?;
        }
        let qcmd = QemuCommand::new(
            spec,
            self.accel,
            &paths.console,
            &paths.channel,
            &paths.qmp,
            agent,
        )
        .volumes(&spec.volumes, &paths.no_volume);
        let qcmd = if incoming {
            qcmd.incoming_deferred()
        } else {
            qcmd
        };
        let qcmd = match RUN_AS.get() {
            Some(Some((uid, gid))) => qcmd.jailed_as(*uid, *gid),
            Some(None) => qcmd.sandboxed(),
            None => qcmd,
        };
        let stderr = std::fs::File::create(&paths.qemu_log)
            .map_err(|e| BackendError::io(format!("creating {}", paths.qemu_log.display()), e))?;
        let mut cmd = std::process::Command::new(&self.binary);
        cmd.args(qcmd.args())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        let child = crate::spawn::spawn_tied(cmd).map_err(|source| BackendError::Spawn {
            program: self.binary.display().to_string(),
            source,
        })?;
        tracing::debug!(pid = child.id(), accel = %self.accel, "qemu started");
        let mut machine = QemuMachine {
            child: Some(child),
            channel: None,
            paths,
            timings: StartTimings {
                requested,
                monitor_ready: requested,
            },
            agent: agent.map(|(host_port, _)| {
                AgentEndpoint::Tcp(std::net::SocketAddr::from(([127, 0, 0, 1], host_port)))
            }),
            memory: spec.memory_file.clone(),
        };
        let stream = machine.accept_channel(&listener)?;
        machine.timings.monitor_ready = Instant::now();
        machine.channel = Some(Box::new(stream));
        Ok(machine)
    }
}

/// A currently free TCP port on 127.0.0.1.
fn free_local_port() -> Result<u16, BackendError> {
    let l = std::net::TcpListener::bind(("127.0.0.1", 0))
        .map_err(|e| BackendError::io("picking a free port", e))?;
    Ok(l.local_addr()
        .map_err(|e| BackendError::io("picking a free port", e))?
        .port())
}

struct RunPaths {
    console: PathBuf,
    channel: PathBuf,
    qmp: PathBuf,
    qemu_log: PathBuf,
    no_volume: PathBuf,
}

impl RunPaths {
    fn new(dir: &Path) -> Self {
        Self {
            console: dir.join("console.log"),
            channel: dir.join("channel.sock"),
            qmp: dir.join("qmp.sock"),
            qemu_log: dir.join("qemu.log"),
            no_volume: dir.join("no-volume"),
        }
    }
}

pub struct QemuMachine {
    child: Option<Child>,
    channel: Option<Box<dyn ControlChannel>>,
    paths: RunPaths,
    timings: StartTimings,
    agent: Option<AgentEndpoint>,
    /// The RAM file it runs with (shared while baking: the snapshot's RAM).
    memory: Option<MemoryFile>,
}

impl QemuMachine {
    /// Waits for QEMU's chardev to connect, watching for QEMU dying first.
    fn accept_channel(
        &mut self,
        listener: &UnixListener,
    ) -> Result<std::os::unix::net::UnixStream, BackendError> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match listener.accept() {
                Ok((stream, _)) => {
                    stream
                        .set_nonblocking(false)
                        .map_err(|e| BackendError::io("control channel blocking mode", e))?;
                    return Ok(stream);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(BackendError::io("accepting the control channel", e)),
            }
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Err(BackendError::EarlyExit {
                        status: status.to_string(),
                        log: tail_of(&self.paths.qemu_log, 4096),
                    });
                }
            }
            if Instant::now() > deadline {
                let _ = self.kill();
                return Err(BackendError::StartTimeout(START_TIMEOUT));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn exit_from(status: std::process::ExitStatus) -> MachineExit {
        use std::os::unix::process::ExitStatusExt;
        // With -no-reboot, a guest reset (init's way out) makes QEMU exit 0.
        if status.success() {
            MachineExit::GuestStopped
        } else if let Some(sig) = status.signal() {
            MachineExit::MonitorDied {
                detail: format!("qemu killed by signal {sig}"),
            }
        } else {
            MachineExit::MonitorDied {
                detail: format!("qemu {status}"),
            }
        }
    }
}

impl Machine for QemuMachine {
    fn kind(&self) -> BackendKind {
        BackendKind::Qemu
    }

    fn take_channel(&mut self) -> Option<Box<dyn ControlChannel>> {
        self.channel.take()
    }

    fn console_log(&self) -> &Path {
        &self.paths.console
    }

    fn timings(&self) -> StartTimings {
        self.timings
    }

    fn agent_endpoint(&self) -> Option<AgentEndpoint> {
        self.agent.clone()
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<MachineExit>, BackendError> {
        let deadline = Instant::now() + timeout;
        let Some(child) = self.child.as_mut() else {
            return Ok(Some(MachineExit::MonitorDied {
                detail: "already reaped".into(),
            }));
        };
        loop {
            if let Some(status) = child
                .try_wait()
                .map_err(|e| BackendError::io("waiting for qemu", e))?
            {
                self.child = None;
                return Ok(Some(Self::exit_from(status)));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Writes the device state to `dir`'s `state.bin`; guest RAM already lives in its
    /// `memory.ram` (booted with [`Backend::bake_memory_file`]).
    fn snapshot(&mut self, dir: &Path) -> Result<SnapshotRecord, BackendError> {
        let ram = dir.join(snapshot::MEMORY_FILE);
        match &self.memory {
            Some(m) if m.shared && m.path == ram => {}
            _ => {
                return Err(BackendError::Snapshot(format!(
                    "the VM was not booted with its RAM in {} (bake_memory_file)",
                    ram.display()
                )))
            }
        }
        let state = dir.join(snapshot::STATE_FILE);
        snapshot::save(&self.paths.qmp, &state)?;
        snapshot::wait_for_writer(self.pid(), Duration::from_secs(60))?;
        files::fsync(&state)?;
        files::fsync(&ram)?;
        Ok(SnapshotRecord {
            state_sha256: files::sha256_of(&state)?,
            state_size: files::size_of(&state)?,
            memory_size: files::size_of(&ram)?,
        })
    }

    fn kill(&mut self) -> Result<(), BackendError> {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            child
                .wait()
                .map_err(|e| BackendError::io("reaping qemu", e))?;
        }
        Ok(())
    }
}

impl Drop for QemuMachine {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_slots_fit_in_what_microvm_has_left() {
        let q = QemuBackend::new();
        assert_eq!(q.volume_slots(1), VOLUME_SLOTS);
        // rng + net + 3 layers + 3 slots = 8 transports.
        assert_eq!(q.volume_slots(3), 3);
        assert_eq!(q.volume_slots(6), 0);
        assert_eq!(q.volume_slots(20), 0);
    }
}
