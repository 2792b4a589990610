//! What a snapshot keeps of a block device: which file, its ID and size. The file is
//! reopened on restore and must still have that size.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::device::Block;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BlockState {
    pub path: PathBuf,
    pub serial: String,
    pub capacity_sectors: u64,
}

impl Block {
    pub fn save(&self) -> BlockState {
        BlockState {
            path: self.path.clone(),
            serial: self.serial.clone(),
            capacity_sectors: self.capacity_sectors,
        }
    }

    pub fn restore(state: &BlockState) -> Result<Self, String> {
        let b = Block::open(&state.path, &state.serial)
            .map_err(|e| format!("reopening {}: {e}", state.path.display()))?;
        if b.capacity_sectors != state.capacity_sectors {
            return Err(format!(
                "{} has {} sectors, the snapshot expects {}",
                state.path.display(),
                b.capacity_sectors,
                state.capacity_sectors
            ));
        }
        Ok(b)
    }
}
