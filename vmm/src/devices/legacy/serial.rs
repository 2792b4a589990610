//! An 8250 UART (vm-superio) on the port bus; what the guest writes goes to a host writer.

use std::io::Write;

use serde::{Deserialize, Serialize};
use vm_superio::serial::{SerialEvents, SerialState};
use vm_superio::Serial;
use vmm_sys_util::eventfd::EventFd;

use crate::devices::bus::BusDevice;
use crate::devices::IrqTrigger;

pub type Output = Box<dyn Write + Send>;

/// Signals (an eventfd the event loop watches) when the guest has read every queued input
/// byte, so more host input can be queued: the UART's FIFO holds only 64 bytes.
pub struct InputDrained(pub EventFd);

impl SerialEvents for InputDrained {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        let _ = self.0.write(1);
    }
}

pub struct SerialDevice {
    uart: Serial<IrqTrigger, InputDrained, Output>,
}

/// What a snapshot keeps of a UART: its registers and unread input.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SerialDeviceState {
    pub regs: [u8; 9],
    pub in_buffer: Vec<u8>,
}

impl SerialDevice {
    pub fn new(irq: IrqTrigger, drained: InputDrained, out: Output) -> Self {
        Self {
            uart: Serial::with_events(irq, drained, out),
        }
    }

    pub fn state(&self) -> SerialDeviceState {
        let s = self.uart.state();
        SerialDeviceState {
            regs: [
                s.baud_divisor_low,
                s.baud_divisor_high,
                s.interrupt_enable,
                s.interrupt_identification,
                s.line_control,
                s.line_status,
                s.modem_control,
                s.modem_status,
                s.scratch,
            ],
            in_buffer: s.in_buffer,
        }
    }

    pub fn from_state(
        state: &SerialDeviceState,
        irq: IrqTrigger,
        drained: InputDrained,
        out: Output,
    ) -> Result<Self, String> {
        let r = state.regs;
        let s = SerialState {
            baud_divisor_low: r[0],
            baud_divisor_high: r[1],
            interrupt_enable: r[2],
            interrupt_identification: r[3],
            line_control: r[4],
            line_status: r[5],
            modem_control: r[6],
            modem_status: r[7],
            scratch: r[8],
            in_buffer: state.in_buffer.clone(),
        };
        Ok(Self {
            uart: Serial::from_state(&s, irq, drained, out)
                .map_err(|e| format!("serial state: {e:?}"))?,
        })
    }

    /// Bytes for the guest to read; returns how many fit in the FIFO.
    pub fn enqueue(&mut self, input: &[u8]) -> usize {
        self.uart.enqueue_raw_bytes(input).unwrap_or(0)
    }

    /// The eventfd written when the guest has read every queued input byte.
    pub fn input_drained_evt(&self) -> std::io::Result<EventFd> {
        self.uart.events().0.try_clone()
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() == 1 && offset < 8 {
            data[0] = self.uart.read(offset as u8);
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() == 1 && offset < 8 {
            if let Err(e) = self.uart.write(offset as u8, data[0]) {
                tracing::debug!(?e, "serial write");
            }
        }
    }
}
