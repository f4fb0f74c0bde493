//! The virtio-net device thread's work: the worker's state and its event
//! handling; the receive and transmit paths are in `rx.rs` and `tx.rs`.

mod rx;
mod tx;

use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, GuestAddress, GuestMemoryMmap};

use super::{Counters, NetBackend, MAX_FRAME_LEN, TOKEN_BACKEND, TOKEN_RX, TOKEN_TX};
use crate::devices::virtio::queue::{
    in_memory as desc_in_memory, Broken, ChainError as QueueChainError, LogLimit, VirtQueue, Work,
};
use crate::devices::virtio::thread::{DeviceWorker, EpollSet};
use crate::devices::virtio::Interrupt;

/// Why a chain was dropped (debug log; the guest sees nothing).
#[derive(Debug, thiserror::Error)]
pub(super) enum ChainError {
    #[error("unusable descriptor chain: {0}")]
    Chain(#[from] QueueChainError),
    #[error("descriptor {addr:#x}+{len:#x} is outside guest memory")]
    OutsideMemory { addr: u64, len: u32 },
    #[error("a transmit descriptor is device-writable")]
    WriteOnly,
    #[error("a receive descriptor is device-readable")]
    ReadOnly,
    #[error("the frame is longer than {MAX_FRAME_LEN} bytes plus the header")]
    Oversized,
    #[error("{0} bytes: shorter than the 12-byte virtio-net header")]
    MissingHeader(usize),
    #[error("{0} bytes after the header: no Ethernet header")]
    Runt(usize),
    #[error("the receive chain has no room")]
    NoRoom,
}

/// What happened to the frame waiting in `rx_frame`.
pub(super) enum RxOutcome {
    /// In the guest's buffers.
    Delivered,
    /// Not enough buffers yet: it waits.
    NoBuffers,
    /// Thrown away (no buffer can ever hold it, or a bad chain).
    Dropped,
}

/// The activated device: queues, backend and buffers. Lives on the
/// device's thread.
pub(crate) struct Worker {
    pub(crate) mem: GuestMemoryMmap,
    pub(crate) rx: VirtQueue,
    pub(crate) tx: VirtQueue,
    pub(crate) interrupt: Arc<Interrupt>,
    pub(crate) backend: Arc<dyn NetBackend>,
    pub(crate) counters: Arc<Counters>,
    /// VIRTIO_NET_F_MRG_RXBUF accepted: a frame may span chains.
    pub(crate) mergeable: bool,
    /// The frame read from the backend and not yet delivered (`rx_len`
    /// bytes; 0: none). One byte longer than the longest frame, so a
    /// truncated read shows. Allocated once: the only frame vmlab holds.
    pub(crate) rx_frame: Box<[u8]>,
    pub(crate) rx_len: usize,
    /// Receive chains taken for the frame: (head, capacity). Reused.
    pub(crate) rx_chains: Vec<(u16, u32)>,
    /// Their writable descriptors in order. Reused; bounded because
    /// gathering stops once the frame fits.
    pub(crate) rx_segments: Vec<(GuestAddress, u32)>,
    /// A transmit chain gathered. Allocated once.
    pub(crate) tx_frame: Box<[u8]>,
    /// Whether the worker wants the backend fd watched for input.
    pub(crate) backend_watched: bool,
    /// The readable interest the thread's epoll has for it now.
    pub(crate) backend_interest: bool,
    /// Whether the backend fd is in the thread's epoll set.
    pub(crate) backend_registered: bool,
    /// The backend failed; it is read no more.
    pub(crate) backend_detached: bool,
    /// The driver corrupted a ring; nothing is served until it resets
    /// the device.
    pub(crate) broken: bool,
    /// Malformed chains and ring corruption (shared with the device, so
    /// the count survives resets): the first is logged at warn level.
    pub(crate) problems: Arc<LogLimit>,
}

impl DeviceWorker for Worker {
    fn register(&mut self, fds: &mut EpollSet<'_>) -> io::Result<()> {
        fds.add(&**self.rx.notify_fd(), TOKEN_RX)?;
        fds.add(&**self.tx.notify_fd(), TOKEN_TX)?;
        fds.add(&self.backend.raw_fd(), TOKEN_BACKEND)?;
        self.backend_registered = true;
        self.backend_interest = true;
        Ok(())
    }

    fn handle(&mut self, token: u64, fds: &mut EpollSet<'_>) -> Work {
        let work = match token {
            TOKEN_RX => {
                // Consumed first: a notification during the work wakes the
                // thread again, never gets lost.
                self.rx.ack_notification();
                self.process_rx()
            }
            TOKEN_TX => {
                self.tx.ack_notification();
                self.process_tx()
            }
            TOKEN_BACKEND => {
                if self.backend_watched {
                    self.process_rx()
                } else {
                    if backend_failed(self.backend.raw_fd()) {
                        // Not watched for input, yet epoll reports the fd:
                        // an error or hang-up (the TAP was deleted), which
                        // epoll reports whatever the interest.
                        self.detach_backend("the interface reports an error (deleted?)");
                    }
                    // Else an event taken before the interest was turned
                    // off.
                    Work::Done
                }
            }
            _ => Work::Done,
        };
        self.apply_backend_interest(fds);
        work
    }

    fn interrupt(&self) -> &Interrupt {
        &self.interrupt
    }
}

/// Whether `fd` is in an error or hang-up state (poll, no wait).
fn backend_failed(fd: RawFd) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: 0,
        revents: 0,
    };
    // SAFETY: one pollfd in a live local, and the count says one.
    let n = unsafe { libc::poll(&mut pfd, 1, 0) };
    n > 0 && pfd.revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0
}

impl Worker {
    /// Turns the backend fd's readable interest on or off (applied to the
    /// thread's epoll set when the handler returns).
    fn watch_backend(&mut self, on: bool) {
        self.backend_watched = on;
    }

    /// Stops reading the backend for good (it failed).
    fn detach_backend(&mut self, why: &str) {
        log::error!(
            "virtio-net {}: {why}; the guest receives nothing more",
            self.backend.name()
        );
        self.backend_watched = false;
        self.backend_detached = true;
    }

    /// Brings the thread's epoll set in line with what the handler
    /// decided about the backend fd.
    fn apply_backend_interest(&mut self, fds: &mut EpollSet<'_>) {
        if !self.backend_registered {
            return;
        }
        let fd = self.backend.raw_fd();
        if self.backend_detached {
            fds.remove(&fd);
            self.backend_registered = false;
            return;
        }
        if self.backend_interest != self.backend_watched {
            match fds.set_readable(&fd, TOKEN_BACKEND, self.backend_watched) {
                Ok(()) => self.backend_interest = self.backend_watched,
                Err(e) => log::error!("virtio-net {}: {e}", self.backend.name()),
            }
        }
    }

    fn fail(&mut self, why: &Broken) {
        self.problems.report(format_args!(
            "virtio-net {}: {why}; the device stops until the guest resets it",
            self.backend.name()
        ));
        self.broken = true;
        self.interrupt.signal_needs_reset();
    }
}

fn in_memory(mem: &GuestMemoryMmap, d: &Descriptor) -> Result<(), ChainError> {
    if desc_in_memory(mem, d) {
        Ok(())
    } else {
        Err(ChainError::OutsideMemory {
            addr: d.addr().raw_value(),
            len: d.len(),
        })
    }
}
