//! Legacy PC devices: 8250 UARTs (console, control channel) and the i8042 reset line.

pub mod i8042;
pub mod serial;
pub mod serial_input;
