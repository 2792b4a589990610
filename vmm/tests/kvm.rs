//! The kvm backend on this host's /dev/kvm, end to end through the `supermachine-vmm`
//! binary (one VM per process, as the worker runs it):
//! - tiny hand-made guests check the vCPU loop, port I/O, the serial port, the i8042
//!   reset (clean exit) and a triple fault (an error, never a hang);
//! - the pvm-test kernel boots to the kernel's own root mount (squashfs on virtio-blk) and
//!   answers on virtio-vsock; a snapshot taken mid-boot is restored in a new process and
//!   the boot continues to the same line; `bench-restore` measures restoring it.
//!
//! On a PVM /dev/kvm no unmodified kernel reaches userspace (KERNEL-NOTES.md), which is
//! why the kernel here is the test variant and the check ends at the root mount.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use supermachine_vmm::testing::pvm_test_kernel;

const VMM: &str = env!("CARGO_BIN_EXE_supermachine-vmm");
/// Parameters the pvm-test kernel needs on a PVM host (kernel-config/pvm-test/cmdline).
const PVM_PARAMS: &str = include_str!("../../kernel-config/pvm-test/cmdline");
const ROOT_MOUNTED: &str = "VFS: Mounted root (squashfs filesystem) readonly on device 254:0.";
const SNAPSHOT_AT: &str = "x86/fpu: x87 FPU will use FXSAVE";
/// Run to the root mount, then connect to guest vsock port 9999 (nobody listens: RST).
const UNTIL_ROOT_MOUNTED_THEN_PROBE: [&str; 6] = [
    "--until",
    ROOT_MOUNTED,
    "--vsock-probe",
    "9999",
    "--timeout",
    "400",
];

fn require_kvm() {
    assert!(
        Path::new("/dev/kvm").exists(),
        "these tests need /dev/kvm (hardware virtualization or PVM)"
    );
}

fn run(args: &[&str]) -> Output {
    Command::new(VMM)
        .args(args)
        .output()
        .expect("running supermachine-vmm")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn tiny_kernel(dir: &Path, name: &str, code: &[u8]) -> PathBuf {
    supermachine_vmm::testing::tiny_kernel(dir, name, code).unwrap()
}

/// Boots a tiny guest with a little memory and a minute to finish.
fn boot_tiny(kernel: &Path) -> Output {
    run(&[
        "boot",
        "--kernel",
        kernel.to_str().unwrap(),
        "--memory",
        "32",
        "--timeout",
        "60",
    ])
}

#[test]
fn tiny_guests_print_reset_and_triple_fault() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    // "hi\n" on COM1, then 0xfe to the i8042 command port (reset), then hlt.
    let hello = tiny_kernel(
        dir.path(),
        "hello",
        &[
            0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
            0xb0, b'h', 0xee, // mov al, 'h'; out dx, al
            0xb0, b'i', 0xee, // 'i'
            0xb0, b'\n', 0xee, // '\n'
            0xb0, 0xfe, 0xe6, 0x64, // mov al, 0xfe; out 0x64, al
            0xf4, // hlt
        ],
    );
    let o = boot_tiny(&hello);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert_eq!(text(&o.stdout), "hi\n");
    assert!(
        text(&o.stderr).contains("the guest reset"),
        "{}",
        text(&o.stderr)
    );

    // ud2 with no usable IDT: #UD -> #DF -> triple fault. The VM ends with an error.
    let crash = tiny_kernel(dir.path(), "crash", &[0x0f, 0x0b]);
    let t = Instant::now();
    let o = boot_tiny(&crash);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o.stderr));
    assert!(
        t.elapsed() < Duration::from_secs(50),
        "it must end, not time out"
    );
    assert!(
        text(&o.stderr).contains("TripleFault") || text(&o.stderr).contains("Failed"),
        "{}",
        text(&o.stderr)
    );

    // Not an ELF: a clear error naming the file.
    let junk = dir.path().join("junk");
    std::fs::write(&junk, b"not a kernel").unwrap();
    let o = run(&["boot", "--kernel", junk.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o.stderr).contains(junk.to_str().unwrap()),
        "{}",
        text(&o.stderr)
    );
}

/// A squashfs root filesystem (what the kernel mounts before it would run /sbin/init).
fn root_image(dir: &Path) -> PathBuf {
    let root = dir.join("rootfs");
    std::fs::create_dir_all(root.join("sbin")).unwrap();
    std::fs::create_dir_all(root.join("dev")).unwrap();
    std::fs::write(root.join("sbin/init"), b"#!/bin/sh\n").unwrap();
    let img = dir.join("root.sqfs");
    let st = Command::new("mksquashfs")
        .arg(&root)
        .arg(&img)
        .args(["-noappend", "-quiet", "-all-root"])
        .stdout(Stdio::null())
        .status()
        .expect("mksquashfs (squashfs-tools)");
    assert!(st.success());
    img
}

#[test]
fn kernel_boots_to_root_mount_and_a_mid_boot_snapshot_restores() {
    require_kvm();
    let kernel = pvm_test_kernel();
    let dir = tempfile::tempdir().unwrap();
    let img = root_image(dir.path());
    let snap = dir.path().join("restore.snap");
    let cmdline = format!(
        "console=ttyS0 reboot=k panic=-1 root=/dev/vda ro rootfstype=squashfs {}",
        PVM_PARAMS.trim()
    );
    let a_sock = dir.path().join("a.sock");
    let mut a = Command::new(VMM)
        .args([
            "boot",
            "--kernel",
            kernel.to_str().unwrap(),
            "--memory",
            "128",
        ])
        .args(["--cmdline", &cmdline])
        .args(["--blk", &format!("{}=rootdisk", img.display())])
        .args(["--vsock-cid", "3", "--vsock-uds", a_sock.to_str().unwrap()])
        .args([
            "--snapshot-at",
            SNAPSHOT_AT,
            "--snapshot-to",
            snap.to_str().unwrap(),
        ])
        .args(UNTIL_ROOT_MOUNTED_THEN_PROBE)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for the snapshot (the booting VM goes on), then restore it in a new process.
    let stderr = BufReader::new(a.stderr.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut a_err = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(200);
    while !a_err
        .iter()
        .any(|l: &String| l.contains("supermachine-vmm: snapshot"))
    {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => a_err.push(l),
            Err(_) => panic!("no snapshot was taken: {a_err:#?}"),
        }
    }
    let b_sock = dir.path().join("b.sock");
    let b = Command::new(VMM)
        .args(["restore", "--snapshot", snap.to_str().unwrap()])
        .args(["--vsock-uds", b_sock.to_str().unwrap(), "--prepared"])
        .args(UNTIL_ROOT_MOUNTED_THEN_PROBE)
        .output()
        .unwrap();
    let a_out = a.wait_with_output().unwrap();
    a_err.extend(rx.try_iter());
    let (a_stdout, a_stderr) = (text(&a_out.stdout), a_err.join("\n"));
    let (b_stdout, b_stderr) = (text(&b.stdout), text(&b.stderr));

    // The booted VM: virtio-blk found its disk, the kernel mounted it, vsock answered.
    assert_eq!(a_out.status.code(), Some(0), "{a_stderr}\n{a_stdout}");
    assert!(a_stdout.contains("Linux version"), "{a_stdout}");
    assert!(a_stdout.contains("[vda]"), "{a_stdout}");
    assert!(a_stdout.contains(ROOT_MOUNTED), "{a_stdout}");
    assert!(
        a_stderr.contains("vsock port 9999: refused by the guest"),
        "{a_stderr}"
    );

    // The restored VM went on from the snapshot: no early boot, the same root mount line,
    // and its vsock (reset on restore) works on its own socket.
    assert_eq!(b.status.code(), Some(0), "{b_stderr}\n{b_stdout}");
    assert!(
        !b_stdout.contains("Linux version"),
        "restored, not rebooted: {b_stdout}"
    );
    assert!(b_stdout.contains(ROOT_MOUNTED), "{b_stdout}");
    assert!(b_stderr.contains("restored"), "{b_stderr}");
    assert!(
        b_stderr.contains("vsock port 9999: refused by the guest"),
        "{b_stderr}"
    );

    // Restore mechanics, measured (numbers go to docs/BENCHMARKS.md, not asserted).
    let o = run(&[
        "bench-restore",
        "--snapshot",
        snap.to_str().unwrap(),
        "-n",
        "5",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let json = text(&o.stdout);
    assert!(
        json.contains("\"backend\":\"kvm\"") && json.contains("\"p50_ms\":"),
        "{json}"
    );

    // A damaged snapshot is refused with the reason, not restored.
    let bad = dir.path().join("bad.snap");
    std::fs::copy(&snap, &bad).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&bad).unwrap();
    f.set_len(4096 * 3).unwrap();
    let o = run(&[
        "restore",
        "--snapshot",
        bad.to_str().unwrap(),
        "--timeout",
        "5",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o.stderr).contains("inconsistent header"),
        "{}",
        text(&o.stderr)
    );
}

/// More than one vCPU: the MP table announces them and the IOAPIC (there is no ACPI).
/// (Bringing the second vCPU up needs its real-mode trampoline, which a PVM /dev/kvm does
/// not run; that part is for hardware virtualization.)
#[test]
fn the_mp_table_announces_every_vcpu() {
    require_kvm();
    let kernel = pvm_test_kernel();
    let cmdline = format!("console=ttyS0 reboot=k panic=-1 {}", PVM_PARAMS.trim());
    let o = run(&[
        "boot",
        "--kernel",
        kernel.to_str().unwrap(),
        "--vcpus",
        "3",
        "--cmdline",
        &cmdline,
        "--until",
        "smpboot: Allowing 3 CPUs",
        "--timeout",
        "120",
    ]);
    let out = text(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{}\n{out}", text(&o.stderr));
    assert!(out.contains("IOAPIC[0]: apic_id 4"), "{out}");
}
