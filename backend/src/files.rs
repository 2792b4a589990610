//! File checks the backends' snapshots share: sizes, digests, fsync. Every error names the
//! file (by its name in the snapshot directory) and what was expected.

use std::fs;
use std::path::Path;

use sha2::Digest as _;

use crate::BackendError;

fn name_of(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

/// The file's size; a missing file is named.
pub(crate) fn size_of(path: &Path) -> Result<u64, BackendError> {
    fs::metadata(path)
        .map(|m| m.len())
        .map_err(|e| BackendError::InvalidSnapshot(format!("{}: {e}", name_of(path))))
}

/// `path` must be `want` bytes long.
pub(crate) fn check_size(path: &Path, want: u64) -> Result<(), BackendError> {
    match size_of(path)? {
        n if n == want => Ok(()),
        n => Err(BackendError::InvalidSnapshot(format!(
            "{} is {n} bytes, expected {want} (truncated?)",
            name_of(path)
        ))),
    }
}

/// Hex sha256 of the file's bytes.
pub(crate) fn sha256_of(path: &Path) -> Result<String, BackendError> {
    let mut f =
        fs::File::open(path).map_err(|e| BackendError::io(format!("{}", path.display()), e))?;
    let mut h = sha2::Sha256::new();
    std::io::copy(&mut f, &mut h)
        .map_err(|e| BackendError::io(format!("reading {}", path.display()), e))?;
    Ok(hex::encode(h.finalize()))
}

/// `path` must hash to `want`.
pub(crate) fn check_sha256(path: &Path, want: &str) -> Result<(), BackendError> {
    let got = sha256_of(path)?;
    if got != want {
        return Err(BackendError::InvalidSnapshot(format!(
            "{} is corrupt (sha256 {got}, expected {want})",
            name_of(path)
        )));
    }
    Ok(())
}

/// Flushes the file to disk (a snapshot is complete only once its files are).
pub(crate) fn fsync(path: &Path) -> Result<(), BackendError> {
    fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| BackendError::io(format!("fsync {}", path.display()), e))
}
