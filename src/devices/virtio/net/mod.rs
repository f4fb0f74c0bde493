//! virtio-net on a host TAP device: one receive and one transmit queue,
//! served on the device's own thread.
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
//! Receive (TAP → guest, queue 0): the TAP fd is on the device thread's
//! epoll set. A
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
//!
//! Split by concern: here the device state and its [`DeviceModel`];
//! [`mac`] the MAC address type; [`backend`] the host side; `worker` the
//! device thread's event handling, with its receive (`worker/rx.rs`) and
//! transmit (`worker/tx.rs`) paths, each of which checks the chains it
//! takes.

pub mod backend;
pub mod mac;
mod worker;

use std::fmt;
use std::sync::Arc;

use virtio_queue::QueueT;

use super::device::{Activation, Device, DeviceModel};
use super::queue::{LogLimit, VirtQueue, QUEUE_BUDGET};
use super::thread::DeviceWorker;
use super::{feature, ActivateError, VIRTIO_F_VERSION_1, VIRTIO_ID_NET, VIRTIO_RING_F_EVENT_IDX};
use crate::devices::tap::{Offloads, Tap, VNET_HDR_LEN};

pub use backend::NetBackend;
pub use mac::MacAddr;
use worker::Worker;

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
pub(crate) const ETH_HLEN: usize = 14;
/// Frames received per wake-up before the thread serves the other queue
/// (the TAP fd stays readable, or the worker reports more work, so the
/// thread comes back at once).
pub(crate) const RX_BUDGET: usize = QUEUE_BUDGET;
/// Descriptors per chain. Linux's driver uses at most MAX_SKB_FRAGS + 2
/// (19) for a frame; anything longer is refused without being followed.
pub const MAX_CHAIN: usize = 64;

use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_STATUS,
};

/// `status` in the configuration space: the link is up.
const VIRTIO_NET_S_LINK_UP: u16 = virtio_bindings::virtio_net::VIRTIO_NET_S_LINK_UP as u16;
/// mac[6], status, max_virtqueue_pairs.
const CONFIG_LEN: usize = 10;
/// Offset of `num_buffers` in the header.
pub(crate) const NUM_BUFFERS_OFFSET: usize = 10;

/// epoll tokens of the worker's three fds.
pub(crate) const TOKEN_RX: u64 = 0;
pub(crate) const TOKEN_TX: u64 = 1;
pub(crate) const TOKEN_BACKEND: u64 = 2;

/// A network interface as the user describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// The host TAP interface.
    pub tap: String,
    /// The guest's MAC address (`None`: a random local one).
    pub mac: Option<MacAddr>,
}

device_counters! {
    /// A snapshot of a network device's counters. Bytes count frames
    /// without the virtio-net header.
    pub struct NetStats / Counters {
        /// Frames delivered to the guest.
        rx_frames,
        /// Their bytes.
        rx_bytes,
        /// Frames from the host the guest had no room for (larger than its
        /// buffers, shorter than a header).
        rx_dropped,
        /// Receive chains the guest got wrong (returned empty).
        rx_malformed,
        /// Failed reads from the backend.
        rx_errors,
        /// Frames sent by the guest to the backend.
        tx_frames,
        /// Their bytes.
        tx_bytes,
        /// Transmit chains dropped by validation.
        tx_malformed,
        /// Well-formed frames the backend refused (interface down, bad
        /// offload header, queue full).
        tx_errors,
    }
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
        self.counters.snapshot()
    }
}

/// The virtio-net device.
pub type Net = Device<NetModel>;

/// virtio-net's own state: the backend, the MAC, the counters.
pub struct NetModel {
    backend: Arc<dyn NetBackend>,
    mac: MacAddr,
    counters: Arc<Counters>,
    problems: Arc<LogLimit>,
}

impl Net {
    /// Opens `config`'s TAP and starts the device's thread, which serves
    /// it once the driver starts the device. `index` (the device's
    /// position among the VM's network devices) only varies the fallback
    /// random MAC.
    pub fn open(config: &NetConfig, index: usize) -> Result<Net, super::Error> {
        let tap = Tap::open(&config.tap)?;
        if tap.created() {
            log::info!(
                "tap {}: created (it goes away when vmlab exits)",
                config.tap
            );
        }
        let mac = config.mac.unwrap_or_else(|| MacAddr::random_local(index));
        Net::with_backend(Arc::new(tap), mac)
    }

    /// A device on any backend.
    pub fn with_backend(backend: Arc<dyn NetBackend>, mac: MacAddr) -> Result<Net, super::Error> {
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
        let mut config = vec![0u8; CONFIG_LEN];
        config[..6].copy_from_slice(&mac.0);
        config[6..8].copy_from_slice(&VIRTIO_NET_S_LINK_UP.to_le_bytes());
        config[8..10].copy_from_slice(&1u16.to_le_bytes());
        let model = NetModel {
            backend,
            mac,
            counters: Arc::default(),
            problems: Arc::default(),
        };
        Ok(Device::new(model, features, config, vec![QUEUE_SIZE; 2])?)
    }

    /// Name and counters, for the VMM.
    pub fn handle(&self) -> NetHandle {
        let m = self.model();
        NetHandle {
            name: m.backend.name().to_string(),
            mac: m.mac,
            counters: m.counters.clone(),
        }
    }
}

/// What the backend may hand the guest, from the accepted features.
fn rx_offloads(features: u64) -> Offloads {
    let has = |bit| features & feature(bit) != 0;
    Offloads {
        csum: has(VIRTIO_NET_F_GUEST_CSUM),
        tso4: has(VIRTIO_NET_F_GUEST_TSO4),
        tso6: has(VIRTIO_NET_F_GUEST_TSO6),
        tso_ecn: has(VIRTIO_NET_F_GUEST_ECN),
    }
}

impl DeviceModel for NetModel {
    const NAME: &'static str = "virtio-net";

    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn start(&mut self, a: Activation) -> Result<Box<dyn DeviceWorker>, ActivateError> {
        let Activation {
            mem,
            queues,
            interrupt,
            features,
        } = a;
        let mut queues = queues.into_iter();
        let (Some(rx), Some(tx)) = (queues.next(), queues.next()) else {
            return Err(ActivateError::QueueNotReady { index: TX_QUEUE });
        };
        for (index, q) in [(RX_QUEUE, &rx), (TX_QUEUE, &tx)] {
            if !q.queue.ready() {
                return Err(ActivateError::QueueNotReady { index });
            }
        }
        if let Err(e) = self.backend.set_offloads(rx_offloads(features)) {
            // The guest then gets plain frames only, which is always safe.
            log::warn!("{e}; receive offloads stay off");
        }
        Ok(Box::new(Worker {
            mem,
            rx: VirtQueue::new(rx, MAX_CHAIN),
            tx: VirtQueue::new(tx, MAX_CHAIN),
            interrupt,
            backend: self.backend.clone(),
            counters: self.counters.clone(),
            mergeable: features & feature(VIRTIO_NET_F_MRG_RXBUF) != 0,
            rx_frame: vec![0; MAX_BUFFER_LEN + 1].into_boxed_slice(),
            rx_len: 0,
            rx_chains: Vec::with_capacity(usize::from(QUEUE_SIZE)),
            rx_segments: Vec::with_capacity(usize::from(QUEUE_SIZE)),
            tx_frame: vec![0; MAX_BUFFER_LEN].into_boxed_slice(),
            backend_watched: true,
            backend_interest: true,
            backend_registered: false,
            backend_detached: false,
            broken: false,
            problems: self.problems.clone(),
        }))
    }

    fn stopped(&mut self) {
        // A frame read but not delivered is lost, as on a NIC reset.
        if let Err(e) = self.backend.set_offloads(Offloads::default()) {
            log::debug!("{e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::{
        frame, socket_pair, wait_for, wait_until, MockDriver as Driver, Peer, XorShift,
    };
    use crate::devices::virtio::thread::TestLoop;
    use crate::devices::virtio::{DeviceQueue, Interrupt, VirtioDevice};
    use std::io;
    use std::sync::Mutex;
    use virtio_queue::desc::split::Descriptor;
    use virtio_queue::Queue;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

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

        /// A worker on a socket pair, without a device thread (tests call
        /// process_rx / process_tx, or a [`TestLoop`], themselves).
        fn worker(&self, rx: Queue, tx: Queue, mergeable: bool) -> (Worker, Peer, NetHandle) {
            let (backend, peer) = socket_pair();
            let counters = Arc::new(Counters::default());
            let w = Worker {
                mem: self.mem.clone(),
                rx: VirtQueue::new(
                    DeviceQueue {
                        queue: rx,
                        notify: Arc::new(EventFd::new(EFD_NONBLOCK).unwrap()),
                    },
                    MAX_CHAIN,
                ),
                tx: VirtQueue::new(
                    DeviceQueue {
                        queue: tx,
                        notify: Arc::new(EventFd::new(EFD_NONBLOCK).unwrap()),
                    },
                    MAX_CHAIN,
                ),
                interrupt: Arc::new(Interrupt::new(self.irq.try_clone().unwrap())),
                backend: backend.clone(),
                counters: counters.clone(),
                mergeable,
                rx_frame: vec![0; MAX_BUFFER_LEN + 1].into_boxed_slice(),
                rx_len: 0,
                rx_chains: Vec::with_capacity(usize::from(QUEUE_SIZE)),
                rx_segments: Vec::with_capacity(usize::from(QUEUE_SIZE)),
                tx_frame: vec![0; MAX_BUFFER_LEN].into_boxed_slice(),
                backend_watched: false,
                backend_interest: false,
                backend_registered: false,
                backend_detached: false,
                broken: false,
                problems: Arc::default(),
            };
            let handle = NetHandle {
                name: "test-pair".into(),
                mac: MacAddr([2, 0, 0, 0, 0, 1]),
                counters,
            };
            (w, peer, handle)
        }
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
        let mac = MacAddr([2, 1, 2, 3, 4, 5]);
        let mut net = Net::with_backend(backend, mac).unwrap();
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
            rx_offloads(net.acked_features()),
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
        let rxd = Driver::new(&s.mem, RXQ_ADDR, 16);
        let mut txd = Driver::new(&s.mem, TXQ_ADDR, 16);
        let (mut w, peer, handle) = s.worker(rxd.queue(), txd.queue(), true);

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
        let rxd = Driver::new(&s.mem, RXQ_ADDR, 16);
        let mut txd = Driver::new(&s.mem, TXQ_ADDR, 16);
        let (mut w, peer, handle) = s.worker(rxd.queue(), txd.queue(), true);
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

    /// A chain of more than MAX_CHAIN descriptors is dropped without
    /// being followed; MAX_CHAIN pieces of a frame still go through.
    #[test]
    fn overlong_and_indirect_chains_are_refused() {
        let s = Setup::new();
        let rxd = Driver::new(&s.mem, RXQ_ADDR, 16);
        let mut txd = Driver::new(&s.mem, TXQ_ADDR, 256);
        let (mut w, peer, handle) = s.worker(rxd.queue(), txd.queue(), true);
        let f = frame(MAX_CHAIN * 16, 5);
        s.mem.write_slice(&f, GuestAddress(TX_BUF_ADDR)).unwrap();
        // The header, then 16-byte pieces: MAX_CHAIN descriptors in all.
        let mut pieces = vec![(TX_BUF_ADDR, VNET_HDR_LEN as u32, 0)];
        for i in 0..(MAX_CHAIN - 1) as u64 {
            pieces.push((TX_BUF_ADDR + VNET_HDR_LEN as u64 + 16 * i, 16, 0));
        }
        txd.submit(&pieces);
        w.process_tx();
        assert_eq!(
            peer.recv().unwrap().len(),
            VNET_HDR_LEN + (MAX_CHAIN - 1) * 16
        );
        pieces.push((TX_BUF_ADDR + VNET_HDR_LEN as u64, 16, 0));
        txd.submit(&pieces);
        w.process_tx();
        assert!(peer.recv().is_none(), "the overlong chain was not sent");
        // An indirect table (never offered) holding a valid frame.
        s.mem
            .write_obj(
                Descriptor::new(TX_BUF_ADDR, f.len() as u32, 0, 0),
                GuestAddress(TX_BUF_ADDR + 0x1_0000),
            )
            .unwrap();
        txd.submit(&[(TX_BUF_ADDR + 0x1_0000, 16, 4)]);
        w.process_tx();
        assert!(peer.recv().is_none(), "the indirect chain was not followed");
        assert_eq!(txd.used_idx(), 3, "every chain went back");
        let st = handle.stats();
        assert_eq!((st.tx_frames, st.tx_malformed), (1, 2));
    }

    #[test]
    fn transmit_errors_of_the_backend_are_counted() {
        let s = Setup::new();
        let rxd = Driver::new(&s.mem, RXQ_ADDR, 16);
        let mut txd = Driver::new(&s.mem, TXQ_ADDR, 16);
        let (mut w, peer, handle) = s.worker(rxd.queue(), txd.queue(), true);
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
        let mut rxd = Driver::new(&s.mem, RXQ_ADDR, 16);
        let txd = Driver::new(&s.mem, TXQ_ADDR, 16);
        let (mut w, peer, handle) = s.worker(rxd.queue(), txd.queue(), true);
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
        let mut rxd = Driver::new(&s.mem, RXQ_ADDR, 16);
        let txd = Driver::new(&s.mem, TXQ_ADDR, 16);
        let (mut w, peer, handle) = s.worker(rxd.queue(), txd.queue(), false);
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
        let mut rxd = Driver::new(&s.mem, RXQ_ADDR, 16);
        let txd = Driver::new(&s.mem, TXQ_ADDR, 16);
        let (mut w, peer, handle) = s.worker(rxd.queue(), txd.queue(), true);
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
        let mut event_loop = TestLoop::new();
        let mut rxd = Driver::new(&s.mem, RXQ_ADDR, 256);
        let mut rx_queue = rxd.queue();
        rx_queue.set_event_idx(true);
        let txd = Driver::new(&s.mem, TXQ_ADDR, 16);
        let (mut w, peer, handle) = s.worker(rx_queue, txd.queue(), true);
        let rx_notify = w.rx.notify_fd().clone();
        event_loop.register(&mut w);
        w.backend_watched = true;
        let worker = Mutex::new(w);

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
            event_loop.run_once(&mut *worker.lock().unwrap());
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
        let avail_event = GuestAddress(rxd.used_addr() + 4 + 8 * 256);
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
                event_loop.run_once(&mut *worker.lock().unwrap());
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
    }

    #[test]
    fn corrupt_available_index_stops_the_device() {
        let s = Setup::new();
        let mut rxd = Driver::new(&s.mem, RXQ_ADDR, 16);
        let txd = Driver::new(&s.mem, TXQ_ADDR, 16);
        let (mut w, peer, _) = s.worker(rxd.queue(), txd.queue(), true);
        txd.set_avail_idx(txd.avail.wrapping_add(100));
        w.process_tx();
        assert!(w.broken);
        assert!(w.interrupt.needs_reset());
        w.process_tx();
        w.process_rx();

        let (mut w, _peer2, _) = s.worker(rxd.queue(), txd.queue(), true);
        drop(peer);
        post_rx(&mut rxd, 1, 1536);
        rxd.set_avail_idx(rxd.avail.wrapping_add(200));
        w.rx_len = 100;
        w.process_rx();
        assert!(w.broken);
    }

    #[test]
    fn activation_and_reset_on_the_device_thread() {
        let s = Setup::new();
        let (backend, peer) = socket_pair();
        let mut net = Net::with_backend(backend.clone(), MacAddr([2, 0, 0, 0, 0, 9])).unwrap();
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
        assert!(!net.is_active());

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
        assert!(net.is_active());
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
        assert_eq!(wait_for("a sent frame", || peer.recv()), f);
        // Host → guest.
        post_rx(&mut rxd, 2, 1536);
        notify[0].write(1).unwrap();
        let g = frame(80, 8);
        peer.send(&g).unwrap();
        wait_until("a received frame", || rxd.used_idx() == 1);
        assert_eq!(rxd.used(0).1, g.len() as u32);
        assert_eq!(net.handle().stats().rx_frames, 1);

        net.reset();
        wait_until("the reset", || net.reset_complete());
        assert_eq!(
            backend.offloads.lock().unwrap().last(),
            Some(&Offloads::default())
        );
        // After reset nothing touches the rings.
        peer.send(&g).unwrap();
        notify[0].write(1).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(rxd.used_idx(), 1);
        assert_eq!(net.handle().stats().rx_frames, 1);
    }

    /// Random descriptor tables on both queues and random frames from the
    /// host: nothing panics, nothing loops forever, counters add up.
    #[test]
    fn random_chains_never_panic() {
        let s = Setup::new();
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        let mut rxd = Driver::new(&s.mem, RXQ_ADDR, 16);
        let mut txd = Driver::new(&s.mem, TXQ_ADDR, 16);
        let (mut w, peer, handle) = s.worker(rxd.queue(), txd.queue(), true);
        let addrs = Driver::hostile_addrs(MEM_SIZE, &[RX_BUF_ADDR, TX_BUF_ADDR, RXQ_ADDR]);
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
                        Driver::noise(&mut rng, i, &addrs, &lens)
                    };
                    d.store(i, addr, len, flags, next);
                }
                d.publish_noise(&mut rng);
            }
            for _ in 0..rng.below(3) {
                let len = rng.pick(&[0usize, 5, 14, 100, 1500, 9000, 65_550]);
                let _ = peer.send(&frame(len, round as u8));
            }
            if round % 250 == 249 {
                txd.set_avail_idx(rng.next() as u16);
            }
            w.process_tx();
            w.process_rx();
            while peer.recv().is_some() {}
            if w.broken {
                for d in [&mut rxd, &mut txd] {
                    d.set_avail_idx(0);
                    d.avail = 0;
                }
                w.rx.queue = rxd.queue();
                w.tx.queue = txd.queue();
                w.rx_len = 0;
                w.broken = false;
            }
        }
        let st = handle.stats();
        assert!(st.tx_frames > 0 && st.tx_malformed > 0, "{st}");
        assert!(st.rx_frames > 0 && st.rx_malformed > 0, "{st}");
    }
}
