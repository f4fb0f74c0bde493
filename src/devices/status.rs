//! The vmlab status device: two I/O ports the guest init writes to, so the
//! VMM knows when the guest is up and how its command ended.
//!
//! The init writes through `/dev/port`, which works from any guest user
//! space without special drivers. Under another VMM (QEMU) the writes go
//! nowhere and the init reboots the machine instead.
//!
//! | port | write | meaning |
//! |---|---|---|
//! | 0xf4 | 1 | init is up (boot-time mark) |
//! | 0xf4 | 2 / 3 / 4 | power-off / reboot / halt requested |
//! | 0xf5 | n | the command exited with status n; the VM stops |

#![warn(clippy::cast_possible_truncation)]

use std::sync::Arc;
use std::time::Instant;

use super::console::Console;
use super::BusDevice;
use crate::control::{Control, VmEvent};

/// First port.
pub const STATUS_PORT_BASE: u64 = 0xf4;
/// Number of ports.
pub const STATUS_PORT_LEN: u64 = 2;

const EVENT_INIT_UP: u8 = 1;
const EVENT_POWER_OFF: u8 = 2;
const EVENT_REBOOT: u8 = 3;
const EVENT_HALT: u8 = 4;

/// The device.
pub struct StatusDevice {
    control: Arc<Control>,
    console: Arc<Console>,
}

impl StatusDevice {
    /// A device reporting to `control`; closes `console` when the
    /// command's status arrives.
    pub fn new(control: Arc<Control>, console: Arc<Console>) -> Self {
        StatusDevice { control, console }
    }
}

impl BusDevice for StatusDevice {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        let event = match (offset, value) {
            (0, EVENT_INIT_UP) => VmEvent::InitUp(Instant::now()),
            (0, EVENT_POWER_OFF) => VmEvent::PowerOff,
            (0, EVENT_REBOOT) => VmEvent::Reboot,
            (0, EVENT_HALT) => VmEvent::Halt,
            (1, status) => {
                // The command's output is complete (the init drained its
                // tty first); what the guest prints from now on (the
                // kernel's reboot message) is not part of it. Closed here,
                // on the vCPU thread, before anything else can run.
                self.console.close();
                VmEvent::CommandExited(status)
            }
            _ => {
                log::debug!("status device: ignoring write {value:#x} at offset {offset}");
                return;
            }
        };
        self.control.send(event);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_from_writes() {
        let (control, rx) = Control::new().unwrap();
        let console = Console::new();
        let mut dev = StatusDevice::new(Arc::new(control), console.clone());
        dev.write(0, &[1]);
        assert!(matches!(rx.try_recv().unwrap(), VmEvent::InitUp(_)));
        console.push(b"hi\n");
        dev.write(1, &[3]);
        assert_eq!(rx.try_recv().unwrap(), VmEvent::CommandExited(3));
        console.push(b"reboot: Restarting system\n");
        assert_eq!(console.pending(), 3, "output after the status is discarded");
        assert_eq!(console.stats().after_close, 26);
        dev.write(0, &[2]);
        assert_eq!(rx.try_recv().unwrap(), VmEvent::PowerOff);
        dev.write(0, &[3]);
        assert_eq!(rx.try_recv().unwrap(), VmEvent::Reboot);
        dev.write(0, &[99]);
        dev.write(0, &[]);
        assert!(rx.try_recv().is_err());
    }
}
