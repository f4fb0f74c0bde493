//! The "vmlab status device": two I/O ports the VMM watches.
//!
//! Init writes them through `/dev/port` (a `pwrite` at offset = port number
//! is an `outb` in the kernel), which needs no privileged instruction in user
//! space and so works on every host, including this project's nested KVM.
//! Under a VMM without the device (e.g. QEMU) the writes are simply ignored.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicI32, Ordering};

/// Port for events (init up, power-off/reboot/halt requests).
pub const EVENT_PORT: u16 = 0xf4;
/// Port for the exit status of the command. The VMM stops the VM as soon as
/// it sees this write, so everything must be synced and drained before it.
pub const EXIT_STATUS_PORT: u16 = 0xf5;

/// Values written to [`EVENT_PORT`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Event {
    /// Init is running: the boot-time mark.
    Up = 1,
    PowerOff = 2,
    Reboot = 3,
    Halt = 4,
}

/// The open `/dev/port`, also kept in a global so the panic hook can still
/// report a status (see `main::install_panic_hook`).
static PORT_FD: AtomicI32 = AtomicI32::new(-1);

/// Handle to the status device. Holds no fd when `/dev/port` is unavailable;
/// writes are then no-ops, after a single warning at open time.
pub struct StatusPort {
    fd: Option<OwnedFd>,
}

impl StatusPort {
    /// Opens `/dev/port`. Failure is not fatal: init then just cannot report
    /// to the VMM, and says so once on the console.
    pub fn open() -> StatusPort {
        // SAFETY: the path is a valid NUL-terminated string; open has no other
        // memory effects.
        let fd = unsafe { libc::open(c"/dev/port".as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
        if fd < 0 {
            let err = std::io::Error::last_os_error();
            crate::warning!(
                "cannot open /dev/port: {}; status reports to the VMM are disabled",
                crate::errno_text(&err)
            );
            return StatusPort { fd: None };
        }
        PORT_FD.store(fd, Ordering::Relaxed);
        // SAFETY: fd was just returned by open and is owned by nobody else.
        StatusPort {
            fd: Some(unsafe { OwnedFd::from_raw_fd(fd) }),
        }
    }

    /// Reports an event on [`EVENT_PORT`].
    pub fn event(&self, event: Event) {
        if let Some(fd) = &self.fd {
            write_port(fd.as_raw_fd(), EVENT_PORT, event as u8);
        }
    }

    /// Reports the command's exit status on [`EXIT_STATUS_PORT`]. The caller
    /// must have synced and drained the console first.
    pub fn exit_status(&self, status: u8) {
        if let Some(fd) = &self.fd {
            write_port(fd.as_raw_fd(), EXIT_STATUS_PORT, status);
        }
    }
}

/// Writes an exit status from the panic hook, where the `StatusPort` value is
/// out of reach.
pub fn exit_status_from_anywhere(status: u8) {
    let fd = PORT_FD.load(Ordering::Relaxed);
    if fd >= 0 {
        write_port(fd, EXIT_STATUS_PORT, status);
    }
}

fn write_port(fd: i32, port: u16, value: u8) {
    let byte = [value];
    // SAFETY: writes one byte from a live local buffer; fd is /dev/port or
    // already closed (then the call fails with EBADF, which is reported).
    let n = unsafe { libc::pwrite(fd, byte.as_ptr().cast(), 1, libc::off_t::from(port)) };
    if n != 1 {
        let err = std::io::Error::last_os_error();
        crate::warning!(
            "write to I/O port {port:#x} failed: {}",
            crate::errno_text(&err)
        );
    }
}
