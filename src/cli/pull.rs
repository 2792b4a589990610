//! `supermachine pull`, `images`, `rmi`: bake snapshots and manage them.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::cli::source::SourceArgs;
use crate::cli::EXIT_INTERNAL;
use supermachine::boot::BootRequest;
use supermachine::pull::{self, PullRequest};
use supermachine::snapshot;
use supermachine::{ImageRef, Overrides, PullPolicy};

#[derive(Args)]
pub struct PullArgs {
    /// Snapshot name (default: derived from the image reference).
    #[arg(long)]
    name: Option<String>,
    /// The port the workload listens on; the snapshot is taken when it does.
    #[arg(long, default_value_t = 80)]
    port: u16,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(64..=65536))]
    memory: u32,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=32))]
    vcpus: u32,
    /// Environment for the workload (KEY=VALUE); repeatable.
    #[arg(short = 'e', long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Replace the image's Cmd, as a JSON array: --cmd '["httpd","-f"]'.
    #[arg(long, value_name = "JSON")]
    cmd: Option<String>,
    /// Replace the image's Entrypoint.
    #[arg(long)]
    entrypoint: Option<String>,
    /// Seconds to wait for the workload to listen.
    #[arg(long, default_value_t = 120)]
    ready_timeout: u64,
    /// Where snapshots live (default: $SUPERMACHINE_SNAPSHOTS or ~/.local/share/supermachine/snapshots).
    #[arg(long)]
    snapshots_dir: Option<PathBuf>,
    #[command(flatten)]
    source: SourceArgs,
    #[command(flatten)]
    backend: crate::cli::backend::BackendArgs,
    /// The image: a registry reference (NAME[:TAG][@DIGEST]), oci-layout:DIR[:TAG] or
    /// oci-archive:FILE[:TAG].
    image: String,
}

#[derive(Args)]
pub struct ImagesArgs {
    #[arg(long)]
    snapshots_dir: Option<PathBuf>,
}

#[derive(Args)]
pub struct RmiArgs {
    #[arg(long)]
    snapshots_dir: Option<PathBuf>,
    /// Snapshot names to remove.
    #[arg(required = true)]
    names: Vec<String>,
}

fn err(msg: impl std::fmt::Display) -> i32 {
    eprintln!("supermachine: error: {msg}");
    EXIT_INTERNAL
}

pub fn run_pull(a: PullArgs) -> i32 {
    let image = match ImageRef::parse(&a.image) {
        Ok(i) => i,
        Err(e) => return err(e),
    };
    let cmd = match a.cmd.as_deref().map(serde_json::from_str::<Vec<String>>) {
        None => None,
        Some(Ok(v)) => Some(v),
        Some(Err(e)) => return err(format!("--cmd must be a JSON array of strings: {e}")),
    };
    let mut boot = BootRequest::new(image);
    boot.overrides = Overrides {
        entrypoint: a.entrypoint,
        cmd,
        env: a.env,
        ..Default::default()
    };
    boot.memory_mib = a.memory;
    boot.vcpus = a.vcpus;
    // Like `docker pull`, `pull` asks the source again unless told otherwise.
    boot.pull = match a.source.options(PullPolicy::Always) {
        Ok(o) => o,
        Err(e) => return err(e),
    };
    boot.backend = match a.backend.resolve() {
        Ok(b) => b,
        Err(e) => return err(e),
    };
    let req = PullRequest {
        name: a.name.unwrap_or_else(|| pull::default_name(&a.image)),
        port: a.port,
        ready_timeout: Duration::from_secs(a.ready_timeout),
        snapshots_dir: a.snapshots_dir.unwrap_or_else(snapshot::default_root),
        boot,
    };
    eprintln!(
        "supermachine: baking {} as {:?} (waiting for port {})",
        a.image, req.name, req.port
    );
    match pull::pull(&req) {
        Ok(o) => {
            let m = &o.snapshot.meta;
            eprintln!(
                "supermachine: {} {} ({}, {} MiB, {} vCPU)",
                if o.cached { "up to date:" } else { "baked" },
                o.snapshot.dir.display(),
                m.manifest_digest,
                m.memory_mib,
                m.vcpus
            );
            println!("{}", m.name);
            0
        }
        Err(e) => err(e),
    }
}

pub fn run_images(a: ImagesArgs) -> i32 {
    let root = a.snapshots_dir.unwrap_or_else(snapshot::default_root);
    println!(
        "{:<24} {:<48} {:<14} {:>9} {:>10} {:>12}",
        "NAME", "IMAGE", "DIGEST", "MEMORY", "DISK", "CREATED"
    );
    for (name, snap) in snapshot::list(&root) {
        match snap {
            Ok(s) => {
                let m = &s.meta;
                let digest = m.manifest_digest.trim_start_matches("sha256:");
                println!(
                    "{:<24} {:<48} {:<14} {:>5} MiB {:>6.1} MiB {:>12}",
                    name,
                    m.image_ref,
                    &digest[..digest.len().min(12)],
                    m.memory_mib,
                    disk_usage(&s.dir) as f64 / 1048576.0,
                    m.created_unix
                );
            }
            Err(e) => println!("{name:<24} (unusable: {e})"),
        }
    }
    0
}

/// Bytes a snapshot directory really occupies (the RAM file is sparse).
fn disk_usage(dir: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.blocks() * 512)
                .sum()
        })
        .unwrap_or(0)
}

pub fn run_rmi(a: RmiArgs) -> i32 {
    let root = a.snapshots_dir.unwrap_or_else(snapshot::default_root);
    let mut code = 0;
    for name in &a.names {
        let dir = root.join(name);
        if name.contains('/') || name.starts_with('.') || !dir.is_dir() {
            code = err(format!("no snapshot named {name:?} in {}", root.display()));
            continue;
        }
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => println!("{name}"),
            Err(e) => code = err(format!("removing {}: {e}", dir.display())),
        }
    }
    code
}
