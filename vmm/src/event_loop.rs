//! The VMM's one epoll loop: queue notifications (ioeventfds), device backends (the vsock
//! muxer's epoll fd), vCPU exits, the guest's reset request, host input for the control
//! UART and a wake-up for whoever drives the VM. No busy polling: it sleeps in
//! `epoll_wait` until one of those fds fires.

use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::virtio::mmio::MmioTransport;
use crate::error::{Result, VmmError};

/// What woke the loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    Queue {
        device: usize,
        queue: usize,
    },
    Backend {
        device: usize,
    },
    VcpuExit,
    Reset,
    /// The VM's owner has a command for the thread running the loop.
    Woken,
    /// The host stream feeding a UART is readable.
    SerialInput,
    /// The guest emptied that UART's input FIFO.
    SerialDrained,
}

const TOKEN_VCPU_EXIT: u64 = u64::MAX;
const TOKEN_RESET: u64 = u64::MAX - 1;
const TOKEN_WOKEN: u64 = u64::MAX - 2;
const TOKEN_SERIAL_INPUT: u64 = u64::MAX - 3;
const TOKEN_SERIAL_DRAINED: u64 = u64::MAX - 4;
const BACKEND_QUEUE: u64 = 0xffff;

fn token(device: usize, queue: u64) -> u64 {
    ((device as u64) << 16) | queue
}

pub struct EventLoop {
    epoll: Epoll,
}

impl EventLoop {
    pub fn new() -> Result<Self> {
        Ok(Self {
            epoll: Epoll::new().map_err(|e| VmmError::io("epoll_create", e))?,
        })
    }

    fn add(&self, fd: RawFd, data: u64) -> Result<()> {
        self.epoll
            .ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, data),
            )
            .map_err(|e| VmmError::io("epoll_ctl", e))
    }

    /// Watches a device's queue eventfds and backend fd.
    pub fn add_device(&self, index: usize, t: &Arc<Mutex<MmioTransport>>) -> Result<()> {
        let t = t.lock().unwrap_or_else(|p| p.into_inner());
        for (q, evt) in t.queue_evts.iter().enumerate() {
            self.add(evt.as_raw_fd(), token(index, q as u64))?;
        }
        if let Some(fd) = t.device().backend_fd() {
            self.add(fd, token(index, BACKEND_QUEUE))?;
        }
        Ok(())
    }

    pub fn add_vcpu_exit(&self, evt: &EventFd) -> Result<()> {
        self.add(evt.as_raw_fd(), TOKEN_VCPU_EXIT)
    }

    pub fn add_reset(&self, evt: &EventFd) -> Result<()> {
        self.add(evt.as_raw_fd(), TOKEN_RESET)
    }

    pub fn add_waker(&self, evt: &EventFd) -> Result<()> {
        self.add(evt.as_raw_fd(), TOKEN_WOKEN)
    }

    pub fn add_serial_input(&self, stream: RawFd, drained: RawFd) -> Result<()> {
        self.add(stream, TOKEN_SERIAL_INPUT)?;
        self.add(drained, TOKEN_SERIAL_DRAINED)
    }

    /// Reads from the serial input stream resume (`true`) or pause until the guest drains
    /// its FIFO (`false`).
    pub fn watch_serial_input(&self, stream: RawFd, on: bool) -> Result<()> {
        let events = if on { EventSet::IN } else { EventSet::empty() };
        self.epoll
            .ctl(
                ControlOperation::Modify,
                stream,
                EpollEvent::new(events, TOKEN_SERIAL_INPUT),
            )
            .map_err(|e| VmmError::io("epoll_ctl", e))
    }

    /// Stops watching `fd` (a hung-up stream reports EPOLLHUP even with no events asked).
    pub fn remove(&self, fd: RawFd) -> Result<()> {
        self.epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default())
            .map_err(|e| VmmError::io("epoll_ctl", e))
    }

    /// Waits up to `timeout_ms` (-1: forever) and returns what fired.
    pub fn wait(&self, timeout_ms: i32) -> Result<Vec<Wake>> {
        let mut events = [EpollEvent::default(); 64];
        let n = match self.epoll.wait(timeout_ms, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => 0,
            Err(e) => return Err(VmmError::io("epoll_wait", e)),
        };
        Ok(events[..n]
            .iter()
            .map(|e| match e.data() {
                TOKEN_VCPU_EXIT => Wake::VcpuExit,
                TOKEN_RESET => Wake::Reset,
                TOKEN_WOKEN => Wake::Woken,
                TOKEN_SERIAL_INPUT => Wake::SerialInput,
                TOKEN_SERIAL_DRAINED => Wake::SerialDrained,
                d if d & 0xffff == BACKEND_QUEUE => Wake::Backend {
                    device: (d >> 16) as usize,
                },
                d => Wake::Queue {
                    device: (d >> 16) as usize,
                    queue: (d & 0xffff) as usize,
                },
            })
            .collect())
    }
}
