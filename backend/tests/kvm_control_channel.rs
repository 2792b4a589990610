//! The kvm backend's control channel (ttyS1 <-> the host's `ControlChannel`) with real
//! vCPUs running hand-assembled guests, on any /dev/kvm (hardware virtualization or PVM):
//! bytes the host writes reach the guest through the 64-byte UART FIFO, whole and in
//! order; bytes the guest writes reach the host; and a guest flooding ttyS1 while the host
//! reads nothing cannot keep `kill` from stopping the VM.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use supermachine_backend::kvm::KvmBackend;
use supermachine_backend::{Backend, BootSpec, Machine, MachineExit};
use supermachine_vmm::testing::tiny_kernel;

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

#[test]
fn host_input_reaches_the_guest_through_the_uart_fifo_in_order() {
    // Echo ttyS1 -> ttyS0: poll COM2's line status, read its receive buffer, write the
    // byte to COM1 (the console file), forever.
    let echo = [
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
    let dir = tempfile::tempdir().unwrap();
    let kernel = tiny_kernel(dir.path(), "echo", &echo).unwrap();
    let mut machine = KvmBackend::new().boot(&spec(dir.path(), kernel)).unwrap();
    let mut channel = machine.take_channel().unwrap();
    // Far more than the FIFO holds, so the input must wait for the guest to drain it.
    let sent: Vec<u8> = (0..3000u32).map(|i| b'!' + (i * 7 % 90) as u8).collect();
    channel.write_all(&sent).unwrap();
    let console = machine.console_log().to_path_buf();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let got = std::fs::read(&console).unwrap_or_default();
        if got.len() >= sent.len() {
            assert_eq!(
                got, sent,
                "the guest saw the host's bytes whole and in order"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the guest echoed {} of {} bytes",
            got.len(),
            sent.len()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    kill_within(machine, Duration::from_secs(10));
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
