//! Launching a process the way a container runtime does: its own session, optionally a
//! chroot, a working directory, supplementary groups, gid, uid, an exact environment.

use std::ffi::CString;
use std::os::unix::process::CommandExt;
use std::process::Command;

use nix::sys::signal::{SigSet, SigmaskHow};

use crate::user::Identity;

pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The environment docker gives a process: PATH/HOSTNAME/HOME defaults, then the image's
/// Env, then `extra` (later entries win).
pub fn environment(
    image_env: &[String],
    extra: &[String],
    hostname: &str,
    identity: &Identity,
) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = Vec::new();
    let mut set = |k: &str, v: &str| {
        if let Some(slot) = env.iter_mut().find(|(key, _)| key == k) {
            slot.1 = v.to_string();
        } else {
            env.push((k.to_string(), v.to_string()));
        }
    };
    set("PATH", DEFAULT_PATH);
    if !hostname.is_empty() {
        set("HOSTNAME", hostname);
    }
    set("HOME", &identity.home);
    for kv in image_env.iter().chain(extra) {
        match kv.split_once('=') {
            Some((k, v)) => set(k, v),
            None => set(kv, ""),
        }
    }
    env
}

/// What to launch and how.
pub struct Launch<'a> {
    pub argv: &'a [String],
    pub env: Vec<(String, String)>,
    pub workdir: &'a str,
    pub identity: &'a Identity,
    /// chroot here first (init launching the workload); `None` when already inside.
    pub root: Option<&'a str>,
    /// Make stdin (a terminal) the controlling terminal of the new session.
    pub controlling_tty: bool,
}

/// Builds the `Command`; the caller sets stdio and spawns. The child starts a new session
/// (so a process group can be killed as one), with an empty signal mask.
pub fn command(l: &Launch<'_>) -> Result<Command, String> {
    let (program, args) = l.argv.split_first().ok_or("empty argv")?;
    let cstr = |s: &str| CString::new(s).map_err(|_| format!("{s:?} contains a NUL byte"));
    let root = l.root.map(cstr).transpose()?;
    let workdir = cstr(if l.workdir.is_empty() { "/" } else { l.workdir })?;
    let (uid, gid) = (l.identity.uid, l.identity.gid);
    let groups: Vec<libc::gid_t> = l.identity.groups.clone();
    let ctty = l.controlling_tty;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env_clear()
        .envs(l.env.iter().map(|(k, v)| (k, v)));
    // SAFETY: the closure only makes async-signal-safe syscalls on data prepared before fork.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::signal::pthread_sigmask(
                SigmaskHow::SIG_SETMASK,
                Some(&SigSet::empty()),
                None,
            )?;
            nix::unistd::setsid()?;
            if ctty && libc::ioctl(0, libc::TIOCSCTTY, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(root) = &root {
                nix::unistd::chroot(root.as_c_str())?;
            }
            nix::unistd::chdir(workdir.as_c_str())?;
            if libc::setgroups(groups.len(), groups.as_ptr()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::setgid(gid) != 0 || libc::setuid(uid) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(cmd)
}

/// docker's codes and words for a command that could not be started.
pub fn spawn_failure(program: &str, e: &std::io::Error) -> (i32, String) {
    let (code, why) = match e.raw_os_error() {
        Some(libc::ENOENT) => (127, "executable file not found in $PATH".to_string()),
        Some(libc::EACCES) | Some(libc::ENOEXEC) => (126, "permission denied".to_string()),
        _ => (126, e.to_string()),
    };
    (code, format!("supermachine: exec: \"{program}\": {why}\n"))
}
