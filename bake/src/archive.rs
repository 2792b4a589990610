//! `oci-archive:FILE`: a tar of an OCI image layout. It is unpacked once into the cache,
//! keyed by the archive's sha256, atomically (temp dir, rename), and read as a layout.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use crate::cache::Cache;
use crate::digest::HashingReader;
use crate::BakeError;

/// The unpacked layout directory for `file`.
pub fn unpack(file: &Path, cache: &Cache) -> Result<PathBuf, BakeError> {
    let layout_err = |reason: String| BakeError::Layout {
        path: file.to_path_buf(),
        reason,
    };
    let f =
        File::open(file).map_err(|e| layout_err(format!("cannot open the OCI archive: {e}")))?;
    let (digest, _) = HashingReader::new(BufReader::new(f))
        .finish()
        .map_err(|e| layout_err(format!("reading the OCI archive: {e}")))?;
    let root = cache.root().join("archives");
    cache.ensure_dir(&root)?;
    let dest = root.join(digest.hex());
    if dest.join("index.json").is_file() {
        return Ok(dest);
    }
    let tmp = tempfile::Builder::new()
        .prefix(".tmp-")
        .tempdir_in(&root)
        .map_err(|e| BakeError::io("creating a temp dir for the archive", e))?;
    let f =
        File::open(file).map_err(|e| layout_err(format!("cannot open the OCI archive: {e}")))?;
    let mut ar = tar::Archive::new(BufReader::new(f));
    // `unpack` refuses entries that would land outside the target directory.
    ar.unpack(tmp.path())
        .map_err(|e| layout_err(format!("not a valid tar: {e}")))?;
    if !tmp.path().join("oci-layout").is_file() {
        return Err(layout_err(
            "the archive holds no OCI layout (no oci-layout file at its root)".into(),
        ));
    }
    let tmp = tmp.keep();
    if let Err(e) = std::fs::rename(&tmp, &dest) {
        let _ = std::fs::remove_dir_all(&tmp);
        if !dest.join("index.json").is_file() {
            return Err(BakeError::io(
                format!("renaming into {}", dest.display()),
                e,
            ));
        }
    }
    Ok(dest)
}
