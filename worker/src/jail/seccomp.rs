//! The worker's seccomp-bpf filter, compiled by `seccompiler` (rust-vmm, Firecracker's) from
//! `worker/seccomp/x86_64.json`, where every syscall says why it is there.
//!
//! Installed on every thread of the worker (TSYNC) once the VM monitor is prepared and
//! before the guest runs. A syscall outside the list traps: the SIGSYS handler records the
//! syscall number in `$TMPDIR/seccomp-violation` (the host reads it: the run root is its
//! directory), writes a line to stderr and exits with 128 + SIGSYS (as pid 1 of its
//! namespace it cannot be killed by its own signal); the waiter then dies of SIGSYS.
//!
//! Process-wide, two filters, because one seccompiler filter has one match action:
//! `worker` allows the list and traps the rest; `clone3` answers clone3 with ENOSYS, so
//! glibc falls back to clone, whose flags the first filter can check (clone3's are behind
//! a pointer). The kernel runs every filter; the stricter answer wins.
//!
//! `worker` is the ceiling, what the control/handoff thread and its relays need. On top of
//! it, per thread kind (kvm backend): each vCPU thread installs `vcpu` on itself before its
//! first KVM_RUN (KVM ioctls, serial output, channels: no files, sockets, threads or
//! signals to others), and the VM's event loop installs `vmm` once the VM is built (epoll,
//! the block and vsock backends: no new threads, processes, namespaces or mounts).

use std::collections::HashMap;
use std::os::fd::IntoRawFd;
use std::sync::atomic::{AtomicI32, Ordering};

use super::JailError;

const FILTERS: &str = include_str!("../../seccomp/x86_64.json");

/// The file (in the worker's TMPDIR) that names the forbidden syscall that killed it.
pub const VIOLATION_FILE: &str = "seccomp-violation";

/// The jailed worker's exit code after a forbidden syscall (128 + SIGSYS).
pub const EXIT_SECCOMP: i32 = 128 + libc::SIGSYS;

static VIOLATION_FD: AtomicI32 = AtomicI32::new(-1);

fn compile() -> Result<HashMap<String, seccompiler::BpfProgram>, JailError> {
    seccompiler::compile_from_json(FILTERS.as_bytes(), seccompiler::TargetArch::x86_64)
        .map_err(|e| JailError::Seccomp(format!("compiling worker/seccomp/x86_64.json: {e}")))
}

/// Installs the filters on every thread of this process, and hands the VM threads theirs.
pub fn install() -> Result<(), JailError> {
    let mut filters = compile()?;
    let mut take = |name: &str| {
        filters
            .remove(name)
            .ok_or_else(|| JailError::Seccomp(format!("no filter {name:?} in x86_64.json")))
    };
    let process_wide = [("clone3", take("clone3")?), ("worker", take("worker")?)];
    let threads = supermachine_backend::thread_filter::ThreadFilters {
        vcpu: take("vcpu")?,
        event_loop: take("vmm")?,
    };
    supermachine_backend::thread_filter::set(threads).map_err(JailError::Seccomp)?;
    let path = std::env::temp_dir().join(VIOLATION_FILE);
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)
        .map_err(|e| JailError::Seccomp(format!("creating {}: {e}", path.display())))?;
    VIOLATION_FD.store(f.into_raw_fd(), Ordering::SeqCst);
    // SAFETY: the handler only calls async-signal-safe functions (write, exit_group) on
    // memory it owns.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigsys as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        if libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) != 0 {
            return Err(JailError::Seccomp(format!(
                "installing the SIGSYS handler: {}",
                std::io::Error::last_os_error()
            )));
        }
    }
    for (name, prog) in &process_wide {
        seccompiler::apply_filter_all_threads(prog)
            .map_err(|e| JailError::Seccomp(format!("installing filter {name}: {e}")))?;
    }
    Ok(())
}

/// `si_syscall` of a SIGSYS siginfo (glibc's `_sigsys` layout: after the three ints of
/// the header, a pointer, then the syscall number).
///
/// # Safety
/// `info` must point at the siginfo the kernel passed to a SIGSYS handler.
unsafe fn syscall_of(info: *const libc::siginfo_t) -> i32 {
    #[repr(C)]
    struct SigSys {
        signo: i32,
        errno: i32,
        code: i32,
        _pad: i32,
        call_addr: *const libc::c_void,
        syscall: i32,
        arch: u32,
    }
    (*(info as *const SigSys)).syscall
}

/// Decimal digits of `n` into `buf`, returning the used tail.
fn digits(mut n: u32, buf: &mut [u8; 10]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 || i == 0 {
            break;
        }
    }
    &buf[i..]
}

extern "C" fn on_sigsys(_sig: i32, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passed a SIGSYS siginfo; write and exit_group are async-signal-safe.
    unsafe {
        let nr = syscall_of(info).max(0) as u32;
        let mut buf = [0u8; 10];
        let d = digits(nr, &mut buf);
        let fd = VIOLATION_FD.load(Ordering::SeqCst);
        if fd >= 0 {
            libc::write(fd, d.as_ptr().cast(), d.len());
        }
        let msg = b"supermachine-worker: seccomp: forbidden syscall ";
        libc::write(2, msg.as_ptr().cast(), msg.len());
        libc::write(2, d.as_ptr().cast(), d.len());
        libc::write(2, b"\n".as_ptr().cast(), 1);
        // As pid 1 of its namespace the worker ignores its own SIGSYS: exit with the code
        // the waiter turns into a death by SIGSYS.
        libc::syscall(libc::SYS_exit_group, EXIT_SECCOMP);
    }
}

/// What a handed-off connection's first bytes carry to make a worker started with
/// `JailConfig::test_forbidden_syscall` (debug builds only) call a syscall outside its
/// filter: a request header, so a test chooses which connection kills its worker.
pub const TEST_TRIGGER: &[u8] = b"x-supermachine-test: forbidden-syscall";

/// Debug builds, with the test flag on: calls `acct` (outside the filter) when `prefix`
/// carries [`TEST_TRIGGER`].
pub fn test_trigger(enabled: bool, prefix: &[u8]) {
    if cfg!(debug_assertions)
        && enabled
        && prefix
            .windows(TEST_TRIGGER.len())
            .any(|w| w == TEST_TRIGGER)
    {
        // SAFETY: acct(NULL) would only switch process accounting off; the filter traps it.
        unsafe { libc::syscall(libc::SYS_acct, std::ptr::null::<libc::c_char>()) };
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_filters_compile() {
        let f = super::compile().unwrap();
        for name in ["worker", "clone3", "vcpu", "vmm"] {
            assert!(f.contains_key(name), "{name}");
        }
    }

    #[test]
    fn digits() {
        let mut b = [0u8; 10];
        assert_eq!(super::digits(0, &mut b), b"0");
        assert_eq!(super::digits(163, &mut b), b"163");
        assert_eq!(super::digits(u32::MAX, &mut b), b"4294967295");
    }
}
