//! Per-thread-kind seccomp filters: a process that jails itself (the worker) hands them
//! over once, and each vCPU thread and the event-loop thread then narrows itself to its
//! own list before it touches the guest. They stack on whatever filter the whole process
//! already has (the kernel runs every filter; the strictest answer wins), so they can only
//! take syscalls away. A process that sets none (bake, `supermachine boot`, tests) runs
//! unfiltered here.

use std::sync::OnceLock;

pub use seccompiler::BpfProgram;

/// The threads of a VM that get a filter of their own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// Runs KVM_RUN and the device register accesses that exit to us.
    Vcpu,
    /// The VM's epoll loop: queue notifications, device backends, the vsock muxer.
    EventLoop,
}

/// The compiled filters, one per [`ThreadKind`].
pub struct ThreadFilters {
    pub vcpu: BpfProgram,
    pub event_loop: BpfProgram,
}

static FILTERS: OnceLock<ThreadFilters> = OnceLock::new();

/// Sets the filters for every VM thread that starts running from now on. Once per process:
/// a second call is refused (a jail never loosens).
pub fn set(filters: ThreadFilters) -> Result<(), String> {
    FILTERS
        .set(filters)
        .map_err(|_| "the VM threads' seccomp filters are already set".to_string())
}

/// Installs this kind's filter on the calling thread, if filters were set. The thread
/// must not run the guest when this fails.
pub fn apply(kind: ThreadKind) -> Result<(), String> {
    let Some(f) = FILTERS.get() else {
        return Ok(());
    };
    let prog = match kind {
        ThreadKind::Vcpu => &f.vcpu,
        ThreadKind::EventLoop => &f.event_loop,
    };
    seccompiler::apply_filter(prog)
        .map_err(|e| format!("installing the {kind:?} seccomp filter: {e}"))
}
