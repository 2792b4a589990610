//! The router: real `supermachine serve` pools of worker processes restored from snapshots.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::*;
use supermachine::PullRequest;
use supermachine_router::{
    self as router, Isolation, PoolConfig, Route, RouterConfig, SniConfig, SniRoute, TlsFiles,
};

const INDEX: &[u8] = b"<h1>hello from supermachine</h1>\n";

fn bake(
    dir: &Path,
    name: &str,
    image_name: &str,
    entrypoint: Option<&str>,
    cmd: &[&str],
) -> PathBuf {
    let mut boot = request(image_name);
    // Port 80 needs root; the layered image's default user is not.
    boot.overrides.user = Some("0".into());
    boot.overrides.entrypoint = entrypoint.map(String::from);
    boot.overrides.cmd = Some(cmd.iter().map(|s| s.to_string()).collect());
    let req = PullRequest {
        boot,
        name: name.into(),
        port: 80,
        ready_timeout: Duration::from_secs(60),
        snapshots_dir: dir.to_path_buf(),
    };
    supermachine::pull::pull(&req).unwrap().snapshot.dir
}

fn bake_web(dir: &Path) -> PathBuf {
    bake(
        dir,
        "web",
        "busybox",
        None,
        &["httpd", "-f", "-p", "80", "-h", "/var/www"],
    )
}

/// One baked httpd snapshot for every test: a bake is the slowest step of these tests, most
/// of all in the nested kvm stage (tests that find their workers by the snapshot's path
/// take their own copy of it, [`own_web`]). In a temp dir that is
/// never dropped (statics are not), as tests/snapshot.rs does: with a shared snapshot under
/// target/tmp, many restores from it failed on kvm in L1 (ARCHITECTURE, "Nested kvm stage").
fn shared_web() -> PathBuf {
    static S: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    S.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let snap = bake_web(dir.path());
        (dir, snap)
    })
    .1
    .clone()
}

/// A snapshot of its own at `dir/web` — hard links to [`shared_web`]'s files, which no
/// restore writes — so that only this test's workers have its path on their command line.
fn own_web(dir: &Path) -> PathBuf {
    let shared = shared_web();
    let own = dir.join("web");
    std::fs::create_dir(&own).unwrap();
    for e in std::fs::read_dir(&shared).unwrap() {
        let e = e.unwrap();
        std::fs::hard_link(e.path(), own.join(e.file_name())).unwrap();
    }
    own
}

/// The `layered` image serving /data (keep.txt), shared as [`shared_web`] is.
fn shared_data() -> PathBuf {
    static S: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    S.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let snap = bake(
            dir.path(),
            "data",
            "layered",
            Some(""),
            &["httpd", "-f", "-p", "80", "-h", "/data"],
        );
        (dir, snap)
    })
    .1
    .clone()
}

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

struct Running {
    addr: SocketAddr,
    admin: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A router serving one snapshot for every host.
fn start_one(snapshot: PathBuf, isolation: Isolation, min: usize, max: usize) -> Running {
    start(
        vec![Route {
            host: None,
            snapshot,
        }],
        isolation,
        min,
        max,
    )
}

fn start(routes: Vec<Route>, isolation: Isolation, min: usize, max: usize) -> Running {
    start_with(routes, isolation, min, max, false, vec![])
}

fn start_with(
    routes: Vec<Route>,
    isolation: Isolation,
    min: usize,
    max: usize,
    accept_in_workers: bool,
    tls: Vec<TlsFiles>,
) -> Running {
    let (addr, admin) = (free_addr(), free_addr());
    let config = RouterConfig {
        listen: Some(addr),
        admin: Some(admin),
        routes,
        tcp: vec![],
        tls,
        sni: None,
        pool: PoolConfig {
            min,
            max,
            idle_timeout: Duration::from_secs(60),
            isolation,
            volumes: vec![],
        },
        grace: Duration::from_secs(5),
        accept_in_workers,
        user: None,
    };
    launch(config, addr, admin, min)
}

/// Runs `config` in a thread; returns once its admin endpoint reports `min` workers.
fn launch(config: RouterConfig, addr: SocketAddr, admin: SocketAddr, min: usize) -> Running {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(router::serve(config, async {
            let _ = rx.await;
        }))
        .unwrap();
    });
    // Ready when the admin endpoint reports enough workers.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(s) = TcpStream::connect(admin) {
            let (_, body) = http_get(s, "/_supermachine/health");
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            if v["workers"].as_u64().unwrap_or(0) >= min as u64 {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "router did not get {min} workers ready"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Running {
        addr,
        admin,
        stop: Some(tx),
        thread: Some(thread),
    }
}

fn metric(admin: SocketAddr, name: &str) -> u64 {
    let (_, body) = http_get(TcpStream::connect(admin).unwrap(), "/_supermachine/metrics");
    String::from_utf8_lossy(&body)
        .lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[test]
fn shared_pool_serves_concurrent_requests_and_large_bodies() {
    let snap = shared_web();
    let r = start_one(snap, Isolation::Shared, 2, 4);
    let addr = r.addr;
    let threads: Vec<_> = (0..20)
        .map(|_| {
            std::thread::spawn(move || {
                for _ in 0..10 {
                    let (status, body) = http_get(TcpStream::connect(addr).unwrap(), "/");
                    assert!(status.contains("200"), "{status}");
                    assert_eq!(body, INDEX);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert!(metric(r.admin, "supermachine_connections_total") >= 200);

    // A 10 MiB POST body arrives byte-exact (echoed back by a CGI script in the guest).
    let body = random_bytes(10 << 20, 3);
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "POST /cgi-bin/echo HTTP/1.0\r\nHost: t\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    let writer = {
        let mut s2 = s.try_clone().unwrap();
        let body = body.clone();
        std::thread::spawn(move || s2.write_all(&body).unwrap())
    };
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).unwrap();
    writer.join().unwrap();
    let split = resp.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    assert!(resp.starts_with(b"HTTP/1.0 200") || resp.starts_with(b"HTTP/1.1 200"));
    assert_eq!(sha256(&resp[split + 4..]), sha256(&body));
}

#[test]
fn fresh_isolation_gives_every_connection_a_new_vm() {
    let snap = shared_web();
    let r = start_one(snap, Isolation::Fresh, 2, 2);
    for i in 0..3 {
        let (_, body) = http_get(
            TcpStream::connect(r.addr).unwrap(),
            &format!("/cgi-bin/mark?secret{i}"),
        );
        assert_eq!(body, format!("secret{i}\n").as_bytes());
        let (_, body) = http_get(TcpStream::connect(r.addr).unwrap(), "/cgi-bin/mark");
        assert_eq!(
            body, b"none\n",
            "a later client saw an earlier client's file"
        );
    }
    assert!(metric(r.admin, "supermachine_restores_total") >= 6);
}

#[test]
fn host_routes_reach_different_images() {
    let web = shared_web();
    let data = shared_data();
    let r = start(
        vec![
            Route {
                host: Some("a.test".into()),
                snapshot: web,
            },
            Route {
                host: Some("b.test".into()),
                snapshot: data,
            },
        ],
        Isolation::Shared,
        1,
        2,
    );
    let (status, body) = http_get_host(
        TcpStream::connect(r.addr).unwrap(),
        "b.test:8080",
        "/keep.txt",
    );
    assert!(status.contains("200"), "{status}");
    assert_eq!(body, b"kept\n");
    let (status, body) = http_get_host(TcpStream::connect(r.addr).unwrap(), "a.test", "/");
    assert!(status.contains("200"));
    assert_eq!(body, INDEX);
    let (status, _) = http_get_host(TcpStream::connect(r.addr).unwrap(), "a.test", "/keep.txt");
    assert!(status.contains("404"), "{status}");
    let (status, _) = http_get_host(TcpStream::connect(r.addr).unwrap(), "unknown.test", "/");
    assert!(status.contains("404"), "no route: {status}");
}

fn pids_with(needle: &str, program: &str) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() {
            if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
                let cmd = String::from_utf8_lossy(&cmd);
                if cmd.contains(needle) && cmd.contains(program) {
                    out.push(pid);
                }
            }
        }
    }
    out
}

/// The workers of `needle`'s snapshot, each once: a jailed worker is two processes with one
/// command line, the waiter and (in its pid namespace) the worker; this gives the waiters.
fn workers_with(needle: &str) -> Vec<i32> {
    let all = pids_with(needle, "supermachine-worker");
    all.iter()
        .copied()
        .filter(|p| {
            let parent: i32 = status_field(*p as u32, "PPid").parse().unwrap_or(0);
            !all.contains(&parent)
        })
        .collect()
}

#[test]
fn a_killed_worker_is_replaced_and_counted() {
    let tmp = tempfile::tempdir().unwrap();
    let snap = own_web(tmp.path());
    let r = start_one(snap.clone(), Isolation::Shared, 2, 2);
    let needle = snap.display().to_string();
    let workers = workers_with(&needle);
    assert_eq!(workers.len(), 2, "{workers:?}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(workers[0]),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // Requests keep succeeding (the surviving worker, then the replacement).
    let mut failures = 0;
    for _ in 0..20 {
        match std::panic::catch_unwind(|| http_get(TcpStream::connect(r.addr).unwrap(), "/")) {
            Ok((status, body)) if status.contains("200") && body == INDEX => {}
            _ => failures += 1,
        }
    }
    assert!(
        failures <= 2,
        "{failures} requests failed after one worker died"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric(r.admin, "supermachine_worker_crashes_total") < 1
        || workers_with(&needle).len() < 2
    {
        assert!(Instant::now() < deadline, "the pool did not recover");
        std::thread::sleep(Duration::from_millis(200));
    }
    for _ in 0..10 {
        let (status, body) = http_get(TcpStream::connect(r.addr).unwrap(), "/");
        assert!(status.contains("200") && body == INDEX);
    }
}

#[test]
fn sigterm_leaves_no_workers_vms_or_run_dirs() {
    let tmp = tempfile::tempdir().unwrap();
    let snap = own_web(tmp.path());
    let addr = free_addr();
    let mut child = supermachine()
        .args(["serve", "--image"])
        .arg(&snap)
        .args(["--listen", &addr.to_string(), "--min", "2"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let needle = snap.display().to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut served = false;
    while Instant::now() < deadline && !served {
        if let Ok(s) = TcpStream::connect(addr) {
            let (status, body) = http_get(s, "/");
            served = status.contains("200") && body == INDEX;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(served, "serve never answered");
    // The processes that run the VMs: QEMUs, or on kvm the workers themselves.
    let vm_program = if on_kvm() {
        "supermachine-worker"
    } else {
        "qemu-system"
    };
    let run_dirs = |pids: &[i32]| -> Vec<PathBuf> {
        pids.iter().flat_map(|&p| run_dirs_of(p as u32)).collect()
    };
    while run_dirs(&pids_with(&needle, vm_program)).len() < 2 {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(100));
    }
    // The VMs' run directories, from the console logs their processes hold open.
    let run_dirs = run_dirs(&pids_with(&needle, vm_program));
    assert!(!run_dirs.is_empty());
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(0));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(pids_with(&needle, "supermachine-worker").is_empty()
        && pids_with(&needle, vm_program).is_empty())
    {
        assert!(Instant::now() < deadline, "workers or VMs outlived serve");
        std::thread::sleep(Duration::from_millis(100));
    }
    for d in run_dirs {
        assert!(!d.exists(), "run dir {} left behind", d.display());
    }
    assert!(
        TcpStream::connect(addr).is_err(),
        "the listener outlived serve"
    );
}

#[test]
fn in_flight_connections_of_a_dead_worker_get_502() {
    let tmp = tempfile::tempdir().unwrap();
    let snap = own_web(tmp.path());
    let r = start_one(snap.clone(), Isolation::Shared, 1, 1);
    // A request the guest holds open: the CGI waits for a body that never comes.
    let mut stalled = TcpStream::connect(r.addr).unwrap();
    write!(
        stalled,
        "POST /cgi-bin/echo HTTP/1.0\r\nHost: t\r\nContent-Length: 100\r\n\r\n"
    )
    .unwrap();
    let needle = snap.display().to_string();
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(r.admin, "supermachine_connections_total") < 1 {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    let workers = workers_with(&needle);
    assert_eq!(workers.len(), 1);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(workers[0]),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    stalled
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut resp = Vec::new();
    let _ = stalled.read_to_end(&mut resp);
    assert!(
        resp.starts_with(b"HTTP/1.1 502"),
        "got {:?}",
        String::from_utf8_lossy(&resp)
    );
    // The pool replaces the worker and serves again.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(s) = TcpStream::connect(r.addr) {
            let (status, body) = http_get(s, "/");
            if status.contains("200") && body == INDEX {
                break;
            }
        }
        assert!(Instant::now() < deadline, "the pool did not recover");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(metric(r.admin, "supermachine_worker_crashes_total") >= 1);
}

#[test]
fn status_codes_are_counted_and_workers_can_accept_themselves() {
    let snap = shared_web();
    {
        let r = start_one(snap.clone(), Isolation::Shared, 1, 1);
        for _ in 0..3 {
            assert!(http_get(TcpStream::connect(r.addr).unwrap(), "/")
                .0
                .contains("200"));
        }
        assert!(http_get(TcpStream::connect(r.addr).unwrap(), "/missing")
            .0
            .contains("404"));
        let deadline = Instant::now() + Duration::from_secs(10);
        while metric(r.admin, "supermachine_responses_total{code=\"404\"}") < 1
            || metric(r.admin, "supermachine_responses_total{code=\"200\"}") < 3
        {
            assert!(Instant::now() < deadline, "status codes not counted");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    // --accept-in-workers: two workers accept on the one listener; the router is not in
    // the data path at all.
    let r = start_with(
        vec![Route {
            host: None,
            snapshot: snap,
        }],
        Isolation::Shared,
        2,
        2,
        true,
        vec![],
    );
    for _ in 0..10 {
        let (status, body) = http_get(TcpStream::connect(r.addr).unwrap(), "/");
        assert!(status.contains("200"), "{status}");
        assert_eq!(body, INDEX);
    }
    assert_eq!(
        metric(r.admin, "supermachine_connections_total"),
        0,
        "the router handed off nothing"
    );
}

/// Bytes pass through the router untouched for the life of a connection: with an echo
/// workload, many request/response exchanges (keep-alive, pipelining, upgrades all look
/// like this on the wire) go back and forth on one handed-off connection.
#[test]
fn connections_stay_open_across_many_exchanges() {
    let tmp = tempfile::tempdir().unwrap();
    let snap = bake(
        tmp.path(),
        "echo",
        "busybox",
        None,
        &["nc", "-ll", "-p", "80", "-e", "cat"],
    );
    let r = start_one(snap, Isolation::Shared, 2, 4);
    let addr = r.addr;
    let threads: Vec<_> = (0..20)
        .map(|t| {
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(addr).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
                for i in 0..10 {
                    let req = format!(
                        "GET /r{t}-{i} HTTP/1.1\r\nHost: echo\r\nConnection: keep-alive\r\n\r\n"
                    );
                    s.write_all(req.as_bytes()).unwrap();
                    let mut back = vec![0u8; req.len()];
                    s.read_exact(&mut back).unwrap();
                    assert_eq!(back, req.as_bytes(), "exchange {i} on connection {t}");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    // 20 connections carried 200 exchanges: one handoff per connection.
    assert_eq!(metric(r.admin, "supermachine_connections_total"), 20);
}

/// Runs openssl with `args` in `dir`; panics with its stderr when it fails.
fn openssl(dir: &Path, args: &[&str]) {
    let o = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl");
    assert!(o.status.success(), "openssl {args:?}: {}", stderr(&o));
}

/// A test CA and, for each name, a certificate (SAN DNS:name) and key signed by it.
fn test_pki(dir: &Path, names: &[&str]) -> Vec<TlsFiles> {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-subj",
        "/CN=supermachine test CA",
        "-days",
        "2",
    ]);
    openssl(dir, &ca);
    names
        .iter()
        .map(|n| {
            let (key, csr, pem, ext) = (
                format!("{n}.key"),
                format!("{n}.csr"),
                format!("{n}.pem"),
                format!("{n}.ext"),
            );
            std::fs::write(dir.join(&ext), format!("subjectAltName=DNS:{n}\n")).unwrap();
            let subj = format!("/CN={n}");
            let mut req = vec!["req"];
            req.extend(ec);
            req.extend(["-keyout", &key, "-out", &csr, "-subj", &subj]);
            openssl(dir, &req);
            openssl(
                dir,
                &[
                    "x509",
                    "-req",
                    "-in",
                    &csr,
                    "-CA",
                    "ca.pem",
                    "-CAkey",
                    "ca.key",
                    "-CAcreateserial",
                    "-out",
                    &pem,
                    "-days",
                    "2",
                    "-extfile",
                    &ext,
                ],
            );
            TlsFiles {
                cert: dir.join(pem),
                key: dir.join(key),
            }
        })
        .collect()
}

/// `serve --tls-cert/--tls-key`: HTTPS in, the VM's plain HTTP behind; the certificate is
/// the one for the SNI name; ALPN gives http/1.1 or h2 (the router terminates HTTP/2);
/// a plain-HTTP client on the TLS port reaches no VM.
#[test]
fn tls_is_terminated_with_the_certificate_for_the_sni_name() {
    let tmp = tempfile::tempdir().unwrap();
    let tls = test_pki(tmp.path(), &["a.test", "b.test"]);
    let r = start_with(
        vec![Route {
            host: None,
            snapshot: shared_web(),
        }],
        Isolation::Shared,
        1,
        2,
        false,
        tls,
    );
    let port = r.addr.port();
    let curl = |name: &str, extra: &[&str]| {
        let o = std::process::Command::new("curl")
            .args(["-sS", "-v", "--max-time", "60", "--cacert"])
            .arg(tmp.path().join("ca.pem"))
            .args(["--resolve", &format!("{name}:{port}:127.0.0.1")])
            .args(extra)
            .arg(format!("https://{name}:{port}/"))
            .output()
            .expect("curl");
        let log = stderr(&o);
        assert!(o.status.success(), "curl {name}: {log}");
        (o.stdout, log)
    };
    for name in ["a.test", "b.test"] {
        let (body, log) = curl(name, &["--http1.1"]);
        assert_eq!(body, INDEX, "{log}");
        assert!(log.contains(&format!("subject: CN={name}")), "{log}");
        assert!(log.contains("ALPN: server accepted http/1.1"), "{log}");
    }
    // HTTP/2 over TLS (ALPN h2): the router speaks h2 and hands each stream to a VM as
    // HTTP/1.1; three requests on one connection are three streams.
    let (body, log) = curl("a.test", &["--http2"]);
    assert_eq!(body, INDEX, "{log}");
    assert!(log.contains("ALPN: server accepted h2"), "{log}");
    assert!(log.contains("< HTTP/2 200"), "{log}");
    let url = format!("https://a.test:{port}/");
    let (body, log) = curl("a.test", &["--http2", &url, &url]);
    assert_eq!(body, [INDEX, INDEX, INDEX].concat(), "{log}");
    assert!(log.contains("Re-using existing connection"), "{log}");
    // Plain HTTP on the TLS port: the handshake fails, no VM sees it.
    let before = metric(r.admin, "supermachine_connections_total");
    let mut s = TcpStream::connect(r.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(b"GET / HTTP/1.0\r\nHost: a.test\r\n\r\n")
        .unwrap();
    let mut back = Vec::new();
    let _ = s.read_to_end(&mut back);
    assert!(
        !back.windows(INDEX.len()).any(|w| w == INDEX),
        "plain HTTP was served"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(
        r.admin,
        "supermachine_rejected_total{reason=\"tls_handshake\"}",
    ) < 1
    {
        assert!(
            Instant::now() < deadline,
            "the failed handshake was not counted"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(metric(r.admin, "supermachine_connections_total"), before);
}

/// `serve --sni-route`: TLS passes through undecrypted, routed by the ClientHello's server
/// name, to a guest that terminates it itself (Debian's `openssl s_server` with a
/// certificate it made at boot): the client sees the guest's certificate. An unknown name
/// and plain HTTP reach no VM and get no byte.
#[test]
fn tls_passthrough_reaches_the_guests_own_server_by_sni() {
    let tmp = tempfile::tempdir().unwrap();
    let req = PullRequest {
        boot: request("openssl"),
        name: "tls".into(),
        port: 443,
        ready_timeout: Duration::from_secs(120),
        snapshots_dir: tmp.path().to_path_buf(),
    };
    let snapshot = supermachine::pull::pull(&req).unwrap().snapshot.dir;
    let (addr, admin) = (free_addr(), free_addr());
    let config = RouterConfig {
        listen: None,
        admin: Some(admin),
        routes: vec![],
        tcp: vec![],
        tls: vec![],
        sni: Some(SniConfig {
            listen: addr,
            routes: vec![SniRoute {
                name: "guest.test".into(),
                snapshot,
            }],
        }),
        pool: PoolConfig {
            min: 1,
            max: 2,
            idle_timeout: Duration::from_secs(60),
            isolation: Isolation::Shared,
            volumes: vec![],
        },
        grace: Duration::from_secs(5),
        accept_in_workers: false,
        user: None,
    };
    let r = launch(config, addr, admin, 1);
    let s_client = |name: &str| {
        let o = std::process::Command::new("openssl")
            .args([
                "s_client",
                "-connect",
                &addr.to_string(),
                "-servername",
                name,
            ])
            .stdin(std::process::Stdio::null())
            .output()
            .expect("openssl");
        format!("{}{}", stdout(&o), stderr(&o))
    };
    let out = s_client("guest.test");
    assert!(out.contains("subject=CN = guest.test"), "{out}");
    let o = std::process::Command::new("curl")
        .args(["-sS", "-k", "--max-time", "60", "--resolve"])
        .arg(format!("guest.test:{}:127.0.0.1", addr.port()))
        .arg(format!("https://guest.test:{}/", addr.port()))
        .output()
        .expect("curl");
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("s_server"), "{}", stdout(&o));

    let out = s_client("other.test");
    assert!(
        !out.contains("subject="),
        "an unknown name got a certificate: {out}"
    );
    let mut plain = TcpStream::connect(addr).unwrap();
    plain
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    plain
        .write_all(b"GET / HTTP/1.0\r\nHost: guest.test\r\n\r\n")
        .unwrap();
    let mut back = Vec::new();
    let _ = plain.read_to_end(&mut back);
    assert_eq!(back, b"", "plain HTTP got bytes back");
    assert!(
        metric(
            r.admin,
            "supermachine_rejected_total{reason=\"sni_no_route\"}"
        ) >= 1
    );
    assert!(
        metric(
            r.admin,
            "supermachine_rejected_total{reason=\"sni_not_tls\"}"
        ) >= 1
    );
}

/// h2c with prior knowledge on the plain listener, routed by :authority; HTTP/1.1 clients
/// on the same listener are unaffected.
#[test]
fn h2c_with_prior_knowledge_is_routed_by_authority() {
    let data = shared_data();
    let r = start(
        vec![
            Route {
                host: Some("a.test".into()),
                snapshot: shared_web(),
            },
            Route {
                host: Some("b.test".into()),
                snapshot: data,
            },
        ],
        Isolation::Shared,
        1,
        2,
    );
    let port = r.addr.port();
    let curl = |name: &str, path: &str, extra: &[&str]| {
        let o = std::process::Command::new("curl")
            .args(["-sS", "-v", "--max-time", "60"])
            .args(["--resolve", &format!("{name}:{port}:127.0.0.1")])
            .args(extra)
            .arg(format!("http://{name}:{port}{path}"))
            .output()
            .expect("curl");
        let log = stderr(&o);
        assert!(o.status.success(), "curl {name}: {log}");
        (o.stdout, log)
    };
    let (body, log) = curl("a.test", "/", &["--http2-prior-knowledge"]);
    assert_eq!(body, INDEX, "{log}");
    assert!(log.contains("< HTTP/2 200"), "{log}");
    let (body, log) = curl("b.test", "/keep.txt", &["--http2-prior-knowledge"]);
    assert_eq!(body, b"kept\n", "{log}");
    let (body, log) = curl("a.test", "/", &["--http1.1"]);
    assert_eq!(body, INDEX, "{log}");
    assert!(log.contains("< HTTP/1."), "{log}");
}

/// A WebSocket through the router: the upgrade is an HTTP/1.1 request like any other, and
/// after the handoff the frames pass untouched. The guest runs Debian's websocketd with
/// `cat` (an echo, one message per line); this is a minimal RFC 6455 client.
#[test]
fn a_websocket_echo_works_through_the_router() {
    let tmp = tempfile::tempdir().unwrap();
    let req = PullRequest {
        boot: request("websocket"),
        name: "ws".into(),
        port: 80,
        ready_timeout: Duration::from_secs(120),
        snapshots_dir: tmp.path().to_path_buf(),
    };
    let snapshot = supermachine::pull::pull(&req).unwrap().snapshot.dir;
    let r = start_one(snapshot, Isolation::Shared, 1, 2);
    let mut s = TcpStream::connect(r.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    // The handshake of RFC 6455 1.3, whose accept value is given there.
    s.write_all(
        b"GET / HTTP/1.1\r\nHost: ws.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut b).unwrap();
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head).to_string();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(head.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "{head}");
    for i in 0..20 {
        let msg = format!("message {i} through the router");
        // A masked text frame (clients must mask).
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        let mut frame = vec![0x81, 0x80 | msg.len() as u8];
        frame.extend(mask);
        frame.extend(msg.bytes().enumerate().map(|(j, c)| c ^ mask[j % 4]));
        s.write_all(&frame).unwrap();
        // The echo: an unmasked text frame.
        let mut hdr = [0u8; 2];
        s.read_exact(&mut hdr).unwrap();
        assert_eq!(hdr[0], 0x81, "frame {i}: FIN + text");
        let len = (hdr[1] & 0x7f) as usize;
        let mut payload = vec![0u8; len];
        s.read_exact(&mut payload).unwrap();
        assert_eq!(String::from_utf8_lossy(&payload), msg, "frame {i}");
    }
    assert_eq!(metric(r.admin, "supermachine_connections_total"), 1);
}

#[test]
#[cfg(debug_assertions)]
fn a_worker_killed_by_its_seccomp_filter_is_counted_and_replaced() {
    // Workers of this binary may be told to call a forbidden syscall; only a request that
    // carries the test header makes one do it.
    let mut jail = supermachine::JailConfig::current();
    jail.test_forbidden_syscall = true;
    supermachine::JailConfig::set_default(jail);
    let r = start_one(shared_web(), Isolation::Shared, 1, 1);
    let (status, _) = http_get(TcpStream::connect(r.addr).unwrap(), "/");
    assert!(status.contains("200"), "{status}");
    let mut c = TcpStream::connect(r.addr).unwrap();
    c.write_all(
        b"GET / HTTP/1.1\r\nHost: x\r\nx-supermachine-test: forbidden-syscall\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let mut resp = Vec::new();
    let _ = c.read_to_end(&mut resp);
    assert!(
        resp.is_empty() || resp.starts_with(b"HTTP/1.1 502"),
        "the killed worker answered: {}",
        String::from_utf8_lossy(&resp)
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while metric(r.admin, "supermachine_worker_seccomp_kills_total") < 1 {
        assert!(
            Instant::now() < deadline,
            "the seccomp kill was not counted"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(metric(r.admin, "supermachine_worker_crashes_total") >= 1);
    // The router keeps serving, from a replacement.
    let mut served = 0;
    while served < 5 {
        assert!(Instant::now() < deadline, "no replacement served");
        if let Ok(s) = TcpStream::connect(r.addr) {
            let (status, body) = http_get(s, "/");
            if status.contains("200") && body == INDEX {
                served += 1;
                continue;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `serve --user`: started as root, the router binds a privileged port, hands the snapshot
/// and a cgroup of its own to the user and becomes it for good; its workers are that user
/// too, jailed in user namespaces inside the delegated cgroup with their memory and pids
/// limits; it serves, and SIGTERM still stops everything.
#[test]
fn serve_as_a_user_binds_as_root_then_runs_as_that_user() {
    const USER: u32 = 65534;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Everything the user's workers read, where it can reach (not under root's home).
    std::fs::set_permissions(d, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let (kernel, init) = guest_copy_in(d);
    for sub in ["cache", "snapshots"] {
        std::fs::create_dir(d.join(sub)).unwrap();
    }
    give_kvm_to_group(USER);
    let sm = || {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_supermachine"));
        c.env("SUPERMACHINE_KERNEL", &kernel)
            .env("SUPERMACHINE_INIT", &init)
            .env("SUPERMACHINE_CACHE", d.join("cache"))
            .env("SUPERMACHINE_SNAPSHOTS", d.join("snapshots"));
        c
    };
    let o = sm()
        .args(["pull", "--name", "web", "--cmd"])
        .arg(r#"["httpd","-f","-p","80","-h","/var/www"]"#)
        .arg(image("busybox"))
        .output()
        .unwrap();
    assert_code(&o, 0);
    // A port only root may bind: bound before the drop.
    let port = (900..1000)
        .find(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .expect("a free port below 1024");
    let admin = free_addr();
    let mut child = sm()
        .args(["serve", "--user", &USER.to_string(), "--image", "web"])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--admin", &admin.port().to_string(), "--min", "1"])
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .unwrap();
    let router = child.id();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(s) = TcpStream::connect(("127.0.0.1", port)) {
            let (status, body) = http_get(s, "/");
            if status.contains("200") && body == INDEX {
                break;
            }
        }
        assert!(Instant::now() < deadline, "serve --user never answered");
        assert!(child.try_wait().unwrap().is_none(), "serve --user exited");
        std::thread::sleep(Duration::from_millis(200));
    }
    let all_user = format!("{USER}\t{USER}\t{USER}\t{USER}");
    assert_eq!(status_field(router, "Uid"), all_user);
    assert_eq!(status_field(router, "CapEff"), "0000000000000000");
    assert_eq!(status_field(router, "CapPrm"), "0000000000000000");
    // The worker: pid 1 of its own pid namespace.
    let snap = d.join("snapshots/web").display().to_string();
    let worker = pids_with(&snap, "supermachine-worker")
        .into_iter()
        .map(|p| p as u32)
        .find(|p| status_field(*p, "NSpid").split_whitespace().last() == Some("1"))
        .expect("a jailed worker");
    assert_eq!(status_field(worker, "Uid"), all_user);
    assert_eq!(status_field(worker, "CapEff"), "0000000000000000");
    assert_eq!(status_field(worker, "NoNewPrivs"), "1");
    assert_eq!(status_field(worker, "Seccomp"), "2");
    let ns = |p: u32| std::fs::read_link(format!("/proc/{p}/ns/user")).unwrap();
    assert_ne!(
        ns(worker),
        ns(router),
        "the worker shares the router's user namespace"
    );
    // Its cgroup: inside the router's delegated group, with its limits.
    let groups = std::fs::read_to_string(format!("/proc/{worker}/cgroup")).unwrap();
    let delegated = format!("/supermachine/router-{router}/vm-");
    let (v2, path) = groups
        .lines()
        .find_map(|l| {
            let (_, rest) = l.split_once(':')?;
            let (controllers, path) = rest.split_once(':')?;
            let v2 = controllers.is_empty();
            (v2 || controllers.split(',').any(|c| c == "memory")).then(|| (v2, path.to_string()))
        })
        .expect("a memory cgroup");
    assert!(path.starts_with(&delegated), "{groups}");
    let (memory, pids) = if v2 {
        (
            format!("/sys/fs/cgroup{path}/memory.max"),
            format!("/sys/fs/cgroup{path}/pids.max"),
        )
    } else {
        let pids_path = groups
            .lines()
            .find_map(|l| l.split_once(":pids:").map(|(_, p)| p.to_string()))
            .expect("a pids cgroup");
        (
            format!("/sys/fs/cgroup/memory{path}/memory.limit_in_bytes"),
            format!("/sys/fs/cgroup/pids{pids_path}/pids.max"),
        )
    };
    // The snapshot's 256 MiB of guest memory + the default 384 MiB overhead.
    assert_eq!(
        std::fs::read_to_string(&memory).unwrap().trim(),
        ((256u64 + 384) << 20).to_string()
    );
    assert_eq!(std::fs::read_to_string(&pids).unwrap().trim(), "512");
    assert!(metric(admin, "supermachine_connections_total") >= 1);

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(router as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(0));
    let deadline = Instant::now() + Duration::from_secs(20);
    while !pids_with(&snap, "supermachine-worker").is_empty() {
        assert!(Instant::now() < deadline, "workers outlived serve --user");
        std::thread::sleep(Duration::from_millis(100));
    }
}
