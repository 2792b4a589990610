//! Frames over the worker's SOCK_SEQPACKET socket, optionally with one file descriptor.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;

use sendfd::{RecvWithFd, SendWithFd};
use serde::{de::DeserializeOwned, Serialize};
use supermachine_protocol::worker::MAX_WORKER_MESSAGE;
use supermachine_protocol::{decode_frame, encode_frame};

/// A connected SOCK_SEQPACKET pair: (host end, worker end).
pub fn pair() -> io::Result<(UnixDatagram, UnixDatagram)> {
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    let (a, b) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|e| io::Error::from_raw_os_error(e as i32))?;
    Ok((UnixDatagram::from(a), UnixDatagram::from(b)))
}

fn bad(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

pub fn send<T: Serialize>(sock: &UnixDatagram, msg: &T, fd: Option<RawFd>) -> io::Result<()> {
    let bytes = encode_frame(msg).map_err(bad)?;
    if bytes.len() > MAX_WORKER_MESSAGE {
        return Err(bad(format!(
            "worker message of {} bytes is too large",
            bytes.len()
        )));
    }
    let fds: Vec<RawFd> = fd.into_iter().collect();
    let n = sock.send_with_fd(&bytes, &fds)?;
    if n != bytes.len() {
        return Err(bad("short send on the worker socket"));
    }
    Ok(())
}

/// The next message and the descriptor that came with it; `Ok(None)` when the peer is gone.
pub fn recv<T: DeserializeOwned>(sock: &UnixDatagram) -> io::Result<Option<(T, Option<OwnedFd>)>> {
    let mut buf = vec![0u8; MAX_WORKER_MESSAGE];
    let mut fds = [0 as RawFd; 1];
    let (n, nfds) = sock.recv_with_fd(&mut buf, &mut fds)?;
    // SAFETY: the kernel just installed this descriptor for us; we are its only owner.
    let fd = (nfds > 0).then(|| unsafe { OwnedFd::from_raw_fd(fds[0]) });
    if n == 0 {
        return Ok(None);
    }
    match decode_frame::<T>(&buf[..n]).map_err(bad)? {
        Some((msg, used)) if used == n => Ok(Some((msg, fd))),
        _ => Err(bad("malformed worker message")),
    }
}
