//! Whole-guest operations: signal the workload, set the clock, add entropy.

use std::io;
use std::os::fd::AsRawFd;

use crate::Context;

fn io_err(e: nix::Error) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// Reads the workload's pid from init's run directory and signals it.
pub fn signal_workload(ctx: &Context, signum: i32) -> io::Result<()> {
    let fd = nix::fcntl::openat(
        Some(ctx.run_dir.as_raw_fd()),
        "workload.pid",
        nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| {
        if e == nix::Error::ENOENT {
            io::Error::new(io::ErrorKind::NotFound, "the workload has not started")
        } else {
            io_err(e)
        }
    })?;
    // SAFETY: openat just returned this descriptor; the File owns and closes it.
    let mut f = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let mut text = String::new();
    io::Read::read_to_string(&mut f, &mut text)?;
    let pid: i32 = text
        .trim()
        .parse()
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad workload pid file"))?;
    let sig = nix::sys::signal::Signal::try_from(signum)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, format!("no signal {signum}")))?;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig).map_err(io_err)
}

pub use supermachine_init::system::{add_entropy, set_time};
