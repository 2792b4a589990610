//! Starting and supervising the workload: chroot into the merged root, drop to the image's
//! user, stream stdout/stderr to the host, forward signals, reap every zombie (we are PID 1).

use std::ffi::CString;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, SigSet, SigmaskHow, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use supermachine_protocol::{ExitStatus, GuestEvent, OutputStream, RunConfig};

use crate::channel::Channel;
use crate::user::Identity;

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Output is sent in chunks no larger than this.
const CHUNK: usize = 32 * 1024;

/// Signals init forwards to the workload instead of acting on them.
const FORWARDED: [Signal; 6] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
];

#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    #[error("preparing the workload: {0}")]
    Prepare(String),
    #[error("waiting for the workload: {0}")]
    Wait(nix::Error),
}

/// The environment docker gives a process: the image's, plus PATH/HOME/HOSTNAME defaults.
fn environment(config: &RunConfig, identity: &Identity) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = Vec::new();
    let mut set = |k: &str, v: &str| {
        if let Some(slot) = env.iter_mut().find(|(key, _)| key == k) {
            slot.1 = v.to_string();
        } else {
            env.push((k.to_string(), v.to_string()));
        }
    };
    set("PATH", DEFAULT_PATH);
    if !config.hostname.is_empty() {
        set("HOSTNAME", &config.hostname);
    }
    set("HOME", &identity.home);
    for kv in &config.env {
        match kv.split_once('=') {
            Some((k, v)) => set(k, v),
            None => set(kv, ""),
        }
    }
    env
}

/// Runs the workload to completion; returns how it ended.
pub fn run(
    config: &RunConfig,
    identity: &Identity,
    new_root: &str,
    channel: &Channel,
    drain_grace: Duration,
) -> Result<ExitStatus, WorkloadError> {
    let workdir = if config.workdir.is_empty() {
        "/"
    } else {
        config.workdir.as_str()
    };
    let host_workdir = Path::new(new_root).join(workdir.trim_start_matches('/'));
    std::fs::create_dir_all(&host_workdir)
        .map_err(|e| WorkloadError::Prepare(format!("creating working dir {workdir}: {e}")))?;

    // Block the signals we handle so they queue for sigwait; the child gets a clean mask.
    let mut handled = SigSet::empty();
    handled.add(Signal::SIGCHLD);
    for s in FORWARDED {
        handled.add(s);
    }
    handled
        .thread_block()
        .map_err(|e| WorkloadError::Prepare(format!("blocking signals: {e}")))?;

    let c_root = cstring(new_root)?;
    let c_workdir = cstring(workdir)?;
    let (uid, gid) = (identity.uid, identity.gid);
    let groups: Vec<libc::gid_t> = identity.groups.clone();

    let mut cmd = Command::new(&config.argv[0]);
    cmd.args(&config.argv[1..])
        .env_clear()
        .envs(environment(config, identity))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: the closure only makes async-signal-safe syscalls on data prepared before fork.
    unsafe {
        cmd.pre_exec(move || {
            let empty = SigSet::empty();
            nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&empty), None)?;
            nix::unistd::setsid()?;
            nix::unistd::chroot(c_root.as_c_str())?;
            nix::unistd::chdir(c_workdir.as_c_str())?;
            if libc::setgroups(groups.len(), groups.as_ptr()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::setgid(gid) != 0 || libc::setuid(uid) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }

    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let (code, why) = match e.raw_os_error() {
                Some(libc::ENOENT) => (127, "executable file not found in $PATH".to_string()),
                Some(libc::EACCES) | Some(libc::ENOEXEC) => (126, "permission denied".to_string()),
                _ => (126, e.to_string()),
            };
            let msg = format!("supermachine: exec: \"{}\": {why}\n", config.argv[0]);
            channel.send(&GuestEvent::Output {
                stream: OutputStream::Stderr,
                data: msg.into_bytes(),
            });
            return Ok(ExitStatus::Code(code));
        }
    };
    let pid = Pid::from_raw(child.id() as i32);
    channel.send(&GuestEvent::WorkloadStarted {
        pid: pid.as_raw(),
        uptime_ms: crate::uptime_ms(),
    });

    let (done_tx, done_rx) = mpsc::channel::<()>();
    let mut pumps = 0;
    if let Some(out) = child.stdout.take() {
        spawn_pump(out, OutputStream::Stdout, channel, done_tx.clone());
        pumps += 1;
    }
    if let Some(err) = child.stderr.take() {
        spawn_pump(err, OutputStream::Stderr, channel, done_tx.clone());
        pumps += 1;
    }
    drop(done_tx);
    // The child is reaped below with waitpid(-1); std's handle must not wait for it.
    std::mem::forget(child);

    let status = loop {
        let sig = handled.wait().map_err(WorkloadError::Wait)?;
        if sig != Signal::SIGCHLD {
            let _ = kill(pid, sig);
            continue;
        }
        if let Some(status) = reap(pid)? {
            break status;
        }
    };

    // Output may still sit in the pipes; a daemonized grandchild may hold them open forever,
    // so wait only a little.
    let deadline = Instant::now() + drain_grace;
    for _ in 0..pumps {
        let left = deadline.saturating_duration_since(Instant::now());
        if done_rx.recv_timeout(left).is_err() {
            break;
        }
    }
    Ok(status)
}

fn cstring(s: &str) -> Result<CString, WorkloadError> {
    CString::new(s).map_err(|_| WorkloadError::Prepare(format!("{s:?} contains a NUL byte")))
}

/// Reaps every exited child; returns the workload's status once it is among them.
fn reap(workload: Pid) -> Result<Option<ExitStatus>, WorkloadError> {
    let mut result = None;
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(p, code)) if p == workload => {
                result = Some(ExitStatus::Code(code));
            }
            Ok(WaitStatus::Signaled(p, sig, _)) if p == workload => {
                result = Some(ExitStatus::Signal(sig as i32));
            }
            Ok(WaitStatus::StillAlive) | Err(nix::Error::ECHILD) => return Ok(result),
            Ok(_) => {}
            Err(nix::Error::EINTR) => {}
            Err(e) => return Err(WorkloadError::Wait(e)),
        }
    }
}

fn spawn_pump<R: Read + Send + 'static>(
    mut reader: R,
    stream: OutputStream,
    channel: &Channel,
    done: mpsc::Sender<()>,
) {
    let channel = channel.clone();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; CHUNK];
        loop {
            match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => channel.send(&GuestEvent::Output {
                    stream,
                    data: buf[..n].to_vec(),
                }),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
        let _ = done.send(());
    });
}
