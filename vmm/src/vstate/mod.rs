//! The KVM side of a microVM: guest memory, the VM (irqchip, PIT, clock), the vCPUs.

pub mod memory;
pub mod vcpu;
pub mod vm;
