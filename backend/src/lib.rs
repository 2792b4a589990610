//! The backend seam: everything above it (bake, CLI, later worker and router) boots VMs
//! through [`Backend`] and talks to the guest through the control channel a [`Machine`]
//! hands out. Implementations: [`qemu`] (QEMU as a child process) and [`kvm`] (our own VMM,
//! `supermachine-vmm`, in this process).

pub mod accel;
mod files;
pub mod kvm;
pub mod qemu;
pub mod select;
pub mod spawn;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use accel::Accel;
pub use select::{BackendChoice, Selected};
/// The per-thread seccomp filters of the kvm backend's VM threads (set by a jailed worker).
pub use supermachine_vmm::thread_filter;

/// Which implementation baked or runs a VM (recorded in snapshots later).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    Qemu,
    Kvm,
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BackendKind::Qemu => "qemu",
            BackendKind::Kvm => "kvm",
        })
    }
}

impl std::str::FromStr for BackendKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "kvm" => Ok(BackendKind::Kvm),
            "qemu" => Ok(BackendKind::Qemu),
            other => Err(format!("unknown backend {other:?}")),
        }
    }
}

/// A block device given to the guest.
#[derive(Debug, Clone)]
pub struct Disk {
    pub path: PathBuf,
    /// virtio-blk serial, visible to the guest at /sys/block/vdX/serial.
    pub serial: String,
    pub read_only: bool,
}

/// A filesystem device (virtio-9p) given to the guest: slot N's mount tag is `smvol<N>`
/// (`supermachine_protocol::VOLUME_TAG_PREFIX`). A snapshot is baked with its slots
/// unbound (`host: None`: an empty read-only export, never mounted), so a restore can bind
/// any directory to them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VolumeSlot {
    pub host: Option<PathBuf>,
    /// The host refuses writes (the guest also mounts it read-only).
    pub read_only: bool,
}

/// Everything needed to boot one VM from a kernel and an initramfs.
#[derive(Debug, Clone)]
pub struct BootSpec {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    /// Appended to the backend's own kernel command line.
    pub extra_cmdline: Vec<String>,
    pub memory_mib: u32,
    pub vcpus: u32,
    pub disks: Vec<Disk>,
    /// A private directory for the VM's sockets and logs; the caller owns and removes it.
    pub run_dir: PathBuf,
    /// The guest agent's port; the backend makes it reachable from the host
    /// ([`Machine::agent_endpoint`]).
    pub agent_port: Option<u16>,
    /// Guest RAM in a file: written through while baking (`shared`), mapped copy-on-write
    /// (MAP_PRIVATE) when restoring.
    pub memory_file: Option<MemoryFile>,
    /// Filesystem slots, in slot order (a restore must give as many as were baked).
    pub volumes: Vec<VolumeSlot>,
}

impl BootSpec {
    /// Kernel, initramfs and every disk must exist: a missing one is named.
    pub fn check_files(&self) -> Result<(), BackendError> {
        for (what, p) in [
            ("guest kernel", &self.kernel),
            ("initramfs", &self.initramfs),
        ] {
            if !p.is_file() {
                return Err(BackendError::MissingFile(what.into(), p.clone()));
            }
        }
        for d in &self.disks {
            if !d.path.is_file() {
                return Err(BackendError::MissingFile(
                    format!("disk {}", d.serial),
                    d.path.clone(),
                ));
            }
        }
        for (i, v) in self.volumes.iter().enumerate() {
            if let Some(host) = &v.host {
                if !host.is_dir() {
                    return Err(BackendError::MissingFile(
                        format!("volume {i} directory"),
                        host.clone(),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The backend's base kernel command line followed by `extra_cmdline`.
    pub fn cmdline(&self, base: &str) -> String {
        let mut cmdline = base.to_string();
        for extra in &self.extra_cmdline {
            cmdline.push(' ');
            cmdline.push_str(extra);
        }
        cmdline
    }
}

#[derive(Debug, Clone)]
pub struct MemoryFile {
    pub path: PathBuf,
    /// true: guest writes land in the file (bake). false: private copy-on-write (restore).
    pub shared: bool,
}

/// What a backend wrote into a snapshot directory, as the caller records it (in
/// `metadata.json`) and hands back to [`Backend::verify_snapshot`] when opening it. The
/// directory's file names and formats are the backend's own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotRecord {
    /// sha256 of the state file, where the backend checks the state by digest (QEMU's
    /// migration stream); empty where the file checks itself (kvm's `restore.snap`).
    pub state_sha256: String,
    pub state_size: u64,
    /// Guest RAM, bytes.
    pub memory_size: u64,
}

/// Host-side milestones of one restore.
#[derive(Debug, Clone, Copy)]
pub struct RestoreTimings {
    /// Monitor process started -> ready to load state.
    pub monitor_start: Duration,
    /// State loaded and the guest running again.
    pub load_and_resume: Duration,
}

/// How the host reaches the guest agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentEndpoint {
    /// A host TCP address forwarded to the agent (QEMU user-mode networking).
    Tcp(std::net::SocketAddr),
    /// A guest vsock port behind the VM's unix socket (the kvm backend): connect, write
    /// `CONNECT <port>\n`, read `OK <host port>\n`, then the stream is the guest's.
    Vsock { uds: PathBuf, port: u32 },
}

/// The text form other processes get (worker replies, the registry, the admin API): a TCP
/// address as `127.0.0.1:PORT`, a vsock port as `vsock:PORT:/path/to/vsock.sock`.
impl std::fmt::Display for AgentEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AgentEndpoint::Tcp(a) => write!(f, "{a}"),
            AgentEndpoint::Vsock { uds, port } => write!(f, "vsock:{port}:{}", uds.display()),
        }
    }
}

impl std::str::FromStr for AgentEndpoint {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(rest) = s.strip_prefix("vsock:") {
            let (port, uds) = rest
                .split_once(':')
                .ok_or_else(|| format!("bad vsock agent endpoint {s:?}"))?;
            let port = port
                .parse()
                .map_err(|_| format!("bad vsock port in agent endpoint {s:?}"))?;
            if uds.is_empty() {
                return Err(format!("no socket path in agent endpoint {s:?}"));
            }
            return Ok(AgentEndpoint::Vsock {
                uds: PathBuf::from(uds),
                port,
            });
        }
        s.parse()
            .map(AgentEndpoint::Tcp)
            .map_err(|_| format!("bad agent endpoint {s:?}"))
    }
}

impl serde::Serialize for AgentEndpoint {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for AgentEndpoint {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("{0} not found: {1}")]
    MissingFile(String, PathBuf),
    #[error("cannot start {program}: {source} (is it installed? scripts/setup.sh installs it)")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("the VM monitor exited before the guest connected ({status}); its log:\n{log}")]
    EarlyExit { status: String, log: String },
    #[error("timed out after {0:?} waiting for the VM to start")]
    StartTimeout(Duration),
    #[error("QMP: {0}")]
    Qmp(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("boot: {0}")]
    Boot(String),
    #[error("snapshot: {0}")]
    Snapshot(String),
    /// A snapshot on disk does not match what was recorded (the reason names the file).
    #[error("{0}")]
    InvalidSnapshot(String),
    #[error("restore: {0}")]
    Restore(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
}

impl BackendError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        BackendError::Io {
            context: context.into(),
            source,
        }
    }
}

/// How a VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MachineExit {
    /// The guest reset or powered off (init's normal way out).
    GuestStopped,
    /// The monitor process ended otherwise (crash, kill); `detail` says how.
    MonitorDied { detail: String },
}

/// Host-side timestamps of a boot, for the boot-time split in the benchmarks.
#[derive(Debug, Clone, Copy)]
pub struct StartTimings {
    /// When the backend was asked to boot.
    pub requested: Instant,
    /// When the monitor was running and its control channel connected.
    pub monitor_ready: Instant,
}

/// The byte stream to the guest's init/agent.
pub trait ControlChannel: Read + Write + Send {
    fn try_clone_box(&self) -> std::io::Result<Box<dyn ControlChannel>>;
    /// Bounds how long a read may block (`None`: forever).
    fn set_read_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()>;
}

impl ControlChannel for std::os::unix::net::UnixStream {
    fn try_clone_box(&self) -> std::io::Result<Box<dyn ControlChannel>> {
        Ok(Box::new(self.try_clone()?))
    }

    fn set_read_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        std::os::unix::net::UnixStream::set_read_timeout(self, timeout)
    }
}

/// A running VM. Dropping it kills the VM.
pub trait Machine: Send {
    fn kind(&self) -> BackendKind;
    /// The control channel; `None` once taken.
    fn take_channel(&mut self) -> Option<Box<dyn ControlChannel>>;
    /// The guest console, for humans and error messages.
    fn console_log(&self) -> &Path;
    fn timings(&self) -> StartTimings;
    /// Where the guest agent can be reached, if the VM has one.
    fn agent_endpoint(&self) -> Option<AgentEndpoint>;
    /// The host process running the VM (for tests that check nothing is left behind).
    fn pid(&self) -> u32;
    /// Waits for the VM to end, at most `timeout`; `Ok(None)` if still running.
    fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<MachineExit>, BackendError>;
    /// Stops the VM now and reaps it.
    fn kill(&mut self) -> Result<(), BackendError>;
    /// Pauses the guest and writes its snapshot into `dir` (booted with
    /// [`Backend::bake_memory_file`] of the same `dir`), every file fsynced. The VM stays
    /// paused; the caller kills it.
    fn snapshot(&mut self, dir: &Path) -> Result<SnapshotRecord, BackendError>;
}

pub trait Backend: Send + Sync {
    fn kind(&self) -> BackendKind;
    /// How many filesystem slots ([`VolumeSlot`]) a VM with `disks` block devices can carry
    /// on this backend (a bake gives it all of them): the most volumes a restore of it can
    /// bind. 0 where the backend has no filesystem device.
    fn volume_slots(&self, disks: usize) -> usize;
    fn boot(&self, spec: &BootSpec) -> Result<Box<dyn Machine>, BackendError>;
    /// The RAM file a VM that will be snapshotted into `dir` boots with (in
    /// [`BootSpec::memory_file`]): QEMU keeps guest RAM there, written through, so its
    /// snapshot is only the device state; `None` where the snapshot writes RAM itself.
    fn bake_memory_file(&self, dir: &Path) -> Option<MemoryFile>;
    /// Checks the snapshot in `dir` against what [`Machine::snapshot`] recorded, without
    /// restoring it: files present, sizes, digests, format version. The error says what is
    /// wrong.
    fn verify_snapshot(
        &self,
        dir: &Path,
        record: &SnapshotRecord,
        memory_mib: u32,
    ) -> Result<(), BackendError>;
    /// Does everything a restore from the snapshot in `dir` needs that does not depend on
    /// its contents (start the monitor, open its control sockets). `spec` must describe
    /// the machine that was baked (devices, memory, vCPUs), `memory_file` unset: guest RAM
    /// is the snapshot's, mapped copy-on-write.
    fn prepare_restore(
        &self,
        spec: &BootSpec,
        dir: &Path,
    ) -> Result<Box<dyn PendingRestore>, BackendError>;

    /// Starts a VM from the snapshot in `dir`: [`Backend::prepare_restore`] then
    /// [`PendingRestore::resume`].
    fn restore(
        &self,
        spec: &BootSpec,
        dir: &Path,
    ) -> Result<(Box<dyn Machine>, RestoreTimings), BackendError> {
        self.prepare_restore(spec, dir)?.resume()
    }
}

/// A VM monitor waiting for a snapshot's state. Dropping it kills the monitor.
pub trait PendingRestore: Send {
    /// Loads the snapshot's state and runs the guest.
    fn resume(self: Box<Self>) -> Result<(Box<dyn Machine>, RestoreTimings), BackendError>;
    fn monitor_pid(&self) -> u32;
}

/// Last `max` bytes of a text file, for error messages (missing file: empty).
pub fn tail_of(path: &Path, max: usize) -> String {
    let bytes = std::fs::read(path).unwrap_or_default();
    let start = bytes.len().saturating_sub(max);
    String::from_utf8_lossy(&bytes[start..]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::AgentEndpoint;

    #[test]
    fn agent_endpoints_round_trip_through_text() {
        for e in [
            AgentEndpoint::Tcp(([127, 0, 0, 1], 4100).into()),
            AgentEndpoint::Vsock {
                uds: "/tmp/run:dir/vsock.sock".into(),
                port: 1024,
            },
        ] {
            assert_eq!(e.to_string().parse::<AgentEndpoint>(), Ok(e));
        }
        assert_eq!(
            "127.0.0.1:80".parse(),
            Ok(AgentEndpoint::Tcp(([127, 0, 0, 1], 80).into()))
        );
        for bad in ["vsock:x:/a", "vsock:5:", "vsock:5", "localhost"] {
            assert!(bad.parse::<AgentEndpoint>().is_err(), "{bad}");
        }
    }
}
