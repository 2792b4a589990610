//! Host input for a UART: bytes from a host stream (the control channel) queued into the
//! guest's receive FIFO as fast as the guest reads it. The FIFO holds only 64 bytes, so the
//! host stream is read only when everything read before has been queued, and more is queued
//! when the guest has emptied the FIFO ([`InputDrained`](super::serial::InputDrained)).

use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

use super::serial::SerialDevice;

/// What the event loop should watch on the host stream after an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamWatch {
    /// Readable: read more.
    Read,
    /// Input is still waiting for FIFO room: do not read (the drain event resumes it).
    Pause,
    /// The host closed its end (or it failed): stop watching for good.
    Closed,
}

pub struct SerialInput {
    stream: UnixStream,
    serial: Arc<Mutex<SerialDevice>>,
    drained: EventFd,
    pending: Vec<u8>,
    queued: usize,
    closed: bool,
}

impl SerialInput {
    /// `drained` is the eventfd the UART's `InputDrained` writes.
    pub fn new(stream: UnixStream, serial: Arc<Mutex<SerialDevice>>, drained: EventFd) -> Self {
        Self {
            stream,
            serial,
            drained,
            pending: Vec::new(),
            queued: 0,
            closed: false,
        }
    }

    pub fn stream_fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }

    pub fn drained_fd(&self) -> RawFd {
        self.drained.as_raw_fd()
    }

    /// The host stream is readable.
    pub fn on_readable(&mut self) -> StreamWatch {
        if self.queued < self.pending.len() {
            return StreamWatch::Pause;
        }
        let mut buf = [0u8; 4096];
        // SAFETY: `buf` is valid for writes of its length for the duration of the call; the
        // fd is the stream this struct owns. MSG_DONTWAIT keeps the stream itself blocking
        // for the guest-output side that writes to a clone of it.
        let n = unsafe {
            libc::recv(
                self.stream.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        match n {
            0 => self.closed = true,
            n if n > 0 => {
                self.pending.clear();
                self.pending.extend_from_slice(&buf[..n as usize]);
                self.queued = 0;
            }
            _ => {
                let e = std::io::Error::last_os_error();
                if !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                ) {
                    tracing::debug!(error = %e, "serial input stream");
                    self.closed = true;
                }
            }
        }
        self.push()
    }

    /// The guest emptied the FIFO.
    pub fn on_drained(&mut self) -> StreamWatch {
        let _ = self.drained.read();
        self.push()
    }

    /// Queues what fits; says whether to read more from the host.
    fn push(&mut self) -> StreamWatch {
        if self.queued < self.pending.len() {
            let mut serial = self.serial.lock().unwrap_or_else(|p| p.into_inner());
            self.queued += serial.enqueue(&self.pending[self.queued..]);
        }
        if self.closed {
            StreamWatch::Closed
        } else if self.queued < self.pending.len() {
            StreamWatch::Pause
        } else {
            StreamWatch::Read
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;
    use crate::devices::bus::BusDevice;
    use crate::devices::legacy::serial::InputDrained;
    use crate::devices::IrqTrigger;

    /// A guest driver reading the UART the way Linux's 8250 driver does: RBR while the
    /// line status says data is ready.
    fn guest_reads(serial: &Arc<Mutex<SerialDevice>>) -> Vec<u8> {
        let mut out = Vec::new();
        let mut s = serial.lock().unwrap();
        loop {
            let mut lsr = [0u8];
            s.read(5, &mut lsr);
            if lsr[0] & 1 == 0 {
                return out;
            }
            let mut b = [0u8];
            s.read(0, &mut b);
            out.push(b[0]);
        }
    }

    #[test]
    fn more_than_a_fifo_of_host_input_arrives_whole_and_in_order() {
        let drained = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let serial = Arc::new(Mutex::new(SerialDevice::new(
            IrqTrigger::new().unwrap(),
            InputDrained(drained.try_clone().unwrap()),
            Box::new(std::io::sink()),
        )));
        let (mut host, vmm_end) = UnixStream::pair().unwrap();
        let mut input = SerialInput::new(vmm_end, serial.clone(), drained);
        let sent: Vec<u8> = (0..1000u32).map(|i| (i * 7 % 251) as u8).collect();
        host.write_all(&sent).unwrap();

        let mut got = Vec::new();
        let mut watch = input.on_readable();
        assert_eq!(
            watch,
            StreamWatch::Pause,
            "1000 bytes do not fit a 64-byte FIFO"
        );
        while got.len() < sent.len() {
            got.extend(guest_reads(&serial));
            watch = match watch {
                StreamWatch::Pause => input.on_drained(),
                StreamWatch::Read => input.on_readable(),
                StreamWatch::Closed => panic!("closed early"),
            };
        }
        assert_eq!(got, sent);
        assert_eq!(watch, StreamWatch::Read);
        drop(host);
        assert_eq!(input.on_readable(), StreamWatch::Closed);
    }
}
