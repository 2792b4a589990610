//! `run -d`, `ps`, `exec`, `logs`, `stop` on real daemons.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::*;

/// A private runtime dir, snapshot store and TMPDIR for one test's daemons, so what they
/// leave behind (processes, run directories, registry entries) can be looked for.
struct Sandbox {
    runtime: tempfile::TempDir,
    snaps: tempfile::TempDir,
    tmp: tempfile::TempDir,
}

impl Sandbox {
    fn new() -> Self {
        Sandbox {
            runtime: tempfile::tempdir().unwrap(),
            snaps: tempfile::tempdir().unwrap(),
            tmp: tempfile::tempdir().unwrap(),
        }
    }

    fn sm(&self, args: &[&str]) -> Output {
        self.sm_with(&[], args)
    }

    /// [`Sandbox::sm`] with more environment.
    fn sm_with(&self, env: &[(&str, &str)], args: &[&str]) -> Output {
        supermachine()
            .env("SUPERMACHINE_RUNTIME_DIR", self.runtime.path())
            .env("SUPERMACHINE_SNAPSHOTS", self.snaps.path())
            .env("TMPDIR", self.tmp.path())
            .envs(env.iter().copied())
            .args(args)
            .output()
            .unwrap()
    }

    /// Processes started for this sandbox (the daemon, its workers, their VMs), by the
    /// runtime dir in their environment.
    fn processes(&self) -> Vec<u32> {
        let needle = format!("SUPERMACHINE_RUNTIME_DIR={}", self.runtime.path().display());
        let me = std::process::id();
        let mut out = Vec::new();
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else {
                continue;
            };
            if pid == me {
                continue;
            }
            let Ok(env) = std::fs::read(e.path().join("environ")) else {
                continue;
            };
            if env.split(|b| *b == 0).any(|kv| kv == needle.as_bytes()) {
                out.push(pid);
            }
        }
        out
    }

    /// Nothing of a daemon is left: no process, no run directory, no `ps` line.
    fn assert_nothing_left(&self, name: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.processes().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
        }
        assert_eq!(
            self.processes(),
            Vec::<u32>::new(),
            "processes left running"
        );
        let left: Vec<_> = std::fs::read_dir(self.tmp.path())
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        assert!(left.is_empty(), "left in TMPDIR: {left:?}");
        let ps = self.sm(&["ps"]);
        assert!(!stdout(&ps).contains(name), "{}", stdout(&ps));
    }
}

/// The test image's web server, as the workload of `run`.
const HTTPD: &[&str] = &["httpd", "-f", "-p", "80", "-h", "/var/www"];

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn redis_cli(port: u16, args: &[&str]) -> Output {
    Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli (Debian's redis-tools)")
}

/// A non-HTTP protocol through `run -d -p` (tcp, the default): Debian's redis-server in
/// the guest, real redis clients on the host. Ready without HTTP (the guest port listens);
/// not a byte of HTTP reaches redis; a client whose worker dies sees the connection end
/// with no byte (no 502 in a RESP stream), and the daemon serves again after a respawn.
#[test]
fn redis_over_tcp_publish() {
    let sb = Sandbox::new();
    let port = free_port();
    let name = "redis-test";
    let o = sb.sm(&[
        "run",
        "-d",
        "--name",
        name,
        "-p",
        &format!("127.0.0.1:{port}:6379"),
        &image("redis"),
    ]);
    assert_code(&o, 0);
    let o = redis_cli(port, &["ping"]);
    assert_eq!(stdout(&o).trim(), "PONG", "{}", stderr(&o));
    assert_eq!(stdout(&redis_cli(port, &["set", "k", "v1"])).trim(), "OK");
    assert_eq!(stdout(&redis_cli(port, &["get", "k"])).trim(), "v1");
    let bench = Command::new("redis-benchmark")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(["-q", "-n", "2000", "-c", "8", "-t", "set,get"])
        .output()
        .expect("redis-benchmark (Debian's redis-tools)");
    assert!(bench.status.success(), "{}", stderr(&bench));
    let text = stdout(&bench);
    assert!(text.contains("SET:") && text.contains("GET:"), "{text}");
    assert!(!text.to_lowercase().contains("error"), "{text}");
    let ps = stdout(&sb.sm(&["ps"]));
    assert!(ps.contains(&format!("127.0.0.1:{port}->6379/tcp")), "{ps}");

    // An open RESP connection whose worker is killed: EOF, no byte.
    let mut conn = TcpStream::connect(("127.0.0.1", port)).unwrap();
    conn.write_all(b"*1\r\n$4\r\nPING\r\n").unwrap();
    let mut pong = [0u8; 7];
    conn.read_exact(&mut pong).unwrap();
    assert_eq!(&pong, b"+PONG\r\n");
    let daemon = registry_pid(&sb, name);
    let workers: Vec<u32> = sb
        .processes()
        .into_iter()
        .filter(|p| comm(*p) == "supermachine-wo" && parent(*p) == Some(daemon))
        .collect();
    assert_eq!(workers.len(), 1, "one worker: {workers:?}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(workers[0] as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut rest = Vec::new();
    conn.read_to_end(&mut rest).unwrap();
    assert_eq!(
        rest,
        b"",
        "bytes after the worker died: {:?}",
        String::from_utf8_lossy(&rest)
    );
    // Respawned: served again.
    let deadline = Instant::now() + Duration::from_secs(120);
    while stdout(&redis_cli(port, &["ping"])).trim() != "PONG" {
        assert!(Instant::now() < deadline, "no worker again after the kill");
        std::thread::sleep(Duration::from_millis(500));
    }
    let log = stdout(&sb.sm(&["logs", name]));
    assert!(!log.contains("SECURITY ATTACK"), "{log}");
    assert_code(&sb.sm(&["stop", name]), 0);
    sb.assert_nothing_left(name);
}

fn registry_pid(sb: &Sandbox, name: &str) -> u32 {
    let ps = stdout(&sb.sm(&["ps"]));
    let line = ps.lines().find(|l| l.starts_with(name)).expect("ps line");
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn parent(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // pid (comm) state ppid ...: comm may hold spaces, so split after the last ')'.
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// A workload that never listens: `run -d` fails within --ready-timeout, names the port,
/// and leaves nothing behind.
#[test]
fn a_port_that_never_opens_fails_run_d_and_leaves_nothing() {
    let sb = Sandbox::new();
    let name = "never-listens";
    let t = Instant::now();
    let o = sb.sm(&[
        "run",
        "-d",
        "--name",
        name,
        "--ready-timeout",
        "20",
        "-p",
        &format!("{}:8099", free_port()),
        &image("busybox"),
        "--",
        "sleep",
        "1000",
    ]);
    assert_code(&o, 125);
    assert!(stderr(&o).contains("8099"), "{}", stderr(&o));
    assert!(
        t.elapsed() < Duration::from_secs(200),
        "took {:?}",
        t.elapsed()
    );
    sb.assert_nothing_left(name);
}

/// Workers that can never start (here the worker binary is `false`): the daemon stops
/// with the error after a few tries, so `run -d` fails saying why instead of waiting out
/// its whole ready budget (--ready-timeout + the bake allowance, 720 s), and leaves nothing.
#[test]
fn workers_that_cannot_start_fail_run_d_at_once() {
    let sb = Sandbox::new();
    let name = "no-workers";
    let t = Instant::now();
    let publish = format!("{}:80/http", free_port());
    let args = [
        &[
            "run",
            "-d",
            "--name",
            name,
            "-p",
            &publish,
            &image("busybox"),
            "--",
        ],
        HTTPD,
    ];
    let o = sb.sm_with(&[("SUPERMACHINE_WORKER", "/bin/false")], &args.concat());
    assert_code(&o, 125);
    assert!(
        stderr(&o).contains("could start") && stderr(&o).contains("exited"),
        "{}",
        stderr(&o)
    );
    assert!(
        t.elapsed() < Duration::from_secs(300),
        "took {:?}",
        t.elapsed()
    );
    sb.assert_nothing_left(name);
}

/// A failing --health-cmd: the daemon is stopped and removed, with the check's reason.
#[test]
fn a_failing_health_cmd_stops_the_daemon() {
    let sb = Sandbox::new();
    let name = "unhealthy";
    let o = sb.sm(&[
        "run",
        "-d",
        "--name",
        name,
        "--ready-timeout",
        "10",
        "--health-cmd",
        "echo not yet >&2; exit 3",
        "-p",
        &format!("{}:80", free_port()),
        &image("busybox"),
        "--",
        "httpd",
        "-f",
        "-p",
        "80",
        "-h",
        "/var/www",
    ]);
    assert_code(&o, 125);
    let err = stderr(&o);
    assert!(
        err.contains("--health-cmd") && err.contains("exit 3") && err.contains("not yet"),
        "{err}"
    );
    sb.assert_nothing_left(name);
}

#[test]
fn run_detached_then_ps_exec_logs_stop() {
    let runtime = tempfile::tempdir().unwrap();
    let snaps = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let sm = |args: &[&str]| {
        supermachine()
            .env("SUPERMACHINE_RUNTIME_DIR", runtime.path())
            .env("SUPERMACHINE_SNAPSHOTS", snaps.path())
            .args(args)
            .output()
            .unwrap()
    };
    let name = "daemon-test";
    let (publish, img) = (format!("{port}:80/http"), image("busybox"));
    let o = sm(&[
        &["run", "-d", "--name", name, "-p", &publish, &img, "--"],
        HTTPD,
    ]
    .concat());
    assert_code(&o, 0);
    assert_eq!(stdout(&o).trim(), name);
    // It answers as soon as `run -d` returns.
    let (status, body) = http_get(TcpStream::connect(("127.0.0.1", port)).unwrap(), "/");
    assert!(status.contains("200"));
    assert_eq!(body, b"<h1>hello from supermachine</h1>\n");

    let o = sm(&["ps"]);
    assert_code(&o, 0);
    let line = stdout(&o)
        .lines()
        .find(|l| l.starts_with(name))
        .map(String::from)
        .expect("ps lists the daemon");
    assert!(
        line.contains(&format!("127.0.0.1:{port}->80/http")),
        "{line}"
    );

    let o = sm(&["exec", name, "--", "sh", "-c", "echo inside; exit 4"]);
    assert_code(&o, 4);
    assert_eq!(stdout(&o), "inside\n");

    let o = sm(&["logs", name]);
    assert_code(&o, 0);
    assert!(
        stdout(&o).contains(&format!(
            "{name} serving 127.0.0.1:{port} -> guest port 80/http"
        )),
        "{}",
        stdout(&o)
    );

    let o = sm(&["stop", name]);
    assert_code(&o, 0);
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "still listening after stop"
    );
    let o = sm(&["ps"]);
    assert!(!stdout(&o).contains(name), "{}", stdout(&o));
    let o = sm(&["exec", name, "--", "true"]);
    assert_code(&o, 125);
    let o = sm(&["stop", name]);
    assert_code(&o, 125);
}

/// `nobody`, for the test below.
const USER: u32 = 65534;

/// `path` and everything under it owned by `uid`:`uid`.
fn chown_tree(path: &std::path::Path, uid: u32) {
    std::os::unix::fs::lchown(path, Some(uid), Some(uid)).unwrap();
    if path.is_dir() && !path.is_symlink() {
        for e in std::fs::read_dir(path).unwrap() {
            chown_tree(&e.unwrap().path(), uid);
        }
    }
}

/// `src` copied to `dst` (files, directories, links).
fn copy_tree(src: &std::path::Path, dst: &std::path::Path) {
    let meta = std::fs::symlink_metadata(src).unwrap();
    if meta.is_symlink() {
        std::os::unix::fs::symlink(std::fs::read_link(src).unwrap(), dst).unwrap();
    } else if meta.is_dir() {
        std::fs::create_dir_all(dst).unwrap();
        for e in std::fs::read_dir(src).unwrap() {
            let e = e.unwrap();
            copy_tree(&e.path(), &dst.join(e.file_name()));
        }
    } else {
        std::fs::copy(src, dst).unwrap();
    }
}

/// Not root: `run -d` as an ordinary user (with its own caches, as such a user has) bakes
/// and serves, each VM jailed in a user namespace of its own — not root anywhere, no
/// capability, no_new_privs, seccomp, namespaces apart from the daemon's, a root holding
/// only its own files — and the CLI says what of the jail it left out (a uid per VM,
/// cgroups: those need root).
#[test]
fn run_as_a_user_jails_each_vm_in_a_user_namespace() {
    use std::os::unix::process::CommandExt;
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    // What root's caches hold, where the user can read it (root's home is 0700).
    guest_copy_in(h);
    copy_tree(&images().join("busybox"), &h.join("busybox"));
    for d in ["cache", "snapshots", "runtime", "tmp"] {
        std::fs::create_dir(h.join(d)).unwrap();
    }
    chown_tree(h, USER);
    give_kvm_to_group(USER);
    let port = free_port();
    let sm = |args: &[&str]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_supermachine"));
        c.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", h)
            .env("SUPERMACHINE_KERNEL", h.join("vmlinux"))
            .env("SUPERMACHINE_INIT", h.join("init"))
            .env("SUPERMACHINE_CACHE", h.join("cache"))
            .env("SUPERMACHINE_SNAPSHOTS", h.join("snapshots"))
            .env("SUPERMACHINE_RUNTIME_DIR", h.join("runtime"))
            .env("TMPDIR", h.join("tmp"))
            .current_dir(h)
            .args(args);
        for var in ["SUPERMACHINE_BACKEND", "SUPERMACHINE_QEMU"] {
            if let Some(v) = std::env::var_os(var) {
                c.env(var, v);
            }
        }
        // SAFETY: setgroups/setgid/setuid between fork and exec, on the child only.
        unsafe {
            c.pre_exec(|| {
                let gid = USER as libc::gid_t;
                if libc::setgroups(1, &gid) != 0
                    || libc::setgid(USER) != 0
                    || libc::setuid(USER) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        c.output().unwrap()
    };
    let name = "as-a-user";
    let (publish, img) = (
        format!("{port}:80/http"),
        format!("oci-layout:{}", h.join("busybox").display()),
    );
    let o = sm(&[
        &["run", "-d", "--name", name, "-p", &publish, &img, "--"],
        HTTPD,
    ]
    .concat());
    assert_code(&o, 0);
    assert!(
        stderr(&o).contains("not root") && stderr(&o).contains("cgroup"),
        "no word of what the jail leaves out: {}",
        stderr(&o)
    );
    let (status, body) = http_get(TcpStream::connect(("127.0.0.1", port)).unwrap(), "/");
    assert!(status.contains("200"), "{status}");
    assert_eq!(body, b"<h1>hello from supermachine</h1>\n");

    // The daemon, and its jailed worker: pid 1 of a pid namespace of its own.
    let runtime = format!("SUPERMACHINE_RUNTIME_DIR={}", h.join("runtime").display());
    let ours: Vec<u32> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            std::fs::read(format!("/proc/{p}/environ"))
                .is_ok_and(|env| env.split(|b| *b == 0).any(|kv| kv == runtime.as_bytes()))
        })
        .collect();
    let ns_pid = |p: u32| status_field(p, "NSpid");
    let worker = *ours
        .iter()
        .find(|&&p| {
            std::fs::read_to_string(format!("/proc/{p}/comm"))
                .is_ok_and(|c| c.starts_with("supermachine-wo"))
                && ns_pid(p).split_whitespace().last() == Some("1")
        })
        .unwrap_or_else(|| panic!("no jailed worker among {ours:?}"));
    let daemon = *ours
        .iter()
        .find(|&&p| {
            std::fs::read_to_string(format!("/proc/{p}/comm"))
                .is_ok_and(|c| c.trim() == "supermachine")
        })
        .expect("the daemon");
    for p in [daemon, worker] {
        assert_eq!(
            status_field(p, "Uid"),
            format!("{USER}\t{USER}\t{USER}\t{USER}"),
            "pid {p}"
        );
    }
    assert_eq!(status_field(worker, "CapEff"), "0000000000000000");
    assert_eq!(status_field(worker, "CapPrm"), "0000000000000000");
    assert_eq!(status_field(worker, "CapBnd"), "0000000000000000");
    assert_eq!(status_field(worker, "NoNewPrivs"), "1");
    assert_eq!(status_field(worker, "Seccomp"), "2");
    for ns in ["user", "mnt", "pid", "net", "ipc", "uts"] {
        let of = |p: u32| std::fs::read_link(format!("/proc/{p}/ns/{ns}")).unwrap();
        assert_ne!(
            of(worker),
            of(daemon),
            "{ns} namespace shared with the daemon"
        );
    }
    // Its root holds its own files only.
    let root = format!("/proc/{worker}/root");
    assert!(std::path::Path::new(&format!("{root}/dev/null")).exists());
    for absent in ["etc/shadow", "etc/passwd", "root"] {
        assert!(
            !std::path::Path::new(&format!("{root}/{absent}")).exists(),
            "{absent} in the jail"
        );
    }

    let o = sm(&["stop", name]);
    assert_code(&o, 0);
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::path::Path::new(&format!("/proc/{worker}")).exists() {
        assert!(Instant::now() < deadline, "the worker outlived stop");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `run -d -v`: the snapshot was baked without the volume; the restored VM's httpd serves
/// the host directory mounted after the restore, and what the guest writes there belongs,
/// on the host, to the directory's owner (the jailed VM runs as that uid). A root-owned
/// directory is refused by name.
#[test]
fn run_d_with_a_volume_serves_it_and_writes_as_its_owner() {
    use std::os::unix::fs::MetadataExt;
    let sb = Sandbox::new();
    let vol = tempfile::tempdir().unwrap();
    std::fs::write(vol.path().join("index.html"), "from the host volume\n").unwrap();
    for p in [vol.path().to_path_buf(), vol.path().join("index.html")] {
        std::os::unix::fs::chown(&p, Some(65534), Some(65534)).unwrap();
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (publish, img) = (format!("{port}:80/http"), image("busybox"));
    // Below the web root, not on it: httpd chdir'ed into /var/www at bake, and a process
    // keeps the directory it is in even when a mount covers its path later.
    let spec = format!("{}:/var/www/vol", vol.path().display());
    let o = sb.sm(&[
        &[
            "run", "-d", "--name", "vol", "-v", &spec, "-p", &publish, &img, "--",
        ],
        HTTPD,
    ]
    .concat());
    assert_code(&o, 0);
    let (status, body) = http_get(
        TcpStream::connect(("127.0.0.1", port)).unwrap(),
        "/vol/index.html",
    );
    assert!(status.contains("200"), "{status}");
    assert_eq!(body, b"from the host volume\n");
    let o = sb.sm(&[
        "exec",
        "vol",
        "--",
        "sh",
        "-c",
        "echo hi > /var/www/vol/new",
    ]);
    assert_code(&o, 0);
    let new = vol.path().join("new");
    assert_eq!(std::fs::read_to_string(&new).unwrap(), "hi\n");
    let m = std::fs::metadata(&new).unwrap();
    assert_eq!(
        (m.uid(), m.gid()),
        (65534, 65534),
        "owner of what the guest wrote"
    );
    assert_code(&sb.sm(&["stop", "vol"]), 0);

    let root_owned = tempfile::tempdir().unwrap();
    let spec = format!("{}:/data", root_owned.path().display());
    let o = sb.sm(&[
        &["run", "-d", "--name", "vol2", "-v", &spec, &img, "--"],
        HTTPD,
    ]
    .concat());
    assert_ne!(o.status.code(), Some(0));
    let err = stderr(&o);
    assert!(
        err.contains("owned by root") && err.contains(&root_owned.path().display().to_string()),
        "{err}"
    );
}
