//! The public error type: one variant per kind of failure a caller may want to match.

use supermachine_backend::BackendError;
use supermachine_bake::BakeError;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The image reference, layout, a blob or a layer is bad or unreadable.
    #[error(transparent)]
    Image(BakeError),
    /// A file supermachine needs is missing: the guest kernel, init, the agent, the worker.
    #[error("{what} not found (looked at: {looked}); {hint}")]
    Assets {
        what: String,
        looked: String,
        hint: String,
    },
    /// The VM could not be started, restored or controlled.
    #[error(transparent)]
    Vm(#[from] BackendError),
    /// Reaching the guest over the network failed (agent, published port).
    #[error("network: {0}")]
    Network(String),
    /// The guest's init reported that it could not start the workload.
    #[error("the guest could not start the workload: {0}")]
    Guest(String),
    /// The VM ended without the workload's exit status (kernel panic, crash, bad protocol).
    #[error("the VM stopped before the workload finished: {reason}\n--- guest console (last lines) ---\n{console}")]
    GuestCrashed { reason: String, console: String },
    /// An exec session failed (not the command: its exit status is in the outcome).
    #[error("exec: {0}")]
    Exec(String),
    /// No snapshot (or cache entry) for what was asked.
    #[error("not in the cache: {what}")]
    CacheMiss { what: String },
    /// A snapshot or cache entry exists but cannot be used; `reason` says why.
    #[error("invalid cache entry {path}: {reason}")]
    CacheInvalid {
        path: std::path::PathBuf,
        reason: String,
    },
    /// Baking a snapshot failed (the workload never listened, the snapshot failed, ...).
    #[error("bake failed: {0}")]
    Bake(String),
    /// A volume is malformed or cannot be given to this VM (the reason names it).
    #[error(transparent)]
    Volume(#[from] crate::volume::VolumeError),
    /// A worker process failed or broke the worker protocol.
    #[error("worker: {0}")]
    Worker(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
}

impl Error {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

impl From<BakeError> for Error {
    fn from(e: BakeError) -> Self {
        match e {
            BakeError::Network { .. } => Error::Network(e.to_string()),
            BakeError::NotCached { reference } => Error::CacheMiss { what: reference },
            other => Error::Image(other),
        }
    }
}
