//! The i8042 keyboard controller, only for its reset line: a guest that reboots
//! (`reboot=k`) writes 0xfe to port 0x64, and the VM ends cleanly.

use vm_superio::I8042Device;

use crate::devices::bus::BusDevice;
use crate::devices::IrqTrigger;

pub struct ResetDevice {
    i8042: I8042Device<IrqTrigger>,
}

impl ResetDevice {
    /// `reset` is signalled when the guest asks for a reset.
    pub fn new(reset: IrqTrigger) -> Self {
        Self {
            i8042: I8042Device::new(reset),
        }
    }
}

impl BusDevice for ResetDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() == 1 {
            data[0] = self.i8042.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() == 1 {
            let _ = self.i8042.write(offset as u8, data[0]);
        }
    }
}
