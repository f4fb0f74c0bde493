//! virtio-blk backed by a raw disk image (a regular file or a host block
//! device), one request queue, served on the event loop.
//!
//! Every request is checked before any byte moves: the chain must end, its
//! header must be a device-readable descriptor of at least 16 bytes, its
//! last descriptor a device-writable status byte, every descriptor inside
//! guest RAM, the data descriptors in the direction the request type needs
//! (device-writable for a read, device-readable for a write), and the
//! sectors inside the image without overflow. A request that fails a check
//! gets VIRTIO_BLK_S_IOERR (VIRTIO_BLK_S_UNSUPP for an unknown type) when
//! it has a writable status byte, and is always returned to the used ring
//! so the device goes on with the next one. The guest can only hurt its
//! own disk, never the host or the VMM.
//!
//! Data moves with pread/pwrite straight between the image and guest
//! memory (no bounce buffer), through vm-memory's checked `VolatileSlice`s.
//! FLUSH is an fdatasync of the image; it completes only once the data is
//! on stable storage. DISCARD punches holes, WRITE_ZEROES zeroes a range
//! with fallocate, falling back to writing zeros where the filesystem
//! cannot.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, ReadVolatile,
    VolatileMemoryError, VolatileSlice, WriteVolatile,
};
use vmm_sys_util::eventfd::EventFd;

use super::event_loop::{EventHandler, EventLoopHandle, Registration};
use super::{
    feature, ActivateError, DeviceQueue, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1,
    VIRTIO_ID_BLOCK, VIRTIO_RING_F_EVENT_IDX,
};

/// Bytes per sector: the unit of capacity and of request offsets.
pub const SECTOR_SIZE: u64 = 512;
const SECTOR_SHIFT: u32 = 9;
/// Entries of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Data descriptors per request: the ring minus header and status (the
/// device offers no indirect descriptors, so a request must fit the ring).
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Length of the GET_ID serial.
pub const SERIAL_LEN: usize = 20;
/// Largest DISCARD / WRITE_ZEROES range: 1 GiB.
const MAX_DISCARD_SECTORS: u32 = (1 << 30) >> SECTOR_SHIFT;
const MAX_WRITE_ZEROES_SECTORS: u32 = MAX_DISCARD_SECTORS;
/// Ranges per DISCARD / WRITE_ZEROES request.
const MAX_DISCARD_SEG: u32 = 16;
const MAX_WRITE_ZEROES_SEG: u32 = 16;
/// Discard granularity hint: 4 KiB, the usual filesystem block.
const DISCARD_SECTOR_ALIGNMENT: u32 = 8;

// Feature bits.
const VIRTIO_BLK_F_SEG_MAX: u32 = 2;
const VIRTIO_BLK_F_RO: u32 = 5;
const VIRTIO_BLK_F_BLK_SIZE: u32 = 6;
const VIRTIO_BLK_F_FLUSH: u32 = 9;
const VIRTIO_BLK_F_DISCARD: u32 = 13;
const VIRTIO_BLK_F_WRITE_ZEROES: u32 = 14;

// Request types.
const VIRTIO_BLK_T_IN: u32 = 0;
const VIRTIO_BLK_T_OUT: u32 = 1;
const VIRTIO_BLK_T_FLUSH: u32 = 4;
const VIRTIO_BLK_T_GET_ID: u32 = 8;
const VIRTIO_BLK_T_DISCARD: u32 = 11;
const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;

// Status values.
const VIRTIO_BLK_S_OK: u8 = 0;
const VIRTIO_BLK_S_IOERR: u8 = 1;
const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// WRITE_ZEROES may deallocate the range.
const VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP: u32 = 1;

/// `struct virtio_blk_outhdr`: type, ioprio, sector.
const HEADER_LEN: u32 = 16;
/// `struct virtio_blk_discard_write_zeroes`: sector, num_sectors, flags.
const SEGMENT_LEN: usize = 16;

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
        source: io::Error,
    },
    /// Any other open or stat failure.
    #[error("cannot open disk image {path}: {source}")]
    Open {
        /// The image.
        path: PathBuf,
        /// Why.
        source: io::Error,
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
        source: io::Error,
    },
    /// The serial does not fit GET_ID.
    #[error("disk serial {id:?} is {} bytes; virtio-blk serials have at most 20", .id.len())]
    SerialTooLong {
        /// The serial.
        id: String,
    },
}

/// The open image. Positional I/O (`pread`/`pwrite`) needs no lock, so
/// the worker and the VMM (flush at shutdown) share it.
#[derive(Debug)]
pub struct Disk {
    file: File,
    path: PathBuf,
    size: u64,
    readonly: bool,
}

impl Disk {
    /// Opens and locks the image: an exclusive `flock` for a writable
    /// disk, a shared one for a read-only disk, so two VMs never write the
    /// same image (the lock goes away with the process).
    pub fn open(path: &Path, readonly: bool) -> Result<Disk, BlockError> {
        let open_err = |source: io::Error| {
            if source.kind() == io::ErrorKind::NotFound {
                BlockError::NotFound {
                    path: path.to_path_buf(),
                }
            } else {
                BlockError::Open {
                    path: path.to_path_buf(),
                    source,
                }
            }
        };
        let kind = std::fs::metadata(path).map_err(open_err)?.file_type();
        if kind.is_dir() {
            return Err(BlockError::IsDirectory {
                path: path.to_path_buf(),
            });
        }
        if !kind.is_file() && !kind.is_block_device() {
            return Err(BlockError::NotADisk {
                path: path.to_path_buf(),
            });
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(!readonly)
            .open(path)
            .map_err(|e| classify_open_error(path, readonly, e))?;
        // Seeking to the end gives the size of block devices too, whose
        // metadata says 0.
        let size = file.seek(SeekFrom::End(0)).map_err(open_err)?;
        if size == 0 {
            return Err(BlockError::Empty {
                path: path.to_path_buf(),
            });
        }
        if !size.is_multiple_of(SECTOR_SIZE) {
            return Err(BlockError::NotSectorMultiple {
                path: path.to_path_buf(),
                size,
            });
        }
        lock(&file, path, readonly)?;
        Ok(Disk {
            file,
            path: path.to_path_buf(),
            size,
            readonly,
        })
    }

    /// The image's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether the guest may write.
    pub fn readonly(&self) -> bool {
        self.readonly
    }

    /// Writes completed requests' data to stable storage (fdatasync).
    pub fn flush(&self) -> io::Result<()> {
        if self.readonly {
            return Ok(());
        }
        self.file.sync_data()
    }

    /// Reads `len` bytes at `offset` of the image into guest memory at
    /// `addr`.
    fn read_to_guest(
        &self,
        offset: u64,
        mem: &GuestMemoryMmap,
        addr: GuestAddress,
        len: usize,
    ) -> io::Result<()> {
        let mut file = FileAt {
            file: &self.file,
            offset,
        };
        for slice in GuestMemoryBackend::get_slices(mem, addr, len) {
            let mut slice = slice.map_err(io::Error::other)?;
            file.read_exact_volatile(&mut slice)
                .map_err(volatile_to_io)?;
        }
        Ok(())
    }

    /// Writes `len` bytes of guest memory at `addr` to the image at
    /// `offset`.
    fn write_from_guest(
        &self,
        offset: u64,
        mem: &GuestMemoryMmap,
        addr: GuestAddress,
        len: usize,
    ) -> io::Result<()> {
        let mut file = FileAt {
            file: &self.file,
            offset,
        };
        for slice in GuestMemoryBackend::get_slices(mem, addr, len) {
            let slice = slice.map_err(io::Error::other)?;
            file.write_all_volatile(&slice).map_err(volatile_to_io)?;
        }
        Ok(())
    }

    /// Deallocates a range. Discarded data may read back as anything, so
    /// where the filesystem cannot punch holes doing nothing is correct.
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        match self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            Err(e) if fallocate_unsupported(&e) => Ok(()),
            other => other,
        }
    }

    /// Makes a range read as zeros: punch a hole when the guest allows
    /// deallocation, else zero the range in place (keeps it allocated),
    /// else write zeros.
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        if unmap {
            match self.fallocate(
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            ) {
                Err(e) if fallocate_unsupported(&e) => {}
                other => return other,
            }
        }
        match self.fallocate(
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            Err(e) if fallocate_unsupported(&e) => self.write_zeros_slowly(offset, len),
            other => other,
        }
    }

    fn write_zeros_slowly(&self, offset: u64, len: u64) -> io::Result<()> {
        const CHUNK: usize = 64 * 1024;
        static ZEROS: [u8; CHUNK] = [0; CHUNK];
        let mut done = 0u64;
        while done < len {
            let n = usize::try_from(len - done).map_or(CHUNK, |left| left.min(CHUNK));
            self.file.write_all_at(&ZEROS[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        let offset = libc::off_t::try_from(offset).map_err(|_| invalid_offset())?;
        let len = libc::off_t::try_from(len).map_err(|_| invalid_offset())?;
        loop {
            // SAFETY: fallocate only reads its integer arguments and acts
            // on the fd, which `self.file` keeps open; no memory is shared.
            let rc = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, offset, len) };
            if rc == 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

/// Maps the O_RDWR open failure of a writable disk to "not writable", so
/// the user learns to attach it read-only.
fn classify_open_error(path: &Path, readonly: bool, source: io::Error) -> BlockError {
    let path = path.to_path_buf();
    match source.raw_os_error() {
        Some(libc::EACCES | libc::EPERM | libc::EROFS | libc::ETXTBSY) if !readonly => {
            BlockError::NotWritable { path, source }
        }
        Some(libc::ENOENT) => BlockError::NotFound { path },
        _ => BlockError::Open { path, source },
    }
}

fn lock(file: &File, path: &Path, readonly: bool) -> Result<(), BlockError> {
    let mode = if readonly {
        libc::LOCK_SH
    } else {
        libc::LOCK_EX
    };
    loop {
        // SAFETY: flock acts on the fd, which `file` keeps open; it takes
        // no pointers.
        let rc = unsafe { libc::flock(file.as_raw_fd(), mode | libc::LOCK_NB) };
        if rc == 0 {
            return Ok(());
        }
        let source = io::Error::last_os_error();
        match source.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EWOULDBLOCK) => {
                return Err(BlockError::Locked {
                    path: path.to_path_buf(),
                    readonly,
                })
            }
            _ => {
                return Err(BlockError::Lock {
                    path: path.to_path_buf(),
                    source,
                })
            }
        }
    }
}

fn fallocate_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL)
    )
}

fn invalid_offset() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, "offset beyond off_t")
}

fn volatile_to_io(e: VolatileMemoryError) -> io::Error {
    match e {
        VolatileMemoryError::IOError(e) => e,
        other => io::Error::other(other),
    }
}

/// A file cursor for vm-memory's volatile I/O traits that uses
/// pread/pwrite: no shared file position, so no lock and no seek.
struct FileAt<'a> {
    file: &'a File,
    offset: u64,
}

impl FileAt<'_> {
    fn off_t(&self) -> Result<libc::off_t, VolatileMemoryError> {
        libc::off_t::try_from(self.offset)
            .map_err(|_| VolatileMemoryError::IOError(invalid_offset()))
    }
}

impl ReadVolatile for FileAt<'_> {
    fn read_volatile<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let offset = self.off_t()?;
        let guard = buf.ptr_guard_mut();
        // SAFETY: a VolatileSlice (here from guest memory, bounds-checked
        // by vm-memory) is valid for writes of `buf.len()` bytes while the
        // guard lives, and pread writes at most that many. Guest memory is
        // never borrowed as a Rust reference, so nothing aliases it.
        let n = unsafe {
            libc::pread(
                self.file.as_raw_fd(),
                guard.as_ptr().cast::<libc::c_void>(),
                buf.len(),
                offset,
            )
        };
        let Ok(n) = usize::try_from(n) else {
            buf.bitmap().mark_dirty(0, buf.len());
            return Err(VolatileMemoryError::IOError(io::Error::last_os_error()));
        };
        buf.bitmap().mark_dirty(0, n);
        self.offset += n as u64;
        Ok(n)
    }
}

impl WriteVolatile for FileAt<'_> {
    fn write_volatile<B: BitmapSlice>(
        &mut self,
        buf: &VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let offset = self.off_t()?;
        let guard = buf.ptr_guard();
        // SAFETY: the slice is valid for reads of `buf.len()` bytes while
        // the guard lives, and pwrite reads at most that many.
        let n = unsafe {
            libc::pwrite(
                self.file.as_raw_fd(),
                guard.as_ptr().cast::<libc::c_void>(),
                buf.len(),
                offset,
            )
        };
        let n = usize::try_from(n)
            .map_err(|_| VolatileMemoryError::IOError(io::Error::last_os_error()))?;
        self.offset += n as u64;
        Ok(n)
    }
}

/// Request counters, shared by the worker and whoever reports them.
#[derive(Debug, Default)]
struct Counters {
    requests: AtomicU64,
    invalid: AtomicU64,
    unsupported: AtomicU64,
    io_errors: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    flushes: AtomicU64,
}

/// A snapshot of a disk's request counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlockStats {
    /// Requests taken from the queue.
    pub requests: u64,
    /// Malformed requests (failed validation).
    pub invalid: u64,
    /// Requests of a type the device does not implement.
    pub unsupported: u64,
    /// Well-formed requests the host failed to carry out.
    pub io_errors: u64,
    /// Bytes read from the image into the guest.
    pub bytes_read: u64,
    /// Bytes written to the image from the guest.
    pub bytes_written: u64,
    /// FLUSH requests completed.
    pub flushes: u64,
}

/// What the VMM keeps of a disk: flush at shutdown, statistics.
#[derive(Debug, Clone)]
pub struct BlockHandle {
    disk: Arc<Disk>,
    counters: Arc<Counters>,
}

impl BlockHandle {
    /// fdatasync of the image (SIGTERM, poweroff), so writes the guest
    /// did not flush itself survive the VMM.
    pub fn flush(&self) -> io::Result<()> {
        self.disk.flush()
    }

    /// The image's path.
    pub fn path(&self) -> &Path {
        self.disk.path()
    }

    /// The request counters now.
    pub fn stats(&self) -> BlockStats {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        BlockStats {
            requests: get(&c.requests),
            invalid: get(&c.invalid),
            unsupported: get(&c.unsupported),
            io_errors: get(&c.io_errors),
            bytes_read: get(&c.bytes_read),
            bytes_written: get(&c.bytes_written),
            flushes: get(&c.flushes),
        }
    }
}

/// The virtio-blk device model.
pub struct Block {
    disk: Arc<Disk>,
    counters: Arc<Counters>,
    serial: [u8; SERIAL_LEN],
    features: u64,
    config: [u8; CONFIG_LEN],
    queue_sizes: [u16; 1],
    event_loop: EventLoopHandle,
    active: Option<Active>,
}

struct Active {
    worker: Arc<Mutex<Worker>>,
    registration: Registration,
}

impl Block {
    /// Opens `config`'s image; the device will serve requests on
    /// `event_loop` once the driver starts it.
    pub fn open(config: &BlockConfig, event_loop: EventLoopHandle) -> Result<Block, BlockError> {
        let mut serial = [0u8; SERIAL_LEN];
        if let Some(id) = &config.id {
            let bytes = id.as_bytes();
            if bytes.len() > SERIAL_LEN {
                return Err(BlockError::SerialTooLong { id: id.clone() });
            }
            serial[..bytes.len()].copy_from_slice(bytes);
        }
        let disk = Disk::open(&config.path, config.readonly)?;

        let mut features = feature(VIRTIO_F_VERSION_1)
            | feature(VIRTIO_RING_F_EVENT_IDX)
            | feature(VIRTIO_BLK_F_SEG_MAX)
            | feature(VIRTIO_BLK_F_BLK_SIZE)
            | feature(VIRTIO_BLK_F_FLUSH);
        if config.readonly {
            features |= feature(VIRTIO_BLK_F_RO);
        } else {
            features |= feature(VIRTIO_BLK_F_DISCARD) | feature(VIRTIO_BLK_F_WRITE_ZEROES);
        }

        Ok(Block {
            config: config_space(disk.size() >> SECTOR_SHIFT),
            disk: Arc::new(disk),
            counters: Arc::default(),
            serial,
            features,
            queue_sizes: [QUEUE_SIZE],
            event_loop,
            active: None,
        })
    }

    /// Flush and statistics, for the VMM.
    pub fn handle(&self) -> BlockHandle {
        BlockHandle {
            disk: self.disk.clone(),
            counters: self.counters.clone(),
        }
    }

    /// fdatasync of the image.
    pub fn flush(&self) -> io::Result<()> {
        self.disk.flush()
    }
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

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        self.features
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
        // Without VIRTIO_BLK_F_CONFIG_WCE every field is read-only.
        log::debug!("virtio-blk: ignoring config write at {offset:#x}");
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<DeviceQueue>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), ActivateError> {
        self.reset();
        let Some(DeviceQueue { queue, notify }) = queues.into_iter().next() else {
            return Err(ActivateError::QueueNotReady { index: 0 });
        };
        if !queue.ready() {
            return Err(ActivateError::QueueNotReady { index: 0 });
        }
        let worker = Arc::new(Mutex::new(Worker {
            queue,
            notify: notify.clone(),
            interrupt,
            backend: Backend {
                disk: self.disk.clone(),
                mem,
                serial: self.serial,
                counters: self.counters.clone(),
            },
            running: true,
            broken: false,
        }));
        let registration = self.event_loop.register(&*notify, 0, worker.clone())?;
        self.active = Some(Active {
            worker,
            registration,
        });
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(active) = self.active.take() {
            self.event_loop.unregister(active.registration);
            // Waits for a request being served now; the loop may still
            // hold a clone of the worker, which `running` turns off.
            active
                .worker
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .running = false;
        }
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        self.reset();
    }
}

/// The activated device: the queue and what serving it needs. Lives in
/// the event loop (behind a mutex shared with [`Block`] for reset).
struct Worker {
    queue: Queue,
    notify: Arc<EventFd>,
    interrupt: Arc<Interrupt>,
    backend: Backend,
    /// Cleared by reset; a stopped worker never touches guest memory.
    running: bool,
    /// The driver corrupted the available ring; nothing is served until
    /// it resets the device.
    broken: bool,
}

impl EventHandler for Worker {
    fn handle(&mut self, _token: u64) {
        // Consume the notification first: one that arrives while the queue
        // is being drained makes the loop call again, never gets lost.
        let _ = self.notify.read();
        self.process_queue();
    }
}

impl Worker {
    /// Serves every available request, then interrupts the driver if it
    /// wants to hear about them (event-idx aware).
    fn process_queue(&mut self) {
        if !self.running || self.broken {
            return;
        }
        let mem = &self.backend.mem;
        let mut idle_rounds = 0;
        loop {
            if let Err(e) = self.queue.disable_notification(mem) {
                self.fail(&format!("cannot update the used ring: {e}"));
                return;
            }
            let mut served = 0usize;
            while let Some(chain) = self.queue.pop_descriptor_chain(mem) {
                served += 1;
                let head = chain.head_index();
                let used_len = self.backend.process(chain);
                if let Err(e) = self.queue.add_used(mem, head, used_len) {
                    // Only a head index past the ring gets here (the used
                    // ring was checked at activation), and its empty chain
                    // was already counted as invalid. It cannot be
                    // returned: the driver's bookkeeping is broken, the
                    // device is not.
                    log::debug!("virtio-blk: cannot return descriptor {head}: {e}");
                }
            }
            if served > 0 {
                notify_driver(&mut self.queue, &self.interrupt, mem);
            }
            match self.queue.enable_notification(mem) {
                Ok(false) => return,
                Ok(true) if served == 0 => {
                    // More is "available" yet nothing could be taken twice
                    // in a row: the available index is corrupt (it ran
                    // more than a ring ahead).
                    idle_rounds += 1;
                    if idle_rounds > 1 {
                        self.fail("the available ring index is corrupt");
                        return;
                    }
                }
                Ok(true) => idle_rounds = 0,
                Err(e) => {
                    self.fail(&format!("cannot read the available ring: {e}"));
                    return;
                }
            }
        }
    }

    fn fail(&mut self, why: &str) {
        log::error!(
            "virtio-blk {}: {why}; the device stops until the guest resets it",
            self.backend.disk.path().display()
        );
        self.broken = true;
        self.interrupt.signal_needs_reset();
    }
}

/// Interrupts the driver for new used buffers unless event-idx says it
/// does not want to hear about them yet.
fn notify_driver(queue: &mut Queue, interrupt: &Interrupt, mem: &GuestMemoryMmap) {
    match queue.needs_notification(mem) {
        Ok(false) => {}
        Ok(true) => interrupt.signal_used_buffer(),
        // Cannot read used_event: interrupting too often is harmless.
        Err(_) => interrupt.signal_used_buffer(),
    }
}

/// Why a request failed; the guest sees only the status byte, this goes
/// to the debug log.
#[derive(Debug, thiserror::Error)]
enum RequestError {
    #[error("the descriptor chain does not end (loop, too long, or bad next index)")]
    Unterminated,
    #[error("the chain has {0} descriptor(s); a request needs a header and a status")]
    TooShort(usize),
    #[error("the last descriptor is not a device-writable status byte")]
    NoStatus,
    #[error("the header descriptor is device-writable or shorter than 16 bytes")]
    BadHeader,
    #[error("descriptor {addr:#x}+{len:#x} is outside guest memory")]
    OutsideMemory { addr: u64, len: u32 },
    #[error("a data descriptor points the wrong way for request type {0}")]
    WrongDirection(u32),
    #[error("data length {0} is not a whole number of sectors")]
    NotSectorMultiple(u64),
    #[error("sector {sector} + {len} bytes is past the end of the disk")]
    OutOfRange { sector: u64, len: u64 },
    #[error("the request is longer than 4 GiB")]
    TooLong,
    #[error("bad discard/write-zeroes segments: {0}")]
    BadSegments(&'static str),
    #[error("unsupported discard/write-zeroes flags {0:#x}")]
    UnsupportedFlags(u32),
    #[error("write request on a read-only disk")]
    ReadOnly,
    #[error("unsupported request type {0}")]
    Unsupported(u32),
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
}

impl RequestError {
    fn status(&self) -> u8 {
        match self {
            RequestError::Unsupported(_) | RequestError::UnsupportedFlags(_) => VIRTIO_BLK_S_UNSUPP,
            _ => VIRTIO_BLK_S_IOERR,
        }
    }
}

/// A request that passed the structural checks.
struct Request<'a> {
    kind: u32,
    sector: u64,
    data: &'a [Descriptor],
    data_len: u64,
}

/// Carries out requests; shared state of the worker that a descriptor
/// chain may borrow while the queue is borrowed mutably.
struct Backend {
    disk: Arc<Disk>,
    mem: GuestMemoryMmap,
    serial: [u8; SERIAL_LEN],
    counters: Arc<Counters>,
}

impl Backend {
    /// Serves one chain; returns the used length (bytes written to the
    /// guest, status included). Never fails: an invalid request is
    /// answered (or dropped, without a status byte) and counted.
    fn process(&self, chain: DescriptorChain<&GuestMemoryMmap>) -> u32 {
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        // The chain reads descriptors through this same memory.
        let mem = &self.mem;
        // virtio-queue stops a chain after queue-size descriptors, at a
        // descriptor outside the table or memory, and past 4 GiB in total,
        // so this is bounded.
        let descs: Vec<Descriptor> = chain.collect();
        let status = status_byte(mem, &descs);
        let result = parse(mem, &descs, status).and_then(|req| self.execute(mem, &req));
        let (code, written) = match result {
            Ok(written) => (VIRTIO_BLK_S_OK, written),
            Err(e) => {
                let counter = match &e {
                    RequestError::Io(_) => &self.counters.io_errors,
                    RequestError::Unsupported(_) | RequestError::UnsupportedFlags(_) => {
                        &self.counters.unsupported
                    }
                    _ => &self.counters.invalid,
                };
                if counter.fetch_add(1, Ordering::Relaxed) == 0
                    && !matches!(e, RequestError::Unsupported(_))
                {
                    log::warn!(
                        "virtio-blk {}: request failed: {e} (later failures are counted and \
                         logged at debug level)",
                        self.disk.path().display()
                    );
                } else {
                    log::debug!(
                        "virtio-blk {}: request failed: {e}",
                        self.disk.path().display()
                    );
                }
                (e.status(), 0)
            }
        };
        match status {
            Some(addr) => match mem.write_obj(code, addr) {
                Ok(()) => written + 1,
                Err(e) => {
                    log::debug!("virtio-blk: cannot write the status byte: {e}");
                    0
                }
            },
            None => 0,
        }
    }

    /// Performs a validated request; returns the data bytes written to
    /// the guest.
    fn execute(&self, mem: &GuestMemoryMmap, req: &Request<'_>) -> Result<u32, RequestError> {
        match req.kind {
            VIRTIO_BLK_T_IN => {
                let mut offset = self.checked_range(req)?;
                self.require_direction(req, true)?;
                for d in req.data {
                    self.disk
                        .read_to_guest(offset, mem, d.addr(), d.len() as usize)?;
                    offset += u64::from(d.len());
                }
                self.counters
                    .bytes_read
                    .fetch_add(req.data_len, Ordering::Relaxed);
                // parse() checked that data and status fit in u32.
                u32::try_from(req.data_len).map_err(|_| RequestError::TooLong)
            }
            VIRTIO_BLK_T_OUT => {
                if self.disk.readonly() {
                    return Err(RequestError::ReadOnly);
                }
                let mut offset = self.checked_range(req)?;
                self.require_direction(req, false)?;
                for d in req.data {
                    self.disk
                        .write_from_guest(offset, mem, d.addr(), d.len() as usize)?;
                    offset += u64::from(d.len());
                }
                self.counters
                    .bytes_written
                    .fetch_add(req.data_len, Ordering::Relaxed);
                Ok(0)
            }
            VIRTIO_BLK_T_FLUSH => {
                self.disk.flush()?;
                self.counters.flushes.fetch_add(1, Ordering::Relaxed);
                Ok(0)
            }
            VIRTIO_BLK_T_GET_ID => {
                self.require_direction(req, true)?;
                let mut written = 0usize;
                for d in req.data {
                    if written == SERIAL_LEN {
                        break;
                    }
                    let n = (d.len() as usize).min(SERIAL_LEN - written);
                    mem.write_slice(&self.serial[written..written + n], d.addr())
                        .map_err(|e| RequestError::Io(io::Error::other(e)))?;
                    written += n;
                }
                Ok(written as u32)
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                if self.disk.readonly() {
                    return Err(RequestError::ReadOnly);
                }
                self.discard_or_zero(mem, req)?;
                Ok(0)
            }
            other => Err(RequestError::Unsupported(other)),
        }
    }

    /// The byte offset of an IN/OUT request, checked to lie in the disk.
    fn checked_range(&self, req: &Request<'_>) -> Result<u64, RequestError> {
        if !req.data_len.is_multiple_of(SECTOR_SIZE) {
            return Err(RequestError::NotSectorMultiple(req.data_len));
        }
        let out_of_range = || RequestError::OutOfRange {
            sector: req.sector,
            len: req.data_len,
        };
        let offset = req
            .sector
            .checked_mul(SECTOR_SIZE)
            .ok_or_else(out_of_range)?;
        let end = offset.checked_add(req.data_len).ok_or_else(out_of_range)?;
        if end > self.disk.size() {
            return Err(out_of_range());
        }
        Ok(offset)
    }

    /// Data the device writes must be in device-writable descriptors,
    /// data it reads in device-readable ones.
    fn require_direction(
        &self,
        req: &Request<'_>,
        device_writes: bool,
    ) -> Result<(), RequestError> {
        if req.data.iter().all(|d| d.is_write_only() == device_writes) {
            Ok(())
        } else {
            Err(RequestError::WrongDirection(req.kind))
        }
    }

    fn discard_or_zero(
        &self,
        mem: &GuestMemoryMmap,
        req: &Request<'_>,
    ) -> Result<(), RequestError> {
        self.require_direction(req, false)?;
        let (max_seg, max_sectors) = if req.kind == VIRTIO_BLK_T_DISCARD {
            (MAX_DISCARD_SEG, MAX_DISCARD_SECTORS)
        } else {
            (MAX_WRITE_ZEROES_SEG, MAX_WRITE_ZEROES_SECTORS)
        };
        let len = req.data_len;
        if len == 0 || !len.is_multiple_of(SEGMENT_LEN as u64) {
            return Err(RequestError::BadSegments("length is not a multiple of 16"));
        }
        if len > u64::from(max_seg) * SEGMENT_LEN as u64 {
            return Err(RequestError::BadSegments("too many segments"));
        }
        // At most 16 segments of 16 bytes: gather them.
        let mut bytes = Vec::with_capacity(len as usize);
        for d in req.data {
            let start = bytes.len();
            bytes.resize(start + d.len() as usize, 0);
            mem.read_slice(&mut bytes[start..], d.addr())
                .map_err(|e| RequestError::Io(io::Error::other(e)))?;
        }
        let mut ranges = Vec::with_capacity(bytes.len() / SEGMENT_LEN);
        for seg in bytes.chunks_exact(SEGMENT_LEN) {
            let le32 =
                |at: usize| u32::from_le_bytes([seg[at], seg[at + 1], seg[at + 2], seg[at + 3]]);
            let sector = u64::from(le32(0)) | (u64::from(le32(4)) << 32);
            let sectors = le32(8);
            let flags = le32(12);
            let allowed = if req.kind == VIRTIO_BLK_T_WRITE_ZEROES {
                VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
            } else {
                0
            };
            if flags & !allowed != 0 {
                return Err(RequestError::UnsupportedFlags(flags));
            }
            if sectors > max_sectors {
                return Err(RequestError::BadSegments(
                    "range larger than the advertised maximum",
                ));
            }
            let bytes_len = u64::from(sectors) << SECTOR_SHIFT;
            let out_of_range = || RequestError::OutOfRange {
                sector,
                len: bytes_len,
            };
            let offset = sector.checked_mul(SECTOR_SIZE).ok_or_else(out_of_range)?;
            let end = offset.checked_add(bytes_len).ok_or_else(out_of_range)?;
            if end > self.disk.size() {
                return Err(out_of_range());
            }
            ranges.push((
                offset,
                bytes_len,
                flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
            ));
        }
        // All segments are valid: only now touch the image.
        for (offset, len, unmap) in ranges {
            if len == 0 {
                continue;
            }
            if req.kind == VIRTIO_BLK_T_DISCARD {
                self.disk.discard(offset, len)?;
            } else {
                self.disk.write_zeroes(offset, len, unmap)?;
            }
        }
        Ok(())
    }
}

/// The status byte's address: the last byte of the last descriptor, if
/// the chain ends there and that descriptor is device-writable, non-empty
/// and in guest memory.
fn status_byte(mem: &GuestMemoryMmap, descs: &[Descriptor]) -> Option<GuestAddress> {
    let last = descs.last()?;
    if last.has_next() || !last.is_write_only() || last.len() == 0 {
        return None;
    }
    let addr = last.addr().checked_add(u64::from(last.len()) - 1)?;
    GuestMemoryBackend::check_range(mem, addr, 1).then_some(addr)
}

/// Structural checks shared by every request type.
fn parse<'a>(
    mem: &GuestMemoryMmap,
    descs: &'a [Descriptor],
    status: Option<GuestAddress>,
) -> Result<Request<'a>, RequestError> {
    match descs.last() {
        Some(last) if !last.has_next() => {}
        _ => return Err(RequestError::Unterminated),
    }
    if descs.len() < 2 {
        return Err(RequestError::TooShort(descs.len()));
    }
    if status.is_none() {
        return Err(RequestError::NoStatus);
    }
    let (header, rest) = descs.split_first().ok_or(RequestError::TooShort(0))?;
    let (_, data) = rest.split_last().ok_or(RequestError::TooShort(1))?;
    if header.is_write_only() || header.len() < HEADER_LEN {
        return Err(RequestError::BadHeader);
    }
    for d in descs {
        let in_memory = usize::try_from(d.len())
            .is_ok_and(|len| GuestMemoryBackend::check_range(mem, d.addr(), len));
        if !in_memory {
            return Err(RequestError::OutsideMemory {
                addr: d.addr().raw_value(),
                len: d.len(),
            });
        }
    }
    let mut raw = [0u8; HEADER_LEN as usize];
    mem.read_slice(&mut raw, header.addr())
        .map_err(|_| RequestError::OutsideMemory {
            addr: header.addr().raw_value(),
            len: header.len(),
        })?;
    let kind = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
    let sector = u64::from_le_bytes([
        raw[8], raw[9], raw[10], raw[11], raw[12], raw[13], raw[14], raw[15],
    ]);
    let data_len: u64 = data.iter().map(|d| u64::from(d.len())).sum();
    // The used length (data + status byte) must fit in u32.
    if data_len >= u64::from(u32::MAX) {
        return Err(RequestError::TooLong);
    }
    Ok(Request {
        kind,
        sector,
        data,
        data_len,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::event_loop::EventLoop;
    use crate::devices::virtio::test_utils::{MockDriver, TempFile, XorShift};
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

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
            let worker = Worker {
                queue,
                notify: Arc::new(EventFd::new(EFD_NONBLOCK).unwrap()),
                interrupt: Arc::new(Interrupt::new(self.irq.try_clone().unwrap())),
                backend: Backend {
                    disk: disk.clone(),
                    mem: self.mem.clone(),
                    serial,
                    counters: counters.clone(),
                },
                running: true,
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
        d.vq.avail().idx().store(d.avail.wrapping_add(100));
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
        let used_event = GuestAddress(d.vq.avail_addr().0 + 4 + 2 * 16);
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
        let avail_event = GuestAddress(d.vq.used_addr().0 + 4 + 8 * 16);
        assert_eq!(s.mem.read_obj::<u16>(avail_event).unwrap(), 3);
    }

    #[test]
    fn open_errors() {
        let event_loop = EventLoop::new().unwrap();
        let h = event_loop.handle();
        let open = |path: &Path, readonly: bool, id: Option<&str>| {
            Block::open(
                &BlockConfig {
                    path: path.to_path_buf(),
                    readonly,
                    id: id.map(str::to_string),
                },
                h.clone(),
            )
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
        let err = classify_open_error(ok.path(), false, io::Error::from_raw_os_error(libc::EACCES));
        assert!(matches!(err, BlockError::NotWritable { .. }));
        assert!(err.to_string().contains("read-only"));
        assert!(matches!(
            classify_open_error(ok.path(), true, io::Error::from_raw_os_error(libc::EACCES)),
            BlockError::Open { .. }
        ));
    }

    #[test]
    fn unwritable_image_needs_readonly() {
        use std::os::unix::fs::PermissionsExt;
        let image = TempFile::with_contents(&[0; 4096]);
        std::fs::set_permissions(image.path(), std::fs::Permissions::from_mode(0o444)).unwrap();
        let writable_anyway = OpenOptions::new().write(true).open(image.path()).is_ok();
        let h = EventLoop::new().unwrap().handle();
        let result = Block::open(&config(&image, false), h.clone()).map(drop);
        if writable_anyway {
            // Root ignores file modes: the mapping is covered by
            // `open_errors`.
            assert!(result.is_ok());
        } else {
            assert!(matches!(result, Err(BlockError::NotWritable { .. })));
        }
        assert!(Block::open(&config(&image, true), h).is_ok());
    }

    #[test]
    fn images_are_locked() {
        let image = TempFile::with_contents(&[0; 4096]);
        let h = EventLoop::new().unwrap().handle();
        let first = Block::open(&config(&image, false), h.clone()).unwrap();
        let err = Block::open(&config(&image, false), h.clone())
            .err()
            .unwrap();
        assert!(matches!(err, BlockError::Locked { .. }), "{err}");
        assert!(matches!(
            Block::open(&config(&image, true), h.clone()),
            Err(BlockError::Locked { .. })
        ));
        drop(first);
        let ro1 = Block::open(&config(&image, true), h.clone()).unwrap();
        let _ro2 = Block::open(&config(&image, true), h.clone()).unwrap();
        assert!(Block::open(&config(&image, false), h.clone()).is_err());
        drop(ro1);
    }

    #[test]
    fn features_and_config_space() {
        let image = TempFile::with_contents(&[0; 8192]);
        let h = EventLoop::new().unwrap().handle();
        let rw = Block::open(&config(&image, false), h.clone()).unwrap();
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

        let ro = Block::open(&config(&image, true), h).unwrap();
        assert_ne!(ro.features() & feature(VIRTIO_BLK_F_RO), 0);
        assert_eq!(ro.features() & feature(VIRTIO_BLK_F_DISCARD), 0);
    }

    #[test]
    fn activation_and_reset_with_the_event_loop() {
        let s = Setup::new();
        let d = Driver::new(&s.mem, 16);
        let event_loop = EventLoop::new().unwrap();
        let h = event_loop.handle();
        let mut block = Block::open(&config(&s.image, false), h.clone()).unwrap();
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
        assert_eq!(h.registrations(), 0);

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
        assert_eq!(h.registrations(), 1);
        let mut d = d;
        read_req(&mut d, 0, 512);
        notify.write(1).unwrap();
        assert!(event_loop.run_once(0).unwrap());
        assert_eq!(d.used_idx(), 1);
        assert_eq!(d.status(), VIRTIO_BLK_S_OK);
        assert_eq!(block.handle().stats().requests, 1);

        block.reset();
        assert_eq!(h.registrations(), 0);
        // After reset a notification reaches nobody and the ring is left
        // alone.
        read_req(&mut d, 0, 512);
        notify.write(1).unwrap();
        assert!(event_loop.run_once(0).unwrap());
        assert_eq!(d.used_idx(), 1);
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
        let addrs = [
            HEADER_ADDR,
            STATUS_ADDR,
            DATA_ADDR,
            DATA_ADDR + 0x1ff,
            MEM_SIZE - 1,
            MEM_SIZE,
            u64::MAX,
            u64::MAX - 15,
            QUEUE_ADDR,
        ];
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
            if round % 250 == 249 {
                // A corrupt available index now and then; a reset (a new
                // worker state) follows, as a driver would do.
                d.vq.avail().idx().store(rng.next() as u16);
            }
            w.process_queue();
            if w.broken {
                d.vq.avail().idx().store(0);
                d.avail = 0;
                w.queue = d.queue();
                w.broken = false;
            }
        }
        assert_eq!(s.image.contents().len(), IMAGE_SIZE);
        let stats = handle.stats();
        assert!(stats.requests > 500, "{stats:?}");
        assert!(stats.bytes_read > 0 && stats.bytes_written > 0, "{stats:?}");
    }
}
