//! Guest memory: one region from guest physical 0. While booting it lives in a memfd
//! (so it can be written into a snapshot); after a restore it is the snapshot file itself,
//! mapped `MAP_PRIVATE | MAP_NORESERVE`: pages are read from the page cache on first touch
//! and copied only when the guest writes them.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::os::unix::io::FromRawFd;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap, MmapRegion,
};

use crate::error::{Result, VmmError};

pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

pub const PAGE_SIZE: usize = 4096;

/// Boot-time guest memory backed by an anonymous memfd, mapped shared.
pub fn create_memfd_memory(size: usize) -> Result<(GuestMemoryMmap, File)> {
    if size == 0 || size % PAGE_SIZE != 0 {
        return Err(VmmError::Memory(format!(
            "size {size} is not a positive multiple of {PAGE_SIZE}"
        )));
    }
    // SAFETY: memfd_create with a valid NUL-terminated name; the fd is checked below.
    let fd = unsafe { libc::memfd_create(c"supermachine-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(VmmError::io(
            "memfd_create",
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: fd is a freshly created descriptor we own.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size as u64)
        .map_err(|e| VmmError::io("sizing guest memory", e))?;
    let mem = map_file(&file, 0, size, libc::MAP_SHARED | libc::MAP_NORESERVE)?;
    Ok((mem, file))
}

/// Guest memory that is `file` from `offset`, copy-on-write (`MAP_PRIVATE`).
pub fn map_snapshot_memory(file: &File, offset: u64, size: usize) -> Result<GuestMemoryMmap> {
    map_file(file, offset, size, libc::MAP_PRIVATE | libc::MAP_NORESERVE)
}

fn map_file(file: &File, offset: u64, size: usize, flags: i32) -> Result<GuestMemoryMmap> {
    let dup = file
        .try_clone()
        .map_err(|e| VmmError::io("duplicating the memory fd", e))?;
    let region = vm_memory::mmap::MmapRegionBuilder::new(size)
        .with_file_offset(FileOffset::new(dup, offset))
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(flags)
        .build()
        .map_err(|e| VmmError::Memory(format!("mmap of {size} bytes: {e}")))?;
    let region: MmapRegion<()> = region;
    let region = GuestRegionMmap::new(region, GuestAddress(0))
        .ok_or_else(|| VmmError::Memory("region overflows the address space".into()))?;
    GuestMemoryMmap::from_regions(vec![region]).map_err(|e| VmmError::Memory(e.to_string()))
}

/// Address space set aside (and registered with KVM) before the snapshot to restore is
/// known. Registering guest memory is the slowest step of a restore on some hosts
/// (`KVM_SET_USER_MEMORY_REGION` of 128 MiB: 6 ms on a PVM host), so a prepared VM does it
/// ahead of time on this placeholder; the restore then maps the snapshot over it with
/// `MAP_FIXED`, and KVM's MMU notifiers see the new pages.
pub struct Reservation {
    addr: usize,
    size: usize,
}

impl Reservation {
    pub fn new(size: usize) -> Result<Self> {
        // SAFETY: a fresh anonymous mapping at an address the kernel picks; checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(VmmError::io(
                "reserving guest memory",
                std::io::Error::last_os_error(),
            ));
        }
        Ok(Self {
            addr: p as usize,
            size,
        })
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// Registers the placeholder as guest physical memory from 0.
    pub fn register(&self, vm: &VmFd) -> Result<()> {
        let r = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: self.size as u64,
            userspace_addr: self.addr as u64,
        };
        // SAFETY: the reservation is a live mapping of `size` bytes that outlives the VM
        // (MicroVm drops the VM and vCPUs before it).
        unsafe { vm.set_user_memory_region(r) }.map_err(VmmError::kvm("set_user_memory_region"))
    }

    /// Maps `file` from `offset` over the reservation, copy-on-write, and returns it as
    /// guest memory.
    pub fn map_snapshot(&self, file: &File, offset: u64) -> Result<GuestMemoryMmap> {
        let offset = libc::off_t::try_from(offset)
            .map_err(|_| VmmError::Memory(format!("offset {offset} too large")))?;
        // SAFETY: MAP_FIXED replaces exactly our own reservation (addr, size), which nothing
        // else references; the fd is valid for the call.
        let p = unsafe {
            libc::mmap(
                self.addr as *mut libc::c_void,
                self.size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
                std::os::unix::io::AsRawFd::as_raw_fd(file),
                offset,
            )
        };
        if p == libc::MAP_FAILED || p as usize != self.addr {
            return Err(VmmError::io(
                "mapping the snapshot over the reservation",
                std::io::Error::last_os_error(),
            ));
        }
        // SAFETY: (addr, size) is the page-aligned mapping just made; the region does not own
        // it (Reservation unmaps it) and lives no longer than the Reservation (MicroVm).
        let region = unsafe {
            MmapRegion::<()>::build_raw(
                self.addr as *mut u8,
                self.size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_NORESERVE,
            )
        }
        .map_err(|e| VmmError::Memory(e.to_string()))?;
        let region = GuestRegionMmap::new(region, GuestAddress(0))
            .ok_or_else(|| VmmError::Memory("region overflows the address space".into()))?;
        GuestMemoryMmap::from_regions(vec![region]).map_err(|e| VmmError::Memory(e.to_string()))
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        // SAFETY: our own mapping of `size` bytes at `addr`, no longer used by anyone.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.size) };
    }
}

/// Makes every region of `mem` guest physical memory of `vm`.
pub fn register(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<()> {
    for (slot, region) in mem.iter().enumerate() {
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|e| VmmError::Memory(e.to_string()))?;
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the region is a live mapping of `memory_size` bytes owned by `mem`,
        // which outlives the VM (both are dropped together by MicroVm, the VM first).
        unsafe { vm.set_user_memory_region(r) }.map_err(VmmError::kvm("set_user_memory_region"))?;
    }
    Ok(())
}

/// Writes guest memory to `out` at `offset`, skipping pages that are all zero (they stay
/// holes in a sparse file). Returns the number of bytes actually written.
pub fn dump(mem: &GuestMemoryMmap, out: &File, offset: u64) -> Result<u64> {
    let mut written = 0u64;
    let mut page = vec![0u8; PAGE_SIZE];
    for region in mem.iter() {
        let len = region.len() as usize;
        let mut at = 0usize;
        while at < len {
            let n = PAGE_SIZE.min(len - at);
            let buf = &mut page[..n];
            vm_memory::Bytes::read_slice(mem, buf, GuestAddress(region.start_addr().0 + at as u64))
                .map_err(|e| VmmError::Memory(e.to_string()))?;
            if buf.iter().any(|&b| b != 0) {
                out.write_all_at(buf, offset + region.start_addr().0 + at as u64)
                    .map_err(|e| VmmError::io("writing guest memory", e))?;
                written += n as u64;
            }
            at += n;
        }
    }
    let total: u64 = mem.iter().map(|r| r.len()).sum();
    out.set_len(offset + total)
        .map_err(|e| VmmError::io("sizing the memory section", e))?;
    (&*out)
        .flush()
        .map_err(|e| VmmError::io("flushing guest memory", e))?;
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn dump_and_map_private_round_trip() {
        let (mem, _fd) = create_memfd_memory(64 * PAGE_SIZE).unwrap();
        mem.write_obj(0xdead_beef_u32, GuestAddress(5 * PAGE_SIZE as u64 + 8))
            .unwrap();
        let f = tempfile::tempfile().unwrap();
        let written = dump(&mem, &f, PAGE_SIZE as u64).unwrap();
        assert_eq!(
            written, PAGE_SIZE as u64,
            "only the non-zero page is written"
        );
        let restored = map_snapshot_memory(&f, PAGE_SIZE as u64, 64 * PAGE_SIZE).unwrap();
        let v: u32 = restored
            .read_obj(GuestAddress(5 * PAGE_SIZE as u64 + 8))
            .unwrap();
        assert_eq!(v, 0xdead_beef);
        // Copy-on-write: the guest's write does not reach the file.
        restored.write_obj(1u32, GuestAddress(0)).unwrap();
        let mut b = [0u8; 4];
        f.read_exact_at(&mut b, PAGE_SIZE as u64).unwrap();
        assert_eq!(b, [0; 4]);
        // Out of bounds accesses are errors, not crashes.
        assert!(restored
            .read_obj::<u64>(GuestAddress(64 * PAGE_SIZE as u64 - 4))
            .is_err());
    }
}
