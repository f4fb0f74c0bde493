//! Transmit: the guest's transmit chains to the backend.

use std::sync::atomic::Ordering;

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestMemoryMmap};

use super::{in_memory, ChainError, Worker};
use crate::devices::tap::VNET_HDR_LEN;
use crate::devices::virtio::net::{Counters, NetBackend, ETH_HLEN};
use crate::devices::virtio::queue::{Work, QUEUE_BUDGET};

impl Worker {
    /// Sends up to [`QUEUE_BUDGET`] transmit chains, then interrupts the
    /// driver if it wants to hear about them (event-idx aware).
    pub(crate) fn process_tx(&mut self) -> Work {
        if self.broken {
            return Work::Done;
        }
        let Worker {
            mem,
            tx,
            interrupt,
            backend,
            counters,
            tx_frame,
            problems,
            ..
        } = self;
        let served = tx.serve(mem, interrupt, QUEUE_BUDGET, |chain| {
            match chain
                .map_err(ChainError::from)
                .and_then(|descs| gather_tx_chain(mem, descs, tx_frame))
            {
                Ok(len) => send(backend.as_ref(), counters, &tx_frame[..len]),
                Err(e) => {
                    counters.tx_malformed.fetch_add(1, Ordering::Relaxed);
                    problems.report(format_args!(
                        "virtio-net {}: transmit chain dropped: {e}",
                        backend.name()
                    ));
                }
            }
            // The device writes nothing into a transmit chain.
            0
        });
        match served {
            Ok(work) => work,
            Err(why) => {
                self.fail(&why);
                Work::Done
            }
        }
    }
}

/// Writes one gathered frame (header included) to the backend.
fn send(backend: &dyn NetBackend, counters: &Counters, frame: &[u8]) {
    match backend.write_frame(frame) {
        Ok(_) => {
            counters.tx_frames.fetch_add(1, Ordering::Relaxed);
            counters
                .tx_bytes
                .fetch_add((frame.len() - VNET_HDR_LEN) as u64, Ordering::Relaxed);
        }
        Err(e) => {
            // Like a full NIC queue or a down link: the frame is lost, TCP
            // resends.
            if counters.tx_errors.fetch_add(1, Ordering::Relaxed) == 0 {
                log::warn!(
                    "virtio-net {}: cannot send a frame: {e} (later failures are counted)",
                    backend.name()
                );
            }
        }
    }
}

/// Checks a transmit chain and copies it into `frame`; the frame's length
/// (header included).
fn gather_tx_chain(
    mem: &GuestMemoryMmap,
    chain: &[Descriptor],
    frame: &mut [u8],
) -> Result<usize, ChainError> {
    let mut len = 0usize;
    for d in chain {
        if d.is_write_only() {
            return Err(ChainError::WriteOnly);
        }
        in_memory(mem, d)?;
        let end = len
            .checked_add(d.len() as usize)
            .filter(|&end| end <= frame.len())
            .ok_or(ChainError::Oversized)?;
        mem.read_slice(&mut frame[len..end], d.addr())
            .map_err(|_| ChainError::OutsideMemory {
                addr: d.addr().raw_value(),
                len: d.len(),
            })?;
        len = end;
    }
    if len < VNET_HDR_LEN {
        return Err(ChainError::MissingHeader(len));
    }
    if len - VNET_HDR_LEN < ETH_HLEN {
        return Err(ChainError::Runt(len - VNET_HDR_LEN));
    }
    Ok(len)
}
