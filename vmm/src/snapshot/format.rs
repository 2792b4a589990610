//! Layout (all integers little-endian):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `SMSNAP\0\1` |
//! | 8 | 4 | format version |
//! | 12 | 32 | vmm build id (NUL-padded) |
//! | 44 | 8 | state length |
//! | 52 | 4 | crc32 of the state |
//! | 56 | 8 | memory offset (page-aligned) |
//! | 64 | 8 | memory size |
//! | 4096 | state length | the `MicroVmState`, bincode 2 (serde) |
//! | memory offset | memory size | guest memory; all-zero pages are holes |

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{Result, VmmError};
use crate::vstate::memory::{self, GuestMemoryMmap, PAGE_SIZE};

pub const MAGIC: &[u8; 8] = b"SMSNAP\0\x01";
/// 2: vCPU state carries the XSAVE area past 4 KiB (KVM_GET_XSAVE2).
pub const FORMAT_VERSION: u32 = 2;
const HEADER_SIZE: usize = 72;
const STATE_OFFSET: u64 = 4096;
/// A state larger than this is not ours (devices and vCPUs serialize to a few hundred KiB).
const MAX_STATE: u64 = 64 << 20;

/// Identifies the VMM that wrote a snapshot; another build may lay out state differently.
pub fn build_id() -> [u8; 32] {
    let mut id = [0u8; 32];
    let s = concat!("supermachine-vmm ", env!("CARGO_PKG_VERSION"));
    let n = s.len().min(32);
    id[..n].copy_from_slice(&s.as_bytes()[..n]);
    id
}

fn bad(path: &Path, reason: impl Into<String>) -> VmmError {
    VmmError::Snapshot {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Writes state + memory to `path` atomically (temp file, fsync, rename).
pub fn write_snapshot<S: Serialize>(path: &Path, state: &S, mem: &GuestMemoryMmap) -> Result<u64> {
    let state = bincode::serde::encode_to_vec(state, bincode::config::standard())
        .map_err(|e| bad(path, format!("encoding the state: {e}")))?;
    let mem_offset =
        (STATE_OFFSET + state.len() as u64).div_ceil(PAGE_SIZE as u64) * PAGE_SIZE as u64;
    let mem_size: u64 = vm_memory::GuestMemoryBackend::iter(mem)
        .map(vm_memory::GuestMemoryRegion::len)
        .sum();
    let mut header = Vec::with_capacity(HEADER_SIZE);
    header.extend_from_slice(MAGIC);
    header.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    header.extend_from_slice(&build_id());
    header.extend_from_slice(&(state.len() as u64).to_le_bytes());
    header.extend_from_slice(&crc32fast::hash(&state).to_le_bytes());
    header.extend_from_slice(&mem_offset.to_le_bytes());
    header.extend_from_slice(&mem_size.to_le_bytes());

    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = tempfile::NamedTempFile::new_in(dir)
        .map_err(|e| VmmError::io(format!("creating a temp file in {}", dir.display()), e))?;
    let f = tmp.as_file();
    f.write_all_at(&header, 0)
        .and_then(|_| f.write_all_at(&state, STATE_OFFSET))
        .map_err(|e| VmmError::io("writing the snapshot state", e))?;
    let written = memory::dump(mem, f, mem_offset)?;
    f.sync_all()
        .map_err(|e| VmmError::io("fsync of the snapshot", e))?;
    tmp.persist(path)
        .map_err(|e| VmmError::io(format!("renaming into {}", path.display()), e.error))?;
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(written)
}

/// An opened, verified snapshot.
pub struct SnapshotFile {
    pub path: PathBuf,
    pub file: File,
    pub mem_offset: u64,
    pub mem_size: u64,
}

/// Opens `path`, checks magic, version, build id and the state's checksum, and decodes
/// the state. The memory section is left to be mapped.
pub fn read_snapshot<S: DeserializeOwned>(path: &Path) -> Result<(SnapshotFile, S)> {
    let (snapshot, state) = open_checked(path)?;
    // The limit bounds what a crafted length prefix can make the decoder allocate.
    let config = bincode::config::standard().with_limit::<{ MAX_STATE as usize }>();
    let (decoded, _) = bincode::serde::decode_from_slice(&state, config)
        .map_err(|e| bad(path, format!("decoding the state: {e}")))?;
    Ok((snapshot, decoded))
}

/// Checks `path` as [`read_snapshot`] does — header, sizes, the state's checksum — without
/// decoding the state or touching the memory section: cheap enough for every open.
pub fn verify_snapshot(path: &Path) -> Result<()> {
    open_checked(path).map(|_| ())
}

/// The opened file and its state section's bytes, both checked.
fn open_checked(path: &Path) -> Result<(SnapshotFile, Vec<u8>)> {
    let mut file =
        File::open(path).map_err(|e| VmmError::io(format!("opening {}", path.display()), e))?;
    let mut h = [0u8; HEADER_SIZE];
    file.read_exact(&mut h)
        .map_err(|_| bad(path, "shorter than a snapshot header"))?;
    if &h[0..8] != MAGIC {
        return Err(bad(path, "not a supermachine snapshot (bad magic)"));
    }
    let u32_at = |o: usize| u32::from_le_bytes([h[o], h[o + 1], h[o + 2], h[o + 3]]);
    let u64_at = |o: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&h[o..o + 8]);
        u64::from_le_bytes(a)
    };
    let version = u32_at(8);
    if version != FORMAT_VERSION {
        return Err(bad(
            path,
            format!("format version {version}, this build reads {FORMAT_VERSION}"),
        ));
    }
    if h[12..44] != build_id() {
        let theirs = String::from_utf8_lossy(&h[12..44])
            .trim_end_matches('\0')
            .to_string();
        return Err(bad(
            path,
            format!("written by {theirs:?}, not by this build"),
        ));
    }
    let state_len = u64_at(44);
    let crc = u32_at(52);
    let mem_offset = u64_at(56);
    let mem_size = u64_at(64);
    let file_len = file
        .metadata()
        .map_err(|e| VmmError::io(format!("reading {}", path.display()), e))?
        .len();
    if state_len > MAX_STATE
        || mem_offset % PAGE_SIZE as u64 != 0
        || mem_offset < STATE_OFFSET + state_len
        || mem_size == 0
        || mem_size % PAGE_SIZE as u64 != 0
        || mem_offset.checked_add(mem_size) != Some(file_len)
    {
        return Err(bad(path, "inconsistent header (truncated or damaged file)"));
    }
    let mut state = vec![0u8; state_len as usize];
    file.read_exact_at(&mut state, STATE_OFFSET)
        .map_err(|_| bad(path, "state section truncated"))?;
    if crc32fast::hash(&state) != crc {
        return Err(bad(path, "state checksum mismatch (corrupt state)"));
    }
    Ok((
        SnapshotFile {
            path: path.to_path_buf(),
            file,
            mem_offset,
            mem_size,
        },
        state,
    ))
}

impl SnapshotFile {
    /// The guest memory, mapped copy-on-write from the file.
    pub fn map_memory(&self) -> Result<GuestMemoryMmap> {
        let size = usize::try_from(self.mem_size)
            .map_err(|_| bad(&self.path, "memory size does not fit this host"))?;
        memory::map_snapshot_memory(&self.file, self.mem_offset, size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn round_trip_and_damage_detection() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("restore.snap");
        let (mem, _fd) = memory::create_memfd_memory(16 * PAGE_SIZE).unwrap();
        mem.write_obj(42u64, GuestAddress(3 * PAGE_SIZE as u64))
            .unwrap();
        let state = (String::from("vm state"), vec![1u32, 2, 3]);
        write_snapshot(&path, &state, &mem).unwrap();
        let (snap, back): (SnapshotFile, (String, Vec<u32>)) = read_snapshot(&path).unwrap();
        assert_eq!(back, state);
        let m = snap.map_memory().unwrap();
        assert_eq!(
            m.read_obj::<u64>(GuestAddress(3 * PAGE_SIZE as u64))
                .unwrap(),
            42
        );

        // A flipped state byte is a checksum error, a short file a header error.
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(b"X", STATE_OFFSET + 2).unwrap();
        let err = read_snapshot::<(String, Vec<u32>)>(&path).err().unwrap();
        assert!(err.to_string().contains("checksum"), "{err}");
        f.set_len(5000).unwrap();
        let err = read_snapshot::<(String, Vec<u32>)>(&path).err().unwrap();
        assert!(err.to_string().contains("inconsistent"), "{err}");
        std::fs::write(&path, b"garbage").unwrap();
        assert!(read_snapshot::<(String, Vec<u32>)>(&path).is_err());
    }

    #[test]
    fn a_crafted_length_prefix_is_an_error_not_an_allocation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("restore.snap");
        let (mem, _fd) = memory::create_memfd_memory(4 * PAGE_SIZE).unwrap();
        write_snapshot(&path, &vec![0u8; 16], &mem).unwrap();
        // A string of u64::MAX bytes, with a checksum that matches.
        let mut state = vec![0xfdu8];
        state.extend_from_slice(&u64::MAX.to_le_bytes());
        state.resize(17, 0);
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&state, STATE_OFFSET).unwrap();
        f.write_all_at(&crc32fast::hash(&state).to_le_bytes(), 52)
            .unwrap();
        let err = read_snapshot::<(String, Vec<u32>)>(&path).err().unwrap();
        assert!(err.to_string().contains("decoding the state"), "{err}");
    }
}
