//! supermachine-worker: one VM per process, restore on request, SCM_RIGHTS handoff.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use common::*;
use supermachine::{PullRequest, Worker};

const INDEX: &[u8] = b"<h1>hello from supermachine</h1>\n";

fn bake(dir: &std::path::Path) -> std::path::PathBuf {
    let mut boot = request("busybox");
    boot.overrides.cmd = Some(
        ["httpd", "-f", "-p", "80", "-h", "/var/www"]
            .map(String::from)
            .to_vec(),
    );
    let req = PullRequest {
        boot,
        name: "httpd".into(),
        port: 80,
        ready_timeout: Duration::from_secs(60),
        snapshots_dir: dir.to_path_buf(),
    };
    supermachine::pull::pull(&req).unwrap().snapshot.dir
}

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
    let snap = bake(tmp.path());
    let mut workers: Vec<Worker> = (0..3).map(|_| Worker::spawn(&snap).unwrap()).collect();
    for w in workers.iter_mut() {
        let t = w.restore().unwrap();
        assert!(t.ready >= t.restore);
        let (status, body) = http_get(w.connect(80).unwrap(), "/");
        assert!(status.contains("200"));
        assert_eq!(body, INDEX);
        if on_kvm() {
            // Our VMM runs the VM in the worker itself.
            assert_eq!(w.pid(), w.monitor_pid());
            assert!(holds_kvm_vm(w.pid()), "the worker holds no KVM VM");
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
    let snap = bake(tmp.path());
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
    let snap = bake(tmp.path());
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
