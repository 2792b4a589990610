//! Download progress: a bar per blob (indicatif) when stderr is a terminal, one plain line
//! per blob otherwise (logs and CI keep a readable record).

use std::io::IsTerminal;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::digest::Digest;

pub struct PullProgress {
    bars: Option<MultiProgress>,
}

impl PullProgress {
    /// Bars if stderr is a terminal, plain lines otherwise.
    pub fn for_stderr() -> Self {
        Self {
            bars: std::io::stderr()
                .is_terminal()
                .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr())),
        }
    }

    /// Announces a blob download of `size` bytes, `done` of which are already on disk.
    pub fn blob(&self, digest: &Digest, size: u64, done: u64, registry: &str) -> BlobProgress {
        let short = &digest.hex()[..12.min(digest.hex().len())];
        match &self.bars {
            Some(m) => {
                let bar = m.add(ProgressBar::new(size));
                bar.set_style(
                    ProgressStyle::with_template(
                        "{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {msg}",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
                );
                bar.set_prefix(short.to_string());
                bar.set_position(done);
                if done > 0 {
                    bar.set_message("resuming");
                }
                BlobProgress { bar: Some(bar) }
            }
            None => {
                if done > 0 {
                    eprintln!("supermachine: resuming {digest} at {done} of {size} bytes");
                } else {
                    eprintln!(
                        "supermachine: pulling {digest} ({:.1} MiB) from {registry}",
                        size as f64 / 1048576.0
                    );
                }
                BlobProgress { bar: None }
            }
        }
    }
}

pub struct BlobProgress {
    bar: Option<ProgressBar>,
}

impl BlobProgress {
    pub fn advance(&self, n: u64) {
        if let Some(b) = &self.bar {
            b.inc(n);
        }
    }

    pub fn finish(&self, outcome: &str) {
        if let Some(b) = &self.bar {
            b.finish_with_message(outcome.to_string());
        }
    }
}
