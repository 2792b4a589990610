//! Where agent streams come from. The agent code sees only [`AgentListener`] and
//! [`AgentStream`]: TCP on the QEMU backend (QEMU forwards a host port to it), AF_VSOCK on
//! the KVM backend.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use nix::sys::socket::{self, AddressFamily, Backlog, SockFlag, SockType, VsockAddr};

pub trait AgentStream: Read + Write + Send {
    fn try_clone_stream(&self) -> io::Result<Box<dyn AgentStream>>;
    /// Half-close: no more writes from us.
    fn shutdown_write(&self) -> io::Result<()>;
}

pub trait AgentListener: Send {
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

/// Where the virtio vsock driver lists the devices it drives.
const VIRTIO_VSOCK_DRIVER: &str = "/sys/bus/virtio/drivers/vmw_vsock_virtio_transport";

/// True when the VM has a virtio vsock device (the kvm backend gives one; QEMU here does
/// not). Read before the chroot, while init's /sys is visible.
pub fn vsock_device_present() -> bool {
    std::fs::read_dir(Path::new(VIRTIO_VSOCK_DRIVER))
        .map(|d| {
            d.flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with("virtio"))
        })
        .unwrap_or(false)
}

pub struct VsockAgentListener(OwnedFd);

impl VsockAgentListener {
    /// Listens on vsock `port` for the host (any CID: the host is the only peer).
    pub fn bind(port: u32) -> io::Result<Self> {
        let fd = socket::socket(
            AddressFamily::Vsock,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        socket::bind(fd.as_raw_fd(), &VsockAddr::new(libc::VMADDR_CID_ANY, port))?;
        socket::listen(&fd, Backlog::new(128).map_err(io::Error::from)?)?;
        Ok(Self(fd))
    }
}

impl AgentListener for VsockAgentListener {
    fn accept(&self) -> io::Result<Box<dyn AgentStream>> {
        let fd = socket::accept4(self.0.as_raw_fd(), SockFlag::SOCK_CLOEXEC)?;
        // SAFETY: accept4 just returned this descriptor and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Box::new(VsockStream(File::from(fd))))
    }
}

/// An accepted vsock stream: plain reads and writes on the socket.
pub struct VsockStream(File);

impl Read for VsockStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for VsockStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AgentStream for VsockStream {
    fn try_clone_stream(&self) -> io::Result<Box<dyn AgentStream>> {
        Ok(Box::new(VsockStream(self.0.try_clone()?)))
    }

    fn shutdown_write(&self) -> io::Result<()> {
        Ok(socket::shutdown(
            self.0.as_raw_fd(),
            socket::Shutdown::Write,
        )?)
    }
}
