//! The host's way to a jailed QEMU VM's agent. QEMU forwards the agent to a TCP port on
//! loopback, but a jailed worker's loopback is its own network namespace's: the host
//! cannot reach it. The worker relays instead: a unix socket in its run root (the host's
//! directory, bound into the jail) that speaks the kvm backend's vsock handshake
//! (`CONNECT <port>\n` -> `OK <n>\n`), so the host's agent client needs no new protocol.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;

use supermachine_backend::AgentEndpoint;

/// Starts the relay to `agent` (the agent's loopback address in this netns) and returns
/// the endpoint the host uses instead.
pub fn start(agent: SocketAddr, port: u16) -> std::io::Result<AgentEndpoint> {
    let path: PathBuf = std::env::temp_dir().join("agent.sock");
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    std::thread::Builder::new()
        .name("agent-relay".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                std::thread::spawn(move || relay(conn, agent));
            }
        })?;
    Ok(AgentEndpoint::Vsock {
        uds: path,
        port: u32::from(port),
    })
}

/// One connection: the handshake line (bounded), then bytes both ways.
fn relay(mut host: UnixStream, agent: SocketAddr) {
    let mut line = Vec::new();
    let mut b = [0u8];
    while line.len() < 64 {
        match host.read(&mut b) {
            Ok(1) if b[0] == b'\n' => break,
            Ok(1) => line.push(b[0]),
            _ => return,
        }
    }
    if !line.starts_with(b"CONNECT ") {
        return;
    }
    let Ok(guest) = TcpStream::connect(agent) else {
        return;
    };
    if host.write_all(b"OK 1\n").is_err() {
        return;
    }
    let (Ok(mut host2), Ok(mut guest2)) = (host.try_clone(), guest.try_clone()) else {
        return;
    };
    let up = std::thread::spawn(move || {
        let mut guest = guest;
        let _ = std::io::copy(&mut host, &mut guest);
        let _ = guest.shutdown(std::net::Shutdown::Write);
    });
    let _ = std::io::copy(&mut guest2, &mut host2);
    let _ = host2.shutdown(std::net::Shutdown::Write);
    let _ = up.join();
}
