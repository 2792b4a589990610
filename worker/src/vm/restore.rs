//! Restoring a [`Vm`] from a baked snapshot, and taking one: the backend maps the
//! snapshot's RAM copy-on-write, then the guest gets a fresh clock and fresh entropy.

use std::time::{Duration, Instant, SystemTime};

use supermachine_backend::{tail_of, BootSpec, SnapshotRecord};
use supermachine_protocol::agent::AGENT_PORT;
use supermachine_protocol::{HostCommand, VolumeMount};

use super::{OutputSink, Phase, Vm, REFRESH_TIMEOUT};
use crate::boot::BootTimings;
use crate::run_dir::{new_run_dir, LiveRunDir};
use crate::snapshot::Snapshot;
use crate::{Error, Volume};

impl Vm {
    /// Restores a VM from a baked snapshot: guest RAM is the snapshot's file mapped
    /// copy-on-write, so nothing is copied and every clone shares unchanged pages. The
    /// guest gets fresh entropy and the current time before this returns.
    pub fn restore(snapshot: &Snapshot, sink: OutputSink) -> Result<Vm, Error> {
        Vm::prepare_restore(snapshot)?.resume(sink)
    }

    /// Does the restore work that does not depend on the snapshot's state: the VM monitor
    /// is started and waiting, so [`PreparedRestore::resume`] only loads and continues.
    pub fn prepare_restore(snapshot: &Snapshot) -> Result<PreparedRestore, Error> {
        Vm::prepare_restore_in(snapshot, None, &[])
    }

    /// [`Vm::prepare_restore`] with the VM's sockets and logs under `socket_dir`, and
    /// `volumes` bound to the snapshot's volume slots (mounted by init at resume).
    pub fn prepare_restore_in(
        snapshot: &Snapshot,
        socket_dir: Option<&std::path::Path>,
        volumes: &[Volume],
    ) -> Result<PreparedRestore, Error> {
        let meta = &snapshot.meta;
        crate::volume::check_all(volumes, meta.volume_slots, &meta.backend)?;
        let (run_dir, live) = new_run_dir(socket_dir)?;
        let spec = BootSpec {
            kernel: meta.kernel.path.clone(),
            initramfs: snapshot.initramfs_path(),
            extra_cmdline: meta.kernel_args.clone(),
            memory_mib: meta.memory_mib,
            vcpus: meta.vcpus,
            disks: super::layer_disks(
                &meta.run_config.layers,
                meta.layers.iter().map(|l| l.path.as_path()),
            )
            .map_err(|reason| Error::CacheInvalid {
                path: snapshot.dir.clone(),
                reason,
            })?,
            run_dir: run_dir.path().to_path_buf(),
            agent_port: Some(AGENT_PORT),
            memory_file: None,
            volumes: crate::volume::slots(volumes, meta.volume_slots),
        };
        let selected = supermachine_backend::select::for_kind(snapshot.backend_kind());
        let backend_name = selected.name;
        let pending = selected.backend.prepare_restore(&spec, &snapshot.dir)?;
        Ok(PreparedRestore {
            pending,
            backend_name,
            live,
            run_dir,
            volumes: crate::volume::mounts(volumes),
        })
    }

    /// Pauses the guest and writes the backend's snapshot files into `dir` (booted with
    /// `BootRequest::snapshot_dir` = `dir`), fsynced; returns the backend's record of them.
    /// The VM stays paused until killed.
    pub fn snapshot(&self, dir: &std::path::Path) -> Result<SnapshotRecord, Error> {
        let mut m = self
            .machine
            .lock()
            .map_err(|_| Error::Guest("machine lock poisoned".into()))?;
        Ok(m.snapshot(dir)?)
    }

    /// Fresh wall clock and entropy for a restored guest (through init, over the control
    /// channel: no network round trip), waiting for init's answer.
    fn refresh_guest(&self, volumes: Vec<VolumeMount>, timeout: Duration) -> Result<(), Error> {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        let mut entropy = vec![0u8; 64];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut entropy))
            .map_err(|e| Error::io("reading host entropy", e))?;
        self.send_command(&HostCommand::Refresh {
            unix_nanos: now.as_nanos(),
            entropy,
            volumes,
        })?;
        let (lock, cv) = &*self.state;
        let guard = lock
            .lock()
            .map_err(|_| Error::Guest("state lock poisoned".into()))?;
        let (guard, _) = cv
            .wait_timeout_while(guard, timeout, |s| {
                s.refreshed.is_none() && !matches!(s.phase, Phase::Failed(_))
            })
            .map_err(|_| Error::Guest("state lock poisoned".into()))?;
        match (&guard.refreshed, &guard.phase) {
            (Some(e), _) if e.is_empty() => Ok(()),
            (Some(e), _) => Err(Error::Guest(format!("refreshing the restored guest: {e}"))),
            (None, Phase::Failed(msg)) => {
                let msg = msg.clone();
                drop(guard);
                Err(self.crash_error(msg))
            }
            (None, _) => {
                drop(guard);
                // What the guest last printed (a lockup or RCU stall report, say) is the
                // best clue to why it went quiet.
                let m = self.machine.lock().unwrap_or_else(|p| p.into_inner());
                let console = tail_of(m.console_log(), 2000);
                drop(m);
                let console = console.trim();
                Err(Error::Guest(if console.is_empty() {
                    format!("the restored guest did not answer within {timeout:?}")
                } else {
                    format!(
                        "the restored guest did not answer within {timeout:?}; its console \
                         ends with:\n{console}"
                    )
                }))
            }
        }
    }
}

/// A VM monitor started and waiting for its snapshot (see [`Vm::prepare_restore`]).
pub struct PreparedRestore {
    pending: Box<dyn supermachine_backend::PendingRestore>,
    backend_name: String,
    live: LiveRunDir,
    run_dir: tempfile::TempDir,
    /// What init mounts at resume (the volumes bound to the slots).
    volumes: Vec<VolumeMount>,
}

impl PreparedRestore {
    /// The waiting monitor's host pid.
    pub fn monitor_pid(&self) -> u32 {
        self.pending.monitor_pid()
    }

    /// Loads the snapshot and runs the VM; returns once the guest has a fresh clock and
    /// fresh entropy.
    pub fn resume(self, sink: OutputSink) -> Result<Vm, Error> {
        self.resume_within(sink, REFRESH_TIMEOUT)
    }

    /// [`PreparedRestore::resume`], failing if the guest is not ready within `timeout`.
    pub fn resume_within(self, sink: OutputSink, timeout: Duration) -> Result<Vm, Error> {
        let started = Instant::now();
        let PreparedRestore {
            pending,
            backend_name,
            live,
            run_dir,
            volumes,
        } = self;
        let (machine, rt) = pending.resume()?;
        let timings = BootTimings {
            backend_start: rt.monitor_start,
            restore: Some(rt.load_and_resume),
            ..Default::default()
        };
        let vm = Vm::assemble(
            machine,
            backend_name,
            started,
            live,
            run_dir,
            timings,
            Phase::Running,
            Duration::from_secs(60),
            sink,
        )?;
        vm.refresh_guest(volumes, timeout.saturating_sub(started.elapsed()))?;
        if let Ok(mut s) = vm.state.0.lock() {
            s.timings.restore_total = Some(started.elapsed());
        }
        Ok(vm)
    }
}
