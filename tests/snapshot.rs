//! Bake and restore on real guests: snapshots of the QEMU backend, copy-on-write restore.

mod common;

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use common::*;
use supermachine::{Error, Image, VmConfig};

const INDEX: &[u8] = b"<h1>hello from supermachine</h1>\n";

/// One baked httpd snapshot shared by the tests that only restore from it.
fn shared_snapshot() -> &'static PathBuf {
    // In a temp dir that is never dropped (left for the OS to clean), not in target/tmp:
    // with the snapshot under target/tmp, the 20 sequential restores below failed on kvm
    // in L1 twice in a row (the agent closed a guest-port stream), cause not found yet.
    static S: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &S.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let out = supermachine::pull::pull(&httpd_pull_request(dir.path(), "httpd")).expect("bake");
        assert!(!out.cached);
        let p = out.snapshot.dir.clone();
        (dir, p)
    })
    .1
}

fn get(vm: &supermachine::Vm) -> Vec<u8> {
    let stream = vm.connect(80).unwrap_or_else(|e| {
        // What the guest had listening and what its console said, for the failure report.
        let listening = vm
            .exec(["sh", "-c", "cat /proc/net/tcp /proc/net/tcp6 2>&1; ps 2>&1"])
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_else(|e| format!("(exec failed too: {e})"));
        let console = std::fs::read_to_string(vm.run_dir().join("console.log")).unwrap_or_default();
        let tail: Vec<&str> = console.lines().rev().take(30).collect();
        panic!(
            "connecting to guest port 80: {e}\n--- guest sockets and processes ---\n{listening}\n--- console tail ---\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        )
    });
    let (status, body) = http_get(stream, "/");
    assert!(status.contains("200"), "{status}");
    body
}

#[test]
fn restores_in_sequence_and_in_parallel_and_isolates_writes() {
    let image = Image::from_snapshot(shared_snapshot()).unwrap();
    for i in 0..20 {
        let vm = image.start(&VmConfig::default()).unwrap();
        assert_eq!(get(&vm), INDEX, "restore {i}");
        // Writes stay private to the VM that made them.
        let probe = vm
            .exec(["sh", "-c", "cat /tmp/mark 2>/dev/null; echo x > /tmp/mark"])
            .unwrap();
        assert_eq!(probe.stdout, b"", "restore {i} sees an earlier VM's file");
    }
    let vms: Vec<_> = (0..8)
        .map(|_| image.start(&VmConfig::default()).unwrap())
        .collect();
    vms[0].write_file("/tmp/only-here", b"0", 0o644).unwrap();
    for (i, vm) in vms.iter().enumerate() {
        assert_eq!(get(vm), INDEX, "parallel VM {i}");
        if i > 0 {
            assert_eq!(
                vm.read_file("/tmp/only-here", 10).unwrap_err().kind(),
                std::io::ErrorKind::NotFound
            );
        }
    }
}

/// A guest with two vCPUs is baked with both running (the kernel started the second one
/// itself: INIT/SIPI on kvm), and every restore has both again and serves.
#[test]
fn a_two_vcpu_snapshot_restores_with_both_cpus_and_serves() {
    let dir = tempfile::tempdir().unwrap();
    let mut req = httpd_pull_request(dir.path(), "smp");
    req.boot.vcpus = 2;
    let out = supermachine::pull::pull(&req).unwrap();
    assert_eq!(out.snapshot.meta.vcpus, 2);
    let image = Image::from_snapshot(&out.snapshot.dir).unwrap();
    let vms: Vec<_> = (0..2)
        .map(|_| image.start(&VmConfig::default()).unwrap())
        .collect();
    for (i, vm) in vms.iter().enumerate() {
        assert_eq!(get(vm), INDEX, "restore {i}");
        // Work on both CPUs at once: each of two busy loops pinned to its own CPU.
        let o = vm
            .exec([
                "sh",
                "-c",
                "nproc; grep -c ^processor /proc/cpuinfo; \
                 for c in 0 1; do taskset -c $c sh -c 'i=0; while [ $i -lt 2000 ]; do i=$((i+1)); done; echo cpu$0 on $(cut -d\" \" -f39 /proc/self/stat)' $c & done; wait",
            ])
            .unwrap();
        let text = String::from_utf8_lossy(&o.stdout).to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(&lines[..2], ["2", "2"], "restore {i}: {text}");
        let mut ran: Vec<&str> = lines[2..].to_vec();
        ran.sort();
        assert_eq!(ran, ["cpu0 on 0", "cpu1 on 1"], "restore {i}: {text}");
    }
}

#[test]
fn clones_get_fresh_entropy_and_clock() {
    let image = Image::from_snapshot(shared_snapshot()).unwrap();
    let a = image.start(&VmConfig::default()).unwrap();
    let b = image.start(&VmConfig::default()).unwrap();
    let read = |vm: &supermachine::Vm| {
        vm.exec([
            "sh",
            "-c",
            "head -c 32 /dev/urandom | od -An -tx1; date +%s",
        ])
        .unwrap()
        .stdout
    };
    let (ra, rb) = (read(&a), read(&b));
    let (ra, rb) = (
        String::from_utf8_lossy(&ra).to_string(),
        String::from_utf8_lossy(&rb).to_string(),
    );
    let rand = |s: &str| s.lines().take(2).collect::<String>();
    assert_ne!(
        rand(&ra),
        rand(&rb),
        "two clones produced the same random bytes"
    );
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    for out in [&ra, &rb] {
        let t: i64 = out.lines().last().unwrap().trim().parse().unwrap();
        assert!((t - now).abs() <= 2, "guest clock {t} vs host {now}");
    }
}

/// Where a baked snapshot keeps its state and RAM: that depends on the backend that baked
/// it (metadata.json says which), and so does where a byte of state is.
struct BakedFiles {
    state: PathBuf,
    /// A byte inside the serialized state.
    state_byte: usize,
    memory: PathBuf,
}

impl BakedFiles {
    fn of(snap: &Path) -> Self {
        let meta: serde_json::Value =
            serde_json::from_slice(&std::fs::read(snap.join("metadata.json")).unwrap()).unwrap();
        match meta["backend"].as_str() {
            // restore.snap: a 4 KiB header page, then the state (restore.snap format).
            Some("kvm") => Self {
                state: snap.join("restore.snap"),
                state_byte: 4096 + 16,
                memory: snap.join("restore.snap"),
            },
            Some("qemu") => Self {
                state: snap.join("state.bin"),
                state_byte: meta["state_size"].as_u64().unwrap() as usize / 2,
                memory: snap.join("memory.ram"),
            },
            other => panic!("baked by {other:?}"),
        }
    }
}

#[test]
fn same_inputs_are_a_cache_hit_and_damage_is_named_and_rebaked() {
    let dir = tempfile::tempdir().unwrap();
    let req = httpd_pull_request(dir.path(), "web");
    let first = supermachine::pull::pull(&req).unwrap();
    assert!(!first.cached);
    let again = supermachine::pull::pull(&req).unwrap();
    assert!(again.cached, "same inputs must not re-bake");
    let snap = first.snapshot.dir.clone();

    let expect_invalid = |snap: &Path, what: &str| match Image::from_snapshot(snap) {
        Err(Error::CacheInvalid { reason, .. }) => {
            assert!(reason.contains(what), "{what}: {reason}")
        }
        other => panic!("{what}: expected CacheInvalid, got {:?}", other.map(|_| ())),
    };
    // Each kind of damage is found on open. They are made to copies of the intact snapshot
    // (a snapshot names nothing by its own path), so one re-bake below shows the repair
    // instead of one bake per kind (the slowest step, most of all on kvm in L1).
    let damaged = |kind: &str| {
        let copy = dir.path().join(format!("damaged-{kind}"));
        copy_tree(&snap, &copy);
        copy
    };

    // Truncate the RAM (QEMU: memory.ram; kvm: restore.snap, which holds it).
    let copy = damaged("truncated");
    std::fs::OpenOptions::new()
        .write(true)
        .open(BakedFiles::of(&copy).memory)
        .unwrap()
        .set_len(4096)
        .unwrap();
    expect_invalid(&copy, "truncated");

    // Bump the format version.
    let copy = damaged("version");
    let meta_path = copy.join("metadata.json");
    let mut meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&meta_path).unwrap()).unwrap();
    meta["format_version"] = serde_json::json!(999);
    std::fs::write(&meta_path, serde_json::to_vec(&meta).unwrap()).unwrap();
    expect_invalid(&copy, "format version 999");

    // Corrupt the state (QEMU: its migration stream; kvm: restore.snap's state section):
    // named on open, and pull re-bakes it into a snapshot that serves.
    let files = BakedFiles::of(&snap);
    let mut bytes = std::fs::read(&files.state).unwrap();
    bytes[files.state_byte] ^= 0xff;
    std::fs::write(&files.state, bytes).unwrap();
    expect_invalid(&snap, "corrupt");
    let o = supermachine::pull::pull(&req).unwrap();
    assert!(!o.cached, "a damaged snapshot must be re-baked");
    assert_eq!(
        get(&Image::from_snapshot(&snap)
            .unwrap()
            .start(&VmConfig::default())
            .unwrap()),
        INDEX
    );
}

/// Copies a directory tree file by file.
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), dest).unwrap();
        }
    }
}

#[test]
fn deleted_layer_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let mut req = httpd_pull_request(tmp.path(), "own-cache");
    req.boot.cache = supermachine_bake_cache(&cache);
    let out = supermachine::pull::pull(&req).unwrap();
    let layer = out.snapshot.meta.layers[0].path.clone();
    std::fs::remove_file(&layer).unwrap();
    match Image::from_snapshot(&out.snapshot.dir) {
        Err(Error::CacheInvalid { reason, .. }) => assert!(reason.contains("layer"), "{reason}"),
        other => panic!("expected CacheInvalid, got {:?}", other.map(|_| ())),
    }
    // pull re-converts the layer and re-bakes.
    let again = supermachine::pull::pull(&req).unwrap();
    assert!(!again.cached);
    assert!(layer.is_file());
}

fn supermachine_bake_cache(p: &Path) -> supermachine::Cache {
    supermachine::Cache::new(p)
}

#[test]
fn bake_timeout_names_the_port_and_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let mut req = httpd_pull_request(dir.path(), "never");
    req.port = 8099;
    req.ready_timeout = Duration::from_secs(3);
    match supermachine::pull::pull(&req) {
        Err(Error::Bake(msg)) => assert!(msg.contains("8099") && msg.contains("bake.log"), "{msg}"),
        other => panic!("expected Error::Bake, got {:?}", other.map(|_| ())),
    }
    assert!(
        !dir.path().join("never").exists(),
        "a failed bake left a snapshot behind"
    );
}

#[test]
fn killed_vm_does_not_disturb_others() {
    let image = Image::from_snapshot(shared_snapshot()).unwrap();
    let a = image.start(&VmConfig::default()).unwrap();
    let b = image.start(&VmConfig::default()).unwrap();
    let pid = a.pid();
    if pid == std::process::id() {
        // The kvm backend runs the VM in this process: stop it abruptly instead.
        a.kill();
    } else {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
    }
    assert_eq!(get(&b), INDEX);
    assert!(a.connect(80).is_err());
    let _ = TcpStream::connect("127.0.0.1:1");
}

#[test]
fn stop_is_graceful_and_config_must_match_the_snapshot() {
    let image = Image::from_snapshot(shared_snapshot()).unwrap();
    let vm = image.start(&VmConfig::default()).unwrap();
    let qemu = vm.pid();
    assert_eq!(
        vm.stop(Duration::from_secs(10)).unwrap(),
        Some(supermachine::ExitStatus::Signal(15))
    );
    // QEMU's process is gone (the kvm backend has none: its VM ran in this process).
    assert!(
        qemu == std::process::id()
            || !Path::new(&format!("/proc/{qemu}/cmdline")).exists()
            || std::fs::read(format!("/proc/{qemu}/cmdline"))
                .unwrap()
                .is_empty()
    );

    let mut cfg = VmConfig::default();
    cfg.memory_mib = Some(512);
    match image.start(&cfg) {
        Err(Error::Image(e)) => assert!(e.to_string().contains("256 MiB"), "{e}"),
        other => panic!("expected Error::Image, got {:?}", other.map(|_| ())),
    }
}

#[test]
fn pull_policies() {
    let tmp = tempfile::tempdir().unwrap();
    let layout = copy_layout("busybox", tmp.path());
    let reference = format!("oci-layout:{}", layout.display());
    let snaps = tmp.path().join("snaps");
    let builder = || {
        supermachine::Image::builder(&reference)
            .name("policy")
            .cmd(["httpd", "-f", "-p", "80", "-h", "/var/www"])
            .snapshots_dir(&snaps)
    };
    use supermachine::PullPolicy::*;
    // Never with nothing baked: CacheMiss.
    assert!(matches!(
        builder().pull_policy(Never).build(),
        Err(Error::CacheMiss { .. })
    ));
    // Missing bakes once...
    let image = builder().pull_policy(Missing).build().unwrap();
    assert_eq!(get(&image.start(&VmConfig::default()).unwrap()), INDEX);
    // ...and then uses the snapshot without reading the source at all.
    std::fs::rename(&layout, tmp.path().join("moved")).unwrap();
    builder().pull_policy(Missing).build().unwrap();
    builder().pull_policy(Never).build().unwrap();
    // Always re-reads the source: gone, it fails naming it.
    match builder().pull_policy(Always).build() {
        Err(Error::Image(e)) => assert!(e.to_string().contains("busybox"), "{e}"),
        other => panic!("expected an image error, got {:?}", other.map(|_| ())),
    }
    std::fs::rename(tmp.path().join("moved"), &layout).unwrap();
    // Never with a broken snapshot: CacheInvalid.
    std::fs::write(BakedFiles::of(&snaps.join("policy")).state, b"broken").unwrap();
    assert!(matches!(
        builder().pull_policy(Never).build(),
        Err(Error::CacheInvalid { .. })
    ));
    // Missing re-bakes a broken one.
    builder().pull_policy(Missing).build().unwrap();
}
