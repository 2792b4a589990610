//! Clock and entropy: what a restored clone needs so it does not share its siblings' RNG
//! state or a stale wall clock.

use std::io;
use std::os::fd::AsRawFd;

fn io_err(e: nix::Error) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

pub fn set_time(unix_nanos: u128) -> io::Result<()> {
    let ts = nix::sys::time::TimeSpec::new(
        (unix_nanos / 1_000_000_000) as i64,
        (unix_nanos % 1_000_000_000) as i64,
    );
    nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, ts).map_err(io_err)
}

/// Credits `bytes` to the kernel's entropy pool (RNDADDENTROPY) and reseeds the CRNG, so
/// VMs cloned from one snapshot diverge at once.
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
    // The kernel reseeds its CRNG from the pool only every minute or so; clones of one
    // snapshot would keep producing identical output until then. Reseed now.
    const RNDRESEEDCRNG: libc::c_ulong = 0x5207;
    // SAFETY: RNDRESEEDCRNG takes no argument.
    if unsafe { libc::ioctl(f.as_raw_fd(), RNDRESEEDCRNG) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
