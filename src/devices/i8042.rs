//! Just enough of the i8042 keyboard controller for a guest to reset the
//! machine: Linux's `reboot=k` writes command 0xfe (pulse the reset line)
//! to port 0x64 after waiting for the input buffer to be empty. Reads say
//! "no data, input buffer empty" so that wait ends at once.

#![warn(clippy::cast_possible_truncation)]

use std::sync::Arc;

use super::BusDevice;
use crate::control::{Control, VmEvent};

/// Data port.
pub const I8042_BASE: u64 = 0x60;
/// The device covers 0x60..=0x64; 0x61 is never routed here because KVM's
/// in-kernel PIT handles it.
pub const I8042_LEN: u64 = 5;
const COMMAND_OFFSET: u64 = 4;
const CMD_RESET_CPU: u8 = 0xfe;

/// The device.
pub struct I8042 {
    control: Arc<Control>,
}

impl I8042 {
    /// A controller that reports resets to `control`.
    pub fn new(control: Arc<Control>) -> Self {
        I8042 { control }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == COMMAND_OFFSET && data.first() == Some(&CMD_RESET_CPU) {
            self.control.send(VmEvent::Reset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_resets() {
        let (control, rx) = Control::new().unwrap();
        let mut dev = I8042::new(Arc::new(control));
        let mut status = [0xffu8];
        dev.read(COMMAND_OFFSET, &mut status);
        assert_eq!(status[0] & 0x2, 0, "input buffer empty");
        dev.write(0, &[0xfe]);
        dev.write(COMMAND_OFFSET, &[0xaa]);
        assert!(rx.try_recv().is_err());
        dev.write(COMMAND_OFFSET, &[0xfe]);
        assert_eq!(rx.try_recv().unwrap(), VmEvent::Reset);
    }
}
