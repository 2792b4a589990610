//! The embedding API over snapshots: an [`Image`] is a baked snapshot; `start` restores a
//! VM from it.

use std::path::Path;
use std::sync::{Arc, OnceLock};

use crate::pool::{Pool, PooledVm};
use crate::snapshot::Snapshot;
use crate::Error;
use crate::{Access, OutputSink, Vm, Volume};

/// Per-VM settings for a restore.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct VmConfig {
    /// Must match the snapshot's when given (a restored VM keeps its baked size).
    pub memory_mib: Option<u32>,
    /// Must match the snapshot's when given.
    pub vcpus: Option<u32>,
    /// How long a restore may take before it fails.
    pub restore_timeout: std::time::Duration,
    /// Where the VM's sockets and logs go (default: the system temp dir).
    pub socket_dir: Option<std::path::PathBuf>,
    /// Host directories bound to the snapshot's volume slots ([`VmConfig::volume`]).
    pub volumes: Vec<Volume>,
}

impl Default for VmConfig {
    fn default() -> Self {
        Self {
            memory_mib: None,
            vcpus: None,
            restore_timeout: std::time::Duration::from_secs(30),
            socket_dir: None,
            volumes: Vec::new(),
        }
    }
}

impl VmConfig {
    /// Shows the host directory `host` at `guest` inside the VM (docker's `-v`): the
    /// directory must exist; `guest` must be absolute and not under /proc, /sys or /dev.
    pub fn volume(
        mut self,
        host: impl AsRef<Path>,
        guest: &str,
        access: Access,
    ) -> Result<Self, Error> {
        self.volumes.push(Volume::new(host, guest, access)?);
        Ok(self)
    }

    fn check(&self, snapshot: &Snapshot) -> Result<(), Error> {
        let m = &snapshot.meta;
        if self.memory_mib.is_some_and(|v| v != m.memory_mib)
            || self.vcpus.is_some_and(|v| v != m.vcpus)
        {
            return Err(Error::Image(supermachine_bake::BakeError::Layout {
                path: snapshot.dir.clone(),
                reason: format!(
                    "the snapshot was baked with {} MiB and {} vCPUs; a restore cannot change them (re-bake with `supermachine pull --memory/--vcpus`)",
                    m.memory_mib, m.vcpus
                ),
            }));
        }
        Ok(())
    }
}

#[derive(Clone)]
pub struct Image {
    snapshot: Snapshot,
    pool: Arc<OnceLock<Arc<Pool>>>,
}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Image")
            .field("snapshot", &self.snapshot.dir)
            .finish()
    }
}

impl Image {
    /// Opens a snapshot directory (verified: see `Snapshot::open`).
    pub fn from_snapshot(dir: impl AsRef<Path>) -> Result<Image, Error> {
        Ok(Image::from_opened(Snapshot::open(dir.as_ref())?))
    }

    /// An image for a snapshot already opened (and verified).
    fn from_opened(snapshot: Snapshot) -> Image {
        Image {
            snapshot,
            pool: Arc::new(OnceLock::new()),
        }
    }

    pub fn snapshot(&self) -> &Snapshot {
        &self.snapshot
    }

    /// The port the workload listens on.
    pub fn guest_port(&self) -> u16 {
        self.snapshot.meta.guest_port
    }

    /// A VM from this image's pool of prepared workers (one spare kept ready). The VM is
    /// discarded when the `PooledVm` drops.
    pub fn acquire(&self) -> Result<PooledVm, Error> {
        self.pool
            .get_or_init(|| Pool::new(self.snapshot.dir.clone(), 1))
            .acquire()
    }

    /// Restores a VM in this process (its VM monitor is still a separate process);
    /// its workload's output is discarded.
    pub fn start(&self, config: &VmConfig) -> Result<Vm, Error> {
        self.start_with_output(config, Box::new(|_, _| {}))
    }

    /// Restores a VM, sending its workload's output to `sink`.
    pub fn start_with_output(&self, config: &VmConfig, sink: OutputSink) -> Result<Vm, Error> {
        config.check(&self.snapshot)?;
        Vm::prepare_restore_in(
            &self.snapshot,
            config.socket_dir.as_deref(),
            &config.volumes,
        )?
        .resume_within(sink, config.restore_timeout)
    }
}

pub use supermachine_bake::PullPolicy;

impl Image {
    /// Bakes (or reuses) `reference` with default settings and [`PullPolicy::Missing`].
    pub fn from_oci(reference: &str) -> Result<Image, Error> {
        Image::builder(reference).build()
    }

    pub fn from_oci_with_policy(reference: &str, policy: PullPolicy) -> Result<Image, Error> {
        Image::builder(reference).pull_policy(policy).build()
    }

    pub fn builder(reference: &str) -> OciImageBuilder {
        OciImageBuilder {
            reference: reference.to_string(),
            name: None,
            pull: supermachine_bake::PullOptions::default(),
            memory_mib: 256,
            vcpus: 1,
            guest_port: 80,
            cmd: None,
            env: Vec::new(),
            snapshots_dir: None,
            ready_timeout: std::time::Duration::from_secs(120),
            backend: supermachine_backend::BackendChoice::from_env(),
        }
    }
}

/// Settings for baking an image into a snapshot (see [`Image::builder`]).
#[derive(Debug, Clone)]
pub struct OciImageBuilder {
    reference: String,
    name: Option<String>,
    pull: supermachine_bake::PullOptions,
    memory_mib: u32,
    vcpus: u32,
    guest_port: u16,
    cmd: Option<Vec<String>>,
    env: Vec<String>,
    snapshots_dir: Option<std::path::PathBuf>,
    ready_timeout: std::time::Duration,
    backend: supermachine_backend::BackendChoice,
}

impl OciImageBuilder {
    /// Snapshot name (default: derived from the reference).
    pub fn name(mut self, name: &str) -> Self {
        self.name = Some(name.to_string());
        self
    }

    /// Which backend bakes (and so restores) the snapshot; default: `SUPERMACHINE_BACKEND`,
    /// else auto (kvm only where /dev/kvm has hardware virtualization).
    pub fn backend(mut self, backend: supermachine_backend::BackendChoice) -> Self {
        self.backend = backend;
        self
    }

    pub fn pull_policy(mut self, policy: PullPolicy) -> Self {
        self.pull.policy = policy;
        self
    }

    /// Everything about reading the source at once: policy, platform, insecure
    /// registries, concurrent downloads.
    pub fn pull_options(mut self, options: supermachine_bake::PullOptions) -> Self {
        self.pull = options;
        self
    }

    pub fn memory_mib(mut self, mib: u32) -> Self {
        self.memory_mib = mib;
        self
    }

    pub fn vcpus(mut self, n: u32) -> Self {
        self.vcpus = n;
        self
    }

    /// The port the workload listens on; the snapshot is taken when it does.
    pub fn guest_port(mut self, port: u16) -> Self {
        self.guest_port = port;
        self
    }

    pub fn cmd<I: IntoIterator<Item = S>, S: Into<String>>(mut self, argv: I) -> Self {
        self.cmd = Some(argv.into_iter().map(Into::into).collect());
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push(format!("{key}={value}"));
        self
    }

    pub fn snapshots_dir(mut self, dir: impl Into<std::path::PathBuf>) -> Self {
        self.snapshots_dir = Some(dir.into());
        self
    }

    pub fn ready_timeout(mut self, t: std::time::Duration) -> Self {
        self.ready_timeout = t;
        self
    }

    /// Applies the pull policy: reuse, bake, or refuse.
    pub fn build(self) -> Result<Image, Error> {
        let root = self
            .snapshots_dir
            .clone()
            .unwrap_or_else(crate::snapshot::default_root);
        let name = self
            .name
            .clone()
            .unwrap_or_else(|| crate::pull::default_name(&self.reference));
        let mut boot = crate::BootRequest::new(crate::ImageRef::parse(&self.reference)?);
        boot.overrides.cmd = self.cmd;
        boot.overrides.env = self.env;
        boot.memory_mib = self.memory_mib;
        boot.vcpus = self.vcpus;
        boot.pull = self.pull;
        boot.backend = self.backend;
        let req = crate::PullRequest {
            boot,
            name,
            port: self.guest_port,
            ready_timeout: self.ready_timeout,
            snapshots_dir: root,
        };
        // pull() returns the snapshot opened and verified: no second open (which would
        // hash the kernel again).
        Ok(Image::from_opened(crate::pull::pull(&req)?.snapshot))
    }
}
