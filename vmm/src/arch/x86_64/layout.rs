//! Where things live in guest physical memory (the same map Firecracker uses).

/// The GDT.
pub const BOOT_GDT_START: u64 = 0x500;
/// An empty IDT (the kernel installs its own).
pub const BOOT_IDT_START: u64 = 0x520;
/// The Linux zero page (`struct boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity page tables: PML4, PDPTE, PDE (2 MiB pages covering the first 1 GiB).
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// The kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// Start of the extended BIOS data area; RAM below it is usable.
pub const EBDA_START: u64 = 0x9fc00;
/// Where the kernel image may start (1 MiB).
pub const HIMEM_START: u64 = 0x10_0000;
/// Devices live above guest RAM: the MMIO window starts at 3.25 GiB, so guest RAM is at most that.
pub const MMIO_START: u64 = 0xd000_0000;
/// Each virtio-mmio device gets one page.
pub const MMIO_DEVICE_SIZE: u64 = 0x1000;
/// The IRQ of the first virtio-mmio device; each further device takes the next.
pub const FIRST_VIRTIO_IRQ: u32 = 5;
/// virtio-mmio devices a VM can have: one IRQ each, from FIRST_VIRTIO_IRQ to the IOAPIC's
/// last pin (23).
pub const MAX_MMIO_DEVICES: usize = 24 - FIRST_VIRTIO_IRQ as usize;
/// Legacy UART IRQs: COM1 (console) and COM2 (control channel).
pub const COM1_IRQ: u32 = 4;
pub const COM2_IRQ: u32 = 3;
pub const COM1_PORT: u16 = 0x3f8;
pub const COM2_PORT: u16 = 0x2f8;
/// The i8042 controller (the guest resets through it: `reboot=k`).
pub const I8042_PORT: u16 = 0x60;
/// KVM's TSS and identity map pages, just below 4 GiB.
pub const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

/// Where virtio-mmio device `index` lives: its page's address and its IRQ (the one place
/// both are computed; the kernel command line announces the same).
pub fn mmio_slot(index: usize) -> (u64, u32) {
    (
        MMIO_START + index as u64 * MMIO_DEVICE_SIZE,
        FIRST_VIRTIO_IRQ + index as u32,
    )
}
