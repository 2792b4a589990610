//! Baking: boot an image once, wait until its workload listens on its port, snapshot it.
//! The same inputs again are a cache hit (no boot).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};
use supermachine_backend::BackendKind;

use sha2::Digest as _;

use crate::boot::BootRequest;
use crate::snapshot::{self, FileRecord, LayerRecord, Metadata, Snapshot, FORMAT_VERSION};
use crate::{Error, PullPolicy};
use supermachine_worker::{BootInputs, Vm};

#[derive(Debug, Clone)]
pub struct PullRequest {
    /// Image, overrides, memory, vCPUs, kernel, init, cache.
    pub boot: BootRequest,
    /// Snapshot name (a directory under `snapshots_dir`).
    pub name: String,
    /// The port the workload listens on; the snapshot is taken the moment it does.
    pub port: u16,
    pub ready_timeout: Duration,
    pub snapshots_dir: PathBuf,
}

/// What `pull` did.
#[derive(Debug, Clone)]
pub struct PullOutcome {
    pub snapshot: Snapshot,
    /// True when an existing snapshot with the same inputs was reused.
    pub cached: bool,
}

/// A name for an image reference: the layout dir's name plus the tag.
pub fn default_name(reference: &str) -> String {
    let r = reference
        .trim_start_matches("oci-layout:")
        .trim_start_matches("oci-archive:")
        .trim_end_matches('/');
    let r = r.split('@').next().unwrap_or(r);
    let last = r.rsplit('/').next().unwrap_or(r);
    let last = last.replacen(".tar", "", 1);
    last.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .collect()
}

fn file_record(path: &Path) -> Result<FileRecord, Error> {
    let size = std::fs::metadata(path)
        .map_err(|e| Error::io(format!("reading {}", path.display()), e))?
        .len();
    let sha256 = snapshot::sha256_file(path)
        .map_err(|e| Error::io(format!("hashing {}", path.display()), e))?;
    Ok(FileRecord {
        path: path.to_path_buf(),
        size,
        sha256,
    })
}

/// Bakes `req` under its pull policy (`req.boot.pull.policy`): `Never` only opens the
/// existing snapshot (none: `CacheMiss`, broken: `CacheInvalid`); `Missing` reuses a valid
/// one without reading the source; `Always` re-resolves the source and re-bakes only if
/// what it resolved to (or any other input) changed.
pub fn pull(req: &PullRequest) -> Result<PullOutcome, Error> {
    let dest = req.snapshots_dir.join(&req.name);
    // Decided once: the snapshot records the backend, which restores it.
    let kind = supermachine_backend::select::select(req.boot.backend)?.kind();
    match req.boot.pull.policy {
        PullPolicy::Never => {
            return Ok(PullOutcome {
                snapshot: Snapshot::open(&dest)?,
                cached: true,
            });
        }
        PullPolicy::Missing => {
            if let Ok(snapshot) = Snapshot::open(&dest) {
                if snapshot.backend_kind() == kind {
                    return Ok(PullOutcome {
                        snapshot,
                        cached: true,
                    });
                }
            }
        }
        PullPolicy::Always => {}
    }
    let b = &req.boot;
    // Resolved once: what is hashed below is what boots (a tag that moves meanwhile cannot
    // bake one image under another's inputs, and the registry is asked once).
    let started = std::time::Instant::now();
    let resolved = BootInputs::resolve(b)?;
    let Some(shim) = &resolved.shim else {
        return Err(Error::Bake(
            "the guest agent (supermachine-shim) was not found next to init".into(),
        ));
    };
    let prepared = resolved.prepared.clone();
    let kernel_rec = file_record(&resolved.kernel)?;

    // Everything that shapes the snapshot goes into the inputs hash.
    let mut h = sha2::Sha256::new();
    h.update(FORMAT_VERSION.to_le_bytes());
    h.update(prepared.manifest_digest.to_string());
    h.update(prepared.run_config.to_json());
    h.update(format!(
        "{}|{}|{}|{:?}",
        b.memory_mib, b.vcpus, req.port, b.kernel_args
    ));
    h.update(&kernel_rec.sha256);
    // (Only kvm is hashed, so the inputs of snapshots baked before backends were recorded
    // stay valid.)
    if kind == BackendKind::Kvm {
        h.update("backend=kvm");
    }
    // The VM is baked with the backend's unbound volume slots (restores bind them).
    let volume_slots = supermachine_backend::select::for_kind(kind)
        .backend
        .volume_slots(prepared.layers.len());
    h.update(format!("volume_slots={volume_slots}"));
    // The hex digests of init's and the agent's bytes, as hashing their files gave.
    for bytes in [&resolved.init, shim] {
        h.update(hex::encode(sha2::Sha256::digest(bytes)));
    }
    let inputs = hex::encode(h.finalize());

    if let Ok(existing) = Snapshot::open(&dest) {
        if existing.meta.bake_inputs == inputs {
            return Ok(PullOutcome {
                snapshot: existing,
                cached: true,
            });
        }
    }
    std::fs::create_dir_all(&req.snapshots_dir)
        .map_err(|e| Error::io(format!("creating {}", req.snapshots_dir.display()), e))?;
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".tmp-{}-", req.name))
        .tempdir_in(&req.snapshots_dir)
        .map_err(|e| Error::io("creating a temp snapshot dir", e))?;
    let mut boot = b.clone();
    boot.backend = kind.into();
    boot.snapshot_dir = Some(tmp.path().to_path_buf());
    let log_path = tmp.path().join(snapshot::BAKE_LOG);
    let vm = Vm::boot_from(
        &boot,
        resolved,
        started,
        crate::boot::output_sink(Box::new(std::io::sink()), Box::new(std::io::sink())),
    )?;
    let save_log = |vm: &Vm| {
        let _ = std::fs::copy(vm.run_dir().join("console.log"), &log_path);
    };
    if let Err(e) = vm.wait_listening(req.port, req.ready_timeout) {
        save_log(&vm);
        let e = match vm.try_status() {
            Some(status) => format!("the workload exited ({status:?}) before it listened"),
            None => e.to_string(),
        };
        let kept = req.snapshots_dir.join(format!("{}.bake.log", req.name));
        let _ = std::fs::copy(&log_path, &kept);
        return Err(Error::Bake(format!(
            "the workload did not listen on port {} within {:?} ({e}); guest console: {}",
            req.port,
            req.ready_timeout,
            kept.display()
        )));
    }
    // The backend writes its own files (kvm: state and RAM in one; QEMU: the state, RAM
    // already in its shared file), fsynced, and says what to record of them.
    let record = vm.snapshot(tmp.path())?;
    save_log(&vm);
    std::fs::copy(
        vm.run_dir().join("initramfs.cpio"),
        tmp.path().join(snapshot::INITRAMFS_FILE),
    )
    .map_err(|e| Error::io("keeping the initramfs", e))?;
    let backend = vm.backend_name().to_string();
    vm.kill();
    drop(vm);

    let meta = Metadata {
        format_version: FORMAT_VERSION,
        backend: kind.to_string(),
        accel: backend,
        name: req.name.clone(),
        image_ref: prepared.reference.clone(),
        manifest_digest: prepared.manifest_digest.to_string(),
        layers: prepared
            .layers
            .iter()
            .map(|(p, d)| {
                let m =
                    std::fs::metadata(p).map_err(|e| Error::io(format!("{}", p.display()), e))?;
                Ok(LayerRecord {
                    path: p.clone(),
                    diff_id: d.to_string(),
                    size: m.len(),
                    mtime_ns: snapshot::mtime_ns(&m),
                })
            })
            .collect::<Result<_, Error>>()?,
        memory_mib: b.memory_mib,
        vcpus: b.vcpus,
        guest_port: req.port,
        kernel: kernel_rec,
        kernel_args: b.kernel_args.clone(),
        state_sha256: record.state_sha256,
        state_size: record.state_size,
        memory_size: record.memory_size,
        bake_inputs: inputs,
        created_unix: SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        run_config: prepared.run_config.clone(),
        volume_slots,
    };
    let json = serde_json::to_vec_pretty(&meta).map_err(|e| Error::Bake(e.to_string()))?;
    snapshot::write_atomic(&tmp.path().join(snapshot::METADATA), &json)
        .map_err(|e| Error::io("writing metadata.json", e))?;

    // Replace any old snapshot of this name: move it aside, move the new one in.
    let tmp_path = tmp.keep();
    if dest.exists() {
        let old = req
            .snapshots_dir
            .join(format!(".old-{}-{}", req.name, std::process::id()));
        std::fs::rename(&dest, &old)
            .map_err(|e| Error::io(format!("moving aside {}", dest.display()), e))?;
        let _ = std::fs::remove_dir_all(&old);
    }
    std::fs::rename(&tmp_path, &dest)
        .map_err(|e| Error::io(format!("renaming into {}", dest.display()), e))?;
    if let Ok(d) = std::fs::File::open(&req.snapshots_dir) {
        let _ = d.sync_all();
    }
    Ok(PullOutcome {
        snapshot: Snapshot::open(&dest)?,
        cached: false,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn default_names() {
        assert_eq!(super::default_name("oci-layout:/a/busybox"), "busybox");
        assert_eq!(
            super::default_name("oci-layout:/a/busybox:v1"),
            "busybox-v1"
        );
        assert_eq!(
            super::default_name("oci-archive:/a/web.tar:latest"),
            "web-latest"
        );
        assert_eq!(super::default_name("ghcr.io/o/app:1.0"), "app-1.0");
    }
}
