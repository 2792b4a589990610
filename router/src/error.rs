//! What can keep the router from serving: a configuration it cannot serve, a certificate
//! or key it cannot use, a listener it cannot bind, a pool whose workers cannot start.

use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    /// The configuration asks for something the router cannot do.
    #[error("{0}")]
    Config(String),
    /// A TLS certificate or key file that cannot be used, and why.
    #[error("{path}: {reason}")]
    Tls { path: PathBuf, reason: String },
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// A pool's workers could not be started.
    #[error(transparent)]
    Worker(#[from] supermachine_worker::Error),
    /// A pool failed to start its first worker again and again (the message names the
    /// snapshot and the last error).
    #[error("{0}")]
    Unstartable(String),
}
