//! The vsock connection multiplexer: every connection between a guest
//! port and a host Unix stream, the listener for host-initiated ones, and
//! the packets owed to the guest.
//!
//! It knows nothing of virtqueues: the device worker hands it each packet
//! the guest sent ([`Muxer::handle_guest_packet`]) and asks it for the
//! next packet to put in a receive buffer ([`Muxer::fill_rx`]). Host
//! streams are watched by the muxer's own epoll, whose fd the worker
//! watches on the event loop (a nested epoll, as Firecracker does).
//!
//! Memory is bounded everywhere:
//! - guest to host: each connection holds at most [`CONN_BUF_SIZE`]
//!   guest bytes the host peer has not read (that is the credit vmlab
//!   advertises; a guest that sends beyond it gets RST);
//! - host to guest: vmlab reads a host stream only into a receive buffer
//!   the guest posted, and only as much as the guest's credit allows, so
//!   a guest that stops reading leaves the bytes in the host socket (the
//!   host writer blocks: back-pressure);
//! - at most [`MAX_CONNECTIONS`] connections (host streams still sending
//!   their CONNECT line included), [`MAX_PENDING_RST`] RSTs waiting for
//!   receive buffers (beyond that the worker stops taking transmit
//!   chains until the guest takes them).

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::connection::{Connection, Pending, State};
use super::packet::{Header, Op, HDR_LEN, HOST_CID, MAX_PAYLOAD, SHUTDOWN_SEND, TYPE_STREAM};
use super::unix::{connect_nonblocking, parse_connect, HostSocket, MAX_CONNECT_LINE};
use super::Counters;
use crate::devices::virtio::queue::{LogLimit, Work};

pub use super::connection::CONN_BUF_SIZE;

/// Most connections at once.
pub const MAX_CONNECTIONS: usize = 1024;
/// Most RSTs for unknown connections waiting for a receive buffer.
pub const MAX_PENDING_RST: usize = 256;
/// First port vmlab gives a host-initiated connection (as Firecracker).
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// epoll token of the listener.
const LISTENER_TOKEN: u64 = 0;
/// Host events handled per call.
const EVENT_BATCH: usize = 64;

/// (local port, peer port).
type Key = (u32, u32);

/// A connection and its host stream.
struct Conn {
    c: Connection,
    /// `None` once closed on the host side.
    stream: Option<UnixStream>,
    token: u64,
    /// The interest registered with the muxer epoll (`None`: not in it).
    interest: Option<EventSet>,
    /// The host stream has bytes (epoll said so) not read yet.
    read_ready: bool,
    /// In the receive queue.
    queued: bool,
    /// The host peer hung up (both directions closed).
    hup: bool,
    /// The host stream's write side was shut (the guest sends no more).
    write_shut: bool,
    /// A CREDIT_REQUEST was sent and not answered yet.
    credit_requested: bool,
    /// Opened by a host peer (its local port is one vmlab allocated).
    host_initiated: bool,
}

/// A host stream that has not finished its CONNECT line.
struct PendingHost {
    stream: UnixStream,
    line: Vec<u8>,
}

/// Why a packet from the guest was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Reject {
    /// Not from the guest's CID, or not to the host.
    #[error("wrong addresses: {src_cid} -> {dst_cid}")]
    Address {
        /// Source CID.
        src_cid: u64,
        /// Destination CID.
        dst_cid: u64,
    },
    /// Not a stream packet.
    #[error("socket type {0} is not supported (stream only)")]
    Type(u16),
    /// Unknown operation.
    #[error("unknown operation {0}")]
    Op(u16),
    /// A payload on a packet that may not have one.
    #[error("operation {op} carries {len} bytes of payload")]
    Payload {
        /// Operation.
        op: u16,
        /// Payload length.
        len: u32,
    },
    /// Data beyond the credit.
    #[error("credit overrun: {len} bytes with {free} bytes of credit")]
    Credit {
        /// Payload length.
        len: u32,
        /// Credit the guest had.
        free: u32,
    },
    /// A packet that makes no sense in the connection's state.
    #[error("{0:?} is not valid in this connection state")]
    State(Op),
}

/// The multiplexer. See the module documentation.
pub struct Muxer {
    cid: u64,
    socket: Arc<HostSocket>,
    epoll: Epoll,
    conns: HashMap<Key, Conn>,
    tokens: HashMap<u64, Key>,
    pending_host: HashMap<u64, PendingHost>,
    next_token: u64,
    local_ports: HashSet<u32>,
    next_local_port: u32,
    /// Connections with a packet for the guest, in turn.
    rx_queue: VecDeque<Key>,
    /// RSTs answering packets for no connection.
    rst_queue: VecDeque<Header>,
    /// Connections whose epoll interest may have to change.
    dirty: Vec<Key>,
    counters: Arc<Counters>,
    problems: Arc<LogLimit>,
}

impl Muxer {
    /// A muxer for the guest `cid`, accepting host connections on
    /// `socket`.
    pub(crate) fn new(
        cid: u64,
        socket: Arc<HostSocket>,
        counters: Arc<Counters>,
        problems: Arc<LogLimit>,
    ) -> io::Result<Muxer> {
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            socket.listener().as_raw_fd(),
            EpollEvent::new(EventSet::IN, LISTENER_TOKEN),
        )?;
        Ok(Muxer {
            cid,
            socket,
            epoll,
            conns: HashMap::new(),
            tokens: HashMap::new(),
            pending_host: HashMap::new(),
            next_token: LISTENER_TOKEN + 1,
            local_ports: HashSet::new(),
            next_local_port: FIRST_LOCAL_PORT,
            rx_queue: VecDeque::new(),
            rst_queue: VecDeque::new(),
            dirty: Vec::new(),
            counters,
            problems,
        })
    }

    /// The fd to watch for readability: the muxer's epoll.
    pub fn epoll_fd(&self) -> i32 {
        self.epoll.as_raw_fd()
    }

    /// Whether a packet waits for a receive buffer.
    pub fn has_rx(&self) -> bool {
        !self.rst_queue.is_empty() || !self.rx_queue.is_empty()
    }

    /// Whether the worker should stop taking transmit chains until the
    /// guest has taken some packets.
    pub fn stalls_tx(&self) -> bool {
        self.rst_room() == 0
    }

    /// How many more RSTs may wait (each transmit packet adds one at most).
    pub fn rst_room(&self) -> usize {
        MAX_PENDING_RST.saturating_sub(self.rst_queue.len())
    }

    /// Connections now (host streams in their handshake included).
    pub fn connections(&self) -> usize {
        self.conns.len() + self.pending_host.len()
    }

    /// Guest bytes held for host peers, over all connections.
    pub fn buffered(&self) -> usize {
        self.conns.values().map(|c| c.c.buffered()).sum()
    }

    /// Closes every connection (device reset).
    pub fn clear(&mut self) {
        self.conns.clear();
        self.tokens.clear();
        self.pending_host.clear();
        self.local_ports.clear();
        self.rx_queue.clear();
        self.rst_queue.clear();
        self.dirty.clear();
    }

    fn reject(&mut self, why: Reject) {
        self.counters.malformed.fetch_add(1, Ordering::Relaxed);
        self.problems
            .report(format_args!("virtio-vsock: packet refused: {why}"));
    }

    // ----- guest to host ------------------------------------------------

    /// Takes one packet from the guest (its payload: `payload`, already
    /// checked against the chain).
    pub fn handle_guest_packet(&mut self, hdr: &Header, payload: &[u8]) {
        if hdr.src_cid != self.cid || hdr.dst_cid != HOST_CID {
            // Not addressed as a packet from this guest can be: no answer
            // could reach its sender.
            return self.reject(Reject::Address {
                src_cid: hdr.src_cid,
                dst_cid: hdr.dst_cid,
            });
        }
        let key = (hdr.dst_port, hdr.src_port);
        let problem = if hdr.type_ != TYPE_STREAM {
            Some(Reject::Type(hdr.type_))
        } else {
            match hdr.operation() {
                None => Some(Reject::Op(hdr.op)),
                Some(op) if op != Op::Rw && hdr.len != 0 => Some(Reject::Payload {
                    op: hdr.op,
                    len: hdr.len,
                }),
                Some(_) => None,
            }
        };
        if let Some(why) = problem {
            self.reject(why);
            if self.conns.contains_key(&key) {
                self.kill(key);
            } else {
                self.queue_rst(hdr);
            }
            return;
        }
        let Some(op) = hdr.operation() else { return };
        if op == Op::Request {
            return self.guest_connect(hdr);
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            self.counters.unknown.fetch_add(1, Ordering::Relaxed);
            if op != Op::Rst {
                self.queue_rst(hdr);
            }
            return;
        };
        if conn.c.pending.has(Pending::RST) {
            // Being reset: its RST is on the way.
            return;
        }
        conn.c.update_peer_credit(hdr.buf_alloc, hdr.fwd_cnt);
        if conn.c.peer_credit() > 0 {
            conn.credit_requested = false;
        }
        let outcome: Result<(), Option<Reject>> = match op {
            Op::Request => Ok(()),
            Op::Response if conn.c.state == State::LocalInit => {
                conn.c.state = State::Established;
                let line = format!("OK {}\n", conn.c.local_port);
                // A fresh stream has room for a line: a short or failed
                // write means the host peer is gone.
                match conn.stream.as_mut().map(|s| s.write(line.as_bytes())) {
                    Some(Ok(n)) if n == line.len() => {
                        self.counters.opened.fetch_add(1, Ordering::Relaxed);
                        Ok(())
                    }
                    _ => Err(None),
                }
            }
            Op::Response => Err(Some(Reject::State(op))),
            Op::Rst => {
                self.remove(key);
                return;
            }
            Op::Shutdown => {
                conn.c.guest_shut(hdr.flags);
                Ok(())
            }
            Op::Rw
                if conn.c.state != State::Established
                    || conn.c.guest_shutdown & SHUTDOWN_SEND != 0 =>
            {
                Err(Some(Reject::State(op)))
            }
            Op::Rw => match conn.stream.as_mut() {
                Some(stream) => match conn.c.from_guest(payload, stream) {
                    Err(overrun) => {
                        self.counters
                            .credit_overruns
                            .fetch_add(1, Ordering::Relaxed);
                        Err(Some(Reject::Credit {
                            len: overrun.len,
                            free: overrun.free,
                        }))
                    }
                    Ok(Err(e)) => {
                        log::debug!("virtio-vsock: host peer write: {e}");
                        Err(None)
                    }
                    Ok(Ok(())) => {
                        self.counters
                            .tx_bytes
                            .fetch_add(payload.len() as u64, Ordering::Relaxed);
                        if conn.c.wants_credit_update() {
                            conn.c.pending.set(Pending::CREDIT_UPDATE);
                        }
                        Ok(())
                    }
                },
                None => Err(None),
            },
            Op::CreditUpdate => Ok(()),
            Op::CreditRequest => {
                conn.c.pending.set(Pending::CREDIT_UPDATE);
                Ok(())
            }
        };
        match outcome {
            Ok(()) => self.after_change(key),
            Err(why) => {
                if let Some(why) = why {
                    self.reject(why);
                }
                self.kill(key);
            }
        }
    }

    /// The guest connects to host port `dst_port`: forwarded to the Unix
    /// socket `PATH_<dst_port>`.
    fn guest_connect(&mut self, hdr: &Header) {
        let key = (hdr.dst_port, hdr.src_port);
        if self.conns.contains_key(&key) {
            self.reject(Reject::State(Op::Request));
            return;
        }
        if self.connections() >= MAX_CONNECTIONS {
            self.counters.refused.fetch_add(1, Ordering::Relaxed);
            log::debug!("virtio-vsock: {MAX_CONNECTIONS} connections: refusing another");
            return self.queue_rst(hdr);
        }
        let path = self.socket.port_path(hdr.dst_port);
        let stream = match connect_nonblocking(&path) {
            Ok(s) => s,
            Err(e) => {
                self.counters.refused.fetch_add(1, Ordering::Relaxed);
                log::debug!(
                    "virtio-vsock: guest port {} -> host port {}: {}: {e}",
                    hdr.src_port,
                    hdr.dst_port,
                    path.display()
                );
                return self.queue_rst(hdr);
            }
        };
        let mut c = Connection::new(self.cid, hdr.dst_port, hdr.src_port, State::Established);
        c.update_peer_credit(hdr.buf_alloc, hdr.fwd_cnt);
        c.pending.set(Pending::RESPONSE);
        let token = self.take_token();
        if let Err(e) = self.epoll.ctl(
            ControlOperation::Add,
            stream.as_raw_fd(),
            EpollEvent::new(EventSet::IN, token),
        ) {
            log::warn!("virtio-vsock: cannot watch a host stream: {e}");
            return self.queue_rst(hdr);
        }
        self.counters.opened.fetch_add(1, Ordering::Relaxed);
        self.tokens.insert(token, key);
        self.conns.insert(
            key,
            Conn {
                c,
                stream: Some(stream),
                token,
                interest: Some(EventSet::IN),
                read_ready: false,
                queued: false,
                hup: false,
                write_shut: false,
                credit_requested: false,
                host_initiated: false,
            },
        );
        self.enqueue(key);
    }

    /// Queues an RST answering `hdr` (a packet for no connection).
    fn queue_rst(&mut self, hdr: &Header) {
        if self.rst_queue.len() >= MAX_PENDING_RST {
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.rst_queue.push_back(Header {
            src_cid: HOST_CID,
            dst_cid: self.cid,
            src_port: hdr.dst_port,
            dst_port: hdr.src_port,
            len: 0,
            type_: hdr.type_,
            op: Op::Rst as u16,
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        });
    }

    /// Ends a connection with RST: the host stream is closed now, the RST
    /// goes to the guest as soon as it has a receive buffer, and then the
    /// connection is forgotten.
    fn kill(&mut self, key: Key) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if let Some(stream) = conn.stream.take() {
            if conn.interest.is_some() {
                let _ = self.epoll.ctl(
                    ControlOperation::Delete,
                    stream.as_raw_fd(),
                    EpollEvent::default(),
                );
            }
        }
        conn.interest = None;
        conn.read_ready = false;
        conn.c.host_eof = true;
        conn.c.pending = Pending::RST;
        self.tokens.remove(&conn.token);
        self.enqueue(key);
    }

    /// Forgets a connection (its RST was sent, or the guest reset it).
    fn remove(&mut self, key: Key) {
        if let Some(conn) = self.conns.remove(&key) {
            self.tokens.remove(&conn.token);
            if conn.host_initiated {
                self.local_ports.remove(&conn.c.local_port);
            }
            if conn.queued {
                self.rx_queue.retain(|k| *k != key);
            }
            // Dropping the stream closes it and takes it out of epoll.
        }
    }

    fn enqueue(&mut self, key: Key) {
        if let Some(conn) = self.conns.get_mut(&key) {
            if !conn.queued {
                conn.queued = true;
                self.rx_queue.push_back(key);
            }
        }
    }

    /// After a change to a connection: flushes, shuts the host write side
    /// when the guest is done, ends it when both are, queues what it owes
    /// the guest, and marks its epoll interest for review.
    fn after_change(&mut self, key: Key) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if let Some(stream) = conn.stream.as_mut() {
            if conn.c.buffered() > 0 {
                if let Err(e) = conn.c.flush(stream) {
                    log::debug!("virtio-vsock: host peer write: {e}");
                    return self.kill(key);
                }
                if conn.c.wants_credit_update() {
                    conn.c.pending.set(Pending::CREDIT_UPDATE);
                }
            }
            if conn.c.guest_done_sending() && !conn.write_shut {
                conn.write_shut = true;
                let _ = stream.shutdown(std::net::Shutdown::Write);
            }
        }
        if conn.c.finished() {
            return self.kill(key);
        }
        let readable = conn.read_ready && conn.c.reads_host();
        if readable && conn.c.peer_credit() == 0 && !conn.credit_requested {
            // The guest's buffer is full: ask it to say when it has room
            // (Linux also says so by itself once it has read enough).
            conn.credit_requested = true;
            conn.c.pending.set(Pending::CREDIT_REQUEST);
        }
        let wants_rx = !conn.c.pending.is_empty() || readable && conn.c.peer_credit() > 0;
        self.dirty.push(key);
        if wants_rx {
            self.enqueue(key);
        }
    }

    // ----- host to guest ------------------------------------------------

    /// The next packet for a receive buffer with room for `room` payload
    /// bytes, payload in `buf`; `None` when nothing can be sent now.
    pub fn fill_rx(&mut self, room: usize, buf: &mut [u8]) -> Option<(Header, usize)> {
        if let Some(h) = self.rst_queue.pop_front() {
            self.counters.rst_sent.fetch_add(1, Ordering::Relaxed);
            return Some((h, 0));
        }
        while let Some(key) = self.rx_queue.pop_front() {
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            conn.queued = false;
            if let Some(packet) = self.next_packet(key, room, buf) {
                return Some(packet);
            }
        }
        None
    }

    /// The next packet of one connection, which goes back in the queue if
    /// it has more.
    fn next_packet(&mut self, key: Key, room: usize, buf: &mut [u8]) -> Option<(Header, usize)> {
        let conn = self.conns.get_mut(&key)?;
        let p = conn.c.pending;
        let control = [
            (Pending::REQUEST, Op::Request, 0),
            (Pending::RESPONSE, Op::Response, 0),
            (Pending::CREDIT_UPDATE, Op::CreditUpdate, 0),
            (Pending::CREDIT_REQUEST, Op::CreditRequest, 0),
        ];
        for (flag, op, flags) in control {
            if p.has(flag) {
                conn.c.pending.clear(flag);
                let h = conn.c.header(op, 0, flags);
                self.after_change(key);
                return Some((h, 0));
            }
        }
        if conn.read_ready && conn.c.reads_host() && conn.c.peer_credit() > 0 {
            let want = room
                .min(conn.c.peer_credit() as usize)
                .min(MAX_PAYLOAD)
                .min(buf.len());
            let result = match conn.stream.as_mut() {
                Some(s) => read_some(s, &mut buf[..want]),
                None => Ok(None),
            };
            match result {
                Ok(Some(0)) => {
                    // EOF: the host sends no more.
                    conn.read_ready = false;
                    conn.c.host_eof = true;
                    conn.c.pending.set(Pending::SHUTDOWN);
                    if conn.hup {
                        conn.c.pending.set(Pending::RST);
                    }
                }
                Ok(Some(n)) => {
                    // n <= want <= MAX_PAYLOAD.
                    let n32 = n as u32;
                    conn.c.sent_to_guest(n32);
                    let h = conn.c.header(Op::Rw, n32, 0);
                    self.counters
                        .rx_bytes
                        .fetch_add(n as u64, Ordering::Relaxed);
                    self.after_change(key);
                    return Some((h, n));
                }
                Ok(None) => {
                    // Drained for now: epoll says when there is more.
                    conn.read_ready = false;
                    if conn.hup {
                        // No epoll any more: a hung-up stream that would
                        // block has nothing left.
                        conn.c.host_eof = true;
                        conn.c.pending.set(Pending::SHUTDOWN);
                        conn.c.pending.set(Pending::RST);
                    }
                }
                Err(e) => {
                    log::debug!("virtio-vsock: host peer read: {e}");
                    self.kill(key);
                    return self.next_packet(key, room, buf);
                }
            }
        }
        let conn = self.conns.get_mut(&key)?;
        if conn.c.pending.has(Pending::SHUTDOWN) {
            conn.c.pending.clear(Pending::SHUTDOWN);
            let h = conn.c.header(Op::Shutdown, 0, SHUTDOWN_SEND);
            self.after_change(key);
            return Some((h, 0));
        }
        if conn.c.pending.has(Pending::RST) {
            let h = conn.c.header(Op::Rst, 0, 0);
            self.counters.rst_sent.fetch_add(1, Ordering::Relaxed);
            self.remove(key);
            return Some((h, 0));
        }
        self.after_change(key);
        None
    }

    // ----- host side ----------------------------------------------------

    /// Handles what the host streams and the listener have for vmlab
    /// (no waiting); [`Work::More`] if more events may be ready.
    pub fn process_host_events(&mut self) -> Work {
        let mut events = [EpollEvent::default(); EVENT_BATCH];
        let n = match self.epoll.wait(0, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Work::More,
            Err(e) => {
                log::error!("virtio-vsock: epoll_wait: {e}");
                return Work::Done;
            }
        };
        for event in &events[..n] {
            let token = event.data();
            let set = event.event_set();
            if token == LISTENER_TOKEN {
                self.accept_all();
            } else if self.pending_host.contains_key(&token) {
                self.read_connect_line(token, set);
            } else if let Some(&key) = self.tokens.get(&token) {
                self.host_event(key, set);
            }
        }
        self.apply_interests();
        if n == EVENT_BATCH {
            Work::More
        } else {
            Work::Done
        }
    }

    fn take_token(&mut self) -> u64 {
        let t = self.next_token;
        self.next_token += 1;
        t
    }

    fn accept_all(&mut self) {
        loop {
            let stream = match self.socket.listener().accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::warn!(
                        "virtio-vsock: accept on {}: {e}",
                        self.socket.path().display()
                    );
                    return;
                }
            };
            if self.connections() >= MAX_CONNECTIONS {
                self.counters.refused.fetch_add(1, Ordering::Relaxed);
                log::debug!("virtio-vsock: {MAX_CONNECTIONS} connections: closing a new one");
                continue;
            }
            if let Err(e) = stream.set_nonblocking(true) {
                log::warn!("virtio-vsock: host stream: {e}");
                continue;
            }
            let token = self.take_token();
            if let Err(e) = self.epoll.ctl(
                ControlOperation::Add,
                stream.as_raw_fd(),
                EpollEvent::new(EventSet::IN, token),
            ) {
                log::warn!("virtio-vsock: cannot watch a host stream: {e}");
                continue;
            }
            self.pending_host.insert(
                token,
                PendingHost {
                    stream,
                    line: Vec::with_capacity(MAX_CONNECT_LINE),
                },
            );
        }
    }

    /// Reads a host stream's `CONNECT <port>\n` a byte at a time (what
    /// follows the line is connection data, which must stay in the
    /// socket).
    fn read_connect_line(&mut self, token: u64, set: EventSet) {
        let Some(pending) = self.pending_host.get_mut(&token) else {
            return;
        };
        let mut byte = [0u8; 1];
        let line_done = loop {
            match pending.stream.read(&mut byte) {
                Ok(0) => break Err("closed before its CONNECT line"),
                Ok(_) if byte[0] == b'\n' => break Ok(()),
                Ok(_) if pending.line.len() < MAX_CONNECT_LINE => pending.line.push(byte[0]),
                Ok(_) => break Err("CONNECT line too long"),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if set.contains(EventSet::HANG_UP) || set.contains(EventSet::ERROR) {
                        break Err("hung up");
                    }
                    return;
                }
                Err(_) => break Err("read error"),
            }
        };
        let Some(pending) = self.pending_host.remove(&token) else {
            return;
        };
        let port =
            line_done.and_then(|()| parse_connect(&pending.line).ok_or("not CONNECT <port>"));
        let port = match port {
            Ok(p) => p,
            Err(why) => {
                log::debug!("virtio-vsock: host stream closed: {why}");
                // Dropping the stream closes it and takes it out of epoll.
                return;
            }
        };
        let Some(local_port) = self.allocate_local_port() else {
            log::warn!("virtio-vsock: no free local port");
            return;
        };
        let key = (local_port, port);
        // The stream stays in epoll under its token; until the guest
        // answers only a hang-up matters.
        if self
            .epoll
            .ctl(
                ControlOperation::Modify,
                pending.stream.as_raw_fd(),
                EpollEvent::new(EventSet::empty(), token),
            )
            .is_err()
        {
            return;
        }
        self.local_ports.insert(local_port);
        let mut c = Connection::new(self.cid, local_port, port, State::LocalInit);
        c.pending.set(Pending::REQUEST);
        self.tokens.insert(token, key);
        self.conns.insert(
            key,
            Conn {
                c,
                stream: Some(pending.stream),
                token,
                interest: Some(EventSet::empty()),
                read_ready: false,
                queued: false,
                hup: false,
                write_shut: false,
                credit_requested: false,
                host_initiated: true,
            },
        );
        self.enqueue(key);
    }

    fn allocate_local_port(&mut self) -> Option<u32> {
        for _ in 0..=MAX_CONNECTIONS {
            let p = self.next_local_port;
            self.next_local_port = if p >= u32::MAX - 1 {
                FIRST_LOCAL_PORT
            } else {
                p + 1
            };
            if !self.local_ports.contains(&p) {
                return Some(p);
            }
        }
        None
    }

    /// An epoll event of a connection's host stream.
    fn host_event(&mut self, key: Key, set: EventSet) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if set.contains(EventSet::ERROR) {
            return self.kill(key);
        }
        if set.contains(EventSet::HANG_UP) {
            // Both directions are closed; epoll would report it forever,
            // so the stream leaves epoll. What is still in it is read as
            // the guest's credit allows, then SHUTDOWN and RST.
            conn.hup = true;
            if let Some(s) = &conn.stream {
                let _ = self.epoll.ctl(
                    ControlOperation::Delete,
                    s.as_raw_fd(),
                    EpollEvent::default(),
                );
            }
            conn.interest = None;
            if conn.c.state != State::Established || !conn.c.reads_host() {
                return self.kill(key);
            }
            conn.read_ready = true;
            return self.after_change(key);
        }
        if set.contains(EventSet::IN) {
            conn.read_ready = true;
        }
        // OUT: after_change flushes.
        self.after_change(key);
    }

    /// Brings each changed connection's epoll interest in line with what
    /// it can use: IN while vmlab would read (and has not been told yet),
    /// OUT while guest bytes wait for the host peer.
    pub fn apply_interests(&mut self) {
        let dirty = std::mem::take(&mut self.dirty);
        for key in dirty {
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            let (Some(current), Some(stream)) = (conn.interest, conn.stream.as_ref()) else {
                continue;
            };
            let mut want = EventSet::empty();
            if conn.c.reads_host() && !conn.read_ready {
                want |= EventSet::IN;
            }
            if conn.c.buffered() > 0 {
                want |= EventSet::OUT;
            }
            if want != current {
                match self.epoll.ctl(
                    ControlOperation::Modify,
                    stream.as_raw_fd(),
                    EpollEvent::new(want, conn.token),
                ) {
                    Ok(()) => conn.interest = Some(want),
                    Err(e) => {
                        log::warn!("virtio-vsock: epoll_ctl: {e}");
                        self.kill(key);
                    }
                }
            }
        }
    }

    /// The guest's receive-buffer room a packet may use: a header and at
    /// most [`MAX_PAYLOAD`] bytes.
    pub fn payload_room(chain_room: usize) -> usize {
        chain_room.saturating_sub(HDR_LEN).min(MAX_PAYLOAD)
    }
}

/// One read: `Some(n)` bytes (0: EOF), `None` if it would block.
fn read_some(s: &mut UnixStream, buf: &mut [u8]) -> io::Result<Option<usize>> {
    loop {
        match s.read(buf) {
            Ok(n) => return Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}
