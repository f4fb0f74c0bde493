//! Just enough of the i8042 keyboard controller for a guest to reset the
//! machine: Linux's `reboot=k` writes command 0xfe (pulse the reset line)
//! to port 0x64 after waiting for the input buffer to be empty. Reads say
//! "no data, input buffer empty" so that wait ends at once.

#![warn(clippy::cast_possible_truncation)]
//!
//! The controller itself is vm-superio's `I8042Device` (what Firecracker
//! and Cloud Hypervisor use); this file routes its reset line to the VMM's
//! control channel and puts it on the port I/O bus.

use std::convert::Infallible;
use std::sync::Arc;

use vm_superio::{I8042Device, Trigger};

use super::BusDevice;
use crate::control::{Control, VmEvent};

/// Data port.
pub const I8042_BASE: u64 = 0x60;
/// The device covers 0x60..=0x64; 0x61 is never routed here because KVM's
/// in-kernel PIT handles it.
pub const I8042_LEN: u64 = 5;

/// The controller's reset line: a pulse is a guest reset of the VM.
pub struct ResetLine(Arc<Control>);

impl Trigger for ResetLine {
    type E = Infallible;

    fn trigger(&self) -> Result<(), Infallible> {
        self.0.send(VmEvent::Reset);
        Ok(())
    }
}

/// The device.
pub struct I8042 {
    dev: I8042Device<ResetLine>,
}

impl I8042 {
    /// A controller that reports resets to `control`.
    pub fn new(control: Arc<Control>) -> Self {
        I8042 {
            dev: I8042Device::new(ResetLine(control)),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // Status 0: no data, input buffer empty, so the driver's wait
        // before a command ends at once.
        let value = u8::try_from(offset).map_or(0, |o| self.dev.read(o));
        data.fill(value);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(offset), Some(&value)) = (u8::try_from(offset), data.first()) {
            match self.dev.write(offset, value) {
                Ok(()) => {}
                Err(never) => match never {},
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The command port, relative to [`I8042_BASE`].
    const COMMAND_OFFSET: u64 = 4;

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
