//! One connection: its state and the credit accounting of the virtio-vsock protocol. The
//! guest may send only as much as our buffer has room for (`buf_alloc - (sent - fwd_cnt)`),
//! and we send it only as much as it advertised; a guest that overruns is reset.

use std::io::{self, Read, Write};
use std::num::Wrapping;
use std::os::unix::net::UnixStream;

use super::packet::Header;

/// The receive buffer we advertise to the guest per connection.
pub const CONN_BUF_ALLOC: u32 = 256 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    /// The host connected; REQUEST sent, waiting for the guest's RESPONSE.
    LocalInit,
    /// Data flows both ways.
    Established,
    /// We told the guest the host side closed; waiting for its RST.
    LocalClosed,
}

/// How far the guest has ended its side of a connection. Whatever it sent before is still
/// written to the host's stream first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestEnd {
    Open,
    /// SHUTDOWN_SEND: it sends no more; the host's stream is shut for writing.
    DoneSending,
    /// SHUTDOWN of both sides: the connection ends, and the guest waits for our RST.
    Closed,
    /// RST: the connection ends, nothing owed.
    Reset,
}

pub struct Connection {
    pub stream: UnixStream,
    pub local_port: u32,
    pub peer_port: u32,
    pub state: ConnState,
    /// Guest → host bytes the host socket has not taken yet.
    tx_buf: Vec<u8>,
    /// Bytes from the guest written to the host socket.
    fwd_cnt: Wrapping<u32>,
    last_fwd_cnt_sent: Wrapping<u32>,
    /// Bytes sent to the guest.
    rx_cnt: Wrapping<u32>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// We asked the guest for a credit update and have not heard back.
    pub credit_requested: bool,
    /// The host hung up; the socket is no longer watched.
    pub host_gone: bool,
    /// The host's stream reached end-of-file and the guest was told (SHUTDOWN_SEND): the
    /// host may have closed only its write side, so data still flows to it.
    pub host_eof: bool,
    /// How far the guest has ended its side.
    pub guest_end: GuestEnd,
    /// The host stream's write side was shut (after `guest_eof`).
    pub host_write_shut: bool,
}

impl Connection {
    pub fn new(stream: UnixStream, local_port: u32, peer_port: u32, state: ConnState) -> Self {
        Self {
            stream,
            local_port,
            peer_port,
            state,
            tx_buf: Vec::new(),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            rx_cnt: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            credit_requested: false,
            host_gone: false,
            host_eof: false,
            guest_end: GuestEnd::Open,
            host_write_shut: false,
        }
    }

    /// Every packet from the guest carries its buffer size and consumed count.
    pub fn update_peer_credit(&mut self, hdr: &Header) {
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
        self.credit_requested = false;
    }

    /// How many bytes the guest can take now.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Header fields that describe our side's credit.
    pub fn fill_credit(&mut self, hdr: &mut Header) {
        hdr.buf_alloc = CONN_BUF_ALLOC;
        hdr.fwd_cnt = self.fwd_cnt.0;
        self.last_fwd_cnt_sent = self.fwd_cnt;
    }

    /// Whether we owe the guest a credit update (a quarter of the buffer freed).
    pub fn needs_credit_update(&self) -> bool {
        (self.fwd_cnt - self.last_fwd_cnt_sent).0 >= CONN_BUF_ALLOC / 4
    }

    /// Guest → host data. Err if the guest overran its credit or the host socket failed.
    pub fn send_to_host(&mut self, data: &[u8]) -> io::Result<()> {
        if self.tx_buf.len() + data.len() > CONN_BUF_ALLOC as usize {
            return Err(io::Error::other("the guest sent more than its credit"));
        }
        self.tx_buf.extend_from_slice(data);
        self.flush_to_host()
    }

    /// Writes buffered guest data to the host socket as far as it takes it.
    pub fn flush_to_host(&mut self) -> io::Result<()> {
        while !self.tx_buf.is_empty() {
            match self.stream.write(&self.tx_buf) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.tx_buf.drain(..n);
                    self.fwd_cnt += Wrapping(n as u32);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    pub fn has_pending_tx(&self) -> bool {
        !self.tx_buf.is_empty()
    }

    /// Host → guest: up to `max` bytes (bounded by the guest's credit). `Ok(None)` when the
    /// host has nothing now; `Ok(Some(empty))` at EOF.
    pub fn read_for_guest(&mut self, max: usize) -> io::Result<Option<Vec<u8>>> {
        let n = max.min(self.peer_credit() as usize);
        if n == 0 {
            return Ok(None);
        }
        let mut buf = vec![0u8; n];
        loop {
            match self.stream.read(&mut buf) {
                Ok(got) => {
                    buf.truncate(got);
                    self.rx_cnt += Wrapping(got as u32);
                    return Ok(Some(buf));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}
