//! Events from the guest side (vCPU threads, devices) to the VMM's control
//! loop: the init is up, the guest wants to stop, something went wrong.
//!
//! Senders push onto a channel and poke an eventfd so the control loop,
//! sleeping in epoll, wakes up.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Mutex;
use std::time::Instant;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Why and how the guest ended, or a milestone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmEvent {
    /// The guest init reported that it is up (the boot-time mark).
    InitUp(Instant),
    /// The guest's command finished with this status.
    CommandExited(u8),
    /// The guest init powered off on request (`poweroff`).
    PowerOff,
    /// The guest init rebooted on request (`reboot`).
    Reboot,
    /// The guest init halted on request (`halt`).
    Halt,
    /// The guest reset the machine (i8042 reset line or a KVM reset
    /// event): a `reboot -f`, or a kernel panic with `panic=-1`.
    Reset,
    /// A vCPU triple-faulted.
    TripleFault {
        /// Which vCPU.
        vcpu: u8,
    },
    /// A vCPU stopped on an error vmlab cannot recover from.
    Fatal {
        /// Which vCPU.
        vcpu: u8,
        /// What happened.
        message: String,
    },
}

impl VmEvent {
    /// Whether the VM is over after this event.
    pub fn is_terminal(&self) -> bool {
        !matches!(self, VmEvent::InitUp(_))
    }
}

/// The sending side, shared by vCPU threads and devices.
pub struct Control {
    tx: Mutex<Sender<VmEvent>>,
    wake: EventFd,
}

impl Control {
    /// A new channel; the receiver goes to the control loop.
    pub fn new() -> std::io::Result<(Control, Receiver<VmEvent>)> {
        let (tx, rx) = channel();
        let wake = EventFd::new(EFD_NONBLOCK)?;
        Ok((
            Control {
                tx: Mutex::new(tx),
                wake,
            },
            rx,
        ))
    }

    /// Sends `event`. Never fails: once the control loop is gone the VM is
    /// being torn down and the event no longer matters.
    pub fn send(&self, event: VmEvent) {
        let tx = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        let _ = tx.send(event);
        let _ = self.wake.write(1);
    }

    /// The eventfd the control loop polls.
    pub fn wake_fd(&self) -> &EventFd {
        &self.wake
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn send_wakes_and_delivers() {
        let (control, rx) = Control::new().unwrap();
        control.send(VmEvent::CommandExited(3));
        assert_eq!(control.wake_fd().read().unwrap(), 1);
        assert_eq!(rx.try_recv().unwrap(), VmEvent::CommandExited(3));
        assert!(VmEvent::Reset.is_terminal());
        assert!(!VmEvent::InitUp(Instant::now()).is_terminal());
    }
}
