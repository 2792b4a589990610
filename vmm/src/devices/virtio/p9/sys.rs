//! The `*at` syscalls the 9P server is built on, as safe wrappers: each takes a directory
//! fd and one name (or a path that `openat2` resolves beneath the export's root), so no
//! call ever resolves a path from the process's own root or working directory.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// `openat2`'s `resolve` flags: stay beneath the directory, follow no symlink and no
/// `/proc` magic link, cross no mount point.
pub const RESOLVE_CONFINED: u64 = 0x08 /* BENEATH */ | 0x04 /* NO_SYMLINKS */
    | 0x02 /* NO_MAGICLINKS */ | 0x01 /* NO_XDEV */;

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// `openat2(dir, path, flags)` with [`RESOLVE_CONFINED`]: `path` cannot leave `dir`.
pub fn open_beneath(dir: BorrowedFd, path: &CStr, flags: i32) -> io::Result<OwnedFd> {
    let how = OpenHow {
        flags: (flags | libc::O_CLOEXEC) as u32 as u64,
        mode: 0,
        resolve: RESOLVE_CONFINED,
    };
    // SAFETY: `path` is NUL-terminated, `how` is a valid open_how of the size passed; the
    // returned descriptor is new and owned by us.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            path.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor the kernel just gave us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// `openat(dir, name, flags, mode)` for one name (no `/`) in `dir`, never following a
/// symlink at `name` (the caller adds nothing that would).
pub fn open_at(dir: BorrowedFd, name: &CStr, flags: i32, mode: u32) -> io::Result<OwnedFd> {
    // SAFETY: `name` is NUL-terminated; the returned descriptor is new and owned by us.
    let fd = cvt(unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            flags | libc::O_CLOEXEC | libc::O_NOFOLLOW,
            mode as libc::c_uint,
        )
    })?;
    // SAFETY: a descriptor the kernel just gave us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub fn fstat(fd: BorrowedFd) -> io::Result<libc::stat> {
    // SAFETY: `st` is written by the kernel before it is read.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        cvt(libc::fstat(fd.as_raw_fd(), &mut st))?;
        Ok(st)
    }
}

/// `lstat` of `name` in `dir` (a symlink is described, not followed).
pub fn lstat_at(dir: BorrowedFd, name: &CStr) -> io::Result<libc::stat> {
    // SAFETY: as `fstat`; `name` is NUL-terminated.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        cvt(libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            &mut st,
            libc::AT_SYMLINK_NOFOLLOW,
        ))?;
        Ok(st)
    }
}

pub fn fstatfs(fd: BorrowedFd) -> io::Result<libc::statfs> {
    // SAFETY: `st` is written by the kernel before it is read.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        cvt(libc::fstatfs(fd.as_raw_fd(), &mut st))?;
        Ok(st)
    }
}

pub fn mkdir_at(dir: BorrowedFd, name: &CStr, mode: u32) -> io::Result<()> {
    // SAFETY: NUL-terminated name; no memory is handed to the kernel beyond it.
    cvt(unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), mode as libc::mode_t) })?;
    Ok(())
}

pub fn mknod_at(dir: BorrowedFd, name: &CStr, mode: u32) -> io::Result<()> {
    // SAFETY: as `mkdir_at`.
    cvt(unsafe { libc::mknodat(dir.as_raw_fd(), name.as_ptr(), mode as libc::mode_t, 0) })?;
    Ok(())
}

/// A symlink `name` in `dir` holding `target` (stored, never resolved by us).
pub fn symlink_at(target: &CStr, dir: BorrowedFd, name: &CStr) -> io::Result<()> {
    // SAFETY: both strings are NUL-terminated.
    cvt(unsafe { libc::symlinkat(target.as_ptr(), dir.as_raw_fd(), name.as_ptr()) })?;
    Ok(())
}

/// A hard link: `new_dir/new_name` for `old_dir/old_name` (a symlink is linked itself).
pub fn link_at(
    old_dir: BorrowedFd,
    old_name: &CStr,
    new_dir: BorrowedFd,
    new_name: &CStr,
) -> io::Result<()> {
    // SAFETY: NUL-terminated names; flags 0: a trailing symlink is not followed.
    cvt(unsafe {
        libc::linkat(
            old_dir.as_raw_fd(),
            old_name.as_ptr(),
            new_dir.as_raw_fd(),
            new_name.as_ptr(),
            0,
        )
    })?;
    Ok(())
}

pub fn rename_at(
    old_dir: BorrowedFd,
    old_name: &CStr,
    new_dir: BorrowedFd,
    new_name: &CStr,
) -> io::Result<()> {
    // SAFETY: NUL-terminated names.
    cvt(unsafe {
        libc::renameat(
            old_dir.as_raw_fd(),
            old_name.as_ptr(),
            new_dir.as_raw_fd(),
            new_name.as_ptr(),
        )
    })?;
    Ok(())
}

pub fn unlink_at(dir: BorrowedFd, name: &CStr, remove_dir: bool) -> io::Result<()> {
    let flags = if remove_dir { libc::AT_REMOVEDIR } else { 0 };
    // SAFETY: NUL-terminated name.
    cvt(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), flags) })?;
    Ok(())
}

pub fn readlink_at(dir: BorrowedFd, name: &CStr) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize];
    // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`.
    let n = unsafe {
        libc::readlinkat(
            dir.as_raw_fd(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(buf)
}

pub fn fchmod(fd: BorrowedFd, mode: u32) -> io::Result<()> {
    // SAFETY: plain syscall on a descriptor we own.
    cvt(unsafe { libc::fchmod(fd.as_raw_fd(), mode as libc::mode_t) })?;
    Ok(())
}

/// chmod of `name` in `dir`. Follows a symlink at `name` (the kernel has no flag for not
/// doing so before 6.6): callers check first that it is none.
pub fn chmod_at(dir: BorrowedFd, name: &CStr, mode: u32) -> io::Result<()> {
    // SAFETY: NUL-terminated name.
    cvt(unsafe { libc::fchmodat(dir.as_raw_fd(), name.as_ptr(), mode as libc::mode_t, 0) })?;
    Ok(())
}

/// lchown of `name` in `dir` (`u32::MAX` leaves an id as it is); a symlink is not followed.
pub fn chown_at(dir: BorrowedFd, name: &CStr, uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: NUL-terminated name.
    cvt(unsafe {
        libc::fchownat(
            dir.as_raw_fd(),
            name.as_ptr(),
            uid,
            gid,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    Ok(())
}

pub fn fchown(fd: BorrowedFd, uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: plain syscall on a descriptor we own.
    cvt(unsafe { libc::fchown(fd.as_raw_fd(), uid, gid) })?;
    Ok(())
}

/// Sets atime and mtime of `name` in `dir` (`None`: of `dir` itself); a symlink is not
/// followed.
pub fn utimens_at(
    dir: BorrowedFd,
    name: Option<&CStr>,
    times: &[libc::timespec; 2],
) -> io::Result<()> {
    // SAFETY: `times` points at two timespecs; the name, if any, is NUL-terminated.
    cvt(unsafe {
        match name {
            Some(n) => libc::utimensat(
                dir.as_raw_fd(),
                n.as_ptr(),
                times.as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
            ),
            None => libc::futimens(dir.as_raw_fd(), times.as_ptr()),
        }
    })?;
    Ok(())
}

/// Positions a directory stream at `offset` (a cookie `getdents64` returned).
pub fn seek_dir(fd: BorrowedFd, offset: u64) -> io::Result<()> {
    // SAFETY: plain syscall on a descriptor we own.
    let r = unsafe { libc::lseek(fd.as_raw_fd(), offset as libc::off_t, libc::SEEK_SET) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Fills `buf` with `linux_dirent64` records; 0 at the end of the directory.
pub fn getdents(fd: BorrowedFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`.
    let n = unsafe {
        libc::syscall(
            libc::SYS_getdents64,
            fd.as_raw_fd(),
            buf.as_mut_ptr(),
            buf.len(),
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// One `linux_dirent64` record: inode, the cookie of the next record, type, name.
pub struct Dirent<'a> {
    pub ino: u64,
    pub next: u64,
    pub kind: u8,
    pub name: &'a [u8],
}

/// The records `getdents` put in `buf` (the kernel's own output, still parsed with bounds
/// checks: a record that does not fit ends the walk).
pub fn dirents(buf: &[u8]) -> impl Iterator<Item = Dirent<'_>> {
    let mut at = 0usize;
    std::iter::from_fn(move || {
        let rec = buf.get(at..at.checked_add(19)?)?;
        let ino = u64::from_ne_bytes(rec[0..8].try_into().ok()?);
        let next = u64::from_ne_bytes(rec[8..16].try_into().ok()?);
        let reclen = usize::from(u16::from_ne_bytes(rec[16..18].try_into().ok()?));
        let kind = rec[18];
        let whole = buf.get(at..at.checked_add(reclen)?)?;
        if reclen < 20 {
            return None;
        }
        let raw = &whole[19..];
        let name = &raw[..raw.iter().position(|&b| b == 0).unwrap_or(raw.len())];
        at += reclen;
        Some(Dirent {
            ino,
            next,
            kind,
            name,
        })
    })
}
