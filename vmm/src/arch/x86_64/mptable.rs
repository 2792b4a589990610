//! The Intel MultiProcessor table (spec 1.4): without ACPI it is how the guest kernel learns
//! about the vCPUs beyond the first and the IOAPIC. Written just below 640 KiB, in the
//! area the e820 map leaves out.

use vm_memory::{Bytes, GuestAddress};

use crate::error::{Result, VmmError};
use crate::vstate::memory::GuestMemoryMmap;

/// Where the floating pointer and the table go (the EBDA, not RAM in e820).
pub const MPTABLE_START: u64 = super::layout::EBDA_START;
const APIC_VERSION: u8 = 0x14;
const LAPIC_ADDR: u32 = 0xfee0_0000;
const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// IOAPIC inputs the guest can use.
const IRQ_COUNT: u8 = 24;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
/// Family 6: what the processor entries claim (the kernel takes features from CPUID).
const CPU_SIGNATURE: u32 = 0x600;
/// FPU and APIC present.
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |s, b| s.wrapping_add(*b))
        .wrapping_neg()
}

/// The table for `vcpus` vCPUs, as bytes to place at `MPTABLE_START`.
pub fn mptable(vcpus: u8) -> Vec<u8> {
    let ioapic_id = vcpus + 1;
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for id in 0..vcpus {
        let flags = CPU_ENABLED | if id == 0 { CPU_BOOTPROCESSOR } else { 0 };
        entries.extend_from_slice(&[0, id, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    // Bus 0: ISA.
    entries.extend_from_slice(&[1, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[2, ioapic_id, APIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 1;
    // ISA IRQ i -> IOAPIC input i, conforming polarity and trigger.
    for irq in 0..IRQ_COUNT {
        entries.extend_from_slice(&[3, 0, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    // LINT0: ExtINT, LINT1: NMI, to every local APIC.
    entries.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_addr = (MPTABLE_START + 16) as u32;
    let mut table = Vec::with_capacity(44 + entries.len());
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    table.push(4); // spec 1.4
    table.push(0); // checksum, below
    table.extend_from_slice(b"SUPERMCH");
    table.extend_from_slice(b"MICROVM     ");
    table.extend_from_slice(&0u32.to_le_bytes()); // no OEM table
    table.extend_from_slice(&0u16.to_le_bytes());
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    table.extend_from_slice(&0u32.to_le_bytes()); // no extended table
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut mpf = Vec::with_capacity(16);
    mpf.extend_from_slice(b"_MP_");
    mpf.extend_from_slice(&table_addr.to_le_bytes());
    mpf.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]);
    mpf[10] = checksum(&mpf);

    let mut out = mpf;
    out.extend_from_slice(&table);
    out
}

pub fn write_mptable(mem: &GuestMemoryMmap, vcpus: u8) -> Result<()> {
    let bytes = mptable(vcpus);
    if MPTABLE_START + bytes.len() as u64 > 0xa0000 {
        return Err(VmmError::Config(format!(
            "an MP table for {vcpus} vCPUs does not fit"
        )));
    }
    mem.write_slice(&bytes, GuestAddress(MPTABLE_START))
        .map_err(|e| VmmError::Memory(format!("writing the MP table: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_and_counts() {
        let t = mptable(4);
        assert_eq!(&t[0..4], b"_MP_");
        assert_eq!(t[..16].iter().fold(0u8, |s, b| s.wrapping_add(*b)), 0);
        let table = &t[16..];
        assert_eq!(&table[0..4], b"PCMP");
        let len = u16::from_le_bytes([table[4], table[5]]) as usize;
        assert_eq!(len, table.len());
        assert_eq!(table.iter().fold(0u8, |s, b| s.wrapping_add(*b)), 0);
        // 4 CPUs + bus + IOAPIC + 24 IRQs + 2 LINTs
        assert_eq!(
            u16::from_le_bytes([table[34], table[35]]),
            4 + 1 + 1 + 24 + 2
        );
        // The first processor entry is the enabled boot processor.
        assert_eq!(
            &table[44..48],
            &[0, 0, APIC_VERSION, CPU_ENABLED | CPU_BOOTPROCESSOR]
        );
        assert!(mptable(32).len() as u64 + MPTABLE_START <= 0xa0000);
    }
}
