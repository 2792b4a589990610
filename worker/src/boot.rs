//! What a boot is asked for ([`BootRequest`]), what it reads, resolved once
//! ([`BootInputs`]), what it reports ([`BootTimings`], [`BootReport`]) and where the
//! workload's output goes ([`OutputSink`]). [`crate::Vm`] does the booting.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use supermachine_bake::{Cache, ImageRef, Overrides, PullOptions};
use supermachine_protocol::{ExitStatus, OutputStream};

use crate::{guest_artifacts, Error};

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
    /// The directory this VM will be snapshotted into ([`crate::Vm::snapshot`]); the
    /// backend may keep guest RAM there from the start (QEMU's shared RAM file).
    pub snapshot_dir: Option<PathBuf>,
    pub cache: Cache,
    /// Pull policy, platform and registry settings for reading the image's source.
    pub pull: PullOptions,
    /// Which backend boots the VM (default: `SUPERMACHINE_BACKEND`, else auto).
    pub backend: supermachine_backend::BackendChoice,
    /// Host directories mounted before the workload starts (none for a bake: its
    /// snapshot gets the backend's unbound slots, bound at restore).
    pub volumes: Vec<crate::Volume>,
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
            snapshot_dir: None,
            cache: Cache::new(Cache::default_root()),
            pull: PullOptions::default(),
            backend: supermachine_backend::BackendChoice::from_env(),
            volumes: Vec::new(),
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
    /// Restores only: loading the state and resuming the guest.
    pub restore: Option<Duration>,
    /// Restores only: the whole restore, hygiene (entropy, clock) included.
    pub restore_total: Option<Duration>,
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

/// Receives the workload's output as it arrives.
pub type OutputSink = Box<dyn FnMut(OutputStream, &[u8]) + Send>;

/// An output sink writing to two streams; a closed terminal must not stop the VM.
pub fn output_sink(
    mut stdout: Box<dyn Write + Send>,
    mut stderr: Box<dyn Write + Send>,
) -> OutputSink {
    Box::new(move |stream, data| {
        let w: &mut dyn Write = match stream {
            OutputStream::Stdout => &mut stdout,
            OutputStream::Stderr => &mut stderr,
        };
        let _ = w.write_all(data).and_then(|_| w.flush());
    })
}

/// What a boot reads before a VM starts, resolved once: the guest kernel, init and agent,
/// and the image (manifest resolved, layers converted, config merged with the overrides).
pub struct BootInputs {
    pub kernel: std::path::PathBuf,
    pub init: Vec<u8>,
    /// The guest agent, when it is found next to init.
    pub shim: Option<Vec<u8>>,
    pub prepared: supermachine_bake::PreparedImage,
}

impl BootInputs {
    pub fn resolve(req: &BootRequest) -> Result<BootInputs, Error> {
        let kernel = guest_artifacts::find_kernel(req.kernel.as_deref(), req.cache.root())?;
        let init_path = guest_artifacts::find_init(req.init.as_deref())?;
        let init = std::fs::read(&init_path)
            .map_err(|e| Error::io(format!("reading {}", init_path.display()), e))?;
        let shim = guest_artifacts::find_shim(&init_path)
            .map(|p| {
                std::fs::read(&p).map_err(|e| Error::io(format!("reading {}", p.display()), e))
            })
            .transpose()?;
        let prepared =
            supermachine_bake::prepare(&req.image, &req.overrides, &req.cache, &req.pull)?;
        Ok(BootInputs {
            kernel,
            init,
            shim,
            prepared,
        })
    }
}
