//! supermachine-vmm: the kvm backend. Our own virtual machine monitor on rust-vmm crates —
//! a KVM VM with an in-kernel irqchip and PIT, guest memory through vm-memory, the kernel
//! loaded by linux-loader, a thread per vCPU, 8250 serial ports, an i8042 for reset, and
//! virtio-mmio block and vsock devices driven from one epoll loop. A running VM can be
//! paused and saved to a `restore.snap` whose guest memory is later mapped `MAP_PRIVATE`
//! for a copy-on-write restore (nothing copied).
//!
//! Layout follows Firecracker: `vstate/` is the KVM side (VM, vCPU, memory), `arch/` the
//! x86_64 boot protocol, `devices/` one folder per device with its `persist.rs`,
//! `snapshot/` the file format. `builder.rs` builds a VM from a config or a snapshot (and
//! prepares one ahead), `device_manager.rs` places devices in MMIO slots and wires them to
//! KVM, `microvm.rs` is the running VM (event loop, pause + snapshot, stop) and
//! `persist.rs` composes the per-device states into the state `restore.snap` holds.

pub mod arch;
pub mod builder;
pub(crate) mod device_manager;
pub mod devices;
pub mod error;
pub mod event_loop;
pub(crate) mod microvm;
pub(crate) mod persist;
pub mod snapshot;
pub mod testing;
pub mod thread_filter;
pub mod vstate;

pub use arch::x86_64::layout::MAX_MMIO_DEVICES;
pub use builder::{BlockConfig, ExitReason, FsConfig, MicroVm, MicroVmConfig, VsockConfig};
pub use error::VmmError;
