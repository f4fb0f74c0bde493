//! virtio-net on a host TAP device: one receive and one transmit queue,
//! served on the virtio event loop.
//!
//! Frames cross with the virtio-net header the TAP itself speaks
//! (`IFF_VNET_HDR`, 12 bytes), so checksum and segmentation offloads pass
//! through untouched: a 64 KiB TCP segment the guest sends with
//! HOST_TSO4 reaches the host stack as one write, and the host hands the
//! guest 64 KiB super-frames when the driver accepted GUEST_TSO4.
//!
//! Transmit (guest → TAP, queue 1): each chain is gathered into one
//! buffer and written to the TAP. A chain is checked before anything is
//! sent: it must end, hold only device-readable descriptors inside guest
//! memory, start with the 12-byte header, carry at least an Ethernet
//! header, and be no longer than [`MAX_FRAME_LEN`] plus the header. A
//! chain that fails is dropped and counted; it still goes back to the used
//! ring, so the driver frees it and the device carries on.
//!
//! Receive (TAP → guest, queue 0): the TAP fd is on the event loop. A
//! frame is read into one buffer, then copied into as many receive chains
//! as it needs (mergeable buffers; `num_buffers` in the header says how
//! many), or into one chain without VIRTIO_NET_F_MRG_RXBUF. When the guest
//! has not posted enough buffers, the frame waits in that buffer, vmlab
//! stops watching the TAP fd, and the guest's next RX notification starts
//! it again: further frames wait in the kernel's TAP queue, which is
//! bounded (the interface's txqueuelen), so a guest that stops taking
//! frames never makes vmlab's memory grow.
//!
//! The backend is a [`NetBackend`] so that the unit tests can run the
//! device against a socket pair instead of a TAP (no privileges, no KVM).

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::event_loop::{EventHandler, EventLoopHandle, Registration};
use super::{
    feature, ActivateError, DeviceQueue, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1,
    VIRTIO_ID_NET, VIRTIO_RING_F_EVENT_IDX,
};
use crate::devices::tap::{Offloads, Tap, TapError, VNET_HDR_LEN};

/// Entries of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Index of the receive queue.
pub const RX_QUEUE: usize = 0;
/// Index of the transmit queue.
pub const TX_QUEUE: usize = 1;
/// Longest frame (without the virtio-net header): a 65,535-byte IP packet
/// behind an Ethernet header and a VLAN tag, rounded up as other VMMs do.
pub const MAX_FRAME_LEN: usize = 65550;
/// Longest buffer: header plus frame.
pub const MAX_BUFFER_LEN: usize = VNET_HDR_LEN + MAX_FRAME_LEN;
/// Shortest frame the TAP accepts: an Ethernet header.
const ETH_HLEN: usize = 14;
/// Frames received per event before the loop serves others (the TAP fd
/// stays readable, so the loop comes back at once).
const RX_BUDGET: usize = 256;

// Feature bits (virtio 1.x 5.1.3).
const VIRTIO_NET_F_CSUM: u32 = 0;
const VIRTIO_NET_F_GUEST_CSUM: u32 = 1;
const VIRTIO_NET_F_MAC: u32 = 5;
const VIRTIO_NET_F_GUEST_TSO4: u32 = 7;
const VIRTIO_NET_F_GUEST_TSO6: u32 = 8;
const VIRTIO_NET_F_GUEST_ECN: u32 = 9;
const VIRTIO_NET_F_HOST_TSO4: u32 = 11;
const VIRTIO_NET_F_HOST_TSO6: u32 = 12;
const VIRTIO_NET_F_HOST_ECN: u32 = 13;
const VIRTIO_NET_F_MRG_RXBUF: u32 = 15;
const VIRTIO_NET_F_STATUS: u32 = 16;

/// `status` in the configuration space: the link is up.
const VIRTIO_NET_S_LINK_UP: u16 = 1;
/// mac[6], status, max_virtqueue_pairs.
const CONFIG_LEN: usize = 10;
/// Offset of `num_buffers` in the header.
const NUM_BUFFERS_OFFSET: usize = 10;

/// Event-loop tokens of the worker's three fds.
const TOKEN_RX: u64 = 0;
const TOKEN_TX: u64 = 1;
const TOKEN_BACKEND: u64 = 2;

/// A MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// A random locally administered unicast address (02:xx:xx:xx:xx:xx
    /// with bit 1 of the first octet set and bit 0 clear), so that it can
    /// clash with no vendor's address. The bytes come from getrandom; if
    /// that fails, from the pid, `index` and the clock.
    pub fn random_local(index: usize) -> MacAddr {
        let mut bytes = [0u8; 6];
        // SAFETY: getrandom writes at most `bytes.len()` bytes into the
        // live local array.
        let n =
            unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), libc::GRND_NONBLOCK) };
        if usize::try_from(n).ok() != Some(bytes.len()) {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos());
            let mix = u64::from(std::process::id())
                .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                .wrapping_add(index as u64)
                ^ u64::from(nanos);
            bytes.copy_from_slice(&mix.to_le_bytes()[..6]);
        }
        bytes[0] = (bytes[0] & !0x01) | 0x02;
        MacAddr(bytes)
    }

    /// Bit 0 of the first octet: a group address, which no NIC may have.
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 0x01 != 0
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl FromStr for MacAddr {
    type Err = String;

    /// Six two-digit hex octets separated by `:` (or `-`); a multicast or
    /// all-zero address is refused, since a NIC cannot have one.
    fn from_str(s: &str) -> Result<MacAddr, String> {
        let bad = || format!("'{s}' is not a MAC address (six hex octets: 02:00:00:aa:bb:cc)");
        let sep = if s.contains('-') { '-' } else { ':' };
        let mut bytes = [0u8; 6];
        let mut parts = s.split(sep);
        for byte in &mut bytes {
            let part = parts.next().ok_or_else(bad)?;
            if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        let mac = MacAddr(bytes);
        if mac.is_multicast() {
            return Err(format!(
                "{s} is a multicast address (lowest bit of the first octet set); a NIC needs a \
                 unicast one"
            ));
        }
        if bytes == [0; 6] {
            return Err(format!("{s}: the all-zero MAC address is not valid"));
        }
        Ok(mac)
    }
}

/// A network interface as the user describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// The host TAP interface.
    pub tap: String,
    /// The guest's MAC address (`None`: a random local one).
    pub mac: Option<MacAddr>,
}

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

/// Frame counters, shared by the worker and whoever reports them.
#[derive(Debug, Default)]
struct Counters {
    rx_frames: AtomicU64,
    rx_bytes: AtomicU64,
    rx_dropped: AtomicU64,
    rx_malformed: AtomicU64,
    rx_errors: AtomicU64,
    tx_frames: AtomicU64,
    tx_bytes: AtomicU64,
    tx_malformed: AtomicU64,
    tx_errors: AtomicU64,
}

/// A snapshot of a network device's counters. Bytes count frames without
/// the virtio-net header.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Frames delivered to the guest.
    pub rx_frames: u64,
    /// Their bytes.
    pub rx_bytes: u64,
    /// Frames from the host the guest had no room for (larger than its
    /// buffers, shorter than a header).
    pub rx_dropped: u64,
    /// Receive chains the guest got wrong (returned empty).
    pub rx_malformed: u64,
    /// Failed reads from the backend.
    pub rx_errors: u64,
    /// Frames sent by the guest to the backend.
    pub tx_frames: u64,
    /// Their bytes.
    pub tx_bytes: u64,
    /// Transmit chains dropped by validation.
    pub tx_malformed: u64,
    /// Well-formed frames the backend refused (interface down, bad
    /// offload header, queue full).
    pub tx_errors: u64,
}

impl fmt::Display for NetStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "rx {} frames / {} bytes ({} dropped, {} malformed chains, {} read errors), \
             tx {} frames / {} bytes ({} malformed chains, {} write errors)",
            self.rx_frames,
            self.rx_bytes,
            self.rx_dropped,
            self.rx_malformed,
            self.rx_errors,
            self.tx_frames,
            self.tx_bytes,
            self.tx_malformed,
            self.tx_errors
        )
    }
}

/// What the VMM keeps of a network device: its name and counters.
#[derive(Debug, Clone)]
pub struct NetHandle {
    name: String,
    mac: MacAddr,
    counters: Arc<Counters>,
}

impl NetHandle {
    /// The backend's name (the TAP interface).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The guest's MAC address.
    pub fn mac(&self) -> MacAddr {
        self.mac
    }

    /// The counters now.
    pub fn stats(&self) -> NetStats {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        NetStats {
            rx_frames: get(&c.rx_frames),
            rx_bytes: get(&c.rx_bytes),
            rx_dropped: get(&c.rx_dropped),
            rx_malformed: get(&c.rx_malformed),
            rx_errors: get(&c.rx_errors),
            tx_frames: get(&c.tx_frames),
            tx_bytes: get(&c.tx_bytes),
            tx_malformed: get(&c.tx_malformed),
            tx_errors: get(&c.tx_errors),
        }
    }
}

/// The virtio-net device model.
pub struct Net {
    backend: Arc<dyn NetBackend>,
    mac: MacAddr,
    features: u64,
    acked_features: u64,
    config: [u8; CONFIG_LEN],
    queue_sizes: [u16; 2],
    event_loop: EventLoopHandle,
    counters: Arc<Counters>,
    active: Option<Active>,
}

struct Active {
    worker: Arc<Mutex<Worker>>,
    registrations: Vec<Registration>,
}

impl Net {
    /// Opens `config`'s TAP; the device will serve it on `event_loop`
    /// once the driver starts it. `index` (the device's position among the
    /// VM's network devices) only varies the fallback random MAC.
    pub fn open(
        config: &NetConfig,
        index: usize,
        event_loop: EventLoopHandle,
    ) -> Result<Net, TapError> {
        let tap = Tap::open(&config.tap)?;
        if tap.created() {
            log::info!(
                "tap {}: created (it goes away when vmlab exits)",
                config.tap
            );
        }
        let mac = config.mac.unwrap_or_else(|| MacAddr::random_local(index));
        Ok(Net::with_backend(Arc::new(tap), mac, event_loop))
    }

    /// A device on any backend.
    pub fn with_backend(
        backend: Arc<dyn NetBackend>,
        mac: MacAddr,
        event_loop: EventLoopHandle,
    ) -> Net {
        let features = feature(VIRTIO_F_VERSION_1)
            | feature(VIRTIO_RING_F_EVENT_IDX)
            | feature(VIRTIO_NET_F_MAC)
            | feature(VIRTIO_NET_F_STATUS)
            | feature(VIRTIO_NET_F_MRG_RXBUF)
            | feature(VIRTIO_NET_F_CSUM)
            | feature(VIRTIO_NET_F_HOST_TSO4)
            | feature(VIRTIO_NET_F_HOST_TSO6)
            | feature(VIRTIO_NET_F_HOST_ECN)
            | feature(VIRTIO_NET_F_GUEST_CSUM)
            | feature(VIRTIO_NET_F_GUEST_TSO4)
            | feature(VIRTIO_NET_F_GUEST_TSO6)
            | feature(VIRTIO_NET_F_GUEST_ECN);
        let mut config = [0u8; CONFIG_LEN];
        config[..6].copy_from_slice(&mac.0);
        config[6..8].copy_from_slice(&VIRTIO_NET_S_LINK_UP.to_le_bytes());
        config[8..10].copy_from_slice(&1u16.to_le_bytes());
        Net {
            backend,
            mac,
            features,
            acked_features: 0,
            config,
            queue_sizes: [QUEUE_SIZE; 2],
            event_loop,
            counters: Arc::default(),
            active: None,
        }
    }

    /// Name and counters, for the VMM.
    pub fn handle(&self) -> NetHandle {
        NetHandle {
            name: self.backend.name().to_string(),
            mac: self.mac,
            counters: self.counters.clone(),
        }
    }

    /// What the backend may hand the guest, from the accepted features.
    fn rx_offloads(&self) -> Offloads {
        let has = |bit| self.acked_features & feature(bit) != 0;
        Offloads {
            csum: has(VIRTIO_NET_F_GUEST_CSUM),
            tso4: has(VIRTIO_NET_F_GUEST_TSO4),
            tso6: has(VIRTIO_NET_F_GUEST_TSO6),
            tso_ecn: has(VIRTIO_NET_F_GUEST_ECN),
        }
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Ok(start) = usize::try_from(offset) else {
            return;
        };
        if let Some(src) = self.config.get(start..) {
            let n = src.len().min(data.len());
            data[..n].copy_from_slice(&src[..n]);
        }
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        // A virtio 1.x driver cannot change the MAC through the config
        // space (that needs the control queue, not offered).
        log::debug!("virtio-net: ignoring config write at {offset:#x}");
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<DeviceQueue>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), ActivateError> {
        self.reset();
        let mut queues = queues.into_iter();
        let (Some(rx), Some(tx)) = (queues.next(), queues.next()) else {
            return Err(ActivateError::QueueNotReady { index: TX_QUEUE });
        };
        for (index, q) in [(RX_QUEUE, &rx), (TX_QUEUE, &tx)] {
            if !q.queue.ready() {
                return Err(ActivateError::QueueNotReady { index });
            }
        }
        if let Err(e) = self.backend.set_offloads(self.rx_offloads()) {
            // The guest then gets plain frames only, which is always safe.
            log::warn!("{e}; receive offloads stay off");
        }
        let worker = Arc::new(Mutex::new(Worker {
            mem,
            rx: rx.queue,
            rx_notify: rx.notify.clone(),
            tx: tx.queue,
            tx_notify: tx.notify.clone(),
            interrupt,
            backend: self.backend.clone(),
            counters: self.counters.clone(),
            mergeable: self.acked_features & feature(VIRTIO_NET_F_MRG_RXBUF) != 0,
            rx_frame: vec![0; MAX_BUFFER_LEN + 1].into_boxed_slice(),
            rx_len: 0,
            rx_chains: Vec::with_capacity(usize::from(QUEUE_SIZE)),
            rx_segments: Vec::with_capacity(usize::from(QUEUE_SIZE)),
            tx_frame: vec![0; MAX_BUFFER_LEN].into_boxed_slice(),
            event_loop: self.event_loop.clone(),
            backend_registration: None,
            backend_watched: false,
            backend_detached: false,
            running: true,
            broken: false,
            warned: false,
        }));
        let handler: Arc<Mutex<dyn EventHandler>> = worker.clone();
        let mut registrations = Vec::with_capacity(2);
        let registered = self
            .event_loop
            .register(&*rx.notify, TOKEN_RX, handler.clone())
            .and_then(|r| {
                registrations.push(r);
                self.event_loop
                    .register(&*tx.notify, TOKEN_TX, handler.clone())
            })
            .and_then(|r| {
                registrations.push(r);
                self.event_loop
                    .register(&self.backend.raw_fd(), TOKEN_BACKEND, handler)
            });
        match registered {
            Ok(backend) => {
                let mut w = worker.lock().unwrap_or_else(|p| p.into_inner());
                w.backend_registration = Some(backend);
                w.backend_watched = true;
            }
            Err(e) => {
                for r in registrations {
                    self.event_loop.unregister(r);
                }
                return Err(e.into());
            }
        }
        self.active = Some(Active {
            worker,
            registrations,
        });
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(active) = self.active.take() {
            for r in active.registrations {
                self.event_loop.unregister(r);
            }
            // Waits for the frame being moved now; the loop may still
            // hold a clone of the worker, which `running` turns off.
            let mut w = active.worker.lock().unwrap_or_else(|p| p.into_inner());
            w.running = false;
            if let Some(r) = w.backend_registration.take() {
                self.event_loop.unregister(r);
            }
            // A frame read but not delivered is lost, as on a NIC reset.
            w.rx_len = 0;
            if let Err(e) = self.backend.set_offloads(Offloads::default()) {
                log::debug!("{e}");
            }
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.reset();
    }
}

/// Why a chain was dropped (debug log; the guest sees nothing).
#[derive(Debug, thiserror::Error)]
enum ChainError {
    #[error("the chain is empty (bad head index?)")]
    Empty,
    #[error("the descriptor chain does not end (loop, too long, or bad next index)")]
    Unterminated,
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
enum RxOutcome {
    /// In the guest's buffers.
    Delivered,
    /// Not enough buffers yet: it waits.
    NoBuffers,
    /// Thrown away (no buffer can ever hold it, or a bad chain).
    Dropped,
}

/// The driver corrupted a ring; the device stops until reset.
struct Broken(String);

/// The activated device: queues, backend and buffers. Lives in the event
/// loop (behind a mutex shared with [`Net`] for reset).
struct Worker {
    mem: GuestMemoryMmap,
    rx: Queue,
    rx_notify: Arc<EventFd>,
    tx: Queue,
    tx_notify: Arc<EventFd>,
    interrupt: Arc<Interrupt>,
    backend: Arc<dyn NetBackend>,
    counters: Arc<Counters>,
    /// VIRTIO_NET_F_MRG_RXBUF accepted: a frame may span chains.
    mergeable: bool,
    /// The frame read from the backend and not yet delivered (`rx_len`
    /// bytes; 0: none). One byte longer than the longest frame, so a
    /// truncated read shows. Allocated once: the only frame vmlab holds.
    rx_frame: Box<[u8]>,
    rx_len: usize,
    /// Receive chains taken for the frame: (head, capacity). Reused.
    rx_chains: Vec<(u16, u32)>,
    /// Their writable descriptors in order. Reused; bounded because
    /// gathering stops once the frame fits.
    rx_segments: Vec<(GuestAddress, u32)>,
    /// A transmit chain gathered. Allocated once.
    tx_frame: Box<[u8]>,
    event_loop: EventLoopHandle,
    backend_registration: Option<Registration>,
    /// Whether the loop watches the backend fd now.
    backend_watched: bool,
    /// The backend failed; it is read no more.
    backend_detached: bool,
    /// Cleared by reset; a stopped worker never touches guest memory.
    running: bool,
    /// The driver corrupted a ring; nothing is served until it resets
    /// the device.
    broken: bool,
    /// Whether a malformed chain was already logged at warn level.
    warned: bool,
}

impl EventHandler for Worker {
    fn handle(&mut self, token: u64) {
        match token {
            TOKEN_RX => {
                // Consumed first: a notification during the work makes the
                // loop call again, never gets lost.
                let _ = self.rx_notify.read();
                self.process_rx();
            }
            TOKEN_TX => {
                let _ = self.tx_notify.read();
                self.process_tx();
            }
            TOKEN_BACKEND => {
                if self.backend_watched {
                    self.process_rx();
                } else if backend_failed(self.backend.raw_fd()) {
                    // Not watched for input, yet epoll reports the fd: an
                    // error or hang-up (the TAP was deleted), which epoll
                    // reports whatever the interest. Stop watching it.
                    self.detach_backend("the interface reports an error (deleted?)");
                }
                // Else an event taken before the interest was turned off.
            }
            _ => {}
        }
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
    // ----- receive ------------------------------------------------------

    /// Moves frames from the backend into the guest's receive buffers
    /// until the backend has none, the guest has no room, or the budget
    /// is spent.
    fn process_rx(&mut self) {
        if !self.running || self.broken {
            return;
        }
        let mut delivered = false;
        let mut budget = RX_BUDGET;
        loop {
            if self.rx_len == 0 {
                if budget == 0 {
                    break;
                }
                if !self.read_backend() {
                    break;
                }
                budget -= 1;
                if self.rx_len == 0 {
                    // Dropped (runt or truncated): read the next one.
                    continue;
                }
            }
            match self.deliver_rx() {
                Ok(RxOutcome::Delivered) => {
                    self.rx_len = 0;
                    delivered = true;
                }
                Ok(RxOutcome::Dropped) => {
                    self.rx_len = 0;
                    // Bad chains were returned to the used ring.
                    delivered = true;
                }
                Ok(RxOutcome::NoBuffers) => match self.wait_for_rx_buffers() {
                    // Buffers arrived meanwhile: try again.
                    Ok(true) => {}
                    Ok(false) => {
                        // Until the guest adds buffers and notifies, leave
                        // further frames in the kernel's bounded queue.
                        self.watch_backend(false);
                        break;
                    }
                    Err(Broken(why)) => {
                        self.fail(&why);
                        return;
                    }
                },
                Err(Broken(why)) => {
                    self.fail(&why);
                    return;
                }
            }
        }
        if delivered {
            notify_driver(&mut self.rx, &self.interrupt, &self.mem);
        }
    }

    /// Reads the next frame into `rx_frame`; false when there is none (or
    /// the backend failed).
    fn read_backend(&mut self) -> bool {
        if self.backend_detached {
            return false;
        }
        match self.backend.read_frame(&mut self.rx_frame) {
            Ok(n) if n > MAX_BUFFER_LEN => {
                // Truncated: longer than any frame a guest can take.
                self.counters.rx_dropped.fetch_add(1, Ordering::Relaxed);
                true
            }
            Ok(n) if n < VNET_HDR_LEN + ETH_HLEN => {
                self.counters.rx_dropped.fetch_add(1, Ordering::Relaxed);
                true
            }
            Ok(n) => {
                self.rx_len = n;
                true
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // Drained: wait for the next frame.
                self.watch_backend(true);
                false
            }
            Err(e) => {
                self.counters.rx_errors.fetch_add(1, Ordering::Relaxed);
                self.detach_backend(&format!("read failed: {e}"));
                false
            }
        }
    }

    /// Copies the waiting frame into receive chains.
    fn deliver_rx(&mut self) -> Result<RxOutcome, Broken> {
        let mem = &self.mem;
        let available = available(&self.rx, mem)?;
        if available == 0 {
            return Ok(RxOutcome::NoBuffers);
        }
        let start = self.rx.next_avail();
        let len = self.rx_len;
        self.rx_chains.clear();
        self.rx_segments.clear();
        let mut capacity = 0usize;
        while capacity < len {
            let Some(chain) = self.rx.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            match gather_rx_chain(mem, chain, len - capacity, &mut self.rx_segments) {
                Ok(room) => {
                    self.rx_chains.push((head, room));
                    capacity += room as usize;
                }
                Err(e) => {
                    // A chain the guest got wrong: it and those taken for
                    // this frame go back empty, the frame is dropped.
                    self.counters.rx_malformed.fetch_add(1, Ordering::Relaxed);
                    self.counters.rx_dropped.fetch_add(1, Ordering::Relaxed);
                    report_malformed(&mut self.warned, self.backend.name(), "receive", &e);
                    self.rx_chains.push((head, 0));
                    for &(head, _) in &self.rx_chains {
                        add_used(&mut self.rx, mem, head, 0);
                    }
                    return Ok(RxOutcome::Dropped);
                }
            }
            if !self.mergeable {
                break;
            }
        }
        if capacity < len {
            let taken = self.rx_chains.len();
            // Put the chains back: nothing was written that the guest
            // can see, they stay on the available ring.
            self.rx.set_next_avail(start);
            let never_fits = !self.mergeable || taken >= usize::from(self.rx.size());
            if never_fits {
                // One chain (or the whole ring) is too small for this
                // frame: waiting would never help.
                self.counters.rx_dropped.fetch_add(1, Ordering::Relaxed);
                return Ok(RxOutcome::Dropped);
            }
            return Ok(RxOutcome::NoBuffers);
        }

        // The frame fits: tell the driver how many buffers it spans, copy,
        // and return the chains in order (a mergeable frame's buffers are
        // consecutive used entries).
        let buffers = u16::try_from(self.rx_chains.len()).unwrap_or(u16::MAX);
        self.rx_frame[NUM_BUFFERS_OFFSET..NUM_BUFFERS_OFFSET + 2]
            .copy_from_slice(&buffers.to_le_bytes());
        let mut offset = 0usize;
        for &(addr, seg_len) in &self.rx_segments {
            let n = (seg_len as usize).min(len - offset);
            if let Err(e) = mem.write_slice(&self.rx_frame[offset..offset + n], addr) {
                // Checked against guest memory while gathering, so this
                // does not happen; the guest then sees garbage, not vmlab.
                log::debug!("virtio-net: receive copy failed: {e}");
            }
            offset += n;
            if offset == len {
                break;
            }
        }
        let mut left = len;
        for &(head, room) in &self.rx_chains {
            let n = left.min(room as usize);
            // n <= room, a u32.
            add_used(&mut self.rx, mem, head, n as u32);
            left -= n;
        }
        self.counters.rx_frames.fetch_add(1, Ordering::Relaxed);
        self.counters
            .rx_bytes
            .fetch_add((len - VNET_HDR_LEN) as u64, Ordering::Relaxed);
        Ok(RxOutcome::Delivered)
    }

    /// Asks the driver to notify the receive queue as soon as it adds a
    /// buffer; true if one arrived meanwhile (look again).
    ///
    /// With event-idx the driver notifies when the available index passes
    /// `avail_event`. virtio-queue sets that to the next chain the device
    /// will take, which is right when the ring is empty; when it holds
    /// chains too small for the waiting frame, the driver would never
    /// notify again. So `avail_event` is set to the current available
    /// index: the next buffer added is the one that may make the frame fit.
    fn wait_for_rx_buffers(&mut self) -> Result<bool, Broken> {
        let mem = &self.mem;
        let avail = self
            .rx
            .avail_idx(mem, Ordering::Acquire)
            .map_err(|e| Broken(format!("cannot read the receive ring: {e}")))?
            .0;
        let next = self.rx.next_avail();
        self.rx.set_next_avail(avail);
        let more = self.rx.enable_notification(mem);
        self.rx.set_next_avail(next);
        more.map_err(|e| Broken(format!("cannot update the receive ring: {e}")))
    }

    /// Turns the backend fd's readable interest on or off.
    fn watch_backend(&mut self, on: bool) {
        if self.backend_watched == on {
            return;
        }
        let Some(registration) = &self.backend_registration else {
            return;
        };
        match self.event_loop.set_readable(registration, on) {
            Ok(()) => self.backend_watched = on,
            Err(e) => log::error!("virtio-net {}: {e}", self.backend.name()),
        }
    }

    /// Stops reading the backend for good (it failed).
    fn detach_backend(&mut self, why: &str) {
        log::error!(
            "virtio-net {}: {why}; the guest receives nothing more",
            self.backend.name()
        );
        if let Some(r) = self.backend_registration.take() {
            self.event_loop.unregister(r);
        }
        self.backend_watched = false;
        self.backend_detached = true;
    }

    // ----- transmit -----------------------------------------------------

    /// Sends every available transmit chain, then interrupts the driver
    /// if it wants to hear about them (event-idx aware).
    fn process_tx(&mut self) {
        if !self.running || self.broken {
            return;
        }
        let mut idle_rounds = 0;
        loop {
            if let Err(e) = self.tx.disable_notification(&self.mem) {
                self.fail(&format!("cannot update the transmit ring: {e}"));
                return;
            }
            if let Err(Broken(why)) = available(&self.tx, &self.mem) {
                self.fail(&why);
                return;
            }
            let mut served = 0usize;
            while let Some(chain) = self.tx.pop_descriptor_chain(&self.mem) {
                served += 1;
                let head = chain.head_index();
                match gather_tx_chain(&self.mem, chain, &mut self.tx_frame) {
                    Ok(len) => self.send(len),
                    Err(e) => {
                        self.counters.tx_malformed.fetch_add(1, Ordering::Relaxed);
                        report_malformed(&mut self.warned, self.backend.name(), "transmit", &e);
                    }
                }
                // The device writes nothing into a transmit chain.
                add_used(&mut self.tx, &self.mem, head, 0);
            }
            if served > 0 {
                notify_driver(&mut self.tx, &self.interrupt, &self.mem);
            }
            match self.tx.enable_notification(&self.mem) {
                Ok(false) => return,
                Ok(true) if served == 0 => {
                    // More is "available" yet nothing could be taken twice
                    // in a row: the ring is inconsistent.
                    idle_rounds += 1;
                    if idle_rounds > 1 {
                        self.fail("the transmit ring's available index is corrupt");
                        return;
                    }
                }
                Ok(true) => idle_rounds = 0,
                Err(e) => {
                    self.fail(&format!("cannot read the transmit ring: {e}"));
                    return;
                }
            }
        }
    }

    /// Writes the gathered frame (`len` bytes of `tx_frame`).
    fn send(&mut self, len: usize) {
        match self.backend.write_frame(&self.tx_frame[..len]) {
            Ok(_) => {
                self.counters.tx_frames.fetch_add(1, Ordering::Relaxed);
                self.counters
                    .tx_bytes
                    .fetch_add((len - VNET_HDR_LEN) as u64, Ordering::Relaxed);
            }
            Err(e) => {
                // Like a full NIC queue or a down link: the frame is lost,
                // TCP resends.
                if self.counters.tx_errors.fetch_add(1, Ordering::Relaxed) == 0 {
                    log::warn!(
                        "virtio-net {}: cannot send a frame: {e} (later failures are counted)",
                        self.backend.name()
                    );
                }
            }
        }
    }

    fn fail(&mut self, why: &str) {
        log::error!(
            "virtio-net {}: {why}; the device stops until the guest resets it",
            self.backend.name()
        );
        self.broken = true;
        self.interrupt.signal_needs_reset();
    }
}

/// Logs a dropped chain: the first at warn level, the rest at debug.
fn report_malformed(warned: &mut bool, name: &str, queue: &str, e: &ChainError) {
    if *warned {
        log::debug!("virtio-net {name}: {queue} chain dropped: {e}");
    } else {
        *warned = true;
        log::warn!(
            "virtio-net {name}: {queue} chain dropped: {e} (later ones are counted and logged \
             at debug level)"
        );
    }
}

/// Chains on the available ring not taken yet; an index more than a ring
/// ahead means the driver corrupted it.
fn available(queue: &Queue, mem: &GuestMemoryMmap) -> Result<u16, Broken> {
    let avail = queue
        .avail_idx(mem, Ordering::Acquire)
        .map_err(|e| Broken(format!("cannot read the available ring: {e}")))?
        .0;
    let pending = avail.wrapping_sub(queue.next_avail());
    if pending > queue.size() {
        return Err(Broken(format!(
            "the available index ran {pending} entries ahead of a {}-entry ring",
            queue.size()
        )));
    }
    Ok(pending)
}

fn add_used(queue: &mut Queue, mem: &GuestMemoryMmap, head: u16, len: u32) {
    if let Err(e) = queue.add_used(mem, head, len) {
        // Only a head index past the ring gets here (its chain was empty
        // and counted); it cannot be returned.
        log::debug!("virtio-net: cannot return descriptor {head}: {e}");
    }
}

/// Interrupts the driver for new used buffers unless event-idx says it
/// does not want to hear about them yet.
fn notify_driver(queue: &mut Queue, interrupt: &Interrupt, mem: &GuestMemoryMmap) {
    match queue.needs_notification(mem) {
        Ok(false) => {}
        // Cannot read used_event: interrupting too often is harmless.
        Ok(true) | Err(_) => interrupt.signal_used_buffer(),
    }
}

fn in_memory(mem: &GuestMemoryMmap, d: &Descriptor) -> Result<(), ChainError> {
    let ok = usize::try_from(d.len())
        .is_ok_and(|len| GuestMemoryBackend::check_range(mem, d.addr(), len));
    if ok {
        Ok(())
    } else {
        Err(ChainError::OutsideMemory {
            addr: d.addr().raw_value(),
            len: d.len(),
        })
    }
}

/// Checks a receive chain and appends its writable descriptors to
/// `segments`, stopping once `wanted` bytes are covered (so `segments`
/// stays bounded by the frame length). Returns the room counted.
fn gather_rx_chain<M>(
    mem: &GuestMemoryMmap,
    chain: virtio_queue::DescriptorChain<M>,
    wanted: usize,
    segments: &mut Vec<(GuestAddress, u32)>,
) -> Result<u32, ChainError>
where
    M: std::ops::Deref<Target = GuestMemoryMmap>,
{
    let mut room = 0u32;
    let mut count = 0usize;
    let mut ended = false;
    for d in chain {
        count += 1;
        ended = !d.has_next();
        if !d.is_write_only() {
            return Err(ChainError::ReadOnly);
        }
        in_memory(mem, &d)?;
        if (room as usize) < wanted && d.len() > 0 {
            segments.push((d.addr(), d.len()));
            room = room.saturating_add(d.len());
        }
    }
    if count == 0 {
        return Err(ChainError::Empty);
    }
    if !ended {
        return Err(ChainError::Unterminated);
    }
    if room == 0 {
        return Err(ChainError::NoRoom);
    }
    Ok(room)
}

/// Checks a transmit chain and copies it into `frame`; the frame's length
/// (header included).
fn gather_tx_chain<M>(
    mem: &GuestMemoryMmap,
    chain: virtio_queue::DescriptorChain<M>,
    frame: &mut [u8],
) -> Result<usize, ChainError>
where
    M: std::ops::Deref<Target = GuestMemoryMmap>,
{
    let mut len = 0usize;
    let mut count = 0usize;
    let mut ended = false;
    for d in chain {
        count += 1;
        ended = !d.has_next();
        if d.is_write_only() {
            return Err(ChainError::WriteOnly);
        }
        in_memory(mem, &d)?;
        let end = len
            .checked_add(d.len() as usize)
            .filter(|&end| end <= frame.len())
            .ok_or(ChainError::Oversized)?;
        mem.read_slice(&mut frame[len..end], d.addr())
            .map_err(|_| ChainError::OutsideMemory {
                addr: d.addr().raw_value(),
                len: d.len(),
            })?;
        len = end;
    }
    if count == 0 {
        return Err(ChainError::Empty);
    }
    if !ended {
        return Err(ChainError::Unterminated);
    }
    if len < VNET_HDR_LEN {
        return Err(ChainError::MissingHeader(len));
    }
    if len - VNET_HDR_LEN < ETH_HLEN {
        return Err(ChainError::Runt(len - VNET_HDR_LEN));
    }
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::event_loop::EventLoop;
    use crate::devices::virtio::test_utils::{MockDriver as Driver, XorShift};
    use std::os::fd::{FromRawFd, OwnedFd};
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    const NEXT: u16 = 1;
    const WRITE: u16 = 2;

    const MEM_SIZE: u64 = 0x40_0000;
    const RXQ_ADDR: u64 = 0x1000;
    const TXQ_ADDR: u64 = 0x8000;
    /// Receive buffers: 64 KiB from here.
    const RX_BUF_ADDR: u64 = 0x10_0000;
    /// Transmit data.
    const TX_BUF_ADDR: u64 = 0x30_0000;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
    }

    /// One end of a SOCK_SEQPACKET socket pair: keeps frame boundaries
    /// like a TAP, needs no privileges.
    struct PairBackend {
        fd: OwnedFd,
        offloads: Mutex<Vec<Offloads>>,
    }

    impl NetBackend for PairBackend {
        fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
            crate::devices::tap::read_fd(self.fd.as_raw_fd(), buf)
        }
        fn write_frame(&self, buf: &[u8]) -> io::Result<usize> {
            crate::devices::tap::write_fd(self.fd.as_raw_fd(), buf)
        }
        fn set_offloads(&self, offloads: Offloads) -> Result<(), TapError> {
            self.offloads.lock().unwrap().push(offloads);
            Ok(())
        }
        fn raw_fd(&self) -> RawFd {
            self.fd.as_raw_fd()
        }
        fn name(&self) -> &str {
            "test-pair"
        }
    }

    /// The host side of the pair.
    struct Peer {
        fd: OwnedFd,
    }

    impl Peer {
        fn send(&self, frame: &[u8]) -> io::Result<usize> {
            crate::devices::tap::write_fd(self.fd.as_raw_fd(), frame)
        }
        fn recv(&self) -> Option<Vec<u8>> {
            let mut buf = vec![0u8; MAX_BUFFER_LEN + 16];
            match crate::devices::tap::read_fd(self.fd.as_raw_fd(), &mut buf) {
                Ok(n) => {
                    buf.truncate(n);
                    Some(buf)
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
                Err(e) => panic!("{e}"),
            }
        }
    }

    fn socket_pair() -> (Arc<PairBackend>, Peer) {
        let mut fds = [0; 2];
        // SAFETY: socketpair writes two fds into the live array.
        let rc = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        assert_eq!(rc, 0, "{}", io::Error::last_os_error());
        // SAFETY: both fds are new and owned by nobody else.
        let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        for fd in [&a, &b] {
            // Room for a few 64 KiB frames, as in a TAP's queue.
            let size: libc::c_int = 1 << 20;
            // SAFETY: setsockopt reads one int from a live local.
            unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_SNDBUF,
                    (&size as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
        }
        (
            Arc::new(PairBackend {
                fd: a,
                offloads: Mutex::new(Vec::new()),
            }),
            Peer { fd: b },
        )
    }

    struct Setup {
        mem: GuestMemoryMmap,
        irq: EventFd,
    }

    impl Setup {
        fn new() -> Setup {
            Setup {
                mem: memory(),
                irq: EventFd::new(EFD_NONBLOCK).unwrap(),
            }
        }

        /// A worker on a socket pair, without the event loop (tests call
        /// process_rx / process_tx themselves) unless `event_loop` is
        /// given.
        fn worker(
            &self,
            rx: Queue,
            tx: Queue,
            mergeable: bool,
            event_loop: &EventLoopHandle,
        ) -> (Worker, Peer, NetHandle) {
            let (backend, peer) = socket_pair();
            let counters = Arc::new(Counters::default());
            let w = Worker {
                mem: self.mem.clone(),
                rx,
                rx_notify: Arc::new(EventFd::new(EFD_NONBLOCK).unwrap()),
                tx,
                tx_notify: Arc::new(EventFd::new(EFD_NONBLOCK).unwrap()),
                interrupt: Arc::new(Interrupt::new(self.irq.try_clone().unwrap())),
                backend: backend.clone(),
                counters: counters.clone(),
                mergeable,
                rx_frame: vec![0; MAX_BUFFER_LEN + 1].into_boxed_slice(),
                rx_len: 0,
                rx_chains: Vec::with_capacity(usize::from(QUEUE_SIZE)),
                rx_segments: Vec::with_capacity(usize::from(QUEUE_SIZE)),
                tx_frame: vec![0; MAX_BUFFER_LEN].into_boxed_slice(),
                event_loop: event_loop.clone(),
                backend_registration: None,
                backend_watched: false,
                backend_detached: false,
                running: true,
                broken: false,
                warned: false,
            };
            let handle = NetHandle {
                name: "test-pair".into(),
                mac: MacAddr([2, 0, 0, 0, 0, 1]),
                counters,
            };
            (w, peer, handle)
        }
    }

    /// A frame with a zero header: `len` bytes after it, byte i = seed + i.
    fn frame(len: usize, seed: u8) -> Vec<u8> {
        let mut f = vec![0u8; VNET_HDR_LEN + len];
        for (i, b) in f[VNET_HDR_LEN..].iter_mut().enumerate() {
            *b = seed.wrapping_add(i as u8);
        }
        f
    }

    fn guest_bytes(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    /// Posts `count` single-descriptor receive buffers of `size` bytes.
    fn post_rx(d: &mut Driver<'_>, count: u16, size: u32) {
        for _ in 0..count {
            let slot = u64::from(d.next_desc);
            d.submit(&[(RX_BUF_ADDR + slot * u64::from(size), size, WRITE)]);
        }
    }

    #[test]
    fn mac_addresses() {
        let mac: MacAddr = "52:54:00:12:34:56".parse().unwrap();
        assert_eq!(mac.0, [0x52, 0x54, 0, 0x12, 0x34, 0x56]);
        assert_eq!(mac.to_string(), "52:54:00:12:34:56");
        assert_eq!("02-AA-bb-00-00-01".parse::<MacAddr>().unwrap().0[1], 0xaa);
        for bad in [
            "",
            "52:54:00:12:34",
            "52:54:00:12:34:56:78",
            "zz:54:00:12:34:56",
            "5:54:00:12:34:56",
            "525:4:00:12:34:56",
            "52:54:00:12:34:+6",
        ] {
            let err = bad.parse::<MacAddr>().unwrap_err();
            assert!(err.contains("not a MAC address"), "{bad}: {err}");
        }
        assert!("01:00:5e:00:00:01"
            .parse::<MacAddr>()
            .unwrap_err()
            .contains("multicast"));
        assert!("00:00:00:00:00:00"
            .parse::<MacAddr>()
            .unwrap_err()
            .contains("all-zero"));
        for i in 0..64 {
            let m = MacAddr::random_local(i);
            assert!(!m.is_multicast());
            assert_eq!(m.0[0] & 0x02, 0x02, "locally administered: {m}");
        }
        assert_ne!(MacAddr::random_local(0), MacAddr::random_local(0));
    }

    #[test]
    fn features_and_config_space() {
        let (backend, _peer) = socket_pair();
        let el = EventLoop::new().unwrap();
        let mac = MacAddr([2, 1, 2, 3, 4, 5]);
        let mut net = Net::with_backend(backend, mac, el.handle());
        assert_eq!(net.device_type(), 1);
        assert_eq!(net.queue_max_sizes(), &[QUEUE_SIZE, QUEUE_SIZE]);
        let f = net.features();
        for bit in [
            VIRTIO_F_VERSION_1,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_NET_F_MAC,
            VIRTIO_NET_F_STATUS,
            VIRTIO_NET_F_MRG_RXBUF,
            VIRTIO_NET_F_CSUM,
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_F_GUEST_TSO4,
        ] {
            assert_ne!(f & feature(bit), 0, "bit {bit}");
        }
        let mut buf = [0u8; 6];
        net.read_config(0, &mut buf);
        assert_eq!(buf, mac.0);
        let mut status = [0u8; 2];
        net.read_config(6, &mut status);
        assert_eq!(u16::from_le_bytes(status), VIRTIO_NET_S_LINK_UP);
        let mut word = [0u8; 4];
        net.read_config(9, &mut word);
        assert_eq!(word, [0, 0, 0, 0]);
        net.read_config(u64::MAX, &mut word);
        assert_eq!(word, [0; 4]);
        net.write_config(0, &[0xff; 6]);
        net.read_config(0, &mut buf);
        assert_eq!(buf, mac.0, "the MAC is read-only");

        // Offloads follow what the driver accepted; unoffered bits are
        // ignored.
        net.ack_features(
            feature(VIRTIO_NET_F_GUEST_CSUM) | feature(VIRTIO_NET_F_GUEST_TSO4) | 1 << 63,
        );
        assert_eq!(
            net.rx_offloads(),
            Offloads {
                csum: true,
                tso4: true,
                ..Offloads::default()
            }
        );
    }

    #[test]
    fn transmit_frames_reach_the_backend() {
        let s = Setup::new();
        let el = EventLoop::new().unwrap();
        let rxd = Driver::new(&s.mem, RXQ_ADDR, 16);
        let mut txd = Driver::new(&s.mem, TXQ_ADDR, 16);
        let (mut w, peer, handle) = s.worker(rxd.queue(), txd.queue(), true, &el.handle());

        // Header and data in one descriptor.
        let f1 = frame(1500, 1);
        s.mem.write_slice(&f1, GuestAddress(TX_BUF_ADDR)).unwrap();
        txd.submit(&[(TX_BUF_ADDR, f1.len() as u32, 0)]);
        // Header apart, data in three pieces (any layout is allowed).
        let f2 = frame(60_000, 7);
        s.mem
            .write_slice(&f2[..12], GuestAddress(TX_BUF_ADDR + 0x1_0000))
            .unwrap();
        s.mem
            .write_slice(&f2[12..20_012], GuestAddress(TX_BUF_ADDR + 0x2_0000))
            .unwrap();
        s.mem
            .write_slice(&f2[20_012..40_012], GuestAddress(TX_BUF_ADDR + 0x3_0000))
            .unwrap();
        s.mem
            .write_slice(&f2[40_012..], GuestAddress(TX_BUF_ADDR + 0x4_0000))
            .unwrap();
        txd.submit(&[
            (TX_BUF_ADDR + 0x1_0000, 12, 0),
            (TX_BUF_ADDR + 0x2_0000, 20_000, 0),
            (TX_BUF_ADDR + 0x3_0000, 20_000, 0),
            (TX_BUF_ADDR + 0x4_0000, 20_000, 0),
        ]);
        w.process_tx();
        assert_eq!(peer.recv().unwrap(), f1);
        assert_eq!(peer.recv().unwrap(), f2);
        assert!(peer.recv().is_none());
        assert_eq!(txd.used_idx(), 2);
        assert_eq!(txd.used(0), (0, 0));
        assert_eq!(txd.used(1), (1, 0));
        assert_eq!(s.irq.read().unwrap(), 1);
        let st = handle.stats();
        assert_eq!((st.tx_frames, st.tx_bytes), (2, 61_500));
        assert_eq!(st.tx_malformed, 0);
    }

    /// Oversized frames, addresses outside guest memory, missing headers
    /// and the like: each dropped and counted, returned to the used ring,
    /// and the next good frame still goes out.
    #[test]
    fn malformed_transmit_chains_are_dropped_and_counted() {
        let s = Setup::new();
        let el = EventLoop::new().unwrap();
        let rxd = Driver::new(&s.mem, RXQ_ADDR, 16);
        let mut txd = Driver::new(&s.mem, TXQ_ADDR, 16);
        let (mut w, peer, handle) = s.worker(rxd.queue(), txd.queue(), true, &el.handle());
        let good = frame(100, 3);
        s.mem.write_slice(&good, GuestAddress(TX_BUF_ADDR)).unwrap();
        let good_len = good.len() as u32;

        type Chain = Vec<(u64, u32, u16)>;
        let cases: Vec<(&str, Chain)> = vec![
            (
                "oversized (one byte too many)",
                vec![(TX_BUF_ADDR, MAX_BUFFER_LEN as u32 + 1, 0)],
            ),
            (
                "oversized across descriptors",
                vec![(TX_BUF_ADDR, 60_000, 0), (TX_BUF_ADDR, 60_000, 0)],
            ),
            ("outside guest memory", vec![(MEM_SIZE - 50, 100, 0)]),
            ("at u64::MAX", vec![(u64::MAX - 10, 100, 0)]),
            (
                "second descriptor outside guest memory",
                vec![(TX_BUF_ADDR, 12, 0), (MEM_SIZE, 64, 0)],
            ),
            ("missing header", vec![(TX_BUF_ADDR, 11, 0)]),
            ("empty descriptor only", vec![(TX_BUF_ADDR, 0, 0)]),
            (
                "header without an Ethernet frame",
                vec![(TX_BUF_ADDR, 20, 0)],
            ),
            (
                "device-writable descriptor",
                vec![(TX_BUF_ADDR, good_len, WRITE)],
            ),
        ];
        for (i, (what, chain)) in cases.iter().enumerate() {
            txd.submit(chain);
            txd.submit(&[(TX_BUF_ADDR, good_len, 0)]);
            w.process_tx();
            assert_eq!(peer.recv().as_deref(), Some(&good[..]), "{what}");
            assert!(peer.recv().is_none(), "{what}: dropped");
            let st = handle.stats();
            assert_eq!(st.tx_malformed, i as u64 + 1, "{what}");
            assert_eq!(st.tx_frames, i as u64 + 1, "{what}");
            assert_eq!(txd.used_idx(), 2 * (i as u16 + 1), "{what}: both returned");
            assert!(!w.broken, "{what}");
        }

        // A chain that loops back on itself.
        txd.store(0, TX_BUF_ADDR, good_len, NEXT, 1);
        txd.store(1, TX_BUF_ADDR, good_len, NEXT, 0);
        txd.publish(0);
        w.process_tx();
        assert!(peer.recv().is_none());
        assert_eq!(handle.stats().tx_malformed, cases.len() as u64 + 1);
        // A head index past the ring.
        txd.publish(99);
        w.process_tx();
        assert_eq!(handle.stats().tx_malformed, cases.len() as u64 + 2);
        // Still working.
        txd.next_desc = 2;
        txd.submit(&[(TX_BUF_ADDR, good_len, 0)]);
        w.process_tx();
        assert_eq!(peer.recv().as_deref(), Some(&good[..]));
    }

    #[test]
    fn transmit_errors_of_the_backend_are_counted() {
        let s = Setup::new();
        let el = EventLoop::new().unwrap();
        let rxd = Driver::new(&s.mem, RXQ_ADDR, 16);
        let mut txd = Driver::new(&s.mem, TXQ_ADDR, 16);
        let (mut w, peer, handle) = s.worker(rxd.queue(), txd.queue(), true, &el.handle());
        drop(peer); // writes now fail with EPIPE
        let f = frame(100, 0);
        s.mem.write_slice(&f, GuestAddress(TX_BUF_ADDR)).unwrap();
        txd.submit(&[(TX_BUF_ADDR, f.len() as u32, 0)]);
        w.process_tx();
        assert_eq!(txd.used_idx(), 1);
        let st = handle.stats();
        assert_eq!((st.tx_errors, st.tx_frames, st.tx_malformed), (1, 0, 0));
    }

    #[test]
    fn receive_with_mergeable_buffers() {
        let s = Setup::new();
        let el = EventLoop::new().unwrap();
        let mut rxd = Driver::new(&s.mem, RXQ_ADDR, 16);
        let txd = Driver::new(&s.mem, TXQ_ADDR, 16);
        let (mut w, peer, handle) = s.worker(rxd.queue(), txd.queue(), true, &el.handle());
        post_rx(&mut rxd, 8, 1536);

        let small = frame(60, 9);
        let big = frame(4000, 1); // 4012 bytes: three 1536-byte buffers
        peer.send(&small).unwrap();
        peer.send(&big).unwrap();
        w.process_rx();

        assert_eq!(rxd.used_idx(), 4);
        assert_eq!(rxd.used(0), (0, small.len() as u32));
        let got = guest_bytes(&s.mem, RX_BUF_ADDR, small.len());
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1, "num_buffers");
        assert_eq!(got[12..], small[12..]);

        assert_eq!(rxd.used(1), (1, 1536));
        assert_eq!(rxd.used(2), (2, 1536));
        assert_eq!(rxd.used(3), (3, 4012 - 2 * 1536));
        // Buffers 1..3 are contiguous in guest memory here.
        let got = guest_bytes(&s.mem, RX_BUF_ADDR + 1536, big.len());
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 3, "num_buffers");
        assert_eq!(got[..10], big[..10]);
        assert_eq!(got[12..], big[12..]);
        assert_eq!(s.irq.read().unwrap(), 1);
        let st = handle.stats();
        assert_eq!((st.rx_frames, st.rx_bytes), (2, 4060));
        assert_eq!(st.rx_dropped, 0);
    }

    #[test]
    fn receive_without_mergeable_buffers() {
        let s = Setup::new();
        let el = EventLoop::new().unwrap();
        let mut rxd = Driver::new(&s.mem, RXQ_ADDR, 16);
        let txd = Driver::new(&s.mem, TXQ_ADDR, 16);
        let (mut w, peer, handle) = s.worker(rxd.queue(), txd.queue(), false, &el.handle());
        // One chain: header descriptor apart, then two data descriptors.
        rxd.submit(&[
            (RX_BUF_ADDR, 12, WRITE),
            (RX_BUF_ADDR + 0x1000, 1000, WRITE),
            (RX_BUF_ADDR + 0x2000, 1000, WRITE),
        ]);
        let f = frame(1500, 5);
        peer.send(&f).unwrap();
        w.process_rx();
        assert_eq!(rxd.used_idx(), 1);
        assert_eq!(rxd.used(0), (0, 1512));
        assert_eq!(guest_bytes(&s.mem, RX_BUF_ADDR + 0x1000, 1000), f[12..1012]);
        assert_eq!(guest_bytes(&s.mem, RX_BUF_ADDR + 0x2000, 500), f[1012..]);
        // Too big for the one chain the guest has: dropped, the chain kept.
        rxd.submit(&[(RX_BUF_ADDR + 0x4000, 1000, WRITE)]);
        peer.send(&frame(2000, 0)).unwrap();
        let small = frame(100, 2);
        peer.send(&small).unwrap();
        w.process_rx();
        assert_eq!(rxd.used_idx(), 2);
        assert_eq!(rxd.used(1), (3, small.len() as u32));
        let st = handle.stats();
        assert_eq!((st.rx_frames, st.rx_dropped), (2, 1));
    }

    /// Receive chains the guest got wrong are returned empty and counted;
    /// the frame is dropped and the next one delivered.
    #[test]
    fn malformed_receive_chains() {
        let s = Setup::new();
        let el = EventLoop::new().unwrap();
        let mut rxd = Driver::new(&s.mem, RXQ_ADDR, 16);
        let txd = Driver::new(&s.mem, TXQ_ADDR, 16);
        let (mut w, peer, handle) = s.worker(rxd.queue(), txd.queue(), true, &el.handle());
        let bad: [&[(u64, u32, u16)]; 4] = [
            &[(RX_BUF_ADDR, 1536, 0)],        // device-readable
            &[(MEM_SIZE - 100, 1536, WRITE)], // outside memory
            &[(RX_BUF_ADDR, 0, WRITE)],       // no room
            &[(u64::MAX - 1, 1536, WRITE)],   // address overflow
        ];
        for (i, chain) in bad.iter().enumerate() {
            rxd.submit(chain);
            let slot = u64::from(rxd.next_desc);
            rxd.submit(&[(RX_BUF_ADDR + slot * 2048, 2048, WRITE)]);
            peer.send(&frame(100, 0)).unwrap();
            peer.send(&frame(200, 0)).unwrap();
            w.process_rx();
            let base = 2 * i as u16;
            assert_eq!(rxd.used_idx(), base + 2, "chain {i}");
            assert_eq!(rxd.used(base).1, 0, "chain {i}: returned empty");
            assert_eq!(rxd.used(base + 1).1, 212, "chain {i}: next frame delivered");
            let st = handle.stats();
            assert_eq!(st.rx_malformed, i as u64 + 1);
            assert_eq!(st.rx_dropped, i as u64 + 1);
            assert_eq!(st.rx_frames, i as u64 + 1);
        }
        assert!(!w.broken);
    }

    /// A guest that posts no receive buffers: the device holds at most one
    /// frame, stops watching the backend (no busy loop), leaves the rest
    /// in the backend's bounded queue, and delivers everything in order
    /// once buffers arrive.
    #[test]
    fn a_guest_without_receive_buffers_costs_no_memory() {
        let s = Setup::new();
        let event_loop = EventLoop::new().unwrap();
        let h = event_loop.handle();
        let mut rxd = Driver::new(&s.mem, RXQ_ADDR, 256);
        let mut rx_queue = rxd.queue();
        rx_queue.set_event_idx(true);
        let txd = Driver::new(&s.mem, TXQ_ADDR, 16);
        let (w, peer, handle) = s.worker(rx_queue, txd.queue(), true, &h);
        let rx_notify = w.rx_notify.clone();
        let backend_fd = w.backend.raw_fd();
        let worker = Arc::new(Mutex::new(w));
        let reg_rx = h.register(&*rx_notify, TOKEN_RX, worker.clone()).unwrap();
        let reg_backend = h
            .register(&backend_fd, TOKEN_BACKEND, worker.clone())
            .unwrap();
        {
            let mut w = worker.lock().unwrap();
            w.backend_registration = Some(reg_backend);
            w.backend_watched = true;
        }

        // The host sends until the backend's queue is full: the kernel,
        // not vmlab, bounds it.
        let mut sent = 0u32;
        loop {
            let mut f = frame(9000, 0);
            f[12..16].copy_from_slice(&sent.to_le_bytes());
            match peer.send(&f) {
                Ok(_) => sent += 1,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
            assert!(sent < 100_000, "the backend queue must be bounded");
        }
        assert!(sent > 2);
        let capacities = |w: &Worker| {
            (
                w.rx_frame.len(),
                w.rx_chains.capacity(),
                w.rx_segments.capacity(),
                w.tx_frame.len(),
            )
        };
        let before = capacities(&worker.lock().unwrap());

        // Many rounds of the event loop: the handler runs once, takes one
        // frame, finds no buffer, and turns the backend interest off.
        for _ in 0..50 {
            event_loop.run_once(0).unwrap();
        }
        {
            let w = worker.lock().unwrap();
            assert!(!w.backend_watched, "backend fd no longer watched");
            assert_eq!(w.rx_len, 9012, "exactly one frame held");
            assert_eq!(capacities(&w), before, "no buffer grew");
        }
        assert_eq!(handle.stats().rx_frames, 0);
        assert_eq!(rxd.used_idx(), 0);
        // The driver was asked to notify on its next buffer (event-idx).
        let avail_event = GuestAddress(rxd.vq.used_addr().0 + 4 + 8 * 256);
        assert_eq!(s.mem.read_obj::<u16>(avail_event).unwrap(), 0);

        // Buffers and a notification: frames flow again, in order, as
        // long as there is room.
        let mut received = 0u32;
        let mut rounds = 0;
        while received < sent {
            rounds += 1;
            assert!(rounds < 10_000, "stuck at {received} of {sent}");
            // Mergeable buffers of 4 KiB: 3 per 9012-byte frame.
            for _ in 0..48 {
                let slot = u64::from(rxd.next_desc);
                rxd.submit(&[(RX_BUF_ADDR + slot * 4096, 4096, WRITE)]);
            }
            rx_notify.write(1).unwrap();
            for _ in 0..4 {
                event_loop.run_once(0).unwrap();
            }
            let used = rxd.used_idx();
            let frames_done = handle.stats().rx_frames as u32;
            assert!(frames_done <= sent);
            for f in received..frames_done {
                // First buffer of frame f: used entry 3f.
                let (id, len) = rxd.used((3 * f) as u16);
                assert_eq!(len, 4096);
                let got = guest_bytes(&s.mem, RX_BUF_ADDR + u64::from(id) * 4096 + 12, 4);
                assert_eq!(u32::from_le_bytes(got.try_into().unwrap()), f, "in order");
            }
            assert_eq!(used, (3 * frames_done) as u16);
            received = frames_done;
            let w = worker.lock().unwrap();
            assert_eq!(capacities(&w), before, "no buffer grew");
        }
        assert_eq!(handle.stats().rx_dropped, 0);
        {
            let mut w = worker.lock().unwrap();
            let r = w.backend_registration.take().unwrap();
            h.unregister(r);
        }
        h.unregister(reg_rx);
    }

    #[test]
    fn corrupt_available_index_stops_the_device() {
        let s = Setup::new();
        let el = EventLoop::new().unwrap();
        let mut rxd = Driver::new(&s.mem, RXQ_ADDR, 16);
        let txd = Driver::new(&s.mem, TXQ_ADDR, 16);
        let (mut w, peer, _) = s.worker(rxd.queue(), txd.queue(), true, &el.handle());
        txd.vq.avail().idx().store(txd.avail.wrapping_add(100));
        w.process_tx();
        assert!(w.broken);
        assert!(w.interrupt.needs_reset());
        w.process_tx();
        w.process_rx();

        let (mut w, _peer2, _) = s.worker(rxd.queue(), txd.queue(), true, &el.handle());
        drop(peer);
        post_rx(&mut rxd, 1, 1536);
        rxd.vq.avail().idx().store(rxd.avail.wrapping_add(200));
        w.rx_len = 100;
        w.process_rx();
        assert!(w.broken);
    }

    #[test]
    fn activation_and_reset_with_the_event_loop() {
        let s = Setup::new();
        let event_loop = EventLoop::new().unwrap();
        let h = event_loop.handle();
        let (backend, peer) = socket_pair();
        let mut net = Net::with_backend(backend.clone(), MacAddr([2, 0, 0, 0, 0, 9]), h.clone());
        let interrupt = Arc::new(Interrupt::new(s.irq.try_clone().unwrap()));
        let notify = [
            Arc::new(EventFd::new(EFD_NONBLOCK).unwrap()),
            Arc::new(EventFd::new(EFD_NONBLOCK).unwrap()),
        ];
        // Missing or unready queues are refused.
        assert!(net
            .activate(s.mem.clone(), vec![], interrupt.clone())
            .is_err());
        let err = net
            .activate(
                s.mem.clone(),
                vec![
                    DeviceQueue {
                        queue: Queue::new(16).unwrap(),
                        notify: notify[0].clone(),
                    },
                    DeviceQueue {
                        queue: Queue::new(16).unwrap(),
                        notify: notify[1].clone(),
                    },
                ],
                interrupt.clone(),
            )
            .unwrap_err();
        assert!(matches!(err, ActivateError::QueueNotReady { index: 0 }));
        assert_eq!(h.registrations(), 0);

        let mut rxd = Driver::new(&s.mem, RXQ_ADDR, 16);
        let mut txd = Driver::new(&s.mem, TXQ_ADDR, 16);
        net.ack_features(net.features());
        net.activate(
            s.mem.clone(),
            vec![
                DeviceQueue {
                    queue: rxd.queue(),
                    notify: notify[0].clone(),
                },
                DeviceQueue {
                    queue: txd.queue(),
                    notify: notify[1].clone(),
                },
            ],
            interrupt,
        )
        .unwrap();
        assert_eq!(h.registrations(), 3);
        assert_eq!(
            backend.offloads.lock().unwrap().last(),
            Some(&Offloads {
                csum: true,
                tso4: true,
                tso6: true,
                tso_ecn: true
            })
        );

        // Guest → host.
        let f = frame(64, 4);
        s.mem.write_slice(&f, GuestAddress(TX_BUF_ADDR)).unwrap();
        txd.submit(&[(TX_BUF_ADDR, f.len() as u32, 0)]);
        notify[1].write(1).unwrap();
        event_loop.run_once(0).unwrap();
        assert_eq!(peer.recv().unwrap(), f);
        // Host → guest.
        post_rx(&mut rxd, 2, 1536);
        notify[0].write(1).unwrap();
        let g = frame(80, 8);
        peer.send(&g).unwrap();
        for _ in 0..3 {
            event_loop.run_once(0).unwrap();
        }
        assert_eq!(rxd.used_idx(), 1);
        assert_eq!(rxd.used(0).1, g.len() as u32);
        assert_eq!(net.handle().stats().rx_frames, 1);

        net.reset();
        assert_eq!(h.registrations(), 0);
        assert_eq!(
            backend.offloads.lock().unwrap().last(),
            Some(&Offloads::default())
        );
        // After reset nothing touches the rings.
        peer.send(&g).unwrap();
        notify[0].write(1).unwrap();
        event_loop.run_once(0).unwrap();
        assert_eq!(rxd.used_idx(), 1);
    }

    /// Random descriptor tables on both queues and random frames from the
    /// host: nothing panics, nothing loops forever, counters add up.
    #[test]
    fn random_chains_never_panic() {
        let s = Setup::new();
        let el = EventLoop::new().unwrap();
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        let mut rxd = Driver::new(&s.mem, RXQ_ADDR, 16);
        let mut txd = Driver::new(&s.mem, TXQ_ADDR, 16);
        let (mut w, peer, handle) = s.worker(rxd.queue(), txd.queue(), true, &el.handle());
        let addrs = [
            RX_BUF_ADDR,
            TX_BUF_ADDR,
            MEM_SIZE - 1,
            MEM_SIZE,
            u64::MAX,
            u64::MAX - 15,
            RXQ_ADDR,
        ];
        let lens = [0u32, 1, 11, 12, 26, 1536, 4096, 65_562, 65_563, u32::MAX];
        for round in 0..1000 {
            w.mergeable = rng.below(4) != 0;
            // Mostly the direction each queue needs, now and then not.
            for (d, usual) in [(&mut rxd, WRITE), (&mut txd, 0)] {
                for i in 0..16 {
                    let (addr, len, flags, next) = if rng.below(4) != 0 {
                        let dir = if rng.below(8) == 0 {
                            WRITE - usual
                        } else {
                            usual
                        };
                        (
                            rng.pick(&[RX_BUF_ADDR, TX_BUF_ADDR]),
                            rng.pick(&[64, 1536, 4096]),
                            dir | rng.pick(&[0, 0, NEXT]),
                            i + 1,
                        )
                    } else {
                        (
                            rng.pick(&addrs),
                            rng.pick(&lens),
                            rng.below(8) as u16,
                            rng.pick(&[0, 1, i + 1, 15, 16, u16::MAX]),
                        )
                    };
                    d.store(i, addr, len, flags, next);
                }
                for _ in 0..rng.below(4) {
                    d.publish(rng.pick(&[0, 0, 3, 3, 1, 5, 15, 16, u16::MAX]));
                }
            }
            for _ in 0..rng.below(3) {
                let len = rng.pick(&[0usize, 5, 14, 100, 1500, 9000, 65_550]);
                let _ = peer.send(&frame(len, round as u8));
            }
            if round % 250 == 249 {
                txd.vq.avail().idx().store(rng.next() as u16);
            }
            w.process_tx();
            w.process_rx();
            while peer.recv().is_some() {}
            if w.broken {
                for d in [&mut rxd, &mut txd] {
                    d.vq.avail().idx().store(0);
                    d.avail = 0;
                }
                w.rx = rxd.queue();
                w.tx = txd.queue();
                w.rx_len = 0;
                w.broken = false;
            }
        }
        let st = handle.stats();
        assert!(st.tx_frames > 0 && st.tx_malformed > 0, "{st}");
        assert!(st.rx_frames > 0 && st.rx_malformed > 0, "{st}");
    }
}
