//! `docker exec` for a VM: [`ExecBuilder`] -> [`ExecChild`] (streams) or [`ExecOutcome`].

use std::io::{self, Read, Write};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use supermachine_protocol::agent::{AgentRequest, ExecInput, ExecOutput, ExecRequest};
use supermachine_protocol::{write_frame, ExitStatus, FrameReader};

use crate::agent::{frame_io, AgentClient, GuestStream};
use crate::Error;

/// What the command reads on stdin.
#[derive(Debug, Clone, Default)]
pub enum ExecStdin {
    /// /dev/null.
    #[default]
    Null,
    /// Written by the caller through [`ExecChild::stdin`].
    Piped,
    /// These bytes, then end of input.
    Bytes(Vec<u8>),
}

/// How an exec ended, with whatever output was not read through [`ExecChild`]'s streams.
#[derive(Debug, Clone)]
pub struct ExecOutcome {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub duration: Duration,
    pub timed_out: bool,
}

impl ExecOutcome {
    /// The shell convention: the code, or 128 + signal.
    pub fn code(&self) -> i32 {
        self.status.as_shell_code()
    }
}

pub struct ExecBuilder {
    agent: AgentClient,
    req: ExecRequest,
    stdin: ExecStdin,
}

impl ExecBuilder {
    pub fn new(agent: AgentClient) -> Self {
        Self {
            agent,
            req: ExecRequest {
                argv: vec![],
                env: vec![],
                cwd: None,
                user: None,
                tty: false,
                winsize: None,
                stdin: false,
                timeout_ms: None,
            },
            stdin: ExecStdin::Null,
        }
    }

    pub fn argv<I: IntoIterator<Item = S>, S: Into<String>>(mut self, argv: I) -> Self {
        self.req.argv = argv.into_iter().map(Into::into).collect();
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.req.env.push(format!("{key}={value}"));
        self
    }

    pub fn cwd(mut self, dir: &str) -> Self {
        self.req.cwd = Some(dir.to_string());
        self
    }

    pub fn user(mut self, user: &str) -> Self {
        self.req.user = Some(user.to_string());
        self
    }

    pub fn tty(mut self, tty: bool) -> Self {
        self.req.tty = tty;
        self
    }

    pub fn winsize(mut self, rows: u16, cols: u16) -> Self {
        self.req.winsize = Some((rows, cols));
        self
    }

    pub fn stdin(mut self, stdin: ExecStdin) -> Self {
        self.stdin = stdin;
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.req.timeout_ms = Some(timeout.as_millis() as u64);
        self
    }

    /// Starts the command; stream its I/O through the returned child.
    pub fn spawn(mut self) -> Result<ExecChild, Error> {
        if self.req.argv.is_empty() {
            return Err(Error::Exec("empty argv".into()));
        }
        self.req.stdin = !matches!(self.stdin, ExecStdin::Null);
        let started = Instant::now();
        let stream = self
            .agent
            .open(&AgentRequest::Exec(self.req.clone()))
            .map_err(|e| Error::io("opening an exec session with the guest agent", e))?;
        let writer = Arc::new(Mutex::new(
            stream
                .try_clone()
                .map_err(|e| Error::io("exec stream", e))?,
        ));
        let (out_tx, out_rx) = mpsc::channel();
        let (err_tx, err_rx) = mpsc::channel();
        let (end_tx, end_rx) = mpsc::channel();
        let (pid_tx, pid_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut r = FrameReader::new(stream);
            let end = loop {
                match r.read::<ExecOutput>() {
                    Ok(Some(ExecOutput::Started { pid })) => {
                        let _ = pid_tx.send(pid);
                    }
                    Ok(Some(ExecOutput::Stdout(d))) => {
                        let _ = out_tx.send(d);
                    }
                    Ok(Some(ExecOutput::Stderr(d))) => {
                        let _ = err_tx.send(d);
                    }
                    Ok(Some(ExecOutput::Exited { status, timed_out })) => {
                        break Ok((status, timed_out))
                    }
                    Ok(Some(ExecOutput::Failed { message, .. })) => break Err(message),
                    Ok(None) => break Err("the guest agent closed the exec stream".to_string()),
                    Err(e) => break Err(format!("exec stream: {e}")),
                }
            };
            let _ = end_tx.send(end);
        });
        let mut child = ExecChild {
            writer: writer.clone(),
            stdin: Some(ExecStdinWriter {
                writer,
                closed: false,
            }),
            stdout: Some(ChannelReader::new(out_rx)),
            stderr: Some(ChannelReader::new(err_rx)),
            end: end_rx,
            pid: pid_rx,
            started,
        };
        match std::mem::take(&mut self.stdin) {
            ExecStdin::Null => {
                // The guest gave the command /dev/null: there is nothing to close.
                if let Some(mut w) = child.stdin.take() {
                    w.closed = true;
                }
            }
            ExecStdin::Piped => {}
            ExecStdin::Bytes(b) => {
                let mut w = child
                    .stdin
                    .take()
                    .ok_or_else(|| Error::Exec("stdin already taken".into()))?;
                std::thread::spawn(move || {
                    let _ = w.write_all(&b);
                    let _ = w.close();
                });
            }
        }
        Ok(child)
    }

    /// Runs the command to completion, collecting its output.
    pub fn output(self) -> Result<ExecOutcome, Error> {
        self.spawn()?.wait()
    }
}

/// A running exec.
pub struct ExecChild {
    writer: Arc<Mutex<GuestStream>>,
    stdin: Option<ExecStdinWriter>,
    stdout: Option<ChannelReader>,
    stderr: Option<ChannelReader>,
    end: Receiver<Result<(ExitStatus, bool), String>>,
    pid: Receiver<i32>,
    started: Instant,
}

impl ExecChild {
    /// The command's stdin (with [`ExecStdin::Piped`]); dropping it closes the input.
    pub fn stdin(&mut self) -> Option<ExecStdinWriter> {
        self.stdin.take()
    }

    pub fn stdout(&mut self) -> Option<impl Read + Send + 'static> {
        self.stdout.take()
    }

    pub fn stderr(&mut self) -> Option<impl Read + Send + 'static> {
        self.stderr.take()
    }

    /// The command's pid inside the guest, once started.
    pub fn pid(&self) -> Option<i32> {
        self.pid.recv_timeout(Duration::from_secs(30)).ok()
    }

    pub fn resize(&self, rows: u16, cols: u16) -> io::Result<()> {
        send_input(&self.writer, &ExecInput::Resize { rows, cols })
    }

    /// Signals the command's process group.
    pub fn signal(&self, signum: i32) -> io::Result<()> {
        send_input(&self.writer, &ExecInput::Signal(signum))
    }

    /// Waits for the command to end. Output not taken through `stdout()`/`stderr()` is
    /// returned in the outcome.
    pub fn wait(mut self) -> Result<ExecOutcome, Error> {
        drop(self.stdin.take());
        let stdout = self.stdout.take();
        let stderr = self.stderr.take();
        let collect = |r: Option<ChannelReader>| {
            std::thread::spawn(move || {
                let mut v = Vec::new();
                if let Some(mut r) = r {
                    let _ = r.read_to_end(&mut v);
                }
                v
            })
        };
        let (o, e) = (collect(stdout), collect(stderr));
        let end = self
            .end
            .recv()
            .map_err(|_| Error::Exec("exec session vanished".into()))?;
        let (status, timed_out) = end.map_err(Error::Exec)?;
        Ok(ExecOutcome {
            status,
            stdout: o.join().unwrap_or_default(),
            stderr: e.join().unwrap_or_default(),
            duration: self.started.elapsed(),
            timed_out,
        })
    }
}

fn send_input(w: &Arc<Mutex<GuestStream>>, msg: &ExecInput) -> io::Result<()> {
    let mut w = w
        .lock()
        .map_err(|_| io::Error::other("exec stream lock poisoned"))?;
    write_frame(&mut *w, msg).map_err(frame_io)
}

/// Writes to the command's stdin; [`close`](Self::close) or drop ends the input.
pub struct ExecStdinWriter {
    writer: Arc<Mutex<GuestStream>>,
    closed: bool,
}

impl ExecStdinWriter {
    pub fn close(&mut self) -> io::Result<()> {
        if !self.closed {
            self.closed = true;
            send_input(&self.writer, &ExecInput::CloseStdin)?;
        }
        Ok(())
    }
}

impl Write for ExecStdinWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = buf.len().min(supermachine_protocol::agent::CHUNK_LEN);
        send_input(&self.writer, &ExecInput::Stdin(buf[..n].to_vec()))?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for ExecStdinWriter {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

/// A `Read` over chunks arriving on a channel; EOF when the sender is gone.
struct ChannelReader {
    rx: Receiver<Vec<u8>>,
    buf: Vec<u8>,
    pos: usize,
}

impl ChannelReader {
    fn new(rx: Receiver<Vec<u8>>) -> Self {
        Self {
            rx,
            buf: Vec::new(),
            pos: 0,
        }
    }
}

impl Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos >= self.buf.len() {
            match self.rx.recv() {
                Ok(b) => {
                    self.buf = b;
                    self.pos = 0;
                }
                Err(_) => return Ok(0),
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}
