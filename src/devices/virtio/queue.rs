//! The queue plumbing every virtio device uses, written once.
//!
//! A device's worker owns one [`VirtQueue`] per queue. It takes chains
//! with [`VirtQueue::serve`] (or, for a device that decides how many
//! chains a unit of work needs, virtio-net's receive path,
//! [`VirtQueue::pop`]), returns them with [`VirtQueue::add_used`] and
//! interrupts the driver with [`VirtQueue::notify_driver`], which honours
//! VIRTIO_RING_F_EVENT_IDX. What the guest controls is checked here:
//!
//! - the available index: more than a ring's worth ahead of the device
//!   means the driver corrupted it; [`Broken`] is returned and the device
//!   asks for a reset (DEVICE_NEEDS_RESET) instead of spinning;
//! - each chain: head and next indices inside the descriptor table, at
//!   most the device's descriptor limit per chain (which also ends a
//!   loop), no indirect descriptors (VIRTIO_RING_F_INDIRECT_DESC is never
//!   offered, so a driver that uses them is broken and the chain is
//!   refused, not followed);
//! - each descriptor's buffer inside guest RAM ([`in_memory`]).
//!
//! The chain walk is vmlab's own rather than virtio-queue's
//! `DescriptorChain` iterator because that iterator silently follows
//! indirect tables and has no per-device length limit.
//!
//! [`LogLimit`] is the "first problem at WARN, the rest counted at debug
//! level" rule, so a hostile driver cannot flood the host's log.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::{DeviceQueue, Interrupt};

/// Size of one descriptor table entry (virtio 1.x 2.7.5).
const DESC_SIZE: u64 = 16;

/// Chains a queue serves per wake-up before it yields to the device's
/// other queues (and is called again by the device thread).
pub const QUEUE_BUDGET: usize = 64;

/// What a queue handler left behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Work {
    /// Nothing more to do until the next notification.
    Done,
    /// The budget ran out with work left: call again after the others.
    More,
}

impl Work {
    /// `More` if either has more.
    pub fn or(self, other: Work) -> Work {
        if self == Work::More || other == Work::More {
            Work::More
        } else {
            Work::Done
        }
    }
}

/// The driver corrupted a ring; the device stops until it is reset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broken(pub String);

impl fmt::Display for Broken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why a chain could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// A head or next index past the descriptor table.
    #[error("descriptor index {index} is outside the {size}-entry table")]
    BadIndex {
        /// The index.
        index: u16,
        /// The queue size.
        size: u16,
    },
    /// More descriptors than the device takes in one chain (or a loop).
    #[error(
        "the chain does not end within {0} descriptors (a loop, or longer than the device accepts)"
    )]
    TooLong(usize),
    /// VIRTQ_DESC_F_INDIRECT on a device that never offered it.
    #[error("an indirect descriptor (VIRTIO_RING_F_INDIRECT_DESC is not offered)")]
    Indirect,
    /// The descriptor table entry cannot be read.
    #[error("descriptor {0} cannot be read")]
    Unreadable(u16),
}

/// Checks that `d`'s buffer lies in guest RAM.
pub fn in_memory(mem: &GuestMemoryMmap, d: &Descriptor) -> bool {
    usize::try_from(d.len()).is_ok_and(|len| GuestMemoryBackend::check_range(mem, d.addr(), len))
}

/// Reads the chain whose head is `head` from `queue`'s descriptor table
/// into `out` (cleared first), at most `max` descriptors.
pub fn read_chain(
    mem: &GuestMemoryMmap,
    queue: &Queue,
    head: u16,
    max: usize,
    out: &mut Vec<Descriptor>,
) -> Result<(), ChainError> {
    out.clear();
    let size = queue.size();
    let table = GuestAddress(queue.desc_table());
    let mut index = head;
    loop {
        if index >= size {
            return Err(ChainError::BadIndex { index, size });
        }
        if out.len() == max {
            return Err(ChainError::TooLong(max));
        }
        let addr = table
            .checked_add(u64::from(index) * DESC_SIZE)
            .ok_or(ChainError::Unreadable(index))?;
        let desc: Descriptor = mem
            .read_obj(addr)
            .map_err(|_| ChainError::Unreadable(index))?;
        if desc.flags() & VRING_DESC_F_INDIRECT as u16 != 0 {
            return Err(ChainError::Indirect);
        }
        out.push(desc);
        if desc.flags() & VRING_DESC_F_NEXT as u16 == 0 {
            return Ok(());
        }
        index = desc.next();
    }
}

/// "Log the first at WARN, count the rest": a guest that repeats a
/// mistake costs one log line at the default level, however often it
/// repeats it. Shared (atomics) by a device and its workers, so it also
/// survives device resets.
#[derive(Debug, Default)]
pub struct LogLimit {
    count: AtomicU64,
}

impl LogLimit {
    /// Counts one problem; logs it at WARN if it is the first, else at
    /// debug level.
    pub fn report(&self, what: fmt::Arguments<'_>) {
        if self.count.fetch_add(1, Ordering::Relaxed) == 0 {
            log::warn!(
                "{what} (later problems of this kind are counted and logged at debug level)"
            );
        } else {
            log::debug!("{what}");
        }
    }

    /// Problems reported so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

/// One queue of an activated device, on its worker thread.
pub struct VirtQueue {
    /// The split virtqueue.
    pub queue: Queue,
    notify: Arc<EventFd>,
    max_chain: usize,
    descs: Vec<Descriptor>,
}

impl VirtQueue {
    /// The queue the transport handed over; chains longer than
    /// `max_chain` descriptors are refused.
    pub fn new(queue: DeviceQueue, max_chain: usize) -> VirtQueue {
        VirtQueue {
            queue: queue.queue,
            notify: queue.notify,
            max_chain,
            descs: Vec::with_capacity(max_chain),
        }
    }

    /// The notification eventfd (the device thread watches it).
    pub fn notify_fd(&self) -> &Arc<EventFd> {
        &self.notify
    }

    /// Consumes a pending notification. Called before the queue is
    /// served, so that one arriving meanwhile wakes the thread again.
    pub fn ack_notification(&self) {
        let _ = self.notify.read();
    }

    /// Chains on the available ring not taken yet; an index more than a
    /// ring ahead means the driver corrupted it.
    pub fn available(&self, mem: &GuestMemoryMmap) -> Result<u16, Broken> {
        let avail = self
            .queue
            .avail_idx(mem, Ordering::Acquire)
            .map_err(|e| Broken(format!("cannot read the available ring: {e}")))?
            .0;
        let pending = avail.wrapping_sub(self.queue.next_avail());
        if pending > self.queue.size() {
            return Err(Broken(format!(
                "the available index ran {pending} entries ahead of a {}-entry ring",
                self.queue.size()
            )));
        }
        Ok(pending)
    }

    /// Takes the next available chain: its head index and its
    /// descriptors (or why they cannot be used; the chain must still be
    /// returned with [`add_used`](Self::add_used)).
    pub fn pop(
        &mut self,
        mem: &GuestMemoryMmap,
    ) -> Option<(u16, Result<&[Descriptor], ChainError>)> {
        let head = self.queue.pop_descriptor_chain(mem)?.head_index();
        let chain = read_chain(mem, &self.queue, head, self.max_chain, &mut self.descs)
            .map(|()| self.descs.as_slice());
        Some((head, chain))
    }

    /// Returns a chain to the driver with `len` bytes written.
    pub fn add_used(&mut self, mem: &GuestMemoryMmap, head: u16, len: u32) {
        if let Err(e) = self.queue.add_used(mem, head, len) {
            // Only a head index past the ring gets here (its chain was
            // refused and counted); it cannot be returned: the driver's
            // bookkeeping is broken, the device is not.
            log::debug!("virtio: cannot return descriptor {head}: {e}");
        }
    }

    /// Interrupts the driver for new used buffers unless event-idx says
    /// it does not want to hear about them yet.
    pub fn notify_driver(&mut self, mem: &GuestMemoryMmap, interrupt: &Interrupt) {
        match self.queue.needs_notification(mem) {
            Ok(false) => {}
            // Cannot read used_event: interrupting too often is harmless.
            Ok(true) | Err(_) => interrupt.signal_used_buffer(),
        }
    }

    /// Serves up to `budget` available chains: `f` gets each chain's
    /// descriptors (or why they are unusable) and returns the used
    /// length; the chain is then returned and the driver interrupted as
    /// event-idx asks. [`Work::More`] when the budget ran out with chains
    /// left.
    pub fn serve<F>(
        &mut self,
        mem: &GuestMemoryMmap,
        interrupt: &Interrupt,
        budget: usize,
        mut f: F,
    ) -> Result<Work, Broken>
    where
        F: FnMut(Result<&[Descriptor], ChainError>) -> u32,
    {
        let mut served = 0usize;
        let result = loop {
            if let Err(e) = self.queue.disable_notification(mem) {
                break Err(Broken(format!("cannot update the used ring: {e}")));
            }
            if let Err(e) = self.available(mem) {
                break Err(e);
            }
            while served < budget {
                let Some((head, chain)) = self.pop(mem) else {
                    break;
                };
                served += 1;
                let len = f(chain);
                self.add_used(mem, head, len);
            }
            if served == budget {
                // Notifications stay off: the thread comes back.
                break Ok(if self.available(mem)? > 0 {
                    Work::More
                } else {
                    // Nothing left after all: wait for the driver.
                    match self.queue.enable_notification(mem) {
                        Ok(true) => Work::More,
                        Ok(false) => Work::Done,
                        Err(e) => {
                            break Err(Broken(format!("cannot read the available ring: {e}")))
                        }
                    }
                });
            }
            match self.queue.enable_notification(mem) {
                Ok(false) => break Ok(Work::Done),
                // Added while notifications were off: take them too.
                Ok(true) => {}
                Err(e) => break Err(Broken(format!("cannot read the available ring: {e}"))),
            }
        };
        if served > 0 {
            self.notify_driver(mem, interrupt);
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::MockDriver;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    const NEXT: u16 = VRING_DESC_F_NEXT as u16;
    const INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn vq(driver: &MockDriver<'_>, max_chain: usize) -> VirtQueue {
        let mut queue = driver.queue();
        queue.set_event_idx(false);
        VirtQueue::new(
            DeviceQueue {
                queue,
                notify: Arc::new(EventFd::new(EFD_NONBLOCK).unwrap()),
            },
            max_chain,
        )
    }

    #[test]
    fn chains_are_read_and_limited() {
        let mem = memory();
        let mut d = MockDriver::new(&mem, 0x1000, 16);
        d.submit(&[(0x8000, 16, 0), (0x9000, 1, 2)]);
        let long: Vec<(u64, u32, u16)> = (0..5).map(|i| (0x8000 + i * 16, 16, 0)).collect();
        d.submit(&long);
        let mut q = vq(&d, 4);
        let (_, chain) = q.pop(&mem).unwrap();
        assert_eq!(chain.unwrap().len(), 2);
        let (_, chain) = q.pop(&mem).unwrap();
        assert_eq!(chain.unwrap_err(), ChainError::TooLong(4));
    }

    #[test]
    fn indirect_descriptors_are_refused() {
        let mem = memory();
        let mut d = MockDriver::new(&mem, 0x1000, 16);
        // A well-formed indirect table of two descriptors at 0x20000.
        mem.write_obj(Descriptor::new(0x8000, 16, NEXT, 1), GuestAddress(0x2_0000))
            .unwrap();
        mem.write_obj(Descriptor::new(0x9000, 1, 2, 0), GuestAddress(0x2_0010))
            .unwrap();
        d.store(0, 0x2_0000, 32, INDIRECT, 0);
        d.publish(0);
        let mut q = vq(&d, 16);
        let (head, chain) = q.pop(&mem).unwrap();
        assert_eq!(head, 0);
        assert_eq!(chain.unwrap_err(), ChainError::Indirect);
    }

    #[test]
    fn loops_and_bad_indices_end() {
        let mem = memory();
        let mut d = MockDriver::new(&mem, 0x1000, 4);
        d.store(0, 0x8000, 16, NEXT, 1);
        d.store(1, 0x8000, 16, NEXT, 0);
        d.publish(0);
        d.store(2, 0x8000, 16, NEXT, 9);
        d.publish(2);
        let mut q = vq(&d, 4);
        assert_eq!(q.pop(&mem).unwrap().1.unwrap_err(), ChainError::TooLong(4));
        assert_eq!(
            q.pop(&mem).unwrap().1.unwrap_err(),
            ChainError::BadIndex { index: 9, size: 4 }
        );
    }

    #[test]
    fn serve_yields_after_its_budget() {
        let mem = memory();
        let mut d = MockDriver::new(&mem, 0x1000, 16);
        for i in 0..10 {
            d.submit(&[(0x8000 + i * 16, 16, 0)]);
        }
        let mut q = vq(&d, 4);
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let interrupt = Interrupt::new(irq.try_clone().unwrap());
        let mut seen = 0;
        assert_eq!(
            q.serve(&mem, &interrupt, 4, |_| {
                seen += 1;
                0
            }),
            Ok(Work::More)
        );
        assert_eq!(seen, 4);
        assert_eq!(d.used_idx(), 4);
        assert_eq!(irq.read().unwrap(), 1, "the served chains are announced");
        assert_eq!(q.serve(&mem, &interrupt, 4, |_| 0), Ok(Work::More));
        assert_eq!(q.serve(&mem, &interrupt, 4, |_| 0), Ok(Work::Done));
        assert_eq!(d.used_idx(), 10);
    }

    #[test]
    fn corrupt_available_index_breaks_the_queue() {
        let mem = memory();
        let d = MockDriver::new(&mem, 0x1000, 16);
        d.set_avail_idx(100);
        let mut q = vq(&d, 4);
        let interrupt = Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let mut calls = 0;
        let r = q.serve(&mem, &interrupt, 64, |_| {
            calls += 1;
            0
        });
        assert!(r.is_err());
        assert_eq!(calls, 0);
    }

    #[test]
    fn log_limit_counts() {
        let limit = LogLimit::default();
        for i in 0..1000 {
            limit.report(format_args!("problem {i}"));
        }
        assert_eq!(limit.count(), 1000);
    }
}
