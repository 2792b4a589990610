//! Errors of the VMM, one variant per distinct failure, each naming what failed.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("/dev/kvm: {0}")]
    Kvm(#[source] kvm_ioctls::Error),
    #[error("KVM {op}: {source}")]
    KvmOp {
        op: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("guest memory: {0}")]
    Memory(String),
    #[error("loading the kernel {path}: {reason}")]
    Kernel { path: PathBuf, reason: String },
    #[error("kernel command line: {0}")]
    Cmdline(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("snapshot {path}: {reason}")]
    Snapshot { path: PathBuf, reason: String },
    #[error("vCPU {id}: {reason}")]
    Vcpu { id: usize, reason: String },
    #[error("invalid configuration: {0}")]
    Config(String),
}

impl VmmError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        VmmError::Io {
            context: context.into(),
            source,
        }
    }

    pub fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Self {
        move |source| VmmError::KvmOp { op, source }
    }
}

pub type Result<T> = std::result::Result<T, VmmError>;
