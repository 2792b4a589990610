//! The flags that say how an image's source is read (`--pull`, `--platform`,
//! `--insecure-registry`, `--max-concurrent-downloads`), shared by `boot`, `pull` and `run`.

use clap::{Args, ValueEnum};

use supermachine::{Platform, PullOptions, PullPolicy};

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PullArg {
    /// Read the source every time; re-bake only if what it resolves to changed.
    Always,
    /// Use what is cached without touching the network; read the source otherwise.
    Missing,
    /// Only what is cached; fail if nothing is.
    Never,
}

#[derive(Args, Clone)]
pub struct SourceArgs {
    /// When to read the image's source [default: always for `pull`, missing otherwise].
    #[arg(long, value_enum)]
    pull: Option<PullArg>,
    /// The platform to pick from a multi-arch image (guests here run linux/amd64).
    #[arg(long, default_value = "linux/amd64", value_name = "OS/ARCH[/VARIANT]")]
    platform: String,
    /// A registry (HOST or HOST:PORT) to reach over plain HTTP; repeatable. localhost and
    /// 127.0.0.0/8 always are.
    #[arg(long = "insecure-registry", value_name = "HOST[:PORT]")]
    insecure_registries: Vec<String>,
    /// Blobs downloaded from a registry at the same time.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=16))]
    max_concurrent_downloads: u64,
}

impl SourceArgs {
    /// The options these flags ask for, with `default_policy` when `--pull` is not given.
    pub fn options(&self, default_policy: PullPolicy) -> Result<PullOptions, String> {
        Ok(PullOptions {
            policy: match self.pull {
                None => default_policy,
                Some(PullArg::Always) => PullPolicy::Always,
                Some(PullArg::Missing) => PullPolicy::Missing,
                Some(PullArg::Never) => PullPolicy::Never,
            },
            platform: Platform::parse(&self.platform).map_err(|e| e.to_string())?,
            insecure_registries: self.insecure_registries.clone(),
            max_concurrent_downloads: self.max_concurrent_downloads as usize,
        })
    }
}
