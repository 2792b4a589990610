//! x86_64: the guest physical memory map, the Linux 64-bit boot protocol (zero page, e820,
//! identity page tables, GDT, long mode registers), CPUID and boot MSRs.

pub mod boot;
pub mod cpuid;
pub mod layout;
pub mod mptable;
pub mod msr;
