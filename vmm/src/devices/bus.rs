//! Address → device dispatch for vCPU exits (port I/O and MMIO). Accesses outside every
//! device read as all ones and are otherwise ignored, as on real hardware.

use std::sync::{Arc, Mutex};

/// A device on a bus; `offset` is relative to the device's base.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

type Shared = Arc<Mutex<dyn BusDevice>>;

#[derive(Clone, Default)]
pub struct Bus {
    /// (base, length, device)
    devices: Vec<(u64, u64, Shared)>,
}

impl Bus {
    pub fn insert(&mut self, base: u64, len: u64, device: Shared) {
        self.devices.push((base, len, device));
    }

    fn find(&self, addr: u64) -> Option<(u64, &Shared)> {
        self.devices
            .iter()
            .find(|(base, len, _)| addr >= *base && addr - base < *len)
            .map(|(base, _, d)| (addr - base, d))
    }

    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((offset, d)) => {
                d.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((offset, d)) => {
                d.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .write(offset, data);
                true
            }
            None => false,
        }
    }
}
