//! `cargo bench -p supermachine-backend --bench kvm_restore [-- N]`: restores through the
//! kvm backend's `Backend` trait — the path the worker takes — and times, per restore:
//! - `resume`: `PendingRestore::resume` (the VM was prepared ahead, as a waiting worker
//!   has it): snapshot opened and mapped, state set, vCPU running, control input attached;
//! - `first byte`: from calling `resume` until the restored guest answers a byte sent on
//!   its new control channel (host → ttyS1 → guest → ttyS1 → host), the way the host's
//!   first message to a restored guest travels.
//!
//! The guest is a hand-assembled loop echoing ttyS1 back to itself, snapshotted while it
//! polls, so what is measured is the restore machinery and the channel, not a workload.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use supermachine_backend::kvm::KvmBackend;
use supermachine_backend::{Backend, BootSpec};
use supermachine_vmm::testing::tiny_kernel;

/// Poll COM2's line status; read its receive buffer; write the byte back to COM2; repeat.
const ECHO: [u8; 21] = [
    0x66, 0xba, 0xfd, 0x02, // 0: mov dx, 0x2fd
    0xec, // 4: in al, dx
    0xa8, 0x01, // test al, 1
    0x74, 0xfb, // jz 4
    0x66, 0xba, 0xf8, 0x02, // mov dx, 0x2f8
    0xec, // in al, dx
    0x66, 0xba, 0xf8, 0x02, // mov dx, 0x2f8
    0xee, // out dx, al
    0xeb, 0xeb, // jmp 0
];

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(50);
    let dir = tempfile::tempdir().expect("temp dir");
    let kernel = tiny_kernel(dir.path(), "echo", &ECHO).expect("guest");
    let initramfs = dir.path().join("initramfs");
    std::fs::write(&initramfs, b"-").expect("initramfs");
    let run = |name: &str| {
        let d = dir.path().join(name);
        std::fs::create_dir_all(&d).expect("run dir");
        d
    };
    let mut spec = BootSpec {
        kernel,
        initramfs,
        extra_cmdline: Vec::new(),
        memory_mib: 128,
        vcpus: 1,
        disks: Vec::new(),
        run_dir: run("bake"),
        agent_port: None,
        memory_file: None,
        volumes: Vec::new(),
    };
    let backend = KvmBackend::new();
    let snap = run("snapshot");
    {
        let mut m = backend.boot(&spec).expect("boot");
        let mut c = m.take_channel().expect("channel");
        c.write_all(b"!").expect("write");
        c.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut e = [0u8];
        c.read_exact(&mut e).expect("the booted guest echoes");
        m.snapshot(&snap).expect("snapshot");
        m.kill().expect("kill");
    }

    let (mut resume, mut first_byte) = (Vec::new(), Vec::new());
    for i in 0..n {
        spec.run_dir = run(&format!("r{i}"));
        let pending = backend.prepare_restore(&spec, &snap).expect("prepare");
        let t0 = Instant::now();
        let (mut m, _) = pending.resume().expect("resume");
        resume.push(t0.elapsed());
        let mut channel = m.take_channel().expect("channel");
        channel.write_all(b"?").expect("write");
        channel
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut echo = [0u8];
        channel
            .read_exact(&mut echo)
            .unwrap_or_else(|e| panic!("run {i}: no echo: {e}"));
        assert_eq!(&echo, b"?");
        first_byte.push(t0.elapsed());
        // Teardown is off the measured path, as in a worker.
        m.kill().expect("kill");
    }
    resume.sort();
    first_byte.sort();
    println!("kvm backend restore through the Backend trait, {n} runs (ms)");
    println!("| what | p50 | p90 | p99 | max |");
    println!("|---|---|---|---|---|");
    for (what, v) in [("resume", &resume), ("resume -> first byte", &first_byte)] {
        println!(
            "| {what} | {:.3} | {:.3} | {:.3} | {:.3} |",
            percentile(v, 0.5),
            percentile(v, 0.9),
            percentile(v, 0.99),
            percentile(v, 1.0)
        );
    }
}
