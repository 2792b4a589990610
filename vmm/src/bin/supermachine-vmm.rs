//! `supermachine-vmm`: run our VMM directly — boot a kernel, snapshot it when its console
//! prints a line, restore a snapshot, measure restores. The product (bake, worker, router)
//! uses the VMM as a library through `supermachine-backend`'s kvm backend; this binary is
//! for kernels without our init, the VMM's own tests and restore benchmarks.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use supermachine_vmm::builder::{ExitReason, MicroVm, PreparedVm, RestoreLayout};
use supermachine_vmm::{BlockConfig, MicroVmConfig, VsockConfig};

const USAGE: &str = "usage:
  supermachine-vmm boot --kernel VMLINUX --cmdline CMDLINE [--initrd FILE] [--memory MIB]
        [--vcpus N] [--blk PATH[=SERIAL]]... [--vsock-cid CID --vsock-uds PATH]
        [--snapshot-at TEXT --snapshot-to FILE [--stop-after-snapshot]]
        [--until TEXT [--vsock-probe PORT]] [--timeout SECONDS]
  supermachine-vmm restore --snapshot FILE [--vsock-uds PATH] [--prepared]
        [--until TEXT [--vsock-probe PORT]]
        [--timeout SECONDS]
  supermachine-vmm bench-restore --snapshot FILE [-n N] [--prepared]
        (--prepared: VM, vCPU threads, guest address space and device eventfds made
        before each timed restore, from the snapshot's layout)

The guest console (ttyS0) goes to stdout. `--until TEXT` ends the VM once the console
printed TEXT (exit 0); with `--vsock-probe PORT` it first connects to guest vsock port PORT
through the VM's unix socket and reports whether the guest accepted or refused (RST). Exit codes: 0 clean exit or TEXT seen, 1 error, 2 usage,
3 guest panic / triple fault / KVM failure, 4 timeout.";

/// Console output that is printed and also kept, so the loop can look for a line.
#[derive(Clone, Default)]
struct ConsoleTap(Arc<Mutex<Vec<u8>>>);

impl Write for ConsoleTap {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stdout().write_all(buf);
        let _ = std::io::stdout().flush();
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stdout().flush()
    }
}

impl ConsoleTap {
    fn contains(&self, text: &str) -> bool {
        let b = self.0.lock().unwrap_or_else(|p| p.into_inner());
        b.windows(text.len()).any(|w| w == text.as_bytes())
    }
}

struct Args(Vec<String>);

impl Args {
    fn value(&self, flag: &str) -> Option<String> {
        self.0
            .iter()
            .position(|a| a == flag)
            .and_then(|i| self.0.get(i + 1).cloned())
    }
    fn values(&self, flag: &str) -> Vec<String> {
        self.0
            .windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].clone())
            .collect()
    }
    fn has(&self, flag: &str) -> bool {
        self.0.iter().any(|a| a == flag)
    }
    fn parse<T: std::str::FromStr>(&self, flag: &str, default: T) -> Result<T, String> {
        match self.value(flag) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| format!("{flag}: invalid value {v:?}")),
        }
    }
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = argv.first().cloned() else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let args = Args(argv[1..].to_vec());
    let result = match cmd.as_str() {
        "boot" => boot(&args),
        "restore" => restore(&args),
        "bench-restore" => bench_restore(&args),
        "-h" | "--help" | "help" => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        other => Err(format!("unknown command {other:?}\n{USAGE}")),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("supermachine-vmm: error: {e}");
            ExitCode::from(1)
        }
    }
}

fn null_output() -> Box<dyn Write + Send> {
    Box::new(std::io::sink())
}

/// Connects to guest vsock `port` through the VM's unix socket while the VM keeps running;
/// returns what the guest said: "accepted" (OK) or "refused" (RST → EOF).
fn vsock_probe(
    vm: &mut MicroVm,
    uds: &std::path::Path,
    port: u32,
    timeout: Duration,
) -> Result<String, String> {
    use std::io::Read;
    let mut s = std::os::unix::net::UnixStream::connect(uds)
        .map_err(|e| format!("connecting to {}: {e}", uds.display()))?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(|e| e.to_string())?;
    s.set_nonblocking(true).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    while Instant::now() < deadline {
        if let Some(r) = vm
            .run(Some(Duration::from_millis(50)))
            .map_err(|e| e.to_string())?
        {
            return Err(format!("the VM ended during the vsock probe: {r:?}"));
        }
        let mut b = [0u8; 64];
        match s.read(&mut b) {
            Ok(0) => return Ok("refused".into()),
            Ok(n) => {
                got.extend_from_slice(&b[..n]);
                if got.contains(&b'\n') {
                    return Ok(format!(
                        "accepted ({})",
                        String::from_utf8_lossy(&got).trim()
                    ));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    Err(format!("no answer on vsock port {port} within {timeout:?}"))
}

/// Runs `vm` until it exits, `until` appears on the console, or the timeout.
fn drive(
    vm: &mut MicroVm,
    tap: &ConsoleTap,
    until: Option<&str>,
    timeout: Duration,
    mut on_line: impl FnMut(&mut MicroVm, &ConsoleTap) -> Result<bool, String>,
) -> Result<u8, String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(t) = until {
            if tap.contains(t) {
                eprintln!("supermachine-vmm: console printed {t:?}");
                return Ok(0);
            }
        }
        if on_line(vm, tap)? {
            return Ok(0);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            eprintln!("supermachine-vmm: timed out after {timeout:?}");
            return Ok(4);
        }
        match vm
            .run(Some(left.min(Duration::from_millis(100))))
            .map_err(|e| e.to_string())?
        {
            None => {}
            Some(ExitReason::Reset) => {
                eprintln!("supermachine-vmm: the guest reset (clean exit)");
                return Ok(0);
            }
            Some(other) => {
                eprintln!("supermachine-vmm: the VM ended: {other:?}");
                return Ok(3);
            }
        }
    }
}

fn boot(a: &Args) -> Result<u8, String> {
    let kernel = a.value("--kernel").ok_or("--kernel is required")?;
    let blocks = a
        .values("--blk")
        .into_iter()
        .enumerate()
        .map(|(i, spec)| {
            let (path, serial) = match spec.split_once('=') {
                Some((p, s)) => (p.to_string(), s.to_string()),
                None => (spec.clone(), format!("vd{i}")),
            };
            BlockConfig {
                path: PathBuf::from(path),
                serial,
            }
        })
        .collect();
    let vsock = match (a.value("--vsock-cid"), a.value("--vsock-uds")) {
        (Some(cid), Some(uds)) => Some(VsockConfig {
            cid: cid
                .parse()
                .map_err(|_| format!("--vsock-cid: invalid {cid:?}"))?,
            uds_path: PathBuf::from(uds),
        }),
        (None, None) => None,
        _ => return Err("--vsock-cid and --vsock-uds go together".into()),
    };
    let config = MicroVmConfig {
        kernel: PathBuf::from(kernel),
        cmdline: a
            .value("--cmdline")
            .unwrap_or_else(|| "console=ttyS0 reboot=k panic=-1".into()),
        initrd: a.value("--initrd").map(PathBuf::from),
        memory_mib: a.parse("--memory", 128)?,
        vcpus: a.parse("--vcpus", 1)?,
        blocks,
        vsock,
        filesystems: Vec::new(),
    };
    let tap = ConsoleTap::default();
    let t0 = Instant::now();
    let mut vm =
        MicroVm::boot(&config, Box::new(tap.clone()), null_output()).map_err(|e| e.to_string())?;
    eprintln!("supermachine-vmm: booting ({:?} to start)", t0.elapsed());
    let snapshot_at = a.value("--snapshot-at");
    let snapshot_to = a.value("--snapshot-to").map(PathBuf::from);
    let stop_after = a.has("--stop-after-snapshot");
    let mut taken = false;
    let timeout = Duration::from_secs(a.parse("--timeout", 300u64)?);
    let uds = a.value("--vsock-uds").map(PathBuf::from);
    let code = drive(
        &mut vm,
        &tap,
        a.value("--until").as_deref(),
        timeout,
        |vm, tap| match (&snapshot_at, &snapshot_to) {
            (Some(at), Some(to)) if !taken && tap.contains(at) => {
                let t = Instant::now();
                let written = vm.pause_and_snapshot(to).map_err(|e| e.to_string())?;
                taken = true;
                eprintln!(
                    "supermachine-vmm: snapshot {} after {at:?} ({} KiB of memory written, {:?})",
                    to.display(),
                    written / 1024,
                    t.elapsed()
                );
                if stop_after {
                    return Ok(true);
                }
                vm.resume();
                Ok(false)
            }
            _ => Ok(false),
        },
    )?;
    probe_if_asked(a, &mut vm, uds.as_deref(), code)
}

fn probe_if_asked(
    a: &Args,
    vm: &mut MicroVm,
    uds: Option<&std::path::Path>,
    code: u8,
) -> Result<u8, String> {
    let Some(port) = a.value("--vsock-probe") else {
        return Ok(code);
    };
    if code != 0 || a.value("--until").is_none() {
        return Ok(code);
    }
    let port: u32 = port
        .parse()
        .map_err(|_| format!("--vsock-probe: invalid port {port:?}"))?;
    let uds = uds.ok_or("--vsock-probe needs a vsock device (--vsock-uds)")?;
    let answer = vsock_probe(vm, uds, port, Duration::from_secs(120))?;
    eprintln!("supermachine-vmm: vsock port {port}: {answer} by the guest");
    Ok(0)
}

fn restore(a: &Args) -> Result<u8, String> {
    let snap = PathBuf::from(a.value("--snapshot").ok_or("--snapshot is required")?);
    let uds = a.value("--vsock-uds").map(PathBuf::from);
    let tap = ConsoleTap::default();
    // With --prepared the VM, vCPUs, their threads, the guest address space and the
    // device eventfds are made first, as a worker does ahead of a restore.
    let prepared = if a.has("--prepared") {
        let layout = RestoreLayout::of(&snap).map_err(|e| e.to_string())?;
        Some(PreparedVm::for_layout(&layout, uds.as_deref()).map_err(|e| e.to_string())?)
    } else {
        None
    };
    let (mut vm, t) = MicroVm::restore(
        &snap,
        prepared,
        Box::new(tap.clone()),
        null_output(),
        uds.as_deref(),
        &[],
    )
    .map_err(|e| e.to_string())?;
    eprintln!(
        "supermachine-vmm: restored {} in {:?} (open {:?}, create {:?}, load {:?}: cpu state {:?}, devices {:?})",
        snap.display(),
        t.total,
        t.open,
        t.create,
        t.load,
        t.cpu_state,
        t.devices
    );
    let timeout = Duration::from_secs(a.parse("--timeout", 300u64)?);
    let code = drive(
        &mut vm,
        &tap,
        a.value("--until").as_deref(),
        timeout,
        |_, _| Ok(false),
    )?;
    probe_if_asked(a, &mut vm, uds.as_deref(), code)
}

/// Restore mechanics: snapshot open → vCPUs running, `n` times; JSON on stdout.
fn bench_restore(a: &Args) -> Result<u8, String> {
    let snap = PathBuf::from(a.value("--snapshot").ok_or("--snapshot is required")?);
    let n: usize = a.parse("-n", 20)?;
    // Read once, outside the timed restores, and only when VMs are prepared from it.
    let layout = if a.has("--prepared") {
        Some(RestoreLayout::of(&snap).map_err(|e| e.to_string())?)
    } else {
        None
    };
    let prepared = layout.is_some();
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        let uds = dir.path().join(format!("v{i}.sock"));
        let p = match &layout {
            Some(l) => Some(PreparedVm::for_layout(l, Some(&uds)).map_err(|e| e.to_string())?),
            None => None,
        };
        let (vm, t) = MicroVm::restore(&snap, p, null_output(), null_output(), Some(&uds), &[])
            .map_err(|e| e.to_string())?;
        samples.push(t.total);
        // Teardown is off the measured path.
        drop(vm);
    }
    samples.sort();
    let pct = |p: f64| {
        let i = ((samples.len() as f64 - 1.0) * p).round() as usize;
        samples[i].as_secs_f64() * 1000.0
    };
    println!(
        "{{\"backend\":\"kvm\",\"prepared\":{prepared},\"n\":{n},\"p50_ms\":{:.3},\"p99_ms\":{:.3},\"min_ms\":{:.3},\"max_ms\":{:.3}}}",
        pct(0.5),
        pct(0.99),
        pct(0.0),
        pct(1.0)
    );
    Ok(0)
}
