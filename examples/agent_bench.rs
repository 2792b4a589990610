//! Agent micro-benchmarks on a real VM: exec round-trip, stdin->stdout throughput, file
//! transfer throughput, connect() setup latency. `scripts/bench-agent.sh` runs it.
//! Needs SUPERMACHINE_IMAGES (the test images dir); kernel and init are found as usual.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use supermachine::{BootRequest, ExecStdin, ImageRef, Vm};

fn pct(mut v: Vec<Duration>, p: f64) -> f64 {
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i].as_secs_f64() * 1000.0
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let images = std::env::var("SUPERMACHINE_IMAGES")?;
    let mut req = BootRequest::new(ImageRef::parse(&format!("oci-layout:{images}/busybox"))?);
    req.overrides.cmd = Some(
        ["httpd", "-f", "-p", "80", "-h", "/var/www"]
            .map(String::from)
            .to_vec(),
    );
    let vm = Vm::boot(&req, Box::new(|_, _| {}))?;
    vm.wait_listening(80, Duration::from_secs(30))?;
    println!("backend: {}", vm.backend_name());
    println!("| measurement | result |");
    println!("|---|---|");

    let mut exec_times = Vec::new();
    for _ in 0..50 {
        let t = Instant::now();
        vm.exec(["true"])?;
        exec_times.push(t.elapsed());
    }
    println!(
        "| exec `true` round trip (50 runs) | p50 {:.1} ms, p90 {:.1} ms |",
        pct(exec_times.clone(), 0.5),
        pct(exec_times, 0.9)
    );

    let payload = vec![0x5au8; 64 << 20];
    let t = Instant::now();
    let out = vm
        .exec_builder()
        .argv(["cat"])
        .stdin(ExecStdin::Bytes(payload.clone()))
        .output()?;
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(out.stdout.len(), payload.len());
    println!(
        "| exec stdin -> `cat` -> stdout, 64 MiB | {:.1} MiB/s |",
        64.0 / secs
    );

    let file = vec![0xa5u8; 32 << 20];
    let t = Instant::now();
    vm.write_file("/tmp/bench.bin", &file, 0o644)?;
    let w = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let back = vm.read_file("/tmp/bench.bin", 64 << 20)?;
    let r = t.elapsed().as_secs_f64();
    assert_eq!(back.len(), file.len());
    println!("| write_file 32 MiB | {:.1} MiB/s |", 32.0 / w);
    println!("| read_file 32 MiB | {:.1} MiB/s |", 32.0 / r);

    let mut conn_times = Vec::new();
    let mut req_times = Vec::new();
    for _ in 0..50 {
        let t = Instant::now();
        let mut s = vm.connect(80)?;
        conn_times.push(t.elapsed());
        s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
        let mut body = Vec::new();
        s.read_to_end(&mut body)?;
        req_times.push(t.elapsed());
    }
    println!(
        "| connect() to guest port 80 (50 runs) | p50 {:.1} ms, p90 {:.1} ms |",
        pct(conn_times.clone(), 0.5),
        pct(conn_times, 0.9)
    );
    println!(
        "| connect + HTTP GET / (50 runs) | p50 {:.1} ms, p90 {:.1} ms |",
        pct(req_times.clone(), 0.5),
        pct(req_times, 0.9)
    );
    Ok(())
}
