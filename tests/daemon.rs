//! `run -d`, `ps`, `exec`, `logs`, `stop` on real daemons.

mod common;

use std::net::TcpStream;

use common::*;

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
    let o = sm(&[
        "run",
        "-d",
        "--name",
        name,
        "-p",
        &format!("{port}:80"),
        &image("busybox"),
        "--",
        "httpd",
        "-f",
        "-p",
        "80",
        "-h",
        "/var/www",
    ]);
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
        line.contains(&format!("127.0.0.1:{port}->80/tcp")),
        "{line}"
    );

    let o = sm(&["exec", name, "--", "sh", "-c", "echo inside; exit 4"]);
    assert_code(&o, 4);
    assert_eq!(stdout(&o), "inside\n");

    let o = sm(&["logs", name]);
    assert_code(&o, 0);
    assert!(
        stdout(&o).contains(&format!("{name} serving http://127.0.0.1:{port}")),
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
