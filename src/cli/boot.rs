//! `supermachine boot`: like `docker run --rm`, in a microVM booted from scratch.

use crate::cli::source::SourceArgs;
use std::path::PathBuf;

use clap::Args;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};

use std::net::{IpAddr, SocketAddr};

use crate::cli::{registry, EXIT_INTERNAL};
use supermachine::boot::{self, BootReport, BootRequest};
use supermachine::{ImageRef, Overrides, PortProtocol, Vm};

#[derive(Args)]
pub struct BootArgs {
    /// Overwrite the image's Entrypoint ("" clears it); also clears the image's Cmd, as docker does.
    #[arg(long)]
    entrypoint: Option<String>,
    /// Set an environment variable (KEY=VALUE, or KEY to pass the host's value); repeatable.
    #[arg(short = 'e', long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Working directory inside the image (default: the image's WorkingDir, else /).
    #[arg(short = 'w', long = "workdir")]
    workdir: Option<String>,
    /// User to run as: name, uid, name:group or uid:gid (default: the image's User).
    #[arg(short = 'u', long = "user")]
    user: Option<String>,
    /// Guest hostname.
    #[arg(long)]
    hostname: Option<String>,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(64..=65536))]
    memory: u32,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=32))]
    vcpus: u32,
    /// Guest kernel (PVH vmlinux). Default: $SUPERMACHINE_KERNEL, else the one built by kernel-config/build.sh.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Guest init binary (static). Default: $SUPERMACHINE_INIT, else the one built by scripts/build-guest.sh.
    #[arg(long)]
    init: Option<PathBuf>,
    #[command(flatten)]
    volumes: VolumeArgs,
    /// Append an argument to the guest kernel's command line; repeatable.
    #[arg(long = "kernel-arg", value_name = "ARG")]
    kernel_args: Vec<String>,
    /// Seconds the guest may take to start its init before the boot fails.
    #[arg(long, default_value_t = 60)]
    boot_timeout: u64,
    /// Print the boot-time split (backend start, kernel, init, workload) to stderr at the end.
    #[arg(long)]
    timings: bool,
    /// Write the boot-time split as JSON to this file.
    #[arg(long, value_name = "FILE")]
    timings_json: Option<PathBuf>,
    /// Name the VM so `supermachine exec NAME` can reach it.
    #[arg(long)]
    name: Option<String>,
    /// Publish a guest port: [IP:]HOST_PORT:GUEST_PORT[/tcp] (IP defaults to 127.0.0.1;
    /// bytes are forwarded untouched); repeatable.
    #[arg(short = 'p', long = "publish", value_name = "[IP:]HOST:GUEST")]
    publish: Vec<String>,
    #[command(flatten)]
    source: SourceArgs,
    #[command(flatten)]
    backend: crate::cli::backend::BackendArgs,
    /// The image: a registry reference (NAME[:TAG][@DIGEST]), oci-layout:DIR[:TAG] or
    /// oci-archive:FILE[:TAG].
    image: String,
    /// Replaces the image's Cmd.
    #[arg(last = true)]
    argv: Vec<String>,
}

pub fn run(args: BootArgs) -> i32 {
    // On SIGINT/SIGTERM/SIGHUP exit at once: the VM monitor is tied to this process
    // (PR_SET_PDEATHSIG) and dies with it; the run directory is a tempdir we remove here.
    if let Ok(mut signals) = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP]) {
        std::thread::spawn(move || {
            if let Some(sig) = signals.forever().next() {
                supermachine::run_dir::remove_live_run_dirs();
                if let Some(p) = REGISTRATION.get() {
                    let _ = std::fs::remove_file(p);
                }
                eprintln!("supermachine: stopping the VM (signal {sig})");
                std::process::exit(128 + sig);
            }
        });
    }

    let image = match ImageRef::parse(&args.image) {
        Ok(i) => i,
        Err(e) => return fail(&e.into()),
    };
    let mut req = BootRequest::new(image);
    req.overrides = Overrides {
        entrypoint: args.entrypoint,
        cmd: if args.argv.is_empty() {
            None
        } else {
            Some(args.argv)
        },
        env: args.env,
        workdir: args.workdir,
        user: args.user,
        hostname: args.hostname,
    };
    req.memory_mib = args.memory;
    req.vcpus = args.vcpus;
    req.kernel = args.kernel;
    req.init = args.init;
    req.kernel_args = args.kernel_args;
    req.volumes = args.volumes.volumes;
    req.boot_timeout = std::time::Duration::from_secs(args.boot_timeout);
    req.pull = match args.source.options(supermachine::PullPolicy::Missing) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("supermachine: error: {e}");
            return EXIT_INTERNAL;
        }
    };

    let mut publish = Vec::new();
    for spec in &args.publish {
        match parse_publish(spec) {
            Ok(p) if p.protocol == PortProtocol::Tcp => publish.push((p.listen, p.guest_port)),
            Ok(_) => {
                eprintln!("supermachine: error: --publish {spec:?}: boot forwards TCP only; HTTP routing is `run` and `serve`");
                return EXIT_INTERNAL;
            }
            Err(e) => {
                eprintln!("supermachine: error: {e}");
                return EXIT_INTERNAL;
            }
        }
    }
    req.backend = match args.backend.resolve() {
        Ok(b) => b,
        Err(e) => {
            eprintln!("supermachine: error: {e}");
            return EXIT_INTERNAL;
        }
    };
    let sink = boot::output_sink(Box::new(std::io::stdout()), Box::new(std::io::stderr()));
    let vm = match Vm::boot(&req, sink) {
        Ok(vm) => vm,
        Err(e) => return fail(&e),
    };
    let mut forwarders = Vec::new();
    for (listen, guest_port) in publish {
        match vm.expose_tcp_on(listen, guest_port) {
            Ok(f) => forwarders.push(f),
            Err(e) => return fail(&e),
        }
    }
    let _registration = match (&args.name, vm.agent_endpoint()) {
        (Some(name), Some(agent)) => match registry::register(&registry::Entry {
            name: name.clone(),
            pid: std::process::id() as i32,
            agent: Some(agent),
            image: args.image.clone(),
            ..Default::default()
        }) {
            Ok(r) => {
                let _ = REGISTRATION.set(r.path().to_path_buf());
                Some(r)
            }
            Err(e) => {
                eprintln!("supermachine: error: {e}");
                return EXIT_INTERNAL;
            }
        },
        (Some(_), None) => {
            eprintln!("supermachine: error: --name needs the guest agent (supermachine-shim), which was not found");
            return EXIT_INTERNAL;
        }
        _ => None,
    };
    let result = vm.wait().map(|status| BootReport {
        status,
        timings: vm.timings(),
        backend: vm.backend_name().to_string(),
    });
    drop(forwarders);
    match result {
        Ok(report) => {
            if args.timings {
                eprintln!("{}", timings_text(&report));
            }
            if let Some(path) = &args.timings_json {
                if let Err(e) = std::fs::write(path, timings_json(&report)) {
                    eprintln!("supermachine: writing {}: {e}", path.display());
                }
            }
            report.status.as_shell_code()
        }
        Err(e) => fail(&e),
    }
}

/// The registry entry of this process's named VM, for the signal handler to remove.
static REGISTRATION: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// One `-p` argument: where clients connect, the guest port, what the port carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Publish {
    pub listen: SocketAddr,
    pub guest_port: u16,
    pub protocol: PortProtocol,
}

/// `[IP:]HOST:GUEST[/tcp|/http]` (IP defaults to 127.0.0.1; the protocol to tcp, which
/// passes bytes untouched and so never corrupts a protocol that is not HTTP).
pub(crate) fn parse_publish(spec: &str) -> Result<Publish, String> {
    let bad =
        || format!("invalid --publish {spec:?}: expected [IP:]HOST_PORT:GUEST_PORT[/tcp|/http]");
    let (addr, protocol) = match spec.rsplit_once('/') {
        Some((a, "tcp")) => (a, PortProtocol::Tcp),
        Some((a, "http")) => (a, PortProtocol::Http),
        Some((_, other)) => {
            return Err(format!(
                "invalid --publish {spec:?}: unknown protocol {other:?} (tcp or http)"
            ))
        }
        None => (spec, PortProtocol::Tcp),
    };
    let (front, guest) = addr.rsplit_once(':').ok_or_else(bad)?;
    let guest: u16 = guest.parse().map_err(|_| bad())?;
    let (ip, host) = match front.rsplit_once(':') {
        Some((ip, host)) => (ip.trim_start_matches('[').trim_end_matches(']'), host),
        None => ("127.0.0.1", front),
    };
    let ip: IpAddr = ip.parse().map_err(|_| bad())?;
    let host: u16 = host.parse().map_err(|_| bad())?;
    if guest == 0 {
        return Err(bad());
    }
    Ok(Publish {
        listen: SocketAddr::new(ip, host),
        guest_port: guest,
        protocol,
    })
}

fn fail(e: &supermachine::Error) -> i32 {
    eprintln!("supermachine: error: {e}");
    EXIT_INTERNAL
}

fn ms(d: Option<std::time::Duration>) -> String {
    d.map_or("-".into(), |d| format!("{:.1}", d.as_secs_f64() * 1000.0))
}

fn timings_text(r: &BootReport) -> String {
    let t = &r.timings;
    format!(
        "boot timings ({}): prepare {} ms, backend start {} ms, kernel {} ms, init {} ms, workload {} ms, total {} ms",
        r.backend,
        ms(Some(t.prepare)),
        ms(Some(t.backend_start)),
        ms(t.kernel),
        ms(t.init),
        ms(t.workload),
        ms(Some(t.total)),
    )
}

fn timings_json(r: &BootReport) -> String {
    let t = &r.timings;
    let f = |d: Option<std::time::Duration>| d.map(|d| d.as_secs_f64() * 1000.0);
    let v = serde_json::json!({
        "backend": r.backend,
        "prepare_ms": f(Some(t.prepare)),
        "backend_start_ms": f(Some(t.backend_start)),
        "kernel_ms": f(t.kernel),
        "init_ms": f(t.init),
        "workload_ms": f(t.workload),
        "total_ms": f(Some(t.total)),
        "guest_uptime_at_init_ms": t.guest_uptime_at_init_ms,
    });
    format!("{v}\n")
}

/// `-v` of boot, run and serve.
#[derive(clap::Args, Debug, Clone)]
pub struct VolumeArgs {
    /// Show a host directory inside the VM (run, serve: inside every VM they restore, of
    /// every image served): HOST:GUEST[:ro|rw] (default rw; HOST must exist; qemu
    /// backend); repeatable, up to 4 (fewer for images of many layers).
    #[arg(short = 'v', long = "volume", value_name = "HOST:GUEST[:ro|rw]", value_parser = parse_volume)]
    pub volumes: Vec<supermachine::Volume>,
}

/// `-v HOST:GUEST[:ro|rw]`, checked as it is parsed (a missing HOST is a usage error).
fn parse_volume(spec: &str) -> Result<supermachine::Volume, String> {
    supermachine::Volume::parse(spec).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::parse_publish;

    #[test]
    fn publish_specs() {
        use supermachine::PortProtocol::{Http, Tcp};
        let p = |s| parse_publish(s).map(|p| (p.listen, p.guest_port, p.protocol));
        assert_eq!(
            p("8080:80").unwrap(),
            ("127.0.0.1:8080".parse().unwrap(), 80, Tcp)
        );
        assert_eq!(
            p("0.0.0.0:8080:80/http").unwrap(),
            ("0.0.0.0:8080".parse().unwrap(), 80, Http)
        );
        assert_eq!(
            p("[::1]:9:80/tcp").unwrap(),
            ("[::1]:9".parse().unwrap(), 80, Tcp)
        );
        assert!(p("80").is_err());
        assert!(p("x:80").is_err());
        assert!(p("8080:0").is_err());
        assert!(p("8080:80/udp").unwrap_err().contains("udp"));
    }
}
