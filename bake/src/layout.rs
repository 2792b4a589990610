//! Reading an OCI image layout directory: `oci-layout`, `index.json`, then manifest, config
//! and layer descriptors. Manifests and configs are verified against their digests here;
//! layer blobs are verified while they are converted (see `layer.rs`).

use std::fs;
use std::path::{Path, PathBuf};

use oci_spec::image::{
    Arch, Descriptor, ImageConfiguration, ImageIndex, ImageManifest, MediaType, Os,
};

use crate::digest::Digest;
use crate::BakeError;

const REF_NAME: &str = "org.opencontainers.image.ref.name";
/// Largest manifest/index/config we read into memory.
const MAX_JSON_BLOB: u64 = 16 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

/// A layer blob on disk and what it should decompress to.
#[derive(Debug, Clone)]
pub struct LayerBlob {
    pub path: PathBuf,
    pub digest: Digest,
    pub size: u64,
    pub compression: Compression,
    pub diff_id: Digest,
}

#[derive(Debug, Clone)]
pub struct ResolvedImage {
    pub manifest_digest: Digest,
    pub config: ImageConfiguration,
    /// Bottom layer first.
    pub layers: Vec<LayerBlob>,
}

pub struct OciLayout {
    dir: PathBuf,
}

impl OciLayout {
    pub fn open(dir: &Path) -> Result<Self, BakeError> {
        let layout_err = |reason: String| BakeError::Layout {
            path: dir.to_path_buf(),
            reason,
        };
        if !dir.is_dir() {
            return Err(layout_err("no such OCI layout directory".into()));
        }
        let marker = dir.join("oci-layout");
        let text = fs::read_to_string(&marker)
            .map_err(|e| layout_err(format!("missing or unreadable oci-layout file: {e}")))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| layout_err(format!("oci-layout is not JSON: {e}")))?;
        if v.get("imageLayoutVersion").and_then(|v| v.as_str()) != Some("1.0.0") {
            return Err(layout_err(
                "oci-layout: imageLayoutVersion is not \"1.0.0\"".into(),
            ));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.dir.join("blobs/sha256").join(digest.hex())
    }

    fn parse_digest(&self, d: &Descriptor) -> Result<Digest, BakeError> {
        Digest::parse(d.digest().as_ref()).map_err(|reason| BakeError::Layout {
            path: self.dir.join("index.json"),
            reason,
        })
    }

    /// Reads a small JSON blob and checks its size and digest.
    fn read_verified(&self, desc: &Descriptor) -> Result<(Digest, Vec<u8>), BakeError> {
        let digest = self.parse_digest(desc)?;
        let path = self.blob_path(&digest);
        let blob_err = |reason: String| BakeError::Blob {
            path: path.clone(),
            digest: digest.to_string(),
            reason,
        };
        if desc.size() > MAX_JSON_BLOB {
            return Err(blob_err(format!(
                "declared size {} is too large",
                desc.size()
            )));
        }
        let bytes = fs::read(&path).map_err(|e| blob_err(format!("cannot read: {e}")))?;
        if bytes.len() as u64 != desc.size() {
            return Err(blob_err(format!(
                "size {} != declared {}",
                bytes.len(),
                desc.size()
            )));
        }
        let actual = Digest::of_bytes(&bytes);
        if actual != digest {
            return Err(blob_err(format!("content hashes to {actual}")));
        }
        Ok((digest, bytes))
    }

    /// Picks the manifest for `tag` (or the only one) and loads config and layers.
    pub fn resolve(&self, tag: Option<&str>) -> Result<ResolvedImage, BakeError> {
        let index_path = self.dir.join("index.json");
        let index = ImageIndex::from_file(&index_path).map_err(|e| BakeError::Layout {
            path: index_path.clone(),
            reason: format!("cannot load index.json: {e}"),
        })?;
        let manifests = index.manifests();
        let chosen = match tag {
            Some(t) => manifests
                .iter()
                .find(|m| {
                    m.annotations()
                        .as_ref()
                        .and_then(|a| a.get(REF_NAME))
                        .map(String::as_str)
                        == Some(t)
                })
                .ok_or_else(|| BakeError::TagNotFound {
                    path: self.dir.clone(),
                    tag: t.to_string(),
                    available: tags(manifests),
                })?,
            None if manifests.len() == 1 => &manifests[0],
            None if manifests.is_empty() => {
                return Err(BakeError::Layout {
                    path: index_path,
                    reason: "index.json lists no manifests".into(),
                })
            }
            None => {
                return Err(BakeError::Layout {
                    path: index_path,
                    reason: format!(
                        "index.json lists {} images; name one with oci-layout:DIR:TAG (tags: {})",
                        manifests.len(),
                        tags(manifests)
                    ),
                })
            }
        };
        self.resolve_descriptor(chosen, 0)
    }

    fn resolve_descriptor(
        &self,
        desc: &Descriptor,
        depth: u32,
    ) -> Result<ResolvedImage, BakeError> {
        if depth > 4 {
            return Err(BakeError::Layout {
                path: self.dir.clone(),
                reason: "nested indexes too deep".into(),
            });
        }
        match desc.media_type() {
            MediaType::ImageIndex | MediaType::Other(_) if is_index(desc.media_type()) => {
                let (index_digest, bytes) = self.read_verified(desc)?;
                let index: ImageIndex =
                    serde_json::from_slice(&bytes).map_err(|e| BakeError::Layout {
                        path: self.blob_path(&index_digest),
                        reason: format!("not an image index: {e}"),
                    })?;
                let pick = index
                    .manifests()
                    .iter()
                    .find(|m| {
                        m.platform().as_ref().is_some_and(|p| {
                            *p.os() == Os::Linux && *p.architecture() == Arch::Amd64
                        })
                    })
                    .ok_or_else(|| BakeError::Layout {
                        path: self.dir.clone(),
                        reason: "the image index has no linux/amd64 manifest".into(),
                    })?;
                self.resolve_descriptor(pick, depth + 1)
            }
            _ => self.load_manifest(desc),
        }
    }

    fn load_manifest(&self, desc: &Descriptor) -> Result<ResolvedImage, BakeError> {
        let (manifest_digest, bytes) = self.read_verified(desc)?;
        let manifest: ImageManifest =
            serde_json::from_slice(&bytes).map_err(|e| BakeError::Layout {
                path: self.blob_path(&manifest_digest),
                reason: format!("not an image manifest: {e}"),
            })?;
        let (config_digest, config_bytes) = self.read_verified(manifest.config())?;
        let config: ImageConfiguration =
            serde_json::from_slice(&config_bytes).map_err(|e| BakeError::Layout {
                path: self.blob_path(&config_digest),
                reason: format!("not an image config: {e}"),
            })?;
        let diff_ids = config.rootfs().diff_ids();
        if diff_ids.len() != manifest.layers().len() {
            return Err(BakeError::Layout {
                path: self.blob_path(&config_digest),
                reason: format!(
                    "config lists {} diff_ids but the manifest has {} layers",
                    diff_ids.len(),
                    manifest.layers().len()
                ),
            });
        }
        let mut layers = Vec::new();
        for (desc, diff_id) in manifest.layers().iter().zip(diff_ids) {
            let digest = self.parse_digest(desc)?;
            let diff_id = Digest::parse(diff_id).map_err(|reason| BakeError::Layout {
                path: self.blob_path(&config_digest),
                reason,
            })?;
            let compression =
                compression_of(desc.media_type()).ok_or_else(|| BakeError::Layer {
                    digest: digest.to_string(),
                    reason: format!("unsupported layer media type {}", desc.media_type()),
                })?;
            layers.push(LayerBlob {
                path: self.blob_path(&digest),
                digest,
                size: desc.size(),
                compression,
                diff_id,
            });
        }
        Ok(ResolvedImage {
            manifest_digest,
            config,
            layers,
        })
    }
}

fn is_index(mt: &MediaType) -> bool {
    match mt {
        MediaType::ImageIndex => true,
        MediaType::Other(s) => s == "application/vnd.docker.distribution.manifest.list.v2+json",
        _ => false,
    }
}

fn compression_of(mt: &MediaType) -> Option<Compression> {
    match mt {
        MediaType::ImageLayer | MediaType::ImageLayerNonDistributable => Some(Compression::None),
        MediaType::ImageLayerGzip | MediaType::ImageLayerNonDistributableGzip => {
            Some(Compression::Gzip)
        }
        MediaType::ImageLayerZstd | MediaType::ImageLayerNonDistributableZstd => {
            Some(Compression::Zstd)
        }
        MediaType::Other(s) => match s.as_str() {
            "application/vnd.docker.image.rootfs.diff.tar.gzip" => Some(Compression::Gzip),
            "application/vnd.docker.image.rootfs.diff.tar" => Some(Compression::None),
            _ => None,
        },
        _ => None,
    }
}

fn tags(manifests: &[Descriptor]) -> String {
    let t: Vec<&str> = manifests
        .iter()
        .filter_map(|m| m.annotations().as_ref()?.get(REF_NAME).map(String::as_str))
        .collect();
    if t.is_empty() {
        "none".into()
    } else {
        t.join(", ")
    }
}
