//! Receive: frames from the backend into the guest's receive chains.

use std::io;
use std::sync::atomic::Ordering;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{in_memory, ChainError, RxOutcome, Worker};
use crate::devices::tap::VNET_HDR_LEN;
use crate::devices::virtio::net::{ETH_HLEN, MAX_BUFFER_LEN, NUM_BUFFERS_OFFSET, RX_BUDGET};
use crate::devices::virtio::queue::{Broken, Work};

impl Worker {
    /// Moves frames from the backend into the guest's receive buffers
    /// until the backend has none, the guest has no room, or the budget
    /// is spent ([`Work::More`]).
    pub(crate) fn process_rx(&mut self) -> Work {
        if self.broken {
            return Work::Done;
        }
        let mut delivered = false;
        let mut budget = RX_BUDGET;
        let mut work = Work::Done;
        loop {
            if self.rx_len == 0 {
                if budget == 0 {
                    work = Work::More;
                    break;
                }
                if !self.read_backend() {
                    break;
                }
                budget -= 1;
                if self.rx_len == 0 {
                    // Dropped (runt or truncated): read the next one.
                    continue;
                }
            }
            match self.deliver_rx() {
                Ok(RxOutcome::Delivered) => {
                    self.rx_len = 0;
                    delivered = true;
                }
                Ok(RxOutcome::Dropped) => {
                    self.rx_len = 0;
                    // Bad chains were returned to the used ring.
                    delivered = true;
                }
                Ok(RxOutcome::NoBuffers) => match self.wait_for_rx_buffers() {
                    // Buffers arrived meanwhile: try again.
                    Ok(true) => {}
                    Ok(false) => {
                        // Until the guest adds buffers and notifies, leave
                        // further frames in the kernel's bounded queue.
                        self.watch_backend(false);
                        break;
                    }
                    Err(why) => {
                        self.fail(&why);
                        return Work::Done;
                    }
                },
                Err(why) => {
                    self.fail(&why);
                    return Work::Done;
                }
            }
        }
        if delivered {
            self.rx.notify_driver(&self.mem, &self.interrupt);
        }
        work
    }

    /// Reads the next frame into `rx_frame`; false when there is none (or
    /// the backend failed).
    fn read_backend(&mut self) -> bool {
        if self.backend_detached {
            return false;
        }
        match self.backend.read_frame(&mut self.rx_frame) {
            Ok(n) if n > MAX_BUFFER_LEN => {
                // Truncated: longer than any frame a guest can take.
                self.counters.rx_dropped.fetch_add(1, Ordering::Relaxed);
                true
            }
            Ok(n) if n < VNET_HDR_LEN + ETH_HLEN => {
                self.counters.rx_dropped.fetch_add(1, Ordering::Relaxed);
                true
            }
            Ok(n) => {
                self.rx_len = n;
                true
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // Drained: wait for the next frame.
                self.watch_backend(true);
                false
            }
            Err(e) => {
                self.counters.rx_errors.fetch_add(1, Ordering::Relaxed);
                self.detach_backend(&format!("read failed: {e}"));
                false
            }
        }
    }

    /// Copies the waiting frame into receive chains.
    fn deliver_rx(&mut self) -> Result<RxOutcome, Broken> {
        let mem = &self.mem;
        let available = self.rx.available(mem)?;
        if available == 0 {
            return Ok(RxOutcome::NoBuffers);
        }
        let start = self.rx.queue.next_avail();
        let len = self.rx_len;
        self.rx_chains.clear();
        self.rx_segments.clear();
        let mut capacity = 0usize;
        while capacity < len {
            let Some((head, chain)) = self.rx.pop(mem) else {
                break;
            };
            let gathered = chain.map_err(ChainError::from).and_then(|descs| {
                gather_rx_chain(mem, descs, len - capacity, &mut self.rx_segments)
            });
            match gathered {
                Ok(room) => {
                    self.rx_chains.push((head, room));
                    capacity += room as usize;
                }
                Err(e) => {
                    // A chain the guest got wrong: it and those taken for
                    // this frame go back empty, the frame is dropped.
                    self.counters.rx_malformed.fetch_add(1, Ordering::Relaxed);
                    self.counters.rx_dropped.fetch_add(1, Ordering::Relaxed);
                    self.problems.report(format_args!(
                        "virtio-net {}: receive chain dropped: {e}",
                        self.backend.name()
                    ));
                    self.rx_chains.push((head, 0));
                    for &(head, _) in &self.rx_chains {
                        self.rx.add_used(mem, head, 0);
                    }
                    return Ok(RxOutcome::Dropped);
                }
            }
            if !self.mergeable {
                break;
            }
        }
        if capacity < len {
            let taken = self.rx_chains.len();
            // Put the chains back: nothing was written that the guest
            // can see, they stay on the available ring.
            self.rx.queue.set_next_avail(start);
            let never_fits = !self.mergeable || taken >= usize::from(self.rx.queue.size());
            if never_fits {
                // One chain (or the whole ring) is too small for this
                // frame: waiting would never help.
                self.counters.rx_dropped.fetch_add(1, Ordering::Relaxed);
                return Ok(RxOutcome::Dropped);
            }
            return Ok(RxOutcome::NoBuffers);
        }

        // The frame fits: tell the driver how many buffers it spans, copy,
        // and return the chains in order (a mergeable frame's buffers are
        // consecutive used entries).
        let buffers = u16::try_from(self.rx_chains.len()).unwrap_or(u16::MAX);
        self.rx_frame[NUM_BUFFERS_OFFSET..NUM_BUFFERS_OFFSET + 2]
            .copy_from_slice(&buffers.to_le_bytes());
        let mut offset = 0usize;
        for &(addr, seg_len) in &self.rx_segments {
            let n = (seg_len as usize).min(len - offset);
            if let Err(e) = mem.write_slice(&self.rx_frame[offset..offset + n], addr) {
                // Checked against guest memory while gathering, so this
                // does not happen; the guest then sees garbage, not vmlab.
                log::debug!("virtio-net: receive copy failed: {e}");
            }
            offset += n;
            if offset == len {
                break;
            }
        }
        let mut left = len;
        for &(head, room) in &self.rx_chains {
            let n = left.min(room as usize);
            // n <= room, a u32.
            self.rx.add_used(mem, head, n as u32);
            left -= n;
        }
        self.counters.rx_frames.fetch_add(1, Ordering::Relaxed);
        self.counters
            .rx_bytes
            .fetch_add((len - VNET_HDR_LEN) as u64, Ordering::Relaxed);
        Ok(RxOutcome::Delivered)
    }

    /// Asks the driver to notify the receive queue as soon as it adds a
    /// buffer; true if one arrived meanwhile (look again).
    ///
    /// With event-idx the driver notifies when the available index passes
    /// `avail_event`. virtio-queue sets that to the next chain the device
    /// will take, which is right when the ring is empty; when it holds
    /// chains too small for the waiting frame, the driver would never
    /// notify again. So `avail_event` is set to the current available
    /// index: the next buffer added is the one that may make the frame fit.
    fn wait_for_rx_buffers(&mut self) -> Result<bool, Broken> {
        let mem = &self.mem;
        let q = &mut self.rx.queue;
        let avail = q
            .avail_idx(mem, Ordering::Acquire)
            .map_err(|e| Broken(format!("cannot read the receive ring: {e}")))?
            .0;
        let next = q.next_avail();
        q.set_next_avail(avail);
        let more = q.enable_notification(mem);
        q.set_next_avail(next);
        more.map_err(|e| Broken(format!("cannot update the receive ring: {e}")))
    }
}

/// Checks a receive chain and appends its writable descriptors to
/// `segments`, stopping once `wanted` bytes are covered (so `segments`
/// stays bounded by the frame length). Returns the room counted.
fn gather_rx_chain(
    mem: &GuestMemoryMmap,
    chain: &[Descriptor],
    wanted: usize,
    segments: &mut Vec<(GuestAddress, u32)>,
) -> Result<u32, ChainError> {
    let mut room = 0u32;
    for d in chain {
        if !d.is_write_only() {
            return Err(ChainError::ReadOnly);
        }
        in_memory(mem, d)?;
        if (room as usize) < wanted && d.len() > 0 {
            segments.push((d.addr(), d.len()));
            room = room.saturating_add(d.len());
        }
    }
    if room == 0 {
        return Err(ChainError::NoRoom);
    }
    Ok(room)
}
