//! `supermachine bench restore`: restore latency, time to first byte, memory per VM; and the
//! load generators `bench http` and `bench tcp`.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};

use crate::cli::EXIT_INTERNAL;
use supermachine::snapshot;
use supermachine::{Image, Worker};

#[derive(Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    what: BenchCommand,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Restore a baked snapshot N times; report latency percentiles and PSS per VM.
    Restore(RestoreArgs),
    /// HTTP load against a URL for a bounded time.
    Http(crate::cli::bench_http::HttpArgs),
    /// Request/reply load over raw TCP (default: RESP PING/+PONG) for a bounded time.
    Tcp(crate::cli::bench_tcp::TcpArgs),
}

#[derive(Args)]
struct RestoreArgs {
    /// Snapshot name (see `supermachine images`) or a snapshot directory.
    name: String,
    /// Number of sequential restores.
    #[arg(short = 'n', default_value_t = 20)]
    n: usize,
    /// VMs alive at once for the memory measurement.
    #[arg(long, default_value_t = 8)]
    alive: usize,
    /// Write the results as JSON.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    #[arg(long)]
    snapshots_dir: Option<PathBuf>,
}

/// What `bench http` and `bench tcp` print (and write as JSON): requests, req/s, latency
/// percentiles from `h` (microseconds), errors by kind. Exit code 0, or 125 when the JSON
/// file cannot be written.
pub fn report_load(
    h: &hdrhistogram::Histogram<u64>,
    errors: &std::collections::BTreeMap<String, u64>,
    secs: f64,
    json: Option<&std::path::Path>,
) -> i32 {
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let requests = h.len();
    let rps = requests as f64 / secs;
    println!("{requests} requests in {secs:.1} s: {rps:.1} req/s");
    println!(
        "latency ms: p50 {:.2}, p90 {:.2}, p99 {:.2}, max {:.2}",
        ms(0.5),
        ms(0.9),
        ms(0.99),
        h.max() as f64 / 1000.0
    );
    if !errors.is_empty() {
        println!("errors: {errors:?}");
    }
    if let Some(path) = json {
        let v = serde_json::json!({
            "rps": rps,
            "requests": requests,
            "latency_ms": { "p50": ms(0.5), "p90": ms(0.9), "p99": ms(0.99), "max": h.max() as f64 / 1000.0 },
            "errors": errors,
        });
        if let Err(e) = std::fs::write(path, format!("{v}\n")) {
            eprintln!("supermachine: writing {}: {e}", path.display());
            return EXIT_INTERNAL;
        }
    }
    0
}

/// p50/p90/p99/max in milliseconds.
fn summary(mut v: Vec<Duration>) -> serde_json::Value {
    v.sort();
    let at = |p: f64| {
        let i = ((v.len() as f64 - 1.0) * p).round() as usize;
        v.get(i).map(|d| d.as_secs_f64() * 1000.0).unwrap_or(0.0)
    };
    serde_json::json!({ "p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "max": at(1.0) })
}

/// Proportional set size of a process in KiB (`/proc/PID/smaps_rollup`).
pub fn pss_kib(pid: u32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    text.lines()
        .find(|l| l.starts_with("Pss:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn first_byte(w: &Worker, port: u16) -> std::io::Result<()> {
    let mut s = w.connect(port).map_err(std::io::Error::other)?;
    s.write_all(b"GET / HTTP/1.0\r\nHost: bench\r\n\r\n")?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b)
}

pub fn run(a: BenchArgs) -> i32 {
    let a = match a.what {
        BenchCommand::Restore(a) => a,
        BenchCommand::Http(h) => return crate::cli::bench_http::run(h),
        BenchCommand::Tcp(t) => return crate::cli::bench_tcp::run(t),
    };
    let dir = {
        let p = PathBuf::from(&a.name);
        if p.is_dir() {
            p
        } else {
            a.snapshots_dir
                .clone()
                .unwrap_or_else(snapshot::default_root)
                .join(&a.name)
        }
    };
    let image = match Image::from_snapshot(&dir) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("supermachine: error: {e}");
            return EXIT_INTERNAL;
        }
    };
    let port = image.guest_port();
    let backend = image.snapshot().meta.accel.clone();
    // Each restore runs in its own worker, spawned (and its VM monitor started) ahead of
    // the measured request, as a pool keeps them.
    let (mut restore, mut ready, mut first) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..a.n {
        let mut w = match Worker::spawn(&dir) {
            Ok(w) => w,
            Err(e) => {
                eprintln!("supermachine: error: worker {i}: {e}");
                return EXIT_INTERNAL;
            }
        };
        let t = Instant::now();
        let wt = match w.restore() {
            Ok(wt) => wt,
            Err(e) => {
                eprintln!("supermachine: error: restore {i}: {e}");
                return EXIT_INTERNAL;
            }
        };
        ready.push(t.elapsed());
        restore.push(wt.restore);
        if let Err(e) = first_byte(&w, port) {
            eprintln!("supermachine: error: restore {i}: no response on port {port}: {e}");
            return EXIT_INTERNAL;
        }
        first.push(t.elapsed());
    }
    let mut alive = Vec::new();
    for _ in 0..a.alive {
        match Worker::spawn(&dir).and_then(|mut w| w.restore().map(|_| w)) {
            Ok(w) => {
                let _ = first_byte(&w, port);
                alive.push(w)
            }
            Err(e) => {
                eprintln!("supermachine: error: {e}");
                return EXIT_INTERNAL;
            }
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    let pss_total: u64 = alive
        .iter()
        // The worker (with the jail: its waiter and the jailed worker), and QEMU; on the
        // kvm backend the VM runs inside the worker: each process counted once.
        .map(|w| {
            let mut pids = vec![w.pid()];
            pids.extend(w.jailed_pid());
            pids.push(w.monitor_pid());
            pids.retain(|p| *p != 0);
            pids.sort_unstable();
            pids.dedup();
            pids.into_iter().map(pss_kib).sum::<u64>()
        })
        .sum();
    let pss = if alive.is_empty() {
        0
    } else {
        pss_total / alive.len() as u64
    };
    drop(alive);
    let (rs, ready, fs) = (summary(restore), summary(ready), summary(first));
    println!(
        "bench restore {} ({backend}): n={} alive={}",
        a.name, a.n, a.alive
    );
    println!("| metric | p50 ms | p90 ms | p99 ms | max ms |");
    println!("|---|---|---|---|---|");
    for (label, s) in [
        ("restore (request -> guest running, in the worker)", &rs),
        ("restore -> ready (clock + entropy refreshed)", &ready),
        ("restore -> first byte of GET /", &fs),
    ] {
        println!(
            "| {label} | {:.1} | {:.1} | {:.1} | {:.1} |",
            s["p50"].as_f64().unwrap_or(0.0),
            s["p90"].as_f64().unwrap_or(0.0),
            s["p99"].as_f64().unwrap_or(0.0),
            s["max"].as_f64().unwrap_or(0.0)
        );
    }
    println!("PSS per VM with {} alive: {} KiB", a.alive, pss);
    if let Some(path) = &a.json {
        let v = serde_json::json!({
            "n": a.n, "alive": a.alive, "backend": backend,
            "restore_ms": rs, "ready_ms": ready, "first_byte_ms": fs, "pss_kib_per_vm": pss,
        });
        if let Err(e) = std::fs::write(path, format!("{v}\n")) {
            eprintln!("supermachine: writing {}: {e}", path.display());
            return EXIT_INTERNAL;
        }
    }
    0
}
