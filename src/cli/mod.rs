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
    #[command(subcommand)]
    command: Command,
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
