//! The guest agent and published ports, on real guests: exec, files, signals, connect(),
//! expose_tcp, `boot -p`, `supermachine exec`.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;
use supermachine::{ExecStdin, ExitStatus, Vm};

const INDEX: &[u8] = b"<h1>hello from supermachine</h1>\n";

fn httpd_vm() -> Vm {
    let mut req = request("busybox");
    req.overrides.cmd = Some(
        ["httpd", "-f", "-p", "80", "-h", "/var/www"]
            .map(String::from)
            .to_vec(),
    );
    let vm = Vm::boot(&req, discard()).expect("boot");
    vm.wait_listening(80, Duration::from_secs(30))
        .expect("httpd listens");
    vm
}

#[test]
fn http_through_connect_and_expose_tcp() {
    let vm = httpd_vm();
    // A bigger body too, placed with write_file.
    let blob = random_bytes(300_000, 7);
    vm.write_file("/var/www/blob.bin", &blob, 0o644).unwrap();

    for _ in 0..20 {
        let (status, body) = http_get(vm.connect(80).unwrap(), "/");
        assert!(status.contains("200"), "{status}");
        assert_eq!(body, INDEX);
    }
    let fwd = vm.expose_tcp(0, 80).unwrap();
    let addr = fwd.local_addr();
    for _ in 0..20 {
        let (status, body) = http_get(TcpStream::connect(addr).unwrap(), "/");
        assert!(status.contains("200"), "{status}");
        assert_eq!(body, INDEX);
    }
    let handles: Vec<_> = (0..8)
        .map(|_| {
            std::thread::spawn(move || {
                let (status, body) = http_get(TcpStream::connect(addr).unwrap(), "/blob.bin");
                assert!(status.contains("200"), "{status}");
                body
            })
        })
        .collect();
    for h in handles {
        assert!(h.join().unwrap() == blob, "concurrent body differs");
    }
    // In-flight connections survive stop(); new ones are refused.
    let mut inflight = TcpStream::connect(addr).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    fwd.stop();
    let (status, body) = http_get(&mut inflight, "/");
    assert!(status.contains("200") && body == INDEX);
    assert!(
        TcpStream::connect(addr).is_err(),
        "the forwarder still accepts after stop()"
    );
}

#[test]
fn loopback_only_workload_is_reachable() {
    let mut req = request("busybox");
    req.overrides.cmd = Some(
        ["httpd", "-f", "-p", "127.0.0.1:8081", "-h", "/var/www"]
            .map(String::from)
            .to_vec(),
    );
    let vm = Vm::boot(&req, discard()).unwrap();
    vm.wait_listening(8081, Duration::from_secs(30)).unwrap();
    let fwd = vm.expose_tcp(0, 8081).unwrap();
    let (status, body) = http_get(TcpStream::connect(fwd.local_addr()).unwrap(), "/");
    assert!(status.contains("200"), "{status}");
    assert_eq!(body, INDEX);
    // Nothing on a port: connect() fails cleanly with ConnectionRefused.
    let e = vm.connect(9).unwrap_err();
    assert!(e.to_string().contains("guest port 9"), "{e}");
}

#[test]
fn files_round_trip_16_mib_and_empty_and_missing() {
    let vm = httpd_vm();
    let big = random_bytes(16 << 20, 42);
    vm.write_file("/tmp/big.bin", &big, 0o600).unwrap();
    let back = vm.read_file("/tmp/big.bin", 32 << 20).unwrap();
    assert_eq!(sha256(&back), sha256(&big));
    let st = vm.exec(["stat", "-c", "%s %a", "/tmp/big.bin"]).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&st.stdout),
        format!("{} 600\n", 16 << 20)
    );

    vm.write_file("/tmp/empty", b"", 0o644).unwrap();
    assert_eq!(vm.read_file("/tmp/empty", 10).unwrap(), b"");

    let e = vm.read_file("/no/such/file", 10).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
    let e = vm.read_file("/tmp/big.bin", 1000).unwrap_err();
    assert!(
        e.to_string().contains("big.bin"),
        "too large is refused: {e}"
    );
    // Writes are atomic: no temp files left next to the target.
    let ls = vm.exec(["ls", "-a", "/tmp"]).unwrap();
    assert!(
        !String::from_utf8_lossy(&ls.stdout).contains("sm-tmp"),
        "{}",
        String::from_utf8_lossy(&ls.stdout)
    );
}

#[test]
fn exec_codes_signals_timeout_tty_stdin() {
    let vm = httpd_vm();
    assert_eq!(vm.exec(["true"]).unwrap().status, ExitStatus::Code(0));
    assert_eq!(
        vm.exec(["sh", "-c", "exit 3"]).unwrap().status,
        ExitStatus::Code(3)
    );
    // A command that never starts ends its session cleanly every time (the shim must not
    // reset the connection before the host has read the exit frame).
    for _ in 0..10 {
        assert_eq!(
            vm.exec(["no-such-binary"]).unwrap().status,
            ExitStatus::Code(127)
        );
    }
    let missing = vm.exec(["no-such-binary"]).unwrap();
    assert_eq!(missing.status, ExitStatus::Code(127));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no-such-binary"));
    assert_eq!(
        vm.exec(["sh", "-c", "kill -9 $$"]).unwrap().status,
        ExitStatus::Signal(9)
    );

    let t = vm
        .exec_builder()
        .argv(["sleep", "1000"])
        .timeout(Duration::from_secs(1))
        .output()
        .unwrap();
    assert!(t.timed_out);
    assert_eq!(t.status, ExitStatus::Signal(9));
    assert!(t.duration < Duration::from_secs(20), "{:?}", t.duration);

    let tty = vm
        .exec_builder()
        .argv(["sh", "-c", "tty && stty size"])
        .tty(true)
        .winsize(30, 100)
        .output()
        .unwrap();
    assert_eq!(
        tty.status,
        ExitStatus::Code(0),
        "{}",
        String::from_utf8_lossy(&tty.stdout)
    );
    let out = String::from_utf8_lossy(&tty.stdout).replace('\r', "");
    assert!(
        out.starts_with("/dev/pts/") && out.ends_with("30 100\n"),
        "{out:?}"
    );

    let env = vm
        .exec_builder()
        .argv(["sh", "-c", "echo $FOO; pwd; id -u"])
        .env("FOO", "bar")
        .cwd("/tmp")
        .user("1000")
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&env.stdout), "bar\n/tmp\n1000\n");

    // 16 MiB through stdin -> cat -> stdout.
    let big = random_bytes(16 << 20, 9);
    let cat = vm
        .exec_builder()
        .argv(["cat"])
        .stdin(ExecStdin::Bytes(big.clone()))
        .output()
        .unwrap();
    assert_eq!(cat.status, ExitStatus::Code(0));
    assert_eq!(sha256(&cat.stdout), sha256(&big));

    // Streaming: write, read back, close.
    let mut child = vm
        .exec_builder()
        .argv(["cat"])
        .stdin(ExecStdin::Piped)
        .spawn()
        .unwrap();
    let mut stdin = child.stdin().unwrap();
    let mut stdout = child.stdout().unwrap();
    stdin.write_all(b"ping\n").unwrap();
    let mut buf = [0u8; 5];
    stdout.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping\n");
    drop(stdin);
    assert_eq!(child.wait().unwrap().status, ExitStatus::Code(0));
}

#[test]
fn thirty_two_concurrent_execs() {
    let vm = std::sync::Arc::new(httpd_vm());
    let handles: Vec<_> = (0..32)
        .map(|i| {
            let vm = vm.clone();
            std::thread::spawn(move || {
                let o = vm
                    .exec([
                        "sh",
                        "-c",
                        &format!("echo start-{i}; sleep 1; echo end-{i}; exit {}", i % 5),
                    ])
                    .unwrap();
                assert_eq!(
                    String::from_utf8_lossy(&o.stdout),
                    format!("start-{i}\nend-{i}\n")
                );
                assert_eq!(o.status, ExitStatus::Code(i % 5));
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

#[test]
fn workload_signal_stops_the_vm() {
    let vm = httpd_vm();
    let pid = vm.pid();
    vm.workload_signal(15).unwrap();
    assert_eq!(vm.wait().unwrap(), ExitStatus::Signal(15));
    // QEMU's process is gone (the kvm backend has none: its VM ran in this process).
    assert!(
        pid == std::process::id() || !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "QEMU still running"
    );
}

#[test]
fn cli_publish_and_exec() {
    use std::io::BufRead;
    let name = format!("agent-test-{}", std::process::id());
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let runtime = tempfile::tempdir().unwrap();
    let mut child = supermachine()
        .env("SUPERMACHINE_RUNTIME_DIR", runtime.path())
        .args([
            "boot",
            "--name",
            &name,
            "-p",
            &format!("{port}:80"),
            &image("busybox"),
            "--",
        ])
        .args(["sh", "-c", "echo up; exec httpd -f -p 80 -h /var/www"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line, "up\n");
    let exec = |args: &[&str]| {
        supermachine()
            .env("SUPERMACHINE_RUNTIME_DIR", runtime.path())
            .arg("exec")
            .args(args)
            .output()
            .unwrap()
    };
    // Wait until httpd listens (the workload may still be starting).
    let o = exec(&[
        &name,
        "--",
        "sh",
        "-c",
        "for i in $(seq 100); do netstat -ltn | grep -q ':80 ' && exit 0; sleep 0.1; done; exit 1",
    ]);
    assert_code(&o, 0);
    for _ in 0..20 {
        let (status, body) = http_get(TcpStream::connect(("127.0.0.1", port)).unwrap(), "/");
        assert!(status.contains("200"), "{status}");
        assert_eq!(body, INDEX);
    }
    let concurrent: Vec<_> = (0..8)
        .map(|_| {
            std::thread::spawn(move || {
                http_get(TcpStream::connect(("127.0.0.1", port)).unwrap(), "/")
            })
        })
        .collect();
    for h in concurrent {
        let (status, body) = h.join().unwrap();
        assert!(status.contains("200"), "{status}");
        assert_eq!(body, INDEX);
    }

    let o = exec(&[
        "-e",
        "X=1",
        "-w",
        "/tmp",
        &name,
        "--",
        "sh",
        "-c",
        "echo $X; pwd; exit 5",
    ]);
    assert_code(&o, 5);
    assert_eq!(stdout(&o), "1\n/tmp\n");
    let o = exec(&["-t", &name, "--", "tty"]);
    assert_code(&o, 0);
    let o = exec(&["no-such-vm", "--", "true"]);
    assert_code(&o, 125);
    assert!(stderr(&o).contains("no-such-vm"));

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(143));
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "published port outlived the VM"
    );
}
