//! The virtio-blk device thread's work: serving the request queue.
//!
//! Each wake-up serves at most [`QUEUE_BUDGET`] requests and then yields
//! (the device thread calls again), so a deep queue cannot hold the
//! thread; each request is parsed ([`super::request`]) before any byte
//! moves, then carried out on the [`BlockBackend`]. A request that fails
//! a check gets VIRTIO_BLK_S_IOERR (VIRTIO_BLK_S_UNSUPP for an unknown
//! type) when it has a writable status byte, and is always returned to
//! the used ring so the device goes on with the next one.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_OK, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestMemoryMmap};

use super::io::BlockBackend;
use super::metrics::Counters;
use super::request::{parse, status_byte, Request, RequestError};
use super::{
    MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, MAX_WRITE_ZEROES_SECTORS, MAX_WRITE_ZEROES_SEG,
    SECTOR_SHIFT, SECTOR_SIZE, SEGMENT_LEN, SERIAL_LEN,
};
use crate::devices::virtio::queue::{ChainError, LogLimit, VirtQueue, Work, QUEUE_BUDGET};
use crate::devices::virtio::thread::{DeviceWorker, EpollSet};
use crate::devices::virtio::Interrupt;

/// epoll token of the request queue's notification.
const TOKEN_QUEUE: u64 = 0;

/// The activated device: the queue and what serving it needs. Lives on
/// the device's thread.
pub(super) struct Worker {
    pub(super) queue: VirtQueue,
    pub(super) interrupt: Arc<Interrupt>,
    pub(super) backend: Backend,
    /// Ring corruption reports (shared with the device across resets).
    pub(super) broken_log: Arc<LogLimit>,
    /// The driver corrupted the available ring; nothing is served until
    /// it resets the device.
    pub(super) broken: bool,
}

impl DeviceWorker for Worker {
    fn register(&mut self, fds: &mut EpollSet<'_>) -> io::Result<()> {
        fds.add(&**self.queue.notify_fd(), TOKEN_QUEUE)
    }

    fn handle(&mut self, _token: u64, _fds: &mut EpollSet<'_>) -> Work {
        // Consume the notification first: one that arrives while the queue
        // is being served wakes the thread again, never gets lost.
        self.queue.ack_notification();
        self.process_queue()
    }

    fn interrupt(&self) -> &Interrupt {
        &self.interrupt
    }
}

impl Worker {
    /// Serves up to [`QUEUE_BUDGET`] requests, then interrupts the driver
    /// if it wants to hear about them (event-idx aware).
    pub(super) fn process_queue(&mut self) -> Work {
        if self.broken {
            return Work::Done;
        }
        let Worker {
            queue,
            interrupt,
            backend,
            ..
        } = self;
        match queue.serve(&backend.mem, interrupt, QUEUE_BUDGET, |chain| {
            backend.process(chain)
        }) {
            Ok(work) => work,
            Err(why) => {
                self.broken_log.report(format_args!(
                    "virtio-blk {}: {why}; the device stops until the guest resets it",
                    self.backend.disk.path().display()
                ));
                self.broken = true;
                self.interrupt.signal_needs_reset();
                Work::Done
            }
        }
    }
}

/// Carries out requests; shared state of the worker that a descriptor
/// chain may borrow while the queue is borrowed mutably.
pub(super) struct Backend {
    pub(super) disk: Arc<dyn BlockBackend>,
    pub(super) mem: GuestMemoryMmap,
    pub(super) serial: [u8; SERIAL_LEN],
    pub(super) counters: Arc<Counters>,
}

impl Backend {
    /// Serves one chain; returns the used length (bytes written to the
    /// guest, status included). Never fails: an invalid request is
    /// answered (or dropped, without a status byte) and counted.
    pub(super) fn process(&self, chain: Result<&[Descriptor], ChainError>) -> u32 {
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        let mem = &self.mem;
        // The chain was read with at most SEG_MAX + 2 descriptors, no
        // indirect table, every index inside the ring.
        let (status, result) = match chain {
            Ok(descs) => {
                let status = status_byte(mem, descs);
                let result = parse(mem, descs, status).and_then(|req| self.execute(mem, &req));
                (status, result)
            }
            Err(e) => (None, Err(RequestError::Chain(e))),
        };
        let (code, written) = match result {
            Ok(written) => (VIRTIO_BLK_S_OK as u8, written),
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
