//! Virtio devices on the virtio-mmio transport.
//!
//! The pieces, each in its own file:
//!
//! - [`VirtioDevice`] (here): what a device model (block, net, next vsock
//!   and virtio-fs) provides to a transport: its type, feature bits,
//!   configuration space, and what to do when the driver starts or resets
//!   it. Block ([`block`]) and net ([`net`], on a host TAP:
//!   [`crate::devices::tap`]) implement it.
//! - [`mmio::MmioTransport`]: the virtio-mmio register window (version 2,
//!   "modern", only). It runs on vCPU threads, answers register accesses,
//!   negotiates features and, when the driver sets DRIVER_OK, hands the
//!   configured queues to the device.
//! - [`thread::DeviceThread`]: each device's own thread, with its own
//!   epoll over the device's queue eventfds (KVM signals them on
//!   QueueNotify: ioeventfd), backend fds, and kill/pause eventfds. A vCPU
//!   never performs device I/O, and no device waits for another.
//! - [`queue`]: the queue plumbing every device uses: popping chains with
//!   their checks, returning them, EVENT_IDX-aware notification, per-queue
//!   budgets, corrupt-ring handling, rate-limited problem logging.
//!
//! Interrupts go the other way through [`Interrupt`]: the device sets a bit
//! of the transport's InterruptStatus and signals a KVM irqfd.
//!
//! Locking: the bus holds the transport's mutex while a vCPU accesses it;
//! the transport talks to the device's thread only through a channel and
//! atomics (activation, reset), and device threads never lock the
//! transport (the [`Interrupt`] is lock-free), so no vCPU waits for device
//! work and there is no lock cycle.
//!
//! [`crate::device_manager::DeviceManager`] attaches devices to a VM.

/// Defines a device's counters once: `$counters`, the atomics its worker
/// bumps (shared with the handle the VMM keeps), and `$stats`, a plain
/// snapshot of them with [`$counters::snapshot`].
macro_rules! device_counters {
    (
        $(#[$smeta:meta])*
        pub struct $stats:ident / $counters:ident {
            $( $(#[$fmeta:meta])* $field:ident, )*
        }
    ) => {
        /// The counters, shared by the device's worker and its handle.
        #[derive(Debug, Default)]
        pub(crate) struct $counters {
            $( pub(crate) $field: std::sync::atomic::AtomicU64, )*
        }

        $(#[$smeta])*
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
        pub struct $stats {
            $( $(#[$fmeta])* pub $field: u64, )*
        }

        impl $counters {
            /// The counters now.
            pub(crate) fn snapshot(&self) -> $stats {
                $stats {
                    $( $field: self.$field.load(std::sync::atomic::Ordering::Relaxed), )*
                }
            }
        }
    };
}

pub mod block;
pub mod device;
pub mod fs;
pub mod mmio;
pub mod net;
pub mod queue;
pub mod thread;
pub mod vsock;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

pub use block::{Block, BlockConfig, BlockError, BlockHandle, BlockStats};
pub use mmio::{kernel_cmdline_device, MmioTransport, MMIO_WINDOW_SIZE, QUEUE_NOTIFY_OFFSET};
pub use net::{MacAddr, Net, NetConfig, NetHandle, NetStats};
pub use thread::DeviceThread;
/// Feature bit: the device follows virtio 1.0 or later ("modern"). The
/// only kind of device the version-2 MMIO transport may present.
pub use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
/// Virtio device IDs.
pub use virtio_bindings::virtio_ids::{VIRTIO_ID_BLOCK, VIRTIO_ID_NET, VIRTIO_ID_VSOCK};
/// Feature bit: the used_event / avail_event fields suppress notifications
/// and interrupts (virtio 1.x 2.7.10).
pub use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

/// Device status bits (virtio 1.x 2.1), as in the Status register.
pub mod status {
    use super::*;
    /// The guest found the device.
    pub const ACKNOWLEDGE: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = VIRTIO_CONFIG_S_DRIVER;
    /// The driver is ready: the device may use its queues.
    pub const DRIVER_OK: u32 = VIRTIO_CONFIG_S_DRIVER_OK;
    /// Feature negotiation is complete (set by the driver, kept only if
    /// the device accepts the features).
    pub const FEATURES_OK: u32 = VIRTIO_CONFIG_S_FEATURES_OK;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u32 = VIRTIO_CONFIG_S_NEEDS_RESET;
    /// The driver gave up on the device.
    pub const FAILED: u32 = VIRTIO_CONFIG_S_FAILED;
}

/// InterruptStatus bit: a queue has new used buffers.
pub const INTERRUPT_USED_BUFFER: u32 = VIRTIO_MMIO_INT_VRING;
/// InterruptStatus bit: the configuration space (or the device status)
/// changed.
pub const INTERRUPT_CONFIG_CHANGE: u32 = VIRTIO_MMIO_INT_CONFIG;

/// A feature bit number as a mask.
pub const fn feature(bit: u32) -> u64 {
    1u64 << bit
}

/// The device-to-driver signalling of one device: the InterruptStatus
/// register the transport reads, the DEVICE_NEEDS_RESET status bit, and
/// the irqfd that makes KVM raise the device's interrupt line.
///
/// Shared (`Arc`) between the transport on vCPU threads and the device's
/// worker on its own thread; everything is atomic so neither side ever
/// waits for the other to raise an interrupt.
#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    needs_reset: AtomicBool,
    irq: EventFd,
}

impl Interrupt {
    /// An interrupt raised through `irq` (an eventfd registered with KVM
    /// as an irqfd for the device's GSI).
    pub fn new(irq: EventFd) -> Self {
        Interrupt {
            status: AtomicU32::new(0),
            needs_reset: AtomicBool::new(false),
            irq,
        }
    }

    /// Tells the driver that a queue has used buffers.
    pub fn signal_used_buffer(&self) {
        self.raise(INTERRUPT_USED_BUFFER);
    }

    /// Tells the driver that the configuration space changed.
    pub fn signal_config_change(&self) {
        self.raise(INTERRUPT_CONFIG_CHANGE);
    }

    /// Marks the device as broken (DEVICE_NEEDS_RESET in the status
    /// register) and tells the driver through a configuration-change
    /// interrupt, as virtio 1.x 2.1.2 asks.
    pub fn signal_needs_reset(&self) {
        self.needs_reset.store(true, Ordering::Release);
        self.raise(INTERRUPT_CONFIG_CHANGE);
    }

    fn raise(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::AcqRel);
        // The status bit is set first so that the guest, however quickly
        // its handler runs, finds it. An eventfd write fails only when its
        // counter would overflow, i.e. when the interrupt is already
        // pending: nothing is lost then.
        if let Err(e) = self.irq.write(1) {
            log::debug!("virtio: cannot signal the irqfd: {e}");
        }
    }

    /// The InterruptStatus register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::Acquire)
    }

    /// InterruptACK: the driver handled these bits.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::AcqRel);
    }

    /// Whether the device asked for a reset.
    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::Acquire)
    }

    /// The irqfd.
    pub fn irq_fd(&self) -> &EventFd {
        &self.irq
    }

    /// Forgets pending bits (device reset).
    pub(crate) fn reset(&self) {
        self.status.store(0, Ordering::Release);
        self.needs_reset.store(false, Ordering::Release);
    }
}

/// One queue as the driver configured it, handed to the device when the
/// driver sets DRIVER_OK.
#[derive(Debug)]
pub struct DeviceQueue {
    /// The split virtqueue, validated against guest memory when ready;
    /// `queue.ready()` is false for a queue the driver did not enable.
    pub queue: Queue,
    /// The eventfd signalled when the driver notifies this queue (KVM
    /// ioeventfd on QueueNotify, or the transport itself).
    pub notify: Arc<EventFd>,
}

/// Why a device could not start. The transport then sets
/// DEVICE_NEEDS_RESET instead of running a half-configured device.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The device needs this queue and the driver did not enable it.
    #[error("queue {index} is not enabled by the driver")]
    QueueNotReady {
        /// Queue index.
        index: usize,
    },
    /// The queue size is not a power of two no larger than QueueNumMax.
    #[error("queue {index}: invalid size {size}")]
    QueueSize {
        /// Queue index.
        index: usize,
        /// What the driver wrote to QueueNum.
        size: u32,
    },
    /// A ring address is misaligned (or the queue is otherwise invalid).
    #[error("queue {index}: {source}")]
    QueueConfig {
        /// Queue index.
        index: usize,
        /// virtio-queue's verdict.
        source: virtio_queue::Error,
    },
    /// A ring does not lie in guest RAM.
    #[error("queue {index}: a ring is outside guest memory")]
    QueueOutsideMemory {
        /// Queue index.
        index: usize,
    },
    /// The device's thread is gone.
    #[error(transparent)]
    Thread(#[from] thread::Error),
}

/// What a device model provides to a virtio transport.
///
/// All calls come from the transport, under its lock, on a vCPU thread:
/// they must be quick and never wait for device work. Request processing
/// belongs on the device's thread ([`thread::DeviceThread`]), to which
/// `activate` hands the queues.
pub trait VirtioDevice: Send {
    /// Virtio device ID (e.g. [`VIRTIO_ID_BLOCK`]).
    fn device_type(&self) -> u32;

    /// The maximum size of each of the device's queues; the slice's length
    /// is the number of queues. Sizes are powers of two.
    fn queue_max_sizes(&self) -> &[u16];

    /// The feature bits the device offers. Must include
    /// [`VIRTIO_F_VERSION_1`].
    fn features(&self) -> u64;

    /// The features the driver accepted (a subset of
    /// [`features`](Self::features)), told just before
    /// [`activate`](Self::activate). Devices whose behaviour depends on
    /// them (virtio-net: receive offloads, mergeable buffers) keep them;
    /// the default ignores them.
    fn ack_features(&mut self, _features: u64) {}

    /// Reads the device-specific configuration space at `offset`. Bytes
    /// past its end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Writes the device-specific configuration space. Read-only fields
    /// ignore writes.
    fn write_config(&mut self, offset: u64, data: &[u8]);

    /// Starts the device: the driver set DRIVER_OK with these queues (one
    /// per entry of [`queue_max_sizes`](Self::queue_max_sizes), event-idx
    /// already set as negotiated). `interrupt` is how the device raises
    /// its interrupt.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<DeviceQueue>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), ActivateError>;

    /// Starts a reset (the driver wrote 0 to Status): the device's thread
    /// finishes or abandons the request it serves and forgets the queues.
    /// Returns at once, without waiting for that.
    fn reset(&mut self);

    /// Whether the last reset is complete: the device no longer touches
    /// guest memory, and the driver, which reads Status until it is 0,
    /// may reuse the rings. Until then the transport reads Status as
    /// non-zero.
    fn reset_complete(&self) -> bool {
        true
    }
}

/// Serves a configuration-space read from `config`: bytes past its end
/// (or an offset beyond it) read as zero.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if let Some(src) = config.get(start..) {
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }
}

/// Errors creating a device.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The disk image could not be used.
    #[error(transparent)]
    Block(#[from] BlockError),
    /// The TAP device could not be used.
    #[error(transparent)]
    Tap(#[from] crate::devices::tap::TapError),
    /// The vsock socket could not be set up.
    #[error(transparent)]
    Vsock(#[from] vsock::SocketError),
    /// The device's thread could not be started.
    #[error(transparent)]
    Thread(#[from] thread::Error),
    /// The virtio-fs backend could not be used.
    #[error(transparent)]
    VhostUser(#[from] fs::VhostUserError),
    /// An eventfd could not be created or duplicated.
    #[error("virtio device {what}: {source}")]
    EventFd {
        /// Which one.
        what: &'static str,
        /// Why.
        source: std::io::Error,
    },
}

#[cfg(test)]
pub(crate) mod test_utils {
    //! Helpers shared by the virtio tests.

    use std::io;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    use crate::devices::tap::{Offloads, TapError};
    use crate::devices::virtio::net::{NetBackend, MAX_BUFFER_LEN};

    use virtio_queue::desc::split::Descriptor;
    use virtio_queue::{Queue, QueueT};
    use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

    /// VIRTQ_DESC_F_NEXT.
    const NEXT: u16 = 1;

    /// The driver side of one split virtqueue of `size` entries at
    /// `addr`: the descriptor table, the available ring and the used ring
    /// laid out back to back as virtio 1.x 2.7 sizes them (16, 6 + 2 *
    /// size and 6 + 8 * size bytes), plus helpers to submit descriptor
    /// chains and read the used ring.
    ///
    /// This is vmlab's own rather than virtio-queue's `MockSplitQueue`:
    /// that one (0.18) places the used ring `size` bytes after the start
    /// of the available ring instead of `2 * size + 2`, so the two rings
    /// overlap. Available entries `size / 2` and `size / 2 + 1` land on
    /// the used ring's flags and index, later ones on used entries, and
    /// `used_event` on a used entry: a test that posts more than half a
    /// ring ahead reads garbage back, and event-idx is exercised against
    /// values the device itself overwrote.
    pub struct MockDriver<'a> {
        mem: &'a GuestMemoryMmap,
        desc_table: GuestAddress,
        avail_ring: GuestAddress,
        used_ring: GuestAddress,
        pub size: u16,
        pub next_desc: u16,
        pub avail: u16,
    }

    impl<'a> MockDriver<'a> {
        pub fn new(mem: &'a GuestMemoryMmap, addr: u64, size: u16) -> Self {
            assert!(size.is_power_of_two(), "queue size {size}");
            let n = u64::from(size);
            let desc_table = GuestAddress(addr);
            // Alignments: descriptor table 16, available ring 2, used 4.
            let avail_ring = GuestAddress(addr + 16 * n);
            let used_ring = GuestAddress((avail_ring.0 + 6 + 2 * n + 3) & !3);
            let d = MockDriver {
                mem,
                desc_table,
                avail_ring,
                used_ring,
                size,
                next_desc: 0,
                avail: 0,
            };
            // Both rings start zeroed: flags, index, entries, event.
            let zeros = vec![0u8; (used_ring.0 + 6 + 8 * n - addr) as usize];
            mem.write_slice(&zeros, desc_table).unwrap();
            d
        }

        /// The device's view: a ready queue on these rings.
        pub fn queue(&self) -> Queue {
            let mut q = Queue::new(self.size).unwrap();
            q.set_size(self.size);
            q.set_desc_table_address(
                Some(self.desc_table.0 as u32),
                Some((self.desc_table.0 >> 32) as u32),
            );
            q.set_avail_ring_address(
                Some(self.avail_ring.0 as u32),
                Some((self.avail_ring.0 >> 32) as u32),
            );
            q.set_used_ring_address(
                Some(self.used_ring.0 as u32),
                Some((self.used_ring.0 >> 32) as u32),
            );
            q.set_ready(true);
            assert!(q.is_valid(self.mem), "the mock rings are a valid queue");
            q
        }

        /// Guest addresses of the descriptor table and the two rings.
        pub fn desc_table_addr(&self) -> u64 {
            self.desc_table.0
        }

        pub fn avail_addr(&self) -> u64 {
            self.avail_ring.0
        }

        pub fn used_addr(&self) -> u64 {
            self.used_ring.0
        }

        /// Writes the available index (a driver may write anything).
        pub fn set_avail_idx(&self, idx: u16) {
            self.mem
                .write_obj(idx, self.avail_ring.unchecked_add(2))
                .unwrap();
        }

        pub fn store(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
            assert!(index < self.size);
            self.mem
                .write_obj(
                    Descriptor::new(addr, len, flags, next),
                    self.desc_table.unchecked_add(16 * u64::from(index)),
                )
                .unwrap();
        }

        pub fn publish(&mut self, head: u16) {
            let slot = u64::from(self.avail % self.size);
            self.mem
                .write_obj(head, self.avail_ring.unchecked_add(4 + 2 * slot))
                .unwrap();
            self.avail = self.avail.wrapping_add(1);
            self.set_avail_idx(self.avail);
        }

        /// Submits a chain of (addr, len, flags) linked in order; NEXT is
        /// added to all but the last. Returns the head index.
        pub fn submit(&mut self, descs: &[(u64, u32, u16)]) -> u16 {
            let head = self.next_desc;
            for (i, &(addr, len, flags)) in descs.iter().enumerate() {
                let index = (head + i as u16) % self.size;
                let last = i + 1 == descs.len();
                let flags = if last { flags } else { flags | NEXT };
                self.store(index, addr, len, flags, (index + 1) % self.size);
            }
            self.next_desc = (head + descs.len() as u16) % self.size;
            self.publish(head);
            head
        }

        /// Where garbage descriptors point: the device's own buffers and
        /// rings (`known`), the last byte of `mem_size` bytes of memory,
        /// the first byte past it, and addresses whose end overflows.
        pub fn hostile_addrs(mem_size: u64, known: &[u64]) -> Vec<u64> {
            let mut addrs = known.to_vec();
            addrs.extend([mem_size - 1, mem_size, u64::MAX, u64::MAX - 15]);
            addrs
        }

        /// A garbage descriptor `index` for fuzz tests: an address from
        /// `addrs`, a length from `lens`, any flags, a next index that may
        /// loop or point past the table.
        pub fn noise(rng: &mut XorShift, index: u16, addrs: &[u64], lens: &[u32]) -> RandomDesc {
            (
                rng.pick(addrs),
                rng.pick(lens),
                rng.below(8) as u16,
                rng.pick(&[0, 1, index + 1, 15, 16, u16::MAX]),
            )
        }

        /// Publishes up to three heads, some of them past the table.
        pub fn publish_noise(&mut self, rng: &mut XorShift) {
            for _ in 0..rng.below(4) {
                self.publish(rng.pick(&[0, 0, 3, 3, 1, 5, 15, 16, u16::MAX]));
            }
        }

        pub fn used_idx(&self) -> u16 {
            self.mem.read_obj(self.used_ring.unchecked_add(2)).unwrap()
        }

        /// (id, len) of used entry `i`.
        pub fn used(&self, i: u16) -> (u32, u32) {
            let slot = u64::from(i % self.size);
            let e = self.used_ring.unchecked_add(4 + 8 * slot);
            (
                self.mem.read_obj(e).unwrap(),
                self.mem.read_obj(e.unchecked_add(4)).unwrap(),
            )
        }
    }

    /// A descriptor as (address, length, flags, next).
    pub type RandomDesc = (u64, u32, u16, u16);

    /// A file in the temporary directory, removed on drop.
    pub struct TempFile {
        path: PathBuf,
    }

    impl TempFile {
        /// A new file with `contents`.
        pub fn with_contents(contents: &[u8]) -> TempFile {
            static COUNTER: AtomicUsize = AtomicUsize::new(0);
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let path = std::env::temp_dir()
                .join(format!("vmlab-virtio-test-{}-{n}.img", std::process::id()));
            std::fs::write(&path, contents).unwrap();
            TempFile { path }
        }

        /// Its path.
        pub fn path(&self) -> &Path {
            &self.path
        }

        /// Its contents now.
        pub fn contents(&self) -> Vec<u8> {
            std::fs::read(&self.path).unwrap()
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    /// One end of a SOCK_SEQPACKET socket pair: keeps frame boundaries
    /// like a TAP, needs no privileges.
    pub struct PairBackend {
        fd: OwnedFd,
        pub offloads: Mutex<Vec<Offloads>>,
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
    pub struct Peer {
        fd: OwnedFd,
    }

    impl Peer {
        pub fn send(&self, frame: &[u8]) -> io::Result<usize> {
            crate::devices::tap::write_fd(self.fd.as_raw_fd(), frame)
        }
        pub fn recv(&self) -> Option<Vec<u8>> {
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

    pub fn socket_pair() -> (Arc<PairBackend>, Peer) {
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

    /// Polls `f` until it returns something; fails the test after 10 s
    /// (a device thread that never gets there).
    pub fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            if let Some(v) = f() {
                return v;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// Polls `cond` until it holds (at most 10 s).
    pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
        wait_for(what, || cond().then_some(()))
    }

    /// A frame with a zero virtio-net header: `len` bytes after it, byte
    /// i = seed + i.
    pub fn frame(len: usize, seed: u8) -> Vec<u8> {
        let mut f = vec![0u8; crate::devices::tap::VNET_HDR_LEN + len];
        for (i, b) in f[crate::devices::tap::VNET_HDR_LEN..]
            .iter_mut()
            .enumerate()
        {
            *b = seed.wrapping_add(i as u8);
        }
        f
    }

    /// A small deterministic PRNG for fuzz-style tests.
    pub struct XorShift(pub u64);

    impl XorShift {
        /// The next number.
        pub fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }

        /// A number below `n` (n > 0).
        pub fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }

        /// One of `items`.
        pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
            items[self.below(items.len() as u64) as usize]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[test]
    fn interrupt_sets_status_and_signals() {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let int = Interrupt::new(irq.try_clone().unwrap());
        int.signal_used_buffer();
        assert_eq!(int.status(), INTERRUPT_USED_BUFFER);
        assert_eq!(irq.read().unwrap(), 1);
        int.signal_config_change();
        assert_eq!(
            int.status(),
            INTERRUPT_USED_BUFFER | INTERRUPT_CONFIG_CHANGE
        );
        int.ack(INTERRUPT_USED_BUFFER);
        assert_eq!(int.status(), INTERRUPT_CONFIG_CHANGE);
        assert!(!int.needs_reset());
        int.signal_needs_reset();
        assert!(int.needs_reset());
        int.reset();
        assert_eq!(int.status(), 0);
        assert!(!int.needs_reset());
    }
}
