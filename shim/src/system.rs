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

pub fn set_time(unix_nanos: u128) -> io::Result<()> {
    let ts = nix::sys::time::TimeSpec::new(
        (unix_nanos / 1_000_000_000) as i64,
        (unix_nanos % 1_000_000_000) as i64,
    );
    nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, ts).map_err(io_err)
}

/// Credits `bytes` to the kernel's entropy pool (RNDADDENTROPY), so VMs cloned from one
/// snapshot diverge.
pub fn add_entropy(bytes: &[u8]) -> io::Result<()> {
    if bytes.len() > 4096 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "at most 4096 bytes of entropy at once",
        ));
    }
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut req = Vec::with_capacity(8 + bytes.len());
    req.extend_from_slice(&((bytes.len() * 8) as i32).to_ne_bytes());
    req.extend_from_slice(&(bytes.len() as i32).to_ne_bytes());
    req.extend_from_slice(bytes);
    const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
    // SAFETY: `req` is a valid rand_pool_info of the length it declares and outlives the call.
    if unsafe { libc::ioctl(f.as_raw_fd(), RNDADDENTROPY, req.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
