//! virtio-blk, read-only: image layers (squashfs) and root filesystems as `/dev/vdX`.
//! Requests are parsed from guest descriptor chains with virtio-queue's Reader/Writer, so
//! every guest address and length is checked; sectors are checked against the capacity.

mod device;
mod persist;

pub use device::Block;
pub use persist::BlockState;
