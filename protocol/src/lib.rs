//! Wire types shared by the host and the guest: the run configuration the host bakes into
//! the initramfs, the events the guest's init sends back over its control channel, and the
//! length-prefixed frame codec both ends use. Everything arriving from the guest is hostile,
//! so decoding is bounded and never panics.

pub mod agent;
pub mod config;
pub mod event;
pub mod frame;
pub mod worker;

pub use config::{
    LayerMount, RunConfig, VolumeMount, CONFIG_PATH, LAYER_SERIAL_PREFIX, VOLUME_TAG_PREFIX,
};
pub use event::{ExitStatus, GuestEvent, HostCommand, OutputStream};
pub use frame::{decode_frame, encode_frame, write_frame, FrameError, FrameReader, MAX_FRAME_LEN};
