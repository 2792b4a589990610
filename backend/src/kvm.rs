//! The kvm backend: our own VMM (`supermachine-vmm`) in this process — one VM per process,
//! as the worker model wants. A thread per VM owns the [`MicroVm`] and runs its event loop;
//! the [`KvmMachine`] handle talks to it through a command channel and the VM's waker.
//!
//! Channels: the console is a file in the run dir; the control channel is the second UART
//! (ttyS1), bridged to one end of a socket pair whose other end is the host's
//! [`ControlChannel`]; the agent is a guest vsock port reached through the VM's vsock unix
//! socket (`CONNECT <port>\n`). A snapshot is one `restore.snap` holding state and RAM; a
//! restore maps it copy-on-write into a VM prepared before the snapshot was named.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use supermachine_vmm::builder::{PreparedVm, RestoreLayout};
use supermachine_vmm::devices::virtio::vsock::GUEST_CID;
use supermachine_vmm::{BlockConfig, ExitReason, FsConfig, MicroVm, MicroVmConfig, VsockConfig};
use vmm_sys_util::eventfd::EventFd;

use crate::files;
use crate::{
    AgentEndpoint, Backend, BackendError, BackendKind, BootSpec, ControlChannel, Machine,
    MachineExit, MemoryFile, PendingRestore, RestoreTimings, SnapshotRecord, StartTimings,
};

/// Base kernel command line: console on ttyS0 (quiet), reset through the i8042 (the VMM's
/// clean exit), reboot at once on panic so a crashed guest never hangs.
pub const BASE_CMDLINE: &str =
    "console=ttyS0 quiet reboot=k panic=-1 oops=panic i8042.noaux tsc=reliable";

/// The control channel is the second UART.
const CONTROL_UART: usize = 1;

#[derive(Debug, Clone, Default)]
pub struct KvmBackend;

impl KvmBackend {
    pub fn new() -> Self {
        Self
    }
}

struct RunPaths {
    console: PathBuf,
    vsock: PathBuf,
}

impl RunPaths {
    fn new(dir: &Path) -> Self {
        Self {
            console: dir.join("console.log"),
            vsock: dir.join("vsock.sock"),
        }
    }
}

/// The kvm backend's snapshot: state and RAM in one file, RAM page-aligned so it is mapped
/// in place (its header and state carry their own checksum, checked at every restore).
pub const SNAPSHOT_FILE: &str = "restore.snap";

/// The VMM counts vCPUs in a u8; its own check gives the range.
fn vcpus_of(spec: &BootSpec) -> Result<u8, BackendError> {
    supermachine_vmm::builder::check_vcpus(spec.vcpus).map_err(BackendError::Boot)
}

/// What a VM thread starts from: the console file (ttyS0), the VMM's end of the control
/// channel as ttyS1's output and its input, and the host's end.
struct Io {
    console: std::fs::File,
    com2: Box<dyn std::io::Write + Send>,
    control_vmm: UnixStream,
    /// Another handle on the VMM's end, for the VM thread's stop (see `VmThread`).
    stop_handle: UnixStream,
    control_host: UnixStream,
}

impl Io {
    fn new(paths: &RunPaths) -> Result<Self, BackendError> {
        let console = std::fs::File::create(&paths.console)
            .map_err(|e| BackendError::io(format!("creating {}", paths.console.display()), e))?;
        let (control_host, control_vmm) =
            UnixStream::pair().map_err(|e| BackendError::io("control channel socket pair", e))?;
        let dup = || {
            control_vmm
                .try_clone()
                .map_err(|e| BackendError::io("duplicating the control channel", e))
        };
        Ok(Self {
            console,
            com2: Box::new(dup()?),
            stop_handle: dup()?,
            control_vmm,
            control_host,
        })
    }
}

/// The agent's vsock port behind the VM's socket.
fn agent_endpoint(spec: &BootSpec, paths: &RunPaths) -> Option<AgentEndpoint> {
    spec.agent_port.map(|port| AgentEndpoint::Vsock {
        uds: paths.vsock.clone(),
        port: u32::from(port),
    })
}

/// Tells whoever waits how building the VM on its thread went (`ok()` on success), then
/// finishes it: what the host writes to the control channel now reaches the guest's ttyS1.
///
/// The reply goes first. The vCPUs already run, and one writing to ttyS1 holds the UART
/// while it blocks on a full control socket; attaching the input takes the UART too, so
/// attaching before replying deadlocked a guest that floods ttyS1 before the host (still
/// waiting for this reply) reads a byte. Host bytes written meanwhile wait in the socket.
fn report_built<T>(
    built: Result<MicroVm, String>,
    control_vmm: UnixStream,
    reply: &Sender<Result<T, String>>,
    ok: impl FnOnce() -> T,
) -> Option<MicroVm> {
    let mut vm = match built {
        Ok(vm) => vm,
        Err(e) => {
            let _ = reply.send(Err(e));
            return None;
        }
    };
    let _ = reply.send(Ok(ok()));
    match vm.attach_serial_input(CONTROL_UART, control_vmm) {
        Ok(()) => Some(vm),
        Err(e) => {
            // The machine then ends as "not started"; say why.
            tracing::error!(error = %e, "attaching the control channel's input");
            None
        }
    }
}

/// Filesystem slots a VM baked on kvm carries at most (as on QEMU).
pub const VOLUME_SLOTS: usize = 4;

/// The virtio-9p devices for a spec's volume slots: slot N is tag `smvol<N>`, exporting its
/// host directory (unbound slots export nothing; the guest never mounts them).
fn filesystems(spec: &BootSpec) -> Vec<FsConfig> {
    spec.volumes
        .iter()
        .enumerate()
        .map(|(i, v)| FsConfig {
            tag: format!("{}{i}", supermachine_protocol::VOLUME_TAG_PREFIX),
            root: v.host.clone(),
            read_only: v.read_only || v.host.is_none(),
        })
        .collect()
}

impl Backend for KvmBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Kvm
    }

    /// Each device takes a virtio-mmio slot and an IRQ: the disks, vsock, then volumes.
    fn volume_slots(&self, disks: usize) -> usize {
        VOLUME_SLOTS.min(supermachine_vmm::MAX_MMIO_DEVICES.saturating_sub(disks + 1))
    }

    fn boot(&self, spec: &BootSpec) -> Result<Box<dyn Machine>, BackendError> {
        let requested = Instant::now();
        spec.check_files()?;
        let paths = RunPaths::new(&spec.run_dir);
        let config = MicroVmConfig {
            kernel: spec.kernel.clone(),
            cmdline: spec.cmdline(BASE_CMDLINE),
            initrd: Some(spec.initramfs.clone()),
            memory_mib: spec.memory_mib,
            vcpus: vcpus_of(spec)?,
            blocks: spec
                .disks
                .iter()
                .map(|d| BlockConfig {
                    path: d.path.clone(),
                    serial: d.serial.clone(),
                })
                .collect(),
            vsock: spec.agent_port.map(|_| VsockConfig {
                cid: GUEST_CID,
                uds_path: paths.vsock.clone(),
            }),
            filesystems: filesystems(spec),
        };
        let Io {
            console,
            com2,
            control_vmm,
            stop_handle,
            control_host,
        } = Io::new(&paths)?;
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread = VmThread::spawn(stop_handle, ready_tx, move |ready| {
            let built = MicroVm::boot(&config, Box::new(console), com2);
            report_built(built.map_err(|e| e.to_string()), control_vmm, ready, || ())
        })?;
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(BackendError::Boot(e)),
            Err(_) => {
                return Err(BackendError::Boot(
                    "the VM thread died while booting".into(),
                ))
            }
        }
        Ok(Box::new(KvmMachine {
            thread: Some(thread),
            channel: Some(Box::new(control_host)),
            agent: agent_endpoint(spec, &paths),
            memory_mib: spec.memory_mib,
            console: paths.console,
            timings: StartTimings {
                requested,
                monitor_ready: Instant::now(),
            },
        }))
    }

    /// None: the snapshot writes guest RAM into `restore.snap` itself.
    fn bake_memory_file(&self, _dir: &Path) -> Option<MemoryFile> {
        None
    }

    /// Size as recorded, then the file's own header, format version, VMM build, sizes and
    /// state checksum (RAM is not hashed: 128 MiB+ on every open).
    fn verify_snapshot(
        &self,
        dir: &Path,
        record: &SnapshotRecord,
        _memory_mib: u32,
    ) -> Result<(), BackendError> {
        let path = dir.join(SNAPSHOT_FILE);
        files::check_size(&path, record.state_size)?;
        supermachine_vmm::snapshot::format::verify_snapshot(&path)
            .map_err(|e| BackendError::InvalidSnapshot(format!("{SNAPSHOT_FILE}: {e}")))
    }

    fn prepare_restore(
        &self,
        spec: &BootSpec,
        dir: &Path,
    ) -> Result<Box<dyn PendingRestore>, BackendError> {
        let started = Instant::now();
        spec.check_files()?;
        let filesystems = filesystems(spec);
        let snapshot = dir.join(SNAPSHOT_FILE);
        let layout = RestoreLayout::of(&snapshot)
            .map_err(|e| BackendError::Restore(format!("{}: {e}", snapshot.display())))?;
        let paths = RunPaths::new(&spec.run_dir);
        let vsock = paths.vsock.clone();
        let Io {
            console,
            com2,
            control_vmm,
            stop_handle,
            control_host,
        } = Io::new(&paths)?;
        let (resume_tx, resume_rx) = mpsc::channel::<(PathBuf, Sender<ResumeResult>)>();
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread = VmThread::spawn(stop_handle, ready_tx, move |ready| {
            let uds = layout.vsock.then_some(vsock.as_path());
            let prepared = match PreparedVm::for_layout(&layout, uds) {
                Ok(p) => p,
                Err(e) => {
                    let _ = ready.send(Err(e.to_string()));
                    return None;
                }
            };
            let _ = ready.send(Ok(()));
            // Dropping the pending restore closes the channel: the prepared VM goes.
            let (path, reply) = resume_rx.recv().ok()?;
            let loading = Instant::now();
            let built = MicroVm::restore(
                &path,
                Some(prepared),
                Box::new(console),
                com2,
                uds,
                &filesystems,
            );
            let built = built.map(|(vm, _)| vm).map_err(|e| e.to_string());
            report_built(built, control_vmm, &reply, || loading.elapsed())
        })?;
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(BackendError::Restore(format!("preparing the VM: {e}"))),
            Err(_) => return Err(BackendError::Restore("the VM thread died".into())),
        }
        Ok(Box::new(KvmPendingRestore {
            thread,
            snapshot,
            memory_mib: spec.memory_mib,
            resume: resume_tx,
            channel: Box::new(control_host),
            agent: agent_endpoint(spec, &paths),
            console: paths.console,
            monitor_start: started.elapsed(),
        }))
    }
}

type ResumeResult = Result<Duration, String>;

struct KvmPendingRestore {
    /// Dropped before `thread` (fields drop in order): the thread waiting on it then ends.
    resume: Sender<(PathBuf, Sender<ResumeResult>)>,
    thread: VmThread,
    /// The `restore.snap` the prepared VM was laid out for.
    snapshot: PathBuf,
    memory_mib: u32,
    channel: Box<dyn ControlChannel>,
    console: PathBuf,
    agent: Option<AgentEndpoint>,
    monitor_start: Duration,
}

impl PendingRestore for KvmPendingRestore {
    fn resume(self: Box<Self>) -> Result<(Box<dyn Machine>, RestoreTimings), BackendError> {
        let requested = Instant::now();
        let (reply_tx, reply_rx) = mpsc::channel();
        let _ = self.resume.send((self.snapshot.clone(), reply_tx));
        let load_and_resume = match reply_rx.recv() {
            Ok(Ok(d)) => d,
            Ok(Err(e)) => return Err(BackendError::Restore(e)),
            Err(_) => return Err(BackendError::Restore("the VM thread died".into())),
        };
        let machine = KvmMachine {
            thread: Some(self.thread),
            channel: Some(self.channel),
            console: self.console,
            timings: StartTimings {
                requested,
                monitor_ready: Instant::now(),
            },
            agent: self.agent,
            memory_mib: self.memory_mib,
        };
        Ok((
            Box::new(machine),
            RestoreTimings {
                monitor_start: self.monitor_start,
                load_and_resume,
            },
        ))
    }

    fn monitor_pid(&self) -> u32 {
        std::process::id()
    }
}

enum Command {
    Snapshot(PathBuf, Sender<Result<(), String>>),
    Stop,
}

/// How a VM thread ended, shared with the handle.
type Ended = Arc<(Mutex<Option<MachineExit>>, Condvar)>;

/// The thread that owns one VM: builds it (`build`), then runs its event loop, obeying
/// commands, until the guest stops or the handle stops it.
struct VmThread {
    join: Option<std::thread::JoinHandle<()>>,
    commands: Sender<Command>,
    /// Set once the VM is built.
    waker: Arc<Mutex<Option<EventFd>>>,
    ended: Ended,
    /// The VMM's end of the control channel: shut down on stop, so a vCPU blocked writing
    /// ttyS1 to a host that stopped reading (a guest flooding it) gets an error and can
    /// obey the stop.
    control: UnixStream,
}

impl VmThread {
    fn spawn<R: Send + 'static>(
        control: UnixStream,
        ready: Sender<R>,
        build: impl FnOnce(&Sender<R>) -> Option<MicroVm> + Send + 'static,
    ) -> Result<Self, BackendError> {
        let (commands, rx) = mpsc::channel();
        let ended: Ended = Arc::new((Mutex::new(None), Condvar::new()));
        let waker = Arc::new(Mutex::new(None));
        let (e, w) = (ended.clone(), waker.clone());
        let at_end = control
            .try_clone()
            .map_err(|e| BackendError::io("duplicating the control channel", e))?;
        let join = std::thread::Builder::new()
            .name("vmm".into())
            .spawn(move || {
                let exit = match build(&ready) {
                    Some(vm) => run_vm(vm, &rx, &w),
                    None => MachineExit::MonitorDied {
                        detail: "the VM was not started".into(),
                    },
                };
                // The host reads end-of-file once the VM is gone (handles on the VMM's
                // end outlive the VM: shut the socket, not just this descriptor).
                let _ = at_end.shutdown(std::net::Shutdown::Both);
                let (lock, cv) = &*e;
                *lock.lock().unwrap_or_else(|p| p.into_inner()) = Some(exit);
                cv.notify_all();
            })
            .map_err(|e| BackendError::io("spawning the VM thread", e))?;
        Ok(Self {
            join: Some(join),
            commands,
            waker,
            ended,
            control,
        })
    }

    fn send(&self, cmd: Command) {
        let _ = self.commands.send(cmd);
        if let Some(w) = self
            .waker
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            let _ = w.write(1);
        }
    }

    fn wait_timeout(&self, timeout: Duration) -> Option<MachineExit> {
        let (lock, cv) = &*self.ended;
        let guard = lock.lock().unwrap_or_else(|p| p.into_inner());
        let (guard, _) = cv
            .wait_timeout_while(guard, timeout, |e| e.is_none())
            .unwrap_or_else(|p| p.into_inner());
        guard.clone()
    }

    fn stop(&mut self) {
        self.send(Command::Stop);
        let _ = self.control.shutdown(std::net::Shutdown::Both);
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
    }
}

impl Drop for VmThread {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run_vm(
    mut vm: MicroVm,
    commands: &Receiver<Command>,
    waker: &Mutex<Option<EventFd>>,
) -> MachineExit {
    // The loop talks to the guest from here on: narrowed first (the VM is built and its
    // vCPU threads started, so nothing below spawns a thread or creates a KVM object).
    if let Err(e) = supermachine_vmm::thread_filter::apply(
        supermachine_vmm::thread_filter::ThreadKind::EventLoop,
    ) {
        return MachineExit::MonitorDied { detail: e };
    }
    match vm.waker() {
        Ok(w) => *waker.lock().unwrap_or_else(|p| p.into_inner()) = Some(w),
        Err(e) => {
            return MachineExit::MonitorDied {
                detail: e.to_string(),
            }
        }
    }
    loop {
        while let Ok(cmd) = commands.try_recv() {
            match cmd {
                Command::Snapshot(path, reply) => {
                    let r = vm.pause_and_snapshot(&path).map(|_| ());
                    let _ = reply.send(r.map_err(|e| e.to_string()));
                }
                Command::Stop => {
                    return MachineExit::MonitorDied {
                        detail: "killed".into(),
                    }
                }
            }
        }
        match vm.run(None) {
            Ok(None) => {}
            Ok(Some(ExitReason::Reset)) => return MachineExit::GuestStopped,
            Ok(Some(ExitReason::GuestPanic)) => {
                return MachineExit::MonitorDied {
                    detail: "guest kernel panic".into(),
                }
            }
            Ok(Some(ExitReason::TripleFault)) => {
                return MachineExit::MonitorDied {
                    detail: "the guest triple-faulted".into(),
                }
            }
            Ok(Some(ExitReason::Failed(why))) => {
                return MachineExit::MonitorDied {
                    detail: format!("KVM: {why}"),
                }
            }
            Err(e) => {
                return MachineExit::MonitorDied {
                    detail: format!("VMM: {e}"),
                }
            }
        }
    }
}

pub struct KvmMachine {
    thread: Option<VmThread>,
    channel: Option<Box<dyn ControlChannel>>,
    console: PathBuf,
    timings: StartTimings,
    agent: Option<AgentEndpoint>,
    memory_mib: u32,
}

impl Machine for KvmMachine {
    fn kind(&self) -> BackendKind {
        BackendKind::Kvm
    }

    fn take_channel(&mut self) -> Option<Box<dyn ControlChannel>> {
        self.channel.take()
    }

    fn console_log(&self) -> &Path {
        &self.console
    }

    fn timings(&self) -> StartTimings {
        self.timings
    }

    fn agent_endpoint(&self) -> Option<AgentEndpoint> {
        self.agent.clone()
    }

    /// The VM runs in this process.
    fn pid(&self) -> u32 {
        std::process::id()
    }

    fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<MachineExit>, BackendError> {
        Ok(match &self.thread {
            Some(t) => t.wait_timeout(timeout),
            None => Some(MachineExit::MonitorDied {
                detail: "already stopped".into(),
            }),
        })
    }

    fn kill(&mut self) -> Result<(), BackendError> {
        if let Some(mut t) = self.thread.take() {
            t.stop();
        }
        Ok(())
    }

    /// Writes the whole snapshot — state and RAM — to `dir`'s `restore.snap` (temp file,
    /// fsync, rename). The VM stays paused.
    fn snapshot(&mut self, dir: &Path) -> Result<SnapshotRecord, BackendError> {
        let path = dir.join(SNAPSHOT_FILE);
        let t = self
            .thread
            .as_ref()
            .ok_or_else(|| BackendError::Snapshot("the VM is stopped".into()))?;
        let (tx, rx) = mpsc::channel();
        t.send(Command::Snapshot(path.clone(), tx));
        match rx.recv() {
            Ok(r) => r.map_err(BackendError::Snapshot)?,
            Err(_) => {
                return Err(BackendError::Snapshot(
                    "the VM stopped before its snapshot".into(),
                ))
            }
        }
        Ok(SnapshotRecord {
            state_sha256: String::new(),
            state_size: files::size_of(&path)?,
            memory_size: u64::from(self.memory_mib) << 20,
        })
    }
}

impl Drop for KvmMachine {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}
