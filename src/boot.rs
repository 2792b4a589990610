//! Boot an image in a fresh VM and run its command to completion, streaming its output —
//! `supermachine boot`, the docker-run of this crate.

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use supermachine_backend::{
    qemu::QemuBackend, tail_of, Backend, BootSpec, Disk, Machine, MachineExit,
};
use supermachine_bake::{initramfs, Cache, ImageRef, Overrides};
use supermachine_protocol::{ExitStatus, FrameError, FrameReader, GuestEvent, OutputStream};

use crate::{guest_artifacts, Error};

/// Run directories of VMs in flight, so a signal handler can remove them before exiting.
static LIVE_RUN_DIRS: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

/// Removes the run directories of every VM this process is running. For signal handlers
/// that end the process (the VM monitors die with it).
pub fn remove_live_run_dirs() {
    if let Ok(dirs) = LIVE_RUN_DIRS.lock() {
        for d in dirs.iter() {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

struct LiveRunDir(PathBuf);

impl LiveRunDir {
    fn register(p: &std::path::Path) -> Self {
        if let Ok(mut dirs) = LIVE_RUN_DIRS.lock() {
            dirs.push(p.to_path_buf());
        }
        Self(p.to_path_buf())
    }
}

impl Drop for LiveRunDir {
    fn drop(&mut self) {
        if let Ok(mut dirs) = LIVE_RUN_DIRS.lock() {
            dirs.retain(|d| d != &self.0);
        }
    }
}

/// How long a VM may take to power off after the workload exited.
const POWEROFF_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct BootRequest {
    pub image: ImageRef,
    pub overrides: Overrides,
    pub memory_mib: u32,
    pub vcpus: u32,
    /// Guest kernel; default: see [`guest_artifacts::find_kernel`].
    pub kernel: Option<PathBuf>,
    /// Guest init binary; default: see [`guest_artifacts::find_init`].
    pub init: Option<PathBuf>,
    /// Appended to the guest kernel's command line.
    pub kernel_args: Vec<String>,
    /// How long the guest may take to start init before the boot counts as failed.
    pub boot_timeout: Duration,
    pub cache: Cache,
}

impl BootRequest {
    pub fn new(image: ImageRef) -> Self {
        Self {
            image,
            overrides: Overrides::default(),
            memory_mib: 256,
            vcpus: 1,
            kernel: None,
            init: None,
            kernel_args: Vec::new(),
            boot_timeout: Duration::from_secs(60),
            cache: Cache::new(Cache::default_root()),
        }
    }
}

/// Host-side milestones of one boot.
#[derive(Debug, Clone, Default)]
pub struct BootTimings {
    /// Image resolution, blob verification, layer conversion (a cache hit is quick).
    pub prepare: Duration,
    /// Backend asked to boot -> VM monitor running.
    pub backend_start: Duration,
    /// Monitor running -> init's first message (the guest kernel's boot).
    pub kernel: Option<Duration>,
    /// init started -> workload process started (layers, overlay, chroot).
    pub init: Option<Duration>,
    /// Workload started -> workload exited.
    pub workload: Option<Duration>,
    /// Guest uptime reported by init when it started.
    pub guest_uptime_at_init_ms: Option<u64>,
    pub total: Duration,
}

#[derive(Debug, Clone)]
pub struct BootReport {
    pub status: ExitStatus,
    pub timings: BootTimings,
    pub backend: String,
}

/// Boots `req.image`, runs its command, writes its output to `stdout`/`stderr` as it comes,
/// and returns its exit status. The VM is gone when this returns.
pub fn run(
    req: &BootRequest,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
) -> Result<BootReport, Error> {
    let started = Instant::now();
    let kernel = guest_artifacts::find_kernel(req.kernel.as_deref(), req.cache.root())?;
    let init_path = guest_artifacts::find_init(req.init.as_deref())?;
    let init = std::fs::read(&init_path)
        .map_err(|e| Error::io(format!("reading {}", init_path.display()), e))?;

    let prepared = supermachine_bake::prepare(&req.image, &req.overrides, &req.cache)?;
    let mut timings = BootTimings {
        prepare: started.elapsed(),
        ..Default::default()
    };

    let run_dir = tempfile::Builder::new()
        .prefix("supermachine-")
        .tempdir()
        .map_err(|e| Error::io("creating a run directory", e))?;
    let _live = LiveRunDir::register(run_dir.path());
    let initramfs_path = run_dir.path().join("initramfs.cpio");
    let file = std::fs::File::create(&initramfs_path)
        .map_err(|e| Error::io(format!("creating {}", initramfs_path.display()), e))?;
    initramfs::write(std::io::BufWriter::new(file), &init, &prepared.run_config)
        .and_then(|mut w| w.flush())
        .map_err(|e| Error::io("writing the initramfs", e))?;

    let spec = BootSpec {
        kernel,
        initramfs: initramfs_path,
        extra_cmdline: req.kernel_args.clone(),
        memory_mib: req.memory_mib,
        vcpus: req.vcpus,
        disks: prepared
            .run_config
            .layers
            .iter()
            .zip(&prepared.layers)
            .map(|(m, (path, _))| Disk {
                path: path.clone(),
                serial: m.serial.clone(),
                read_only: true,
            })
            .collect(),
        run_dir: run_dir.path().to_path_buf(),
    };
    let backend = QemuBackend::new();
    let backend_name = format!("qemu ({})", backend.accel());
    let mut machine = backend.boot(&spec)?;
    let t = machine.timings();
    timings.backend_start = t.monitor_ready - t.requested;

    let status = supervise(
        machine.as_mut(),
        req.boot_timeout,
        &mut timings,
        stdout,
        stderr,
    );
    let _ = machine.kill();
    timings.total = started.elapsed();
    let status = status?;
    Ok(BootReport {
        status,
        timings,
        backend: backend_name,
    })
}

/// Follows the guest's events until the workload's exit, then waits for the VM to stop.
fn supervise(
    machine: &mut dyn Machine,
    boot_timeout: Duration,
    timings: &mut BootTimings,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
) -> Result<ExitStatus, Error> {
    let monitor_ready = machine.timings().monitor_ready;
    let channel = machine
        .take_channel()
        .ok_or_else(|| Error::Guest("the VM has no control channel".into()))?;
    // Until init speaks, a silent guest is a hung boot; after that the workload may take
    // as long as it likes.
    channel
        .set_read_timeout(Some(boot_timeout))
        .map_err(|e| Error::io("setting the boot timeout", e))?;
    let mut frames = FrameReader::new(channel);
    let (mut t_init, mut t_workload) = (None, None);
    let crashed = |machine: &mut dyn Machine, reason: String| {
        // Let the monitor finish writing the console before reading it.
        let _ = machine.wait_timeout(Duration::from_secs(2));
        let console = tail_of(machine.console_log(), 4000);
        let reason = if console.contains("Kernel panic") {
            format!("guest kernel panic ({reason})")
        } else {
            reason
        };
        Error::GuestCrashed { reason, console }
    };
    loop {
        let event = match frames.read::<GuestEvent>() {
            Ok(Some(ev)) => ev,
            Ok(None) => {
                return Err(crashed(
                    machine,
                    "the guest closed its control channel".into(),
                ))
            }
            Err(FrameError::Io(e))
                if t_init.is_none()
                    && matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
            {
                let _ = machine.kill();
                let reason = format!("the guest did not start init within {boot_timeout:?}");
                return Err(crashed(machine, reason));
            }
            Err(e) => {
                let _ = machine.kill();
                return Err(crashed(machine, format!("bad message from the guest: {e}")));
            }
        };
        let now = Instant::now();
        match event {
            GuestEvent::InitStarted { uptime_ms } => {
                t_init = Some(now);
                frames
                    .get_ref()
                    .set_read_timeout(None)
                    .map_err(|e| Error::io("clearing the boot timeout", e))?;
                timings.kernel = Some(now - monitor_ready);
                timings.guest_uptime_at_init_ms = Some(uptime_ms);
            }
            GuestEvent::WorkloadStarted { .. } => {
                t_workload = Some(now);
                timings.init = t_init.map(|t| now - t);
            }
            GuestEvent::Output { stream, data } => {
                let sink: &mut dyn Write = match stream {
                    OutputStream::Stdout => stdout,
                    OutputStream::Stderr => stderr,
                };
                // A closed terminal must not kill the VM's supervision.
                let _ = sink.write_all(&data).and_then(|_| sink.flush());
            }
            GuestEvent::Exited { status, .. } => {
                timings.workload = t_workload.map(|t| now - t);
                match machine.wait_timeout(POWEROFF_GRACE)? {
                    Some(MachineExit::GuestStopped) | None => {}
                    Some(MachineExit::MonitorDied { detail }) => {
                        tracing::warn!(%detail, "VM monitor ended abnormally after the workload exited")
                    }
                }
                return Ok(status);
            }
            GuestEvent::Fatal { message } => {
                let _ = machine.wait_timeout(POWEROFF_GRACE);
                return Err(Error::Guest(message));
            }
        }
    }
}
