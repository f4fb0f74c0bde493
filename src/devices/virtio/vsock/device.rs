//! The virtio-vsock device: what the transport sees (type 19, three
//! queues, the guest CID in the configuration space), and the worker that
//! runs on the device's own thread once the driver starts the device.
//!
//! The worker is thin glue: transmit chains are checked and read
//! ([`packet::read_tx_chain`]) and handed to the [`Muxer`]; receive chains
//! are checked ([`packet::gather_rx_chain`]) and filled with what the
//! muxer has for the guest. The muxer's epoll (host streams, listener) is
//! one more fd in the device thread's epoll set (a nested epoll, as in
//! Firecracker): host streams need write interest too, which the thread's
//! set does not offer.

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::muxer::Muxer;
use super::packet::{self, PacketError, HDR_LEN, MAX_PAYLOAD};
use super::unix::HostSocket;
use super::{Counters, VsockConfig, VsockHandle};
use crate::devices::virtio::device::{Activation, Device, DeviceModel};
use crate::devices::virtio::queue::{Broken, LogLimit, VirtQueue, Work, QUEUE_BUDGET};
use crate::devices::virtio::thread::{self, DeviceWorker, EpollSet};
use crate::devices::virtio::{
    feature, ActivateError, Interrupt, VIRTIO_F_VERSION_1, VIRTIO_ID_VSOCK, VIRTIO_RING_F_EVENT_IDX,
};

/// Entries of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Queue indices.
pub const RX_QUEUE: usize = 0;
/// Transmit (guest to host).
pub const TX_QUEUE: usize = 1;
/// Events (device to driver; vmlab sends none).
pub const EVENT_QUEUE: usize = 2;
/// Most descriptors in one chain (Linux uses two: header and payload).
pub const MAX_CHAIN: usize = 64;
/// Name of the device's thread.
pub const THREAD_NAME: &str = "virtio-vsock";

const TOKEN_RX: u64 = 0;
const TOKEN_TX: u64 = 1;
const TOKEN_EVENT: u64 = 2;
const TOKEN_MUXER: u64 = 3;

/// The virtio-vsock device.
pub type Vsock = Device<VsockModel>;

/// virtio-vsock's own state: the guest CID, the host socket, the counters.
pub struct VsockModel {
    cid: u64,
    socket: Arc<HostSocket>,
    counters: Arc<Counters>,
    problems: Arc<LogLimit>,
}

impl Device<VsockModel> {
    /// Listens on `config.socket` (see [`HostSocket::bind`]) and starts
    /// the device's thread, which serves it once the driver starts the
    /// device. Host programs may connect at once: they wait in the listen
    /// backlog until the guest's driver is up.
    pub fn open(config: &VsockConfig) -> Result<Vsock, crate::devices::virtio::Error> {
        let model = VsockModel {
            cid: config.cid,
            socket: Arc::new(HostSocket::bind(&config.socket)?),
            counters: Arc::default(),
            problems: Arc::default(),
        };
        Ok(Device::new(
            model,
            feature(VIRTIO_F_VERSION_1) | feature(VIRTIO_RING_F_EVENT_IDX),
            // struct virtio_vsock_config { le64 guest_cid; }
            config.cid.to_le_bytes().to_vec(),
            vec![QUEUE_SIZE; 3],
        )?)
    }

    /// Socket and counters, for the VMM.
    pub fn handle(&self) -> VsockHandle {
        let m = self.model();
        VsockHandle {
            cid: m.cid,
            socket: m.socket.clone(),
            counters: m.counters.clone(),
        }
    }
}

impl DeviceModel for VsockModel {
    const NAME: &'static str = THREAD_NAME;

    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn start(&mut self, a: Activation) -> Result<Box<dyn DeviceWorker>, ActivateError> {
        let mut queues = a.queues.into_iter();
        let (Some(rx), Some(tx), Some(ev)) = (queues.next(), queues.next(), queues.next()) else {
            return Err(ActivateError::QueueNotReady { index: EVENT_QUEUE });
        };
        for (index, q) in [(RX_QUEUE, &rx), (TX_QUEUE, &tx)] {
            if !q.queue.ready() {
                return Err(ActivateError::QueueNotReady { index });
            }
        }
        // A reset dropped the previous worker, and with it every
        // connection (host streams close), as a transport reset does.
        let muxer = Muxer::new(
            self.cid,
            self.socket.clone(),
            self.counters.clone(),
            self.problems.clone(),
        )
        .map_err(|source| thread::Error::Setup {
            name: THREAD_NAME.into(),
            what: "the connection epoll",
            source,
        })?;
        Ok(Box::new(Worker::new(
            a.mem,
            VirtQueue::new(rx, MAX_CHAIN),
            VirtQueue::new(tx, MAX_CHAIN),
            ev.notify,
            a.interrupt,
            muxer,
            self.counters.clone(),
            self.problems.clone(),
        )))
    }
}

/// The activated device. Lives on the device's thread.
pub(crate) struct Worker {
    mem: GuestMemoryMmap,
    rx: VirtQueue,
    tx: VirtQueue,
    /// The event queue's notifications (read and ignored).
    event_notify: Arc<EventFd>,
    interrupt: Arc<Interrupt>,
    pub(crate) muxer: Muxer,
    counters: Arc<Counters>,
    /// A transmit chain read. Allocated once.
    tx_buf: Box<[u8]>,
    /// A payload for the guest. Allocated once.
    rx_buf: Box<[u8]>,
    /// The descriptors of the receive chain being filled. Reused.
    segments: Vec<(GuestAddress, u32)>,
    /// The driver corrupted a ring; nothing is served until reset.
    broken: bool,
    /// Transmit chains wait because too many RSTs wait for receive
    /// buffers.
    tx_stalled: bool,
    /// The last transmit pass spent its budget with chains left (the
    /// queue's notifications stay off): the next call serves it, whatever
    /// token the thread calls it under.
    tx_yielded: bool,
    /// Malformed chains and packets (shared with the device, so the count
    /// survives resets): the first is logged at warn level.
    problems: Arc<LogLimit>,
}

impl DeviceWorker for Worker {
    fn register(&mut self, fds: &mut EpollSet<'_>) -> io::Result<()> {
        fds.add(&**self.rx.notify_fd(), TOKEN_RX)?;
        fds.add(&**self.tx.notify_fd(), TOKEN_TX)?;
        fds.add(&*self.event_notify, TOKEN_EVENT)?;
        let muxer_fd: RawFd = self.muxer.epoll_fd();
        fds.add(&muxer_fd, TOKEN_MUXER)
    }

    fn handle(&mut self, token: u64, _fds: &mut EpollSet<'_>) -> Work {
        self.run(token)
    }

    fn interrupt(&self) -> &Interrupt {
        &self.interrupt
    }
}

impl Worker {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        mem: GuestMemoryMmap,
        rx: VirtQueue,
        tx: VirtQueue,
        event_notify: Arc<EventFd>,
        interrupt: Arc<Interrupt>,
        muxer: Muxer,
        counters: Arc<Counters>,
        problems: Arc<LogLimit>,
    ) -> Worker {
        Worker {
            mem,
            rx,
            tx,
            event_notify,
            interrupt,
            muxer,
            counters,
            tx_buf: vec![0; HDR_LEN + MAX_PAYLOAD].into_boxed_slice(),
            rx_buf: vec![0; MAX_PAYLOAD].into_boxed_slice(),
            segments: Vec::with_capacity(MAX_CHAIN),
            broken: false,
            tx_stalled: false,
            tx_yielded: false,
            problems,
        }
    }

    /// Serves what `token` reports, then whatever that made possible.
    pub(crate) fn run(&mut self, token: u64) -> Work {
        let mut work = match token {
            TOKEN_RX => {
                // Consumed first: a notification during the work wakes the
                // thread again, never gets lost.
                self.rx.ack_notification();
                Work::Done
            }
            TOKEN_TX => {
                self.tx.ack_notification();
                self.process_tx()
            }
            TOKEN_EVENT => {
                let _ = self.event_notify.read();
                Work::Done
            }
            TOKEN_MUXER => self.muxer.process_host_events(),
            _ => Work::Done,
        };
        work = work.or(self.process_rx());
        // Transmit resumes here, under whichever token woke the thread:
        // after a stall once the guest took the waiting RSTs, and after a
        // yield, which the thread reports under the token of the call that
        // yielded (the RX or muxer token when a resumed stall yielded).
        // The driver does not notify a queue that yielded, so a yield
        // left to the transmit token alone would stop transmit for good.
        let resume = self.tx_stalled && !self.muxer.stalls_tx();
        if resume || self.tx_yielded && token != TOKEN_TX {
            self.tx_stalled = false;
            work = work.or(self.process_tx()).or(self.process_rx());
        }
        self.muxer.apply_interests();
        work
    }

    /// Takes up to [`QUEUE_BUDGET`] transmit chains (fewer when RSTs wait
    /// for receive buffers: each packet may need one) and hands their
    /// packets to the muxer.
    pub(crate) fn process_tx(&mut self) -> Work {
        self.tx_yielded = false;
        if self.broken {
            return Work::Done;
        }
        let budget = QUEUE_BUDGET.min(self.muxer.rst_room());
        if budget == 0 {
            // Notifications stay off: transmit resumes once the guest has
            // taken receive buffers.
            self.tx_stalled = true;
            return Work::Done;
        }
        let Worker {
            mem,
            tx,
            interrupt,
            muxer,
            counters,
            tx_buf,
            problems,
            ..
        } = self;
        let served = tx.serve(mem, interrupt, budget, |chain| {
            match chain
                .map_err(PacketError::from)
                .and_then(|descs| packet::read_tx_chain(mem, descs, tx_buf))
            {
                Ok((hdr, len)) => {
                    counters.tx_packets.fetch_add(1, Ordering::Relaxed);
                    muxer.handle_guest_packet(&hdr, &tx_buf[HDR_LEN..HDR_LEN + len]);
                }
                Err(e) => {
                    counters.malformed.fetch_add(1, Ordering::Relaxed);
                    problems.report(format_args!("virtio-vsock: transmit chain dropped: {e}"));
                }
            }
            // The device writes nothing into a transmit chain.
            0
        });
        let work = match served {
            Ok(work) => work,
            Err(why) => {
                self.fail(&why);
                Work::Done
            }
        };
        self.tx_yielded = work == Work::More;
        work
    }

    /// Fills up to [`QUEUE_BUDGET`] receive chains with what the muxer has
    /// for the guest.
    pub(crate) fn process_rx(&mut self) -> Work {
        if self.broken {
            return Work::Done;
        }
        if let Err(why) = self.rx.available(&self.mem) {
            self.fail(&why);
            return Work::Done;
        }
        let mut used = 0usize;
        let mut rearmed = false;
        while self.muxer.has_rx() && used < QUEUE_BUDGET {
            let Some((head, chain)) = self.rx.pop(&self.mem) else {
                // No buffer: ask the driver to notify when it adds one.
                match self.rx.queue.enable_notification(&self.mem) {
                    Ok(true) if !rearmed => {
                        rearmed = true;
                        continue;
                    }
                    Ok(_) => break,
                    Err(e) => {
                        self.fail(&Broken(format!("cannot update the receive ring: {e}")));
                        return Work::Done;
                    }
                }
            };
            let room = chain
                .map_err(PacketError::from)
                .and_then(|descs| packet::gather_rx_chain(&self.mem, descs, &mut self.segments));
            let room = match room {
                Ok(room) => room,
                Err(e) => {
                    self.counters.rx_malformed.fetch_add(1, Ordering::Relaxed);
                    self.problems.report(format_args!(
                        "virtio-vsock: receive chain returned empty: {e}"
                    ));
                    self.rx.add_used(&self.mem, head, 0);
                    used += 1;
                    continue;
                }
            };
            let Some((hdr, len)) = self
                .muxer
                .fill_rx(Muxer::payload_room(room), &mut self.rx_buf)
            else {
                // Nothing after all (a host stream had no bytes): the
                // chain goes back on the ring untouched.
                let next = self.rx.queue.next_avail().wrapping_sub(1);
                self.rx.queue.set_next_avail(next);
                break;
            };
            let header = hdr.to_bytes();
            let n =
                packet::write_segments(&self.mem, &self.segments, &[&header, &self.rx_buf[..len]]);
            // n <= HDR_LEN + MAX_PAYLOAD.
            self.rx.add_used(&self.mem, head, n as u32);
            self.counters.rx_packets.fetch_add(1, Ordering::Relaxed);
            used += 1;
        }
        if used > 0 {
            self.rx.notify_driver(&self.mem, &self.interrupt);
        }
        if used == QUEUE_BUDGET && self.muxer.has_rx() {
            Work::More
        } else {
            Work::Done
        }
    }

    fn fail(&mut self, why: &Broken) {
        self.problems.report(format_args!(
            "virtio-vsock: {why}; the device stops until the guest resets it"
        ));
        self.broken = true;
        self.interrupt.signal_needs_reset();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::{MockDriver as Driver, XorShift};
    use crate::devices::virtio::vsock::connection::CONN_BUF_SIZE;
    use crate::devices::virtio::vsock::muxer::MAX_PENDING_RST;
    use crate::devices::virtio::vsock::packet::{Header, Op, SHUTDOWN_BOTH, TYPE_STREAM};
    use crate::devices::virtio::vsock::VsockStats;
    use crate::devices::virtio::{DeviceQueue, VirtioDevice};
    use std::io::{Read, Write};
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::path::PathBuf;
    use vm_memory::Bytes;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    const WRITE: u16 = 2;
    const MEM_SIZE: u64 = 0x100_0000;
    const RXQ_ADDR: u64 = 0x1000;
    const TXQ_ADDR: u64 = 0x1_0000;
    const EVQ_ADDR: u64 = 0x2_0000;
    const QSIZE: u16 = 64;
    /// Receive buffers: one per descriptor index, header + 4 KiB like
    /// Linux's.
    const RX_BUF_ADDR: u64 = 0x10_0000;
    const RX_SLOT: u64 = 0x1100;
    const RX_BUF_LEN: u32 = (HDR_LEN + 4096) as u32;
    /// Transmit packets.
    const TX_BUF_ADDR: u64 = 0x80_0000;
    const GUEST_CID: u64 = 3;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
    }

    /// A socket path unique to the test, removed first.
    fn socket_path(tag: &str) -> PathBuf {
        let p =
            std::env::temp_dir().join(format!("vmlab-vsock-dev-{}-{tag}.sock", std::process::id()));
        let _ = std::fs::remove_file(&p);
        p
    }

    /// The driver side: both queues, the guest's packets, and what the
    /// device put in the receive buffers.
    struct Guest<'a> {
        mem: &'a GuestMemoryMmap,
        rx: Driver<'a>,
        tx: Driver<'a>,
        tx_next: u64,
        seen: u16,
    }

    impl<'a> Guest<'a> {
        fn new(mem: &'a GuestMemoryMmap) -> Guest<'a> {
            Guest {
                mem,
                rx: Driver::new(mem, RXQ_ADDR, QSIZE),
                tx: Driver::new(mem, TXQ_ADDR, QSIZE),
                tx_next: TX_BUF_ADDR,
                seen: 0,
            }
        }

        fn worker(&self, socket: &std::path::Path) -> (Worker, Arc<Counters>) {
            let socket = Arc::new(HostSocket::bind(socket).unwrap());
            let counters = Arc::new(Counters::default());
            let problems = Arc::new(LogLimit::default());
            let muxer = Muxer::new(GUEST_CID, socket, counters.clone(), problems.clone()).unwrap();
            let efd = || Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
            let irq = EventFd::new(EFD_NONBLOCK).unwrap();
            let vq = |queue| {
                VirtQueue::new(
                    DeviceQueue {
                        queue,
                        notify: efd(),
                    },
                    MAX_CHAIN,
                )
            };
            let w = Worker::new(
                self.mem.clone(),
                vq(self.rx.queue()),
                vq(self.tx.queue()),
                efd(),
                Arc::new(Interrupt::new(irq)),
                muxer,
                counters.clone(),
                problems,
            );
            (w, counters)
        }

        /// Room in guest memory for `len` bytes of a transmit packet.
        fn tx_room(&mut self, len: u64) -> u64 {
            if self.tx_next + len > MEM_SIZE {
                self.tx_next = TX_BUF_ADDR;
            }
            let a = self.tx_next;
            self.tx_next += (len + 15) & !15;
            a
        }

        /// Submits header + payload as two descriptors (as Linux does).
        fn send(&mut self, w: &mut Worker, hdr: Header, payload: &[u8]) {
            let a = self.tx_room((HDR_LEN + payload.len()) as u64);
            self.mem
                .write_slice(&hdr.to_bytes(), GuestAddress(a))
                .unwrap();
            self.mem
                .write_slice(payload, GuestAddress(a + HDR_LEN as u64))
                .unwrap();
            if payload.is_empty() {
                self.tx.submit(&[(a, HDR_LEN as u32, 0)]);
            } else {
                self.tx.submit(&[
                    (a, HDR_LEN as u32, 0),
                    (a + HDR_LEN as u64, payload.len() as u32, 0),
                ]);
            }
            w.run(TOKEN_TX);
        }

        /// Submits raw descriptors.
        fn send_raw(&mut self, w: &mut Worker, descs: &[(u64, u32, u16)]) {
            self.tx.submit(descs);
            w.run(TOKEN_TX);
        }

        fn post_rx(&mut self, w: &mut Worker, count: u16) {
            for _ in 0..count {
                let slot = u64::from(self.rx.next_desc);
                self.rx
                    .submit(&[(RX_BUF_ADDR + slot * RX_SLOT, RX_BUF_LEN, WRITE)]);
            }
            w.run(TOKEN_RX);
        }

        /// The packets the device put in receive buffers since last asked.
        fn received(&mut self) -> Vec<(Header, Vec<u8>)> {
            let mut out = Vec::new();
            while self.seen != self.rx.used_idx() {
                let (id, len) = self.rx.used(self.seen);
                self.seen = self.seen.wrapping_add(1);
                let addr = RX_BUF_ADDR + u64::from(id) * RX_SLOT;
                let mut raw = [0u8; HDR_LEN];
                self.mem.read_slice(&mut raw, GuestAddress(addr)).unwrap();
                let hdr = Header::from_bytes(&raw);
                assert!(len as usize >= HDR_LEN, "used length {len}");
                assert_eq!(hdr.len as usize, len as usize - HDR_LEN);
                let mut data = vec![0u8; hdr.len as usize];
                self.mem
                    .read_slice(&mut data, GuestAddress(addr + HDR_LEN as u64))
                    .unwrap();
                out.push((hdr, data));
            }
            out
        }

        fn tx_used(&self) -> u16 {
            self.tx.used_idx()
        }
    }

    /// A packet from the guest (CID 3) to the host.
    fn pkt(op: Op, src_port: u32, dst_port: u32, len: u32) -> Header {
        Header {
            src_cid: GUEST_CID,
            dst_cid: 2,
            src_port,
            dst_port,
            len,
            type_: TYPE_STREAM,
            op: op as u16,
            flags: 0,
            buf_alloc: 256 << 10,
            fwd_cnt: 0,
        }
    }

    fn ops(packets: &[(Header, Vec<u8>)]) -> Vec<u16> {
        packets.iter().map(|(h, _)| h.op).collect()
    }

    fn stats(c: &Counters) -> VsockStats {
        c.snapshot()
    }

    /// Runs the muxer until `f` holds (host events arrive at once, but
    /// a few rounds may be needed: accept, then the line).
    fn pump(w: &mut Worker, mut f: impl FnMut(&mut Worker) -> bool) {
        for _ in 0..200 {
            w.run(TOKEN_MUXER);
            if f(w) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        panic!("condition not reached");
    }

    /// A guest-initiated connection from guest port `gport` to host port
    /// `hport` (a listener on PATH_hport accepts it): the host end.
    fn guest_connect(
        g: &mut Guest<'_>,
        w: &mut Worker,
        path: &std::path::Path,
        gport: u32,
        hport: u32,
        buf_alloc: u32,
    ) -> UnixStream {
        let l = UnixListener::bind(format!("{}_{hport}", path.display())).unwrap();
        let mut h = pkt(Op::Request, gport, hport, 0);
        h.buf_alloc = buf_alloc;
        g.send(w, h, &[]);
        let got = g.received();
        assert_eq!(ops(&got), vec![Op::Response as u16]);
        assert_eq!(got[0].0.dst_port, gport);
        assert_eq!(got[0].0.src_port, hport);
        assert_eq!(got[0].0.buf_alloc, CONN_BUF_SIZE);
        let (s, _) = l.accept().unwrap();
        let _ = std::fs::remove_file(format!("{}_{hport}", path.display()));
        s
    }

    #[test]
    fn device_type_features_and_config_space() {
        let path = socket_path("config");
        let dev = Vsock::open(&VsockConfig {
            cid: 0x1_0000_0003,
            socket: path.clone(),
        })
        .unwrap();
        assert_eq!(dev.device_type(), 19);
        assert_eq!(dev.queue_max_sizes(), &[QUEUE_SIZE; 3]);
        assert_ne!(dev.features() & feature(VIRTIO_F_VERSION_1), 0);
        // VIRTIO_VSOCK_F_SEQPACKET (bit 1) is not offered.
        assert_eq!(dev.features() & 0b10, 0);
        let mut b = [0xffu8; 12];
        dev.read_config(0, &mut b);
        assert_eq!(&b[..8], &0x1_0000_0003u64.to_le_bytes());
        assert_eq!(&b[8..], &[0; 4]);
        let mut b = [0u8; 4];
        dev.read_config(4, &mut b);
        assert_eq!(b, [1, 0, 0, 0]);
        dev.read_config(u64::MAX, &mut b);
        assert_eq!(b, [0; 4]);
        assert!(path.exists());
        let handle = dev.handle();
        drop(dev);
        drop(handle);
        assert!(!path.exists(), "the socket goes with the device");
    }

    /// Polls `f` for up to 10 s.
    fn eventually(mut f: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !f() {
            assert!(
                std::time::Instant::now() < deadline,
                "condition not reached"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    #[test]
    fn activation_on_the_device_thread_and_reset_closes_connections() {
        let mem = memory();
        let mut g = Guest::new(&mem);
        let path = socket_path("thread");
        let mut dev = Vsock::open(&VsockConfig {
            cid: GUEST_CID,
            socket: path.clone(),
        })
        .unwrap();
        for i in 0..4u64 {
            g.rx.submit(&[(RX_BUF_ADDR + i * RX_SLOT, RX_BUF_LEN, WRITE)]);
        }
        let events = Driver::new(&mem, EVQ_ADDR, QSIZE);
        let efd = || Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let rx_notify = efd();
        let queues = vec![
            DeviceQueue {
                queue: g.rx.queue(),
                notify: rx_notify.clone(),
            },
            DeviceQueue {
                queue: g.tx.queue(),
                notify: efd(),
            },
            DeviceQueue {
                queue: events.queue(),
                notify: efd(),
            },
        ];
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        dev.activate(mem.clone(), queues, Arc::new(Interrupt::new(irq)))
            .unwrap();
        // A host program that connected before the driver was up waits in
        // the backlog; now the REQUEST reaches the guest.
        let mut host = UnixStream::connect(&path).unwrap();
        host.write_all(b"CONNECT 77\n").unwrap();
        eventually(|| g.rx.used_idx() == 1);
        let got = g.received();
        assert_eq!(ops(&got), vec![Op::Request as u16]);
        assert_eq!(got[0].0.dst_port, 77);
        assert_eq!(dev.handle().stats().malformed, 0);
        // A transport reset ends the connection: the host reads EOF.
        dev.reset();
        eventually(|| dev.reset_complete());
        host.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let mut rest = Vec::new();
        host.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        drop(dev);
        assert!(!path.exists());
    }

    #[test]
    fn host_initiated_connection_carries_data_both_ways() {
        let mem = memory();
        let mut g = Guest::new(&mem);
        let path = socket_path("hostinit");
        let (mut w, counters) = g.worker(&path);
        g.post_rx(&mut w, 8);
        let mut host = UnixStream::connect(&path).unwrap();
        host.write_all(b"CONNECT 5000\n").unwrap();
        let mut got = Vec::new();
        pump(&mut w, |_| {
            got.extend(g.received());
            !got.is_empty()
        });
        assert_eq!(ops(&got), vec![Op::Request as u16]);
        let req = got[0].0;
        assert_eq!((req.src_cid, req.dst_cid), (2, GUEST_CID));
        assert_eq!(req.dst_port, 5000);
        assert!(req.src_port >= 1 << 30);
        assert_eq!(req.type_, TYPE_STREAM);

        // The guest accepts: the host gets OK <local port>.
        g.send(&mut w, pkt(Op::Response, 5000, req.src_port, 0), &[]);
        let mut line = [0u8; 14];
        host.read_exact(&mut line).unwrap();
        assert_eq!(line.as_slice(), format!("OK {}\n", req.src_port).as_bytes());

        // Host → guest.
        host.write_all(b"hello guest").unwrap();
        let mut got = Vec::new();
        pump(&mut w, |_| {
            got.extend(g.received());
            !got.is_empty()
        });
        assert_eq!(got[0].0.op, Op::Rw as u16);
        assert_eq!(got[0].1, b"hello guest");
        assert_eq!(got[0].0.fwd_cnt, 0);

        // Guest → host.
        let mut rw = pkt(Op::Rw, 5000, req.src_port, 11);
        rw.fwd_cnt = 11;
        g.send(&mut w, rw, b"hello host!");
        let mut buf = [0u8; 11];
        host.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hello host!");

        // The guest closes: RST back, the host sees EOF.
        let mut shut = pkt(Op::Shutdown, 5000, req.src_port, 0);
        shut.flags = SHUTDOWN_BOTH;
        g.send(&mut w, shut, &[]);
        let got = g.received();
        assert_eq!(ops(&got), vec![Op::Rst as u16]);
        let mut rest = Vec::new();
        host.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        assert_eq!(w.muxer.connections(), 0);
        let s = stats(&counters);
        assert_eq!((s.opened, s.malformed, s.rst_sent), (1, 0, 1));
        assert_eq!((s.tx_bytes, s.rx_bytes), (11, 11));
    }

    #[test]
    fn a_thousand_host_initiated_connections() {
        // Many times around both 64-entry rings: every REQUEST reaches
        // the guest, every RESPONSE is read from the chain just submitted,
        // every host peer gets its OK, and all 1024 are open at the end.
        let mem = memory();
        let mut g = Guest::new(&mem);
        let path = socket_path("thousand");
        let (mut w, counters) = g.worker(&path);
        g.post_rx(&mut w, QSIZE);
        let mut hosts = Vec::new();
        for i in 0..super::super::muxer::MAX_CONNECTIONS {
            let mut host = UnixStream::connect(&path).unwrap();
            host.write_all(format!("CONNECT {}\n", 5000 + i).as_bytes())
                .unwrap();
            let mut got = Vec::new();
            pump(&mut w, |_| {
                got.extend(g.received());
                !got.is_empty()
            });
            assert_eq!(ops(&got), vec![Op::Request as u16], "connection {i}");
            let req = got[0].0;
            assert_eq!(req.dst_port, 5000 + i as u32, "connection {i}");
            // The guest gives the receive buffer back and accepts.
            g.post_rx(&mut w, 1);
            g.send(
                &mut w,
                pkt(Op::Response, req.dst_port, req.src_port, 0),
                &[],
            );
            let expected = format!("OK {}\n", req.src_port);
            let mut line = vec![0u8; expected.len()];
            host.set_read_timeout(Some(std::time::Duration::from_secs(10)))
                .unwrap();
            host.read_exact(&mut line).unwrap();
            assert_eq!(line, expected.as_bytes(), "connection {i}");
            assert_eq!(counters.snapshot().malformed, 0, "connection {i}");
            hosts.push(host);
        }
        assert_eq!(w.muxer.connections(), hosts.len());
        assert_eq!(counters.snapshot().opened, hosts.len() as u64);
        assert_eq!(usize::from(g.tx_used()), hosts.len());
        assert!(!w.broken);
    }

    #[test]
    fn host_connect_lines_that_are_not_connect_are_closed() {
        let mem = memory();
        let mut g = Guest::new(&mem);
        let path = socket_path("badline");
        let (mut w, _) = g.worker(&path);
        g.post_rx(&mut w, 4);
        for line in [&b"HELLO 5\n"[..], b"CONNECT x\n", &[b'A'; 100][..]] {
            let mut host = UnixStream::connect(&path).unwrap();
            host.write_all(line).unwrap();
            let mut rest = Vec::new();
            pump(&mut w, |_| true);
            pump(&mut w, |_| true);
            host.set_read_timeout(Some(std::time::Duration::from_secs(5)))
                .unwrap();
            let _ = host.read_to_end(&mut rest);
            assert!(rest.is_empty(), "{rest:?}");
        }
        assert!(g.received().is_empty());
        assert_eq!(w.muxer.connections(), 0);
        // A guest that refuses: the host stream is closed, no OK.
        let mut host = UnixStream::connect(&path).unwrap();
        host.write_all(b"CONNECT 7\n").unwrap();
        let mut got = Vec::new();
        pump(&mut w, |_| {
            got.extend(g.received());
            !got.is_empty()
        });
        g.send(&mut w, pkt(Op::Rst, 7, got[0].0.src_port, 0), &[]);
        let mut rest = Vec::new();
        host.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        assert!(g.received().is_empty(), "no answer to an RST");
    }

    #[test]
    fn guest_initiated_connection_and_refusal() {
        let mem = memory();
        let mut g = Guest::new(&mem);
        let path = socket_path("guestinit");
        let (mut w, counters) = g.worker(&path);
        g.post_rx(&mut w, 8);
        let mut host = guest_connect(&mut g, &mut w, &path, 1234, 6000, 256 << 10);
        g.send(&mut w, pkt(Op::Rw, 1234, 6000, 3), b"abc");
        let mut b = [0u8; 3];
        host.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"abc");
        // Guest half-close: the host reads EOF, and can still answer.
        let mut shut = pkt(Op::Shutdown, 1234, 6000, 0);
        shut.flags = 2;
        g.send(&mut w, shut, &[]);
        let mut rest = Vec::new();
        host.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        host.write_all(b"reply").unwrap();
        drop(host);
        let mut got = Vec::new();
        pump(&mut w, |_| {
            got.extend(g.received());
            got.len() >= 3
        });
        assert_eq!(
            ops(&got),
            vec![Op::Rw as u16, Op::Shutdown as u16, Op::Rst as u16]
        );
        assert_eq!(got[0].1, b"reply");
        assert_eq!(w.muxer.connections(), 0);

        // Nobody at PATH_6001.
        g.send(&mut w, pkt(Op::Request, 1235, 6001, 0), &[]);
        let got = g.received();
        assert_eq!(ops(&got), vec![Op::Rst as u16]);
        assert_eq!((got[0].0.src_port, got[0].0.dst_port), (6001, 1235));
        let s = stats(&counters);
        assert_eq!((s.opened, s.refused, s.malformed), (1, 1, 0));
    }

    #[test]
    fn malformed_packets_are_dropped_or_reset_and_counted() {
        let mem = memory();
        let mut g = Guest::new(&mem);
        let path = socket_path("malformed");
        let (mut w, counters) = g.worker(&path);
        g.post_rx(&mut w, 32);
        let mut malformed = 0;
        let mut check = |g: &mut Guest<'_>, what: &str, answer: &[u16], more: u64| {
            malformed += more;
            let got = g.received();
            assert_eq!(ops(&got), answer, "{what}");
            assert_eq!(counters.snapshot().malformed, malformed, "{what}");
        };
        let used = g.tx_used();

        // len beyond the chain.
        let h = pkt(Op::Rw, 1, 2, 100);
        g.send(&mut w, h, &[0; 10]);
        check(&mut g, "len > chain", &[], 1);
        // len beyond the largest packet, chain as long.
        let a = g.tx_room(HDR_LEN as u64 + 65537);
        mem.write_slice(&pkt(Op::Rw, 1, 2, 65537).to_bytes(), GuestAddress(a))
            .unwrap();
        g.send_raw(&mut w, &[(a, HDR_LEN as u32 + 65537, 0)]);
        check(&mut g, "oversized", &[], 1);
        // Shorter than a header.
        g.send_raw(&mut w, &[(a, 20, 0)]);
        check(&mut g, "short", &[], 1);
        // Header outside guest memory (and straddling its end).
        g.send_raw(&mut w, &[(MEM_SIZE + 0x1000, HDR_LEN as u32, 0)]);
        check(&mut g, "outside", &[], 1);
        g.send_raw(&mut w, &[(MEM_SIZE - 10, HDR_LEN as u32, 0)]);
        check(&mut g, "straddling", &[], 1);
        // A device-writable transmit descriptor.
        g.send_raw(&mut w, &[(a, HDR_LEN as u32, WRITE)]);
        check(&mut g, "writable", &[], 1);
        // Wrong source or destination CID: dropped, no answer.
        let mut h = pkt(Op::Request, 1, 2, 0);
        h.src_cid = 5;
        g.send(&mut w, h, &[]);
        check(&mut g, "src cid", &[], 1);
        let mut h = pkt(Op::Request, 1, 2, 0);
        h.dst_cid = GUEST_CID;
        g.send(&mut w, h, &[]);
        check(&mut g, "dst cid", &[], 1);
        // Unknown type (SEQPACKET, not offered), unknown operation, a
        // payload on a control packet: RST.
        let mut h = pkt(Op::Request, 1, 2, 0);
        h.type_ = 2;
        g.send(&mut w, h, &[]);
        check(&mut g, "type", &[Op::Rst as u16], 1);
        let mut h = pkt(Op::Request, 1, 2, 0);
        h.op = 99;
        g.send(&mut w, h, &[]);
        check(&mut g, "op", &[Op::Rst as u16], 1);
        let h = pkt(Op::CreditUpdate, 1, 2, 4);
        g.send(&mut w, h, b"junk");
        check(&mut g, "payload", &[Op::Rst as u16], 1);
        // Packets for no connection: RST (but never for an RST).
        for op in [
            Op::Rw,
            Op::Response,
            Op::Shutdown,
            Op::CreditUpdate,
            Op::CreditRequest,
        ] {
            let len = u32::from(op == Op::Rw);
            g.send(&mut w, pkt(op, 1, 2, len), &b"x"[..len as usize]);
            check(&mut g, "unknown connection", &[Op::Rst as u16], 0);
        }
        g.send(&mut w, pkt(Op::Rst, 1, 2, 0), &[]);
        check(&mut g, "RST for nothing", &[], 0);
        assert_eq!(counters.snapshot().unknown, 6);
        // Every chain went back to the used ring.
        assert_eq!(g.tx_used().wrapping_sub(used), 17);

        // A header split across descriptors is a valid packet (virtio
        // makes no framing assumption): the connection is made.
        let _l = UnixListener::bind(format!("{}_7000", path.display())).unwrap();
        let a = g.tx_room(HDR_LEN as u64);
        mem.write_slice(&pkt(Op::Request, 9, 7000, 0).to_bytes(), GuestAddress(a))
            .unwrap();
        g.send_raw(&mut w, &[(a, 20, 0), (a + 20, 1, 0), (a + 21, 23, 0)]);
        check(&mut g, "split header", &[Op::Response as u16], 0);
        // A RESPONSE where none is expected resets the connection.
        g.send(&mut w, pkt(Op::Response, 9, 7000, 0), &[]);
        check(&mut g, "response twice", &[Op::Rst as u16], 1);
        let _ = std::fs::remove_file(format!("{}_7000", path.display()));
        assert!(!w.broken);
    }

    #[test]
    fn malformed_receive_chains_are_returned_and_counted() {
        let mem = memory();
        let mut g = Guest::new(&mem);
        let path = socket_path("badrx");
        let (mut w, counters) = g.worker(&path);
        // Device-readable, too short, outside memory; then a good one.
        g.rx.submit(&[(RX_BUF_ADDR, RX_BUF_LEN, 0)]);
        g.rx.submit(&[(RX_BUF_ADDR + RX_SLOT, 10, WRITE)]);
        g.rx.submit(&[(MEM_SIZE, RX_BUF_LEN, WRITE)]);
        g.send(&mut w, pkt(Op::Rw, 1, 2, 1), b"x");
        assert_eq!(g.rx.used_idx(), 3);
        for i in 0..3 {
            assert_eq!(g.rx.used(i).1, 0);
        }
        g.seen = 3;
        assert_eq!(counters.snapshot().rx_malformed, 3);
        g.post_rx(&mut w, 1);
        assert_eq!(ops(&g.received()), vec![Op::Rst as u16]);
    }

    #[test]
    fn credit_overrun_resets_the_connection() {
        let mem = memory();
        let mut g = Guest::new(&mem);
        let path = socket_path("overrun");
        let (mut w, counters) = g.worker(&path);
        g.post_rx(&mut w, 8);
        let host = guest_connect(&mut g, &mut w, &path, 40, 6000, 256 << 10);
        // The host peer never reads. A guest that ignores the credit
        // sends 64 KiB after 64 KiB: vmlab holds at most its buffer, then
        // resets the connection.
        let chunk = vec![0x5au8; 64 << 10];
        let mut answers = Vec::new();
        for _ in 0..12 {
            g.send(&mut w, pkt(Op::Rw, 40, 6000, chunk.len() as u32), &chunk);
            assert!(w.muxer.buffered() <= CONN_BUF_SIZE as usize);
            answers.extend(g.received());
        }
        assert!(
            ops(&answers).contains(&(Op::Rst as u16)),
            "{:?}",
            ops(&answers)
        );
        let s = counters.snapshot();
        assert_eq!(s.credit_overruns, 1);
        assert!(s.malformed >= 1);
        assert_eq!(
            w.muxer.buffered(),
            0,
            "the reset connection's buffer is freed"
        );
        assert_eq!(w.muxer.connections(), 0);
        drop(host);
    }

    #[test]
    fn host_peer_that_stops_reading_bounds_memory() {
        let mem = memory();
        let mut g = Guest::new(&mem);
        let path = socket_path("slowhost");
        let (mut w, counters) = g.worker(&path);
        g.post_rx(&mut w, 32);
        let mut host = guest_connect(&mut g, &mut w, &path, 41, 6000, 256 << 10);
        // A well-behaved guest: sends while vmlab's credit allows.
        let chunk = vec![0xa5u8; 16 << 10];
        let mut sent = 0u32;
        let mut fwd_cnt = 0u32;
        loop {
            for (h, _) in g.received() {
                assert_eq!(h.buf_alloc, CONN_BUF_SIZE);
                fwd_cnt = h.fwd_cnt;
            }
            let free = CONN_BUF_SIZE - (sent - fwd_cnt);
            if free < chunk.len() as u32 {
                break;
            }
            g.send(&mut w, pkt(Op::Rw, 41, 6000, chunk.len() as u32), &chunk);
            sent += chunk.len() as u32;
            assert!(w.muxer.buffered() <= CONN_BUF_SIZE as usize);
            assert!(sent < 64 << 20, "the guest is never stopped");
        }
        // The host socket took what it could, vmlab holds the rest.
        assert!(w.muxer.buffered() > 0);
        assert!(w.muxer.buffered() <= CONN_BUF_SIZE as usize);
        assert_eq!(counters.snapshot().credit_overruns, 0);
        // The host reads it all: vmlab flushes and tells the guest.
        host.set_nonblocking(true).unwrap();
        let mut total = 0usize;
        let mut buf = vec![0u8; 1 << 20];
        let mut updates = Vec::new();
        for _ in 0..500 {
            match host.read(&mut buf) {
                Ok(n) => {
                    assert!(buf[..n].iter().all(|b| *b == 0xa5));
                    total += n;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
            w.run(TOKEN_MUXER);
            updates.extend(g.received());
            if total == sent as usize {
                break;
            }
        }
        assert_eq!(total, sent as usize);
        assert_eq!(w.muxer.buffered(), 0);
        let last = updates.last().expect("a CREDIT_UPDATE").0;
        assert_eq!(last.op, Op::CreditUpdate as u16);
        assert!(sent - last.fwd_cnt < CONN_BUF_SIZE / 4, "{}", last.fwd_cnt);
    }

    #[test]
    fn guest_that_stops_reading_bounds_memory() {
        let mem = memory();
        let mut g = Guest::new(&mem);
        let path = socket_path("slowguest");
        let (mut w, counters) = g.worker(&path);
        g.post_rx(&mut w, 60);
        // The guest offers 32 KiB of buffer and never consumes it.
        let mut host = guest_connect(&mut g, &mut w, &path, 42, 6000, 32 << 10);
        host.set_nonblocking(true).unwrap();
        let chunk = vec![0x3cu8; 8 << 10];
        let mut written = 0usize;
        let mut blocked = false;
        let mut delivered = 0usize;
        let mut got_ops = Vec::new();
        for _ in 0..2000 {
            match host.write(&chunk) {
                Ok(n) => written += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => blocked = true,
                Err(e) => panic!("{e}"),
            }
            w.run(TOKEN_MUXER);
            for (h, data) in g.received() {
                delivered += data.len();
                got_ops.push(h.op);
            }
            // vmlab buffers nothing towards the guest, and never sends
            // past its credit.
            assert_eq!(w.muxer.buffered(), 0);
            assert!(delivered <= 32 << 10, "{delivered}");
            if blocked {
                break;
            }
        }
        assert!(
            blocked,
            "the host writer is held back ({written} bytes written)"
        );
        assert_eq!(delivered, 32 << 10);
        assert!(got_ops.contains(&(Op::CreditRequest as u16)));
        // The guest reads 32 KiB: more flows.
        let mut h = pkt(Op::CreditUpdate, 42, 6000, 0);
        h.buf_alloc = 32 << 10;
        h.fwd_cnt = 32 << 10;
        g.send(&mut w, h, &[]);
        pump(&mut w, |_| true);
        let more: usize = g.received().iter().map(|(_, d)| d.len()).sum();
        assert_eq!(more, 32 << 10);
        assert_eq!(counters.snapshot().malformed, 0);
    }

    #[test]
    fn unanswered_rsts_stall_transmit_instead_of_growing() {
        let mem = memory();
        let mut g = Guest::new(&mem);
        let path = socket_path("rststall");
        let (mut w, counters) = g.worker(&path);
        // No receive buffers: every packet for no connection wants an RST.
        for i in 0..(MAX_PENDING_RST as u32 + 20) {
            let h = pkt(Op::CreditRequest, 100 + i, 2, 0);
            g.send(&mut w, h, &[]);
        }
        assert_eq!(
            usize::from(g.tx_used()),
            MAX_PENDING_RST,
            "the rest wait on the ring"
        );
        assert_eq!(counters.snapshot().dropped, 0);
        // Buffers arrive: the RSTs go out and the transmit queue resumes.
        g.post_rx(&mut w, QSIZE);
        let mut rsts = g.received().len();
        while rsts < MAX_PENDING_RST + 20 {
            g.seen = g.rx.used_idx();
            g.post_rx(&mut w, QSIZE);
            let n = g.received().len();
            assert!(n > 0);
            rsts += n;
        }
        assert_eq!(usize::from(g.tx_used()), MAX_PENDING_RST + 20);
    }

    /// Calls the worker as the device thread does: again under the same
    /// token while it reports more work.
    fn run_like_the_thread(w: &mut Worker, token: u64) {
        for _ in 0..1000 {
            if w.run(token) == Work::Done {
                return;
            }
        }
        panic!("the worker never finished");
    }

    #[test]
    fn transmit_that_yields_after_a_stall_resumes() {
        let mem = memory();
        let mut g = Guest::new(&mem);
        let path = socket_path("stallyield");
        let (mut w, _) = g.worker(&path);
        // No receive buffers: transmit stalls once MAX_PENDING_RST RSTs
        // wait.
        for i in 0..MAX_PENDING_RST as u32 {
            g.send(&mut w, pkt(Op::CreditRequest, 100 + i, 2, 0), &[]);
        }
        // A full ring of RSTs for nothing (they get no answer) waits.
        for i in 0..u32::from(QSIZE) {
            let a = g.tx_room(HDR_LEN as u64);
            mem.write_slice(&pkt(Op::Rst, 1000 + i, 2, 0).to_bytes(), GuestAddress(a))
                .unwrap();
            g.tx.submit(&[(a, HDR_LEN as u32, 0)]);
        }
        run_like_the_thread(&mut w, TOKEN_TX);
        assert!(w.tx_stalled);
        assert_eq!(usize::from(g.tx_used()), MAX_PENDING_RST);
        // Five receive buffers: five RSTs go, transmit resumes with a
        // budget of five and yields, under the receive token.
        for _ in 0..5 {
            let slot = u64::from(g.rx.next_desc);
            g.rx.submit(&[(RX_BUF_ADDR + slot * RX_SLOT, RX_BUF_LEN, WRITE)]);
        }
        run_like_the_thread(&mut w, TOKEN_RX);
        // The guest takes the RSTs and posts buffers until all are out;
        // transmit must go on by itself (the driver does not notify a
        // queue that yielded).
        let mut rsts = g.received().len();
        for _ in 0..100 {
            if rsts == MAX_PENDING_RST {
                break;
            }
            g.seen = g.rx.used_idx();
            for _ in 0..8 {
                let slot = u64::from(g.rx.next_desc);
                g.rx.submit(&[(RX_BUF_ADDR + slot * RX_SLOT, RX_BUF_LEN, WRITE)]);
            }
            run_like_the_thread(&mut w, TOKEN_RX);
            rsts += g.received().len();
        }
        assert_eq!(rsts, MAX_PENDING_RST);
        assert_eq!(
            usize::from(g.tx_used()),
            MAX_PENDING_RST + usize::from(QSIZE),
            "every transmit chain was taken"
        );
    }

    #[test]
    fn random_chains_never_panic() {
        let mem = memory();
        let mut g = Guest::new(&mem);
        let path = socket_path("fuzz");
        let (mut w, _) = g.worker(&path);
        let _l = UnixListener::bind(format!("{}_1", path.display())).unwrap();
        let mut rng = XorShift(0x1234_5678_9abc_def1);
        for _ in 0..3000 {
            if g.rx.avail.wrapping_sub(g.rx.used_idx()) < QSIZE / 2 {
                g.seen = g.rx.used_idx();
                g.post_rx(&mut w, 8);
            }
            let mut h = Header::from_bytes(&[0u8; HDR_LEN]);
            h.src_cid = rng.pick(&[GUEST_CID, GUEST_CID, 2, 7]);
            h.dst_cid = rng.pick(&[2, 2, 3]);
            h.src_port = rng.below(4) as u32;
            h.dst_port = rng.below(3) as u32;
            h.type_ = rng.pick(&[1, 1, 1, 2, 0]);
            h.op = rng.below(9) as u16;
            h.flags = rng.below(4) as u32;
            h.buf_alloc = rng.pick(&[0, 4096, 256 << 10, u32::MAX]);
            h.fwd_cnt = rng.next() as u32;
            let len = rng.pick(&[0u32, 1, 100, 4096, 70000]);
            h.len = rng.pick(&[len, len + 1, u32::MAX]);
            let a = g.tx_room(HDR_LEN as u64 + 70000);
            mem.write_slice(&h.to_bytes(), GuestAddress(a)).unwrap();
            let addr = rng.pick(&[a, a, MEM_SIZE - 20, u64::MAX - 8]);
            let flags = rng.pick(&[0u16, 0, WRITE]);
            let split = rng.below(HDR_LEN as u64 + 1) as u32;
            g.send_raw(
                &mut w,
                &[
                    (addr, split, flags),
                    (
                        addr.wrapping_add(u64::from(split)),
                        HDR_LEN as u32 - split + len.min(70000),
                        0,
                    ),
                ],
            );
            assert!(w.muxer.connections() <= super::super::muxer::MAX_CONNECTIONS);
            assert!(w.muxer.buffered() <= 4 * CONN_BUF_SIZE as usize);
        }
    }
}
