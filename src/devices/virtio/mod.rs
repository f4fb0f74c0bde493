//! Virtio devices on the virtio-mmio transport.
//!
//! Three pieces, each in its own file:
//!
//! - [`VirtioDevice`] (here): what a device model (block, later net or
//!   vsock) provides to a transport: its type, feature bits, configuration
//!   space, and what to do when the driver starts or resets it. Block
//!   ([`block`]) and net ([`net`], on a host TAP: [`crate::devices::tap`])
//!   implement it.
//! - [`mmio::MmioTransport`]: the virtio-mmio register window (version 2,
//!   "modern", only). It runs on vCPU threads, answers register accesses,
//!   negotiates features and, when the driver sets DRIVER_OK, hands the
//!   configured queues to the device.
//! - [`event_loop::EventLoop`]: the "virtio" thread. A device registers its
//!   queue-notification eventfds there when it is activated; KVM signals
//!   them (ioeventfd) when the guest writes QueueNotify, so a vCPU never
//!   performs device I/O itself.
//!
//! Interrupts go the other way through [`Interrupt`]: the device sets a bit
//! of the transport's InterruptStatus and signals a KVM irqfd.
//!
//! Locking: the bus holds the transport's mutex while a vCPU accesses it;
//! the transport may then lock a device's worker (to stop it on reset) and
//! the event loop's handler table. The event loop never holds its table
//! lock while it runs a handler, and workers never lock the transport
//! (the [`Interrupt`] is lock-free), so there is no lock cycle.
//!
//! [`create_block_device`] and [`create_net_device`] are the integration
//! points the VM builder calls.

pub mod block;
pub mod event_loop;
pub mod mmio;
pub mod net;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

pub use block::{Block, BlockConfig, BlockError, BlockHandle, BlockStats};
pub use event_loop::{EventHandler, EventLoop, EventLoopHandle, EventLoopThread};
pub use mmio::{kernel_cmdline_device, MmioTransport, QUEUE_NOTIFY_OFFSET};
pub use net::{MacAddr, Net, NetConfig, NetHandle, NetStats};

/// Feature bit: the device follows virtio 1.0 or later ("modern"). The
/// only kind of device the version-2 MMIO transport may present.
pub const VIRTIO_F_VERSION_1: u32 = 32;
/// Feature bit: the used_event / avail_event fields suppress notifications
/// and interrupts (virtio 1.x 2.7.10).
pub const VIRTIO_RING_F_EVENT_IDX: u32 = 29;

/// Virtio device ID of a network device.
pub const VIRTIO_ID_NET: u32 = 1;
/// Virtio device ID of a block device.
pub const VIRTIO_ID_BLOCK: u32 = 2;

/// Device status bits (virtio 1.x 2.1), as in the Status register.
pub mod status {
    /// The guest found the device.
    pub const ACKNOWLEDGE: u32 = 0x01;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = 0x02;
    /// The driver is ready: the device may use its queues.
    pub const DRIVER_OK: u32 = 0x04;
    /// Feature negotiation is complete (set by the driver, kept only if
    /// the device accepts the features).
    pub const FEATURES_OK: u32 = 0x08;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    /// The driver gave up on the device.
    pub const FAILED: u32 = 0x80;
}

/// InterruptStatus bit: a queue has new used buffers.
pub const INTERRUPT_USED_BUFFER: u32 = 0x1;
/// InterruptStatus bit: the configuration space (or the device status)
/// changed.
pub const INTERRUPT_CONFIG_CHANGE: u32 = 0x2;

/// A feature bit number as a mask.
pub const fn feature(bit: u32) -> u64 {
    1u64 << bit
}

/// The device-to-driver signalling of one device: the InterruptStatus
/// register the transport reads, the DEVICE_NEEDS_RESET status bit, and
/// the irqfd that makes KVM raise the device's interrupt line.
///
/// Shared (`Arc`) between the transport on vCPU threads and the device's
/// worker on the event loop; everything is atomic so neither side ever
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
    fn reset(&self) {
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
    /// Registering with the event loop failed.
    #[error("cannot register with the event loop: {0}")]
    EventLoop(#[from] event_loop::Error),
}

/// What a device model provides to a virtio transport.
///
/// All calls come from the transport, under its lock, on a vCPU thread:
/// they must be quick. Request processing belongs on the event loop,
/// which `activate` sets up.
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

    /// Stops the device and forgets its queues (the driver wrote 0 to
    /// Status). When this returns, the device no longer touches guest
    /// memory: the driver may free the rings.
    fn reset(&mut self);
}

/// A virtio-mmio device ready to be attached to a VM. See
/// [`create_block_device`] for how the VM builder wires it.
pub struct MmioDeviceSetup {
    /// The transport, to insert on the MMIO bus with a
    /// [`mmio::MMIO_WINDOW_SIZE`] window.
    pub transport: Arc<std::sync::Mutex<MmioTransport>>,
    /// One eventfd per queue with the queue index: register each with
    /// KVM as an ioeventfd at `base + QUEUE_NOTIFY_OFFSET` with the index
    /// as a `u32` datamatch (4-byte writes of that value).
    pub notify_fds: Vec<(EventFd, u32)>,
    /// The device's interrupt eventfd: register it with KVM as an irqfd
    /// for the device's GSI.
    pub irq_fd: EventFd,
}

/// A virtio-blk device on virtio-mmio, and the handle the VMM keeps to
/// flush its image at shutdown.
pub struct BlockDeviceSetup {
    /// The transport and its file descriptors.
    pub device: MmioDeviceSetup,
    /// Flush and statistics.
    pub disk: BlockHandle,
}

/// A virtio-net device on virtio-mmio, and the handle the VMM keeps for
/// its statistics.
pub struct NetDeviceSetup {
    /// The transport and its file descriptors.
    pub device: MmioDeviceSetup,
    /// Name, MAC and counters.
    pub net: NetHandle,
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
    /// An eventfd could not be created or duplicated.
    #[error("virtio device {what}: {source}")]
    EventFd {
        /// Which one.
        what: &'static str,
        /// Why.
        source: std::io::Error,
    },
}

/// Opens the disk image of `config` and puts a virtio-blk device on a
/// virtio-mmio transport: the device serves requests on `event_loop` and
/// raises its interrupt through `irq` (returned as `irq_fd`, a duplicate,
/// for KVM registration).
///
/// The VM builder then, for a device at `base` with interrupt `gsi`:
///
/// 1. `vm_fd.register_irqfd(&setup.device.irq_fd, gsi)`;
/// 2. for each `(fd, index)` in `setup.device.notify_fds`:
///    `vm_fd.register_ioevent(&fd, &IoEventAddress::Mmio(base + QUEUE_NOTIFY_OFFSET), index)`
///    (`index` is a `u32`, so KVM matches 4-byte writes of that value);
/// 3. `mmio_bus.insert(base, mmio::MMIO_WINDOW_SIZE, setup.device.transport.clone())`;
/// 4. adds [`kernel_cmdline_device`]`(base, MMIO_WINDOW_SIZE, gsi)` to the
///    kernel command line;
/// 5. starts the event loop thread ([`EventLoop::start`]) before the vCPUs,
///    and at shutdown stops it after the vCPUs, then calls
///    `setup.disk.flush()`.
pub fn create_block_device(
    config: &BlockConfig,
    mem: GuestMemoryMmap,
    event_loop: &EventLoopHandle,
    irq: EventFd,
) -> Result<BlockDeviceSetup, Error> {
    let block = Block::open(config, event_loop.clone())?;
    let disk = block.handle();
    let device = mmio_setup(Box::new(block), mem, irq)?;
    Ok(BlockDeviceSetup { device, disk })
}

/// Opens the TAP of `config` and puts a virtio-net device on a
/// virtio-mmio transport, wired like [`create_block_device`]. `index` is
/// the device's position among the VM's network devices (it varies the
/// default MAC).
pub fn create_net_device(
    config: &NetConfig,
    index: usize,
    mem: GuestMemoryMmap,
    event_loop: &EventLoopHandle,
    irq: EventFd,
) -> Result<NetDeviceSetup, Error> {
    let net = Net::open(config, index, event_loop.clone())?;
    let handle = net.handle();
    let device = mmio_setup(Box::new(net), mem, irq)?;
    Ok(NetDeviceSetup {
        device,
        net: handle,
    })
}

/// The transport for `device` and the fds the VM builder registers with
/// KVM.
fn mmio_setup(
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    irq: EventFd,
) -> Result<MmioDeviceSetup, Error> {
    let irq_fd = irq.try_clone().map_err(|source| Error::EventFd {
        what: "irq eventfd",
        source,
    })?;
    let transport = MmioTransport::new(device, mem, irq).map_err(|source| Error::EventFd {
        what: "queue eventfd",
        source,
    })?;
    let notify_fds = transport.notify_fds().map_err(|source| Error::EventFd {
        what: "queue eventfd",
        source,
    })?;
    Ok(MmioDeviceSetup {
        transport: Arc::new(std::sync::Mutex::new(transport)),
        notify_fds,
        irq_fd,
    })
}

#[cfg(test)]
pub(crate) mod test_utils {
    //! Helpers shared by the virtio tests.

    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicUsize, Ordering};

    use virtio_queue::desc::split::Descriptor;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::Queue;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    /// VIRTQ_DESC_F_NEXT.
    const NEXT: u16 = 1;

    /// The driver side of one queue: a mock split queue plus helpers to
    /// submit descriptor chains and read the used ring.
    pub struct MockDriver<'a> {
        pub vq: MockSplitQueue<'a, GuestMemoryMmap>,
        pub size: u16,
        pub next_desc: u16,
        pub avail: u16,
    }

    impl<'a> MockDriver<'a> {
        pub fn new(mem: &'a GuestMemoryMmap, addr: u64, size: u16) -> Self {
            MockDriver {
                vq: MockSplitQueue::create(mem, GuestAddress(addr), size),
                size,
                next_desc: 0,
                avail: 0,
            }
        }

        pub fn queue(&self) -> Queue {
            self.vq.create_queue().unwrap()
        }

        pub fn store(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
            self.vq
                .desc_table()
                .store(
                    index,
                    RawDescriptor::from(Descriptor::new(addr, len, flags, next)),
                )
                .unwrap();
        }

        pub fn publish(&mut self, head: u16) {
            self.vq
                .avail()
                .ring()
                .ref_at(usize::from(self.avail % self.size))
                .unwrap()
                .store(head);
            self.avail = self.avail.wrapping_add(1);
            self.vq.avail().idx().store(self.avail);
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

        pub fn used_idx(&self) -> u16 {
            self.vq.used().idx().load()
        }

        /// (id, len) of used entry `i`.
        pub fn used(&self, i: u16) -> (u32, u32) {
            let e = self
                .vq
                .used()
                .ring()
                .ref_at(usize::from(i % self.size))
                .unwrap()
                .load();
            (e.id(), e.len())
        }
    }

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
