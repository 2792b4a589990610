//! The kvm backend's control channel (ttyS1 <-> the host's `ControlChannel`) with real
//! vCPUs running hand-assembled guests, on any /dev/kvm (hardware virtualization or PVM):
//! bytes the host writes reach the guest through the 64-byte UART FIFO, whole and in
//! order; bytes the guest writes reach the host; a restored VM's new channel works the same
//! (the host's first message to a restored guest goes this way); and a guest flooding ttyS1
//! while the host reads nothing cannot keep `kill` from stopping the VM.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use supermachine_backend::kvm::KvmBackend;
use supermachine_backend::{Backend, BootSpec, Machine, MachineExit};
use supermachine_vmm::testing::tiny_kernel;

/// Echo ttyS1 -> ttyS0: poll COM2's line status, read its receive buffer, write the byte
/// to COM1 (the console file), forever.
const ECHO: [u8; 21] = [
    0x66, 0xba, 0xfd, 0x02, // 0: mov dx, 0x2fd (COM2 LSR)
    0xec, // 4: in al, dx
    0xa8, 0x01, // test al, 1 (data ready)
    0x74, 0xfb, // jz 4
    0x66, 0xba, 0xf8, 0x02, // mov dx, 0x2f8 (COM2 RBR)
    0xec, // in al, dx
    0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8 (COM1 THR)
    0xee, // out dx, al
    0xeb, 0xeb, // jmp 0
];

fn spec(dir: &Path, kernel: PathBuf) -> BootSpec {
    let initramfs = dir.join("initramfs");
    std::fs::write(&initramfs, b"unused by these guests").unwrap();
    BootSpec {
        kernel,
        initramfs,
        extra_cmdline: Vec::new(),
        memory_mib: 32,
        vcpus: 1,
        disks: Vec::new(),
        run_dir: dir.to_path_buf(),
        agent_port: None,
        memory_file: None,
        volumes: Vec::new(),
    }
}

/// Kills `machine` on another thread and fails if that takes longer than `limit`.
fn kill_within(mut machine: Box<dyn Machine>, limit: Duration) {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        machine.kill().unwrap();
        let _ = tx.send(machine.wait_timeout(Duration::ZERO).unwrap());
    });
    match rx.recv_timeout(limit) {
        Ok(exit) => assert!(matches!(exit, Some(MachineExit::MonitorDied { .. }))),
        Err(_) => panic!("kill did not return within {limit:?}"),
    }
}

/// Waits until `path` holds `want` (failing on anything else).
fn wait_for_file(path: &Path, want: &[u8], timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let got = std::fs::read(path).unwrap_or_default();
        if got.len() >= want.len() {
            assert!(
                got == want,
                "the guest did not see the host's bytes whole and in order"
            );
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the guest echoed {} of {} bytes",
            got.len(),
            want.len()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn host_input_reaches_the_guest_through_the_uart_fifo_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = tiny_kernel(dir.path(), "echo", &ECHO).unwrap();
    let mut machine = KvmBackend::new().boot(&spec(dir.path(), kernel)).unwrap();
    let mut channel = machine.take_channel().unwrap();
    // Far more than the FIFO holds, so the input must wait for the guest to drain it.
    let sent: Vec<u8> = (0..3000u32).map(|i| b'!' + (i * 7 % 90) as u8).collect();
    channel.write_all(&sent).unwrap();
    wait_for_file(machine.console_log(), &sent, Duration::from_secs(120));
    kill_within(machine, Duration::from_secs(10));
}

#[test]
fn a_restored_vm_takes_host_input_on_its_new_channel() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = tiny_kernel(dir.path(), "echo", &ECHO).unwrap();
    let run1 = dir.path().join("run1");
    std::fs::create_dir(&run1).unwrap();
    let backend = KvmBackend::new();
    let mut spec = spec(&run1, kernel);
    let mut machine = backend.boot(&spec).unwrap();
    let mut channel = machine.take_channel().unwrap();
    channel.write_all(b"before the snapshot;").unwrap();
    wait_for_file(
        machine.console_log(),
        b"before the snapshot;",
        Duration::from_secs(60),
    );
    let snap = dir.path().join("snapshot");
    std::fs::create_dir(&snap).unwrap();
    machine.snapshot(&snap).unwrap();
    kill_within(machine, Duration::from_secs(10));

    let run2 = dir.path().join("run2");
    std::fs::create_dir(&run2).unwrap();
    spec.run_dir = run2;
    let (mut restored, _) = backend
        .prepare_restore(&spec, &snap)
        .unwrap()
        .resume()
        .unwrap();
    let mut channel = restored.take_channel().unwrap();
    let after: Vec<u8> = (0..500u32).map(|i| b'a' + (i % 26) as u8).collect();
    channel.write_all(&after).unwrap();
    // The restored guest's console is a new file: it holds only what came after.
    wait_for_file(restored.console_log(), &after, Duration::from_secs(60));
    kill_within(restored, Duration::from_secs(10));
}

#[test]
fn guest_output_reaches_the_host_and_a_flooding_guest_still_dies_on_kill() {
    // 'x' to COM2's transmit register, forever.
    let flood = [
        0x66, 0xba, 0xf8, 0x02, // mov dx, 0x2f8
        0xb0, b'x', // mov al, 'x'
        0xee, // 6: out dx, al
        0xeb, 0xfd, // jmp 6
    ];
    let dir = tempfile::tempdir().unwrap();
    let kernel = tiny_kernel(dir.path(), "flood", &flood).unwrap();
    let mut machine = KvmBackend::new().boot(&spec(dir.path(), kernel)).unwrap();
    let mut channel = machine.take_channel().unwrap();
    let mut first = vec![0u8; 4096];
    channel.read_exact(&mut first).unwrap();
    assert!(first.iter().all(|&b| b == b'x'));
    // Stop reading: the socket fills and the vCPU blocks writing ttyS1.
    std::thread::sleep(Duration::from_secs(2));
    kill_within(machine, Duration::from_secs(10));
}

#[test]
fn when_the_guest_ends_the_host_reads_its_last_bytes_then_end_of_file() {
    // "bye" to COM2, then a reset through the i8042 (the VM's clean exit).
    let bye = [
        0x66, 0xba, 0xf8, 0x02, // mov dx, 0x2f8
        0xb0, b'b', 0xee, // 'b'
        0xb0, b'y', 0xee, // 'y'
        0xb0, b'e', 0xee, // 'e'
        0xb0, 0xfe, 0xe6, 0x64, // mov al, 0xfe; out 0x64, al
        0xf4, // hlt
    ];
    let dir = tempfile::tempdir().unwrap();
    let kernel = tiny_kernel(dir.path(), "bye", &bye).unwrap();
    let mut machine = KvmBackend::new().boot(&spec(dir.path(), kernel)).unwrap();
    let mut channel = machine.take_channel().unwrap();
    assert_eq!(
        machine.wait_timeout(Duration::from_secs(60)).unwrap(),
        Some(MachineExit::GuestStopped)
    );
    // The Vm above this trait learns of a dead guest from this end-of-file.
    channel
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut got = Vec::new();
    channel.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"bye");
}
