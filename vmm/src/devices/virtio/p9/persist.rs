//! What a snapshot keeps of a virtio-9p device: its mount tag and whether it was read-only
//! — not its host directory, which a restore binds anew (or leaves unbound). A snapshot is
//! refused while the guest has the export mounted: its fids would not survive.

use serde::{Deserialize, Serialize};

use super::device::{FsConfig, P9};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct P9State {
    pub tag: String,
    pub read_only: bool,
}

impl P9 {
    pub fn save(&self) -> Result<P9State, String> {
        if self.fids_in_use() > 0 {
            return Err(format!(
                "virtio-9p {}: mounted in the guest ({} fids); a snapshot is taken with its \
                 volumes unmounted",
                self.config.tag,
                self.fids_in_use()
            ));
        }
        Ok(P9State {
            tag: self.config.tag.clone(),
            read_only: self.config.read_only,
        })
    }

    /// The saved device, exporting what `bindings` gives its tag (unbound if nothing).
    pub fn restore(state: &P9State, bindings: &[FsConfig]) -> std::io::Result<Self> {
        let config = bindings
            .iter()
            .find(|b| b.tag == state.tag)
            .cloned()
            .unwrap_or(FsConfig {
                tag: state.tag.clone(),
                root: None,
                read_only: true,
            });
        P9::new(&config)
    }
}
