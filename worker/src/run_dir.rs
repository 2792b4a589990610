//! Run directories: each VM's private folder for its sockets, logs and initramfs, and the
//! registry of those in use, so a signal handler that ends the process can remove them.

use std::path::{Path, PathBuf};

use crate::Error;

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

/// A registered run directory; dropping it unregisters it.
pub(crate) struct LiveRunDir(PathBuf);

impl LiveRunDir {
    pub(crate) fn register(p: &Path) -> Self {
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

/// A private directory for one VM's sockets, logs and initramfs (under `parent`, else the
/// system temp dir), registered so a signal handler can remove it.
pub(crate) fn new_run_dir(parent: Option<&Path>) -> Result<(tempfile::TempDir, LiveRunDir), Error> {
    let mut b = tempfile::Builder::new();
    b.prefix("supermachine-");
    let dir = match parent {
        Some(d) => b.tempdir_in(d),
        None => b.tempdir(),
    }
    .map_err(|e| Error::io("creating a run directory", e))?;
    let live = LiveRunDir::register(dir.path());
    Ok((dir, live))
}
