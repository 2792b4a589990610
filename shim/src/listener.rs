//! Where agent streams come from. The agent code sees only [`AgentListener`] and
//! [`AgentStream`]: TCP on the QEMU backend (QEMU forwards a host port to it), AF_VSOCK on
//! the KVM backend.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};

pub trait AgentStream: Read + Write + Send {
    fn try_clone_stream(&self) -> io::Result<Box<dyn AgentStream>>;
    /// Half-close: no more writes from us.
    fn shutdown_write(&self) -> io::Result<()>;
}

pub trait AgentListener {
    fn accept(&self) -> io::Result<Box<dyn AgentStream>>;
}

impl AgentStream for TcpStream {
    fn try_clone_stream(&self) -> io::Result<Box<dyn AgentStream>> {
        Ok(Box::new(self.try_clone()?))
    }

    fn shutdown_write(&self) -> io::Result<()> {
        self.shutdown(Shutdown::Write)
    }
}

pub struct TcpAgentListener(TcpListener);

impl TcpAgentListener {
    /// Listens on every interface: QEMU's user-mode network delivers to eth0's address.
    pub fn bind(port: u16) -> io::Result<Self> {
        Ok(Self(TcpListener::bind(("0.0.0.0", port))?))
    }
}

impl AgentListener for TcpAgentListener {
    fn accept(&self) -> io::Result<Box<dyn AgentStream>> {
        let (s, _) = self.0.accept()?;
        s.set_nodelay(true)?;
        Ok(Box::new(s))
    }
}
