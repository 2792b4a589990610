//! The `supermachine` command line. Exit codes follow docker: the workload's own status
//! when it ran, 125 when supermachine itself failed, 126/127 when the command could not
//! be invoked / was not found.

mod backend;
mod bench;
mod bench_http;
mod bench_tcp;
pub(crate) mod boot;
mod daemon;
mod exec;
mod pull;
mod registry;
pub(crate) mod serve;
mod source;

use clap::{Parser, Subcommand};

/// Exit code for errors of supermachine itself (docker uses the same).
pub const EXIT_INTERNAL: i32 = 125;

#[derive(Parser)]
#[command(
    name = "supermachine",
    version,
    about = "Run OCI images as hardware-isolated microVMs"
)]
struct Cli {
    /// Log verbosity (error, warn, info, debug, trace); RUST_LOG also works.
    #[arg(long, global = true, default_value = "warn")]
    log_level: String,
    #[command(flatten)]
    jail: JailArgs,
    #[command(subcommand)]
    command: Command,
}

/// The jail of every worker (docs/ARCHITECTURE.md, "Security"). Each flag sets its
/// environment variable, so daemons started by `run -d` and their workers inherit it.
#[derive(clap::Args)]
#[command(next_help_heading = "Jail (serve, run, bench: every worker)")]
struct JailArgs {
    /// Run VMs unjailed: as root, with every capability, in the host's namespaces, no
    /// seccomp filter, no cgroup. For debugging only.
    #[arg(long, global = true, env = "SUPERMACHINE_NO_JAIL", value_parser = clap::builder::FalseyValueParser::new())]
    no_jail: bool,
    /// The uids (and gids) jailed VMs run as, START-END: one per live VM.
    #[arg(
        long,
        global = true,
        value_name = "START-END",
        env = "SUPERMACHINE_JAIL_UIDS"
    )]
    jail_uids: Option<String>,
    /// Each VM's cgroup memory limit is its guest memory plus this, MiB (default 384).
    #[arg(
        long,
        global = true,
        value_name = "MIB",
        env = "SUPERMACHINE_JAIL_MEMORY_OVERHEAD_MIB"
    )]
    jail_memory_overhead_mib: Option<String>,
    /// Processes and threads per VM (cgroup pids.max; default 512).
    #[arg(
        long,
        global = true,
        value_name = "N",
        env = "SUPERMACHINE_JAIL_PIDS_MAX"
    )]
    jail_pids_max: Option<String>,
    /// CPU limit per VM, in CPUs (cgroup cpu quota; none by default).
    #[arg(
        long,
        global = true,
        value_name = "CPUS",
        env = "SUPERMACHINE_JAIL_CPUS"
    )]
    jail_cpus: Option<String>,
    /// Not root: a cgroup delegated to you (NAME: /sys/fs/cgroup/NAME on v2, under each
    /// controller on v1), in which each VM gets its own group with the limits above. On v2
    /// this process must already be inside it (the kernel's rule for moving processes).
    #[arg(
        long,
        global = true,
        value_name = "NAME",
        env = "SUPERMACHINE_JAIL_CGROUP"
    )]
    jail_cgroup: Option<String>,
}

impl JailArgs {
    /// Exports the flags to the environment (read by `JailConfig::from_env`, inherited by
    /// daemons) and checks them; the error names the flag.
    fn apply(&self) -> Result<supermachine::JailConfig, String> {
        let mut check = supermachine::JailConfig::default();
        for (flag, var, value) in [
            ("--jail-uids", "SUPERMACHINE_JAIL_UIDS", &self.jail_uids),
            (
                "--jail-memory-overhead-mib",
                "SUPERMACHINE_JAIL_MEMORY_OVERHEAD_MIB",
                &self.jail_memory_overhead_mib,
            ),
            (
                "--jail-pids-max",
                "SUPERMACHINE_JAIL_PIDS_MAX",
                &self.jail_pids_max,
            ),
            ("--jail-cpus", "SUPERMACHINE_JAIL_CPUS", &self.jail_cpus),
            (
                "--jail-cgroup",
                "SUPERMACHINE_JAIL_CGROUP",
                &self.jail_cgroup,
            ),
        ] {
            if let Some(v) = value {
                check.apply_arg(flag, Some(v))?;
                // Single-threaded still: nothing reads the environment concurrently.
                std::env::set_var(var, v);
            }
        }
        if self.no_jail {
            std::env::set_var("SUPERMACHINE_NO_JAIL", "1");
        }
        supermachine::JailConfig::from_env()
    }
}

#[derive(Subcommand)]
enum Command {
    /// Boot IMAGE in a fresh microVM, run its command, stream its output, exit with its status.
    Boot(Box<boot::BootArgs>),
    /// Run a command in a running VM (one started with `boot --name`), like `docker exec`.
    Exec(exec::ExecArgs),
    /// Bake IMAGE: boot it once, wait until it listens on its port, snapshot it.
    Pull(Box<pull::PullArgs>),
    /// List baked snapshots.
    Images(pull::ImagesArgs),
    /// Remove baked snapshots.
    Rmi(pull::RmiArgs),
    /// Load tests and measurements.
    Bench(bench::BenchArgs),
    /// The HTTP ingress: route requests to pools of VMs restored from snapshots.
    Serve(Box<serve::ServeArgs>),
    /// Bake IMAGE if needed and serve it, like `docker run` (`-d` runs it in the background).
    Run(Box<daemon::RunArgs>),
    /// List running VMs and daemons.
    Ps(daemon::PsArgs),
    /// Stop running daemons (SIGTERM, then SIGKILL after --time).
    Stop(daemon::StopArgs),
    /// Print a daemon's output.
    Logs(daemon::LogsArgs),
}

/// Runs the CLI; returns the process exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cli.log_level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let jail = match cli.jail.apply() {
        Ok(j) => j,
        Err(e) => {
            eprintln!("supermachine: {e}");
            return 2;
        }
    };
    if matches!(cli.command, Command::Serve(_) | Command::Run(_)) {
        if !jail.enabled {
            eprintln!(
                "supermachine: warning: --no-jail: VMs run as root in the host's namespaces, \
                 without seccomp or cgroup limits; a VMM escape owns the host"
            );
        } else if !nix::unistd::Uid::effective().is_root() {
            // What a jail needs root for is left out, not silently: say what.
            let limits = match &jail.cgroup {
                Some(g) => format!("with cgroup limits inside {g}"),
                None => "without cgroup memory, pids or cpu limits (--jail-cgroup NAME: a \
                         cgroup delegated to you)"
                    .to_string(),
            };
            eprintln!(
                "supermachine: note: not root: each VM is jailed in user, mount, pid, network, \
                 ipc and uts namespaces of its own, under seccomp and with no capabilities, \
                 but all VMs run as uid {} (a uid per VM needs root), {limits}",
                nix::unistd::Uid::effective()
            );
        }
    }
    match cli.command {
        Command::Boot(args) => boot::run(*args),
        Command::Exec(args) => exec::run(args),
        Command::Pull(args) => pull::run_pull(*args),
        Command::Images(args) => pull::run_images(args),
        Command::Rmi(args) => pull::run_rmi(args),
        Command::Bench(args) => bench::run(args),
        Command::Serve(args) => serve::run(*args),
        Command::Run(args) => daemon::run(*args),
        Command::Ps(args) => daemon::ps(args),
        Command::Stop(args) => daemon::stop(args),
        Command::Logs(args) => daemon::logs(args),
    }
}
