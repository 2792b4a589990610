//! Hostname and the loopback interface.

use std::fs;
use std::path::Path;

pub fn set_hostname(name: &str, new_root: &str) -> std::io::Result<()> {
    if name.is_empty() {
        return Ok(());
    }
    nix::unistd::sethostname(name)?;
    let etc = Path::new(new_root).join("etc");
    if etc.is_dir() {
        fs::write(etc.join("hostname"), format!("{name}\n"))?;
        let hosts = format!(
            "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{name}\n"
        );
        fs::write(etc.join("hosts"), hosts)?;
    }
    Ok(())
}

/// `ip link set lo up`, through SIOCSIFFLAGS.
pub fn loopback_up() -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    set_up(control_socket()?.as_raw_fd(), b"lo\0")
}

/// A socket to issue interface ioctls on.
fn control_socket() -> std::io::Result<std::os::fd::OwnedFd> {
    Ok(nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )?)
}

/// A zeroed ifreq naming interface `name` (NUL-terminated).
fn ifreq_named(name: &[u8]) -> libc::ifreq {
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name) {
        *dst = *src as libc::c_char;
    }
    req
}

/// The guest address on QEMU's user-mode network (its default guest address).
pub const GUEST_IP: [u8; 4] = [10, 0, 2, 15];
const NETMASK: [u8; 4] = [255, 255, 255, 0];

/// Configures eth0 statically (no DHCP client in images) when the backend gave one.
pub fn eth0_up() -> std::io::Result<bool> {
    if !Path::new("/sys/class/net/eth0").exists() {
        return Ok(false);
    }
    use std::os::fd::AsRawFd;
    let sock = control_socket()?;
    let fd = sock.as_raw_fd();
    let ifreq_for = |addr: [u8; 4]| {
        let mut req = ifreq_named(b"eth0\0");
        // SAFETY: sockaddr_in fits in the sockaddr union member; both are plain data.
        unsafe {
            std::ptr::write(
                &mut req.ifr_ifru.ifru_addr as *mut libc::sockaddr as *mut libc::sockaddr_in,
                sockaddr_in(addr),
            )
        };
        req
    };
    for (request, addr) in [
        (libc::SIOCSIFADDR, GUEST_IP),
        (libc::SIOCSIFNETMASK, NETMASK),
    ] {
        let req = ifreq_for(addr);
        // SAFETY: `req` is a valid ifreq for eth0; the kernel only reads it.
        if unsafe { libc::ioctl(fd, request, &req) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    set_up(fd, b"eth0\0")?;
    Ok(true)
}

fn set_up(fd: i32, name: &[u8]) -> std::io::Result<()> {
    let mut req = ifreq_named(name);
    // SAFETY: `req` is a valid ifreq that outlives the call.
    if unsafe { libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    unsafe { req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: as above; the kernel only reads `req`.
    if unsafe { libc::ioctl(fd, libc::SIOCSIFFLAGS, &req) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The gateway of QEMU's user-mode network.
const GATEWAY_IP: [u8; 4] = [10, 0, 2, 2];

/// Makes the guest ARP for the gateway, which teaches a freshly started user-mode network
/// our MAC (it learns from ARP requests); without it the first inbound connection after a
/// restore waits on the network's own ARP retry (50-170 ms measured).
pub fn announce() -> std::io::Result<()> {
    if !Path::new("/sys/class/net/eth0").exists() {
        return Ok(());
    }
    use std::os::fd::AsRawFd;
    let sock = std::net::UdpSocket::bind("0.0.0.0:0")?;
    // SAFETY: arpreq is plain old data; all-zero is a valid value.
    let mut req: libc::arpreq = unsafe { std::mem::zeroed() };
    // SAFETY: sockaddr_in fits in sockaddr; both are plain data.
    unsafe {
        std::ptr::write(
            &mut req.arp_pa as *mut libc::sockaddr as *mut libc::sockaddr_in,
            sockaddr_in(GATEWAY_IP),
        )
    };
    for (dst, src) in req.arp_dev.iter_mut().zip(b"eth0\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: `req` is a valid arpreq; the kernel only reads it. A missing entry (ENXIO) is fine.
    unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCDARP, &req) };
    // Any datagram to the gateway now needs a fresh ARP request (the datagram itself is
    // dropped by the restricted network; it only serves to trigger the request).
    let _ = sock.send_to(&[0], (std::net::Ipv4Addr::from(GATEWAY_IP), 9));
    Ok(())
}

/// An IPv4 socket address (port 0) for the ioctls above.
fn sockaddr_in(ip: [u8; 4]) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(ip),
        },
        sin_zero: [0; 8],
    }
}
