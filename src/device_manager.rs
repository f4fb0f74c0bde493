//! The device manager: everything it takes to put a virtio device into a
//! VM, in one place.
//!
//! For each device it allocates a 4 KiB MMIO window and an interrupt line
//! (rust-vmm's `vm-allocator`), puts the device's virtio-mmio transport on
//! the MMIO bus, registers the queue-notification eventfds with KVM as
//! ioeventfds (a guest write to QueueNotify never leaves the kernel) and
//! the interrupt eventfd as an irqfd, and records the
//! `virtio_mmio.device=` entry for the kernel command line. It keeps the
//! devices' handles and threads, and stops them at VM exit.
//!
//! The VM builder calls one `attach_*` per configured device; adding a
//! device type is one new device module plus one `attach_*` here.

use std::sync::{Arc, Mutex};

use kvm_ioctls::{IoEventAddress, VmFd};
use vm_allocator::{AddressAllocator, AllocPolicy, IdAllocator};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::layout;
use crate::devices::bus::{self, Bus};
use crate::devices::virtio::block::{BlockBackend, SERIAL_LEN};
use crate::devices::virtio::fs::{Fs, FsConfig, FsHandle};
use crate::devices::virtio::net::NetBackend;
use crate::devices::virtio::{
    self, kernel_cmdline_device, Block, BlockConfig, BlockHandle, DeviceThread, MacAddr,
    MmioTransport, Net, NetConfig, NetHandle, VirtioDevice, MMIO_WINDOW_SIZE, QUEUE_NOTIFY_OFFSET,
};
use crate::vsock::{Vsock, VsockConfig, VsockHandle};

/// How many virtio devices fit: one interrupt line each.
pub const MAX_DEVICES: u32 = layout::IRQ_MAX - layout::IRQ_BASE + 1;

/// What the device manager asks of the hypervisor: interrupt and
/// notification wiring. [`VmFd`] in a VM; a recorder in tests.
pub trait Wiring {
    /// Makes a write to `fd` raise interrupt line `gsi` (KVM_IRQFD).
    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> std::result::Result<(), kvm_ioctls::Error>;
    /// Makes a 4-byte guest write of `datamatch` at MMIO `addr` signal
    /// `fd` instead of exiting to vmlab (KVM_IOEVENTFD).
    fn register_ioevent(
        &self,
        fd: &EventFd,
        addr: u64,
        datamatch: u32,
    ) -> std::result::Result<(), kvm_ioctls::Error>;
}

impl Wiring for VmFd {
    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> std::result::Result<(), kvm_ioctls::Error> {
        VmFd::register_irqfd(self, fd, gsi)
    }

    fn register_ioevent(
        &self,
        fd: &EventFd,
        addr: u64,
        datamatch: u32,
    ) -> std::result::Result<(), kvm_ioctls::Error> {
        VmFd::register_ioevent(self, fd, &IoEventAddress::Mmio(addr), datamatch)
    }
}

/// Errors attaching a device.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The device itself could not be created.
    #[error(transparent)]
    Device(#[from] virtio::Error),
    /// No interrupt line or MMIO window is left.
    #[error(
        "too many devices: vmlab has {MAX_DEVICES} interrupt lines for virtio devices (disks and \
         network interfaces together)"
    )]
    TooManyDevices,
    /// The allocators could not be set up (a bad layout constant).
    #[error("device address allocator: {0}")]
    Allocator(vm_allocator::Error),
    /// The MMIO window overlaps another device.
    #[error("device setup: {0}")]
    Bus(#[from] bus::Error),
    /// A KVM registration failed.
    #[error("{what}: {source}")]
    Kvm {
        /// What was being registered.
        what: &'static str,
        /// Why.
        source: kvm_ioctls::Error,
    },
}

type Result<T> = std::result::Result<T, Error>;

/// Where a device was put.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    /// Start of its MMIO window ([`MMIO_WINDOW_SIZE`] bytes).
    pub base: u64,
    /// Its interrupt line.
    pub gsi: u32,
}

/// The VM's virtio devices.
pub struct DeviceManager {
    mem: GuestMemoryMmap,
    mmio: Bus,
    addresses: AddressAllocator,
    irqs: IdAllocator,
    cmdline: Vec<String>,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    disks: Vec<BlockHandle>,
    nets: Vec<NetHandle>,
    vsocks: Vec<VsockHandle>,
    fs: Vec<FsHandle>,
    threads: Vec<DeviceThread>,
}

impl DeviceManager {
    /// No devices yet; they will use `mem`.
    pub fn new(mem: GuestMemoryMmap) -> Result<DeviceManager> {
        let addresses = AddressAllocator::new(
            layout::VIRTIO_MMIO_START,
            u64::from(MAX_DEVICES) * MMIO_WINDOW_SIZE,
        )
        .map_err(Error::Allocator)?;
        let irqs = IdAllocator::new(layout::IRQ_BASE, layout::IRQ_MAX).map_err(Error::Allocator)?;
        Ok(DeviceManager {
            mem,
            mmio: Bus::new(),
            addresses,
            irqs,
            cmdline: Vec::new(),
            transports: Vec::new(),
            disks: Vec::new(),
            nets: Vec::new(),
            vsocks: Vec::new(),
            fs: Vec::new(),
            threads: Vec::new(),
        })
    }

    /// Opens `config`'s image and attaches a virtio-blk device for it.
    pub fn attach_block(&mut self, vm: &dyn Wiring, config: &BlockConfig) -> Result<&BlockHandle> {
        let block = Block::open(config).map_err(virtio::Error::from)?;
        self.add_block(vm, block)
    }

    /// Attaches a virtio-blk device on any backend.
    pub fn attach_block_backend(
        &mut self,
        vm: &dyn Wiring,
        backend: Arc<dyn BlockBackend>,
        serial: [u8; SERIAL_LEN],
    ) -> Result<&BlockHandle> {
        let block = Block::with_backend(backend, serial).map_err(virtio::Error::from)?;
        self.add_block(vm, block)
    }

    fn add_block(&mut self, vm: &dyn Wiring, block: Block) -> Result<&BlockHandle> {
        let handle = block.handle();
        let thread = block.thread().clone();
        self.attach_virtio(vm, Box::new(block), thread)?;
        self.disks.push(handle);
        Ok(&self.disks[self.disks.len() - 1])
    }

    /// Opens `config`'s TAP and attaches a virtio-net device on it;
    /// `index` is its position among the VM's network devices.
    pub fn attach_net(
        &mut self,
        vm: &dyn Wiring,
        config: &NetConfig,
        index: usize,
    ) -> Result<&NetHandle> {
        let net = Net::open(config, index)?;
        self.add_net(vm, net)
    }

    /// Attaches a virtio-net device on any backend.
    pub fn attach_net_backend(
        &mut self,
        vm: &dyn Wiring,
        backend: Arc<dyn NetBackend>,
        mac: MacAddr,
    ) -> Result<&NetHandle> {
        let net = Net::with_backend(backend, mac)?;
        self.add_net(vm, net)
    }

    fn add_net(&mut self, vm: &dyn Wiring, net: Net) -> Result<&NetHandle> {
        let handle = net.handle();
        let thread = net.thread().clone();
        let slot = self.attach_virtio(vm, Box::new(net), thread)?;
        log::debug!(
            "virtio-net: {} at {:#x} (irq {}), MAC {}",
            handle.name(),
            slot.base,
            slot.gsi,
            handle.mac()
        );
        self.nets.push(handle);
        Ok(&self.nets[self.nets.len() - 1])
    }

    /// Listens on `config`'s Unix socket and attaches a virtio-vsock
    /// device for the guest CID it names.
    pub fn attach_vsock(&mut self, vm: &dyn Wiring, config: &VsockConfig) -> Result<&VsockHandle> {
        let vsock = Vsock::open(config)?;
        let handle = vsock.handle();
        let thread = vsock.thread().clone();
        let slot = self.attach_virtio(vm, Box::new(vsock), thread)?;
        log::debug!(
            "virtio-vsock: guest CID {} at {:#x} (irq {}), host socket {}",
            handle.cid(),
            slot.base,
            slot.gsi,
            handle.path().display()
        );
        self.vsocks.push(handle);
        Ok(&self.vsocks[self.vsocks.len() - 1])
    }

    /// Connects to the vhost-user-fs backend of `config` and attaches a
    /// virtio-fs device for it. Guest memory must be a memfd mapping.
    pub fn attach_fs(&mut self, vm: &dyn Wiring, config: &FsConfig) -> Result<&FsHandle> {
        let fs = Fs::connect(config, &self.mem).map_err(|e| Error::Device(e.into()))?;
        let handle = fs.handle();
        let thread = fs.thread().clone();
        let slot = self.attach_virtio(vm, Box::new(fs), thread)?;
        log::debug!(
            "virtio-fs: tag {:?} at {:#x} (irq {}), backend {}",
            handle.tag(),
            slot.base,
            slot.gsi,
            handle.socket().display()
        );
        self.fs.push(handle);
        Ok(&self.fs[self.fs.len() - 1])
    }

    /// Gives `device` the next MMIO window and interrupt line, wires its
    /// eventfds into KVM, puts it on the bus and on the command line.
    fn attach_virtio(
        &mut self,
        vm: &dyn Wiring,
        device: Box<dyn VirtioDevice>,
        thread: DeviceThread,
    ) -> Result<Slot> {
        let gsi = self.irqs.allocate_id().map_err(|_| Error::TooManyDevices)?;
        let base = self
            .addresses
            .allocate(MMIO_WINDOW_SIZE, MMIO_WINDOW_SIZE, AllocPolicy::FirstMatch)
            .map_err(|_| Error::TooManyDevices)?
            .start();
        let eventfd = |what| move |source| Error::Device(virtio::Error::EventFd { what, source });
        let irq = EventFd::new(EFD_NONBLOCK).map_err(eventfd("irq eventfd"))?;
        vm.register_irqfd(&irq, gsi).map_err(|source| Error::Kvm {
            what: "KVM_IRQFD for a virtio device",
            source,
        })?;
        let transport =
            MmioTransport::new(device, self.mem.clone(), irq).map_err(eventfd("queue eventfd"))?;
        for (fd, queue) in transport.notify_fds().map_err(eventfd("queue eventfd"))? {
            vm.register_ioevent(&fd, base + QUEUE_NOTIFY_OFFSET, queue)
                .map_err(|source| Error::Kvm {
                    what: "KVM_IOEVENTFD for a virtio queue",
                    source,
                })?;
        }
        let transport = Arc::new(Mutex::new(transport));
        self.mmio
            .insert(base, MMIO_WINDOW_SIZE, transport.clone())?;
        self.cmdline
            .push(kernel_cmdline_device(base, MMIO_WINDOW_SIZE, gsi));
        self.transports.push(transport);
        self.threads.push(thread);
        Ok(Slot { base, gsi })
    }

    /// The `virtio_mmio.device=` entries, in attach order.
    pub fn cmdline_entries(&self) -> &[String] {
        &self.cmdline
    }

    /// The MMIO bus with every device's window (the vCPUs get a copy).
    pub fn mmio_bus(&self) -> &Bus {
        &self.mmio
    }

    /// The devices' transports, in attach order.
    pub fn transports(&self) -> &[Arc<Mutex<MmioTransport>>] {
        &self.transports
    }

    /// The disks, in attach order.
    pub fn disks(&self) -> &[BlockHandle] {
        &self.disks
    }

    /// The network devices, in attach order.
    pub fn nets(&self) -> &[NetHandle] {
        &self.nets
    }

    /// The virtio-fs devices, in attach order.
    pub fn fs(&self) -> &[FsHandle] {
        &self.fs
    }

    /// The vsock devices (at most one per VM from the command line).
    pub fn vsocks(&self) -> &[VsockHandle] {
        &self.vsocks
    }

    /// Stops every device thread (each finishes the request it serves),
    /// then makes everything the guest wrote durable: on a guest power-off
    /// and on a host signal alike, the images hold all its writes. Call
    /// once no vCPU runs. Later calls only flush again.
    pub fn stop(&self) {
        for thread in &self.threads {
            if !thread.stop() {
                log::error!("the {} device thread panicked", thread.name());
            }
        }
        for disk in &self.disks {
            if let Err(e) = disk.flush() {
                log::error!("cannot flush disk {}: {e}", disk.path().display());
            }
        }
        for net in &self.nets {
            let stats = net.stats();
            if stats.tx_malformed + stats.rx_malformed > 0 {
                log::warn!("virtio-net {}: {stats}", net.name());
            } else {
                log::debug!("virtio-net {}: {stats}", net.name());
            }
        }
        for vsock in &self.vsocks {
            let stats = vsock.stats();
            if stats.malformed + stats.rx_malformed > 0 {
                log::warn!("virtio-vsock: {stats}");
            } else {
                log::debug!("virtio-vsock: {stats}");
            }
            // Host programs see the VM is gone (connect fails) at once.
            vsock.remove_socket();
        }
    }
}

impl Drop for DeviceManager {
    fn drop(&mut self) {
        for thread in &self.threads {
            thread.stop();
        }
    }
}

/// A [`Wiring`] that records registrations and keeps the eventfds, so a
/// test can play KVM: signal a queue's eventfd as an ioeventfd would, and
/// read the interrupt eventfd.
#[cfg(test)]
#[derive(Default)]
pub(crate) struct RecordingWiring {
    irqfds: Mutex<Vec<(EventFd, u32)>>,
    ioevents: Mutex<Vec<Ioevent>>,
}

/// An ioeventfd registration: fd, MMIO address, datamatch.
#[cfg(test)]
pub(crate) type Ioevent = (EventFd, u64, u32);

#[cfg(test)]
impl RecordingWiring {
    /// The irqfds (fd, gsi) and ioeventfds (fd, address, datamatch) so
    /// far; later registrations start a new list.
    pub(crate) fn take(&self) -> (Vec<(EventFd, u32)>, Vec<Ioevent>) {
        (
            std::mem::take(&mut *self.irqfds.lock().unwrap()),
            std::mem::take(&mut *self.ioevents.lock().unwrap()),
        )
    }
}

#[cfg(test)]
impl Wiring for RecordingWiring {
    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> std::result::Result<(), kvm_ioctls::Error> {
        self.irqfds
            .lock()
            .unwrap()
            .push((fd.try_clone().unwrap(), gsi));
        Ok(())
    }

    fn register_ioevent(
        &self,
        fd: &EventFd,
        addr: u64,
        datamatch: u32,
    ) -> std::result::Result<(), kvm_ioctls::Error> {
        self.ioevents
            .lock()
            .unwrap()
            .push((fd.try_clone().unwrap(), addr, datamatch));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::console::testing::{wait_for, Gate};
    use crate::devices::console::Console;
    use crate::devices::serial::{ConsoleTail, ConsoleWriter, SerialDevice};
    use crate::devices::virtio::block::Disk;
    use crate::devices::virtio::mmio::test_driver::{OnBus, Registers, ALL};
    use crate::devices::virtio::test_utils::{
        frame, socket_pair, wait_until, MockDriver, TempFile,
    };
    use crate::devices::virtio::{mmio, VIRTIO_ID_BLOCK, VIRTIO_ID_NET};
    use crate::devices::BusDevice;
    use std::io;
    use std::path::Path;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Condvar;
    use std::time::{Duration, Instant};
    use vm_memory::{Bytes, GuestAddress};

    const WRITE: u16 = 2;
    /// VIRTIO_BLK_T_FLUSH.
    const FLUSH: u32 = 4;

    /// A disk whose fdatasync blocks until the test lets it go: a host
    /// disk that takes its time.
    struct StuckFlush {
        disk: Disk,
        gate: (Mutex<bool>, Condvar),
        entered: AtomicBool,
        done: AtomicBool,
    }

    impl StuckFlush {
        fn release(&self) {
            *self.gate.0.lock().unwrap() = true;
            self.gate.1.notify_all();
        }
    }

    impl BlockBackend for StuckFlush {
        fn path(&self) -> &Path {
            self.disk.path()
        }
        fn size(&self) -> u64 {
            self.disk.size()
        }
        fn readonly(&self) -> bool {
            false
        }
        fn flush(&self) -> io::Result<()> {
            self.entered.store(true, Ordering::SeqCst);
            let mut open = self.gate.0.lock().unwrap();
            while !*open {
                open = self.gate.1.wait(open).unwrap();
            }
            self.done.store(true, Ordering::SeqCst);
            self.disk.flush()
        }
        fn read_to_guest(
            &self,
            offset: u64,
            mem: &GuestMemoryMmap,
            addr: GuestAddress,
            len: usize,
        ) -> io::Result<()> {
            BlockBackend::read_to_guest(&self.disk, offset, mem, addr, len)
        }
        fn write_from_guest(
            &self,
            offset: u64,
            mem: &GuestMemoryMmap,
            addr: GuestAddress,
            len: usize,
        ) -> io::Result<()> {
            BlockBackend::write_from_guest(&self.disk, offset, mem, addr, len)
        }
        fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
            BlockBackend::discard(&self.disk, offset, len)
        }
        fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
            BlockBackend::write_zeroes(&self.disk, offset, len, unmap)
        }
    }

    /// The acceptance test: a disk stuck in fdatasync stalls
    /// neither the network device of the same VM, nor the console, nor a
    /// vCPU resetting the disk. Everything goes through the MMIO bus as a vCPU's accesses
    /// do, and through the eventfds KVM would signal.
    #[test]
    fn a_stuck_disk_stalls_neither_the_network_nor_a_vcpu() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
        let image = TempFile::with_contents(&[7u8; 64 * 1024]);
        let stuck = Arc::new(StuckFlush {
            disk: Disk::open(image.path(), false).unwrap(),
            gate: (Mutex::new(false), Condvar::new()),
            entered: AtomicBool::new(false),
            done: AtomicBool::new(false),
        });
        let (pair, peer) = socket_pair();
        let wiring = RecordingWiring::default();
        let mut dm = DeviceManager::new(mem.clone()).unwrap();
        dm.attach_block_backend(&wiring, stuck.clone(), [0; SERIAL_LEN])
            .unwrap();
        let (blk_irq, blk_notify) = wiring.take();
        dm.attach_net_backend(&wiring, pair, MacAddr([2, 0, 0, 0, 0, 7]))
            .unwrap();
        let (net_irq, net_notify) = wiring.take();

        // Two windows, two lines, two command-line entries.
        let blk_base = layout::VIRTIO_MMIO_START;
        let net_base = blk_base + MMIO_WINDOW_SIZE;
        assert_eq!(blk_irq[0].1, layout::IRQ_BASE);
        assert_eq!(net_irq[0].1, layout::IRQ_BASE + 1);
        assert_eq!(blk_notify[0].1, blk_base + QUEUE_NOTIFY_OFFSET);
        assert_eq!(
            net_notify.iter().map(|n| (n.1, n.2)).collect::<Vec<_>>(),
            vec![
                (net_base + QUEUE_NOTIFY_OFFSET, 0),
                (net_base + QUEUE_NOTIFY_OFFSET, 1)
            ]
        );
        assert_eq!(
            dm.cmdline_entries(),
            [
                format!("virtio_mmio.device=4K@{blk_base:#x}:5"),
                format!("virtio_mmio.device=4K@{net_base:#x}:6"),
            ]
        );
        let bus = dm.mmio_bus().clone();
        let mut blk = OnBus {
            bus: &bus,
            base: blk_base,
        };
        let mut net = OnBus {
            bus: &bus,
            base: net_base,
        };
        assert_eq!(blk.r32(0x008), VIRTIO_ID_BLOCK);
        assert_eq!(net.r32(0x008), VIRTIO_ID_NET);

        // The disk: a FLUSH request, which gets stuck in fdatasync.
        let mut bq = MockDriver::new(&mem, 0x1_0000, 16);
        blk.negotiate_offered();
        blk.setup_queue_rings(0, 16, bq.desc_table_addr(), bq.avail_addr(), bq.used_addr());
        blk.w32(mmio::STATUS_OFFSET, ALL);
        let mut header = [0u8; 16];
        header[..4].copy_from_slice(&FLUSH.to_le_bytes());
        mem.write_slice(&header, GuestAddress(0x2_0000)).unwrap();
        mem.write_obj(0xffu8, GuestAddress(0x2_1000)).unwrap();
        bq.submit(&[(0x2_0000, 16, 0), (0x2_1000, 1, WRITE)]);
        blk_notify[0].0.write(1).unwrap();
        wait_until("the flush to start", || {
            stuck.entered.load(Ordering::SeqCst)
        });

        // The network device of the same VM still moves frames both ways.
        let mut rxq = MockDriver::new(&mem, 0x3_0000, 16);
        let mut txq = MockDriver::new(&mem, 0x3_8000, 16);
        net.negotiate_offered();
        for (i, q) in [&rxq, &txq].into_iter().enumerate() {
            net.setup_queue_rings(
                i as u32,
                16,
                q.desc_table_addr(),
                q.avail_addr(),
                q.used_addr(),
            );
        }
        net.w32(mmio::STATUS_OFFSET, ALL);
        for i in 0..4 {
            rxq.submit(&[(0x10_0000 + i * 0x1_0000, 0x1_0000, WRITE)]);
        }
        net_notify[0].0.write(1).unwrap();
        let incoming = frame(1000, 3);
        peer.send(&incoming).unwrap();
        wait_until("a received frame", || rxq.used_idx() == 1);
        let mut got = vec![0u8; incoming.len()];
        mem.read_slice(&mut got, GuestAddress(0x10_0000)).unwrap();
        // num_buffers (bytes 10-11) is the device's; the rest is the frame.
        assert_eq!(got[12..], incoming[12..]);
        let outgoing = frame(600, 9);
        mem.write_slice(&outgoing, GuestAddress(0x20_0000)).unwrap();
        txq.submit(&[(0x20_0000, outgoing.len() as u32, 0)]);
        net_notify[1].0.write(1).unwrap();
        wait_until("a sent frame", || txq.used_idx() == 1);
        assert_eq!(peer.recv().unwrap(), outgoing);

        // And the console prints: what a vCPU writes to the UART reaches
        // the host through the console thread.
        let console = Console::new();
        let gate = Gate::default();
        gate.release();
        let printer = gate.start(&console);
        let mut uart = SerialDevice::new(
            EventFd::new(EFD_NONBLOCK).unwrap(),
            Arc::new(EventFd::new(EFD_NONBLOCK).unwrap()),
            ConsoleWriter::new(console.clone(), ConsoleTail::default()),
        );
        for b in b"still printing\n" {
            uart.write(0, &[*b]);
        }
        wait_for("console output", || {
            gate.out.lock().unwrap().as_slice() == b"still printing\n"
        });
        printer.finish(Duration::from_secs(5));
        assert!(
            !stuck.done.load(Ordering::SeqCst),
            "the disk is still stuck"
        );

        // A vCPU resets the stuck disk: the write returns at once, and
        // Status reads non-zero until the device thread is done.
        let start = Instant::now();
        blk.w32(mmio::STATUS_OFFSET, 0);
        let elapsed = start.elapsed();
        assert!(
            elapsed < Duration::from_millis(100),
            "reset took {elapsed:?}"
        );
        assert_ne!(blk.r32(mmio::STATUS_OFFSET), 0);
        std::thread::sleep(Duration::from_millis(20));
        assert_ne!(blk.r32(mmio::STATUS_OFFSET), 0, "still in flight");

        // The disk comes back: the request in flight completes, then the
        // reset does, and the device leaves guest memory alone.
        stuck.release();
        wait_until("the reset", || blk.r32(mmio::STATUS_OFFSET) == 0);
        assert_eq!(bq.used_idx(), 1, "the request in flight was finished");
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x2_1000)).unwrap(), 0);
        bq.submit(&[(0x2_0000, 16, 0), (0x2_1000, 1, WRITE)]);
        blk_notify[0].0.write(1).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(bq.used_idx(), 1, "no queue after the reset");
        assert_eq!(dm.disks()[0].stats().flushes, 1);

        dm.stop();
    }

    #[test]
    fn interrupt_lines_run_out_with_a_clear_error() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let image = TempFile::with_contents(&[0u8; 4096]);
        let wiring = RecordingWiring::default();
        let mut dm = DeviceManager::new(mem).unwrap();
        for _ in 0..MAX_DEVICES {
            let disk = Disk::open(image.path(), true).unwrap();
            dm.attach_block_backend(&wiring, Arc::new(disk), [0; SERIAL_LEN])
                .unwrap();
        }
        let disk = Disk::open(image.path(), true).unwrap();
        let err = dm
            .attach_block_backend(&wiring, Arc::new(disk), [0; SERIAL_LEN])
            .err()
            .unwrap();
        assert!(matches!(err, Error::TooManyDevices), "{err}");
        assert!(err.to_string().contains("19 interrupt lines"), "{err}");
        let (irqs, _) = wiring.take();
        let gsis: Vec<u32> = irqs.iter().map(|i| i.1).collect();
        assert_eq!(
            gsis,
            (layout::IRQ_BASE..=layout::IRQ_MAX).collect::<Vec<_>>()
        );
        dm.stop();
    }
}
