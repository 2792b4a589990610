//! The Linux 64-bit boot protocol: the kernel ELF is loaded by linux-loader, the zero page
//! gets the e820 map, command line and initrd, and the boot vCPU starts in long mode at
//! the ELF entry with identity-mapped page tables and `rsi` pointing at the zero page.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::boot_params;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::layout::*;
use crate::error::{Result, VmmError};
use crate::vstate::memory::GuestMemoryMmap;

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
const E820_RAM: u32 = 1;

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// Writes the zero page: e820 (RAM below the EBDA and from 1 MiB to the end of memory),
/// the command line pointer and, if given, the initrd.
pub fn configure_zero_page(
    mem: &GuestMemoryMmap,
    cmdline_size: usize,
    initrd: Option<(GuestAddress, usize)>,
) -> Result<()> {
    let mut params = boot_params::default();
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_size as u32;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr.raw_value() as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    let end = mem.last_addr().raw_value() + 1;
    let entries = [(0u64, EBDA_START), (HIMEM_START, end - HIMEM_START)];
    for (i, (addr, size)) in entries.iter().enumerate() {
        params.e820_table[i].addr = *addr;
        params.e820_table[i].size = *size;
        params.e820_table[i].r#type = E820_RAM;
    }
    params.e820_entries = entries.len() as u8;
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )
    .map_err(|e| VmmError::Memory(format!("writing the zero page: {e}")))
}

/// Where the initrd goes: page-aligned at the top of guest RAM.
pub fn initrd_address(mem: &GuestMemoryMmap, size: usize) -> Result<GuestAddress> {
    let region = mem
        .iter()
        .next()
        .ok_or_else(|| VmmError::Memory("no guest memory".into()))?;
    let top = region.start_addr().raw_value() + region.len();
    let addr = top
        .checked_sub(size as u64)
        .map(|a| a & !(crate::vstate::memory::PAGE_SIZE as u64 - 1))
        .filter(|a| *a >= HIMEM_START)
        .ok_or_else(|| VmmError::Memory(format!("an initrd of {size} bytes does not fit")))?;
    Ok(GuestAddress(addr))
}

/// A GDT entry from flags, base and limit (the packing the hardware wants).
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((u64::from(base) & 0xff00_0000) << (56 - 24))
        | ((u64::from(flags) & 0x0000_f0ff) << 40)
        | ((u64::from(limit) & 0x000f_0000) << (48 - 16))
        | ((u64::from(base) & 0x00ff_ffff) << 16)
        | (u64::from(limit) & 0x0000_ffff)
}

fn segment_from_gdt(entry: u64, table_index: u8) -> kvm_segment {
    let flag = |shift: u32, mask: u64| ((entry >> shift) & mask) as u8;
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | (((entry >> 56) & 0xff) << 24),
        limit: (((entry >> 32) & 0xf_0000) | (entry & 0xffff)) as u32,
        selector: u16::from(table_index) * 8,
        type_: flag(40, 0xf),
        present: flag(47, 1),
        dpl: flag(45, 0x3),
        db: flag(54, 1),
        s: flag(44, 1),
        l: flag(53, 1),
        g: flag(55, 1),
        avl: flag(52, 1),
        padding: 0,
        unusable: u8::from(flag(47, 1) == 0),
    }
}

/// Long mode system registers: GDT/IDT written to guest memory, flat segments, identity
/// page tables for the first GiB, paging and protection on.
pub fn setup_sregs(mem: &GuestMemoryMmap, sregs: &mut kvm_sregs) -> Result<()> {
    let gdt = [
        gdt_entry(0, 0, 0),            // NULL
        gdt_entry(0xa09b, 0, 0xfffff), // CODE
        gdt_entry(0xc093, 0, 0xfffff), // DATA
        gdt_entry(0x808b, 0, 0xfffff), // TSS
    ];
    let err = |e: vm_memory::GuestMemoryError| VmmError::Memory(e.to_string());
    for (i, entry) in gdt.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(BOOT_GDT_START + i as u64 * 8))
            .map_err(err)?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(err)?;
    let code = segment_from_gdt(gdt[1], 1);
    let data = segment_from_gdt(gdt[2], 2);
    let tss = segment_from_gdt(gdt[3], 3);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr0 |= X86_CR0_PE | X86_CR0_ET;
    sregs.efer |= EFER_LME | EFER_LMA;

    // PML4[0] -> PDPTE, PDPTE[0] -> PDE, 512 x 2 MiB pages.
    mem.write_obj(PDPTE_START | 0x03, GuestAddress(PML4_START))
        .map_err(err)?;
    mem.write_obj(PDE_START | 0x03, GuestAddress(PDPTE_START))
        .map_err(err)?;
    for i in 0..512u64 {
        mem.write_obj((i << 21) | 0x83, GuestAddress(PDE_START + i * 8))
            .map_err(err)?;
    }
    sregs.cr3 = PML4_START;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.cr0 |= X86_CR0_PG;
    Ok(())
}

/// General registers of the boot vCPU: entry point, stack, zero page in `rsi`.
pub fn boot_regs(entry: GuestAddress) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: entry.raw_value(),
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        ..Default::default()
    }
}

/// x87/SSE defaults (FCW and MXCSR as after FNINIT / reset).
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_round_trip_to_segments() {
        let code = segment_from_gdt(gdt_entry(0xa09b, 0, 0xfffff), 1);
        assert_eq!(
            (code.l, code.present, code.type_, code.g, code.selector),
            (1, 1, 0xb, 1, 8)
        );
        assert_eq!(code.limit, 0xfffff);
        let data = segment_from_gdt(gdt_entry(0xc093, 0, 0xfffff), 2);
        assert_eq!((data.db, data.l, data.type_, data.selector), (1, 0, 3, 16));
        assert_eq!(segment_from_gdt(gdt_entry(0, 0, 0), 0).unusable, 1);
    }

    #[test]
    fn page_tables_identity_map_the_first_gib() {
        let (mem, _f) = crate::vstate::memory::create_memfd_memory(2 << 20).unwrap();
        let mut sregs = kvm_sregs::default();
        setup_sregs(&mem, &mut sregs).unwrap();
        let pde: u64 = mem.read_obj(GuestAddress(PDE_START + 8 * 3)).unwrap();
        assert_eq!(pde, (3 << 21) | 0x83);
        assert_eq!(sregs.cr3, PML4_START);
        assert!(sregs.cr0 & X86_CR0_PG != 0 && sregs.efer & EFER_LMA != 0);
    }

    #[test]
    fn zero_page_has_the_e820_map() {
        let (mem, _f) = crate::vstate::memory::create_memfd_memory(64 << 20).unwrap();
        configure_zero_page(&mem, 100, None).unwrap();
        let p: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!(p.e820_entries, 2);
        let e = p.e820_table[1];
        assert_eq!({ e.addr }, HIMEM_START);
        assert_eq!({ e.size }, (64 << 20) - HIMEM_START);
        assert_eq!({ p.hdr.cmd_line_ptr }, CMDLINE_START as u32);
    }
}
