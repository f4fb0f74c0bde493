//! virtio-vsock packets (virtio 1.2 5.10.6): the 44-byte header, and the
//! checks a descriptor chain passes before vmlab reads or writes one.
//!
//! Pure apart from guest-memory copies: no sockets, no queues.

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use crate::devices::virtio::queue::{self, ChainError};

/// Length of `struct virtio_vsock_hdr`.
pub const HDR_LEN: usize = 44;
/// Most payload one packet carries, either way: Linux's
/// VIRTIO_VSOCK_MAX_PKT_BUF_SIZE. A transmit chain longer than this plus
/// the header is malformed.
pub const MAX_PAYLOAD: usize = 64 * 1024;

/// The host's CID (VMADDR_CID_HOST).
pub const HOST_CID: u64 = 2;

/// `type`: stream socket, the only kind vmlab offers.
pub const TYPE_STREAM: u16 = 1;

/// `flags` of SHUTDOWN: the sender will receive no more.
pub const SHUTDOWN_RCV: u32 = 1;
/// `flags` of SHUTDOWN: the sender will send no more.
pub const SHUTDOWN_SEND: u32 = 2;
/// Both.
pub const SHUTDOWN_BOTH: u32 = SHUTDOWN_RCV | SHUTDOWN_SEND;

/// Packet operations (`op`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Connection request.
    Request = 1,
    /// Connection accepted.
    Response = 2,
    /// Reset: refused, or closed for good.
    Rst = 3,
    /// One or both directions end.
    Shutdown = 4,
    /// Data.
    Rw = 5,
    /// The sender's buf_alloc / fwd_cnt changed.
    CreditUpdate = 6,
    /// The sender asks for a CREDIT_UPDATE.
    CreditRequest = 7,
}

impl Op {
    /// The operation numbered `v`, if there is one.
    pub fn from_u16(v: u16) -> Option<Op> {
        Some(match v {
            1 => Op::Request,
            2 => Op::Response,
            3 => Op::Rst,
            4 => Op::Shutdown,
            5 => Op::Rw,
            6 => Op::CreditUpdate,
            7 => Op::CreditRequest,
            _ => return None,
        })
    }
}

/// `struct virtio_vsock_hdr`, all fields little-endian on the wire.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    /// Source CID.
    pub src_cid: u64,
    /// Destination CID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type ([`TYPE_STREAM`]).
    pub type_: u16,
    /// Operation (see [`Op`]).
    pub op: u16,
    /// Operation flags (SHUTDOWN).
    pub flags: u32,
    /// The sender's receive buffer size for this connection.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer so far.
    pub fwd_cnt: u32,
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut v = [0u8; 4];
    v.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(v)
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

impl Header {
    /// Parses the wire form.
    pub fn from_bytes(b: &[u8; HDR_LEN]) -> Header {
        Header {
            src_cid: le_u64(b, 0),
            dst_cid: le_u64(b, 8),
            src_port: le_u32(b, 16),
            dst_port: le_u32(b, 20),
            len: le_u32(b, 24),
            type_: u16::from_le_bytes([b[28], b[29]]),
            op: u16::from_le_bytes([b[30], b[31]]),
            flags: le_u32(b, 32),
            buf_alloc: le_u32(b, 36),
            fwd_cnt: le_u32(b, 40),
        }
    }

    /// The wire form.
    pub fn to_bytes(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// The operation, if known.
    pub fn operation(&self) -> Option<Op> {
        Op::from_u16(self.op)
    }
}

/// Why a descriptor chain or a packet was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    /// The chain itself is unusable (bad index, too long, indirect).
    #[error("unusable descriptor chain: {0}")]
    Chain(#[from] ChainError),
    /// A descriptor's buffer is not all guest RAM.
    #[error("descriptor {addr:#x}+{len:#x} is outside guest memory")]
    OutsideMemory {
        /// Its address.
        addr: u64,
        /// Its length.
        len: u32,
    },
    /// A transmit descriptor the device may write.
    #[error("a transmit descriptor is device-writable")]
    WriteOnly,
    /// A receive descriptor the device may only read.
    #[error("a receive descriptor is device-readable")]
    ReadOnly,
    /// Shorter than the header.
    #[error("{0} bytes: shorter than the 44-byte header")]
    Short(usize),
    /// Longer than a header and [`MAX_PAYLOAD`].
    #[error("the chain holds more than {MAX_PAYLOAD} bytes after the header")]
    Oversized,
    /// `len` says more than the chain holds (or more than [`MAX_PAYLOAD`]).
    #[error("header len {len} but the chain holds {available} bytes of payload")]
    LenBeyondChain {
        /// The header's len.
        len: u32,
        /// What the chain has after the header.
        available: usize,
    },
}

/// Checks that `d` lies in guest RAM.
fn check_in_memory(mem: &GuestMemoryMmap, d: &Descriptor) -> Result<(), PacketError> {
    if queue::in_memory(mem, d) {
        Ok(())
    } else {
        Err(PacketError::OutsideMemory {
            addr: d.addr().raw_value(),
            len: d.len(),
        })
    }
}

/// Reads a transmit chain (guest to host; its descriptors as
/// [`queue::read_chain`] found them) into `buf` (at least
/// `HDR_LEN + MAX_PAYLOAD` bytes): checks every descriptor (device-
/// readable, inside guest RAM, no more than a header and [`MAX_PAYLOAD`]
/// in all), then the header's `len` against what follows it. The header may be split across descriptors, as virtio allows
/// (1.2 2.6.4: no assumption about message framing).
///
/// Returns the header and the payload length (the payload is
/// `buf[HDR_LEN..HDR_LEN + len]`).
pub fn read_tx_chain(
    mem: &GuestMemoryMmap,
    chain: &[Descriptor],
    buf: &mut [u8],
) -> Result<(Header, usize), PacketError> {
    let limit = (HDR_LEN + MAX_PAYLOAD).min(buf.len());
    let mut total = 0usize;
    for d in chain {
        if d.is_write_only() {
            return Err(PacketError::WriteOnly);
        }
        check_in_memory(mem, d)?;
        let len = d.len() as usize;
        if total + len > limit {
            return Err(PacketError::Oversized);
        }
        if len > 0 {
            mem.read_slice(&mut buf[total..total + len], d.addr())
                .map_err(|_| PacketError::OutsideMemory {
                    addr: d.addr().raw_value(),
                    len: d.len(),
                })?;
        }
        total += len;
    }
    if total < HDR_LEN {
        return Err(PacketError::Short(total));
    }
    let mut raw = [0u8; HDR_LEN];
    raw.copy_from_slice(&buf[..HDR_LEN]);
    let header = Header::from_bytes(&raw);
    let available = total - HDR_LEN;
    let len = header.len as usize;
    if len > available || len > MAX_PAYLOAD {
        return Err(PacketError::LenBeyondChain {
            len: header.len,
            available,
        });
    }
    Ok((header, len))
}

/// Checks a receive chain (host to guest): every descriptor device-
/// writable and inside guest RAM, room for at least a header. Appends the
/// descriptors to `segments` (cleared first) and returns the room in
/// bytes.
pub fn gather_rx_chain(
    mem: &GuestMemoryMmap,
    chain: &[Descriptor],
    segments: &mut Vec<(GuestAddress, u32)>,
) -> Result<usize, PacketError> {
    segments.clear();
    let mut room = 0usize;
    for d in chain {
        if !d.is_write_only() {
            return Err(PacketError::ReadOnly);
        }
        check_in_memory(mem, d)?;
        if d.len() > 0 && room < HDR_LEN + MAX_PAYLOAD {
            segments.push((d.addr(), d.len()));
            room += d.len() as usize;
        }
    }
    if room < HDR_LEN {
        return Err(PacketError::Short(room));
    }
    Ok(room)
}

/// Writes `parts` one after the other across `segments` (checked by
/// [`gather_rx_chain`]); the bytes written.
pub fn write_segments(
    mem: &GuestMemoryMmap,
    segments: &[(GuestAddress, u32)],
    parts: &[&[u8]],
) -> usize {
    let mut written = 0usize;
    let mut seg = 0usize;
    let mut seg_off = 0usize;
    for part in parts {
        let mut data: &[u8] = part;
        while !data.is_empty() {
            let Some(&(addr, len)) = segments.get(seg) else {
                return written;
            };
            let room = len as usize - seg_off;
            let n = room.min(data.len());
            let Some(at) = addr.checked_add(seg_off as u64) else {
                return written;
            };
            if mem.write_slice(&data[..n], at).is_err() {
                // Checked when gathered; cannot happen.
                return written;
            }
            written += n;
            data = &data[n..];
            seg_off += n;
            if seg_off == len as usize {
                seg += 1;
                seg_off = 0;
            }
        }
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip() {
        let h = Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 1024,
            dst_port: 5000,
            len: 77,
            type_: TYPE_STREAM,
            op: Op::Rw as u16,
            flags: 0,
            buf_alloc: 256 << 10,
            fwd_cnt: 0xdead_beef,
        };
        let b = h.to_bytes();
        assert_eq!(&b[0..8], &3u64.to_le_bytes());
        assert_eq!(&b[28..30], &1u16.to_le_bytes());
        assert_eq!(&b[30..32], &5u16.to_le_bytes());
        assert_eq!(Header::from_bytes(&b), h);
        assert_eq!(h.operation(), Some(Op::Rw));
        for op in 1..=7 {
            assert_eq!(Op::from_u16(op).map(|o| o as u16), Some(op));
        }
        assert_eq!(Op::from_u16(0), None);
        assert_eq!(Op::from_u16(8), None);
    }
}
