//! The KVM VM: created with an in-kernel irqchip (PIC + IOAPIC + LAPICs) and PIT, so only
//! device models run in userspace. Its saved state is the irqchip, the PIT and kvmclock.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_config, kvm_pit_state2, KVM_CLOCK_TSC_STABLE,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use serde::{Deserialize, Serialize};

use crate::arch::x86_64::layout::KVM_TSS_ADDRESS;
use crate::error::{Result, VmmError};

/// A VM with its interrupt controllers and timer; no memory and no vCPUs yet (so one can
/// be made ahead of time and a snapshot restored into it later).
pub fn create_vm(kvm: &Kvm) -> Result<VmFd> {
    let vm = kvm.create_vm().map_err(VmmError::kvm("create_vm"))?;
    vm.set_tss_address(KVM_TSS_ADDRESS)
        .map_err(VmmError::kvm("set_tss_address"))?;
    vm.create_irq_chip()
        .map_err(VmmError::kvm("create_irq_chip"))?;
    vm.create_pit2(kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    })
    .map_err(VmmError::kvm("create_pit2"))?;
    Ok(vm)
}

#[derive(Clone, Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

fn irqchip(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip> {
    let mut c = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut c)
        .map_err(VmmError::kvm("get_irqchip"))?;
    Ok(c)
}

pub fn save_state(vm: &VmFd) -> Result<VmState> {
    Ok(VmState {
        pic_master: irqchip(vm, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: irqchip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: irqchip(vm, KVM_IRQCHIP_IOAPIC)?,
        pit: vm.get_pit2().map_err(VmmError::kvm("get_pit2"))?,
        clock: vm.get_clock().map_err(VmmError::kvm("get_clock"))?,
    })
}

/// Irqchip, PIT, clock — after the vCPUs are restored, as KVM wants.
pub fn restore_state(vm: &VmFd, state: &VmState) -> Result<()> {
    vm.set_pit2(&state.pit).map_err(VmmError::kvm("set_pit2"))?;
    let mut clock = state.clock;
    // Only the clock value can be set; the flags KVM reported are not inputs.
    clock.flags &= !KVM_CLOCK_TSC_STABLE;
    clock.flags = 0;
    vm.set_clock(&clock).map_err(VmmError::kvm("set_clock"))?;
    for chip in [&state.pic_master, &state.pic_slave, &state.ioapic] {
        vm.set_irqchip(chip).map_err(VmmError::kvm("set_irqchip"))?;
    }
    Ok(())
}
