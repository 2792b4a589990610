//! virtio-9p: a host directory served to the guest over 9P2000.L, in this process — it
//! needs no shared guest memory (unlike virtio-fs and its vhost-user daemon), so it works
//! with a copy-on-write (`MAP_PRIVATE`) restore. `wire.rs` is the message codec,
//! `server.rs` the file server confined to its directory, `sys.rs` the `*at` syscalls it
//! uses, `device.rs` the virtio device, `persist.rs` what a snapshot keeps (the tag, not
//! the directory: a restore binds one).

mod device;
mod persist;
mod server;
mod sys;
#[cfg(test)]
mod tests;
pub mod wire;

pub use device::{FsConfig, MAX_TAG_LEN, P9};
pub use persist::P9State;
pub use server::{Errno, Server, MAX_FIDS, MAX_MSIZE};
