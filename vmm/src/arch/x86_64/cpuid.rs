//! The CPUID a vCPU sees: what KVM supports, with this vCPU's APIC ID, the vCPU count and
//! the hypervisor bit filled in.

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;

use crate::error::{Result, VmmError};

const LEAF_FEATURES: u32 = 0x1;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const ECX_HYPERVISOR: u32 = 1 << 31;

pub fn vcpu_cpuid(kvm: &Kvm, vcpu_id: u8, vcpu_count: u8) -> Result<CpuId> {
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(VmmError::kvm("get_supported_cpuid"))?;
    for e in cpuid.as_mut_slice() {
        match e.function {
            LEAF_FEATURES => {
                e.ebx = (e.ebx & 0x0000_ffff)
                    | (u32::from(vcpu_id) << 24)
                    | (u32::from(vcpu_count) << 16);
                e.ecx |= ECX_HYPERVISOR;
            }
            LEAF_EXT_TOPOLOGY => e.edx = u32::from(vcpu_id),
            _ => {}
        }
    }
    Ok(cpuid)
}
