//! The host side of a virtio-net device.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use crate::devices::tap::{Offloads, Tap, TapError};

/// Where frames go and come from. Implemented by [`Tap`]; the unit tests
/// use a socket pair.
///
/// Every frame read or written starts with the 12-byte virtio-net header.
/// Reads and writes never block: a read with nothing queued returns
/// `WouldBlock`.
pub trait NetBackend: Send + Sync {
    /// Reads one frame into `buf`; its length.
    fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize>;
    /// Writes one frame.
    fn write_frame(&self, buf: &[u8]) -> io::Result<usize>;
    /// Which offloads frames handed to the guest may use.
    fn set_offloads(&self, offloads: Offloads) -> Result<(), TapError>;
    /// The fd to watch for readability.
    fn raw_fd(&self) -> RawFd;
    /// A name for messages (the TAP interface).
    fn name(&self) -> &str;
}

impl NetBackend for Tap {
    fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        Tap::read_frame(self, buf)
    }

    fn write_frame(&self, buf: &[u8]) -> io::Result<usize> {
        Tap::write_frame(self, buf)
    }

    fn set_offloads(&self, offloads: Offloads) -> Result<(), TapError> {
        Tap::set_offloads(self, offloads)
    }

    fn raw_fd(&self) -> RawFd {
        self.as_raw_fd()
    }

    fn name(&self) -> &str {
        Tap::name(self)
    }
}
