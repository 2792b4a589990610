//! One layer tar -> one read-only squashfs, cached by diff_id.
//!
//! The tar is rewritten on its way into `sqfstar` (Debian's squashfs-tools) so the squashfs
//! speaks overlayfs natively: a whiteout `.wh.NAME` becomes a 0/0 character device `NAME`,
//! and an opaque marker `.wh..wh..opq` becomes the xattr `trusted.overlay.opaque=y` on its
//! directory. Hard links, symlinks, device nodes, modes (setuid included), ownership and
//! `SCHILY.xattr.*` attributes pass through. The blob's digest and the decompressed diff_id
//! are both verified; the squashfs is renamed into the cache only if both match.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Stdio};

use crate::cache::{AtomicFile, Cache};
use crate::digest::HashingReader;
use crate::layout::{Compression, LayerBlob};
use crate::BakeError;

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_MARKER: &str = ".wh..wh..opq";
const OPAQUE_XATTR: &str = "SCHILY.xattr.trusted.overlay.opaque";

/// Returns the cached squashfs for `blob`, converting it first if needed.
pub fn ensure_squashfs(blob: &LayerBlob, cache: &Cache) -> Result<PathBuf, BakeError> {
    let dir = cache.layers_dir();
    cache.ensure_dir(&dir)?;
    let dest = dir.join(format!("{}.squashfs", blob.diff_id.hex()));
    if dest.is_file() {
        return Ok(dest);
    }
    let layer_err = |reason: String| BakeError::Layer {
        digest: blob.digest.to_string(),
        reason,
    };

    // Pass 1: verify digest + diff_id and find opaque directories.
    let opaque = scan(blob).map_err(layer_err)?;

    // Pass 2: rewrite into sqfstar.
    let out = AtomicFile::create(&dest)?;
    let mut child = Command::new("sqfstar")
        .args([
            "-quiet",
            "-no-progress",
            "-force",
            "-comp",
            "zstd",
            "-mkfs-time",
            "0",
        ])
        .arg(out.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            layer_err(format!(
                "cannot run sqfstar (apt-get install squashfs-tools): {e}"
            ))
        })?;
    let stdin = child
        .stdin
        .take()
        .ok_or_else(|| layer_err("sqfstar has no stdin".into()))?;
    let rewrite_result = rewrite(blob, &opaque, stdin);
    let output = child
        .wait_with_output()
        .map_err(|e| layer_err(format!("waiting for sqfstar: {e}")))?;
    rewrite_result.map_err(layer_err)?;
    if !output.status.success() {
        return Err(layer_err(format!(
            "sqfstar failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    out.commit()
}

/// Decompresses `reader` according to `compression`.
fn decompress<'a, R: Read + 'a>(
    reader: R,
    compression: Compression,
) -> Result<Box<dyn Read + 'a>, String> {
    Ok(match compression {
        Compression::None => Box::new(reader),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(reader)),
        Compression::Zstd => {
            Box::new(zstd::stream::read::Decoder::new(reader).map_err(|e| format!("zstd: {e}"))?)
        }
    })
}

/// Streams the blob through both hashes, calling `visit` with the tar stream.
fn with_tar<T>(
    blob: &LayerBlob,
    visit: impl FnOnce(&mut dyn Read) -> Result<T, String>,
) -> Result<T, String> {
    let file =
        File::open(&blob.path).map_err(|e| format!("cannot open {}: {e}", blob.path.display()))?;
    let mut compressed = HashingReader::new(BufReader::new(file));
    let diff_id;
    let result;
    {
        let decompressed = decompress(&mut compressed, blob.compression)?;
        let mut uncompressed = HashingReader::new(decompressed);
        result = visit(&mut uncompressed);
        diff_id = uncompressed
            .finish()
            .map_err(|e| format!("reading layer: {e}"));
    }
    let (digest, size) = compressed
        .finish()
        .map_err(|e| format!("reading blob: {e}"))?;
    if size != blob.size {
        return Err(format!(
            "blob is {size} bytes but the manifest declares {} (truncated or replaced)",
            blob.size
        ));
    }
    if digest != blob.digest {
        return Err(format!(
            "blob content hashes to {digest}, not the declared digest"
        ));
    }
    let result = result?;
    let (diff_id, _) = diff_id?;
    if diff_id != blob.diff_id {
        return Err(format!(
            "uncompressed layer hashes to {diff_id}, the config's diff_id is {}",
            blob.diff_id
        ));
    }
    Ok(result)
}

/// Normalizes a tar path to a relative path without `.`; refuses `..` and absolute escapes.
fn normalize(p: &Path) -> Result<PathBuf, String> {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir => {
                return Err(format!("tar entry {} escapes the root", p.display()))
            }
            Component::Prefix(_) => return Err(format!("tar entry {} has a prefix", p.display())),
        }
    }
    Ok(out)
}

fn scan(blob: &LayerBlob) -> Result<BTreeSet<PathBuf>, String> {
    with_tar(blob, |r| {
        let mut opaque = BTreeSet::new();
        let mut ar = tar::Archive::new(r);
        for entry in ar.entries().map_err(|e| format!("reading tar: {e}"))? {
            let entry = entry.map_err(|e| format!("reading tar: {e}"))?;
            let path = normalize(&entry.path().map_err(|e| format!("tar path: {e}"))?)?;
            if path.file_name().and_then(|n| n.to_str()) == Some(OPAQUE_MARKER) {
                opaque.insert(path.parent().map(Path::to_path_buf).unwrap_or_default());
            }
        }
        Ok(opaque)
    })
}

fn rewrite(blob: &LayerBlob, opaque: &BTreeSet<PathBuf>, sink: impl Write) -> Result<(), String> {
    with_tar(blob, |r| {
        let mut out = tar::Builder::new(sink);
        out.mode(tar::HeaderMode::Complete);
        let werr = |e: io::Error| format!("feeding sqfstar: {e}");
        // Opaque directories are announced first, so their xattr is there even when the
        // layer has no entry for the directory itself. sqfstar merges a later entry for
        // the same directory into this one.
        let mut ar = tar::Archive::new(r);
        for dir in opaque {
            if dir.as_os_str().is_empty() {
                continue; // an opaque layer root means nothing below it in lower layers
            }
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Directory);
            h.set_mode(0o755);
            h.set_size(0);
            out.append_pax_extensions([(OPAQUE_XATTR, &b"y"[..])])
                .map_err(werr)?;
            out.append_data(&mut h, dir, io::empty()).map_err(werr)?;
        }
        for entry in ar.entries().map_err(|e| format!("reading tar: {e}"))? {
            let mut entry = entry.map_err(|e| format!("reading tar: {e}"))?;
            let path = normalize(&entry.path().map_err(|e| format!("tar path: {e}"))?)?;
            if path.as_os_str().is_empty() {
                continue;
            }
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name == OPAQUE_MARKER {
                continue;
            }
            let src = entry.header().clone();
            let mut h = tar::Header::new_gnu();
            h.set_mode(
                src.mode()
                    .map_err(|e| format!("{}: mode: {e}", path.display()))?,
            );
            h.set_uid(
                src.uid()
                    .map_err(|e| format!("{}: uid: {e}", path.display()))?,
            );
            h.set_gid(
                src.gid()
                    .map_err(|e| format!("{}: gid: {e}", path.display()))?,
            );
            h.set_mtime(src.mtime().unwrap_or(0));
            if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
                // overlayfs whiteout: a 0/0 character device with the hidden name.
                h.set_entry_type(tar::EntryType::Char);
                h.set_mode(0o000);
                h.set_uid(0);
                h.set_gid(0);
                h.set_device_major(0).map_err(werr)?;
                h.set_device_minor(0).map_err(werr)?;
                h.set_size(0);
                let target = path.with_file_name(hidden);
                out.append_data(&mut h, target, io::empty()).map_err(werr)?;
                continue;
            }
            let kind = src.entry_type();
            h.set_entry_type(kind);
            // Attributes carried in PAX headers (security.capability and friends).
            let mut xattrs: Vec<(String, Vec<u8>)> = Vec::new();
            if let Ok(Some(exts)) = entry.pax_extensions() {
                for ext in exts.flatten() {
                    if let Ok(k) = ext.key() {
                        if k.starts_with("SCHILY.xattr.") && k != OPAQUE_XATTR {
                            xattrs.push((k.to_string(), ext.value_bytes().to_vec()));
                        }
                    }
                }
            }
            if kind.is_dir() && opaque.contains(&path) {
                xattrs.push((OPAQUE_XATTR.to_string(), b"y".to_vec()));
            }
            if !xattrs.is_empty() {
                out.append_pax_extensions(xattrs.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
                    .map_err(werr)?;
            }
            match kind {
                tar::EntryType::Link => {
                    let target = entry
                        .link_name()
                        .map_err(|e| format!("{}: link name: {e}", path.display()))?
                        .ok_or_else(|| format!("{}: hard link without a target", path.display()))?;
                    let target = normalize(&target)?;
                    h.set_size(0);
                    out.append_link(&mut h, &path, &target).map_err(werr)?;
                }
                tar::EntryType::Symlink => {
                    let target = entry
                        .link_name()
                        .map_err(|e| format!("{}: link name: {e}", path.display()))?
                        .ok_or_else(|| format!("{}: symlink without a target", path.display()))?
                        .into_owned();
                    h.set_size(0);
                    out.append_link(&mut h, &path, &target).map_err(werr)?;
                }
                tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                    if let (Ok(Some(maj)), Ok(Some(min))) = (src.device_major(), src.device_minor())
                    {
                        h.set_device_major(maj).map_err(werr)?;
                        h.set_device_minor(min).map_err(werr)?;
                    }
                    h.set_size(0);
                    out.append_data(&mut h, &path, io::empty()).map_err(werr)?;
                }
                tar::EntryType::Directory => {
                    h.set_size(0);
                    out.append_data(&mut h, &path, io::empty()).map_err(werr)?;
                }
                tar::EntryType::Regular
                | tar::EntryType::Continuous
                | tar::EntryType::GNUSparse => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_size(entry.size());
                    out.append_data(&mut h, &path, &mut entry).map_err(werr)?;
                }
                other => {
                    tracing::warn!(path = %path.display(), kind = ?other, "skipping unsupported tar entry");
                }
            }
        }
        out.into_inner().map_err(werr)?.flush().map_err(werr)?;
        Ok(())
    })
}
