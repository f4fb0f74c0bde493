//! virtio-vsock (device type 19) in user space, with Firecracker's host
//! side: the host end of every connection is a Unix stream.
//!
//! - [`packet`]: the 44-byte header and the checks of descriptor chains.
//! - [`connection`]: one connection's state and credit accounting.
//! - [`unix`]: the listening socket, the `CONNECT <port>` handshake, the
//!   `PATH_<port>` forwarding, and [`connect`] for host programs.
//! - [`muxer`]: all connections, their host streams (on an epoll of its
//!   own) and the packets owed to the guest.
//! - [`device`]: the [`VirtioDevice`](super::VirtioDevice) and the worker
//!   that moves packets between the queues and the muxer.
//!
//! Stream sockets only (no SEQPACKET); the event queue is accepted and
//! left alone (vmlab never resets the guest's transport).

pub mod connection;
pub mod device;
pub mod muxer;
pub mod packet;
pub mod unix;

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

pub use device::Vsock;
pub use unix::{connect, HostSocket, SocketError};

/// The lowest CID a guest may have (0-2 are the hypervisor, local and
/// host addresses).
pub const MIN_GUEST_CID: u64 = 3;
/// The highest: `u32::MAX` is VMADDR_CID_ANY, and Linux's CIDs are 32-bit.
pub const MAX_GUEST_CID: u64 = u32::MAX as u64 - 1;

/// A vsock device as the user describes it (`--vsock cid=N,socket=PATH`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockConfig {
    /// The guest's context id.
    pub cid: u64,
    /// The host-side Unix socket vmlab listens on; guest connections to
    /// host port P go to `socket_P`.
    pub socket: PathBuf,
}

/// Checks a CID given by the user.
pub fn validate_cid(cid: u64) -> Result<(), String> {
    if cid < MIN_GUEST_CID {
        return Err(format!(
            "vsock CID {cid} is reserved (0-2: hypervisor, local, host); a guest needs \
             {MIN_GUEST_CID} or more"
        ));
    }
    if cid > MAX_GUEST_CID {
        return Err(format!(
            "vsock CID {cid} is too large (at most {MAX_GUEST_CID})"
        ));
    }
    Ok(())
}

device_counters! {
    /// A snapshot of a vsock device's counters.
    pub struct VsockStats / Counters {
        /// Packets the guest sent (well-formed chains).
        tx_packets,
        /// Payload bytes the guest sent that reached the host side.
        tx_bytes,
        /// Packets put in the guest's receive buffers.
        rx_packets,
        /// Payload bytes in them.
        rx_bytes,
        /// Malformed transmit chains and refused packets (bad addresses,
        /// type, operation, payload, state or credit).
        malformed,
        /// Malformed receive chains (returned empty).
        rx_malformed,
        /// Packets for connections that do not exist (answered with RST).
        unknown,
        /// Packets beyond the credit vmlab gave (included in `malformed`).
        credit_overruns,
        /// RSTs sent to the guest.
        rst_sent,
        /// RSTs that found no room (the guest took no receive buffers).
        dropped,
        /// Connections established (either direction).
        opened,
        /// Connections refused (nothing listening, the connection limit).
        refused,
    }
}

impl fmt::Display for VsockStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "tx {} packets / {} bytes, rx {} packets / {} bytes, {} connections ({} refused), \
             {} malformed ({} credit overruns), {} malformed receive chains, {} for unknown \
             connections, {} RST sent, {} RST dropped",
            self.tx_packets,
            self.tx_bytes,
            self.rx_packets,
            self.rx_bytes,
            self.opened,
            self.refused,
            self.malformed,
            self.credit_overruns,
            self.rx_malformed,
            self.unknown,
            self.rst_sent,
            self.dropped
        )
    }
}

/// What the VMM keeps of a vsock device: its socket (removed at exit) and
/// counters.
#[derive(Debug, Clone)]
pub struct VsockHandle {
    cid: u64,
    socket: Arc<HostSocket>,
    counters: Arc<Counters>,
}

impl VsockHandle {
    /// The guest's CID.
    pub fn cid(&self) -> u64 {
        self.cid
    }

    /// The host socket's path.
    pub fn path(&self) -> &std::path::Path {
        self.socket.path()
    }

    /// The counters now.
    pub fn stats(&self) -> VsockStats {
        self.counters.snapshot()
    }

    /// Removes the socket file (at VM exit; also done when the device is
    /// dropped).
    pub fn remove_socket(&self) {
        self.socket.remove();
    }
}
