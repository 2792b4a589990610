//! The worker's jail, entered before any guest byte is processed: a VMM escape lands in a
//! process that sees nothing of the host and can do little with what it sees.
//!
//! [`enter`] does, in this order:
//! 1. as root, picks a uid from the configured range that no live worker holds (an flock
//!    on `/run/supermachine/uids/UID.lock`, held by the waiter below for the VM's life);
//!    as any other user, the VM keeps that user's uid and gets a user namespace of its
//!    own (below), where the kernel allows unprivileged ones;
//! 2. creates the VM's cgroup with its memory, pids and cpu limits ([`cgroup`]): as root
//!    under `supermachine/`; as another user inside the group delegated to it
//!    (`--jail-cgroup`), else none (creating cgroups elsewhere needs root);
//! 3. unshares the pid namespace (and first, when not root, the user namespace, with only
//!    the worker's own uid and gid mapped, at the same numbers) and forks: the child is
//!    pid 1 of the new pid namespace and becomes the worker; the parent stays outside as a
//!    small waiter that puts the child in the cgroup, reaps it, removes the cgroup and
//!    exits as the child did (the same exit code, or the same signal); the child unshares
//!    the mount, ipc, uts and network namespaces;
//! 4. in the child: a new root (tmpfs) holding only the VM's files (the snapshot directory,
//!    kernel and layer files read-only; its run directory read-write; for QEMU the system's
//!    `/usr` read-only), private `/dev` nodes (`/dev/kvm` owned by the VM's uid; in a user
//!    namespace, where mknod is not allowed, the host's nodes bound), its own `/proc` and
//!    `/tmp`; `pivot_root` into it, the old root detached;
//! 5. loopback up (QEMU's user-mode network and its forwarded port live in this netns);
//! 6. no supplementary groups (in a user namespace the kernel keeps the ones the user
//!    had: `setgroups` is denied there), the uid/gid, an empty capability bounding set and
//!    no capability in any set, `no_new_privs`, no core dumps; every inherited descriptor
//!    but stdio and the control socket closed.
//!
//! The seccomp filter ([`seccomp`]) comes later, once the VM monitor is prepared.

pub mod cgroup;
pub mod config;
pub mod seccomp;

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::CloneFlags;
use nix::unistd::{ForkResult, Gid, Uid};

pub use config::JailConfig;

#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("jail: no free uid in {0}-{1} (each live worker holds one)")]
    NoFreeUid(u32, u32),
    #[error("jail: cgroup {path}: {detail}")]
    Cgroup { path: PathBuf, detail: String },
    #[error("jail: {what}: {source}")]
    Sys {
        what: String,
        source: std::io::Error,
    },
    #[error("jail: seccomp: {0}")]
    Seccomp(String),
    #[error(
        "jail: not root, and this kernel refused an unprivileged user namespace ({0}); \
         allow them (sysctl user.max_user_namespaces, kernel.unprivileged_userns_clone), \
         run as root, or pass --no-jail (SUPERMACHINE_NO_JAIL=1) to run VMs unjailed"
    )]
    NoUserNamespace(std::io::Error),
    #[error("jail: {0}")]
    VolumeOwner(String),
}

fn sys(what: impl Into<String>) -> impl FnOnce(nix::errno::Errno) -> JailError {
    let what = what.into();
    move |e| JailError::Sys {
        what,
        source: std::io::Error::from(e),
    }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> JailError {
    let what = what.into();
    move |source| JailError::Sys { what, source }
}

/// What a VM's root holds besides /dev, /proc and /tmp.
#[derive(Debug, Default, Clone)]
pub struct JailPaths {
    /// Bound read-only at the same path: the snapshot directory, kernel, layer files.
    pub read_only: Vec<PathBuf>,
    /// Bound read-write at the same path and made the VM uid's: its run directory.
    pub owned: Vec<PathBuf>,
    /// Bound with a writable mount at the same path, ownership untouched.
    pub read_write: Vec<PathBuf>,
    /// The system's programs and libraries, read-only (QEMU and what it spawns).
    pub system: bool,
    /// The VM's volumes (host directory, read-only?), bound at the same path. As root, a
    /// VM with volumes runs as their owner instead of a uid of the range, so what the
    /// guest writes belongs to that user on the host.
    pub volumes: Vec<(PathBuf, bool)>,
}

/// What the worker knows of its jail once inside.
#[derive(Debug)]
pub struct Jailed {
    pub uid: u32,
    pub gid: u32,
    /// In a user namespace of its own (not started as root): no uid of its own, no cgroup.
    pub user_ns: bool,
}

const UID_LOCKS: &str = "/run/supermachine/uids";
/// Each worker mounts its own root here, in its own mount namespace (as root).
const ROOT_MOUNT: &str = "/run/supermachine/jail";
/// ... or, not root, here in its own temp dir (the host's run directory for it).
const USER_ROOT_MOUNT: &str = ".jail-root";
/// Where the system's files come from for QEMU (usr-merged Debian: /bin, /lib, /lib64 and
/// /sbin are links into /usr, recreated as links).
const SYSTEM_DIRS: &[&str] = &["/usr", "/bin", "/sbin", "/lib", "/lib64"];
const SYSTEM_FILES: &[&str] = &["/etc/ld.so.cache"];
/// linux/capability.h
const CAP_SETGID: i32 = 6;
const CAP_SETUID: i32 = 7;

/// Enters the jail (see the module doc). Returns in the jailed child only; the calling
/// process becomes the waiter and never returns. `control_fd` stays open in the child.
pub fn enter(
    cfg: &JailConfig,
    paths: &JailPaths,
    guest_memory_mib: u32,
    control_fd: RawFd,
) -> Result<Jailed, JailError> {
    let user_ns = !Uid::effective().is_root();
    let memory_mib = cfg
        .memory_max_mib
        .unwrap_or(guest_memory_mib.saturating_add(cfg.memory_overhead_mib));
    let limits = cgroup::Limits {
        memory_bytes: u64::from(memory_mib) << 20,
        pids: cfg.pids_max,
        cpus: cfg.cpus,
    };
    let (uid, gid, uid_lock, cg, root_mount) = if user_ns {
        let root_mount = std::env::temp_dir().join(USER_ROOT_MOUNT);
        let (u, g) = (Uid::effective().as_raw(), Gid::effective().as_raw());
        // A group of its own only inside one delegated to this user.
        let cg = match &cfg.cgroup {
            Some(parent) => Some(cgroup::Cgroup::create_delegated(
                parent,
                &format!("vm-{}", std::process::id()),
                &limits,
            )?),
            None => None,
        };
        (u, g, None, cg, root_mount)
    } else {
        let (uid, gid, uid_lock, cg_name) = match volume_owner(&paths.volumes)? {
            // Not a uid of its own: the cgroup is named by this process instead.
            Some((u, g)) => (u, g, None, format!("vm-p{}", std::process::id())),
            None => {
                let (u, lock) = allocate_uid(cfg.uids)?;
                (u, u, Some(lock), format!("vm-{u}"))
            }
        };
        let cg = cgroup::Cgroup::create(&cg_name, &limits)?;
        (uid, gid, uid_lock, Some(cg), PathBuf::from(ROOT_MOUNT))
    };
    let remove_cg = || {
        if let Some(cg) = &cg {
            cg.remove();
        }
    };
    std::fs::create_dir_all(&root_mount).map_err(|e| {
        remove_cg();
        io(format!("creating {}", root_mount.display()))(e)
    })?;
    if user_ns {
        // First, so that every namespace unshared below belongs to it.
        nix::sched::unshare(CloneFlags::CLONE_NEWUSER)
            .map_err(|e| JailError::NoUserNamespace(e.into()))?;
        map_own_ids(uid, gid)?;
    }
    // The pid namespace is for the child only (it is its pid 1). The others are unshared
    // by the child itself: a pivot_root moves every process of a mount namespace, and the
    // waiter must keep the host's view (it removes the cgroup).
    nix::sched::unshare(CloneFlags::CLONE_NEWPID).map_err(|e| {
        remove_cg();
        sys("unsharing the pid namespace")(e)
    })?;
    let (go_rx, go_tx) = nix::unistd::pipe().map_err(sys("pipe"))?;
    // SAFETY: the worker is single-threaded here (no thread has been started yet), so the
    // child may use the allocator and std freely.
    match unsafe { nix::unistd::fork() }.map_err(sys("fork"))? {
        ForkResult::Parent { child } => {
            drop(go_rx);
            wait_as_waiter(child, go_tx, cg.as_ref(), uid_lock, control_fd)
        }
        ForkResult::Child => {
            drop(go_tx);
            drop(uid_lock);
            // SAFETY: prctl only sets this process's own death signal.
            unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
            let mut b = [0u8; 1];
            // The waiter writes one byte once we are in the cgroup; nothing means it died.
            let n = nix::unistd::read(go_rx.as_raw_fd(), &mut b).unwrap_or(0);
            drop(go_rx);
            if n != 1 {
                std::process::exit(1);
            }
            close_inherited(control_fd);
            nix::sched::unshare(
                CloneFlags::CLONE_NEWNS
                    | CloneFlags::CLONE_NEWIPC
                    | CloneFlags::CLONE_NEWUTS
                    | CloneFlags::CLONE_NEWNET,
            )
            .map_err(sys("unsharing namespaces"))?;
            if !user_ns {
                readable_by_all(&paths.read_only)?;
            }
            build_root(paths, (uid, gid), &root_mount, user_ns)?;
            nix::unistd::sethostname("supermachine").map_err(sys("sethostname"))?;
            loopback_up()?;
            // What this process executes from now on (QEMU) gets no capability but the two
            // that its `-runas` needs (none in a user namespace: QEMU starts as the VM's
            // uid); this process keeps its own until drop_privileges.
            trim_bounding_set(if user_ns {
                &[]
            } else {
                &[CAP_SETGID, CAP_SETUID]
            });
            Ok(Jailed { uid, gid, user_ns })
        }
    }
}

/// The waiter: puts the child in the cgroup, lets it go, reaps it, cleans up, and ends
/// this process as the child ended.
fn wait_as_waiter(
    child: nix::unistd::Pid,
    go: OwnedFd,
    cg: Option<&cgroup::Cgroup>,
    uid_lock: Option<std::fs::File>,
    control_fd: RawFd,
) -> ! {
    // The control socket is the child's: the host must see it close when the child dies.
    // SAFETY: this descriptor is ours (passed by the host) and used by the child only.
    drop(unsafe { OwnedFd::from_raw_fd(control_fd) });
    if let Some(cg) = cg {
        if let Err(e) = cg.attach(child.as_raw() as u32) {
            eprintln!("supermachine-worker: {e}");
            let _ = nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL);
            let _ = nix::sys::wait::waitpid(child, None);
            cg.remove();
            std::process::exit(1);
        }
    }
    let _ = nix::unistd::write(&go, &[1]);
    drop(go);
    use nix::sys::wait::WaitStatus;
    let status = loop {
        match nix::sys::wait::waitpid(child, None) {
            Ok(s @ (WaitStatus::Exited(..) | WaitStatus::Signaled(..))) => break s,
            Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => break WaitStatus::Exited(child, 1),
        }
    };
    if let Some(cg) = cg {
        cg.remove();
    }
    drop(uid_lock);
    match status {
        // Die of the same signal, so the host sees a SIGKILL (the OOM killer) as such.
        WaitStatus::Signaled(_, sig, _) => die_of(sig),
        // The jailed worker is pid 1 of its namespace, which no signal of its own kills:
        // its SIGSYS handler exits with 128 + SIGSYS instead, and the waiter dies of it.
        WaitStatus::Exited(_, code) if code == seccomp::EXIT_SECCOMP => {
            die_of(nix::sys::signal::Signal::SIGSYS)
        }
        WaitStatus::Exited(_, code) => std::process::exit(code),
        _ => std::process::exit(1),
    }
}

/// Ends this process by `sig` (default action, no core file).
fn die_of(sig: nix::sys::signal::Signal) -> ! {
    let no_core = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on this process; `no_core` outlives the call.
    unsafe {
        libc::setrlimit(libc::RLIMIT_CORE, &no_core);
        libc::signal(sig as i32, libc::SIG_DFL);
        libc::raise(sig as i32);
    }
    std::process::exit(128 + sig as i32)
}

/// The uid and gid owning every volume directory (`None` without volumes). Root, or two
/// owners, is refused: a jailed VM never runs as root, and has one uid.
fn volume_owner(volumes: &[(PathBuf, bool)]) -> Result<Option<(u32, u32)>, JailError> {
    use std::os::unix::fs::MetadataExt;
    let mut owner: Option<(u32, u32, &Path)> = None;
    for (p, _) in volumes {
        let m = std::fs::metadata(p).map_err(io(format!("volume {}", p.display())))?;
        if m.uid() == 0 {
            return Err(JailError::VolumeOwner(format!(
                "volume {} is owned by root, and a jailed VM never runs as root: give the \
                 directory to the user who should own what the VM writes (chown), or run \
                 unjailed (--no-jail, SUPERMACHINE_NO_JAIL=1)",
                p.display()
            )));
        }
        match owner {
            Some((u, _, first)) if u != m.uid() => {
                return Err(JailError::VolumeOwner(format!(
                    "volumes {} (uid {u}) and {} (uid {}) have different owners; a VM runs \
                     as one uid",
                    first.display(),
                    p.display(),
                    m.uid()
                )))
            }
            Some(_) => {}
            None => owner = Some((m.uid(), m.gid(), p)),
        }
    }
    Ok(owner.map(|(u, g, _)| (u, g)))
}

/// A uid of the range no live worker holds, with the lock that holds it.
fn allocate_uid((first, last): (u32, u32)) -> Result<(u32, std::fs::File), JailError> {
    std::fs::create_dir_all(UID_LOCKS).map_err(io(format!("creating {UID_LOCKS}")))?;
    let span = u64::from(last - first) + 1;
    // Start where this process's pid points, so concurrent workers rarely contend.
    let start = u64::from(std::process::id()) % span;
    for i in 0..span {
        let uid = first + ((start + i) % span) as u32;
        let path = Path::new(UID_LOCKS).join(format!("{uid}.lock"));
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io(format!("opening {}", path.display())))?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok((uid, f));
        }
    }
    Err(JailError::NoFreeUid(first, last))
}

/// In a user namespace just unshared: this process's own uid and gid, at the same numbers
/// (the only mapping a user may write for itself; `setgroups` must be denied first).
fn map_own_ids(uid: u32, gid: u32) -> Result<(), JailError> {
    for (file, text) in [
        ("/proc/self/setgroups", "deny".to_string()),
        ("/proc/self/uid_map", format!("{uid} {uid} 1")),
        ("/proc/self/gid_map", format!("{gid} {gid} 1")),
    ] {
        std::fs::write(file, text).map_err(io(format!("writing {file}")))?;
    }
    Ok(())
}

/// Closes every descriptor but stdio and the control socket (the host's leaks and ours).
fn close_inherited(control_fd: RawFd) {
    let keep = control_fd.max(2);
    // SAFETY: close_range closes descriptors of this process only; nothing we hold
    // (std's own handles are all stdio here) is among them.
    unsafe {
        for fd in 3..keep {
            if fd != control_fd {
                libc::close(fd);
            }
        }
        libc::syscall(libc::SYS_close_range, keep + 1, u32::MAX, 0);
    }
}

fn mkdirs(p: &Path) -> Result<(), JailError> {
    std::fs::create_dir_all(p).map_err(io(format!("creating {}", p.display())))
}

/// `root` + absolute `p`.
fn under(root: &Path, p: &Path) -> PathBuf {
    root.join(p.strip_prefix("/").unwrap_or(p))
}

/// Binds `src` at the same path under `root`, with `flags` (on top of the source mount's
/// own). `recursive`: with the mounts below it (not for a run directory, which in a user
/// namespace holds the new root's own mount point).
fn bind(src: &Path, root: &Path, flags: MsFlags, recursive: bool) -> Result<(), JailError> {
    let dst = under(root, src);
    let meta = std::fs::metadata(src).map_err(io(format!("{}", src.display())))?;
    if meta.is_dir() {
        mkdirs(&dst)?;
    } else {
        if let Some(parent) = dst.parent() {
            mkdirs(parent)?;
        }
        std::fs::File::create(&dst).map_err(io(format!("creating {}", dst.display())))?;
    }
    let what = format!("binding {}", src.display());
    let rec = if recursive {
        MsFlags::MS_REC
    } else {
        MsFlags::empty()
    };
    mount(
        Some(src),
        &dst,
        None::<&str>,
        MsFlags::MS_BIND | rec,
        None::<&str>,
    )
    .map_err(sys(what.clone()))?;
    remount_bind(&dst, src, flags).map_err(sys(what))
}

/// What [`bind`] adds for a read-only file or directory, and for a writable one.
const READ_ONLY: MsFlags = MsFlags::MS_NOSUID
    .union(MsFlags::MS_NODEV)
    .union(MsFlags::MS_RDONLY);
const WRITABLE: MsFlags = MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV);

/// Remounts the bind mount at `dst` (of `src`) with `flags` added to those of `src`'s
/// mount. A user namespace may not clear the flags its mounts came with (nosuid, nodev,
/// noexec, ro, the atime mode: the kernel locks them), so they are carried over.
fn remount_bind(dst: &Path, src: &Path, flags: MsFlags) -> nix::Result<()> {
    use nix::sys::statvfs::FsFlags;
    let have = nix::sys::statvfs::statvfs(src)?.flags();
    let mut flags = flags | MsFlags::MS_REMOUNT | MsFlags::MS_BIND;
    for (f, m) in [
        (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        (FsFlags::ST_RDONLY, MsFlags::MS_RDONLY),
        (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
    ] {
        if have.contains(f) {
            flags |= m;
        }
    }
    flags |= if have.contains(FsFlags::ST_NOATIME) {
        MsFlags::MS_NOATIME
    } else if have.contains(FsFlags::ST_RELATIME) {
        MsFlags::MS_RELATIME
    } else {
        MsFlags::MS_STRICTATIME
    };
    mount(None::<&str>, dst, None::<&str>, flags, None::<&str>)
}

/// The host's device node `/dev/NAME` bound at `root/dev/NAME` (in a user namespace, which
/// may not mknod): usable as a device (no nodev), nothing else.
fn bind_device(root: &Path, name: &str) -> Result<(), JailError> {
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC;
    bind(&Path::new("/dev").join(name), root, flags, false)
}

fn mknod(
    root: &Path,
    name: &str,
    rdev: u64,
    mode: u32,
    owner: Option<u32>,
) -> Result<(), JailError> {
    let p = root.join("dev").join(name);
    let c = CString::new(p.as_os_str().as_encoded_bytes()).map_err(|_| JailError::Sys {
        what: format!("{}", p.display()),
        source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
    })?;
    // SAFETY: `c` is a valid C string; mknod/chmod/chown only create and change that node.
    unsafe {
        if libc::mknod(c.as_ptr(), libc::S_IFCHR | mode, rdev) != 0 {
            return Err(io(format!("mknod {}", p.display()))(
                std::io::Error::last_os_error(),
            ));
        }
        libc::chmod(c.as_ptr(), mode);
        if let Some(uid) = owner {
            libc::chown(c.as_ptr(), uid, 0);
        }
    }
    Ok(())
}

/// The VM's root: a tmpfs with only what it needs; then `pivot_root` into it.
fn build_root(
    paths: &JailPaths,
    (uid, gid): (u32, u32),
    root: &Path,
    user_ns: bool,
) -> Result<(), JailError> {
    // Nothing mounted from here on reaches the host's namespace.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(sys("making / private"))?;
    mount(
        Some("tmpfs"),
        root,
        Some("tmpfs"),
        MsFlags::MS_NOSUID,
        Some("mode=0755,size=16m"),
    )
    .map_err(sys(format!("mounting a tmpfs on {}", root.display())))?;
    // /tmp first: binds below it (run directories often live in /tmp) go on top.
    let tmp = root.join("tmp");
    mkdirs(&tmp)?;
    mount(
        Some("tmpfs"),
        &tmp,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777,size=64m"),
    )
    .map_err(sys("mounting /tmp"))?;
    if paths.system {
        for d in SYSTEM_DIRS.iter().map(Path::new) {
            match std::fs::symlink_metadata(d) {
                Ok(m) if m.file_type().is_symlink() => {
                    let target = std::fs::read_link(d).map_err(io(format!("{}", d.display())))?;
                    std::os::unix::fs::symlink(target, under(root, d))
                        .map_err(io(format!("linking {}", d.display())))?;
                }
                Ok(_) => bind(d, root, READ_ONLY, true)?,
                Err(_) => {}
            }
        }
        for f in SYSTEM_FILES.iter().map(Path::new) {
            if f.is_file() {
                bind(f, root, READ_ONLY, true)?;
            }
        }
    }
    for p in &paths.read_only {
        bind(p, root, READ_ONLY, true)?;
    }
    for p in &paths.read_write {
        bind(p, root, WRITABLE, true)?;
    }
    for (p, read_only) in &paths.volumes {
        bind(p, root, if *read_only { READ_ONLY } else { WRITABLE }, true)?;
    }
    for p in &paths.owned {
        bind(p, root, WRITABLE, false)?;
        // The VM's uid writes its sockets and logs here (the host's directory, same inode).
        // (In a user namespace it is the user's already.)
        if !user_ns {
            nix::unistd::chown(p, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)))
                .map_err(sys(format!("chown {}", p.display())))?;
        }
    }
    mkdirs(&root.join("dev"))?;
    // SAFETY: umask only changes this process's file creation mask.
    unsafe { libc::umask(0o022) };
    for (name, rdev) in [
        ("null", (1, 3)),
        ("zero", (1, 5)),
        ("random", (1, 8)),
        ("urandom", (1, 9)),
    ] {
        if user_ns {
            bind_device(root, name)?;
        } else {
            mknod(root, name, libc::makedev(rdev.0, rdev.1), 0o666, None)?;
        }
    }
    if let Ok(m) = std::fs::metadata("/dev/kvm") {
        use std::os::unix::fs::MetadataExt;
        if user_ns {
            // The host's node with its own owner and mode: the user reaches it as on the
            // host (its `kvm` group is one the kernel keeps in a user namespace).
            bind_device(root, "kvm")?;
        } else {
            // The VM's uid, and root without DAC override (QEMU before its -runas), by
            // group.
            mknod(root, "kvm", m.rdev(), 0o660, Some(uid))?;
        }
    }
    // The pid namespace's own /proc, mounted before the old root goes: in a user
    // namespace the kernel mounts a proc only where one is fully visible already.
    mkdirs(&root.join("proc"))?;
    mount(
        Some("proc"),
        &root.join("proc"),
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(sys("mounting /proc"))?;
    let old = root.join(".old");
    mkdirs(&old)?;
    nix::unistd::pivot_root(root, &old).map_err(sys("pivot_root"))?;
    nix::unistd::chdir("/").map_err(sys("chdir /"))?;
    umount2("/.old", MntFlags::MNT_DETACH).map_err(sys("detaching the old root"))?;
    let _ = std::fs::remove_dir("/.old");
    // The root itself read-only: the VM writes only to /tmp and its run directory.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID,
        None::<&str>,
    )
    .map_err(sys("remounting / read-only"))
}

/// `p` and everything under it (not following links) owned by `uid`:`gid`.
fn chown_tree(p: &Path, uid: u32, gid: u32) -> Result<(), JailError> {
    std::os::unix::fs::lchown(p, Some(uid), Some(gid))
        .map_err(io(format!("chown {}", p.display())))?;
    let meta = std::fs::symlink_metadata(p).map_err(io(format!("{}", p.display())))?;
    if meta.is_dir() {
        let rd = std::fs::read_dir(p).map_err(io(format!("listing {}", p.display())))?;
        for e in rd.flatten() {
            chown_tree(&e.path(), uid, gid)?;
        }
    }
    Ok(())
}

/// `serve --user`, as root before the router gives root up: what workers of `paths` open
/// becomes reachable by `uid`:`gid` — the files readable by all (as a root worker makes
/// them anyway) and the directories among them searchable; what a worker writes (QEMU's
/// snapshot directory: it opens the RAM file read-write) becomes theirs.
pub fn share_with(paths: &JailPaths, uid: u32, gid: u32) -> Result<(), JailError> {
    use std::os::unix::fs::PermissionsExt;
    readable_by_all(&paths.read_only)?;
    for d in paths.read_only.iter().filter(|p| p.is_dir()) {
        let mode = std::fs::metadata(d)
            .map_err(io(format!("{}", d.display())))?
            .permissions()
            .mode();
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(mode | 0o055))
            .map_err(io(format!("making {} searchable", d.display())))?;
    }
    for p in &paths.read_write {
        chown_tree(p, uid, gid)?;
    }
    Ok(())
}

/// What a worker of `paths` will open, opened by this process (after `serve --user` gave
/// up root): the error names the first it cannot, and why.
pub fn check_reachable(paths: &JailPaths) -> Result<(), JailError> {
    let files = files_of(paths.read_only.iter().chain(&paths.read_write))
        .map_err(|(p, e)| unreachable(&p, e))?;
    for f in files {
        std::fs::File::open(&f).map_err(|e| unreachable(&f, e))?;
    }
    Ok(())
}

fn unreachable(p: &Path, source: std::io::Error) -> JailError {
    JailError::Sys {
        what: format!(
            "{} is out of this user's reach (every directory above it must let uid {} \
             through: keep SUPERMACHINE_CACHE, SUPERMACHINE_SNAPSHOTS and the kernel outside \
             root's home)",
            p.display(),
            Uid::effective()
        ),
        source,
    }
}

/// Drops every capability but `keep` from the bounding set (what exec can grant).
fn trim_bounding_set(keep: &[i32]) {
    for cap in 0..=63 {
        if keep.contains(&cap) {
            continue;
        }
        // SAFETY: prctl on this process's own bounding set. EINVAL past the last
        // capability this kernel knows: that is the end.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } != 0 {
            break;
        }
    }
}

/// The VM's uid must read the files it restores from (kernel, layers, snapshot files),
/// which caches write 0600. Their directories (under root's home) still keep other host
/// users out; inside the jail only this VM's files exist.
fn readable_by_all(paths: &[PathBuf]) -> Result<(), JailError> {
    use std::os::unix::fs::PermissionsExt;
    let files = files_of(paths).map_err(|(p, e)| io(format!("listing {}", p.display()))(e))?;
    for f in files {
        let meta = std::fs::metadata(&f).map_err(io(format!("{}", f.display())))?;
        let mode = meta.permissions().mode();
        if mode & 0o004 == 0 {
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(mode | 0o044))
                .map_err(io(format!("making {} readable", f.display())))?;
        }
    }
    Ok(())
}

/// Empties this thread's permitted, effective and inheritable capability sets (the only
/// thread: this runs before the VM's threads start).
fn clear_capabilities() -> Result<(), JailError> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    // linux/capability.h: version 3 takes two Data (64 capabilities).
    const VERSION_3: u32 = 0x2008_0522;
    let header = Header {
        version: VERSION_3,
        pid: 0,
    };
    let data = [Data {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: capset reads a header and two data structs, both live for the call.
    if unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) } != 0 {
        return Err(io("clearing capabilities")(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// The files `paths` name: each file, and the files directly in each directory; the error
/// names the directory it could not list.
fn files_of<'a>(
    paths: impl IntoIterator<Item = &'a PathBuf>,
) -> Result<Vec<PathBuf>, (PathBuf, std::io::Error)> {
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            let rd = std::fs::read_dir(p).map_err(|e| (p.clone(), e))?;
            files.extend(rd.flatten().map(|e| e.path()).filter(|f| f.is_file()));
        } else {
            files.push(p.clone());
        }
    }
    Ok(files)
}

/// `lo` up, in the worker's fresh network namespace.
fn loopback_up() -> Result<(), JailError> {
    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IFNAMSIZ],
        flags: libc::c_short,
        _pad: [u8; 22],
    }
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: 0,
        _pad: [0; 22],
    };
    req.name[..2].copy_from_slice(b"lo");
    // SAFETY: a datagram socket for the ioctls below; closed by OwnedFd.
    let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if s < 0 {
        return Err(io("socket for lo")(std::io::Error::last_os_error()));
    }
    // SAFETY: socket() just returned it.
    let s = unsafe { OwnedFd::from_raw_fd(s) };
    // SAFETY: `req` is an ifreq-sized buffer valid for the kernel's read and write.
    unsafe {
        if libc::ioctl(s.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) != 0 {
            return Err(io("reading lo's flags")(std::io::Error::last_os_error()));
        }
        req.flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(s.as_raw_fd(), libc::SIOCSIFFLAGS, &req) != 0 {
            return Err(io("bringing lo up")(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// uid/gid `uid`, no groups, no capabilities in any set, no new privileges, no core dumps.
/// Called once the VM monitor is prepared (QEMU opens its files as root, then drops to the
/// same uid itself) and before the guest runs.
///
/// What the monitor made in `owned` (sockets, logs, run directories, made as root while
/// preparing) becomes the VM uid's first: the worker connects to its own vsock socket and
/// removes its run directory after the drop.
pub fn drop_privileges(jailed: &Jailed, owned: &[PathBuf]) -> Result<(), JailError> {
    let (uid, gid) = (jailed.uid, jailed.gid);
    if !jailed.user_ns {
        for p in owned {
            chown_tree(p, uid, gid)?;
        }
    }
    let no_core = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit reads `no_core`, which outlives the call.
    unsafe { libc::setrlimit(libc::RLIMIT_CORE, &no_core) };
    if !jailed.user_ns {
        nix::unistd::setgroups(&[]).map_err(sys("setgroups"))?;
    }
    let (u, g) = (Uid::from_raw(uid), Gid::from_raw(gid));
    nix::unistd::setresgid(g, g, g).map_err(sys("setresgid"))?;
    trim_bounding_set(&[]);
    // SAFETY: prctl calls on this process's own capability sets and flags.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        );
        libc::prctl(libc::PR_SET_KEEPCAPS, 0, 0, 0, 0);
    }
    // Leaving uid 0 with KEEPCAPS off clears the permitted and effective sets; a process
    // that unshared a user namespace holds every capability in it, whatever its uid, so
    // the sets are cleared outright too.
    nix::unistd::setresuid(u, u, u).map_err(sys("setresuid"))?;
    clear_capabilities()?;
    // A change of credentials clears the parent-death signal: set it again, so the VM
    // still dies with the waiter (and the waiter with the host).
    // SAFETY: as above.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    // SAFETY: as above.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(io("no_new_privs")(std::io::Error::last_os_error()));
    }
    if nix::unistd::setuid(Uid::from_raw(0)).is_ok() {
        return Err(JailError::Sys {
            what: "dropping root".into(),
            source: std::io::Error::other("uid 0 could be regained"),
        });
    }
    Ok(())
}
