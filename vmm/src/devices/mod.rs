//! Emulated devices: the bus that routes vCPU port/MMIO exits to them, the legacy PC
//! devices (serial, i8042) and virtio-mmio (block, vsock).

pub mod bus;
pub mod legacy;
pub mod virtio;

use vmm_sys_util::eventfd::EventFd;

/// An interrupt line: an eventfd KVM turns into an interrupt (irqfd).
pub struct IrqTrigger(pub EventFd);

impl IrqTrigger {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self(EventFd::new(libc::EFD_NONBLOCK)?))
    }
}

impl vm_superio::Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}
