//! Reaching the workload's ports: `Connect` bridges the agent stream to TCP 127.0.0.1:P (or
//! [::1]:P) with half-close both ways, so a workload listening on loopback only is still
//! reachable; `WaitListening` watches /proc/net/tcp{,6} for a LISTEN socket without sending
//! the workload any traffic.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use supermachine_protocol::agent::Reply;
use supermachine_protocol::write_frame;

use crate::listener::AgentStream;

pub fn connect(
    port: u16,
    mut from_host: Box<dyn AgentStream>,
    mut to_host: Box<dyn AgentStream>,
) -> Result<(), String> {
    let target =
        TcpStream::connect(("127.0.0.1", port)).or_else(|_| TcpStream::connect(("::1", port)));
    let target = match target {
        Ok(t) => t,
        Err(e) => {
            let msg = Reply::Error {
                kind: crate::error_kind(&e),
                message: format!("connecting to guest port {port}: {e}"),
            };
            return write_frame(&mut to_host, &msg).map_err(|e| e.to_string());
        }
    };
    let _ = target.set_nodelay(true);
    write_frame(&mut to_host, &Reply::Ok).map_err(|e| e.to_string())?;
    let mut target_rd = target.try_clone().map_err(|e| e.to_string())?;
    let mut target_wr = target;
    let upstream = std::thread::spawn(move || {
        let _ = copy(&mut from_host, &mut target_wr);
        let _ = target_wr.shutdown(Shutdown::Write);
    });
    let _ = copy(&mut target_rd, &mut to_host);
    let _ = to_host.shutdown_write();
    let _ = upstream.join();
    Ok(())
}

fn copy(r: &mut dyn Read, w: &mut dyn Write) -> io::Result<u64> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0;
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        w.write_all(&buf[..n])?;
        total += n as u64;
    }
}

/// True when /proc/net/tcp or tcp6 shows a socket in LISTEN (state 0A) on `port`.
pub fn is_listening(port: u16) -> bool {
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|p| {
        std::fs::read_to_string(p)
            .map(|t| table_has_listener(&t, port))
            .unwrap_or(false)
    })
}

fn table_has_listener(table: &str, port: u16) -> bool {
    table.lines().skip(1).any(|l| {
        let mut f = l.split_whitespace();
        let local = f.nth(1);
        let state = f.nth(1);
        match (local.and_then(|a| a.rsplit_once(':')), state) {
            (Some((_, p)), Some("0A")) => u16::from_str_radix(p, 16) == Ok(port),
            _ => false,
        }
    })
}

pub fn wait_listening(port: u16, timeout: Duration) -> io::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if is_listening(port) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("nothing listens on guest port {port} after {timeout:?}"),
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_net_tcp() {
        let t = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 00000000:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0\n   1: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0 100 0 0 10 0\n";
        assert!(table_has_listener(t, 80));
        assert!(!table_has_listener(t, 8080), "established, not listening");
        assert!(!table_has_listener(t, 81));
    }
}
