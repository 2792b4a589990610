//! Shared helpers for the end-to-end tests: they boot real VMs with the real CLI.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn run_script(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .current_dir(repo_root())
        .output()
        .unwrap_or_else(|e| panic!("running {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .lines()
        .last()
        .unwrap_or("")
        .to_string()
}

/// A path the caller already resolved (`var`), else what the set-up script prints. The
/// nested kvm stage sets them: its L1 VM has the caches but should not run cargo again.
fn prepared_or(var: &str, script: &[&str]) -> PathBuf {
    match std::env::var_os(var) {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(run_script(script)),
    }
}

/// Directory holding the test OCI layouts (`busybox`, `layered`), built once (cached).
pub fn images() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        prepared_or(
            "SUPERMACHINE_TEST_IMAGES",
            &["python3", "scripts/make-test-images.py"],
        )
    })
}

/// The guest kernel (built by kernel-config/build.sh, cached) and the static init.
pub fn guest() -> &'static (PathBuf, PathBuf) {
    static G: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    G.get_or_init(|| {
        let kernel = prepared_or("SUPERMACHINE_TEST_KERNEL", &["kernel-config/build.sh"]);
        let init = prepared_or("SUPERMACHINE_TEST_INIT", &["scripts/build-guest.sh"]);
        (kernel, init)
    })
}

pub fn image(name: &str) -> String {
    format!("oci-layout:{}", images().join(name).display())
}

/// `supermachine` with the guest kernel/init pinned, so tests may point the cache elsewhere.
pub fn supermachine() -> Command {
    let (kernel, init) = guest();
    let mut c = Command::new(env!("CARGO_BIN_EXE_supermachine"));
    c.env("SUPERMACHINE_KERNEL", kernel)
        .env("SUPERMACHINE_INIT", init);
    c
}

pub fn boot(args: &[&str]) -> Output {
    boot_with(supermachine(), args)
}

pub fn boot_with(mut cmd: Command, args: &[&str]) -> Output {
    cmd.arg("boot")
        .args(args)
        .output()
        .expect("running supermachine boot")
}

/// `boot_with` that gives up after `limit`: the CLI gets SIGTERM (it stops its VM), then
/// SIGKILL, and the test fails saying so, instead of hanging its whole binary.
pub fn boot_within(args: &[&str], limit: std::time::Duration) -> Output {
    use std::io::Read;
    use std::process::Stdio;
    let mut child = supermachine()
        .arg("boot")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running supermachine boot");
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            v
        })
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    let deadline = std::time::Instant::now() + limit;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if std::time::Instant::now() > deadline {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            std::thread::sleep(std::time::Duration::from_secs(10));
            let _ = child.kill();
            let _ = child.wait();
            let (o, e) = (
                out.join().unwrap_or_default(),
                err.join().unwrap_or_default(),
            );
            panic!(
                "supermachine boot {args:?} did not finish within {limit:?} ({} bytes out); stderr:\n{}",
                o.len(),
                String::from_utf8_lossy(&e)
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    }
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts the exit code, showing both streams when it differs.
pub fn assert_code(o: &Output, code: i32) {
    assert_eq!(
        o.status.code(),
        Some(code),
        "exit status {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        o.status,
        stdout(o),
        stderr(o)
    );
}

/// Asserts that supermachine itself failed (exit 125) with an error that says `needle`.
pub fn assert_fails_with(o: &Output, needle: &str) {
    assert_code(o, 125);
    assert!(stderr(o).contains(needle), "{}", stderr(o));
}

/// Copies an OCI layout so a test can damage it.
pub fn copy_layout(name: &str, dest: &Path) -> PathBuf {
    let src = images().join(name);
    let dst = dest.join(name);
    let status = Command::new("cp")
        .arg("-a")
        .arg(&src)
        .arg(&dst)
        .status()
        .unwrap();
    assert!(status.success());
    dst
}

/// Files in `dir` (recursively), for "nothing half-written" checks.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(files_under(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// A `BootRequest` for an image of the test set, with the guest kernel/init pinned.
pub fn request(image_name: &str) -> supermachine::BootRequest {
    let (kernel, init) = guest();
    let mut r =
        supermachine::BootRequest::new(supermachine::ImageRef::parse(&image(image_name)).unwrap());
    r.kernel = Some(kernel.clone());
    r.init = Some(init.clone());
    r
}

/// Output sink that keeps nothing (tests read output through exec instead).
pub fn discard() -> supermachine::OutputSink {
    Box::new(|_, _| {})
}

/// Minimal HTTP/1.0 GET over an established stream; returns (status line, body).
pub fn http_get(s: impl std::io::Read + std::io::Write, path: &str) -> (String, Vec<u8>) {
    http_get_host(s, "test", path)
}

/// [`http_get`] with a chosen `Host` header.
pub fn http_get_host(
    mut s: impl std::io::Read + std::io::Write,
    host: &str,
    path: &str,
) -> (String, Vec<u8>) {
    write!(s, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").unwrap();
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).unwrap();
    let split = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("no header end");
    let head = String::from_utf8_lossy(&resp[..split]).to_string();
    let status = head.lines().next().unwrap_or("").to_string();
    (status, resp[split + 4..].to_vec())
}

pub fn sha256(b: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(b))
}

pub fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    // xorshift: deterministic, fast, incompressible enough.
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Whether the VMs of tests that name no backend run on the kvm backend here: what
/// `--backend auto` (or `SUPERMACHINE_BACKEND`) picks — kvm where /dev/kvm has VMX/SVM,
/// as in the nested stage. There a VM runs inside the process that asked for it (the CLI or
/// a worker) instead of in a QEMU child.
pub fn on_kvm() -> bool {
    use supermachine_backend::{select, BackendChoice, BackendKind};
    select::select(BackendChoice::from_env()).is_ok_and(|s| s.kind() == BackendKind::Kvm)
}

/// What process `pid`'s descriptors point to (`/dev/kvm`, `anon_inode:kvm-vm`, files).
pub fn open_files(pid: u32) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .map(|p| p.to_string_lossy().into_owned())
        .collect()
}

/// Whether process `pid` holds a KVM VM (the kvm backend runs the VM in it).
pub fn holds_kvm_vm(pid: u32) -> bool {
    open_files(pid).iter().any(|f| f == "anon_inode:kvm-vm")
}

/// The run directories of the VMs process `pid` runs or is: the folders of the
/// `console.log` files it has open (QEMU and the kvm backend both keep it open).
pub fn run_dirs_of(pid: u32) -> Vec<PathBuf> {
    open_files(pid)
        .iter()
        .filter(|f| f.ends_with("/console.log"))
        .filter_map(|f| Path::new(f).parent().map(Path::to_path_buf))
        .collect()
}

/// The children of process `pid` (of all its threads).
pub fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            if let Ok(c) = std::fs::read_to_string(t.path().join("children")) {
                out.extend(c.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
            }
        }
    }
    out
}

/// A field of /proc/PID/status, e.g. `status_field(pid, "CapEff")`.
pub fn status_field(pid: u32, name: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix(&format!("{name}:"))
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_default()
}

/// Asserts what the worker jail promises of process `pid` (a jailed worker or its QEMU):
/// not root, no capability (none in the bounding set but QEMU's two), no_new_privs, a seccomp filter, and its own mount,
/// pid, network, ipc and uts namespaces.
pub fn assert_jailed(pid: u32) {
    let uid = status_field(pid, "Uid");
    assert!(
        !uid.is_empty() && uid.split_whitespace().all(|u| u != "0"),
        "process {pid} runs as uid {uid:?}"
    );
    for set in ["CapInh", "CapPrm", "CapEff", "CapAmb"] {
        assert_eq!(
            status_field(pid, set),
            "0000000000000000",
            "{set} of process {pid}"
        );
    }
    // Nothing to gain by exec either; QEMU keeps CAP_SETUID|CAP_SETGID in its bounding set
    // (it needs them for its own -runas, and has neither once it ran).
    let bounding = u64::from_str_radix(&status_field(pid, "CapBnd"), 16).unwrap();
    assert_eq!(bounding & !0xc0, 0, "CapBnd of process {pid}: {bounding:x}");
    assert_eq!(status_field(pid, "NoNewPrivs"), "1", "process {pid}");
    assert_eq!(status_field(pid, "Seccomp"), "2", "process {pid}");
    for ns in ["mnt", "pid", "net", "ipc", "uts"] {
        let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        assert_ne!(theirs, ours, "process {pid} shares our {ns} namespace");
    }
}

/// The memory and pids limits of the cgroup process `pid` is in (v2, or v1 controllers).
pub fn cgroup_limits(pid: u32) -> (u64, u64) {
    let groups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let mut memory = None;
    let mut pids = None;
    let read =
        |p: PathBuf| -> Option<u64> { std::fs::read_to_string(&p).ok()?.trim().parse().ok() };
    for line in groups.lines() {
        let mut f = line.splitn(3, ':');
        let (_, controllers, path) = (f.next(), f.next().unwrap_or(""), f.next().unwrap_or(""));
        let rel = path.trim_start_matches('/');
        if controllers.is_empty() {
            for root in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"] {
                let d = Path::new(root).join(rel);
                memory = memory.or_else(|| read(d.join("memory.max")));
                pids = pids.or_else(|| read(d.join("pids.max")));
            }
        }
        for c in controllers.split(',') {
            let d = Path::new("/sys/fs/cgroup").join(c).join(rel);
            match c {
                "memory" => memory = memory.or_else(|| read(d.join("memory.limit_in_bytes"))),
                "pids" => pids = pids.or_else(|| read(d.join("pids.max"))),
                _ => {}
            }
        }
    }
    (
        memory.unwrap_or_else(|| panic!("process {pid} has no memory limit:\n{groups}")),
        pids.unwrap_or_else(|| panic!("process {pid} has no pids limit:\n{groups}")),
    )
}

/// On kvm, lets `gid`'s members open /dev/kvm, as a host's `kvm` group does (L1's node is
/// root's alone, and only these tests run there); elsewhere nothing.
pub fn give_kvm_to_group(gid: u32) {
    if on_kvm() {
        std::os::unix::fs::chown("/dev/kvm", None, Some(gid)).unwrap();
        std::fs::set_permissions(
            "/dev/kvm",
            std::os::unix::fs::PermissionsExt::from_mode(0o660),
        )
        .unwrap();
    }
}

/// The guest kernel, init and agent copied into `dir` (root's caches are under its 0700
/// home, out of another user's reach): (kernel, init).
pub fn guest_copy_in(dir: &Path) -> (PathBuf, PathBuf) {
    let (kernel, init) = guest();
    let (k, i) = (dir.join("vmlinux"), dir.join("init"));
    std::fs::copy(kernel, &k).unwrap();
    std::fs::copy(init, &i).unwrap();
    std::fs::copy(
        init.with_file_name("supermachine-shim"),
        dir.join("supermachine-shim"),
    )
    .unwrap();
    (k, i)
}

/// Baking the busybox image as `name` with httpd on port 80 serving /var/www (the
/// snapshot most restore tests use), into `dir`.
pub fn httpd_pull_request(dir: &Path, name: &str) -> supermachine::PullRequest {
    let mut boot = request("busybox");
    boot.overrides.cmd = Some(
        ["httpd", "-f", "-p", "80", "-h", "/var/www"]
            .map(String::from)
            .to_vec(),
    );
    supermachine::PullRequest {
        boot,
        name: name.into(),
        port: 80,
        ready_timeout: std::time::Duration::from_secs(60),
        snapshots_dir: dir.to_path_buf(),
    }
}

/// Bakes [`httpd_pull_request`] as "httpd" and returns the snapshot directory.
pub fn bake_httpd(dir: &Path) -> PathBuf {
    supermachine::pull::pull(&httpd_pull_request(dir, "httpd"))
        .expect("bake")
        .snapshot
        .dir
}
