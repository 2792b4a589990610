//! What a snapshot keeps of the vsock device: the guest CID and the host socket path.
//! Connections are not saved — their host ends belong to the process that baked — so the
//! restored device owes the guest a TRANSPORT_RESET, after which it drops its sockets.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::device::Vsock;
use super::muxer::Muxer;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VsockState {
    pub cid: u64,
    pub uds_path: PathBuf,
}

impl Vsock {
    pub fn save(&self) -> VsockState {
        VsockState {
            cid: self.cid,
            uds_path: self.uds_path().to_path_buf(),
        }
    }

    /// The restored device listens at `uds_path` (a new VM's own socket) and will send
    /// TRANSPORT_RESET once the event loop runs.
    pub fn restore(state: &VsockState, uds_path: &Path) -> std::io::Result<Self> {
        Vsock::check_cid(state.cid)?;
        Self::restore_with(state, Muxer::new(state.cid, uds_path)?)
    }

    /// Restores onto a muxer made ahead of time (its socket already listening).
    pub fn restore_with(state: &VsockState, mut muxer: Muxer) -> std::io::Result<Self> {
        Vsock::check_cid(state.cid)?;
        muxer.set_cid(state.cid);
        Ok(Vsock {
            cid: state.cid,
            muxer,
            reset_pending: true,
        })
    }
}
