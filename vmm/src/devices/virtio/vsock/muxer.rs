//! The host side of vsock: a unix listener per VM, the `CONNECT <port>` handshake, and
//! a connection per stream. It has its own epoll set (whose fd the VMM's event loop
//! watches), queues the control packets it owes the guest, and produces data packets
//! only as far as the guest's credit allows.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::csm::{ConnState, Connection, GuestEnd};
use super::packet::*;
use super::HOST_CID;

/// (host-side port, guest port)
type ConnKey = (u32, u32);

/// Host-initiated connections get local ports from here up.
const FIRST_LOCAL_PORT: u32 = 1 << 30;
const MAX_HANDSHAKE: usize = 64;
const MAX_CONNECTIONS: usize = 1024;

pub struct Muxer {
    cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    conns: HashMap<ConnKey, Connection>,
    by_fd: HashMap<RawFd, ConnKey>,
    /// Host streams that have not finished `CONNECT <port>\n` yet.
    handshakes: HashMap<RawFd, (UnixStream, Vec<u8>)>,
    /// Control packets owed to the guest, in order.
    ctrl: VecDeque<Header>,
    /// Connections whose host socket may have data for the guest.
    rx_ready: VecDeque<ConnKey>,
    next_local_port: u32,
}

impl Muxer {
    pub fn new(cid: u64, uds_path: &Path) -> io::Result<Self> {
        let _ = std::fs::remove_file(uds_path);
        let listener = UnixListener::bind(uds_path)?;
        listener.set_nonblocking(true)?;
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN, listener.as_raw_fd() as u64),
        )?;
        Ok(Self {
            cid,
            uds_path: uds_path.to_path_buf(),
            listener,
            epoll,
            conns: HashMap::new(),
            by_fd: HashMap::new(),
            handshakes: HashMap::new(),
            ctrl: VecDeque::new(),
            rx_ready: VecDeque::new(),
            next_local_port: FIRST_LOCAL_PORT,
        })
    }

    /// The guest CID this muxer addresses packets to (set when a prepared muxer gets the
    /// restored device's CID).
    pub fn set_cid(&mut self, cid: u64) {
        self.cid = cid;
    }

    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Drops every connection (after a restore the guest's side of them is gone too).
    pub fn reset(&mut self) {
        let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        for k in keys {
            self.remove(k);
        }
        self.ctrl.clear();
        self.rx_ready.clear();
    }

    /// Whether there may be something to send the guest.
    pub fn has_rx(&self) -> bool {
        !self.ctrl.is_empty() || !self.rx_ready.is_empty()
    }

    fn header(&mut self, key: ConnKey, op: u16, flags: u32) -> Header {
        let mut h = Header {
            src_cid: HOST_CID,
            dst_cid: self.cid,
            src_port: key.0,
            dst_port: key.1,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: 0,
            fwd_cnt: 0,
        };
        if let Some(c) = self.conns.get_mut(&key) {
            c.fill_credit(&mut h);
        }
        h
    }

    fn push_ctrl(&mut self, key: ConnKey, op: u16, flags: u32) {
        let h = self.header(key, op, flags);
        self.ctrl.push_back(h);
    }

    fn set_interest(&self, key: ConnKey, want_in: bool) {
        if let Some(c) = self.conns.get(&key).filter(|c| !c.host_gone) {
            let mut ev = EventSet::empty();
            // Once the host's end-of-file was passed on, reading again would only see it
            // again (a hang-up is reported regardless).
            if want_in && !c.host_eof {
                ev |= EventSet::IN | EventSet::READ_HANG_UP;
            }
            if c.has_pending_tx() {
                ev |= EventSet::OUT;
            }
            let fd = c.stream.as_raw_fd();
            let _ = self
                .epoll
                .ctl(ControlOperation::Modify, fd, EpollEvent::new(ev, fd as u64));
        }
    }

    fn add_conn(&mut self, c: Connection) -> io::Result<()> {
        let key = (c.local_port, c.peer_port);
        let fd = c.stream.as_raw_fd();
        self.epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::empty(), fd as u64),
        )?;
        self.by_fd.insert(fd, key);
        self.conns.insert(key, c);
        Ok(())
    }

    fn remove(&mut self, key: ConnKey) {
        if let Some(c) = self.conns.remove(&key) {
            let fd = c.stream.as_raw_fd();
            if !c.host_gone {
                let _ = self
                    .epoll
                    .ctl(ControlOperation::Delete, fd, EpollEvent::default());
            }
            self.by_fd.remove(&fd);
        }
        self.rx_ready.retain(|k| *k != key);
    }

    /// Ends a connection and tells the guest.
    fn kill(&mut self, key: ConnKey) {
        self.push_ctrl(key, OP_RST, 0);
        self.remove(key);
    }

    /// Acts on the guest's end of its side once every byte it sent has reached the host's
    /// stream: shut the stream for writing (SHUTDOWN_SEND), or end the connection (closed
    /// or reset). True when the connection is gone.
    fn finish_guest_side(&mut self, key: ConnKey) -> bool {
        let Some(c) = self.conns.get_mut(&key) else {
            return true;
        };
        if c.has_pending_tx() {
            return false;
        }
        match c.guest_end {
            GuestEnd::Open => false,
            GuestEnd::DoneSending => {
                if !c.host_write_shut {
                    c.host_write_shut = true;
                    let _ = c.stream.shutdown(std::net::Shutdown::Write);
                }
                false
            }
            GuestEnd::Closed => {
                self.kill(key);
                true
            }
            GuestEnd::Reset => {
                self.remove(key);
                true
            }
        }
    }

    /// Handles whatever the host side has ready (the muxer's epoll fd fired).
    pub fn process_events(&mut self) {
        let mut events = [EpollEvent::default(); 32];
        // A few rounds at most: the VMM's loop calls again while the epoll fd is ready.
        for _ in 0..4 {
            let n = match self.epoll.wait(0, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "vsock muxer epoll");
                    return;
                }
            };
            if n == 0 {
                return;
            }
            for ev in &events[..n] {
                let fd = ev.data() as RawFd;
                let set = ev.event_set();
                if fd == self.listener.as_raw_fd() {
                    self.accept_all();
                } else if self.handshakes.contains_key(&fd) {
                    self.advance_handshake(fd);
                } else if let Some(&key) = self.by_fd.get(&fd) {
                    if set.contains(EventSet::OUT) {
                        let failed = self
                            .conns
                            .get_mut(&key)
                            .map(|c| c.flush_to_host().is_err())
                            .unwrap_or(false);
                        if failed {
                            self.kill(key);
                            continue;
                        }
                        if self
                            .conns
                            .get(&key)
                            .is_some_and(|c| c.needs_credit_update())
                        {
                            self.push_ctrl(key, OP_CREDIT_UPDATE, 0);
                        }
                        if self.finish_guest_side(key) {
                            continue;
                        }
                    }
                    if set.intersects(EventSet::HANG_UP | EventSet::ERROR) {
                        // The host end is gone: epoll would report that forever, so stop
                        // watching; what is left to read is drained through rx_ready.
                        let _ = self
                            .epoll
                            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
                        if let Some(c) = self.conns.get_mut(&key) {
                            c.host_gone = true;
                        }
                        if !self.rx_ready.contains(&key) {
                            self.rx_ready.push_back(key);
                        }
                    } else if set.intersects(EventSet::IN | EventSet::READ_HANG_UP) {
                        if !self.rx_ready.contains(&key) {
                            self.rx_ready.push_back(key);
                        }
                        self.set_interest(key, false);
                    } else {
                        let armed = !self.rx_ready.contains(&key);
                        self.set_interest(key, armed);
                    }
                }
            }
        }
    }

    fn accept_all(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((s, _)) => {
                    if s.set_nonblocking(true).is_err() || self.handshakes.len() >= MAX_CONNECTIONS
                    {
                        continue;
                    }
                    let fd = s.as_raw_fd();
                    if self
                        .epoll
                        .ctl(
                            ControlOperation::Add,
                            fd,
                            EpollEvent::new(EventSet::IN, fd as u64),
                        )
                        .is_ok()
                    {
                        self.handshakes.insert(fd, (s, Vec::new()));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }

    fn drop_handshake(&mut self, fd: RawFd) {
        let _ = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        self.handshakes.remove(&fd);
    }

    fn advance_handshake(&mut self, fd: RawFd) {
        let Some((stream, buf)) = self.handshakes.get_mut(&fd) else {
            return;
        };
        let mut chunk = [0u8; MAX_HANDSHAKE];
        match stream.read(&mut chunk) {
            Ok(0) => return self.drop_handshake(fd),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(_) => return self.drop_handshake(fd),
        }
        let Some(nl) = buf.iter().position(|&b| b == b'\n') else {
            if buf.len() > MAX_HANDSHAKE {
                self.drop_handshake(fd);
            }
            return;
        };
        let line = String::from_utf8_lossy(&buf[..nl]).trim().to_string();
        let port = line
            .strip_prefix("CONNECT ")
            .and_then(|p| p.trim().parse::<u32>().ok());
        let (stream, _) = match self.handshakes.remove(&fd) {
            Some(h) => h,
            None => return,
        };
        let _ = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        let Some(port) = port else {
            let _ = (&stream).write_all(b"ERR bad handshake\n");
            return;
        };
        if self.conns.len() >= MAX_CONNECTIONS {
            let _ = (&stream).write_all(b"ERR too many connections\n");
            return;
        }
        let local = self.next_local_port;
        self.next_local_port = self.next_local_port.wrapping_add(1).max(FIRST_LOCAL_PORT);
        let conn = Connection::new(stream, local, port, ConnState::LocalInit);
        if self.add_conn(conn).is_ok() {
            self.push_ctrl((local, port), OP_REQUEST, 0);
        }
    }

    /// A packet from the guest.
    pub fn send_pkt(&mut self, pkt: Packet) {
        let h = pkt.hdr;
        if h.dst_cid != HOST_CID || h.src_cid != self.cid {
            tracing::debug!(?h, "vsock packet with foreign CIDs dropped");
            return;
        }
        let key = (h.dst_port, h.src_port);
        if h.type_ != TYPE_STREAM {
            if h.op != OP_RST {
                self.push_ctrl(key, OP_RST, 0);
            }
            return;
        }
        if !self.conns.contains_key(&key) {
            match h.op {
                OP_REQUEST => self.guest_connect(key),
                OP_RST => {}
                _ => self.push_ctrl(key, OP_RST, 0),
            }
            return;
        }
        let stalled = self.conns.get(&key).is_some_and(|c| c.peer_credit() == 0);
        if let Some(c) = self.conns.get_mut(&key) {
            c.update_peer_credit(&h);
        }
        let resumed = stalled && self.conns.get(&key).is_some_and(|c| c.peer_credit() > 0);
        match h.op {
            OP_RESPONSE => {
                let Some(c) = self.conns.get_mut(&key) else {
                    return;
                };
                if c.state != ConnState::LocalInit {
                    return self.kill(key);
                }
                c.state = ConnState::Established;
                let ok = format!("OK {}\n", c.local_port);
                if (&c.stream).write_all(ok.as_bytes()).is_err() {
                    return self.kill(key);
                }
                self.rx_ready.push_back(key);
            }
            OP_RW => {
                let Some(c) = self.conns.get_mut(&key) else {
                    return;
                };
                if c.state != ConnState::Established && c.state != ConnState::LocalClosed {
                    return self.kill(key);
                }
                if c.send_to_host(&pkt.data).is_err() {
                    return self.kill(key);
                }
                let want_in = !self.rx_ready.contains(&key);
                self.set_interest(key, want_in);
                if self
                    .conns
                    .get(&key)
                    .is_some_and(|c| c.needs_credit_update())
                {
                    self.push_ctrl(key, OP_CREDIT_UPDATE, 0);
                }
            }
            OP_CREDIT_REQUEST => self.push_ctrl(key, OP_CREDIT_UPDATE, 0),
            OP_CREDIT_UPDATE => {}
            OP_SHUTDOWN => {
                let Some(c) = self.conns.get_mut(&key) else {
                    return;
                };
                if h.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND) == SHUTDOWN_RCV | SHUTDOWN_SEND {
                    c.guest_end = GuestEnd::Closed;
                } else if h.flags & SHUTDOWN_SEND != 0 && c.guest_end == GuestEnd::Open {
                    c.guest_end = GuestEnd::DoneSending;
                }
                if self.finish_guest_side(key) {
                    return;
                }
            }
            OP_RST => {
                // What the guest sent before its reset is still the host's to read.
                if let Some(c) = self.conns.get_mut(&key) {
                    c.guest_end = GuestEnd::Reset;
                }
                self.finish_guest_side(key);
                return;
            }
            _ => self.kill(key),
        }
        if resumed && self.conns.contains_key(&key) && !self.rx_ready.contains(&key) {
            self.rx_ready.push_back(key);
        }
    }

    /// The guest connects to the host on port `key.0`: a listener at `<uds>_<port>`.
    fn guest_connect(&mut self, key: ConnKey) {
        let path = PathBuf::from(format!("{}_{}", self.uds_path.display(), key.0));
        let stream = match UnixStream::connect(&path) {
            Ok(s) if s.set_nonblocking(true).is_ok() => s,
            _ => return self.push_ctrl(key, OP_RST, 0),
        };
        if self.conns.len() >= MAX_CONNECTIONS {
            return self.push_ctrl(key, OP_RST, 0);
        }
        let conn = Connection::new(stream, key.0, key.1, ConnState::Established);
        if self.add_conn(conn).is_err() {
            return self.push_ctrl(key, OP_RST, 0);
        }
        self.push_ctrl(key, OP_RESPONSE, 0);
        self.rx_ready.push_back(key);
    }

    /// The next packet for the guest, with at most `max_data` payload bytes.
    pub fn next_rx(&mut self, max_data: usize) -> Option<Packet> {
        if let Some(hdr) = self.ctrl.pop_front() {
            return Some(Packet {
                hdr,
                data: Vec::new(),
            });
        }
        while let Some(key) = self.rx_ready.pop_front() {
            let Some(c) = self.conns.get_mut(&key) else {
                continue;
            };
            if c.state == ConnState::LocalInit || c.state == ConnState::LocalClosed {
                continue;
            }
            // After a half-close was passed on there is nothing to read; only a later
            // hang-up (which queues the connection again) is news.
            let read = if c.host_eof {
                if !c.host_gone {
                    continue;
                }
                Ok(Some(Vec::new()))
            } else {
                c.read_for_guest(max_data.min(MAX_PKT_DATA as usize))
            };
            match read {
                Ok(Some(data)) if data.is_empty() => {
                    let flags = if c.host_gone {
                        c.state = ConnState::LocalClosed;
                        SHUTDOWN_RCV | SHUTDOWN_SEND
                    } else {
                        // End-of-file without a hang-up: the host shut only its write side
                        // and may still read what the guest sends.
                        c.host_eof = true;
                        SHUTDOWN_SEND
                    };
                    let h = self.header(key, OP_SHUTDOWN, flags);
                    self.set_interest(key, false);
                    return Some(Packet { hdr: h, data });
                }
                Ok(Some(data)) => {
                    let mut h = self.header(key, OP_RW, 0);
                    h.len = data.len() as u32;
                    // More may be waiting: stay in line behind the others.
                    self.rx_ready.push_back(key);
                    return Some(Packet { hdr: h, data });
                }
                Ok(None) => {
                    if c.peer_credit() == 0 {
                        // Wait for the guest's credit update; ask once.
                        if !c.credit_requested {
                            c.credit_requested = true;
                            return Some(Packet {
                                hdr: self.header(key, OP_CREDIT_REQUEST, 0),
                                data: Vec::new(),
                            });
                        }
                    } else {
                        self.set_interest(key, true);
                    }
                }
                Err(_) => {
                    self.kill(key);
                    if let Some(hdr) = self.ctrl.pop_front() {
                        return Some(Packet {
                            hdr,
                            data: Vec::new(),
                        });
                    }
                }
            }
        }
        None
    }
}

impl Drop for Muxer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.uds_path);
    }
}
