//! `supermachine serve`: the multi-VM ingress — HTTP routes by Host on one listener, TCP
//! routes each on its own.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, ValueEnum};

use crate::cli::EXIT_INTERNAL;
use supermachine::boot::BootRequest;
use supermachine::pull::{self, PullRequest};
use supermachine::snapshot;
use supermachine::ImageRef;
use supermachine_router::{
    self as router, Isolation, PoolConfig, Route, RouterConfig, SniConfig, SniRoute, TcpRoute,
    TlsFiles,
};

#[derive(Clone, Copy, ValueEnum)]
enum IsolationArg {
    /// Long-lived VMs serve many connections, least-loaded first.
    Shared,
    /// Every connection gets a freshly restored VM, destroyed when it closes.
    Fresh,
}

#[derive(Args)]
pub struct ServeArgs {
    /// Where HTTP clients connect (when there is an --image or --route).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Serve /_supermachine/health and /_supermachine/metrics here: ADDR:PORT, or PORT (or
    /// :PORT) for 127.0.0.1:PORT. Off unless given.
    #[arg(long, value_name = "[ADDR:]PORT", value_parser = admin_addr)]
    admin: Option<SocketAddr>,
    /// The image for every request: a snapshot name, a snapshot dir, or oci-layout:DIR[:TAG]
    /// (baked first, with --port).
    #[arg(long)]
    image: Option<String>,
    /// Route a Host header to an image: HOST=IMAGE; repeatable.
    #[arg(long = "route", value_name = "HOST=IMAGE")]
    routes: Vec<String>,
    #[command(flatten)]
    volumes: crate::cli::boot::VolumeArgs,
    /// A TCP route: connections to LISTEN go, bytes untouched (any protocol), to IMAGE's
    /// guest PORT; repeatable. IMAGE as for --image (baked with PORT).
    #[arg(long = "tcp-port", value_name = "LISTEN=IMAGE:PORT")]
    tcp_ports: Vec<String>,
    /// Guest port of images baked here for --image and --route.
    #[arg(long, default_value_t = 80)]
    port: u16,
    /// VMs kept per image (fresh: restored and waiting).
    #[arg(long, default_value_t = 1)]
    min: usize,
    /// Most VMs per image (shared).
    #[arg(long, default_value_t = 4)]
    max: usize,
    /// Seconds an extra idle VM lives (shared).
    #[arg(long, default_value_t = 60)]
    idle_timeout: u64,
    #[arg(long, value_enum, default_value_t = IsolationArg::Shared)]
    isolation: IsolationArg,
    /// Seconds SIGTERM waits for connections to finish.
    #[arg(long, default_value_t = 10)]
    grace: u64,
    #[arg(long)]
    snapshots_dir: Option<PathBuf>,
    /// TLS passthrough: connections whose ClientHello names NAME go undecrypted to IMAGE's
    /// guest PORT (the guest holds the certificate); NAME `*` takes every other name.
    /// Served on --sni-listen; repeatable.
    #[arg(long = "sni-route", value_name = "NAME=IMAGE:PORT")]
    sni_routes: Vec<String>,
    /// Where the --sni-route clients connect.
    #[arg(long, default_value = "127.0.0.1:8443")]
    sni_listen: SocketAddr,
    /// Terminate TLS on --listen with this certificate chain (PEM); repeatable, each with
    /// its --tls-key in the same order. The certificate is chosen by the client's SNI.
    #[arg(long = "tls-cert", value_name = "FILE")]
    tls_certs: Vec<PathBuf>,
    /// The private key (PEM) of the --tls-cert at the same position.
    #[arg(long = "tls-key", value_name = "FILE")]
    tls_keys: Vec<PathBuf>,
    /// Single image: every worker accepts on the listening socket itself.
    #[arg(long)]
    accept_in_workers: bool,
    /// Started as root: once the listeners are bound (and images baked), become USER (NAME,
    /// UID or UID:GID) for good; workers then jail themselves in user namespaces, inside a
    /// cgroup delegated to USER. The caches and snapshots must be where USER can read them.
    #[arg(long, value_name = "USER", value_parser = router::privileges::RunAs::parse)]
    user: Option<router::privileges::RunAs>,
    /// For images baked here (a snapshot is restored by the backend that baked it).
    #[command(flatten)]
    backend: crate::cli::backend::BackendArgs,
}

/// A snapshot dir for IMAGE: an existing snapshot (dir or name), or a fresh bake.
fn resolve_image(
    image: &str,
    port: u16,
    root: &Path,
    backend: &crate::cli::backend::BackendArgs,
) -> Result<PathBuf, String> {
    let as_dir = PathBuf::from(image);
    if as_dir.join(snapshot::METADATA).is_file() {
        return Ok(as_dir);
    }
    if !image.contains(':') && root.join(image).join(snapshot::METADATA).is_file() {
        return Ok(root.join(image));
    }
    let reference = ImageRef::parse(image).map_err(|e| e.to_string())?;
    let mut boot = BootRequest::new(reference);
    boot.backend = backend.resolve()?;
    let req = PullRequest {
        boot,
        name: pull::default_name(image),
        port,
        ready_timeout: Duration::from_secs(120),
        snapshots_dir: root.to_path_buf(),
    };
    eprintln!("supermachine: baking {image} (port {port})");
    pull::pull(&req)
        .map(|o| o.snapshot.dir)
        .map_err(|e| e.to_string())
}

pub fn run(a: ServeArgs) -> i32 {
    let config = match router_config(&a) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("supermachine: error: {e}");
            return EXIT_INTERNAL;
        }
    };
    if let Some(l) = config.listen {
        let scheme = if config.tls.is_empty() {
            "http"
        } else {
            "https"
        };
        eprintln!("supermachine: serving HTTP on {scheme}://{l}");
    }
    if let Some(sni) = &config.sni {
        eprintln!(
            "supermachine: passing TLS through on {} by server name",
            sni.listen
        );
    }
    for t in &config.tcp {
        eprintln!(
            "supermachine: serving TCP on {} -> {}",
            t.listen,
            t.snapshot.display()
        );
    }
    let result = run_router(config);
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("supermachine: error: {e}");
            EXIT_INTERNAL
        }
    }
}

/// What the flags ask to serve, with every image resolved (baked if need be).
fn router_config(a: &ServeArgs) -> Result<RouterConfig, String> {
    if a.tls_certs.len() != a.tls_keys.len() {
        return Err(format!(
            "{} --tls-cert but {} --tls-key: give them in pairs",
            a.tls_certs.len(),
            a.tls_keys.len()
        ));
    }
    let tls: Vec<TlsFiles> = a
        .tls_certs
        .iter()
        .zip(&a.tls_keys)
        .map(|(cert, key)| TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
        })
        .collect();
    // Certificates are read now, before any bake, so a bad file fails fast.
    if !tls.is_empty() {
        router::tls::server_config(&tls).map_err(|e| e.to_string())?;
    }
    let root = a
        .snapshots_dir
        .clone()
        .unwrap_or_else(snapshot::default_root);
    let mut routes = Vec::new();
    let mut specs: Vec<(Option<String>, String)> =
        a.image.iter().map(|i| (None, i.clone())).collect();
    for r in &a.routes {
        match r.split_once('=') {
            Some((h, i)) if !h.is_empty() && !i.is_empty() => {
                specs.push((Some(h.to_string()), i.to_string()))
            }
            _ => return Err(format!("invalid --route {r:?}: expected HOST=IMAGE")),
        }
    }
    let tcp_specs = a
        .tcp_ports
        .iter()
        .map(|t| parse_tcp_port(t))
        .collect::<Result<Vec<_>, _>>()?;
    let sni_specs = a
        .sni_routes
        .iter()
        .map(|r| parse_sni_route(r))
        .collect::<Result<Vec<_>, _>>()?;
    if specs.is_empty() && tcp_specs.is_empty() && sni_specs.is_empty() {
        return Err("nothing to serve: give --image IMAGE, --route HOST=IMAGE, --tcp-port LISTEN=IMAGE:PORT or --sni-route NAME=IMAGE:PORT".into());
    }
    let mut sni_routes = Vec::new();
    for (name, image, port) in sni_specs {
        let snapshot = resolve_port_image(&image, port, &root, &a.backend)
            .map_err(|e| format!("--sni-route {name}={image}:{port}: {e}"))?;
        sni_routes.push(SniRoute { name, snapshot });
    }
    let mut tcp = Vec::new();
    for (listen, image, port) in tcp_specs {
        let snapshot = resolve_port_image(&image, port, &root, &a.backend)
            .map_err(|e| format!("--tcp-port {listen}={image}:{port}: {e}"))?;
        tcp.push(TcpRoute { listen, snapshot });
    }
    for (host, image) in specs {
        let snapshot = resolve_image(&image, a.port, &root, &a.backend)
            .map_err(|e| format!("{image}: {e}"))?;
        routes.push(Route { host, snapshot });
    }
    let has_http = !routes.is_empty();
    if !tls.is_empty() && !has_http {
        return Err("--tls-cert terminates TLS for HTTP routes: give --image or --route".into());
    }
    Ok(RouterConfig {
        listen: has_http.then_some(a.listen),
        admin: a.admin,
        routes,
        tcp,
        tls,
        sni: (!sni_routes.is_empty()).then_some(SniConfig {
            listen: a.sni_listen,
            routes: sni_routes,
        }),
        pool: PoolConfig {
            min: a.min,
            max: a.max.max(a.min).max(1),
            idle_timeout: Duration::from_secs(a.idle_timeout),
            isolation: match a.isolation {
                IsolationArg::Shared => Isolation::Shared,
                IsolationArg::Fresh => Isolation::Fresh,
            },
            volumes: a.volumes.volumes.clone(),
        },
        grace: Duration::from_secs(a.grace),
        accept_in_workers: a.accept_in_workers,
        user: a.user.clone(),
    })
}

/// [`resolve_image`] for a route that names its guest port: the snapshot must be for it.
fn resolve_port_image(
    image: &str,
    port: u16,
    root: &Path,
    backend: &crate::cli::backend::BackendArgs,
) -> Result<PathBuf, String> {
    let dir = resolve_image(image, port, root, backend)?;
    let baked = snapshot::Snapshot::open(&dir)
        .map_err(|e| e.to_string())?
        .meta
        .guest_port;
    if baked != port {
        return Err(format!(
            "the snapshot {} was baked for guest port {baked}, not {port}",
            dir.display()
        ));
    }
    Ok(dir)
}

/// The `IMAGE:PORT` of a route (IMAGE may itself hold colons: oci-layout:DIR:TAG); the error
/// says which half is wrong.
fn image_and_port(spec: &str) -> Result<(&str, u16), &'static str> {
    let (image, port) = spec.rsplit_once(':').ok_or("no guest port")?;
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .ok_or("PORT is not a port number")?;
    if image.is_empty() {
        return Err("no IMAGE");
    }
    Ok((image, port))
}

/// `NAME=IMAGE:PORT` for --sni-route (NAME a host name, or `*`).
fn parse_sni_route(spec: &str) -> Result<(String, String, u16), String> {
    let bad = |why: &str| format!("invalid --sni-route {spec:?}: {why} (expected NAME=IMAGE:PORT)");
    let (name, rest) = spec.split_once('=').ok_or_else(|| bad("no '='"))?;
    let valid = name == "*"
        || (!name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_')));
    if !valid {
        return Err(bad("NAME is not a host name or *"));
    }
    let (image, port) = image_and_port(rest).map_err(bad)?;
    Ok((name.to_ascii_lowercase(), image.to_string(), port))
}

/// `LISTEN=IMAGE:PORT` (IMAGE may itself hold colons: oci-layout:DIR:TAG).
fn parse_tcp_port(spec: &str) -> Result<(SocketAddr, String, u16), String> {
    let bad =
        |why: &str| format!("invalid --tcp-port {spec:?}: {why} (expected LISTEN=IMAGE:PORT)");
    let (listen, rest) = spec.split_once('=').ok_or_else(|| bad("no '='"))?;
    let listen: SocketAddr = listen
        .parse()
        .map_err(|_| bad("LISTEN is not an address like 127.0.0.1:6379"))?;
    let (image, port) = image_and_port(rest).map_err(bad)?;
    Ok((listen, image.to_string(), port))
}

/// Runs the router on a fresh tokio runtime until SIGTERM or SIGINT.
pub(crate) fn run_router(config: RouterConfig) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("starting the async runtime: {e}"))?;
    let served = rt.block_on(router::serve(config, async {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return std::future::pending::<()>().await;
        };
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
    }));
    served.map_err(|e| e.to_string())
}

/// `--admin`: a socket address, or a port alone on loopback (the admin endpoint tells
/// anyone who reaches it the router's workers and counters).
fn admin_addr(s: &str) -> Result<SocketAddr, String> {
    let port = s.strip_prefix(':').unwrap_or(s);
    if let Ok(p) = port.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], p)));
    }
    s.parse()
        .map_err(|_| format!("{s:?} is neither ADDR:PORT nor a port"))
}

#[cfg(test)]
mod tests {
    use super::{admin_addr, parse_tcp_port};

    #[test]
    fn tcp_port_specs() {
        assert_eq!(
            parse_tcp_port("127.0.0.1:6379=oci-layout:/x/redis:latest:6379").unwrap(),
            (
                "127.0.0.1:6379".parse().unwrap(),
                "oci-layout:/x/redis:latest".to_string(),
                6379
            )
        );
        assert!(parse_tcp_port("6379=redis:6379")
            .unwrap_err()
            .contains("LISTEN"));
        assert!(parse_tcp_port("127.0.0.1:1=redis")
            .unwrap_err()
            .contains("guest port"));
        assert!(parse_tcp_port("127.0.0.1:1=:5")
            .unwrap_err()
            .contains("IMAGE"));
    }

    #[test]
    fn a_bare_admin_port_is_on_loopback() {
        assert_eq!(admin_addr("9090").unwrap().to_string(), "127.0.0.1:9090");
        assert_eq!(admin_addr(":9090").unwrap().to_string(), "127.0.0.1:9090");
        assert_eq!(
            admin_addr("0.0.0.0:9090").unwrap().to_string(),
            "0.0.0.0:9090"
        );
        assert!(admin_addr("localhost").unwrap_err().contains("localhost"));
    }
}
