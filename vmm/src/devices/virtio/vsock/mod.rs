//! virtio-vsock in userspace (this kind of host has no vhost-vsock). Mediates between
//! AF_VSOCK stream sockets in the guest and AF_UNIX sockets on the host: a host process
//! connects to the VM's unix socket and writes `CONNECT <port>\n`; once the guest accepts
//! it reads `OK <host port>\n` and the stream is spliced to the guest's port. A guest that
//! connects to the host (CID 2) on port P reaches a listener at `<uds path>_P`.
//!
//! `packet.rs` parses guest buffers (every length checked), `csm.rs` is one connection's
//! state and credit accounting, `muxer.rs` the host side, `device.rs` the virtio device,
//! `persist.rs` what a snapshot keeps (connections are dropped; the guest is told with a
//! TRANSPORT_RESET event after restore).

mod csm;
mod device;
pub mod muxer;
pub mod packet;
mod persist;
#[cfg(test)]
mod tests;

pub use device::Vsock;
pub use muxer::Muxer;
pub use persist::VsockState;

/// The host's CID, as the guest sees it.
pub const HOST_CID: u64 = 2;
/// The CID our VMs' guests get (any value ≥ 3 works: each VM has its own device, so every
/// guest can have the same one).
pub const GUEST_CID: u64 = 3;
