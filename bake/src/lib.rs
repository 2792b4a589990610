//! Image preparation: resolve an image reference, verify its blobs, turn each layer into a
//! read-only squashfs in the shared layer cache, compute the run configuration, and write
//! the per-image initramfs. Registry sources and the snapshot driver join this crate later.

pub mod archive;
pub mod cache;
pub mod credentials;
pub mod digest;
pub mod initramfs;
pub mod layer;
pub mod layout;
pub mod progress;
mod proxy;
pub mod pull_options;
pub mod reference;
pub mod registry;
pub mod runconfig;

use std::path::PathBuf;

pub use cache::Cache;
pub use digest::Digest;
pub use layout::{OciLayout, ResolvedImage};
pub use pull_options::{Platform, PullOptions, PullPolicy};
pub use reference::ImageRef;
pub use runconfig::Overrides;

use supermachine_protocol::{LayerMount, RunConfig, LAYER_SERIAL_PREFIX};

#[derive(Debug, thiserror::Error)]
pub enum BakeError {
    #[error("invalid image reference {reference:?}: {reason}")]
    Reference { reference: String, reason: String },
    #[error("{path}: {reason}")]
    Layout { path: PathBuf, reason: String },
    #[error("tag {tag:?} not found in {path} (tags present: {available})")]
    TagNotFound {
        path: PathBuf,
        tag: String,
        available: String,
    },
    #[error("blob {digest} in {path}: {reason}")]
    Blob {
        path: PathBuf,
        digest: String,
        reason: String,
    },
    #[error("layer {digest}: {reason}")]
    Layer { digest: String, reason: String },
    #[error("{0}")]
    Unsupported(String),
    #[error("registry {registry}: {reason}")]
    Network { registry: String, reason: String },
    #[error("no command specified: the image has no Entrypoint or Cmd and none was given")]
    NoCommand,
    #[error("{reference} is not in the cache and the pull policy is \"never\"")]
    NotCached { reference: String },
    #[error("{reference} is built for {found}; this host's guests run {expected}")]
    WrongPlatform {
        reference: String,
        found: String,
        expected: String,
    },
    #[error("cache at {path}: {reason}")]
    Cache { path: PathBuf, reason: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
}

impl BakeError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        BakeError::Io {
            context: context.into(),
            source,
        }
    }
}

/// An image ready to boot: its layers as squashfs files (bottom-up) and its run config.
#[derive(Debug, Clone)]
pub struct PreparedImage {
    pub reference: String,
    pub manifest_digest: Digest,
    /// Squashfs files, bottom layer first, each paired with its diff_id.
    pub layers: Vec<(PathBuf, Digest)>,
    pub run_config: RunConfig,
}

/// Resolves `reference`, converts its layers (cached by diff_id) and merges the image's
/// config with `overrides`.
pub fn prepare(
    reference: &ImageRef,
    overrides: &Overrides,
    cache: &Cache,
    pull: &PullOptions,
) -> Result<PreparedImage, BakeError> {
    let resolved = match reference {
        ImageRef::OciLayout { dir, tag } => OciLayout::open(dir)?.resolve(tag.as_deref())?,
        ImageRef::OciArchive { file, tag } => {
            OciLayout::open(&archive::unpack(file, cache)?)?.resolve(tag.as_deref())?
        }
        ImageRef::Registry(r) => {
            let dir = registry::pull_to_layout(r, cache, pull)?;
            OciLayout::open(&dir)?.resolve(Some(registry::LAYOUT_TAG))?
        }
    };
    // Guests are x86_64: an image for another architecture would fail at its first exec.
    let arch = resolved.config.architecture().to_string();
    if arch != "amd64" {
        return Err(BakeError::WrongPlatform {
            reference: reference.to_string(),
            found: format!("{}/{arch}", resolved.config.os()),
            expected: "linux/amd64".into(),
        });
    }
    let mut layers = Vec::with_capacity(resolved.layers.len());
    for (i, blob) in resolved.layers.iter().enumerate() {
        tracing::info!(layer = i, digest = %blob.digest, "preparing layer");
        let path = layer::ensure_squashfs(blob, cache)?;
        layers.push((path, blob.diff_id.clone()));
    }
    let mut run_config = runconfig::merge(resolved.config.config().as_ref(), overrides)?;
    run_config.layers = layers
        .iter()
        .enumerate()
        .map(|(i, (_, diff_id))| LayerMount {
            serial: format!("{LAYER_SERIAL_PREFIX}{i}"),
            diff_id: diff_id.to_string(),
        })
        .collect();
    Ok(PreparedImage {
        reference: reference.to_string(),
        manifest_digest: resolved.manifest_digest,
        layers,
        run_config,
    })
}
