//! Volumes (`-v HOST:GUEST[:ro|rw]`) on real guests: a booted VM mounts them before its
//! workload starts; VMs restored from one snapshot (baked with unbound slots) each get
//! their own directories. QEMU's virtio-9p on the qemu backend, our VMM's own 9P server
//! (vmm/src/devices/virtio/p9) on kvm; the nested kvm stage runs this file.

mod common;

use std::path::Path;

use common::*;
use supermachine::{Access, Image, VmConfig};

fn sh(vm: &supermachine::Vm, script: &str) -> (i32, String) {
    let o = vm.exec(["sh", "-c", script]).expect("exec");
    let mut out = String::from_utf8_lossy(&o.stdout).into_owned();
    out.push_str(&String::from_utf8_lossy(&o.stderr));
    (o.status.as_shell_code(), out)
}

#[test]
fn a_booted_vm_reads_and_writes_a_volume_and_cannot_write_a_read_only_one() {
    let rw = tempfile::tempdir().unwrap();
    let ro = tempfile::tempdir().unwrap();
    std::fs::write(rw.path().join("from-host"), "host wrote this\n").unwrap();
    std::fs::write(ro.path().join("keep"), "unchanged\n").unwrap();
    let out = boot(&[
        "-v",
        &format!("{}:/data", rw.path().display()),
        "-v",
        &format!("{}:/config:ro", ro.path().display()),
        &image("busybox"),
        "--",
        "sh",
        "-c",
        "cat /data/from-host; echo guest wrote this > /data/from-guest; \
         echo x > /config/keep; echo ro=$?; echo y > /config/new; echo new=$?",
    ]);
    assert_code(&out, 0);
    let text = format!("{}{}", stdout(&out), stderr(&out));
    assert!(text.contains("host wrote this"), "{text}");
    assert!(text.contains("ro=1") && text.contains("new=1"), "{text}");
    assert!(text.contains("Read-only file system"), "{text}");
    assert_eq!(
        std::fs::read_to_string(rw.path().join("from-guest")).unwrap(),
        "guest wrote this\n"
    );
    assert_eq!(
        std::fs::read_to_string(ro.path().join("keep")).unwrap(),
        "unchanged\n"
    );
    assert!(!ro.path().join("new").exists());
}

#[test]
fn bad_volumes_are_named_before_anything_boots() {
    // A usage error (exit 2) naming the directory, the path or the mode at fault.
    let usage = |args: &[&str], needle: &str| {
        let o = boot(args);
        assert_code(&o, 2);
        assert!(stderr(&o).contains(needle), "{needle}: {}", stderr(&o));
    };
    let busybox = image("busybox");
    usage(
        &["-v", "/no/such/dir:/data", &busybox, "true"],
        "/no/such/dir",
    );
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    usage(&["-v", &format!("{d}:/proc/x"), &busybox, "true"], "/proc");
    usage(
        &["-v", &format!("{d}:/data:rx"), &busybox, "true"],
        "neither ro nor rw",
    );
}

#[test]
fn clones_of_one_snapshot_each_see_only_their_own_directory() {
    let snaps = tempfile::tempdir().unwrap();
    let snap = bake_httpd(snaps.path());
    let image = Image::from_snapshot(&snap).unwrap();
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    std::fs::write(a_dir.path().join("who"), "a\n").unwrap();
    std::fs::write(b_dir.path().join("who"), "b\n").unwrap();
    let start = |d: &Path| {
        image.start(
            &VmConfig::default()
                .volume(d, "/data", Access::ReadWrite)
                .unwrap(),
        )
    };
    let a = start(a_dir.path()).unwrap();
    let b = start(b_dir.path()).unwrap();
    // The workload was started at bake; the volume appears under it after the restore.
    for (vm, me) in [(&a, "a"), (&b, "b")] {
        let (code, out) = sh(vm, &format!("cat /data/who && echo {me} > /data/written"));
        assert_eq!((code, out.as_str()), (0, format!("{me}\n").as_str()));
    }
    assert_eq!(
        std::fs::read_to_string(a_dir.path().join("written")).unwrap(),
        "a\n"
    );
    assert_eq!(
        std::fs::read_to_string(b_dir.path().join("written")).unwrap(),
        "b\n"
    );
    // A file the host adds later is seen at once (no guest-side caching of the export).
    std::fs::write(a_dir.path().join("later"), "late\n").unwrap();
    assert_eq!(sh(&a, "cat /data/later").1, "late\n");
    assert_ne!(sh(&b, "cat /data/later 2>&1").0, 0, "b saw a's directory");
    // An unbound VM has no /data at all.
    let plain = image.start(&VmConfig::default()).unwrap();
    assert_ne!(sh(&plain, "ls /data/who 2>&1").0, 0);
}

#[test]
fn a_volume_takes_ordinary_file_work_and_confines_links() {
    let snaps = tempfile::tempdir().unwrap();
    let snap = bake_httpd(snaps.path());
    let image = Image::from_snapshot(&snap).unwrap();
    let vol = tempfile::tempdir().unwrap();
    // Outside the volume: the guest must not reach it through a link or `..`.
    let outside = tempfile::tempdir().unwrap();
    let secret = outside.path().join("secret");
    std::fs::write(&secret, "host secret\n").unwrap();
    std::os::unix::fs::symlink("/", vol.path().join("to-root")).unwrap();
    std::os::unix::fs::symlink(&secret, vol.path().join("to-secret")).unwrap();
    // 256 MiB of bytes that do not compress or repeat.
    let big = random_bytes(256 << 20, 7);
    std::fs::write(vol.path().join("big"), &big).unwrap();
    let vm = image
        .start(
            &VmConfig::default()
                .volume(vol.path(), "/data", Access::ReadWrite)
                .unwrap(),
        )
        .unwrap();
    let (code, out) = sh(
        &vm,
        "set -e; cd /data; mkdir -p d/e; echo one > d/e/f; mv d/e/f d/e/g; ln d/e/g hard; \
         ln -s d/e/g soft; cat soft; ls -la /data; find /data -name g; \
         dd if=/data/big of=/data/big2 bs=1M conv=fsync 2>/dev/null; sync; stat -c %h hard",
    );
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("one\n") && out.contains("/data/d/e/g"),
        "{out}"
    );
    assert!(out.trim_end().ends_with('2'), "hard link count: {out}");
    let host = vol.path();
    assert_eq!(
        std::fs::read_to_string(host.join("d/e/g")).unwrap(),
        "one\n"
    );
    assert_eq!(
        std::fs::read_link(host.join("soft")).unwrap(),
        Path::new("d/e/g")
    );
    assert_eq!(
        sha256(&std::fs::read(host.join("big2")).unwrap()),
        sha256(&big),
        "a 256 MiB copy through the volume changed bytes"
    );
    // Links and `..` resolve in the guest's own tree, never the host's.
    let host_passwd = std::fs::read_to_string("/etc/passwd").unwrap();
    let (_, guest_passwd) = sh(&vm, "cat /data/../../etc/passwd");
    assert_ne!(guest_passwd, host_passwd);
    let (_, via_root) = sh(&vm, &format!("cat /data/to-root{} 2>&1", secret.display()));
    assert!(!via_root.contains("host secret"), "{via_root}");
    let (_, via_link) = sh(&vm, "cat /data/to-secret 2>&1");
    assert!(!via_link.contains("host secret"), "{via_link}");
}

#[test]
fn sqlite_keeps_a_database_on_a_volume() {
    let vol = tempfile::tempdir().unwrap();
    // Locks, journal files created and removed, fsync: what a database does to its files.
    let out = boot(&[
        "-v",
        &format!("{}:/db", vol.path().display()),
        &image("sqlite"),
        "--",
        "sh",
        "-c",
        "set -e; sqlite3 /db/app.db 'PRAGMA journal_mode=DELETE; CREATE TABLE t(n INTEGER, s TEXT);' >/dev/null; \
         i=0; while [ $i -lt 20 ]; do \
           sqlite3 /db/app.db \"BEGIN; INSERT INTO t VALUES($i, hex(randomblob(64))); COMMIT;\"; \
           i=$((i+1)); done; \
         sqlite3 /db/app.db 'WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c \
           WHERE x < 5000) INSERT INTO t SELECT x, hex(randomblob(100)) FROM c;'; \
         sqlite3 /db/app.db 'PRAGMA integrity_check; SELECT count(*) FROM t;'",
    ]);
    assert_code(&out, 0);
    let text = stdout(&out);
    assert!(text.contains("ok\n5020"), "{text}{}", stderr(&out));
    // The host reads the same database (written as the directory's owner).
    let db = vol.path().join("app.db");
    let host = std::process::Command::new("python3")
        .args([
            "-c",
            "import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); \
             print(c.execute('pragma integrity_check').fetchone()[0], \
             c.execute('select count(*) from t').fetchone()[0])",
        ])
        .arg(&db)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&host.stdout), "ok 5020\n");
    assert!(!vol.path().join("app.db-journal").exists());
}
