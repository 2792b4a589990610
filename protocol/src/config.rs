//! The run configuration: what init needs to start the workload. The host writes it as JSON
//! into the per-image initramfs at [`CONFIG_PATH`].

use serde::{Deserialize, Serialize};

/// Where the run configuration lives inside the initramfs.
pub const CONFIG_PATH: &str = "/supermachine/config.json";

/// virtio-blk serial of layer N is `smlayer<N>` (N counts from the bottom layer, 0), so init
/// finds layers by serial, not by the order the transport enumerates devices.
pub const LAYER_SERIAL_PREFIX: &str = "smlayer";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerMount {
    /// virtio-blk serial of the device holding this layer's squashfs.
    pub serial: String,
    /// Content digest of the layer (diff_id), for diagnostics.
    pub diff_id: String,
}

/// The 9P mount tag of volume slot N is `smvol<N>`: each slot is one filesystem device
/// (virtio-9p), present from boot, mounted by init once the host has bound a directory to it.
pub const VOLUME_TAG_PREFIX: &str = "smvol";

/// A host directory bound to a volume slot, as init mounts it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeMount {
    /// The slot (mount tag `smvol<slot>`).
    pub slot: u32,
    /// Absolute path inside the workload's root; created if missing.
    pub guest_path: String,
    pub read_only: bool,
}

impl VolumeMount {
    pub fn tag(&self) -> String {
        format!("{VOLUME_TAG_PREFIX}{}", self.slot)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunConfig {
    /// Final argv (Entrypoint + Cmd after overrides). Never empty.
    pub argv: Vec<String>,
    /// Environment as `KEY=VALUE`, later entries win.
    pub env: Vec<String>,
    /// Working directory inside the image root; created if missing, as docker does.
    pub workdir: String,
    /// `user`, `uid`, `user:group` or `uid:gid`; empty means root.
    pub user: String,
    pub hostname: String,
    /// Layers bottom-up.
    pub layers: Vec<LayerMount>,
    /// Volumes to mount before the workload starts (a boot; a restore gets them in
    /// `HostCommand::Refresh` instead, and its snapshot was baked with none).
    #[serde(default)]
    pub volumes: Vec<VolumeMount>,
}

impl RunConfig {
    pub fn to_json(&self) -> Vec<u8> {
        // Only strings and vectors: serialization cannot fail.
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }

    pub fn from_json(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}
