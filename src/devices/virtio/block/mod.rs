//! virtio-blk backed by a raw disk image (a regular file or a host block
//! device), one request queue, served on the device's own thread.
//!
//! Split by concern, as Firecracker splits its block device:
//!
//! - here: the device state, its configuration space and the
//!   [`VirtioDevice`] implementation (activation hands the queue to the
//!   device thread; a reset is a message to it);
//! - [`request`]: parsing a chain into a typed request (pure, no I/O);
//! - [`io`]: the image (open, flock, pread/pwrite/fdatasync) behind the
//!   [`BlockBackend`] trait;
//! - [`worker`]: the thread's event handling, serving the queue;
//! - [`metrics`]: the counters.
//!
//! The guest can only hurt its own disk, never the host or the VMM.

pub mod io;
pub mod metrics;
mod request;
mod worker;

use std::io as stdio;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::QueueT;

pub use io::{BlockBackend, Disk};
pub use metrics::BlockStats;

use super::device::{Activation, Device, DeviceModel};
use super::queue::{LogLimit, VirtQueue};
use super::thread::DeviceWorker;
use super::{feature, ActivateError};
use metrics::Counters;
use worker::{Backend, Worker};

/// Bytes per sector: the unit of capacity and of request offsets.
pub const SECTOR_SIZE: u64 = 512;
pub(crate) const SECTOR_SHIFT: u32 = 9;
/// Entries of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Data descriptors per request (VIRTIO_BLK_F_SEG_MAX). Linux splits its
/// requests to fit; a chain with more (plus header and status) is refused
/// without being followed. No indirect descriptors are offered.
pub const SEG_MAX: u32 = 128;
/// Descriptors per chain: header, SEG_MAX data descriptors, status.
const MAX_CHAIN: usize = SEG_MAX as usize + 2;
/// Length of the GET_ID serial.
pub const SERIAL_LEN: usize = 20;
/// Largest DISCARD / WRITE_ZEROES range: 1 GiB.
pub(crate) const MAX_DISCARD_SECTORS: u32 = (1 << 30) >> SECTOR_SHIFT;
pub(crate) const MAX_WRITE_ZEROES_SECTORS: u32 = MAX_DISCARD_SECTORS;
/// Ranges per DISCARD / WRITE_ZEROES request.
pub(crate) const MAX_DISCARD_SEG: u32 = 16;
pub(crate) const MAX_WRITE_ZEROES_SEG: u32 = 16;
/// Discard granularity hint: 4 KiB, the usual filesystem block.
const DISCARD_SECTOR_ALIGNMENT: u32 = 8;

/// `struct virtio_blk_discard_write_zeroes`: sector, num_sectors, flags.
pub(crate) const SEGMENT_LEN: usize = 16;

/// Length of the configuration space served (through
/// `write_zeroes_may_unmap` and its padding).
const CONFIG_LEN: usize = 60;

/// A disk as the user describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockConfig {
    /// Raw image file or host block device.
    pub path: PathBuf,
    /// The guest may not write (VIRTIO_BLK_F_RO; the image is opened
    /// read-only and shared-locked).
    pub readonly: bool,
    /// Serial number for GET_ID (`/sys/block/vdX/serial`), at most 20
    /// bytes.
    pub id: Option<String>,
}

/// Why a disk image cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// No such file.
    #[error("disk image {path}: no such file")]
    NotFound {
        /// The image.
        path: PathBuf,
    },
    /// A directory.
    #[error("disk image {path} is a directory, not a disk image")]
    IsDirectory {
        /// The image.
        path: PathBuf,
    },
    /// A FIFO, socket or character device.
    #[error("disk image {path} is neither a regular file nor a block device")]
    NotADisk {
        /// The image.
        path: PathBuf,
    },
    /// Opening for reading and writing failed for lack of permission.
    #[error(
        "disk image {path} is not writable ({source}); make it writable or attach it read-only"
    )]
    NotWritable {
        /// The image.
        path: PathBuf,
        /// The open error.
        source: stdio::Error,
    },
    /// Any other open or stat failure.
    #[error("cannot open disk image {path}: {source}")]
    Open {
        /// The image.
        path: PathBuf,
        /// Why.
        source: stdio::Error,
    },
    /// Size 0.
    #[error("disk image {path} is empty")]
    Empty {
        /// The image.
        path: PathBuf,
    },
    /// Not a whole number of 512-byte sectors.
    #[error("disk image {path} is {size} bytes, not a multiple of 512-byte sectors")]
    NotSectorMultiple {
        /// The image.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// Another process holds a conflicting lock.
    #[error(
        "disk image {path} is in use by another VM or process (it holds a {} lock)",
        if *.readonly { "write" } else { "read or write" }
    )]
    Locked {
        /// The image.
        path: PathBuf,
        /// Whether a read-only attach was attempted.
        readonly: bool,
    },
    /// flock failed for another reason.
    #[error("cannot lock disk image {path}: {source}")]
    Lock {
        /// The image.
        path: PathBuf,
        /// Why.
        source: stdio::Error,
    },
    /// The device's thread could not be started.
    #[error(transparent)]
    Thread(#[from] super::thread::Error),
    /// The serial does not fit GET_ID.
    #[error("disk serial {id:?} is {} bytes; virtio-blk serials have at most 20", .id.len())]
    SerialTooLong {
        /// The serial.
        id: String,
    },
}

/// What the VMM keeps of a disk: flush at shutdown, statistics.
#[derive(Clone)]
pub struct BlockHandle {
    disk: Arc<dyn BlockBackend>,
    counters: Arc<Counters>,
}

impl BlockHandle {
    /// fdatasync of the image (SIGTERM, poweroff), so writes the guest
    /// did not flush itself survive the VMM.
    pub fn flush(&self) -> stdio::Result<()> {
        self.disk.flush()
    }

    /// The image's path.
    pub fn path(&self) -> &Path {
        self.disk.path()
    }

    /// The request counters now.
    pub fn stats(&self) -> BlockStats {
        self.counters.snapshot()
    }
}

/// The virtio-blk device.
pub type Block = Device<BlockModel>;

/// virtio-blk's own state: the image, its counters, the serial.
pub struct BlockModel {
    disk: Arc<dyn BlockBackend>,
    counters: Arc<Counters>,
    serial: [u8; SERIAL_LEN],
    broken_log: Arc<LogLimit>,
}

impl Block {
    /// Opens `config`'s image and starts the device's thread; it serves
    /// requests once the driver starts the device.
    pub fn open(config: &BlockConfig) -> Result<Block, BlockError> {
        let serial = serial(config)?;
        let disk = Disk::open(&config.path, config.readonly)?;
        Block::with_backend(Arc::new(disk), serial)
    }

    /// A device on any backend.
    pub fn with_backend(
        disk: Arc<dyn BlockBackend>,
        serial: [u8; SERIAL_LEN],
    ) -> Result<Block, BlockError> {
        let mut features = feature(VIRTIO_F_VERSION_1)
            | feature(VIRTIO_RING_F_EVENT_IDX)
            | feature(VIRTIO_BLK_F_SEG_MAX)
            | feature(VIRTIO_BLK_F_BLK_SIZE)
            | feature(VIRTIO_BLK_F_FLUSH);
        if disk.readonly() {
            features |= feature(VIRTIO_BLK_F_RO);
        } else {
            features |= feature(VIRTIO_BLK_F_DISCARD) | feature(VIRTIO_BLK_F_WRITE_ZEROES);
        }
        let config = config_space(disk.size() >> SECTOR_SHIFT).to_vec();
        let model = BlockModel {
            disk,
            counters: Arc::default(),
            serial,
            broken_log: Arc::default(),
        };
        Ok(Device::new(model, features, config, vec![QUEUE_SIZE])?)
    }

    /// Flush and statistics, for the VMM.
    pub fn handle(&self) -> BlockHandle {
        BlockHandle {
            disk: self.model().disk.clone(),
            counters: self.model().counters.clone(),
        }
    }

    /// fdatasync of the image.
    pub fn flush(&self) -> stdio::Result<()> {
        self.model().disk.flush()
    }
}

/// The GET_ID serial of `config`, NUL-padded.
fn serial(config: &BlockConfig) -> Result<[u8; SERIAL_LEN], BlockError> {
    let mut serial = [0u8; SERIAL_LEN];
    if let Some(id) = &config.id {
        let bytes = id.as_bytes();
        if bytes.len() > SERIAL_LEN {
            return Err(BlockError::SerialTooLong { id: id.clone() });
        }
        serial[..bytes.len()].copy_from_slice(bytes);
    }
    Ok(serial)
}

/// `struct virtio_blk_config` up to `write_zeroes_may_unmap`.
fn config_space(capacity: u64) -> [u8; CONFIG_LEN] {
    let mut c = [0u8; CONFIG_LEN];
    let mut put = |offset: usize, bytes: &[u8]| {
        c[offset..offset + bytes.len()].copy_from_slice(bytes);
    };
    put(0, &capacity.to_le_bytes());
    put(12, &SEG_MAX.to_le_bytes());
    put(20, &(SECTOR_SIZE as u32).to_le_bytes());
    put(34, &1u16.to_le_bytes()); // num_queues
    put(36, &MAX_DISCARD_SECTORS.to_le_bytes());
    put(40, &MAX_DISCARD_SEG.to_le_bytes());
    put(44, &DISCARD_SECTOR_ALIGNMENT.to_le_bytes());
    put(48, &MAX_WRITE_ZEROES_SECTORS.to_le_bytes());
    put(52, &MAX_WRITE_ZEROES_SEG.to_le_bytes());
    put(56, &[1]); // write_zeroes_may_unmap
    c
}

impl DeviceModel for BlockModel {
    const NAME: &'static str = "virtio-blk";

    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn start(&mut self, a: Activation) -> Result<Box<dyn DeviceWorker>, ActivateError> {
        let Some(queue) = a.queues.into_iter().next() else {
            return Err(ActivateError::QueueNotReady { index: 0 });
        };
        if !queue.queue.ready() {
            return Err(ActivateError::QueueNotReady { index: 0 });
        }
        Ok(Box::new(Worker {
            queue: VirtQueue::new(queue, MAX_CHAIN),
            interrupt: a.interrupt,
            backend: Backend {
                disk: self.disk.clone(),
                mem: a.mem,
                serial: self.serial,
                counters: self.counters.clone(),
            },
            broken_log: self.broken_log.clone(),
            broken: false,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::{wait_until, MockDriver, TempFile, XorShift};
    use crate::devices::virtio::{DeviceQueue, Interrupt, VirtioDevice};
    use io::classify_open_error;
    use std::fs::OpenOptions;
    use virtio_bindings::virtio_blk::{
        VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
        VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
    };
    use virtio_queue::desc::split::Descriptor;
    use virtio_queue::Queue;
    use vm_memory::GuestMemoryMmap;
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    const VIRTIO_BLK_S_OK: u8 = virtio_bindings::virtio_blk::VIRTIO_BLK_S_OK as u8;
    const VIRTIO_BLK_S_IOERR: u8 = virtio_bindings::virtio_blk::VIRTIO_BLK_S_IOERR as u8;
    const VIRTIO_BLK_S_UNSUPP: u8 = virtio_bindings::virtio_blk::VIRTIO_BLK_S_UNSUPP as u8;

    const NEXT: u16 = 1;
    const WRITE: u16 = 2;
    const INDIRECT: u16 = 4;

    const MEM_SIZE: u64 = 0x10_0000;
    const QUEUE_ADDR: u64 = 0x1000;
    const HEADER_ADDR: u64 = 0x8000;
    const STATUS_ADDR: u64 = 0x9000;
    const DATA_ADDR: u64 = 0x1_0000;
    const IMAGE_SIZE: usize = 64 * 1024;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
    }

    /// An image whose byte i is `(i / 512) as u8 ^ i as u8`: every sector
    /// distinct.
    fn image_bytes() -> Vec<u8> {
        (0..IMAGE_SIZE)
            .map(|i| ((i / 512) as u8) ^ (i as u8))
            .collect()
    }

    fn config(image: &TempFile, readonly: bool) -> BlockConfig {
        BlockConfig {
            path: image.path().to_path_buf(),
            readonly,
            id: Some("vmlab-disk-0".into()),
        }
    }

    /// The driver side: the shared mock queue driver plus the block
    /// request helpers.
    struct Driver<'a> {
        mem: &'a GuestMemoryMmap,
        queue_driver: MockDriver<'a>,
    }

    impl<'a> std::ops::Deref for Driver<'a> {
        type Target = MockDriver<'a>;
        fn deref(&self) -> &MockDriver<'a> {
            &self.queue_driver
        }
    }

    impl std::ops::DerefMut for Driver<'_> {
        fn deref_mut(&mut self) -> &mut Self::Target {
            &mut self.queue_driver
        }
    }

    impl<'a> Driver<'a> {
        fn new(mem: &'a GuestMemoryMmap, size: u16) -> Self {
            Driver {
                mem,
                queue_driver: MockDriver::new(mem, QUEUE_ADDR, size),
            }
        }

        fn header(&self, kind: u32, sector: u64) -> (u64, u32, u16) {
            let mut h = [0u8; 16];
            h[..4].copy_from_slice(&kind.to_le_bytes());
            h[8..].copy_from_slice(&sector.to_le_bytes());
            self.mem.write_slice(&h, GuestAddress(HEADER_ADDR)).unwrap();
            (HEADER_ADDR, 16, 0)
        }

        fn status_desc(&self) -> (u64, u32, u16) {
            self.mem
                .write_obj(0xffu8, GuestAddress(STATUS_ADDR))
                .unwrap();
            (STATUS_ADDR, 1, WRITE)
        }

        fn status(&self) -> u8 {
            self.mem.read_obj(GuestAddress(STATUS_ADDR)).unwrap()
        }
    }

    struct Setup {
        image: TempFile,
        mem: GuestMemoryMmap,
        irq: EventFd,
    }

    impl Setup {
        fn new() -> Setup {
            Setup {
                image: TempFile::with_contents(&image_bytes()),
                mem: memory(),
                irq: EventFd::new(EFD_NONBLOCK).unwrap(),
            }
        }

        /// A worker for `queue` on this setup's image, without the event
        /// loop: tests call `process_queue` themselves.
        fn worker(&self, queue: Queue, readonly: bool) -> (Worker, BlockHandle) {
            let disk = Arc::new(Disk::open(self.image.path(), readonly).unwrap());
            let counters = Arc::new(Counters::default());
            let mut serial = [0u8; SERIAL_LEN];
            serial[..12].copy_from_slice(b"vmlab-disk-0");
            let disk: Arc<dyn BlockBackend> = disk;
            let worker = Worker {
                queue: VirtQueue::new(
                    DeviceQueue {
                        queue,
                        notify: Arc::new(EventFd::new(EFD_NONBLOCK).unwrap()),
                    },
                    MAX_CHAIN,
                ),
                interrupt: Arc::new(Interrupt::new(self.irq.try_clone().unwrap())),
                backend: Backend {
                    disk: disk.clone(),
                    mem: self.mem.clone(),
                    serial,
                    counters: counters.clone(),
                },
                broken_log: Arc::default(),
                broken: false,
            };
            (worker, BlockHandle { disk, counters })
        }
    }

    fn read_req(d: &mut Driver<'_>, sector: u64, len: u32) {
        let h = d.header(VIRTIO_BLK_T_IN, sector);
        let s = d.status_desc();
        d.submit(&[h, (DATA_ADDR, len, WRITE), s]);
    }

    fn guest_bytes(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    #[test]
    fn read_and_write_round_trip() {
        let s = Setup::new();
        let mut d = Driver::new(&s.mem, 16);
        let (mut w, handle) = s.worker(d.queue(), false);

        // Read sectors 2..4 into two descriptors.
        let h = d.header(VIRTIO_BLK_T_IN, 2);
        let st = d.status_desc();
        d.submit(&[
            h,
            (DATA_ADDR, 512, WRITE),
            (DATA_ADDR + 0x1000, 512, WRITE),
            st,
        ]);
        w.process_queue();
        assert_eq!(d.used_idx(), 1);
        assert_eq!(d.used(0), (0, 1025));
        assert_eq!(d.status(), VIRTIO_BLK_S_OK);
        let img = image_bytes();
        assert_eq!(guest_bytes(&s.mem, DATA_ADDR, 512), img[1024..1536]);
        assert_eq!(
            guest_bytes(&s.mem, DATA_ADDR + 0x1000, 512),
            img[1536..2048]
        );
        assert_eq!(s.irq.read().unwrap(), 1, "used-buffer interrupt");

        // Write 1 KiB of 0x5a at sector 7, then read it back.
        s.mem
            .write_slice(&[0x5a; 1024], GuestAddress(DATA_ADDR + 0x4000))
            .unwrap();
        let h = d.header(VIRTIO_BLK_T_OUT, 7);
        let st = d.status_desc();
        d.submit(&[h, (DATA_ADDR + 0x4000, 1024, 0), st]);
        w.process_queue();
        assert_eq!(d.status(), VIRTIO_BLK_S_OK);
        assert_eq!(d.used(1).1, 1);
        let contents = s.image.contents();
        assert!(contents[7 * 512..9 * 512].iter().all(|&b| b == 0x5a));
        assert_eq!(contents[..7 * 512], img[..7 * 512]);
        assert_eq!(contents[9 * 512..], img[9 * 512..]);

        read_req(&mut d, 7, 1024);
        w.process_queue();
        assert_eq!(d.status(), VIRTIO_BLK_S_OK);
        assert!(guest_bytes(&s.mem, DATA_ADDR, 1024)
            .iter()
            .all(|&b| b == 0x5a));

        // The last sector is readable; one more is not.
        read_req(&mut d, (IMAGE_SIZE / 512 - 1) as u64, 512);
        w.process_queue();
        assert_eq!(d.status(), VIRTIO_BLK_S_OK);

        let stats = handle.stats();
        assert_eq!(stats.requests, 4);
        assert_eq!(stats.bytes_read, 1024 + 1024 + 512);
        assert_eq!(stats.bytes_written, 1024);
        assert_eq!(stats.invalid, 0);
    }

    #[test]
    fn a_request_across_two_memory_regions() {
        let image = TempFile::with_contents(&image_bytes());
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x2_0000),
            (GuestAddress(0x2_0000), 0x2_0000),
        ])
        .unwrap();
        let s = Setup {
            image,
            mem,
            irq: EventFd::new(EFD_NONBLOCK).unwrap(),
        };
        let mut d = Driver::new(&s.mem, 16);
        let (mut w, _) = s.worker(d.queue(), false);
        let h = d.header(VIRTIO_BLK_T_IN, 0);
        let st = d.status_desc();
        d.submit(&[h, (0x1_ff00, 512, WRITE), st]);
        w.process_queue();
        assert_eq!(d.status(), VIRTIO_BLK_S_OK);
        assert_eq!(guest_bytes(&s.mem, 0x1_ff00, 512), image_bytes()[..512]);
    }

    #[test]
    fn flush_and_get_id() {
        let s = Setup::new();
        let mut d = Driver::new(&s.mem, 16);
        let (mut w, handle) = s.worker(d.queue(), false);

        let h = d.header(VIRTIO_BLK_T_FLUSH, 0);
        let st = d.status_desc();
        d.submit(&[h, st]);
        w.process_queue();
        assert_eq!(d.status(), VIRTIO_BLK_S_OK);
        assert_eq!(d.used(0).1, 1);
        assert_eq!(handle.stats().flushes, 1);
        handle.flush().unwrap();

        s.mem
            .write_slice(&[0xee; 32], GuestAddress(DATA_ADDR))
            .unwrap();
        let h = d.header(VIRTIO_BLK_T_GET_ID, 0);
        let st = d.status_desc();
        d.submit(&[h, (DATA_ADDR, 20, WRITE), st]);
        w.process_queue();
        assert_eq!(d.status(), VIRTIO_BLK_S_OK);
        assert_eq!(d.used(1).1, 21);
        let mut want = [0u8; 20];
        want[..12].copy_from_slice(b"vmlab-disk-0");
        assert_eq!(guest_bytes(&s.mem, DATA_ADDR, 20), want);
        assert_eq!(guest_bytes(&s.mem, DATA_ADDR + 20, 1), [0xee]);

        // A GET_ID buffer that is device-readable is the wrong direction.
        let h = d.header(VIRTIO_BLK_T_GET_ID, 0);
        let st = d.status_desc();
        d.submit(&[h, (DATA_ADDR, 20, 0), st]);
        w.process_queue();
        assert_eq!(d.status(), VIRTIO_BLK_S_IOERR);

        // Unknown request types are unsupported, not errors.
        let h = d.header(42, 0);
        let st = d.status_desc();
        d.submit(&[h, st]);
        w.process_queue();
        assert_eq!(d.status(), VIRTIO_BLK_S_UNSUPP);
        assert_eq!(handle.stats().unsupported, 1);
        assert_eq!(d.used_idx(), 4);
    }

    fn segment(mem: &GuestMemoryMmap, addr: u64, sector: u64, sectors: u32, flags: u32) {
        let mut seg = [0u8; 16];
        seg[..8].copy_from_slice(&sector.to_le_bytes());
        seg[8..12].copy_from_slice(&sectors.to_le_bytes());
        seg[12..].copy_from_slice(&flags.to_le_bytes());
        mem.write_slice(&seg, GuestAddress(addr)).unwrap();
    }

    #[test]
    fn discard_and_write_zeroes() {
        let s = Setup::new();
        let mut d = Driver::new(&s.mem, 16);
        let (mut w, _) = s.worker(d.queue(), false);
        let img = image_bytes();

        // WRITE_ZEROES of sectors 8..16 (no unmap) and 20..21 (unmap), in
        // one request.
        segment(&s.mem, DATA_ADDR, 8, 8, 0);
        segment(
            &s.mem,
            DATA_ADDR + 16,
            20,
            1,
            VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
        );
        let h = d.header(VIRTIO_BLK_T_WRITE_ZEROES, 0);
        let st = d.status_desc();
        d.submit(&[h, (DATA_ADDR, 32, 0), st]);
        w.process_queue();
        assert_eq!(d.status(), VIRTIO_BLK_S_OK);
        let c = s.image.contents();
        assert_eq!(c.len(), IMAGE_SIZE);
        assert!(c[8 * 512..16 * 512].iter().all(|&b| b == 0));
        assert!(c[20 * 512..21 * 512].iter().all(|&b| b == 0));
        assert_eq!(c[..8 * 512], img[..8 * 512]);
        assert_eq!(c[16 * 512..20 * 512], img[16 * 512..20 * 512]);
        assert_eq!(c[21 * 512..], img[21 * 512..]);

        // DISCARD of the 4 KiB-aligned sectors 32..40: on filesystems that
        // punch holes it reads back as zeros; in any case the size stays.
        segment(&s.mem, DATA_ADDR, 32, 8, 0);
        let h = d.header(VIRTIO_BLK_T_DISCARD, 0);
        let st = d.status_desc();
        d.submit(&[h, (DATA_ADDR, 16, 0), st]);
        w.process_queue();
        assert_eq!(d.status(), VIRTIO_BLK_S_OK);
        let c = s.image.contents();
        assert_eq!(c.len(), IMAGE_SIZE);
        let range = &c[32 * 512..40 * 512];
        assert!(
            range.iter().all(|&b| b == 0) || range == &img[32 * 512..40 * 512],
            "discarded sectors read as zeros or as before"
        );
        assert_eq!(c[40 * 512..], img[40 * 512..]);

        // Past the end, unmap flag on discard, odd lengths, and too many
        // segments are refused, and nothing is touched.
        let cases: [(u32, u64, u32, u32, u32, u8); 4] = [
            (VIRTIO_BLK_T_DISCARD, 127, 2, 0, 16, VIRTIO_BLK_S_IOERR),
            (
                VIRTIO_BLK_T_DISCARD,
                0,
                1,
                VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
                16,
                VIRTIO_BLK_S_UNSUPP,
            ),
            (VIRTIO_BLK_T_WRITE_ZEROES, 0, 1, 0, 15, VIRTIO_BLK_S_IOERR),
            (
                VIRTIO_BLK_T_WRITE_ZEROES,
                0,
                1,
                0,
                17 * 16,
                VIRTIO_BLK_S_IOERR,
            ),
        ];
        let before = s.image.contents();
        for (kind, sector, sectors, flags, len, want) in cases {
            segment(&s.mem, DATA_ADDR, sector, sectors, flags);
            let h = d.header(kind, 0);
            let st = d.status_desc();
            d.submit(&[h, (DATA_ADDR, len, 0), st]);
            w.process_queue();
            assert_eq!(d.status(), want, "kind {kind} sector {sector} len {len}");
        }
        assert_eq!(s.image.contents(), before);
    }

    #[test]
    fn write_zeroes_fallback_writes_zeros() {
        let s = Setup::new();
        let disk = Disk::open(s.image.path(), false).unwrap();
        disk.write_zeros_slowly(512, 60_000).unwrap();
        let c = s.image.contents();
        assert_eq!(c.len(), IMAGE_SIZE);
        assert!(c[512..60_512].iter().all(|&b| b == 0));
        assert_eq!(c[..512], image_bytes()[..512]);
        assert_eq!(c[60_512..], image_bytes()[60_512..]);
    }

    #[test]
    fn readonly_disk_rejects_writes() {
        let s = Setup::new();
        let mut d = Driver::new(&s.mem, 16);
        let (mut w, handle) = s.worker(d.queue(), true);
        s.mem
            .write_slice(&[0x11; 512], GuestAddress(DATA_ADDR))
            .unwrap();
        segment(&s.mem, DATA_ADDR + 0x1000, 0, 1, 0);
        for (kind, data) in [
            (VIRTIO_BLK_T_OUT, (DATA_ADDR, 512, 0)),
            (VIRTIO_BLK_T_DISCARD, (DATA_ADDR + 0x1000, 16, 0)),
            (VIRTIO_BLK_T_WRITE_ZEROES, (DATA_ADDR + 0x1000, 16, 0)),
        ] {
            let h = d.header(kind, 0);
            let st = d.status_desc();
            d.submit(&[h, data, st]);
            w.process_queue();
            assert_eq!(d.status(), VIRTIO_BLK_S_IOERR, "type {kind}");
        }
        assert_eq!(s.image.contents(), image_bytes(), "image unchanged");
        // Reads and flushes still work.
        read_req(&mut d, 1, 512);
        w.process_queue();
        assert_eq!(d.status(), VIRTIO_BLK_S_OK);
        assert_eq!(
            guest_bytes(&s.mem, DATA_ADDR, 512),
            image_bytes()[512..1024]
        );
        let h = d.header(VIRTIO_BLK_T_FLUSH, 0);
        let st = d.status_desc();
        d.submit(&[h, st]);
        w.process_queue();
        assert_eq!(d.status(), VIRTIO_BLK_S_OK);
        handle.flush().unwrap();
        assert_eq!(d.used_idx(), 5);
    }

    /// Submits `bad`, checks the used ring advanced with the expected
    /// status, then checks a good read still works.
    fn check_rejected(
        name: &str,
        bad: impl FnOnce(&mut Driver<'_>),
        want_status: Option<u8>,
        queue_size: u16,
    ) {
        let s = Setup::new();
        let mut d = Driver::new(&s.mem, queue_size);
        let (mut w, handle) = s.worker(d.queue(), false);
        // Status byte sentinel: it must stay untouched when there is no
        // valid status descriptor.
        s.mem.write_obj(0xffu8, GuestAddress(STATUS_ADDR)).unwrap();
        bad(&mut d);
        w.process_queue();
        assert_eq!(d.used_idx(), 1, "{name}: used ring advanced");
        match want_status {
            Some(status) => {
                assert_eq!(d.status(), status, "{name}: status");
                assert_eq!(d.used(0).1, 1, "{name}: used len is the status byte");
            }
            None => {
                assert_eq!(d.status(), 0xff, "{name}: no status written");
                assert_eq!(d.used(0).1, 0, "{name}: used len");
            }
        }
        assert_eq!(s.image.contents(), image_bytes(), "{name}: image untouched");
        assert!(!w.broken, "{name}");
        let stats = handle.stats();
        assert_eq!(stats.invalid, 1, "{name}: counted");

        // The device goes on.
        d.next_desc = 0;
        read_req(&mut d, 3, 512);
        w.process_queue();
        assert_eq!(d.used_idx(), 2, "{name}: next request served");
        assert_eq!(d.status(), VIRTIO_BLK_S_OK, "{name}: next request ok");
        assert_eq!(
            guest_bytes(&s.mem, DATA_ADDR, 512),
            image_bytes()[1536..2048]
        );
    }

    #[test]
    fn data_outside_guest_memory() {
        check_rejected(
            "read into unmapped memory",
            |d| {
                let h = d.header(VIRTIO_BLK_T_IN, 0);
                let s = d.status_desc();
                d.submit(&[h, (MEM_SIZE - 256, 512, WRITE), s]);
            },
            Some(VIRTIO_BLK_S_IOERR),
            16,
        );
        check_rejected(
            "write from an address near 2^64",
            |d| {
                let h = d.header(VIRTIO_BLK_T_OUT, 0);
                let s = d.status_desc();
                d.submit(&[h, (u64::MAX - 100, 512, 0), s]);
            },
            Some(VIRTIO_BLK_S_IOERR),
            16,
        );
        check_rejected(
            "header outside memory",
            |d| {
                let s = d.status_desc();
                d.submit(&[(MEM_SIZE + 0x1000, 16, 0), (DATA_ADDR, 512, WRITE), s]);
            },
            Some(VIRTIO_BLK_S_IOERR),
            16,
        );
    }

    #[test]
    fn wrong_data_direction() {
        check_rejected(
            "write whose data is device-writable",
            |d| {
                let h = d.header(VIRTIO_BLK_T_OUT, 0);
                let s = d.status_desc();
                d.submit(&[h, (DATA_ADDR, 512, WRITE), s]);
            },
            Some(VIRTIO_BLK_S_IOERR),
            16,
        );
        check_rejected(
            "read whose data is device-readable",
            |d| {
                let h = d.header(VIRTIO_BLK_T_IN, 0);
                let s = d.status_desc();
                d.submit(&[h, (DATA_ADDR, 512, WRITE), (DATA_ADDR + 512, 512, 0), s]);
            },
            Some(VIRTIO_BLK_S_IOERR),
            16,
        );
        check_rejected(
            "device-writable header",
            |d| {
                let (addr, len, _) = d.header(VIRTIO_BLK_T_IN, 0);
                let s = d.status_desc();
                d.submit(&[(addr, len, WRITE), (DATA_ADDR, 512, WRITE), s]);
            },
            Some(VIRTIO_BLK_S_IOERR),
            16,
        );
        check_rejected(
            "short header",
            |d| {
                let (addr, _, _) = d.header(VIRTIO_BLK_T_IN, 0);
                let s = d.status_desc();
                d.submit(&[(addr, 8, 0), (DATA_ADDR, 512, WRITE), s]);
            },
            Some(VIRTIO_BLK_S_IOERR),
            16,
        );
    }

    #[test]
    fn missing_or_readonly_status() {
        check_rejected(
            "no status descriptor (data last)",
            |d| {
                let h = d.header(VIRTIO_BLK_T_OUT, 0);
                d.submit(&[h, (DATA_ADDR, 512, 0)]);
            },
            None,
            16,
        );
        check_rejected(
            "read-only status descriptor",
            |d| {
                let h = d.header(VIRTIO_BLK_T_IN, 0);
                d.submit(&[h, (DATA_ADDR, 512, WRITE), (STATUS_ADDR, 1, 0)]);
            },
            None,
            16,
        );
        check_rejected(
            "empty status descriptor",
            |d| {
                let h = d.header(VIRTIO_BLK_T_IN, 0);
                d.submit(&[h, (DATA_ADDR, 512, WRITE), (STATUS_ADDR, 0, WRITE)]);
            },
            None,
            16,
        );
        check_rejected(
            "header only",
            |d| {
                let h = d.header(VIRTIO_BLK_T_FLUSH, 0);
                d.submit(&[h]);
            },
            None,
            16,
        );
        check_rejected(
            "status byte outside memory",
            |d| {
                let h = d.header(VIRTIO_BLK_T_IN, 0);
                d.submit(&[h, (DATA_ADDR, 512, WRITE), (MEM_SIZE, 1, WRITE)]);
            },
            None,
            16,
        );
    }

    #[test]
    fn looping_and_overlong_chains() {
        check_rejected(
            "a chain that loops",
            |d| {
                let (haddr, hlen, _) = d.header(VIRTIO_BLK_T_IN, 0);
                d.store(0, haddr, hlen, NEXT, 1);
                d.store(1, DATA_ADDR, 512, WRITE | NEXT, 2);
                d.store(2, STATUS_ADDR, 1, WRITE | NEXT, 0);
                d.publish(0);
            },
            None,
            16,
        );
        check_rejected(
            "a chain longer than the queue",
            |d| {
                let (haddr, hlen, _) = d.header(VIRTIO_BLK_T_IN, 0);
                d.store(0, haddr, hlen, NEXT, 1);
                d.store(1, DATA_ADDR, 512, WRITE | NEXT, 2);
                d.store(2, DATA_ADDR + 512, 512, WRITE | NEXT, 3);
                // Index 4 is past a 4-entry table.
                d.store(3, STATUS_ADDR, 1, WRITE | NEXT, 4);
                d.publish(0);
            },
            None,
            4,
        );
        check_rejected(
            "an indirect table with a bad length",
            |d| {
                let (haddr, hlen, _) = d.header(VIRTIO_BLK_T_IN, 0);
                d.store(0, haddr, hlen, NEXT, 1);
                d.store(1, DATA_ADDR, 17, INDIRECT, 0);
                d.publish(0);
            },
            None,
            16,
        );
    }

    /// VIRTIO_RING_F_INDIRECT_DESC is never offered: a well-formed
    /// indirect chain is refused, not followed.
    #[test]
    fn indirect_chains_are_refused() {
        let image = TempFile::with_contents(&image_bytes());
        let offered = Block::open(&config(&image, true)).unwrap().features();
        let indirect = virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
        assert_eq!(offered & feature(indirect), 0);
        check_rejected(
            "a valid indirect read",
            |d| {
                let (haddr, hlen, _) = d.header(VIRTIO_BLK_T_IN, 0);
                // The table at 0x20000: header, 512 bytes of data, status.
                let table = [
                    Descriptor::new(haddr, hlen, NEXT, 1),
                    Descriptor::new(DATA_ADDR, 512, WRITE | NEXT, 2),
                    Descriptor::new(STATUS_ADDR, 1, WRITE, 0),
                ];
                for (i, desc) in table.iter().enumerate() {
                    d.mem
                        .write_obj(*desc, GuestAddress(0x2_0000 + 16 * i as u64))
                        .unwrap();
                }
                d.store(0, 0x2_0000, 48, INDIRECT, 0);
                d.publish(0);
            },
            None,
            16,
        );
    }

    /// SEG_MAX is offered and enforced: a chain with more data
    /// descriptors than that is refused without being followed further.
    #[test]
    fn chains_longer_than_seg_max_are_refused() {
        let image = TempFile::with_contents(&image_bytes());
        let mut seg_max = [0u8; 4];
        let block = Block::open(&config(&image, true)).unwrap();
        assert_ne!(block.features() & feature(VIRTIO_BLK_F_SEG_MAX), 0);
        block.read_config(12, &mut seg_max);
        assert_eq!(u32::from_le_bytes(seg_max), SEG_MAX);
        for (data_descs, ok) in [(SEG_MAX as u16, true), (SEG_MAX as u16 + 1, false)] {
            let s = Setup::new();
            let mut d = Driver::new(&s.mem, QUEUE_SIZE);
            let (mut w, handle) = s.worker(d.queue(), false);
            s.mem.write_obj(0xffu8, GuestAddress(STATUS_ADDR)).unwrap();
            // A read from sector 0 in 512-byte descriptors (SEG_MAX of
            // them are the whole 64 KiB image), over a reused buffer.
            let mut chain = vec![d.header(VIRTIO_BLK_T_IN, 0)];
            for i in 0..u64::from(data_descs) {
                chain.push((DATA_ADDR + (i % 8) * 512, 512, WRITE));
            }
            chain.push(d.status_desc());
            d.submit(&chain);
            w.process_queue();
            assert_eq!(d.used_idx(), 1);
            if ok {
                assert_eq!(d.status(), VIRTIO_BLK_S_OK, "{data_descs} descriptors");
                assert_eq!(handle.stats().invalid, 0);
            } else {
                assert_eq!(d.status(), 0xff, "refused without a status");
                assert_eq!(d.used(0).1, 0);
                assert_eq!(handle.stats().invalid, 1);
            }
        }
    }

    #[test]
    fn sectors_out_of_range() {
        check_rejected(
            "a sector past the end",
            |d| read_req(d, (IMAGE_SIZE / 512) as u64, 512),
            Some(VIRTIO_BLK_S_IOERR),
            16,
        );
        check_rejected(
            "the last sector plus one more",
            |d| read_req(d, (IMAGE_SIZE / 512 - 1) as u64, 1024),
            Some(VIRTIO_BLK_S_IOERR),
            16,
        );
        check_rejected(
            "sector * 512 overflowing u64",
            |d| read_req(d, u64::MAX / 256, 512),
            Some(VIRTIO_BLK_S_IOERR),
            16,
        );
        check_rejected(
            "offset + length overflowing u64",
            |d| {
                let h = d.header(VIRTIO_BLK_T_OUT, (u64::MAX >> 9) - 1);
                let s = d.status_desc();
                d.submit(&[h, (DATA_ADDR, 2048, 0), s]);
            },
            Some(VIRTIO_BLK_S_IOERR),
            16,
        );
        check_rejected(
            "a length that is not whole sectors",
            |d| read_req(d, 0, 100),
            Some(VIRTIO_BLK_S_IOERR),
            16,
        );
    }

    #[test]
    fn bad_head_index_and_corrupt_avail_index() {
        let s = Setup::new();
        let mut d = Driver::new(&s.mem, 16);
        let (mut w, handle) = s.worker(d.queue(), false);
        // A head index past the table cannot be returned; it is counted
        // and skipped.
        d.publish(99);
        read_req(&mut d, 0, 512);
        w.process_queue();
        assert_eq!(d.used_idx(), 1);
        assert_eq!(d.status(), VIRTIO_BLK_S_OK);
        assert_eq!(handle.stats().invalid, 1);

        // An available index more than a ring ahead: the device stops and
        // asks for a reset instead of spinning.
        d.set_avail_idx(d.avail.wrapping_add(100));
        w.process_queue();
        assert!(w.broken);
        assert!(w.interrupt.needs_reset());
        w.process_queue();
    }

    #[test]
    fn event_idx_suppresses_interrupts() {
        let s = Setup::new();
        let mut d = Driver::new(&s.mem, 16);
        let mut queue = d.queue();
        queue.set_event_idx(true);
        let (mut w, _) = s.worker(queue, false);
        // used_event (after the avail ring) = 0: interrupt when used idx
        // passes 0, i.e. on the first completion only.
        let used_event = GuestAddress(d.avail_addr() + 4 + 2 * 16);
        s.mem.write_obj(0u16, used_event).unwrap();
        read_req(&mut d, 0, 512);
        w.process_queue();
        assert_eq!(s.irq.read().unwrap(), 1);
        read_req(&mut d, 1, 512);
        w.process_queue();
        assert!(s.irq.read().is_err(), "suppressed by used_event");
        // The driver asks to hear about used index 2 (the third one).
        s.mem.write_obj(2u16, used_event).unwrap();
        read_req(&mut d, 2, 512);
        w.process_queue();
        assert_eq!(s.irq.read().unwrap(), 1);
        assert_eq!(d.used_idx(), 3);
        // avail_event tells the driver where to notify next.
        let avail_event = GuestAddress(d.used_addr() + 4 + 8 * 16);
        assert_eq!(s.mem.read_obj::<u16>(avail_event).unwrap(), 3);
    }

    #[test]
    fn open_errors() {
        let open = |path: &Path, readonly: bool, id: Option<&str>| {
            Block::open(&BlockConfig {
                path: path.to_path_buf(),
                readonly,
                id: id.map(str::to_string),
            })
        };
        let missing = std::env::temp_dir().join("vmlab-no-such-image.img");
        assert!(matches!(
            open(&missing, false, None),
            Err(BlockError::NotFound { .. })
        ));
        assert!(matches!(
            open(&std::env::temp_dir(), false, None),
            Err(BlockError::IsDirectory { .. })
        ));
        let empty = TempFile::with_contents(&[]);
        assert!(matches!(
            open(empty.path(), false, None),
            Err(BlockError::Empty { .. })
        ));
        let odd = TempFile::with_contents(&[0; 1000]);
        let err = open(odd.path(), true, None).err().unwrap();
        assert!(matches!(
            err,
            BlockError::NotSectorMultiple { size: 1000, .. }
        ));
        assert!(err.to_string().contains("multiple of 512"));
        let ok = TempFile::with_contents(&[0; 512]);
        let err = open(ok.path(), false, Some("123456789012345678901"))
            .err()
            .unwrap();
        assert!(matches!(err, BlockError::SerialTooLong { .. }));
        assert!(matches!(
            open(Path::new("/dev/null"), true, None),
            Err(BlockError::NotADisk { .. })
        ));
        let err = classify_open_error(
            ok.path(),
            false,
            stdio::Error::from_raw_os_error(libc::EACCES),
        );
        assert!(matches!(err, BlockError::NotWritable { .. }));
        assert!(err.to_string().contains("read-only"));
        assert!(matches!(
            classify_open_error(
                ok.path(),
                true,
                stdio::Error::from_raw_os_error(libc::EACCES)
            ),
            BlockError::Open { .. }
        ));
    }

    #[test]
    fn unwritable_image_needs_readonly() {
        use std::os::unix::fs::PermissionsExt;
        let image = TempFile::with_contents(&[0; 4096]);
        std::fs::set_permissions(image.path(), std::fs::Permissions::from_mode(0o444)).unwrap();
        let writable_anyway = OpenOptions::new().write(true).open(image.path()).is_ok();
        let result = Block::open(&config(&image, false)).map(drop);
        if writable_anyway {
            // Root ignores file modes: the mapping is covered by
            // `open_errors`.
            assert!(result.is_ok());
        } else {
            assert!(matches!(result, Err(BlockError::NotWritable { .. })));
        }
        assert!(Block::open(&config(&image, true)).is_ok());
    }

    #[test]
    fn images_are_locked() {
        let image = TempFile::with_contents(&[0; 4096]);
        let first = Block::open(&config(&image, false)).unwrap();
        let err = Block::open(&config(&image, false)).err().unwrap();
        assert!(matches!(err, BlockError::Locked { .. }), "{err}");
        assert!(matches!(
            Block::open(&config(&image, true)),
            Err(BlockError::Locked { .. })
        ));
        drop(first);
        let ro1 = Block::open(&config(&image, true)).unwrap();
        let _ro2 = Block::open(&config(&image, true)).unwrap();
        assert!(Block::open(&config(&image, false)).is_err());
        drop(ro1);
    }

    #[test]
    fn features_and_config_space() {
        let image = TempFile::with_contents(&[0; 8192]);
        let rw = Block::open(&config(&image, false)).unwrap();
        let f = rw.features();
        for bit in [
            VIRTIO_F_VERSION_1,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_BLK_SIZE,
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_DISCARD,
            VIRTIO_BLK_F_WRITE_ZEROES,
        ] {
            assert_ne!(f & feature(bit), 0, "bit {bit}");
        }
        assert_eq!(f & feature(VIRTIO_BLK_F_RO), 0);
        let mut cap = [0u8; 8];
        rw.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 16);
        let mut word = [0u8; 4];
        rw.read_config(12, &mut word);
        assert_eq!(u32::from_le_bytes(word), SEG_MAX);
        rw.read_config(20, &mut word);
        assert_eq!(u32::from_le_bytes(word), 512);
        rw.read_config(40, &mut word);
        assert_eq!(u32::from_le_bytes(word), MAX_DISCARD_SEG);
        // Past the end and far past it: zeros.
        rw.read_config(58, &mut word);
        assert_eq!(word, [0; 4]);
        rw.read_config(u64::MAX, &mut word);
        assert_eq!(word, [0; 4]);
        assert_eq!(rw.queue_max_sizes(), &[QUEUE_SIZE]);
        drop(rw);

        let ro = Block::open(&config(&image, true)).unwrap();
        assert_ne!(ro.features() & feature(VIRTIO_BLK_F_RO), 0);
        assert_eq!(ro.features() & feature(VIRTIO_BLK_F_DISCARD), 0);
    }

    #[test]
    fn activation_and_reset_on_the_device_thread() {
        let s = Setup::new();
        let d = Driver::new(&s.mem, 16);
        let mut block = Block::open(&config(&s.image, false)).unwrap();
        let notify = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let interrupt = Arc::new(Interrupt::new(s.irq.try_clone().unwrap()));

        // Queue 0 not ready: refused.
        let err = block
            .activate(
                s.mem.clone(),
                vec![DeviceQueue {
                    queue: Queue::new(16).unwrap(),
                    notify: notify.clone(),
                }],
                interrupt.clone(),
            )
            .unwrap_err();
        assert!(matches!(err, ActivateError::QueueNotReady { index: 0 }));
        assert!(block
            .activate(s.mem.clone(), vec![], interrupt.clone())
            .is_err());
        assert!(!block.is_active());

        block
            .activate(
                s.mem.clone(),
                vec![DeviceQueue {
                    queue: d.queue(),
                    notify: notify.clone(),
                }],
                interrupt,
            )
            .unwrap();
        assert!(block.is_active());
        let mut d = d;
        read_req(&mut d, 0, 512);
        notify.write(1).unwrap();
        wait_until("the request", || d.used_idx() == 1);
        assert_eq!(d.status(), VIRTIO_BLK_S_OK);
        assert_eq!(block.handle().stats().requests, 1);

        block.reset();
        wait_until("the reset", || block.reset_complete());
        // After reset a notification reaches nobody and the ring is left
        // alone.
        read_req(&mut d, 0, 512);
        notify.write(1).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(d.used_idx(), 1);
        assert_eq!(block.handle().stats().requests, 1);
        block.flush().unwrap();
    }

    /// Random descriptor tables and available rings: nothing panics, the
    /// image keeps its size, and the worker never loops forever.
    #[test]
    fn random_chains_never_panic() {
        let s = Setup::new();
        let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
        let mut d = Driver::new(&s.mem, 16);
        let (mut w, handle) = s.worker(d.queue(), false);
        let addrs = MockDriver::hostile_addrs(
            MEM_SIZE,
            &[
                HEADER_ADDR,
                STATUS_ADDR,
                DATA_ADDR,
                DATA_ADDR + 0x1ff,
                QUEUE_ADDR,
            ],
        );
        let lens = [0u32, 1, 15, 16, 20, 512, 513, 4096, 65536, u32::MAX];
        for round in 0..1000 {
            // Random headers with mostly plausible types.
            let mut h = [0u8; 16];
            let kind = rng.pick(&[0u32, 1, 4, 8, 11, 13, 2, u32::MAX]);
            h[..4].copy_from_slice(&kind.to_le_bytes());
            let random = rng.next();
            let sector = rng.pick(&[0u64, 1, 127, 128, u64::MAX, u64::MAX >> 9, random]);
            h[8..].copy_from_slice(&sector.to_le_bytes());
            s.mem.write_slice(&h, GuestAddress(HEADER_ADDR)).unwrap();
            segment(
                &s.mem,
                DATA_ADDR,
                rng.below(200),
                rng.pick(&[0, 1, 8, u32::MAX]),
                rng.pick(&[0, 1, 2]),
            );
            for i in 0..16 {
                // Most descriptors follow the header / data / status
                // pattern (with random twists), so that requests also
                // succeed; the rest is noise.
                let (addr, len, flags, next) = if rng.below(8) != 0 {
                    match i % 3 {
                        0 => (HEADER_ADDR, 16, NEXT, i + 1),
                        1 => (
                            DATA_ADDR,
                            rng.pick(&[16, 20, 512, 4096]),
                            NEXT | rng.pick(&[0, WRITE]),
                            i + 1,
                        ),
                        _ => (STATUS_ADDR, 1, WRITE, 0),
                    }
                } else {
                    MockDriver::noise(&mut rng, i, &addrs, &lens)
                };
                d.store(i, addr, len, flags, next);
            }
            d.publish_noise(&mut rng);
            if round % 250 == 249 {
                // A corrupt available index now and then; a reset (a new
                // worker state) follows, as a driver would do.
                d.set_avail_idx(rng.next() as u16);
            }
            w.process_queue();
            if w.broken {
                d.set_avail_idx(0);
                d.avail = 0;
                w.queue.queue = d.queue();
                w.broken = false;
            }
        }
        assert_eq!(s.image.contents().len(), IMAGE_SIZE);
        let stats = handle.stats();
        assert!(stats.requests > 500, "{stats:?}");
        assert!(stats.bytes_read > 0 && stats.bytes_written > 0, "{stats:?}");
    }
}
