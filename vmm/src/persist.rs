//! The microVM's saved state: per-device states composed into the aggregate `restore.snap`
//! holds besides guest memory — what `MicroVm` saves and the builder restores from.

use std::path::Path;
use std::sync::{Arc, Mutex};

use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

use crate::device_manager::{DeviceSlot, MmioDevice};
use crate::devices::legacy::serial::{SerialDevice, SerialDeviceState};
use crate::devices::virtio::blk::{Block, BlockState};
use crate::devices::virtio::p9::{P9State, P9};
use crate::devices::virtio::persist::MmioTransportState;
use crate::devices::virtio::vsock::{Vsock, VsockState};
use crate::devices::virtio::VirtioDevice;
use crate::error::{Result, VmmError};
use crate::snapshot;
use crate::vstate::memory::GuestMemoryMmap;
use crate::vstate::vcpu::VcpuState;
use crate::vstate::vm::{self, VmState};

#[derive(Serialize, Deserialize)]
pub(crate) enum DeviceKindState {
    Block(BlockState),
    Vsock(VsockState),
    P9(P9State),
}

#[derive(Serialize, Deserialize)]
pub(crate) struct DeviceState {
    pub(crate) base: u64,
    pub(crate) irq: u32,
    pub(crate) transport: MmioTransportState,
    pub(crate) kind: DeviceKindState,
}

/// Everything but guest memory, as saved in `restore.snap`.
#[derive(Serialize, Deserialize)]
pub(crate) struct MicroVmState {
    pub(crate) vcpus: Vec<VcpuState>,
    pub(crate) vm: VmState,
    pub(crate) serials: Vec<SerialDeviceState>,
    pub(crate) devices: Vec<DeviceState>,
}

impl MicroVmState {
    /// The state of a paused VM whose vCPUs saved `vcpus` (in any order): vCPUs by id,
    /// then irqchip/PIT/clock, the UARTs and the virtio devices.
    pub(crate) fn save(
        mut vcpus: Vec<VcpuState>,
        vm: &VmFd,
        serials: &[Arc<Mutex<SerialDevice>>],
        devices: &[MmioDevice],
    ) -> Result<Self> {
        vcpus.sort_by_key(|s| s.id);
        Ok(MicroVmState {
            vcpus,
            vm: vm::save_state(vm)?,
            serials: serials
                .iter()
                .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).state())
                .collect(),
            devices: devices
                .iter()
                .map(|(base, irq, t)| {
                    let t = t.lock().unwrap_or_else(|p| p.into_inner());
                    let kind = device_kind_state(t.device());
                    kind.map(|kind| DeviceState {
                        base: *base,
                        irq: *irq,
                        transport: t.state(),
                        kind,
                    })
                })
                .collect::<Result<Vec<_>>>()?,
        })
    }

    /// Writes `restore.snap` at `path`: this state, then `mem`. Returns the bytes written.
    pub(crate) fn write(&self, path: &Path, mem: &GuestMemoryMmap) -> Result<u64> {
        snapshot::write_snapshot(path, self, mem)
    }

    /// Reads (and verifies) `restore.snap` at `path`; its guest memory is not mapped yet.
    pub(crate) fn read(path: &Path) -> Result<(snapshot::SnapshotFile, Self)> {
        snapshot::read_snapshot(path)
    }

    /// Where each saved virtio device sits and how many queues it has.
    pub(crate) fn device_slots(&self) -> Vec<DeviceSlot> {
        self.devices
            .iter()
            .map(|d| DeviceSlot {
                base: d.base,
                irq: d.irq,
                queues: d.transport.queues.len(),
            })
            .collect()
    }

    /// Whether a vsock device was saved.
    pub(crate) fn has_vsock(&self) -> bool {
        self.devices
            .iter()
            .any(|d| matches!(d.kind, DeviceKindState::Vsock(_)))
    }
}

/// The saved form of a device, by what it is.
pub(crate) fn device_kind_state(d: &dyn VirtioDevice) -> Result<DeviceKindState> {
    if let Some(b) = d.as_any().downcast_ref::<Block>() {
        Ok(DeviceKindState::Block(b.save()))
    } else if let Some(v) = d.as_any().downcast_ref::<Vsock>() {
        Ok(DeviceKindState::Vsock(v.save()))
    } else if let Some(p) = d.as_any().downcast_ref::<P9>() {
        Ok(DeviceKindState::P9(p.save().map_err(VmmError::Config)?))
    } else {
        Err(VmmError::Config(format!(
            "device type {} cannot be saved",
            d.device_type()
        )))
    }
}
