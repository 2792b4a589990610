//! A 9P2000.L file server for one exported host directory: what Linux's v9fs sends
//! (version, attach, walk, getattr/setattr, lopen/lcreate, read/write, readdir, mkdir,
//! symlink, link, mknod, rename(at), unlinkat, readlink, statfs, fsync, lock) is answered
//! from the directory; anything else gets an error.
//!
//! Confinement: a fid is a list of names below the export's root, each checked (no `/`,
//! no NUL, not `.` or `..`; `..` in a walk goes up a name and stops at the root). Every
//! host call resolves through `openat2(root, ..., RESOLVE_BENEATH | NO_SYMLINKS |
//! NO_MAGICLINKS | NO_XDEV)` to the parent directory and then acts on one name with an
//! `*at` call that does not follow a symlink there — so no name, symlink (the guest
//! resolves its own symlinks; the host never follows one) or mount point leads out.
//! A read-only export refuses every change with EROFS here, whatever the guest mounts.
//!
//! Bounds: messages are at most the negotiated msize (≤ [`MAX_MSIZE`]), replies fit the
//! buffer the guest gave, at most [`MAX_FIDS`] fids (only opened ones hold a descriptor).

use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use super::sys;
use super::wire::{self, error_reply, msg, Decoder, Encoder, Qid, Truncated};

/// The largest message either side may send (the guest asks for less: 256 KiB).
pub const MAX_MSIZE: u32 = 512 << 10;
/// The fewest bytes a negotiated msize may have (a Twrite header plus some data).
const MIN_MSIZE: u32 = 4096;
/// Fids one guest may hold at once (each a path; opened ones also a descriptor).
pub const MAX_FIDS: usize = 1 << 16;
/// Names in one Twalk (the protocol's MAXWELEM).
const MAX_WALK: usize = 16;
const NAME_MAX: usize = 255;
/// Rread / Rreaddir: header + count[4].
const IO_HEADER: usize = wire::HEADER_LEN + 4;
const VERSION_L: &[u8] = b"9P2000.L";
/// Tsetattr's valid bits.
const SET_MODE: u32 = 0x1;
const SET_UID: u32 = 0x2;
const SET_GID: u32 = 0x4;
const SET_SIZE: u32 = 0x8;
const SET_ATIME: u32 = 0x10;
const SET_MTIME: u32 = 0x20;
const SET_ATIME_SET: u32 = 0x80;
const SET_MTIME_SET: u32 = 0x100;
/// Rgetattr: the fields we fill (mode through blocks).
const GETATTR_BASIC: u64 = 0x7ff;
/// Tunlinkat's flag for a directory (Linux's AT_REMOVEDIR).
const AT_REMOVEDIR: u32 = 0x200;
/// Tlopen/Tlcreate flags we pass through (9P2000.L uses Linux's x86 values); O_CREAT,
/// O_EXCL, O_NOCTTY, O_DIRECT, O_NOATIME, O_PATH and the like are dropped.
const OPEN_FLAGS: i32 = libc::O_ACCMODE
    | libc::O_APPEND
    | libc::O_TRUNC
    | libc::O_DIRECTORY
    | libc::O_NONBLOCK
    | libc::O_DSYNC
    | libc::O_SYNC
    | libc::O_LARGEFILE;

/// A failed request: the Linux errno the guest gets in Rlerror.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Errno(pub i32);

impl From<io::Error> for Errno {
    fn from(e: io::Error) -> Self {
        Errno(e.raw_os_error().unwrap_or(libc::EIO))
    }
}

impl From<Truncated> for Errno {
    fn from(_: Truncated) -> Self {
        Errno(libc::EPROTO)
    }
}

type Reply = Result<Vec<u8>, Errno>;

/// One fid: where it points (names below the root) and, once opened, the open file.
struct Fid {
    path: Vec<CString>,
    file: Option<File>,
    writable: bool,
}

/// What a host call acts on: the root itself, or one name in a directory.
enum Target<'a> {
    Root,
    At(OwnedFd, &'a CStr),
}

pub struct Server {
    /// The export (opened read-only as a directory), or none: an unbound slot, which
    /// refuses to attach.
    root: Option<OwnedFd>,
    read_only: bool,
    msize: u32,
    fids: HashMap<u32, Fid>,
}

/// A name from the guest, for creating or walking to: one component.
fn check_name(raw: &[u8]) -> Result<CString, Errno> {
    if raw.is_empty() || raw == b"." || raw == b".." || raw.contains(&b'/') {
        return Err(Errno(libc::EINVAL));
    }
    if raw.len() > NAME_MAX {
        return Err(Errno(libc::ENAMETOOLONG));
    }
    CString::new(raw).map_err(|_| Errno(libc::EINVAL))
}

fn join(path: &[CString]) -> CString {
    if path.is_empty() {
        return CString::from(c".");
    }
    let mut v = Vec::new();
    for (i, n) in path.iter().enumerate() {
        if i > 0 {
            v.push(b'/');
        }
        v.extend_from_slice(n.as_bytes());
    }
    // Names hold no NUL (checked when they came in).
    CString::new(v).unwrap_or_default()
}

fn qid_of(st: &libc::stat) -> Qid {
    let kind = match st.st_mode & libc::S_IFMT {
        libc::S_IFDIR => wire::QTDIR,
        libc::S_IFLNK => wire::QTSYMLINK,
        _ => wire::QTFILE,
    };
    Qid {
        kind,
        version: st.st_mtime as u32 ^ (st.st_mtime_nsec as u32),
        path: st.st_ino,
    }
}

fn is_dir(st: &libc::stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFDIR
}

fn is_symlink(st: &libc::stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFLNK
}

/// A Tsetattr time: the given one, now, or left alone.
fn timespec(valid: u32, set: u32, given: u32, sec: u64, nsec: u64) -> libc::timespec {
    let (tv_sec, tv_nsec) = if valid & set == 0 {
        (0, libc::UTIME_OMIT)
    } else if valid & given != 0 {
        (sec as libc::time_t, (nsec % 1_000_000_000) as libc::c_long)
    } else {
        (0, libc::UTIME_NOW)
    };
    libc::timespec { tv_sec, tv_nsec }
}

impl Server {
    /// Serves `root` (or nothing, for an unbound slot). A root that is not an openable
    /// directory is an error here, named by the caller.
    pub fn new(root: Option<&Path>, read_only: bool) -> io::Result<Self> {
        let root = match root {
            Some(p) => Some(OwnedFd::from(
                std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_DIRECTORY)
                    .open(p)?,
            )),
            None => None,
        };
        Ok(Self {
            root,
            read_only,
            msize: MAX_MSIZE,
            fids: HashMap::new(),
        })
    }

    /// Fids in use: a snapshot is refused while the guest has the export mounted.
    pub fn fids_in_use(&self) -> usize {
        self.fids.len()
    }

    /// The largest message the guest may send now.
    pub fn msize(&self) -> u32 {
        self.msize
    }

    /// Answers one request; the reply fits in `room` bytes (empty when not even an error
    /// does: the request is then dropped).
    pub fn handle(&mut self, req: &[u8], room: usize) -> Vec<u8> {
        if req.len() < wire::HEADER_LEN {
            return Vec::new();
        }
        let kind = req[4];
        let tag = u16::from_le_bytes([req[5], req[6]]);
        let mut d = Decoder::new(&req[wire::HEADER_LEN..]);
        let reply = match self.dispatch(kind, tag, &mut d, room) {
            Ok(r) if r.len() <= room => r,
            Ok(_) => error_reply(tag, libc::ENOBUFS as u32),
            Err(Errno(e)) => error_reply(tag, e as u32),
        };
        if reply.len() > room {
            return Vec::new();
        }
        reply
    }

    fn root(&self) -> Result<BorrowedFd<'_>, Errno> {
        self.root
            .as_ref()
            .map(|r| r.as_fd())
            .ok_or(Errno(libc::ENOENT))
    }

    fn fid(&self, id: u32) -> Result<&Fid, Errno> {
        self.fids.get(&id).ok_or(Errno(libc::EBADF))
    }

    fn writable_export(&self) -> Result<(), Errno> {
        if self.read_only {
            Err(Errno(libc::EROFS))
        } else {
            Ok(())
        }
    }

    fn add_fid(&mut self, id: u32, fid: Fid) -> Result<(), Errno> {
        if !self.fids.contains_key(&id) && self.fids.len() >= MAX_FIDS {
            return Err(Errno(libc::EMFILE));
        }
        self.fids.insert(id, fid);
        Ok(())
    }

    /// `path` opened beneath the root (`flags` as for `openat2`).
    fn open_path(&self, path: &[CString], flags: i32) -> Result<OwnedFd, Errno> {
        Ok(sys::open_beneath(self.root()?, &join(path), flags)?)
    }

    fn dir(&self, path: &[CString]) -> Result<OwnedFd, Errno> {
        self.open_path(path, libc::O_PATH | libc::O_DIRECTORY)
    }

    fn target<'a>(&self, path: &'a [CString]) -> Result<Target<'a>, Errno> {
        match path.split_last() {
            None => Ok(Target::Root),
            Some((name, parent)) => Ok(Target::At(self.dir(parent)?, name.as_c_str())),
        }
    }

    fn lstat(&self, path: &[CString]) -> Result<libc::stat, Errno> {
        Ok(match self.target(path)? {
            Target::Root => sys::fstat(self.root()?)?,
            Target::At(dir, name) => sys::lstat_at(dir.as_fd(), name)?,
        })
    }

    /// The fid's attributes: from its open file if it has one (it may be unlinked).
    fn stat_fid(&self, fid: &Fid) -> Result<libc::stat, Errno> {
        match &fid.file {
            Some(f) => Ok(sys::fstat(f.as_fd())?),
            None => self.lstat(&fid.path),
        }
    }

    /// Every fid at or below `from` now points below `to` (a rename moved them).
    fn moved(&mut self, from: &[CString], to: &[CString]) {
        for fid in self.fids.values_mut() {
            if fid.path.starts_with(from) {
                let rest = fid.path.split_off(from.len());
                fid.path = to.iter().cloned().chain(rest).collect();
            }
        }
    }

    fn dispatch(&mut self, kind: u8, tag: u16, d: &mut Decoder, room: usize) -> Reply {
        let r = kind.wrapping_add(1);
        match kind {
            msg::TVERSION => self.version(tag, d),
            msg::TATTACH => self.attach(r, tag, d),
            msg::TWALK => self.walk(r, tag, d),
            msg::TCLUNK => {
                let id = d.u32()?;
                self.fids.remove(&id).ok_or(Errno(libc::EBADF))?;
                Ok(Encoder::new(r, tag).finish())
            }
            msg::TFLUSH => {
                // Requests are answered in order, so the one named is done already.
                d.u16()?;
                Ok(Encoder::new(r, tag).finish())
            }
            msg::TGETATTR => {
                let fid = self.fid(d.u32()?)?;
                d.u64()?;
                let st = self.stat_fid(fid)?;
                let mut e = Encoder::new(r, tag);
                e.u64(GETATTR_BASIC)
                    .qid(&qid_of(&st))
                    .u32(st.st_mode)
                    .u32(st.st_uid)
                    .u32(st.st_gid)
                    .u64(st.st_nlink)
                    .u64(st.st_rdev)
                    .u64(st.st_size as u64)
                    .u64(st.st_blksize as u64)
                    .u64(st.st_blocks as u64)
                    .u64(st.st_atime as u64)
                    .u64(st.st_atime_nsec as u64)
                    .u64(st.st_mtime as u64)
                    .u64(st.st_mtime_nsec as u64)
                    .u64(st.st_ctime as u64)
                    .u64(st.st_ctime_nsec as u64)
                    .u64(0)
                    .u64(0)
                    .u64(0)
                    .u64(0);
                Ok(e.finish())
            }
            msg::TSETATTR => self.setattr(r, tag, d),
            msg::TLOPEN => self.lopen(r, tag, d),
            msg::TLCREATE => self.lcreate(r, tag, d),
            msg::TREAD => self.read(r, tag, d, room),
            msg::TWRITE => self.write(r, tag, d),
            msg::TREADDIR => self.readdir(r, tag, d, room),
            msg::TMKDIR | msg::TSYMLINK | msg::TMKNOD => self.make(kind, tag, d),
            msg::TLINK => {
                let (dfid, fid, name) = (d.u32()?, d.u32()?, check_name(d.string()?)?);
                self.writable_export()?;
                let new_dir = self.dir(&self.fid(dfid)?.path)?;
                match self.target(&self.fid(fid)?.path)? {
                    Target::Root => return Err(Errno(libc::EPERM)),
                    Target::At(dir, old) => sys::link_at(dir.as_fd(), old, new_dir.as_fd(), &name)?,
                }
                Ok(Encoder::new(r, tag).finish())
            }
            msg::TRENAME => {
                let (id, dfid, name) = (d.u32()?, d.u32()?, check_name(d.string()?)?);
                self.writable_export()?;
                let from = self.fid(id)?.path.clone();
                let mut to = self.fid(dfid)?.path.clone();
                let new_dir = self.dir(&to)?;
                match self.target(&from)? {
                    Target::Root => return Err(Errno(libc::EBUSY)),
                    Target::At(dir, old) => {
                        sys::rename_at(dir.as_fd(), old, new_dir.as_fd(), &name)?
                    }
                }
                to.push(name);
                self.moved(&from, &to);
                Ok(Encoder::new(r, tag).finish())
            }
            msg::TRENAMEAT => {
                let old_dfid = d.u32()?;
                let old = check_name(d.string()?)?;
                let new_dfid = d.u32()?;
                let new = check_name(d.string()?)?;
                self.writable_export()?;
                let mut from = self.fid(old_dfid)?.path.clone();
                let mut to = self.fid(new_dfid)?.path.clone();
                let (a, b) = (self.dir(&from)?, self.dir(&to)?);
                sys::rename_at(a.as_fd(), &old, b.as_fd(), &new)?;
                from.push(old);
                to.push(new);
                self.moved(&from, &to);
                Ok(Encoder::new(r, tag).finish())
            }
            msg::TUNLINKAT => {
                let (dfid, name, flags) = (d.u32()?, check_name(d.string()?)?, d.u32()?);
                self.writable_export()?;
                let dir = self.dir(&self.fid(dfid)?.path)?;
                sys::unlink_at(dir.as_fd(), &name, flags & AT_REMOVEDIR != 0)?;
                Ok(Encoder::new(r, tag).finish())
            }
            msg::TREMOVE => {
                // The fid goes whether or not the remove works.
                let fid = self.fids.remove(&d.u32()?).ok_or(Errno(libc::EBADF))?;
                self.writable_export()?;
                let st = self.lstat(&fid.path)?;
                match self.target(&fid.path)? {
                    Target::Root => return Err(Errno(libc::EBUSY)),
                    Target::At(dir, name) => sys::unlink_at(dir.as_fd(), name, is_dir(&st))?,
                }
                Ok(Encoder::new(r, tag).finish())
            }
            msg::TREADLINK => {
                let fid = self.fid(d.u32()?)?;
                let target = match self.target(&fid.path)? {
                    Target::Root => return Err(Errno(libc::EINVAL)),
                    Target::At(dir, name) => sys::readlink_at(dir.as_fd(), name)?,
                };
                let mut e = Encoder::new(r, tag);
                e.string(&target);
                Ok(e.finish())
            }
            msg::TSTATFS => {
                self.fid(d.u32()?)?;
                let s = sys::fstatfs(self.root()?)?;
                let mut e = Encoder::new(r, tag);
                e.u32(s.f_type as u32)
                    .u32(s.f_bsize as u32)
                    .u64(s.f_blocks)
                    .u64(s.f_bfree)
                    .u64(s.f_bavail)
                    .u64(s.f_files)
                    .u64(s.f_ffree)
                    .u64(0)
                    .u32(s.f_namelen as u32);
                Ok(e.finish())
            }
            msg::TFSYNC => {
                let fid = self.fid(d.u32()?)?;
                let datasync = d.u32()? != 0;
                let opened;
                let file = match &fid.file {
                    Some(f) => f,
                    None => {
                        opened = File::from(self.open_path(&fid.path, libc::O_RDONLY)?);
                        &opened
                    }
                };
                if datasync {
                    file.sync_data()?;
                } else {
                    file.sync_all()?;
                }
                Ok(Encoder::new(r, tag).finish())
            }
            msg::TLOCK => {
                // Granted: byte-range locks are taken by the guest's own processes on
                // one VM's view; the host does not arbitrate between VMs (documented).
                self.fid(d.u32()?)?;
                let mut e = Encoder::new(r, tag);
                e.u8(0);
                Ok(e.finish())
            }
            msg::TGETLOCK => {
                self.fid(d.u32()?)?;
                let (_kind, start, len, proc_id) = (d.u8()?, d.u64()?, d.u64()?, d.u32()?);
                let client = d.string()?;
                let mut e = Encoder::new(r, tag);
                e.u8(libc::F_UNLCK as u8)
                    .u64(start)
                    .u64(len)
                    .u32(proc_id)
                    .string(client);
                Ok(e.finish())
            }
            msg::TXATTRWALK | msg::TXATTRCREATE | msg::TAUTH => Err(Errno(libc::EOPNOTSUPP)),
            _ => Err(Errno(libc::EOPNOTSUPP)),
        }
    }

    fn version(&mut self, tag: u16, d: &mut Decoder) -> Reply {
        let msize = d.u32()?;
        let version = d.string()?;
        // A new session: every fid of the old one is gone.
        self.fids.clear();
        self.msize = msize.clamp(MIN_MSIZE, MAX_MSIZE);
        let mut e = Encoder::new(msg::TVERSION + 1, tag);
        e.u32(self.msize);
        e.string(if version.starts_with(VERSION_L) {
            VERSION_L
        } else {
            b"unknown"
        });
        Ok(e.finish())
    }

    fn attach(&mut self, r: u8, tag: u16, d: &mut Decoder) -> Reply {
        let id = d.u32()?;
        let _afid = d.u32()?;
        let (_uname, _aname) = (d.string()?, d.string()?);
        if self.fids.contains_key(&id) {
            return Err(Errno(libc::EBADF));
        }
        let st = sys::fstat(self.root()?)?;
        self.add_fid(
            id,
            Fid {
                path: Vec::new(),
                file: None,
                writable: false,
            },
        )?;
        let mut e = Encoder::new(r, tag);
        e.qid(&qid_of(&st));
        Ok(e.finish())
    }

    fn walk(&mut self, r: u8, tag: u16, d: &mut Decoder) -> Reply {
        let (id, new_id, n) = (d.u32()?, d.u32()?, usize::from(d.u16()?));
        if n > MAX_WALK {
            return Err(Errno(libc::EINVAL));
        }
        let mut path = self.fid(id)?.path.clone();
        if new_id != id && self.fids.contains_key(&new_id) {
            return Err(Errno(libc::EBADF));
        }
        let mut qids = Vec::with_capacity(n);
        for i in 0..n {
            let raw = d.string()?;
            let step = if raw == b".." {
                path.pop();
                self.lstat(&path)
            } else {
                // Only directories are walked through: the parent is opened O_DIRECTORY,
                // so a file or symlink on the way ends the walk.
                check_name(raw).and_then(|name| {
                    path.push(name);
                    self.lstat(&path)
                })
            };
            match step {
                Ok(st) => qids.push(qid_of(&st)),
                Err(e) if i == 0 => return Err(e),
                Err(_) => break,
            }
        }
        // A partial walk names how far it got and makes no new fid.
        if qids.len() == n {
            self.add_fid(
                new_id,
                Fid {
                    path,
                    file: None,
                    writable: false,
                },
            )?;
        }
        let mut e = Encoder::new(r, tag);
        e.u16(qids.len() as u16);
        for q in &qids {
            e.qid(q);
        }
        Ok(e.finish())
    }

    fn open_flags(&self, flags: u32) -> Result<(i32, bool), Errno> {
        let flags = flags as i32 & OPEN_FLAGS;
        let writable = flags & libc::O_ACCMODE != libc::O_RDONLY;
        if self.read_only && (writable || flags & libc::O_TRUNC != 0) {
            return Err(Errno(libc::EROFS));
        }
        Ok((flags, writable))
    }

    fn lopen(&mut self, r: u8, tag: u16, d: &mut Decoder) -> Reply {
        let (id, flags) = (d.u32()?, d.u32()?);
        let (flags, writable) = self.open_flags(flags)?;
        let fid = self.fid(id)?;
        if fid.file.is_some() {
            return Err(Errno(libc::EBADF));
        }
        let file = File::from(self.open_path(&fid.path, flags | libc::O_NOFOLLOW)?);
        let st = sys::fstat(file.as_fd())?;
        if let Some(fid) = self.fids.get_mut(&id) {
            fid.file = Some(file);
            fid.writable = writable;
        }
        let mut e = Encoder::new(r, tag);
        e.qid(&qid_of(&st)).u32(0);
        Ok(e.finish())
    }

    fn lcreate(&mut self, r: u8, tag: u16, d: &mut Decoder) -> Reply {
        let (id, name) = (d.u32()?, check_name(d.string()?)?);
        let (flags, mode, _gid) = (d.u32()?, d.u32()?, d.u32()?);
        self.writable_export()?;
        let (flags, writable) = self.open_flags(flags)?;
        let fid = self.fid(id)?;
        if fid.file.is_some() {
            return Err(Errno(libc::EBADF));
        }
        let dir = self.dir(&fid.path)?;
        let file = File::from(sys::open_at(
            dir.as_fd(),
            &name,
            flags | libc::O_CREAT,
            mode & 0o7777,
        )?);
        let st = sys::fstat(file.as_fd())?;
        if let Some(fid) = self.fids.get_mut(&id) {
            fid.path.push(name);
            fid.file = Some(file);
            fid.writable = writable;
        }
        let mut e = Encoder::new(r, tag);
        e.qid(&qid_of(&st)).u32(0);
        Ok(e.finish())
    }

    /// Tmkdir, Tsymlink, Tmknod: a new name in a directory fid; replies its qid.
    fn make(&mut self, kind: u8, tag: u16, d: &mut Decoder) -> Reply {
        let (dfid, name) = (d.u32()?, check_name(d.string()?)?);
        self.writable_export()?;
        let dir = self.dir(&self.fid(dfid)?.path)?;
        match kind {
            msg::TMKDIR => {
                let (mode, _gid) = (d.u32()?, d.u32()?);
                sys::mkdir_at(dir.as_fd(), &name, mode & 0o7777)?;
            }
            msg::TSYMLINK => {
                let target = CString::new(d.string()?).map_err(|_| Errno(libc::EINVAL))?;
                let _gid = d.u32()?;
                sys::symlink_at(&target, dir.as_fd(), &name)?;
            }
            _ => {
                let (mode, _major, _minor, _gid) = (d.u32()?, d.u32()?, d.u32()?, d.u32()?);
                // FIFOs and sockets only: no device nodes on the host from a guest.
                match mode & libc::S_IFMT {
                    libc::S_IFIFO | libc::S_IFSOCK | libc::S_IFREG => {}
                    _ => return Err(Errno(libc::EPERM)),
                }
                sys::mknod_at(dir.as_fd(), &name, mode & (libc::S_IFMT | 0o7777))?;
            }
        }
        let st = sys::lstat_at(dir.as_fd(), &name)?;
        let mut e = Encoder::new(kind.wrapping_add(1), tag);
        e.qid(&qid_of(&st));
        Ok(e.finish())
    }

    fn setattr(&mut self, r: u8, tag: u16, d: &mut Decoder) -> Reply {
        let id = d.u32()?;
        let (valid, mode, uid, gid) = (d.u32()?, d.u32()?, d.u32()?, d.u32()?);
        let size = d.u64()?;
        let (a_sec, a_nsec, m_sec, m_nsec) = (d.u64()?, d.u64()?, d.u64()?, d.u64()?);
        self.writable_export()?;
        let fid = self.fid(id)?;
        let target = self.target(&fid.path)?;
        let root = self.root()?;
        if valid & SET_MODE != 0 {
            let mode = mode & 0o7777;
            match &target {
                Target::Root => sys::fchmod(root, mode)?,
                Target::At(dir, name) => {
                    if is_symlink(&sys::lstat_at(dir.as_fd(), name)?) {
                        return Err(Errno(libc::EOPNOTSUPP));
                    }
                    // Through a descriptor of the file itself where one can be had
                    // (no path is followed); else by name, checked just above.
                    let opened =
                        sys::open_at(dir.as_fd(), name, libc::O_RDONLY | libc::O_NONBLOCK, 0)
                            .or_else(|_| {
                                sys::open_at(
                                    dir.as_fd(),
                                    name,
                                    libc::O_WRONLY | libc::O_NONBLOCK,
                                    0,
                                )
                            });
                    match opened {
                        Ok(f) => sys::fchmod(f.as_fd(), mode)?,
                        Err(_) => sys::chmod_at(dir.as_fd(), name, mode)?,
                    }
                }
            }
        }
        if valid & (SET_UID | SET_GID) != 0 {
            let uid = if valid & SET_UID != 0 { uid } else { u32::MAX };
            let gid = if valid & SET_GID != 0 { gid } else { u32::MAX };
            let done = match &target {
                Target::Root => sys::fchown(root, uid, gid),
                Target::At(dir, name) => sys::chown_at(dir.as_fd(), name, uid, gid),
            };
            // Files belong to the export's owner (the VM runs as it): a guest's chown to
            // another user is not applied, as QEMU's security_model=none does.
            if let Err(e) = done {
                if !matches!(e.raw_os_error(), Some(libc::EPERM) | Some(libc::EINVAL)) {
                    return Err(e.into());
                }
            }
        }
        if valid & SET_SIZE != 0 {
            match &fid.file {
                Some(f) if fid.writable => f.set_len(size)?,
                _ => {
                    let f =
                        File::from(self.open_path(&fid.path, libc::O_WRONLY | libc::O_NOFOLLOW)?);
                    f.set_len(size)?;
                }
            }
        }
        if valid & (SET_ATIME | SET_MTIME) != 0 {
            let times = [
                timespec(valid, SET_ATIME, SET_ATIME_SET, a_sec, a_nsec),
                timespec(valid, SET_MTIME, SET_MTIME_SET, m_sec, m_nsec),
            ];
            match &target {
                Target::Root => sys::utimens_at(root, None, &times)?,
                Target::At(dir, name) => sys::utimens_at(dir.as_fd(), Some(name), &times)?,
            }
        }
        Ok(Encoder::new(r, tag).finish())
    }

    /// How many data bytes an Rread/Rreaddir may carry: what was asked, within msize and
    /// the guest's reply buffer.
    fn io_bytes(&self, room: usize, count: usize) -> usize {
        (self.msize as usize)
            .min(room)
            .saturating_sub(IO_HEADER)
            .min(count)
    }

    fn read(&mut self, r: u8, tag: u16, d: &mut Decoder, room: usize) -> Reply {
        let (id, offset, count) = (d.u32()?, d.u64()?, d.u32()? as usize);
        let file = self.fid(id)?.file.as_ref().ok_or(Errno(libc::EBADF))?;
        let max = self.io_bytes(room, count);
        let mut e = Encoder::new(r, tag);
        let buf = e.buffer();
        let at = buf.len();
        buf.resize(at + 4 + max, 0);
        let n = file.read_at(&mut buf[at + 4..], offset)?;
        buf.truncate(at + 4 + n);
        buf[at..at + 4].copy_from_slice(&(n as u32).to_le_bytes());
        Ok(e.finish())
    }

    fn write(&mut self, r: u8, tag: u16, d: &mut Decoder) -> Reply {
        let (id, offset, count) = (d.u32()?, d.u64()?, d.u32()? as usize);
        let data = d.bytes(count)?;
        let fid = self.fid(id)?;
        let file = fid.file.as_ref().ok_or(Errno(libc::EBADF))?;
        if !fid.writable {
            return Err(Errno(libc::EBADF));
        }
        file.write_all_at(data, offset)?;
        let mut e = Encoder::new(r, tag);
        e.u32(count as u32);
        Ok(e.finish())
    }

    fn readdir(&mut self, r: u8, tag: u16, d: &mut Decoder, room: usize) -> Reply {
        let (id, offset, count) = (d.u32()?, d.u64()?, d.u32()? as usize);
        let file = self.fid(id)?.file.as_ref().ok_or(Errno(libc::EBADF))?;
        let max = self.io_bytes(room, count);
        sys::seek_dir(file.as_fd(), offset)?;
        let mut out = Vec::new();
        let mut buf = vec![0u8; 32 << 10];
        'fill: loop {
            let n = sys::getdents(file.as_fd(), &mut buf)?;
            if n == 0 {
                break;
            }
            for ent in sys::dirents(&buf[..n]) {
                let len = wire::QID_LEN + 8 + 1 + 2 + ent.name.len();
                if out.len() + len > max {
                    break 'fill;
                }
                let kind = match ent.kind {
                    libc::DT_DIR => wire::QTDIR,
                    libc::DT_LNK => wire::QTSYMLINK,
                    _ => wire::QTFILE,
                };
                let mut e = Encoder::new(0, 0);
                e.qid(&Qid {
                    kind,
                    version: 0,
                    path: ent.ino,
                })
                .u64(ent.next)
                .u8(ent.kind)
                .string(ent.name);
                out.extend_from_slice(&e.buffer()[wire::HEADER_LEN..]);
            }
        }
        let mut e = Encoder::new(r, tag);
        e.u32(out.len() as u32).bytes(&out);
        Ok(e.finish())
    }
}
