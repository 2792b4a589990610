//! The virtio-9p device: one request queue; each chain is a 9P message the guest wrote
//! (readable part) and room for the reply (writable part). Config space: the mount tag.

use std::io::{Read, Write};
use std::path::PathBuf;

use virtio_queue::DescriptorChain;

use super::server::Server;
use super::wire::HEADER_LEN;
use crate::devices::virtio::{QueueContext, VirtioDevice, TYPE_9P};
use crate::vstate::memory::GuestMemoryMmap;

pub const QUEUE_SIZE: u16 = 128;
/// The device has a mount tag in its config space.
const VIRTIO_9P_MOUNT_TAG: u64 = 1;
/// The longest mount tag the guest driver takes.
pub const MAX_TAG_LEN: usize = 32;

/// What one virtio-9p device exports, as the builder is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsConfig {
    /// The guest mounts the device by this name (`mount -t 9p TAG`).
    pub tag: String,
    /// The host directory, or none: an unbound slot (the guest cannot attach to it).
    pub root: Option<PathBuf>,
    /// The host refuses every change (EROFS).
    pub read_only: bool,
}

pub struct P9 {
    pub(super) config: FsConfig,
    server: Server,
}

impl P9 {
    pub fn new(config: &FsConfig) -> std::io::Result<Self> {
        if config.tag.is_empty() || config.tag.len() > MAX_TAG_LEN {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("9p mount tag {:?}: 1 to {MAX_TAG_LEN} bytes", config.tag),
            ));
        }
        Ok(Self {
            server: Server::new(config.root.as_deref(), config.read_only)?,
            config: config.clone(),
        })
    }

    /// Fids the guest holds (non-zero while it has the export mounted).
    pub fn fids_in_use(&self) -> usize {
        self.server.fids_in_use()
    }

    #[cfg(test)]
    pub(super) fn server_for_tests(&mut self) -> &mut Server {
        &mut self.server
    }

    /// Answers one chain; returns the bytes written into the guest's buffers.
    fn handle(&mut self, mem: &GuestMemoryMmap, chain: DescriptorChain<&GuestMemoryMmap>) -> u32 {
        let Ok(mut reader) = chain.clone().reader(mem) else {
            return 0;
        };
        let Ok(mut writer) = chain.writer(mem) else {
            return 0;
        };
        let mut size = [0u8; 4];
        if reader.read_exact(&mut size).is_err() {
            return 0;
        }
        let size = u32::from_le_bytes(size) as usize;
        if size < HEADER_LEN || size > self.server.msize() as usize {
            return 0; // not a message we can even answer: dropped
        }
        let mut req = vec![0u8; size];
        req[..4].copy_from_slice(&(size as u32).to_le_bytes());
        if reader.read_exact(&mut req[4..]).is_err() {
            return 0;
        }
        let reply = self.server.handle(&req, writer.available_bytes());
        if writer.write_all(&reply).is_err() {
            return 0;
        }
        writer.bytes_written() as u32
    }
}

impl VirtioDevice for P9 {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn device_type(&self) -> u32 {
        TYPE_9P
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        VIRTIO_9P_MOUNT_TAG
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_9p_config { le16 tag_len; u8 tag[tag_len]; }
        let mut config = (self.config.tag.len() as u16).to_le_bytes().to_vec();
        config.extend_from_slice(self.config.tag.as_bytes());
        crate::devices::virtio::read_config_bytes(&config, offset, data);
    }

    fn process_queue(&mut self, ctx: &mut QueueContext, index: usize) {
        ctx.serve_requests(index, |mem, chain| self.handle(mem, chain));
    }
}
