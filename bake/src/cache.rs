//! The on-disk cache: `$SUPERMACHINE_CACHE` or `$XDG_CACHE_HOME/supermachine` or
//! `~/.cache/supermachine`. Entries are written to a temp file in the same directory,
//! fsynced and renamed into place, so a crash never leaves a half-written entry under its
//! final name.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::BakeError;

#[derive(Debug, Clone)]
pub struct Cache {
    root: PathBuf,
}

impl Cache {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The default location, honouring `SUPERMACHINE_CACHE` and `XDG_CACHE_HOME`.
    pub fn default_root() -> PathBuf {
        user_dir(
            "SUPERMACHINE_CACHE",
            "XDG_CACHE_HOME",
            "supermachine",
            ".cache/supermachine",
        )
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Squashfs layers, keyed by diff_id: `layers/<hex>.squashfs`.
    pub fn layers_dir(&self) -> PathBuf {
        self.root.join("layers")
    }

    pub fn ensure_dir(&self, dir: &Path) -> Result<(), BakeError> {
        fs::create_dir_all(dir).map_err(|e| BakeError::Cache {
            path: dir.to_path_buf(),
            reason: format!("cannot create directory: {e}"),
        })
    }
}

/// A file being written that appears under `dest` only on [`AtomicFile::commit`]; dropped
/// uncommitted, it vanishes.
pub struct AtomicFile {
    tmp: tempfile::NamedTempFile,
    dest: PathBuf,
}

impl AtomicFile {
    pub fn create(dest: &Path) -> Result<Self, BakeError> {
        let dir = dest.parent().unwrap_or(Path::new("."));
        let tmp = tempfile::Builder::new()
            .prefix(".tmp-")
            .tempfile_in(dir)
            .map_err(|e| BakeError::io(format!("creating a temp file in {}", dir.display()), e))?;
        Ok(Self {
            tmp,
            dest: dest.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        self.tmp.path()
    }

    pub fn file(&mut self) -> &mut File {
        self.tmp.as_file_mut()
    }

    /// fsync, rename into place, fsync the directory.
    pub fn commit(mut self) -> Result<PathBuf, BakeError> {
        let dest = self.dest.clone();
        self.tmp
            .as_file_mut()
            .flush()
            .map_err(|e| BakeError::io("flushing", e))?;
        self.tmp
            .as_file()
            .sync_all()
            .map_err(|e| BakeError::io(format!("fsync {}", self.tmp.path().display()), e))?;
        self.tmp
            .persist(&dest)
            .map_err(|e| BakeError::io(format!("renaming into {}", dest.display()), e.error))?;
        if let Some(dir) = dest.parent() {
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(dest)
    }
}

/// A per-user directory: `$override_var` if set, else `$xdg_var/under_xdg`, else
/// `$HOME/under_home` (`/root` without a HOME).
pub fn user_dir(override_var: &str, xdg_var: &str, under_xdg: &str, under_home: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(override_var) {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os(xdg_var) {
        return PathBuf::from(p).join(under_xdg);
    }
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/root".into())
        .join(under_home)
}
