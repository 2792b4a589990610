//! Events the guest's init sends to the host over the control channel (a dedicated serial
//! port on the QEMU backend): boot milestones, the workload's output and its exit status.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OutputStream {
    Stdout,
    Stderr,
}

/// How the workload ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExitStatus {
    Code(i32),
    Signal(i32),
}

impl ExitStatus {
    /// The shell convention docker uses: a code as is, a signal as 128 + signum.
    pub fn as_shell_code(self) -> i32 {
        match self {
            ExitStatus::Code(c) => c,
            ExitStatus::Signal(s) => 128 + s,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum GuestEvent {
    /// init is running; `uptime_ms` is the guest's CLOCK_BOOTTIME at that moment.
    InitStarted {
        uptime_ms: u64,
    },
    /// The agent (shim) listens on `port`.
    AgentReady {
        port: u16,
    },
    /// Layers mounted, the workload process exists.
    WorkloadStarted {
        pid: i32,
        uptime_ms: u64,
    },
    Output {
        stream: OutputStream,
        data: Vec<u8>,
    },
    /// The workload ended; init powers the VM off next.
    Exited {
        status: ExitStatus,
        uptime_ms: u64,
    },
    /// Answer to `HostCommand::Refresh`; `error` is empty on success.
    Refreshed {
        error: String,
    },
    /// init could not start the workload (bad layer, bad user, bad config); the VM stops.
    Fatal {
        message: String,
    },
}

/// Messages the host sends to init over the control channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HostCommand {
    /// The VM was just restored: set the wall clock, add entropy (clones of one snapshot
    /// must not share RNG state), and make the guest's network presence known again (the
    /// new VM monitor's user-mode network has an empty neighbour table). Answered with
    /// `GuestEvent::Refreshed`. `volumes`: the host directories bound to this VM's volume
    /// slots, mounted before the answer.
    Refresh {
        unix_nanos: u128,
        entropy: Vec<u8>,
        volumes: Vec<crate::VolumeMount>,
    },
}
