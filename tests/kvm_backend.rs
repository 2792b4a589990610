//! The kvm backend (our own VMM) behind the same `Backend` trait, worker pieces and CLI as
//! QEMU.
//!
//! On a host whose /dev/kvm has hardware virtualization the CLI test boots the busybox
//! image end to end with `--backend kvm`. On a PVM /dev/kvm (this project's build
//! machines) no unmodified kernel reaches userspace (KERNEL-NOTES.md), so there:
//! - the CLI test shows `--backend kvm` boots the production kernel in our VMM and reports
//!   how the VM ended, and `--backend auto` says it picked qemu and why;
//! - the trait test boots the pvm-test kernel with the product's own initramfs (our init,
//!   our shim, the image's run config) and the image's layers as disks, snapshots it
//!   mid-boot through `Machine::snapshot`, restores it through `prepare_restore` +
//!   `resume` into a new run directory, and follows it to `Run /init` and the panic that
//!   our init's first system call causes under PVM — an exit the backend reports, never a
//!   hang.

mod common;

use std::io::Read;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use supermachine_backend::kvm::KvmBackend;
use supermachine_backend::{AgentEndpoint, Backend, BackendKind, BootSpec, Disk, MachineExit};

fn hardware_virtualization() -> bool {
    supermachine_backend::accel::hardware_virtualization()
}

#[test]
fn backend_flag_auto_says_what_it_picked_and_kvm_boots_in_our_vmm() {
    let o = boot(&[
        "--backend",
        "auto",
        &image("busybox"),
        "--",
        "echo",
        "hello",
    ]);
    let err = stderr(&o);
    if hardware_virtualization() {
        assert!(
            err.contains("supermachine: backend kvm (supermachine-vmm) [auto: /dev/kvm has hardware virtualization]"),
            "{err}"
        );
    } else {
        assert!(
            err.contains("supermachine: backend qemu (tcg) [auto: /dev/kvm has no hardware virtualization (VMX/SVM)]"),
            "{err}"
        );
    }
    assert_code(&o, 0);
    assert_eq!(stdout(&o).trim(), "hello");

    let o = boot(&["--backend", "kvm", &image("busybox"), "--", "echo", "hello"]);
    let err = stderr(&o);
    assert!(
        err.contains("supermachine: backend kvm (supermachine-vmm) [--backend kvm"),
        "{err}"
    );
    if hardware_virtualization() {
        assert_code(&o, 0);
        assert_eq!(stdout(&o).trim(), "hello");
    } else {
        // The production kernel runs in our VMM until KVM's instruction emulator gives up
        // (the int3 self-test, KERNEL-NOTES.md); the error says how the VM ended.
        assert!(err.contains("may not reach userspace"), "{err}");
        assert_fails_with(&o, "the VM ended: KVM: vCPU 0: KVM_EXIT_INTERNAL_ERROR");
    }

    let o = boot(&["--backend", "vmx", &image("busybox")]);
    assert_code(&o, 2);
    assert!(
        stderr(&o).contains("unknown backend \"vmx\""),
        "{}",
        stderr(&o)
    );
}

fn console_has(path: &Path, text: &str) -> bool {
    std::fs::read(path)
        .map(|b| b.windows(text.len()).any(|w| w == text.as_bytes()))
        .unwrap_or(false)
}

fn wait_for_console(path: &Path, text: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while !console_has(path, text) {
        assert!(
            Instant::now() < deadline,
            "console never printed {text:?} within {timeout:?}:\n{}",
            supermachine_backend::tail_of(path, 3000)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn kvm_backend_boots_the_product_initramfs_snapshots_mid_boot_and_restores() {
    if hardware_virtualization() {
        // There the CLI test above runs the whole product on this backend.
        eprintln!("skipped: this host runs unmodified guests on the kvm backend");
        return;
    }
    assert!(
        Path::new("/dev/kvm").exists(),
        "/dev/kvm is needed for the kvm backend"
    );
    let kernel = supermachine_vmm::testing::pvm_test_kernel();
    let (_, init) = guest();
    let shim = init.with_file_name("supermachine-shim");
    let cache = supermachine::Cache::new(supermachine::Cache::default_root());
    let prepared = supermachine_bake::prepare(
        &supermachine::ImageRef::parse(&image("busybox")).unwrap(),
        &Default::default(),
        &cache,
        &Default::default(),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let initramfs = dir.path().join("initramfs.cpio");
    supermachine_bake::initramfs::write(
        std::fs::File::create(&initramfs).unwrap(),
        &std::fs::read(init).unwrap(),
        Some(&std::fs::read(&shim).unwrap()),
        &prepared.run_config,
    )
    .unwrap();
    let pvm_params =
        std::fs::read_to_string(repo_root().join("kernel-config/pvm-test/cmdline")).unwrap();
    let run1 = dir.path().join("run1");
    std::fs::create_dir(&run1).unwrap();
    let mut spec = BootSpec {
        kernel,
        initramfs,
        // `quiet` is in the base command line; the test follows the boot on the console.
        extra_cmdline: pvm_params
            .split_whitespace()
            .map(String::from)
            .chain(["loglevel=7".to_string()])
            .collect(),
        memory_mib: 128,
        vcpus: 1,
        disks: prepared
            .run_config
            .layers
            .iter()
            .zip(&prepared.layers)
            .map(|(m, (path, _))| Disk {
                path: path.clone(),
                serial: m.serial.clone(),
                read_only: true,
            })
            .collect(),
        run_dir: run1.clone(),
        agent_port: Some(supermachine_protocol::agent::AGENT_PORT),
        memory_file: None,
        volumes: Vec::new(),
    };

    let backend = KvmBackend::new();
    let mut machine = backend.boot(&spec).unwrap();
    assert_eq!(machine.kind(), BackendKind::Kvm);
    assert_eq!(
        machine.agent_endpoint(),
        Some(AgentEndpoint::Vsock {
            uds: run1.join("vsock.sock"),
            port: u32::from(supermachine_protocol::agent::AGENT_PORT),
        })
    );
    assert!(run1.join("vsock.sock").exists(), "vsock socket bound");
    assert!(machine.take_channel().is_some());
    let console1 = machine.console_log().to_path_buf();
    // Mid-boot: the UARTs are registered (ttyS1 is the control channel), the initramfs
    // not yet unpacked.
    wait_for_console(
        &console1,
        "ttyS1 at I/O 0x2f8 (irq = 3",
        Duration::from_secs(300),
    );
    let snapshot_dir = dir.path().join("snapshot");
    std::fs::create_dir(&snapshot_dir).unwrap();
    assert!(backend.bake_memory_file(&snapshot_dir).is_none());
    let record = machine.snapshot(&snapshot_dir).unwrap();
    let snap = snapshot_dir.join(supermachine_backend::kvm::SNAPSHOT_FILE);
    machine.kill().unwrap();
    assert!(matches!(
        machine.wait_timeout(Duration::from_secs(1)).unwrap(),
        Some(MachineExit::MonitorDied { .. })
    ));
    assert!(
        !console_has(&console1, "Run /init"),
        "snapshot taken before init ran"
    );
    assert!(std::fs::metadata(&snap).unwrap().len() > 4096);
    assert_eq!(record.state_size, std::fs::metadata(&snap).unwrap().len());
    assert_eq!(record.memory_size, 128 << 20);
    backend
        .verify_snapshot(&snapshot_dir, &record, 128)
        .expect("the snapshot it just wrote verifies");

    // Restore into a new run directory: its own console, vsock socket and channel.
    let run2 = dir.path().join("run2");
    std::fs::create_dir(&run2).unwrap();
    spec.run_dir = run2.clone();
    let pending = backend.prepare_restore(&spec, &snapshot_dir).unwrap();
    assert_eq!(pending.monitor_pid(), std::process::id(), "in this process");
    let (mut restored, timings) = pending.resume().unwrap();
    assert!(timings.load_and_resume < Duration::from_secs(5));
    let mut channel = restored.take_channel().unwrap();
    let console2 = restored.console_log().to_path_buf();
    assert_eq!(console2, run2.join("console.log"));
    assert!(run2.join("vsock.sock").exists());
    let exit = restored.wait_timeout(Duration::from_secs(400)).unwrap();
    let text = supermachine_backend::tail_of(&console2, 1 << 20);
    assert!(!text.contains("Linux version"), "restored, not rebooted");
    // The kernel unpacked the product's initramfs and started our init from it...
    assert!(text.contains("Run /init as init process"), "{text}");
    // ...whose first system call faults under PVM: the guest panics, the backend says so.
    assert!(
        text.contains("Kernel panic - not syncing: Attempted to kill init"),
        "{text}"
    );
    assert_eq!(
        exit,
        Some(MachineExit::MonitorDied {
            detail: "guest kernel panic".into()
        })
    );
    // The VM is gone, and so is the VMM's end of the control channel.
    channel
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut rest = Vec::new();
    assert_eq!(channel.read_to_end(&mut rest).unwrap(), 0);
}
