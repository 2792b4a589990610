//! The control channel to the host: a dedicated serial port (ttyS1) in raw mode carrying
//! length-prefixed frames (see `supermachine_protocol::frame`). The console (ttyS0) is for
//! humans only; nothing the host acts on is scraped from it.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::{Arc, Mutex};

use nix::sys::termios::{self, SetArg};
use supermachine_protocol::{encode_frame, GuestEvent};

const CHANNEL_DEVICE: &str = "/dev/ttyS1";

/// Cheap to clone: every clone writes whole frames to the same port.
#[derive(Clone)]
pub struct Channel {
    port: Arc<Mutex<File>>,
}

impl Channel {
    pub fn open() -> std::io::Result<Self> {
        let port = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY)
            .open(CHANNEL_DEVICE)?;
        let mut t = termios::tcgetattr(&port)?;
        termios::cfmakeraw(&mut t);
        termios::tcsetattr(&port, SetArg::TCSANOW, &t)?;
        Ok(Self {
            port: Arc::new(Mutex::new(port)),
        })
    }

    /// Sends one event. A failure here leaves the host without news, which it treats as a
    /// crashed guest, so the error is only logged to the console.
    pub fn send(&self, event: &GuestEvent) {
        let bytes = match encode_frame(event) {
            Ok(b) => b,
            Err(e) => {
                crate::console(&format!("supermachine-init: encoding event: {e}"));
                return;
            }
        };
        let mut port = match self.port.lock() {
            Ok(p) => p,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Err(e) = port.write_all(&bytes) {
            crate::console(&format!("supermachine-init: control channel write: {e}"));
        }
    }

    /// A second handle for reading the host's commands.
    pub fn reader(&self) -> std::io::Result<File> {
        let port = match self.port.lock() {
            Ok(p) => p,
            Err(poisoned) => poisoned.into_inner(),
        };
        port.try_clone()
    }

    /// Waits until everything written has left the port: the VM powers off right after.
    pub fn drain(&self) {
        let port = match self.port.lock() {
            Ok(p) => p,
            Err(poisoned) => poisoned.into_inner(),
        };
        let _ = termios::tcdrain(&*port);
    }
}
