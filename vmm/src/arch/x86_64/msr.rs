//! Model-specific registers: the values a boot vCPU starts with, and the set saved in a
//! snapshot (every MSR KVM lists that it will also read back).

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::{Kvm, VcpuFd};

use crate::error::{Result, VmmError};

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// The LAPIC timer's deadline in TSC-deadline mode.
pub const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRs enabled, default type write-back.
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

fn entry(index: u32, data: u64) -> kvm_msr_entry {
    kvm_msr_entry {
        index,
        data,
        ..Default::default()
    }
}

pub fn set_boot_msrs(vcpu: &VcpuFd) -> Result<()> {
    let entries = [
        entry(MSR_IA32_SYSENTER_CS, 0),
        entry(MSR_IA32_SYSENTER_ESP, 0),
        entry(MSR_IA32_SYSENTER_EIP, 0),
        entry(MSR_STAR, 0),
        entry(MSR_CSTAR, 0),
        entry(MSR_KERNEL_GS_BASE, 0),
        entry(MSR_SYSCALL_MASK, 0),
        entry(MSR_LSTAR, 0),
        entry(MSR_IA32_TSC, 0),
        entry(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        entry(MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB),
    ];
    let msrs =
        Msrs::from_entries(&entries).map_err(|e| VmmError::Config(format!("msrs: {e:?}")))?;
    let n = vcpu.set_msrs(&msrs).map_err(VmmError::kvm("set_msrs"))?;
    if n != entries.len() {
        return Err(VmmError::Config(format!(
            "KVM accepted {n} of {} boot MSRs (first refused: {:#x})",
            entries.len(),
            entries[n].index
        )));
    }
    Ok(())
}

/// Reads every MSR KVM lists, skipping those it refuses to read; returns the values.
pub fn save_msrs(kvm: &Kvm, vcpu: &VcpuFd) -> Result<Vec<(u32, u64)>> {
    let list = kvm
        .get_msr_index_list()
        .map_err(VmmError::kvm("get_msr_index_list"))?;
    let mut pending: Vec<u32> = list.as_slice().to_vec();
    let mut saved = Vec::with_capacity(pending.len());
    while !pending.is_empty() {
        let entries: Vec<kvm_msr_entry> = pending.iter().map(|&i| entry(i, 0)).collect();
        let mut msrs =
            Msrs::from_entries(&entries).map_err(|e| VmmError::Config(format!("msrs: {e:?}")))?;
        let n = vcpu
            .get_msrs(&mut msrs)
            .map_err(VmmError::kvm("get_msrs"))?;
        saved.extend(msrs.as_slice()[..n].iter().map(|e| (e.index, e.data)));
        // KVM stops at the first MSR it cannot read: skip that one and go on.
        pending.drain(..(n + 1).min(pending.len()));
    }
    Ok(saved)
}

pub fn restore_msrs(vcpu: &VcpuFd, saved: &[(u32, u64)]) -> Result<()> {
    for chunk in saved.chunks(128) {
        let entries: Vec<kvm_msr_entry> = chunk.iter().map(|&(i, d)| entry(i, d)).collect();
        let msrs =
            Msrs::from_entries(&entries).map_err(|e| VmmError::Config(format!("msrs: {e:?}")))?;
        let n = vcpu.set_msrs(&msrs).map_err(VmmError::kvm("set_msrs"))?;
        if n != entries.len() {
            return Err(VmmError::Config(format!(
                "restoring MSR {:#x} was refused",
                entries[n].index
            )));
        }
    }
    Ok(())
}
