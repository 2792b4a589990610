//! `supermachine run` (docker-run-like: bake if needed, then serve one image) and the
//! commands that reach running daemons: `ps`, `stop`, `logs`.

use std::io::{Read, Seek, Write};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use clap::Args;

use crate::cli::source::SourceArgs;
use crate::cli::{registry, EXIT_INTERNAL};
use supermachine::pull;
use supermachine::snapshot::{self, Snapshot};
use supermachine::Error;
use supermachine::{ExecBuilder, ExecStdin, PortProtocol};
use supermachine_router::{Isolation, PoolConfig, Route, RouterConfig, TcpRoute};
use supermachine_worker::agent::AgentClient;

use crate::cli::boot::Publish;

#[derive(Args)]
pub struct RunArgs {
    /// Publish: [IP:]HOST_PORT:GUEST_PORT[/tcp|/http] (one; the guest port is where the
    /// workload listens). tcp (the default) passes bytes untouched, any protocol; http
    /// routes by the request head and answers 502 when no VM can serve.
    #[arg(short = 'p', long = "publish", value_name = "[IP:]HOST:GUEST[/PROTO]")]
    publish: Option<String>,
    #[command(flatten)]
    volumes: crate::cli::boot::VolumeArgs,
    /// Run in the background; return once the workload is ready: the guest port listens,
    /// then --health-cmd and --health-http pass if given.
    #[arg(short = 'd', long)]
    detach: bool,
    /// Readiness check run in the guest (`sh -c CMD`; ready at exit status 0), retried
    /// until --ready-timeout.
    #[arg(long, value_name = "CMD")]
    health_cmd: Option<String>,
    /// Readiness check over HTTP: GET PATH on the published port must answer below 400.
    #[arg(long, value_name = "PATH")]
    health_http: Option<String>,
    /// Seconds the workload has to become ready: to listen on its port while it is baked,
    /// and to pass the checks after it starts. Past it, -d stops the daemon and fails.
    #[arg(long, default_value_t = 120, value_name = "S")]
    ready_timeout: u64,
    /// Name (for exec, logs, stop); default: generated.
    #[arg(long)]
    name: Option<String>,
    #[arg(short = 'e', long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    #[arg(long, default_value_t = 256)]
    memory: u32,
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    #[command(flatten)]
    source: SourceArgs,
    #[command(flatten)]
    backend: crate::cli::backend::BackendArgs,
    /// VMs serving (shared isolation).
    #[arg(long, default_value_t = 1)]
    replicas: usize,
    #[arg(long)]
    snapshots_dir: Option<PathBuf>,
    /// oci-layout:DIR[:TAG], or the name of a baked snapshot.
    image: String,
    /// Replaces the image's Cmd.
    #[arg(last = true)]
    argv: Vec<String>,
}

fn fail(msg: impl std::fmt::Display) -> i32 {
    eprintln!("supermachine: error: {msg}");
    EXIT_INTERNAL
}

fn free_addr() -> Result<SocketAddr, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())
}

/// The snapshot to serve, honouring the pull policy.
fn snapshot_for(a: &RunArgs, guest_port: u16, root: &std::path::Path) -> Result<PathBuf, Error> {
    let existing = root.join(&a.image);
    if !a.image.contains(':') && existing.join(snapshot::METADATA).is_file() {
        Snapshot::open(&existing)?;
        return Ok(existing);
    }
    let mut b = supermachine::Image::builder(&a.image)
        .name(&format!("{}-{guest_port}", pull::default_name(&a.image)))
        .pull_options(
            a.source
                .options(supermachine::PullPolicy::Missing)
                .map_err(|e| Error::Image(supermachine_bake::BakeError::Unsupported(e)))?,
        )
        .backend(
            a.backend
                .resolve()
                .map_err(|e| Error::Image(supermachine_bake::BakeError::Unsupported(e)))?,
        )
        .memory_mib(a.memory)
        .vcpus(a.vcpus)
        .guest_port(guest_port)
        .ready_timeout(Duration::from_secs(a.ready_timeout))
        .snapshots_dir(root);
    if !a.argv.is_empty() {
        b = b.cmd(a.argv.clone());
    }
    for kv in &a.env {
        let (k, v) = kv.split_once('=').unwrap_or((kv.as_str(), ""));
        b = b.env(k, v);
    }
    Ok(b.build()?.snapshot().dir.clone())
}

pub fn run(a: RunArgs) -> i32 {
    let name = a.name.clone().unwrap_or_else(|| {
        let mut b = [0u8; 4];
        let _ = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b));
        format!("sm-{}", hex::encode(b))
    });
    if !registry::valid_name(&name) {
        return fail(format!(
            "invalid name {name:?}: use letters, digits, '.', '_' and '-'"
        ));
    }
    if registry::lookup(&name).is_ok() {
        return fail(format!("a VM named {name:?} is already running"));
    }
    let publish = match a.publish.as_deref().map(crate::cli::boot::parse_publish) {
        Some(Ok(p)) => p,
        Some(Err(e)) => return fail(e),
        None => match free_addr() {
            Ok(listen) => Publish {
                listen,
                guest_port: 80,
                protocol: PortProtocol::Tcp,
            },
            Err(e) => return fail(e),
        },
    };
    let (listen, guest_port) = (publish.listen, publish.guest_port);
    if a.detach && std::env::var_os("SUPERMACHINE_DETACHED").is_none() {
        let ready = Readiness {
            publish,
            health_cmd: a.health_cmd.clone(),
            health_http: a.health_http.clone(),
            // Until a VM runs: a first bake boots the image (bounded by its own limits),
            // waits up to --ready-timeout for the port and snapshots; a daemon whose bake
            // fails exits, which ends the wait at once. This only bounds a daemon that
            // neither serves nor exits.
            timeout: Duration::from_secs(a.ready_timeout.saturating_add(BAKE_ALLOWANCE_S)),
            checks_timeout: Duration::from_secs(a.ready_timeout),
        };
        return detach(&name, &ready);
    }
    let root = a
        .snapshots_dir
        .clone()
        .unwrap_or_else(snapshot::default_root);
    let snap = match snapshot_for(&a, guest_port, &root) {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    let admin = match free_addr() {
        Ok(x) => x,
        Err(e) => return fail(e),
    };
    let entry = registry::Entry {
        name: name.clone(),
        pid: std::process::id() as i32,
        admin: Some(admin),
        listen: Some(listen),
        guest_port: Some(guest_port),
        protocol: Some(protocol_name(publish.protocol).into()),
        image: a.image.clone(),
        started_unix: SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        ..Default::default()
    };
    let _registration = match registry::register(&entry) {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    let (http_listen, routes, tcp) = match publish.protocol {
        PortProtocol::Http => (
            Some(listen),
            vec![Route {
                host: None,
                snapshot: snap,
            }],
            vec![],
        ),
        PortProtocol::Tcp => (
            None,
            vec![],
            vec![TcpRoute {
                listen,
                snapshot: snap,
            }],
        ),
    };
    let config = RouterConfig {
        listen: http_listen,
        admin: Some(admin),
        routes,
        tcp,
        tls: vec![],
        sni: None,
        pool: PoolConfig {
            min: a.replicas.max(1),
            max: a.replicas.max(1),
            idle_timeout: Duration::from_secs(3600),
            isolation: Isolation::Shared,
            volumes: a.volumes.volumes.clone(),
        },
        grace: Duration::from_secs(10),
        accept_in_workers: false,
        user: None,
    };
    eprintln!(
        "supermachine: {name} serving {listen} -> guest port {guest_port}/{}",
        protocol_name(publish.protocol)
    );
    let result = crate::cli::serve::run_router(config);
    match result {
        Ok(()) => 0,
        Err(e) => fail(e),
    }
}

fn protocol_name(p: PortProtocol) -> &'static str {
    match p {
        PortProtocol::Tcp => "tcp",
        PortProtocol::Http => "http",
    }
}

/// How much longer than --ready-timeout `run -d` waits for a first VM: the boot and the
/// snapshot of a bake (slow on emulated CPUs), besides the port wait.
const BAKE_ALLOWANCE_S: u64 = 600;

/// When a detached daemon counts as started.
struct Readiness {
    publish: Publish,
    health_cmd: Option<String>,
    health_http: Option<String>,
    /// From the start of the daemon (its bake included) to ready.
    timeout: Duration,
    /// For the checks once a VM runs.
    checks_timeout: Duration,
}

/// Starts this command again in the background (own session, output to the log) and
/// returns once the workload is ready. Not ready in time, or the daemon died: it is
/// stopped, its registry entry removed, and the reason and the log's tail printed.
fn detach(name: &str, ready: &Readiness) -> i32 {
    let log = registry::log_path(name);
    if let Some(d) = log.parent() {
        let _ = std::fs::create_dir_all(d);
    }
    let (out, err) = match std::fs::File::create(&log).and_then(|f| Ok((f.try_clone()?, f))) {
        Ok(p) => p,
        Err(e) => return fail(format!("creating {}: {e}", log.display())),
    };
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => return fail(e),
    };
    // Same arguments, with the name and port pinned so the child matches what we print.
    let mut args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "-d" && a != "--detach")
        .collect();
    if !args.iter().any(|a| a == "--name") {
        args.insert(1, format!("--name={name}"));
    }
    if !args
        .iter()
        .any(|a| a == "-p" || a.starts_with("--publish") || a.starts_with("-p"))
    {
        let p = &ready.publish;
        args.insert(
            1,
            format!(
                "--publish={}:{}:{}/{}",
                p.listen.ip(),
                p.listen.port(),
                p.guest_port,
                protocol_name(p.protocol)
            ),
        );
    }
    let mut cmd = std::process::Command::new(exe);
    cmd.args(&args)
        .env("SUPERMACHINE_DETACHED", "1")
        .stdin(std::process::Stdio::null())
        .stdout(out)
        .stderr(err);
    // SAFETY: setsid is async-signal-safe; the daemon leaves our session and terminal.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid()?;
            Ok(())
        });
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return fail(format!("starting the daemon: {e}")),
    };
    let tail = || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    };
    match wait_ready(name, &mut child, ready) {
        Ok(()) => {
            println!("{name}");
            0
        }
        Err(Unready::Exited(status)) => fail(format!(
            "{name} exited ({status}) before it was ready; its log ({}):\n{}",
            log.display(),
            tail()
        )),
        Err(Unready::NotReady(why)) => {
            stop_daemon(name, &mut child);
            fail(format!(
                "{name} was not ready: {why}; it was stopped. Its log ({}):\n{}",
                log.display(),
                tail()
            ))
        }
    }
}

enum Unready {
    Exited(std::process::ExitStatus),
    NotReady(String),
}

/// Ready: registered (so baked and serving), a VM restored, its guest port listening (the
/// guest agent says so; no byte goes to the workload), then the user's checks.
fn wait_ready(
    name: &str,
    child: &mut std::process::Child,
    ready: &Readiness,
) -> Result<(), Unready> {
    let started = Instant::now();
    let exited = |child: &mut std::process::Child| match child.try_wait() {
        Ok(Some(status)) => Err(Unready::Exited(status)),
        _ => Ok(()),
    };
    let port = ready.publish.guest_port;
    // Registered with a VM whose agent answers.
    let agent = loop {
        exited(child)?;
        let entry = registry::lookup(name).ok();
        if let Some(agent) = entry.and_then(|e| crate::cli::exec::daemon_agent(&e).ok()) {
            break AgentClient::new(agent);
        }
        if started.elapsed() > ready.timeout {
            return Err(Unready::NotReady(format!(
                "no VM was running after {} s",
                ready.timeout.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let checks_start = Instant::now();
    let secs = ready.checks_timeout.as_secs();
    let remaining = || {
        ready
            .checks_timeout
            .checked_sub(checks_start.elapsed())
            .filter(|d| !d.is_zero())
    };
    let not_ready = |what: &str, last: &Option<String>| {
        Unready::NotReady(format!(
            "{what} did not pass within --ready-timeout {secs} s ({})",
            last.as_deref().unwrap_or("it never ran")
        ))
    };
    let wait = remaining().ok_or_else(|| not_ready("the port check", &None))?;
    agent
        .wait_listening(port, wait)
        .map_err(|e| Unready::NotReady(format!("guest port {port} did not listen: {e}")))?;
    if let Some(cmd) = &ready.health_cmd {
        let what = format!("--health-cmd {cmd:?}");
        let mut last = None;
        loop {
            exited(child)?;
            let wait = remaining().ok_or_else(|| not_ready(&what, &last))?;
            let out = ExecBuilder::new(agent.clone())
                .argv(["sh".to_string(), "-c".to_string(), cmd.clone()])
                .stdin(ExecStdin::Null)
                .timeout(wait)
                .output();
            last = Some(match out {
                Ok(o) if o.code() == 0 => break,
                Ok(o) => format!(
                    "exit {}: {}",
                    o.code(),
                    String::from_utf8_lossy(&o.stderr).trim()
                ),
                Err(e) => e.to_string(),
            });
            std::thread::sleep(Duration::from_secs(1));
        }
    }
    if let Some(path) = &ready.health_http {
        let what = format!("--health-http {path}");
        let mut last = None;
        loop {
            exited(child)?;
            remaining().ok_or_else(|| not_ready(&what, &last))?;
            last = Some(match http_status(ready.publish.listen, path) {
                Ok(code) if code < 400 => break,
                Ok(code) => format!("status {code}"),
                Err(e) => e,
            });
            std::thread::sleep(Duration::from_secs(1));
        }
    }
    Ok(())
}

/// SIGTERM, then SIGKILL after 15 s; the registry entry goes too (a killed daemon cannot
/// remove its own).
fn stop_daemon(name: &str, child: &mut std::process::Child) {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if !matches!(child.try_wait(), Ok(Some(_))) {
        let _ = child.kill();
        let _ = child.wait();
    }
    registry::unregister(name);
}

/// The status code of `GET path` on `addr`.
fn http_status(addr: SocketAddr, path: &str) -> Result<u16, String> {
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .map_err(|e| format!("connecting to {addr}: {e}"))?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    write!(s, "GET {path} HTTP/1.0\r\nHost: supermachine\r\n\r\n").map_err(|e| e.to_string())?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head)
        .map_err(|e| format!("no HTTP answer: {e}"))?;
    let line = std::str::from_utf8(&head).map_err(|_| "no HTTP answer".to_string())?;
    if !line.starts_with("HTTP/") {
        return Err(format!("no HTTP answer ({line:?})"));
    }
    line.get(9..12)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no status code in {line:?}"))
}

#[derive(Args)]
pub struct PsArgs {}

pub fn ps(_a: PsArgs) -> i32 {
    println!(
        "{:<20} {:<8} {:<28} {:<10} IMAGE",
        "NAME", "PID", "PORTS", "UP"
    );
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    for e in registry::list() {
        let ports = match (e.listen, e.guest_port) {
            (Some(l), Some(g)) => format!("{l}->{g}/{}", e.protocol.as_deref().unwrap_or("http")),
            _ => "-".into(),
        };
        let up = if e.started_unix > 0 {
            format!("{}s", now.saturating_sub(e.started_unix))
        } else {
            "-".into()
        };
        println!(
            "{:<20} {:<8} {:<28} {:<10} {}",
            e.name, e.pid, ports, up, e.image
        );
    }
    0
}

#[derive(Args)]
pub struct StopArgs {
    /// Seconds to wait before killing.
    #[arg(short = 't', long = "time", default_value_t = 15)]
    time: u64,
    #[arg(required = true)]
    names: Vec<String>,
}

pub fn stop(a: StopArgs) -> i32 {
    let mut code = 0;
    for name in &a.names {
        let e = match registry::lookup(name) {
            Ok(e) => e,
            Err(msg) => {
                code = fail(msg);
                continue;
            }
        };
        let pid = nix::unistd::Pid::from_raw(e.pid);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(a.time);
        while registry::alive(e.pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if registry::alive(e.pid) {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
        println!("{name}");
    }
    code
}

#[derive(Args)]
pub struct LogsArgs {
    /// Keep printing new output until the daemon stops.
    #[arg(short = 'f', long)]
    follow: bool,
    name: String,
}

pub fn logs(a: LogsArgs) -> i32 {
    let path = registry::log_path(&a.name);
    let mut f = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(_) => {
            return fail(format!(
                "no logs for {:?} (only `run -d` daemons keep logs)",
                a.name
            ))
        }
    };
    let mut out = std::io::stdout();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match f.read(&mut buf) {
            Ok(0) => {
                let running = registry::lookup(&a.name).is_ok();
                if !a.follow || !running {
                    // One last read after the daemon stopped.
                    let _ = std::io::copy(&mut f, &mut out);
                    return 0;
                }
                let _ = out.flush();
                std::thread::sleep(Duration::from_millis(200));
                let _ = f.stream_position();
            }
            Ok(n) => {
                if out.write_all(&buf[..n]).is_err() {
                    return 0;
                }
            }
            Err(e) => return fail(e),
        }
    }
}
