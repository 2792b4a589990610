//! The worker process: `supermachine-worker --snapshot DIR --control-fd N`. It dies with
//! its parent (PR_SET_PDEATHSIG), and its VM monitor dies with it.

use std::net::TcpStream;
use std::os::fd::FromRawFd;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use supermachine_protocol::worker::{PortProtocol, WorkerReply, WorkerRequest};

use crate::agent::pump;
use crate::jail::{JailConfig, JailPaths};
use crate::snapshot::Snapshot;
use crate::vm::Vm;
use crate::{channel, BAD_GATEWAY};
use supermachine_backend::AgentEndpoint;
use supermachine_protocol::agent::AGENT_PORT;

struct Args {
    snapshot: PathBuf,
    control_fd: i32,
    jail: JailConfig,
    volumes: Vec<crate::Volume>,
}

fn parse_args() -> Result<Args, String> {
    let args: Vec<String> = std::env::args().collect();
    let mut snapshot = None;
    let mut fd = None;
    // Jailed unless the host says otherwise.
    let mut jail = JailConfig::default();
    let mut volumes = Vec::new();
    let mut i = 1;
    while i < args.len() {
        let value = args.get(i + 1).map(|s| s.as_str());
        match args[i].as_str() {
            "--snapshot" => snapshot = value.map(PathBuf::from),
            "--control-fd" => fd = value.and_then(|v| v.parse().ok()),
            "--volumes" => {
                volumes = serde_json::from_str(value.unwrap_or(""))
                    .map_err(|e| format!("--volumes: {e}"))?
            }
            "--no-jail" => {
                jail.enabled = false;
                i += 1;
                continue;
            }
            flag => {
                if !jail.apply_arg(flag, value)? {
                    return Err(format!("unknown argument {flag:?}"));
                }
            }
        }
        i += 2;
    }
    Ok(Args {
        snapshot: snapshot.ok_or("missing --snapshot DIR")?,
        control_fd: fd.ok_or("missing --control-fd N")?,
        jail,
        volumes,
    })
}

/// The files a restore of `snapshot` reads, for the jail's root.
/// What the jail of a worker of `snapshot` holds besides /dev, /proc and /tmp.
pub fn jail_paths(snapshot: &Snapshot, volumes: &[crate::Volume]) -> JailPaths {
    let meta = &snapshot.meta;
    let qemu = snapshot.backend_kind() == supermachine_backend::BackendKind::Qemu;
    let mut read_only = vec![meta.kernel.path.clone()];
    read_only.extend(meta.layers.iter().map(|l| l.path.clone()));
    let mut read_write = Vec::new();
    // QEMU 7.2 opens its RAM file read-write even for a private mapping, which a read-only
    // mount refuses; its files stay root's, and QEMU drops root once it has opened them.
    if qemu {
        read_write.push(snapshot.dir.clone());
    } else {
        read_only.push(snapshot.dir.clone());
    }
    JailPaths {
        read_only: read_only.into_iter().map(absolute).collect(),
        read_write: read_write.into_iter().map(absolute).collect(),
        owned: vec![absolute(std::env::temp_dir())],
        // QEMU and the `cat` it reads the state with come from the system.
        system: qemu,
        volumes: volumes
            .iter()
            .map(|v| (v.host.clone(), v.read_only()))
            .collect(),
    }
}

fn absolute(p: PathBuf) -> PathBuf {
    std::path::absolute(&p).unwrap_or(p)
}

pub fn main() -> i32 {
    let Args {
        snapshot: dir,
        control_fd: fd,
        jail,
        volumes,
    } = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("supermachine-worker: {e}\nusage: supermachine-worker --snapshot DIR --control-fd N [--volumes JSON] [--no-jail | --jail-uids A-B ...]");
            return 2;
        }
    };
    // SAFETY: prctl only changes this process's own death signal.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    // SAFETY: the parent passed us this socket for exactly this use; we own it now.
    let control = unsafe { UnixDatagram::from_raw_fd(fd) };
    let reply = |m: &WorkerReply| {
        let _ = channel::send(&control, m, None);
    };
    let snapshot = match Snapshot::open(&dir) {
        Ok(s) => s,
        Err(e) => {
            reply(&WorkerReply::Error {
                message: e.to_string(),
            });
            return 1;
        }
    };
    let jailed = if jail.enabled {
        // Only the jailed child returns; this process waits for it outside.
        match crate::jail::enter(
            &jail,
            &jail_paths(&snapshot, &volumes),
            snapshot.meta.memory_mib,
            fd,
        ) {
            Ok(j) => {
                if j.user_ns {
                    supermachine_backend::qemu::run_sandboxed();
                } else {
                    supermachine_backend::qemu::run_jailed_as(j.uid, j.gid);
                }
                Some(j)
            }
            Err(e) => {
                reply(&WorkerReply::Error {
                    message: e.to_string(),
                });
                return 1;
            }
        }
    } else {
        None
    };
    let prepared = match Vm::prepare_restore_in(&snapshot, None, &volumes) {
        Ok(p) => p,
        Err(e) => {
            reply(&WorkerReply::Error {
                message: e.to_string(),
            });
            return 1;
        }
    };
    if let Some(j) = &jailed {
        let run_root = [absolute(std::env::temp_dir())];
        let locked = crate::jail::drop_privileges(j, &run_root)
            .and_then(|_| crate::jail::seccomp::install());
        if let Err(e) = locked {
            reply(&WorkerReply::Error {
                message: e.to_string(),
            });
            return 1;
        }
    }
    reply(&WorkerReply::Prepared {
        monitor_pid: prepared.monitor_pid(),
    });

    let mut prepared = Some(prepared);
    let mut vm: Option<Arc<Vm>> = None;
    loop {
        let (req, fd) = match channel::recv::<WorkerRequest>(&control) {
            Ok(Some(m)) => m,
            // The host is gone (or spoke nonsense): nothing more to serve.
            Ok(None) | Err(_) => {
                if let Some(v) = vm.take() {
                    v.kill();
                }
                crate::run_dir::remove_live_run_dirs();
                return 0;
            }
        };
        match req {
            WorkerRequest::Restore => {
                let Some(p) = prepared.take() else {
                    reply(&WorkerReply::Error {
                        message: "already restored".into(),
                    });
                    continue;
                };
                let t = Instant::now();
                // The workload's output goes to the worker's own stdout/stderr (a daemon's log).
                let sink = crate::boot::output_sink(
                    Box::new(std::io::stdout()),
                    Box::new(std::io::stderr()),
                );
                match p.resume(sink) {
                    Ok(v) => {
                        let tm = v.timings();
                        let restore = tm.restore.unwrap_or_default();
                        let agent = match v.agent_endpoint() {
                            // A jailed QEMU's forwarded port is in our netns only.
                            Some(AgentEndpoint::Tcp(addr)) if jailed.is_some() => {
                                match crate::agent_relay::start(addr, AGENT_PORT) {
                                    Ok(e) => e.to_string(),
                                    Err(e) => {
                                        reply(&WorkerReply::Error {
                                            message: format!("relaying the agent: {e}"),
                                        });
                                        return 1;
                                    }
                                }
                            }
                            Some(a) => a.to_string(),
                            None => String::new(),
                        };
                        let v = Arc::new(v);
                        watch_exit(v.clone(), control.try_clone().ok());
                        vm = Some(v);
                        reply(&WorkerReply::Ready {
                            agent,
                            restore_ms: restore.as_secs_f64() * 1000.0,
                            ready_ms: t.elapsed().as_secs_f64() * 1000.0,
                        });
                    }
                    Err(e) => {
                        reply(&WorkerReply::Error {
                            message: e.to_string(),
                        });
                        return 1;
                    }
                }
            }
            WorkerRequest::Handoff {
                guest_port,
                protocol,
                prefix,
                last,
                id,
            } => {
                let (Some(v), Some(fd)) = (vm.clone(), fd) else {
                    reply(&WorkerReply::Error {
                        message: "handoff needs a restored VM and a socket".into(),
                    });
                    continue;
                };
                let client = TcpStream::from(fd);
                crate::jail::seccomp::test_trigger(jail.test_forbidden_syscall, &prefix);
                let notify = control.try_clone().ok();
                std::thread::spawn(move || {
                    let sent = serve_connection(&v, client, guest_port, protocol, &prefix);
                    if let Some(c) = &notify {
                        let _ = channel::send(
                            c,
                            &WorkerReply::Closed {
                                id,
                                bytes_to_client: sent.0,
                                status: sent.1,
                            },
                            None,
                        );
                    }
                    if last {
                        v.kill();
                        crate::run_dir::remove_live_run_dirs();
                        std::process::exit(0);
                    }
                });
                reply(&WorkerReply::HandedOff);
            }
            WorkerRequest::Listen {
                guest_port,
                protocol,
            } => {
                let (Some(v), Some(fd)) = (vm.clone(), fd) else {
                    reply(&WorkerReply::Error {
                        message: "listen needs a restored VM and a listening socket".into(),
                    });
                    continue;
                };
                let listener = std::net::TcpListener::from(fd);
                std::thread::spawn(move || {
                    for conn in listener.incoming() {
                        let Ok(client) = conn else { continue };
                        let v = v.clone();
                        std::thread::spawn(move || {
                            serve_connection(&v, client, guest_port, protocol, &[])
                        });
                    }
                });
                reply(&WorkerReply::HandedOff);
            }
            WorkerRequest::Stop => {
                if let Some(v) = vm.take() {
                    v.kill();
                }
                // Other threads may still hold the VM; its run directory goes now.
                crate::run_dir::remove_live_run_dirs();
                return 0;
            }
        }
    }
}

/// Client <-> guest port, after sending what the router already read. Returns the bytes
/// sent to the client and, for HTTP, the first response's status code.
fn serve_connection(
    vm: &Vm,
    client: TcpStream,
    guest_port: u16,
    protocol: PortProtocol,
    prefix: &[u8],
) -> (u64, Option<u16>) {
    use std::io::Write;
    let _ = client.set_nodelay(true);
    let mut guest = match vm.connect(guest_port) {
        Ok(g) => g,
        Err(_) => {
            // The connection cannot be served: tell an HTTP client so rather than hang up;
            // a TCP client only sees the close (a byte would be the protocol's first).
            if protocol == PortProtocol::Http {
                let mut c = client;
                let _ = c.write_all(BAD_GATEWAY);
                return (0, Some(502));
            }
            return (0, None);
        }
    };
    if !prefix.is_empty() && guest.write_all(prefix).is_err() {
        return (0, None);
    }
    let (Ok(c2), Ok(g2)) = (client.try_clone(), guest.try_clone()) else {
        return (0, None);
    };
    let up = std::thread::spawn(move || pump(client, guest));
    let result = pump_observing_status(g2, c2, protocol == PortProtocol::Http);
    let _ = up.join();
    result
}

/// Guest -> client copy that also notes the status code of the first response (`http`).
fn pump_observing_status(
    mut from: crate::agent::GuestStream,
    mut to: TcpStream,
    http: bool,
) -> (u64, Option<u16>) {
    use std::io::{Read, Write};
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    let mut head: Vec<u8> = Vec::new();
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if http && head.len() < 16 {
                    head.extend_from_slice(&buf[..n.min(16 - head.len())]);
                }
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
                total += n as u64;
            }
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
    (total, status_of(&head))
}

/// `HTTP/1.1 200 ...` -> 200.
fn status_of(head: &[u8]) -> Option<u16> {
    let s = std::str::from_utf8(head.get(..12)?).ok()?;
    if !s.starts_with("HTTP/") {
        return None;
    }
    s.get(9..12)?.parse().ok()
}

/// When the VM ends, report it and end the worker (one VM per process).
fn watch_exit(vm: Arc<Vm>, control: Option<UnixDatagram>) {
    std::thread::spawn(move || {
        let (status, detail) = match vm.wait() {
            Ok(s) => (Some(s), "the workload exited".to_string()),
            Err(e) => (None, e.to_string()),
        };
        if let Some(c) = control {
            let _ = channel::send(&c, &WorkerReply::Exited { status, detail }, None);
        }
        vm.kill();
        crate::run_dir::remove_live_run_dirs();
        std::process::exit(0);
    });
}

#[cfg(test)]
mod tests {
    #[test]
    fn status_line() {
        assert_eq!(super::status_of(b"HTTP/1.1 404 Not Found"), Some(404));
        assert_eq!(super::status_of(b"HTTP/1.0 200 OK\r\n"), Some(200));
        assert_eq!(super::status_of(b"SSH-2.0-Open"), None);
        assert_eq!(super::status_of(b"HTTP/1"), None);
    }
}
