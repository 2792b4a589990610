//! `supermachine exec`: run a command in a named running VM, like `docker exec`.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;

use clap::Args;
use supermachine_backend::AgentEndpoint;

use crate::cli::{registry, EXIT_INTERNAL};
use supermachine::{ExecBuilder, ExecStdin};
use supermachine_worker::agent::AgentClient;

#[derive(Args)]
pub struct ExecArgs {
    /// Allocate a pseudo-terminal.
    #[arg(short = 't', long)]
    tty: bool,
    /// Keep stdin open and stream it to the command.
    #[arg(short = 'i', long)]
    interactive: bool,
    /// Set an environment variable (KEY=VALUE); repeatable.
    #[arg(short = 'e', long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Working directory inside the VM.
    #[arg(short = 'w', long = "workdir")]
    workdir: Option<String>,
    /// User: name, uid, name:group or uid:gid.
    #[arg(short = 'u', long)]
    user: Option<String>,
    /// What `supermachine boot --name` named.
    target: String,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

/// Puts the host terminal in raw mode for a `-t -i` session and restores it on drop.
struct RawTerminal(Option<nix::sys::termios::Termios>);

impl RawTerminal {
    fn enable() -> Self {
        let stdin = std::io::stdin();
        match nix::sys::termios::tcgetattr(&stdin) {
            Ok(orig) => {
                let mut raw = orig.clone();
                nix::sys::termios::cfmakeraw(&mut raw);
                let _ =
                    nix::sys::termios::tcsetattr(&stdin, nix::sys::termios::SetArg::TCSANOW, &raw);
                Self(Some(orig))
            }
            Err(_) => Self(None),
        }
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if let Some(orig) = &self.0 {
            let _ = nix::sys::termios::tcsetattr(
                std::io::stdin(),
                nix::sys::termios::SetArg::TCSANOW,
                orig,
            );
        }
    }
}

fn terminal_size() -> Option<(u16, u16)> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes a winsize into `ws`, which outlives the call.
    let r = unsafe { libc::ioctl(std::io::stdout().as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
    (r == 0 && ws.ws_row > 0).then_some((ws.ws_row, ws.ws_col))
}

pub fn run(args: ExecArgs) -> i32 {
    let entry = match registry::lookup(&args.target) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("supermachine: error: {e}");
            return EXIT_INTERNAL;
        }
    };
    let agent = match entry
        .agent
        .clone()
        .map(Ok)
        .unwrap_or_else(|| daemon_agent(&entry))
    {
        Ok(a) => a,
        Err(e) => {
            eprintln!("supermachine: error: {e}");
            return EXIT_INTERNAL;
        }
    };
    let mut b = ExecBuilder::new(AgentClient::new(agent))
        .argv(args.command.clone())
        .tty(args.tty)
        .stdin(if args.interactive {
            ExecStdin::Piped
        } else {
            ExecStdin::Null
        });
    for kv in &args.env {
        let (k, v) = kv.split_once('=').unwrap_or((kv.as_str(), ""));
        b = b.env(k, v);
    }
    if let Some(w) = &args.workdir {
        b = b.cwd(w);
    }
    if let Some(u) = &args.user {
        b = b.user(u);
    }
    if args.tty {
        // Without a host terminal, the conventional 24x80.
        let (rows, cols) = terminal_size().unwrap_or((24, 80));
        b = b.winsize(rows, cols);
    }
    let _raw = (args.tty && args.interactive && nix::unistd::isatty(0).unwrap_or(false))
        .then(RawTerminal::enable);
    let mut child = match b.spawn() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("supermachine: error: {e}");
            return EXIT_INTERNAL;
        }
    };
    if let Some(mut w) = child.stdin() {
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            let mut stdin = std::io::stdin();
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if w.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = w.close();
        });
    }
    let out = child.stdout().map(|mut r| {
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut r, &mut std::io::stdout());
        })
    });
    let err = child.stderr().map(|mut r| {
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut r, &mut std::io::stderr());
        })
    });
    let outcome = child.wait();
    for h in [out, err].into_iter().flatten() {
        let _ = h.join();
    }
    let _ = std::io::stdout().flush();
    match outcome {
        Ok(o) => {
            if o.timed_out {
                eprintln!("supermachine: exec timed out");
            }
            o.code()
        }
        Err(e) => {
            eprintln!("supermachine: error: {e}");
            EXIT_INTERNAL
        }
    }
}

/// A `run` daemon's VM: ask its admin endpoint for a worker's agent.
pub(crate) fn daemon_agent(entry: &registry::Entry) -> Result<AgentEndpoint, String> {
    use std::io::{Read, Write};
    let admin = entry.admin.ok_or_else(|| {
        format!(
            "{:?} has neither an agent nor an admin endpoint",
            entry.name
        )
    })?;
    let mut s = std::net::TcpStream::connect(admin)
        .map_err(|e| format!("reaching {}'s admin endpoint: {e}", entry.name))?;
    s.write_all(b"GET /_supermachine/agents HTTP/1.0\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).map_err(|e| e.to_string())?;
    let body = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| &resp[p + 4..])
        .unwrap_or(&[]);
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("bad agents answer: {e}"))?;
    v["agents"]
        .as_array()
        .and_then(|a| a.first())
        .and_then(|a| a.as_str())
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| format!("{} has no running VM right now", entry.name))
}
