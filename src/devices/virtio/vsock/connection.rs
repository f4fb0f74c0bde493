//! One vsock stream connection: its state, the credit accounting of both
//! directions (virtio 1.2 5.10.6.3), and the bounded buffer of bytes from
//! the guest that the host peer has not taken yet.
//!
//! Pure: the host stream is any `io::Write`, so the accounting is tested
//! without sockets or queues.

use std::collections::VecDeque;
use std::io::{self, Write};

use super::packet::{
    Header, Op, HOST_CID, SHUTDOWN_BOTH, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM,
};

/// The receive buffer vmlab advertises per connection (`buf_alloc`), and
/// the most guest bytes it ever holds for one connection.
pub const CONN_BUF_SIZE: u32 = 256 * 1024;
/// vmlab tells the guest about freed buffer space (CREDIT_UPDATE) once
/// this much has been forwarded since it last told it.
pub const CREDIT_UPDATE_THRESHOLD: u32 = CONN_BUF_SIZE / 4;

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Host-initiated: REQUEST sent (or queued), waiting for the guest's
    /// RESPONSE.
    LocalInit,
    /// Both sides may exchange data.
    Established,
}

/// Control packets a connection owes the guest, sent as receive buffers
/// allow (a set: each is sent once however often it was asked for).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pending(u8);

impl Pending {
    /// REQUEST (host-initiated connection).
    pub const REQUEST: Pending = Pending(1);
    /// RESPONSE (guest-initiated connection accepted).
    pub const RESPONSE: Pending = Pending(2);
    /// CREDIT_UPDATE.
    pub const CREDIT_UPDATE: Pending = Pending(4);
    /// CREDIT_REQUEST.
    pub const CREDIT_REQUEST: Pending = Pending(8);
    /// SHUTDOWN(SEND): the host peer sends no more.
    pub const SHUTDOWN: Pending = Pending(16);
    /// RST: the connection is over; it is forgotten once sent.
    pub const RST: Pending = Pending(32);

    /// Adds `p`.
    pub fn set(&mut self, p: Pending) {
        self.0 |= p.0;
    }

    /// Whether `p` is pending.
    pub fn has(&self, p: Pending) -> bool {
        self.0 & p.0 != 0
    }

    /// Removes `p`.
    pub fn clear(&mut self, p: Pending) {
        self.0 &= !p.0;
    }

    /// Whether nothing is pending.
    pub fn is_empty(&self) -> bool {
        self.0 == 0
    }
}

/// The guest sent more than the credit vmlab gave it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the guest sent {len} bytes with only {free} bytes of credit")]
pub struct CreditOverrun {
    /// Payload of the packet.
    pub len: u32,
    /// Credit it had.
    pub free: u32,
}

/// A connection between a guest port and a host Unix stream.
#[derive(Debug)]
pub struct Connection {
    /// The guest's CID.
    pub guest_cid: u64,
    /// The host-side port (the guest's destination port, or the one vmlab
    /// chose for a host-initiated connection).
    pub local_port: u32,
    /// The guest's port.
    pub peer_port: u32,
    /// Life stage.
    pub state: State,
    /// Control packets owed to the guest.
    pub pending: Pending,
    /// SHUTDOWN flags the guest sent.
    pub guest_shutdown: u32,
    /// The host peer sent EOF (or hung up): no more reads.
    pub host_eof: bool,
    /// Guest to host: bytes received from the guest (wrapping).
    rx_cnt: u32,
    /// Guest to host: bytes written to the host peer (wrapping).
    fwd_cnt: u32,
    /// The fwd_cnt the guest was last told.
    last_fwd_cnt_sent: u32,
    /// Host to guest: bytes sent to the guest (wrapping).
    tx_cnt: u32,
    /// The guest's buffer for this connection.
    peer_buf_alloc: u32,
    /// Bytes the guest has consumed.
    peer_fwd_cnt: u32,
    /// Guest bytes the host peer has not taken yet; never longer than
    /// [`CONN_BUF_SIZE`] (the credit check guarantees it).
    host_buf: VecDeque<u8>,
}

impl Connection {
    /// A connection in state `state` with no credit from the guest yet.
    pub fn new(guest_cid: u64, local_port: u32, peer_port: u32, state: State) -> Connection {
        Connection {
            guest_cid,
            local_port,
            peer_port,
            state,
            pending: Pending::default(),
            guest_shutdown: 0,
            host_eof: false,
            rx_cnt: 0,
            fwd_cnt: 0,
            last_fwd_cnt_sent: 0,
            tx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            host_buf: VecDeque::new(),
        }
    }

    /// A header from vmlab (the host) to the guest for this connection,
    /// carrying vmlab's current credit; records that the guest now knows
    /// `fwd_cnt`.
    pub fn header(&mut self, op: Op, len: u32, flags: u32) -> Header {
        self.last_fwd_cnt_sent = self.fwd_cnt;
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len,
            type_: TYPE_STREAM,
            op: op as u16,
            flags,
            buf_alloc: CONN_BUF_SIZE,
            fwd_cnt: self.fwd_cnt,
        }
    }

    // ----- host to guest ------------------------------------------------

    /// Takes the guest's credit from any packet it sent.
    pub fn update_peer_credit(&mut self, buf_alloc: u32, fwd_cnt: u32) {
        self.peer_buf_alloc = buf_alloc;
        self.peer_fwd_cnt = fwd_cnt;
    }

    /// How many bytes vmlab may send the guest now:
    /// `buf_alloc - (tx_cnt - fwd_cnt)`, never negative (a guest that
    /// shrinks its buffer below what is in flight gets nothing).
    pub fn peer_credit(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Records `n` bytes sent to the guest.
    pub fn sent_to_guest(&mut self, n: u32) {
        self.tx_cnt = self.tx_cnt.wrapping_add(n);
    }

    /// Whether vmlab reads from the host peer: the connection is up, the
    /// host has not ended, and the guest still receives.
    pub fn reads_host(&self) -> bool {
        self.state == State::Established
            && !self.host_eof
            && self.guest_shutdown & SHUTDOWN_RCV == 0
            && !self.pending.has(Pending::RST)
    }

    // ----- guest to host ------------------------------------------------

    /// Free room vmlab advertised and the guest may still fill.
    pub fn free(&self) -> u32 {
        CONN_BUF_SIZE.saturating_sub(self.rx_cnt.wrapping_sub(self.fwd_cnt))
    }

    /// Forwards `data` from the guest: checks the credit, writes what the
    /// host peer takes now, keeps the rest. A write error (the peer
    /// closed) is returned; `WouldBlock` is not an error.
    pub fn from_guest(
        &mut self,
        data: &[u8],
        host: &mut impl Write,
    ) -> Result<Result<(), io::Error>, CreditOverrun> {
        let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
        let free = self.free();
        if len > free {
            return Err(CreditOverrun { len, free });
        }
        self.rx_cnt = self.rx_cnt.wrapping_add(len);
        let mut rest = data;
        if self.host_buf.is_empty() {
            match write_some(host, rest) {
                Ok(n) => {
                    self.forwarded(n);
                    rest = &rest[n..];
                }
                Err(e) => return Ok(Err(e)),
            }
        }
        self.host_buf.extend(rest);
        Ok(Ok(()))
    }

    /// Writes buffered guest bytes to the host peer until it takes no
    /// more.
    pub fn flush(&mut self, host: &mut impl Write) -> io::Result<()> {
        while !self.host_buf.is_empty() {
            let (a, _) = self.host_buf.as_slices();
            let n = write_some(host, a)?;
            if n == 0 {
                break;
            }
            self.host_buf.drain(..n);
            self.forwarded(n);
        }
        if self.host_buf.is_empty() {
            // Give the memory back: an idle connection holds none.
            self.host_buf = VecDeque::new();
        }
        Ok(())
    }

    fn forwarded(&mut self, n: usize) {
        // n <= the packet's or the buffer's length, both below 2^32.
        self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
    }

    /// Guest bytes waiting for the host peer.
    pub fn buffered(&self) -> usize {
        self.host_buf.len()
    }

    /// Whether the guest should hear about freed room now: enough was
    /// forwarded since it was last told.
    pub fn wants_credit_update(&self) -> bool {
        self.fwd_cnt.wrapping_sub(self.last_fwd_cnt_sent) >= CREDIT_UPDATE_THRESHOLD
    }

    /// Records a SHUTDOWN from the guest.
    pub fn guest_shut(&mut self, flags: u32) {
        self.guest_shutdown |= flags & SHUTDOWN_BOTH;
    }

    /// The guest sends no more and everything it sent reached the host:
    /// the host stream's write side may be shut.
    pub fn guest_done_sending(&self) -> bool {
        self.guest_shutdown & SHUTDOWN_SEND != 0 && self.host_buf.is_empty()
    }

    /// Nothing more can flow either way: time for RST.
    pub fn finished(&self) -> bool {
        self.guest_shutdown == SHUTDOWN_BOTH && self.host_buf.is_empty()
            || self.guest_done_sending() && self.host_eof && !self.pending.has(Pending::SHUTDOWN)
    }
}

/// One write, `WouldBlock` as 0 bytes, `Interrupted` retried.
fn write_some(w: &mut impl Write, data: &[u8]) -> io::Result<usize> {
    if data.is_empty() {
        return Ok(0);
    }
    loop {
        match w.write(data) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(0),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A host peer that takes at most `room` bytes, then blocks.
    struct Slow {
        got: Vec<u8>,
        room: usize,
    }

    impl Write for Slow {
        fn write(&mut self, data: &[u8]) -> io::Result<usize> {
            if self.room == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = data.len().min(self.room);
            self.room -= n;
            self.got.extend_from_slice(&data[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn peer_credit_follows_the_guest() {
        let mut c = Connection::new(3, 1000, 2000, State::Established);
        assert_eq!(c.peer_credit(), 0, "no credit before the guest speaks");
        c.update_peer_credit(4096, 0);
        assert_eq!(c.peer_credit(), 4096);
        c.sent_to_guest(4000);
        assert_eq!(c.peer_credit(), 96);
        c.sent_to_guest(96);
        assert_eq!(c.peer_credit(), 0);
        c.update_peer_credit(4096, 1000);
        assert_eq!(c.peer_credit(), 1000);
        // Shrinking the buffer below what is in flight: no credit, no
        // underflow.
        c.update_peer_credit(100, 1000);
        assert_eq!(c.peer_credit(), 0);
        // Counters wrap.
        let mut c = Connection::new(3, 1, 2, State::Established);
        c.tx_cnt = u32::MAX - 10;
        c.update_peer_credit(4096, u32::MAX - 10);
        c.sent_to_guest(100);
        assert_eq!(c.peer_credit(), 3996);
    }

    #[test]
    fn guest_credit_bounds_the_host_buffer() {
        let mut c = Connection::new(3, 1, 2, State::Established);
        let mut host = Slow {
            got: Vec::new(),
            room: 1000,
        };
        let chunk = vec![7u8; 64 * 1024];
        // 1000 bytes go through, the rest waits; the guest may fill the
        // advertised buffer and no more.
        for _ in 0..4 {
            c.from_guest(&chunk, &mut host).unwrap().unwrap();
            assert!(c.buffered() <= CONN_BUF_SIZE as usize);
        }
        assert_eq!(host.got.len(), 1000);
        assert_eq!(c.buffered(), 4 * 64 * 1024 - 1000);
        assert_eq!(c.free(), 1000);
        let e = c.from_guest(&chunk, &mut host).unwrap_err();
        assert_eq!(
            e,
            CreditOverrun {
                len: 65536,
                free: 1000
            }
        );
        assert!(c.buffered() <= CONN_BUF_SIZE as usize);
        assert!(c.wants_credit_update() || c.fwd_cnt < CREDIT_UPDATE_THRESHOLD);
        // The host drains: the room comes back and the guest is told.
        host.room = usize::MAX;
        c.flush(&mut host).unwrap();
        assert_eq!(c.buffered(), 0);
        assert_eq!(c.free(), CONN_BUF_SIZE);
        assert!(c.wants_credit_update());
        let h = c.header(Op::CreditUpdate, 0, 0);
        assert_eq!(h.fwd_cnt, 4 * 64 * 1024);
        assert_eq!(h.buf_alloc, CONN_BUF_SIZE);
        assert!(!c.wants_credit_update());
        assert_eq!(host.got.len(), 4 * 64 * 1024);
    }

    #[test]
    fn write_errors_are_reported() {
        struct Closed;
        impl Write for Closed {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::ErrorKind::BrokenPipe.into())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let mut c = Connection::new(3, 1, 2, State::Established);
        let r = c.from_guest(b"abc", &mut Closed).unwrap();
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::BrokenPipe);
    }

    #[test]
    fn shutdown_states() {
        let mut c = Connection::new(3, 1, 2, State::Established);
        assert!(c.reads_host());
        c.guest_shut(SHUTDOWN_RCV);
        assert!(!c.reads_host());
        assert!(!c.guest_done_sending() && !c.finished());
        c.guest_shut(SHUTDOWN_SEND | 0x80);
        assert_eq!(c.guest_shutdown, SHUTDOWN_BOTH);
        assert!(c.finished());
        let mut c = Connection::new(3, 1, 2, State::Established);
        c.guest_shut(SHUTDOWN_SEND);
        c.host_eof = true;
        c.pending.set(Pending::SHUTDOWN);
        assert!(!c.finished(), "the SHUTDOWN is still owed");
        c.pending.clear(Pending::SHUTDOWN);
        assert!(c.finished());
        let c = Connection::new(3, 1, 2, State::LocalInit);
        assert!(!c.reads_host());
    }
}
