//! Parsing a virtio-blk descriptor chain into a typed request: pure
//! checks, no I/O.
//!
//! The chain must end, its header must be a device-readable descriptor of
//! at least 16 bytes, its last descriptor a device-writable status byte,
//! every descriptor inside guest RAM. The data descriptors' direction and
//! the sector range are checked by the worker per request type.

use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::devices::virtio::queue::{in_memory, ChainError};

/// `struct virtio_blk_outhdr`: type, ioprio, sector.
pub(super) const HEADER_LEN: u32 = 16;

/// Why a request failed; the guest sees only the status byte, this goes
/// to the debug log.
#[derive(Debug, thiserror::Error)]
pub(super) enum RequestError {
    #[error("the descriptor chain does not end (loop, too long, or bad next index)")]
    Unterminated,
    #[error("unusable descriptor chain: {0}")]
    Chain(#[from] ChainError),
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
    Io(#[from] std::io::Error),
}

impl RequestError {
    pub(super) fn status(&self) -> u8 {
        match self {
            RequestError::Unsupported(_) | RequestError::UnsupportedFlags(_) => {
                VIRTIO_BLK_S_UNSUPP as u8
            }
            _ => VIRTIO_BLK_S_IOERR as u8,
        }
    }
}

/// A request that passed the structural checks.
pub(super) struct Request<'a> {
    pub(super) kind: u32,
    pub(super) sector: u64,
    pub(super) data: &'a [Descriptor],
    pub(super) data_len: u64,
}

/// The status byte's address: the last byte of the last descriptor, if
/// the chain ends there and that descriptor is device-writable, non-empty
/// and in guest memory.
pub(super) fn status_byte(mem: &GuestMemoryMmap, descs: &[Descriptor]) -> Option<GuestAddress> {
    let last = descs.last()?;
    if last.has_next() || !last.is_write_only() || last.len() == 0 {
        return None;
    }
    let addr = last.addr().checked_add(u64::from(last.len()) - 1)?;
    GuestMemoryBackend::check_range(mem, addr, 1).then_some(addr)
}

/// Structural checks shared by every request type.
pub(super) fn parse<'a>(
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
        if !in_memory(mem, d) {
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
