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
use supermachine_router::{Isolation, PoolConfig, Route, RouterConfig};

#[derive(Args)]
pub struct RunArgs {
    /// Publish: [IP:]HOST_PORT:GUEST_PORT (one; the guest port is where the workload listens).
    #[arg(short = 'p', long = "publish", value_name = "[IP:]HOST:GUEST")]
    publish: Option<String>,
    /// Run in the background; return once the workload answers.
    #[arg(short = 'd', long)]
    detach: bool,
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
    let (listen, guest_port) = match a.publish.as_deref().map(crate::cli::boot::parse_publish) {
        Some(Ok(p)) => p,
        Some(Err(e)) => return fail(e),
        None => match free_addr() {
            Ok(addr) => (addr, 80),
            Err(e) => return fail(e),
        },
    };
    if a.detach && std::env::var_os("SUPERMACHINE_DETACHED").is_none() {
        return detach(&name, listen);
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
    let config = RouterConfig {
        listen,
        admin: Some(admin),
        routes: vec![Route {
            host: None,
            snapshot: snap,
        }],
        pool: PoolConfig {
            min: a.replicas.max(1),
            max: a.replicas.max(1),
            idle_timeout: Duration::from_secs(3600),
            isolation: Isolation::Shared,
        },
        grace: Duration::from_secs(10),
        accept_in_workers: false,
    };
    eprintln!("supermachine: {name} serving http://{listen} -> guest port {guest_port}");
    let result = crate::cli::serve::run_router(config);
    match result {
        Ok(()) => 0,
        Err(e) => fail(e),
    }
}

/// Starts this command again in the background (own session, output to the log) and
/// returns once the workload answers on `listen`.
fn detach(name: &str, listen: SocketAddr) -> i32 {
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
        args.insert(1, format!("--publish={}:{}:80", listen.ip(), listen.port()));
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
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            let tail = std::fs::read_to_string(&log).unwrap_or_default();
            return fail(format!(
                "{name} exited ({status}) before answering:\n{tail}"
            ));
        }
        if answers(listen) {
            println!("{name}");
            return 0;
        }
        if Instant::now() > deadline {
            return fail(format!(
                "{name} did not answer on {listen} within 300 s (log: {})",
                log.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// True when an HTTP request to `addr` gets any response.
fn answers(addr: SocketAddr) -> bool {
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    if s.write_all(b"GET / HTTP/1.0\r\nHost: supermachine\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut b = [0u8; 5];
    s.read_exact(&mut b).is_ok() && &b == b"HTTP/"
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
            (Some(l), Some(g)) => format!("{l}->{g}/tcp"),
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
