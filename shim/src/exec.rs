//! exec: run a command in the workload's root (like `docker exec`) with streamed stdin,
//! stdout and stderr, an optional pseudo-terminal, and a timeout that kills the whole
//! process group.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::Stdio;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use supermachine_init::launch::{command, environment, spawn_failure, Launch};
use supermachine_init::user;
use supermachine_protocol::agent::{ExecInput, ExecOutput, ExecRequest};
use supermachine_protocol::{write_frame, ExitStatus, FrameReader};

use crate::listener::AgentStream;
use crate::Context;

/// How long output may keep flowing after the process exited (a daemonized grandchild may
/// hold the pipes forever).
const DRAIN_GRACE: Duration = Duration::from_secs(2);

type Out = Arc<Mutex<Box<dyn AgentStream>>>;

fn send(out: &Out, msg: &ExecOutput) -> bool {
    let mut w = match out.lock() {
        Ok(w) => w,
        Err(p) => p.into_inner(),
    };
    write_frame(&mut *w, msg).is_ok()
}

pub fn run(
    ctx: &Context,
    req: ExecRequest,
    mut input: FrameReader<Box<dyn AgentStream>>,
    writer: Box<dyn AgentStream>,
) -> Result<(), String> {
    let out: Out = Arc::new(Mutex::new(writer));
    if req.argv.is_empty() {
        send(
            &out,
            &ExecOutput::Failed {
                kind: supermachine_protocol::agent::ErrorKind::InvalidInput,
                message: "empty argv".into(),
            },
        );
        linger(&out, input);
        return Ok(());
    }
    let user_spec = req.user.clone().unwrap_or_else(|| ctx.config.user.clone());
    let identity = match user::resolve(&user_spec, "/") {
        Ok(i) => i,
        Err(e) => {
            send(
                &out,
                &ExecOutput::Failed {
                    kind: supermachine_protocol::agent::ErrorKind::InvalidInput,
                    message: e.to_string(),
                },
            );
            linger(&out, input);
            return Ok(());
        }
    };
    let env = environment(&ctx.config.env, &req.env, &ctx.config.hostname, &identity);
    let workdir = req
        .cwd
        .clone()
        .unwrap_or_else(|| ctx.config.workdir.clone());
    let mut cmd = command(&Launch {
        argv: &req.argv,
        env,
        workdir: &workdir,
        identity: &identity,
        root: None,
        controlling_tty: req.tty,
    })?;

    // Stdio: a pty (both outputs through the master) or three pipes.
    let mut pty_master: Option<OwnedFd> = None;
    if req.tty {
        let ws = req.winsize.map(|(rows, cols)| nix::pty::Winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        });
        let pty = nix::pty::openpty(ws.as_ref(), None).map_err(|e| format!("openpty: {e}"))?;
        let slave = File::from(pty.slave);
        cmd.stdin(slave.try_clone().map_err(|e| e.to_string())?)
            .stdout(slave.try_clone().map_err(|e| e.to_string())?)
            .stderr(slave);
        pty_master = Some(pty.master);
    } else {
        cmd.stdin(if req.stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    }

    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let (code, msg) = spawn_failure(&req.argv[0], &e);
            send(&out, &ExecOutput::Stderr(msg.into_bytes()));
            send(
                &out,
                &ExecOutput::Exited {
                    status: ExitStatus::Code(code),
                    timed_out: false,
                },
            );
            linger(&out, input);
            return Ok(());
        }
    };
    drop(cmd); // closes our copies of the pty slave
    let pid = child.id() as i32;
    send(&out, &ExecOutput::Started { pid });

    // Output pumps.
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let mut pumps = 0;
    let mut stdin_sink: Option<Box<dyn Write + Send>> = None;
    let mut master_for_resize: Option<i32> = None;
    if let Some(master) = pty_master {
        let m = File::from(master);
        master_for_resize = Some(m.as_raw_fd());
        let reader = m.try_clone().map_err(|e| e.to_string())?;
        spawn_pump(reader, true, out.clone(), done_tx.clone());
        pumps += 1;
        stdin_sink = Some(Box::new(m));
    } else {
        if let Some(o) = child.stdout.take() {
            spawn_pump(o, true, out.clone(), done_tx.clone());
            pumps += 1;
        }
        if let Some(e) = child.stderr.take() {
            spawn_pump(e, false, out.clone(), done_tx.clone());
            pumps += 1;
        }
        if let Some(i) = child.stdin.take() {
            stdin_sink = Some(Box::new(i));
        }
    }
    drop(done_tx);

    // Input from the host: stdin, resize, signals. The host going away kills the command.
    let (gone_tx, gone_rx) = mpsc::channel::<()>();
    let tty = req.tty;
    std::thread::spawn(move || {
        let mut sink = stdin_sink;
        loop {
            match input.read::<ExecInput>() {
                Ok(Some(ExecInput::Stdin(bytes))) => {
                    if let Some(s) = sink.as_mut() {
                        if s.write_all(&bytes).is_err() {
                            sink = None;
                        }
                    }
                }
                Ok(Some(ExecInput::CloseStdin)) => {
                    if tty {
                        // A terminal has no half-close: send EOF (^D) like a user would.
                        if let Some(s) = sink.as_mut() {
                            let _ = s.write_all(&[4]);
                        }
                    } else {
                        sink = None;
                    }
                }
                Ok(Some(ExecInput::Resize { rows, cols })) => {
                    if let Some(fd) = master_for_resize {
                        let ws = libc::winsize {
                            ws_row: rows,
                            ws_col: cols,
                            ws_xpixel: 0,
                            ws_ypixel: 0,
                        };
                        // SAFETY: fd is the pty master kept open by `sink`; ws outlives the call.
                        unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &ws) };
                    }
                }
                Ok(Some(ExecInput::Signal(sig))) => {
                    if let Ok(s) = Signal::try_from(sig) {
                        let _ = killpg(Pid::from_raw(pid), s);
                    }
                }
                Ok(None) | Err(_) => {
                    let _ = gone_tx.send(());
                    return;
                }
            }
        }
    });

    // Wait for exit, the timeout, or the host leaving.
    let (exit_tx, exit_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = exit_tx.send(child.wait());
    });
    let deadline = req
        .timeout_ms
        .map(|ms| Instant::now() + Duration::from_millis(ms));
    let mut timed_out = false;
    let status = loop {
        match exit_rx.recv_timeout(Duration::from_millis(20)) {
            Ok(s) => break s.map_err(|e| e.to_string())?,
            Err(mpsc::RecvTimeoutError::Disconnected) => return Err("exec waiter vanished".into()),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        let expired = deadline.is_some_and(|d| Instant::now() >= d);
        if (expired && !timed_out) || gone_rx.try_recv().is_ok() {
            timed_out |= expired;
            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
        }
    };
    if timed_out {
        // The whole group is dead; nothing will hold the pipes.
        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
    }
    let grace_end = Instant::now() + DRAIN_GRACE;
    for _ in 0..pumps {
        if done_rx
            .recv_timeout(grace_end.saturating_duration_since(Instant::now()))
            .is_err()
        {
            break;
        }
    }
    use std::os::unix::process::ExitStatusExt;
    let status = match (status.code(), status.signal()) {
        (Some(c), _) => ExitStatus::Code(c),
        (None, Some(s)) => ExitStatus::Signal(s),
        _ => ExitStatus::Code(255),
    };
    send(&out, &ExecOutput::Exited { status, timed_out });
    Ok(())
}

fn spawn_pump<R: Read + Send + 'static>(mut r: R, stdout: bool, out: Out, done: mpsc::Sender<()>) {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match r.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    let data = buf[..n].to_vec();
                    let msg = if stdout {
                        ExecOutput::Stdout(data)
                    } else {
                        ExecOutput::Stderr(data)
                    };
                    if !send(&out, &msg) {
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                // EIO on a pty master: the last slave closed.
                Err(_) => break,
            }
        }
        let _ = done.send(());
    });
}

/// Ends a session the command never started in: half-close our side and read what the
/// host still sends (a `CloseStdin`, say) until it hangs up. Closing with unread input
/// would make the kernel send a reset, and the host could lose the frames just written.
fn linger(out: &Out, mut input: FrameReader<Box<dyn AgentStream>>) {
    if let Ok(w) = out.lock() {
        let _ = w.shutdown_write();
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        match input.read::<ExecInput>() {
            Ok(Some(_)) => continue,
            _ => break,
        }
    }
}
