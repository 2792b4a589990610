//! supermachine-worker: one VM per process, restore on request, SCM_RIGHTS handoff.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use common::*;
use supermachine::{JailConfig, Worker};

const INDEX: &[u8] = b"<h1>hello from supermachine</h1>\n";

fn alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

fn wait_gone(pid: u32) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    !alive(pid)
}

#[test]
fn workers_restore_serve_and_die_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let snap = bake_httpd(tmp.path());
    let mut workers: Vec<Worker> = (0..3).map(|_| Worker::spawn(&snap).unwrap()).collect();
    for w in workers.iter_mut() {
        let t = w.restore().unwrap();
        assert!(t.ready >= t.restore);
        let (status, body) = http_get(w.connect(80).unwrap(), "/");
        assert!(status.contains("200"));
        assert_eq!(body, INDEX);
        if on_kvm() {
            // Our VMM runs the VM in the (jailed) worker itself.
            assert_eq!(w.jailed_pid(), Some(w.monitor_pid()));
            assert!(holds_kvm_vm(w.monitor_pid()), "the worker holds no KVM VM");
        } else {
            assert_ne!(w.pid(), w.monitor_pid());
        }
    }
    // kill -9 one worker: its VM (QEMU, or the VM in it) goes with it; the others keep
    // serving.
    let victim = workers.remove(1);
    let (wpid, qpid) = (victim.pid(), victim.monitor_pid());
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(wpid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert!(wait_gone(qpid), "QEMU {qpid} outlived its worker {wpid}");
    drop(victim);
    for w in &workers {
        let (_, body) = http_get(w.connect(80).unwrap(), "/");
        assert_eq!(body, INDEX);
    }
    // A stopped worker takes its QEMU along too.
    let w = workers.pop().unwrap();
    let qpid = w.monitor_pid();
    w.stop();
    assert!(wait_gone(qpid));
}

#[test]
fn handoff_passes_the_client_socket_and_the_bytes_already_read() {
    let tmp = tempfile::tempdir().unwrap();
    let snap = bake_httpd(tmp.path());
    let mut w = Worker::spawn(&snap).unwrap();
    w.restore().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    for _ in 0..5 {
        let client = std::thread::spawn(move || {
            let mut c = TcpStream::connect(addr).unwrap();
            c.write_all(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
            let mut resp = Vec::new();
            c.read_to_end(&mut resp).unwrap();
            resp
        });
        let (mut conn, _) = listener.accept().unwrap();
        // The "router" reads the request head before choosing a worker.
        let mut head = [0u8; 64];
        let mut got = 0;
        while !head[..got].windows(4).any(|w| w == b"\r\n\r\n") {
            got += conn.read(&mut head[got..]).unwrap();
        }
        w.handoff(conn, 80, supermachine::PortProtocol::Http, &head[..got])
            .unwrap();
        let resp = client.join().unwrap();
        assert!(
            resp.starts_with(b"HTTP/1.0 200") || resp.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&resp)
        );
        assert!(resp.ends_with(INDEX));
    }
}

#[test]
fn a_bad_snapshot_is_reported_by_the_worker() {
    let tmp = tempfile::tempdir().unwrap();
    match Worker::spawn(tmp.path()) {
        Err(supermachine::Error::Worker(msg)) => assert!(msg.contains("not in the cache"), "{msg}"),
        other => panic!("expected a worker error, got {:?}", other.map(|_| ())),
    }
}

#[test]
fn pooled_vms_are_fresh_and_refilled() {
    let tmp = tempfile::tempdir().unwrap();
    let snap = bake_httpd(tmp.path());
    let image = supermachine::Image::from_snapshot(&snap).unwrap();
    let first = image.acquire().unwrap();
    first
        .exec_builder()
        .unwrap()
        .argv(["sh", "-c", "echo dirty > /tmp/mark"])
        .output()
        .unwrap();
    let (first_worker, first_qemu) = (first.pid(), first.monitor_pid());
    drop(first);
    assert!(
        wait_gone(first_qemu),
        "a dropped PooledVm's QEMU keeps running"
    );
    assert!(wait_gone(first_worker));
    // The pool refills; the next VM is a fresh restore without the mark.
    for _ in 0..3 {
        let vm = image.acquire().unwrap();
        let o = vm
            .exec_builder()
            .unwrap()
            .argv(["sh", "-c", "cat /tmp/mark 2>/dev/null; echo ok"])
            .output()
            .unwrap();
        assert_eq!(o.stdout, b"ok\n");
        let (_, body) = http_get(vm.connect(80).unwrap(), "/");
        assert_eq!(body, INDEX);
    }
}

/// The snapshot the jail tests share (baked once per test binary run).
fn shared_snapshot() -> &'static std::path::Path {
    static SNAP: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    SNAP.get_or_init(|| {
        // Never dropped: the snapshot outlives every test of this binary.
        let dir = tempfile::Builder::new()
            .prefix("jail-snap-")
            .tempdir()
            .unwrap()
            .keep();
        bake_httpd(&dir)
    })
}

#[test]
fn a_worker_is_jailed_limited_and_sees_only_its_files() {
    let snap = shared_snapshot();
    // Something of another VM's next to this snapshot, and files of the host's.
    let secret = snap.parent().unwrap().join("another-vm-secret");
    std::fs::write(&secret, "not yours").unwrap();
    let mut w = Worker::spawn(snap).unwrap();
    w.restore().unwrap();
    let (_, body) = http_get(w.connect(80).unwrap(), "/");
    assert_eq!(body, INDEX);
    let pid = w.jailed_pid().expect("jailed by default");
    assert_ne!(pid, w.pid(), "the worker runs in a child of the waiter");
    assert_jailed(pid);
    assert_eq!(status_field(pid, "CapBnd"), "0000000000000000");
    if !on_kvm() {
        // QEMU runs in the same jail, as the same uid, under its own sandbox too.
        let qemu = w.monitor_pid();
        assert_ne!(qemu, pid);
        assert_jailed(qemu);
        assert_eq!(status_field(qemu, "Uid"), status_field(pid, "Uid"));
    } else {
        // Our VMM's threads narrow themselves further: each vCPU and the event loop
        // stack their own filter on the process-wide ones.
        // A thread's /proc/TID has its own status, as a process's does.
        let filters = |tid: u32| -> (String, u32) {
            let comm = std::fs::read_to_string(format!("/proc/{tid}/comm")).unwrap();
            let n = status_field(tid, "Seccomp_filters")
                .parse()
                .expect("Seccomp_filters in status");
            (comm.trim().to_string(), n)
        };
        let tasks: Vec<(String, u32)> = std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .map(|e| filters(e.unwrap().file_name().to_string_lossy().parse().unwrap()))
            .collect();
        let main = filters(pid).1;
        assert!(main >= 2, "process-wide filters: {tasks:?}");
        for kind in ["vcpu", "vmm"] {
            let of_kind: Vec<_> = tasks.iter().filter(|(c, _)| c.starts_with(kind)).collect();
            assert!(!of_kind.is_empty(), "no {kind} thread: {tasks:?}");
            assert!(
                of_kind.iter().all(|(_, n)| *n == main + 1),
                "{kind} threads without their own filter: {tasks:?}"
            );
        }
    }
    let (memory, pids) = cgroup_limits(pid);
    assert!(
        memory > 256 << 20 && memory < 4 << 30,
        "memory limit {memory} is not guest memory + overhead"
    );
    assert_eq!(pids, 512);
    // Its root: the snapshot, nothing of the host's.
    let root = std::path::PathBuf::from(format!("/proc/{pid}/root"));
    let inside = |p: &std::path::Path| root.join(p.strip_prefix("/").unwrap());
    assert!(inside(&snap.join("metadata.json")).is_file());
    for p in [
        std::path::PathBuf::from("/etc/shadow"),
        std::path::PathBuf::from("/etc/passwd"),
        // The host's other caches: the test images, beside this VM's layers and kernel.
        images().to_path_buf(),
        secret.clone(),
        std::env::current_exe().unwrap(),
    ] {
        assert!(
            !inside(&p).exists(),
            "{} is visible in the jail",
            p.display()
        );
    }
    let _ = std::fs::remove_file(&secret);
}

#[test]
#[cfg(debug_assertions)]
fn a_forbidden_syscall_kills_the_worker_with_sigsys() {
    let jail = JailConfig {
        test_forbidden_syscall: true,
        ..JailConfig::current()
    };
    let mut w = Worker::spawn_with(shared_snapshot(), &jail, &[]).unwrap();
    w.restore().unwrap();
    // A connection without the trigger is served.
    let (_, body) = http_get(w.connect(80).unwrap(), "/");
    assert_eq!(body, INDEX);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let client = std::thread::spawn(move || {
        let mut c = TcpStream::connect(addr).unwrap();
        let mut resp = Vec::new();
        let _ = c.read_to_end(&mut resp);
        resp
    });
    let (conn, _) = listener.accept().unwrap();
    let head = b"GET / HTTP/1.1\r\nHost: x\r\nx-supermachine-test: forbidden-syscall\r\n\r\n";
    let _ = w.handoff(conn, 80, supermachine::PortProtocol::Http, head);
    let resp = client.join().unwrap();
    assert!(
        resp.is_empty() || resp.starts_with(b"HTTP/1.1 502"),
        "{}",
        String::from_utf8_lossy(&resp)
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let reason = loop {
        if let Some(r) = w.exit_reason() {
            break r;
        }
        assert!(
            Instant::now() < deadline,
            "the worker survived a forbidden syscall"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    // acct is syscall 163 on x86_64.
    assert_eq!(
        reason, "killed by SIGSYS: seccomp refused syscall 163",
        "{reason}"
    );
}

#[test]
fn a_guest_over_its_memory_limit_kills_only_its_worker() {
    let snap = shared_snapshot();
    let mut neighbour = Worker::spawn(snap).unwrap();
    neighbour.restore().unwrap();
    // Far below guest RAM: a guest filling its memory goes over it.
    let jail = JailConfig {
        memory_max_mib: Some(MEMORY_LIMITED_MIB),
        ..JailConfig::current()
    };
    let mut w = Worker::spawn_with(snap, &jail, &[]).unwrap();
    w.restore().unwrap();
    let (memory, _) = cgroup_limits(w.jailed_pid().unwrap());
    assert_eq!(memory, u64::from(MEMORY_LIMITED_MIB) << 20);
    // Touch ~200 MiB of guest RAM: a tmpfs file in the guest.
    let filled = w
        .exec_builder()
        .unwrap()
        .argv([
            "sh",
            "-c",
            "mkdir -p /fill && mount -t tmpfs -o size=220m tmpfs /fill && \
             dd if=/dev/zero of=/fill/x bs=1M count=200 && echo filled",
        ])
        .output();
    let deadline = Instant::now() + Duration::from_secs(60);
    while w.is_alive() {
        assert!(
            Instant::now() < deadline,
            "the worker outlived its memory limit: {filled:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    if on_kvm() {
        // The OOM killer picks the biggest process of the group: the worker holding the VM
        // (on QEMU it is QEMU, and the worker then exits on its own).
        // The control socket closes before the waiter is reaped: wait for the status.
        let reason = loop {
            if let Some(r) = w.exit_reason() {
                break r;
            }
            assert!(Instant::now() < deadline, "the waiter did not exit");
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(reason.contains("signal 9"), "{reason}");
    }
    // The neighbour is untouched.
    let (_, body) = http_get(neighbour.connect(80).unwrap(), "/");
    assert_eq!(body, INDEX);
}

/// The memory limit of the over-the-limit test, MiB.
const MEMORY_LIMITED_MIB: u32 = 160;
