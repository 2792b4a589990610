//! Starting and supervising the workload: chroot into the merged root, drop to the image's
//! user, stream stdout/stderr to the host, forward signals, reap every zombie (we are PID 1).

use std::io::Read;
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use supermachine_protocol::{ExitStatus, GuestEvent, OutputStream, RunConfig};

use supermachine_init::launch::{command, environment, spawn_failure, Launch};
use supermachine_init::user::Identity;

use crate::channel::Channel;

/// Output is sent in chunks no larger than this.
const CHUNK: usize = 32 * 1024;

/// After the workload exits, output left in its pipes is still sent while it keeps moving,
/// but for no longer than this in all (a daemonized grandchild may write forever).
const DRAIN_LIMIT: Duration = Duration::from_secs(60);

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

    let env = environment(&config.env, &[], &config.hostname, identity);
    let mut cmd = command(&Launch {
        argv: &config.argv,
        env,
        workdir,
        identity,
        root: Some(new_root),
        controlling_tty: false,
    })
    .map_err(WorkloadError::Prepare)?;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let (code, msg) = spawn_failure(&config.argv[0], &e);
            channel.send(&GuestEvent::Output {
                stream: OutputStream::Stderr,
                data: msg.into_bytes(),
            });
            return Ok(ExitStatus::Code(code));
        }
    };
    let pid = Pid::from_raw(child.id() as i32);
    crate::shim::record_workload_pid(pid.as_raw());
    channel.send(&GuestEvent::WorkloadStarted {
        pid: pid.as_raw(),
        uptime_ms: crate::uptime_ms(),
    });

    let (done_tx, done_rx) = mpsc::channel::<()>();
    let progress = Progress::default();
    let mut pumps = 0;
    if let Some(out) = child.stdout.take() {
        spawn_pump(
            out,
            OutputStream::Stdout,
            channel,
            done_tx.clone(),
            &progress,
        );
        pumps += 1;
    }
    if let Some(err) = child.stderr.take() {
        spawn_pump(
            err,
            OutputStream::Stderr,
            channel,
            done_tx.clone(),
            &progress,
        );
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

    // Output may still sit in the pipes (up to 64 KiB each, and the control channel can be
    // slow: on a UART every byte is a VM exit). Send it while it keeps moving; a daemonized
    // grandchild may hold the pipes open forever, so stop once nothing moved for
    // `drain_grace`, and after DRAIN_LIMIT in any case.
    let started = Instant::now();
    let mut idle_since = Instant::now();
    let mut seen = progress.mark();
    let tick = Duration::from_millis(50).min(drain_grace);
    while pumps > 0 && started.elapsed() < DRAIN_LIMIT {
        match done_rx.recv_timeout(tick) {
            Ok(()) => pumps -= 1,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        let now = progress.mark();
        if now != seen || progress.sending() {
            seen = now;
            idle_since = Instant::now();
        } else if idle_since.elapsed() >= drain_grace {
            break;
        }
    }
    Ok(status)
}

/// What the output pumps have done: chunks read, and how many are being sent right now (a
/// send in progress is output still moving, however slow the channel).
#[derive(Clone, Default)]
struct Progress {
    reads: Arc<AtomicU64>,
    sending: Arc<AtomicU64>,
}

impl Progress {
    fn begin_send(&self) {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.sending.fetch_add(1, Ordering::SeqCst);
    }

    fn end_send(&self) {
        self.sending.fetch_sub(1, Ordering::SeqCst);
    }

    /// Changes whenever a chunk was read.
    fn mark(&self) -> u64 {
        self.reads.load(Ordering::SeqCst)
    }

    fn sending(&self) -> bool {
        self.sending.load(Ordering::SeqCst) > 0
    }
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
    progress: &Progress,
) {
    let channel = channel.clone();
    let progress = progress.clone();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; CHUNK];
        loop {
            match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    progress.begin_send();
                    channel.send(&GuestEvent::Output {
                        stream,
                        data: buf[..n].to_vec(),
                    });
                    progress.end_send();
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
        let _ = done.send(());
    });
}
