//! Snapshot directories: `metadata.json`, the backend's own files (it writes, verifies and
//! restores them: `Backend::verify_snapshot`), the initramfs the VM booted with, and
//! `bake.log` (the guest console while baking). Written to a temp dir, fsynced, renamed
//! into place; every field is checked again on open, and any mismatch is
//! `Error::CacheInvalid` naming the reason. See docs/SNAPSHOT-FORMAT.md.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use supermachine_backend::{BackendKind, SnapshotRecord};
use supermachine_protocol::RunConfig;

use crate::Error;

/// Bumped whenever the layout or meaning of a snapshot changes.
pub const FORMAT_VERSION: u32 = 1;
pub const METADATA: &str = "metadata.json";
pub const INITRAMFS_FILE: &str = "initramfs.cpio";
pub const BAKE_LOG: &str = "bake.log";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRecord {
    pub path: PathBuf,
    pub diff_id: String,
    pub size: u64,
    /// The squashfs a guest mounted must be the very same file: a re-converted layer (new
    /// mtime) invalidates the snapshot even when its size matches.
    pub mtime_ns: i128,
}

/// Modification time in nanoseconds since the epoch.
pub fn mtime_ns(meta: &fs::Metadata) -> i128 {
    use std::os::unix::fs::MetadataExt;
    i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec())
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRecord {
    pub path: PathBuf,
    pub size: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metadata {
    pub format_version: u32,
    pub backend: String,
    pub accel: String,
    pub name: String,
    pub image_ref: String,
    pub manifest_digest: String,
    pub layers: Vec<LayerRecord>,
    pub memory_mib: u32,
    pub vcpus: u32,
    pub guest_port: u16,
    pub kernel: FileRecord,
    pub kernel_args: Vec<String>,
    /// What the backend recorded of its files ([`SnapshotRecord`]).
    pub state_sha256: String,
    pub state_size: u64,
    pub memory_size: u64,
    pub bake_inputs: String,
    pub created_unix: u64,
    pub run_config: RunConfig,
    /// Unbound filesystem slots the VM was baked with: the most volumes a restore binds.
    #[serde(default)]
    pub volume_slots: usize,
}

impl Metadata {
    /// The backend's record of its files.
    pub fn record(&self) -> SnapshotRecord {
        SnapshotRecord {
            state_sha256: self.state_sha256.clone(),
            state_size: self.state_size,
            memory_size: self.memory_size,
        }
    }
}

/// The snapshots root: `$SUPERMACHINE_SNAPSHOTS`, else `$XDG_DATA_HOME/supermachine/snapshots`,
/// else `~/.local/share/supermachine/snapshots`.
pub fn default_root() -> PathBuf {
    supermachine_bake::cache::user_dir(
        "SUPERMACHINE_SNAPSHOTS",
        "XDG_DATA_HOME",
        "supermachine/snapshots",
        ".local/share/supermachine/snapshots",
    )
}

pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    use sha2::Digest;
    let mut f = fs::File::open(path)?;
    let mut h = sha2::Sha256::new();
    std::io::copy(&mut f, &mut h)?;
    Ok(hex::encode(h.finalize()))
}

/// A verified snapshot on disk.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub dir: PathBuf,
    pub meta: Metadata,
}

impl Snapshot {
    /// Opens and verifies `dir`: format version, backend files, layers, kernel.
    pub fn open(dir: &Path) -> Result<Snapshot, Error> {
        let invalid = |reason: String| Error::CacheInvalid {
            path: dir.to_path_buf(),
            reason,
        };
        let meta_path = dir.join(METADATA);
        let text = match fs::read(&meta_path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::CacheMiss {
                    what: dir.display().to_string(),
                })
            }
            Err(e) => return Err(invalid(format!("cannot read {METADATA}: {e}"))),
        };
        let v: serde_json::Value = serde_json::from_slice(&text)
            .map_err(|e| invalid(format!("{METADATA} is not JSON: {e}")))?;
        let version = v
            .get("format_version")
            .and_then(|v| v.as_u64())
            .unwrap_or(0);
        if version != u64::from(FORMAT_VERSION) {
            return Err(invalid(format!(
                "snapshot format version {version}, this build reads version {FORMAT_VERSION}"
            )));
        }
        let meta: Metadata =
            serde_json::from_value(v).map_err(|e| invalid(format!("{METADATA}: {e}")))?;
        let kind: BackendKind = meta.backend.parse().map_err(|_| {
            invalid(format!(
                "baked by backend {:?}, which this build cannot restore",
                meta.backend
            ))
        })?;
        supermachine_backend::select::for_kind(kind)
            .backend
            .verify_snapshot(dir, &meta.record(), meta.memory_mib)
            .map_err(|e| invalid(e.to_string()))?;
        if !dir.join(INITRAMFS_FILE).is_file() {
            return Err(invalid(format!("{INITRAMFS_FILE} is missing")));
        }
        for l in &meta.layers {
            match fs::metadata(&l.path) {
                Ok(m) if m.len() == l.size && mtime_ns(&m) == l.mtime_ns => {}
                Ok(_) => {
                    return Err(invalid(format!(
                        "layer {} ({}) was replaced since the bake",
                        l.diff_id,
                        l.path.display()
                    )))
                }
                Err(e) => {
                    return Err(invalid(format!(
                        "layer {} ({}): {e}",
                        l.diff_id,
                        l.path.display()
                    )))
                }
            }
        }
        // A restored guest must find the very kernel it was baked with in memory.
        let kernel_digest = sha256_file(&meta.kernel.path)
            .map_err(|e| invalid(format!("guest kernel {}: {e}", meta.kernel.path.display())))?;
        if kernel_digest != meta.kernel.sha256 {
            return Err(invalid(format!(
                "guest kernel {} changed since the bake",
                meta.kernel.path.display()
            )));
        }
        Ok(Snapshot {
            dir: dir.to_path_buf(),
            meta,
        })
    }

    /// Which backend baked this snapshot (and so restores it).
    pub fn backend_kind(&self) -> BackendKind {
        // `open` refused any other value.
        self.meta.backend.parse().unwrap_or(BackendKind::Qemu)
    }

    pub fn initramfs_path(&self) -> PathBuf {
        self.dir.join(INITRAMFS_FILE)
    }
}

/// Lists snapshot directories under `root` (valid or not) by name.
pub fn list(root: &Path) -> Vec<(String, Result<Snapshot, Error>)> {
    let mut out = Vec::new();
    if let Ok(rd) = fs::read_dir(root) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || !e.path().is_dir() {
                continue;
            }
            out.push((name, Snapshot::open(&e.path())));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Writes `bytes` to `path` atomically (temp file, fsync, rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}
