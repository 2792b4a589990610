//! Bad input: every failure names what is wrong, exits non-zero (125, docker's code for
//! its own errors), and leaves nothing half-written in the cache.

mod common;

use common::*;
use std::fs;

fn with_cache(cache: &std::path::Path) -> std::process::Command {
    let mut c = supermachine();
    c.env("SUPERMACHINE_CACHE", cache);
    c
}

#[test]
fn missing_layout_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let o = boot_with(
        with_cache(tmp.path()),
        &["oci-layout:/does/not/exist", "--", "true"],
    );
    assert_fails_with(&o, "/does/not/exist");
}

#[test]
fn unknown_tag_is_named() {
    let o = boot(&[&format!("{}:no-such-tag", image("busybox")), "--", "true"]);
    assert_code(&o, 125);
    let e = stderr(&o);
    assert!(e.contains("\"no-such-tag\"") && e.contains("latest"), "{e}");
}

#[test]
fn unsupported_reference_is_quoted() {
    // An unreachable registry (a closed local port; tests send nothing off this machine):
    // the error names the registry and the repository.
    let o = boot(&["127.0.0.1:1/nginx:1.27-alpine", "--", "true"]);
    assert_code(&o, 125);
    let e = stderr(&o);
    assert!(
        e.contains("registry 127.0.0.1:1") && e.contains("nginx"),
        "{e}"
    );
    // A malformed reference is quoted as given.
    let o = boot(&["Nginx:latest", "--", "true"]);
    assert_fails_with(&o, "\"Nginx:latest\"");
}

/// Index of the manifest's layer blobs, bottom-up.
fn layer_blobs(layout: &std::path::Path) -> Vec<std::path::PathBuf> {
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(layout.join("index.json")).unwrap()).unwrap();
    let blob = |d: &str| {
        layout
            .join("blobs/sha256")
            .join(d.trim_start_matches("sha256:"))
    };
    let man: serde_json::Value = serde_json::from_slice(
        &fs::read(blob(index["manifests"][0]["digest"].as_str().unwrap())).unwrap(),
    )
    .unwrap();
    man["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| blob(l["digest"].as_str().unwrap()))
        .collect()
}

#[test]
fn corrupted_blob_is_refused_and_not_cached() {
    let tmp = tempfile::tempdir().unwrap();
    let layout = copy_layout("layered", tmp.path());
    let top = layer_blobs(&layout).pop().unwrap(); // the uncompressed layer
    let mut bytes = fs::read(&top).unwrap();
    let mid = bytes.len() / 3;
    bytes[mid] ^= 0x55;
    fs::write(&top, bytes).unwrap();
    let cache = tmp.path().join("cache");
    let o = boot_with(
        with_cache(&cache),
        &[&format!("oci-layout:{}", layout.display()), "--", "true"],
    );
    assert_code(&o, 125);
    let e = stderr(&o);
    let digest = top.file_name().unwrap().to_string_lossy().to_string();
    assert!(e.contains(&digest) && e.contains("hashes to"), "{e}");
    let leftovers: Vec<_> = files_under(&cache.join("layers"))
        .into_iter()
        .filter(|p| p.to_string_lossy().contains(".tmp-") || !is_intact_layer(p))
        .collect();
    assert!(
        leftovers.is_empty(),
        "half-written cache entries: {leftovers:?}"
    );
    // The bad layer never made it in; the good ones below it did.
    assert_eq!(files_under(&cache.join("layers")).len(), 2);
}

fn is_intact_layer(p: &std::path::Path) -> bool {
    // A committed squashfs starts with the squashfs magic "hsqs".
    fs::read(p).map(|b| b.starts_with(b"hsqs")).unwrap_or(false)
}

#[test]
fn truncated_layer_is_refused_and_not_cached() {
    let tmp = tempfile::tempdir().unwrap();
    let layout = copy_layout("busybox", tmp.path());
    let base = layer_blobs(&layout).remove(0);
    let len = fs::metadata(&base).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(&base)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let cache = tmp.path().join("cache");
    let o = boot_with(
        with_cache(&cache),
        &[&format!("oci-layout:{}", layout.display()), "--", "true"],
    );
    assert_fails_with(&o, "truncated");
    assert!(
        files_under(&cache.join("layers")).is_empty(),
        "{:?}",
        files_under(&cache)
    );
}

#[test]
fn missing_kernel_is_named() {
    let mut c = supermachine();
    c.env("SUPERMACHINE_KERNEL", "/nonexistent/vmlinux");
    let o = boot_with(c, &[&image("busybox"), "--", "true"]);
    assert_code(&o, 125);
    let e = stderr(&o);
    assert!(
        e.contains("guest kernel not found") && e.contains("/nonexistent/vmlinux"),
        "{e}"
    );
}

#[test]
fn kernel_panic_ends_the_run_with_an_error() {
    // No usable init: the guest kernel panics. The run must end, not hang.
    let o = boot(&[
        "--kernel-arg",
        "rdinit=/nonexistent",
        &image("busybox"),
        "--",
        "true",
    ]);
    assert_fails_with(&o, "kernel panic");
}

#[test]
fn silent_guest_times_out() {
    // busybox as PID 1 runs its own init and never reports: the boot timeout ends it.
    let o = boot(&[
        "--init",
        "/bin/busybox",
        "--boot-timeout",
        "5",
        &image("busybox"),
        "--",
        "true",
    ]);
    assert_fails_with(&o, "did not start init within");
}

#[test]
fn layers_are_cached_by_diff_id_and_shared() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let o = boot_with(with_cache(&cache), &[&image("busybox"), "--", "true"]);
    assert_code(&o, 0);
    let first = files_under(&cache.join("layers"));
    assert_eq!(first.len(), 1);
    let mtime = fs::metadata(&first[0]).unwrap().modified().unwrap();
    let o = boot_with(with_cache(&cache), &[&image("layered")]);
    assert_code(&o, 0);
    // layered shares busybox's base layer: 1 + 2 new, and the shared one was not rewritten.
    assert_eq!(files_under(&cache.join("layers")).len(), 3);
    assert_eq!(fs::metadata(&first[0]).unwrap().modified().unwrap(), mtime);
}

#[test]
fn sigterm_stops_the_vm_and_leaves_no_process() {
    use std::io::{BufRead, BufReader};
    let marker = format!("sm_test_marker={}", std::process::id());
    let mut child = supermachine()
        .args([
            "boot",
            "--kernel-arg",
            &marker,
            &image("busybox"),
            "--",
            "/bin/sh",
            "-c",
            "echo ready; sleep 1000",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line, "ready\n");
    if on_kvm() {
        assert!(
            holds_kvm_vm(child.id()),
            "the VM should run in supermachine"
        );
    } else {
        assert!(
            !processes_with(&marker).is_empty(),
            "the VM's QEMU should be running"
        );
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(128 + 15));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !processes_with(&marker).is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(
        processes_with(&marker).is_empty(),
        "QEMU outlived supermachine"
    );
}

fn processes_with(needle: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() {
            if let Ok(cmd) = fs::read(e.path().join("cmdline")) {
                let cmd = String::from_utf8_lossy(&cmd);
                if cmd.contains("qemu-system") && cmd.contains(needle) {
                    out.push(pid);
                }
            }
        }
    }
    out
}

#[test]
fn oci_archive_boots_and_is_unpacked_once() {
    let tmp = tempfile::tempdir().unwrap();
    let archive = tmp.path().join("busybox.tar");
    let layout = images().join("busybox");
    let st = std::process::Command::new("tar")
        .arg("-C")
        .arg(&layout)
        .arg("-cf")
        .arg(&archive)
        .arg(".")
        .status()
        .unwrap();
    assert!(st.success());
    let cache = tmp.path().join("cache");
    let reference = format!("oci-archive:{}:latest", archive.display());
    for _ in 0..2 {
        let o = boot_with(
            with_cache(&cache),
            &[&reference, "--", "/bin/sh", "-c", "echo from-archive"],
        );
        assert_code(&o, 0);
        assert_eq!(stdout(&o), "from-archive\n");
    }
    let unpacked: Vec<_> = std::fs::read_dir(cache.join("archives"))
        .unwrap()
        .flatten()
        .collect();
    assert_eq!(unpacked.len(), 1, "the archive is unpacked once");
    // Not a tar at all: a clear error, nothing left in the cache.
    let junk = tmp.path().join("junk.tar");
    std::fs::write(&junk, b"not a tar").unwrap();
    let o = boot_with(
        with_cache(&cache),
        &[&format!("oci-archive:{}", junk.display()), "--", "true"],
    );
    assert_fails_with(&o, "junk.tar");
    assert_eq!(
        std::fs::read_dir(cache.join("archives")).unwrap().count(),
        1
    );
}
