//! The `restore.snap` file: a fixed header, the serialized machine state, then guest
//! memory page-aligned so a restore maps it in place.

pub mod format;

pub use format::{read_snapshot, write_snapshot, SnapshotFile, FORMAT_VERSION, MAGIC};
