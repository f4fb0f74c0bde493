//! The file backend of virtio-blk: opening and locking the image, and
//! moving data between it and guest memory with pread/pwrite (no bounce
//! buffer), through vm-memory's checked `VolatileSlice`s. FLUSH is an
//! fdatasync; DISCARD punches holes; WRITE_ZEROES zeroes a range with
//! fallocate, falling back to writing zeros where the filesystem cannot.
//!
//! The request worker sees a [`BlockBackend`], so tests can put a backend
//! that blocks (or fails) in place of the file.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};

use vm_memory::bitmap::BitmapSlice;
use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryMmap, ReadVolatile, VolatileMemoryError,
    VolatileSlice, WriteVolatile,
};
use vmm_sys_util::fallocate::{fallocate, FallocateMode};

use super::{BlockError, SECTOR_SIZE};

/// What the request worker needs of a disk. Every call may block (the
/// device's own thread runs it); none may touch guest memory outside
/// `[addr, addr + len)`.
pub trait BlockBackend: Send + Sync {
    /// The image's path (for messages).
    fn path(&self) -> &Path;
    /// Size in bytes, a multiple of 512.
    fn size(&self) -> u64;
    /// Whether the guest may write.
    fn readonly(&self) -> bool;
    /// Makes completed writes durable (fdatasync).
    fn flush(&self) -> io::Result<()>;
    /// Reads `len` bytes at `offset` into guest memory at `addr`.
    fn read_to_guest(
        &self,
        offset: u64,
        mem: &GuestMemoryMmap,
        addr: GuestAddress,
        len: usize,
    ) -> io::Result<()>;
    /// Writes `len` bytes of guest memory at `addr` to `offset`.
    fn write_from_guest(
        &self,
        offset: u64,
        mem: &GuestMemoryMmap,
        addr: GuestAddress,
        len: usize,
    ) -> io::Result<()>;
    /// Deallocates a range (its contents become undefined).
    fn discard(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Zeroes a range, deallocating it if `unmap`.
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()>;
}

impl BlockBackend for Disk {
    fn path(&self) -> &Path {
        Disk::path(self)
    }
    fn size(&self) -> u64 {
        Disk::size(self)
    }
    fn readonly(&self) -> bool {
        Disk::readonly(self)
    }
    fn flush(&self) -> io::Result<()> {
        Disk::flush(self)
    }
    fn read_to_guest(
        &self,
        offset: u64,
        mem: &GuestMemoryMmap,
        addr: GuestAddress,
        len: usize,
    ) -> io::Result<()> {
        Disk::read_to_guest(self, offset, mem, addr, len)
    }
    fn write_from_guest(
        &self,
        offset: u64,
        mem: &GuestMemoryMmap,
        addr: GuestAddress,
        len: usize,
    ) -> io::Result<()> {
        Disk::write_from_guest(self, offset, mem, addr, len)
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        Disk::discard(self, offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        Disk::write_zeroes(self, offset, len, unmap)
    }
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
    pub fn read_to_guest(
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
    pub fn write_from_guest(
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
    pub fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        match self.fallocate(Hole::Punch, offset, len) {
            Err(e) if fallocate_unsupported(&e) => Ok(()),
            other => other,
        }
    }

    /// Makes a range read as zeros: punch a hole when the guest allows
    /// deallocation, else zero the range in place (keeps it allocated),
    /// else write zeros.
    pub fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        if unmap {
            match self.fallocate(Hole::Punch, offset, len) {
                Err(e) if fallocate_unsupported(&e) => {}
                other => return other,
            }
        }
        match self.fallocate(Hole::ZeroInPlace, offset, len) {
            Err(e) if fallocate_unsupported(&e) => self.write_zeros_slowly(offset, len),
            other => other,
        }
    }

    pub(super) fn write_zeros_slowly(&self, offset: u64, len: u64) -> io::Result<()> {
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

    /// vmm-sys-util's fallocate (FALLOC_FL_KEEP_SIZE: the disk never
    /// grows), retried when a signal interrupts it.
    fn fallocate(&self, hole: Hole, offset: u64, len: u64) -> io::Result<()> {
        loop {
            let mode = match hole {
                Hole::Punch => FallocateMode::PunchHole,
                Hole::ZeroInPlace => FallocateMode::ZeroRange,
            };
            match fallocate(&self.file, mode, true, offset, len) {
                Ok(()) => return Ok(()),
                Err(e) if e.errno() == libc::EINTR => {}
                Err(e) => return Err(io::Error::from_raw_os_error(e.errno())),
            }
        }
    }
}

/// What [`Disk::fallocate`] does to a range (vmm-sys-util's
/// `FallocateMode` is not `Copy`, so a retry needs a fresh one).
#[derive(Clone, Copy)]
enum Hole {
    /// Deallocate it (reads back as zeros).
    Punch,
    /// Zero it, keeping the blocks allocated.
    ZeroInPlace,
}

/// Maps the O_RDWR open failure of a writable disk to "not writable", so
/// the user learns to attach it read-only.
pub(super) fn classify_open_error(path: &Path, readonly: bool, source: io::Error) -> BlockError {
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
