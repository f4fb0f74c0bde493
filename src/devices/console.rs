//! The console: the guest's serial output on its way to vmlab's stdout.
//!
//! The UART runs on the vCPU threads, and a vCPU must never wait for the
//! host's stdout (a pipe nobody reads, a slow terminal). So a write to the
//! transmit register only appends the byte to a bounded [`Console`] buffer;
//! the console thread ([`ConsoleThread`]) drains that buffer to stdout,
//! waiting for stdout with `poll` so that it can give up when vmlab stops.
//!
//! Back-pressure is the UART's own: while the buffer is nearly full the
//! UART reports its transmitter busy (LSR THRE and TEMT clear), so the
//! guest's 8250 driver stops sending; once the thread has made room it
//! re-raises the transmitter-empty interrupt and the driver goes on. Bytes
//! a guest sends into a full buffer anyway (the kernel's console gives up
//! waiting after 10 ms a character) are dropped and counted, as are the
//! bytes still pending when vmlab has to stop and stdout does not take
//! them in time (Firecracker's console drops and counts the same way).
//!
//! Once the guest init has reported its command's exit status the console
//! is *closed*: what the guest prints after that (the kernel's `reboot:
//! Restarting system`) is not the command's output and never reaches
//! stdout; what was written before is still flushed.

#![warn(clippy::cast_possible_truncation)]

use std::collections::VecDeque;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Bytes the console buffers between the guest and stdout.
pub const BUFFER_CAPACITY: usize = 64 << 10;
/// With less free space than this the UART reports its transmitter busy:
/// room for what a driver that saw it idle may still send (Linux's 8250
/// driver sends up to a FIFO's worth, 16 bytes, per interrupt without
/// looking at LSR again).
const CONGESTION_MARGIN: usize = 1024;
/// The most the thread writes at once: `PIPE_BUF`, which a pipe that polls
/// writable takes without blocking.
const WRITE_CHUNK: usize = 4096;
/// How often a thread waiting for stdout looks whether vmlab is stopping.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Where the console thread writes.
pub enum ConsoleSink {
    /// A descriptor (vmlab's stdout: [`ConsoleSink::stdout`]), polled for
    /// writability.
    Fd(OwnedFd),
    /// Any writer (tests): written with `write_all`, which may block the
    /// console thread (never a vCPU).
    Writer(Box<dyn Write + Send>),
}

impl ConsoleSink {
    /// vmlab's stdout (a duplicate of descriptor 1, owned by the thread).
    pub fn stdout() -> std::io::Result<ConsoleSink> {
        Ok(ConsoleSink::Fd(
            std::io::stdout().as_fd().try_clone_to_owned()?,
        ))
    }
}

/// What the console did, for the end-of-run report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConsoleStats {
    /// Bytes written to the sink.
    pub written: u64,
    /// Bytes the guest sent into a full buffer, or that were still pending
    /// when vmlab stopped and the sink did not take them in time, or that
    /// a closed sink (stdout's reader went away) refused.
    pub dropped: u64,
    /// Bytes the guest printed after the console was closed (after its
    /// command's exit status): discarded on purpose.
    pub after_close: u64,
}

#[derive(Default)]
struct State {
    buf: VecDeque<u8>,
    /// The guest's command has ended: discard further output.
    closed: bool,
    /// vmlab is stopping: drain what is there, then end.
    stopping: bool,
    /// Give up draining at this instant (set with `stopping`).
    deadline: Option<Instant>,
    /// The guest saw the transmitter busy and waits for an interrupt.
    stalled: bool,
    /// The "buffer full" message was logged.
    reported_full: bool,
    /// The thread has ended.
    done: bool,
    stats: ConsoleStats,
}

/// The buffer between the UART (vCPU threads) and the console thread.
#[derive(Default)]
pub struct Console {
    state: Mutex<State>,
    changed: Condvar,
}

impl Console {
    /// An empty, open console.
    pub fn new() -> Arc<Console> {
        Arc::new(Console::default())
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues guest output. Never waits for the host: bytes that do not
    /// fit are dropped and counted.
    pub fn push(&self, bytes: &[u8]) {
        let mut s = self.lock();
        if s.closed {
            s.stats.after_close += bytes.len() as u64;
            return;
        }
        let was_empty = s.buf.is_empty();
        let room = BUFFER_CAPACITY - s.buf.len();
        let taken = bytes.len().min(room);
        s.buf.extend(&bytes[..taken]);
        if taken < bytes.len() {
            s.stats.dropped += (bytes.len() - taken) as u64;
            if !s.reported_full {
                s.reported_full = true;
                log::debug!("console: the output buffer is full, dropping guest output");
            }
        }
        if was_empty && taken > 0 {
            self.changed.notify_all();
        }
    }

    /// Whether the UART should report its transmitter busy. Marks the
    /// console stalled, so that the thread raises the transmitter-empty
    /// interrupt once it has made room.
    pub fn congested(&self) -> bool {
        let mut s = self.lock();
        // A closed or stopping console takes (and discards or drains)
        // whatever comes: nobody would ever make room for a waiting guest.
        let busy = !s.closed && !s.stopping && s.buf.len() + CONGESTION_MARGIN > BUFFER_CAPACITY;
        if busy && !s.stalled {
            s.stalled = true;
            if !s.reported_full {
                s.reported_full = true;
                log::debug!("console: the output buffer is full, the guest waits for stdout");
            }
        }
        busy
    }

    /// Discards all later output; what is buffered is still written.
    pub fn close(&self) {
        self.lock().closed = true;
    }

    /// The counters so far.
    pub fn stats(&self) -> ConsoleStats {
        self.lock().stats
    }

    /// Bytes waiting for the sink.
    pub fn pending(&self) -> usize {
        self.lock().buf.len()
    }
}

/// The thread that writes the console buffer to the sink.
pub struct ConsoleThread {
    console: Arc<Console>,
    handle: JoinHandle<()>,
}

impl ConsoleThread {
    /// Starts draining `console` into `sink`. `kick` is called (without
    /// any console lock held) when a guest that found the transmitter busy
    /// can send again: it re-raises the UART's transmitter-empty interrupt.
    pub fn start(
        console: Arc<Console>,
        sink: ConsoleSink,
        kick: Box<dyn Fn() + Send>,
    ) -> std::io::Result<ConsoleThread> {
        let c = console.clone();
        let handle = std::thread::Builder::new()
            .name("console".into())
            .spawn(move || {
                drain(&c, sink, &*kick);
                let mut s = c.lock();
                s.done = true;
                c.changed.notify_all();
            })?;
        Ok(ConsoleThread { console, handle })
    }

    /// Stops the thread: it writes what is buffered until `limit` has
    /// passed, then drops the rest (counted). Waits at most `limit` plus a
    /// little for the thread; a thread stuck in a blocking write is left
    /// behind (it holds nothing the rest of vmlab needs).
    pub fn finish(self, limit: Duration) -> ConsoleStats {
        let deadline = Instant::now() + limit;
        let mut s = self.console.lock();
        s.stopping = true;
        s.deadline = Some(deadline);
        self.console.changed.notify_all();
        let give_up = deadline + POLL_INTERVAL * 4;
        while !s.done {
            let now = Instant::now();
            if now >= give_up {
                break;
            }
            s = self
                .console
                .changed
                .wait_timeout(s, give_up - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        if !s.done {
            // The thread is blocked in a write: count what it could not
            // write, and leave it.
            let pending = s.buf.len() as u64;
            s.stats.dropped += pending;
            s.buf.clear();
            s.closed = true;
            let stats = s.stats;
            drop(s);
            log::warn!("console: stdout did not take the guest's last output in time");
            return stats;
        }
        let stats = s.stats;
        drop(s);
        let _ = self.handle.join();
        stats
    }
}

/// The console thread's loop.
fn drain(console: &Console, mut sink: ConsoleSink, kick: &dyn Fn()) {
    let mut chunk = Vec::with_capacity(WRITE_CHUNK);
    let mut sink_open = true;
    loop {
        {
            let mut s = console.lock();
            while s.buf.is_empty() && !s.stopping {
                s = console.changed.wait(s).unwrap_or_else(|p| p.into_inner());
            }
            if s.buf.is_empty() {
                return;
            }
            let n = s.buf.len().min(WRITE_CHUNK);
            chunk.clear();
            chunk.extend(s.buf.drain(..n));
        }
        let written = if sink_open {
            match write_chunk(console, &mut sink, &chunk) {
                Ok(n) => n,
                Err(Stop::SinkClosed(n)) => {
                    // The reader went away: drop the output from now on,
                    // as a disconnected serial cable would, and keep the
                    // guest running.
                    log::debug!("console: stdout is closed, dropping guest output");
                    sink_open = false;
                    n
                }
                Err(Stop::Deadline(n)) => {
                    let mut s = console.lock();
                    s.stats.written += n as u64;
                    s.stats.dropped += (chunk.len() - n + s.buf.len()) as u64;
                    s.buf.clear();
                    return;
                }
            }
        } else {
            0
        };
        let kick_now = {
            let mut s = console.lock();
            s.stats.written += written as u64;
            s.stats.dropped += (chunk.len() - written) as u64;
            let room = s.buf.len() + CONGESTION_MARGIN <= BUFFER_CAPACITY;
            let kick_now = s.stalled && room;
            if kick_now {
                s.stalled = false;
            }
            kick_now
        };
        if kick_now {
            kick();
        }
    }
}

enum Stop {
    /// The sink refused (EPIPE and the like) after this many bytes.
    SinkClosed(usize),
    /// vmlab is stopping and the deadline passed after this many bytes.
    Deadline(usize),
}

fn past_deadline(console: &Console) -> bool {
    console.lock().deadline.is_some_and(|d| Instant::now() >= d)
}

/// Writes all of `bytes` unless the sink closes or the stop deadline
/// passes; returns how many were written.
fn write_chunk(console: &Console, sink: &mut ConsoleSink, bytes: &[u8]) -> Result<usize, Stop> {
    match sink {
        ConsoleSink::Writer(w) => {
            if past_deadline(console) {
                return Err(Stop::Deadline(0));
            }
            match w.write_all(bytes).and_then(|()| w.flush()) {
                Ok(()) => Ok(bytes.len()),
                Err(_) => Err(Stop::SinkClosed(0)),
            }
        }
        ConsoleSink::Fd(fd) => write_fd(console, fd.as_raw_fd(), bytes),
    }
}

/// Writes to a descriptor that may be a pipe nobody reads: waits for it
/// with `poll` in short rounds, so that a stopping vmlab is not held up
/// beyond its deadline. The descriptor itself stays blocking (it may be
/// shared with other processes, a terminal for instance); a pipe that
/// polls writable takes `PIPE_BUF` bytes without blocking.
fn write_fd(console: &Console, fd: RawFd, bytes: &[u8]) -> Result<usize, Stop> {
    let mut done = 0;
    while done < bytes.len() {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLOUT,
            revents: 0,
        };
        let ms = i32::try_from(POLL_INTERVAL.as_millis()).unwrap_or(50);
        // SAFETY: one valid pollfd, for the duration of the call.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        if rc < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(Stop::SinkClosed(done));
        }
        if rc == 0 {
            if past_deadline(console) {
                return Err(Stop::Deadline(done));
            }
            continue;
        }
        if pfd.revents & (libc::POLLERR | libc::POLLNVAL) != 0 {
            return Err(Stop::SinkClosed(done));
        }
        let rest = &bytes[done..];
        // SAFETY: writes at most `rest.len()` bytes from a live slice.
        let n = unsafe { libc::write(fd, rest.as_ptr().cast(), rest.len()) };
        if n < 0 {
            match std::io::Error::last_os_error().kind() {
                std::io::ErrorKind::Interrupted | std::io::ErrorKind::WouldBlock => continue,
                _ => return Err(Stop::SinkClosed(done)),
            }
        }
        done += n.unsigned_abs();
    }
    Ok(done)
}

/// Test doubles for the console's sink.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// A sink that takes nothing until released.
    #[derive(Clone, Default)]
    pub(crate) struct Gate {
        open: Arc<(Mutex<bool>, Condvar)>,
        pub(crate) out: Arc<Mutex<Vec<u8>>>,
    }

    impl Gate {
        /// A console thread writing into this gate, without a kick.
        pub(crate) fn start(&self, console: &Arc<Console>) -> ConsoleThread {
            ConsoleThread::start(
                console.clone(),
                ConsoleSink::Writer(Box::new(self.clone())),
                Box::new(|| {}),
            )
            .unwrap()
        }

        pub(crate) fn release(&self) {
            *self.open.0.lock().unwrap() = true;
            self.open.1.notify_all();
        }
    }

    impl Write for Gate {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let mut open = self.open.0.lock().unwrap();
            while !*open {
                open = self.open.1.wait(open).unwrap();
            }
            self.out.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Polls `f` until it holds (10 s at most).
    pub(crate) fn wait_for(what: &str, f: impl Fn() -> bool) {
        let t = Instant::now();
        while !f() {
            assert!(t.elapsed() < Duration::from_secs(10), "timed out: {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{wait_for, Gate};
    use super::*;
    use std::os::fd::FromRawFd;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn full_buffer_drops_and_counts_then_drains() {
        let console = Console::new();
        let gate = Gate::default();
        let kicks = Arc::new(AtomicUsize::new(0));
        let k = kicks.clone();
        let thread = ConsoleThread::start(
            console.clone(),
            ConsoleSink::Writer(Box::new(gate.clone())),
            Box::new(move || {
                k.fetch_add(1, Ordering::SeqCst);
            }),
        )
        .unwrap();
        console.push(b"x");
        // The thread has taken the first byte and is stuck writing it.
        wait_for("the thread takes the first chunk", || {
            console.pending() == 0
        });
        console.push(&vec![b'a'; BUFFER_CAPACITY]);
        assert!(console.congested());
        console.push(b"lost");
        assert_eq!(console.stats().dropped, 4);
        gate.release();
        wait_for("the kick", || kicks.load(Ordering::SeqCst) == 1);
        assert!(!console.congested());
        let stats = thread.finish(Duration::from_secs(5));
        assert_eq!(stats.written, 1 + BUFFER_CAPACITY as u64);
        assert_eq!(stats.dropped, 4);
        assert_eq!(gate.out.lock().unwrap().len(), 1 + BUFFER_CAPACITY);
    }

    #[test]
    fn finish_gives_up_on_a_sink_that_never_takes() {
        let console = Console::new();
        let gate = Gate::default();
        let thread = gate.start(&console);
        console.push(b"first");
        wait_for("the thread takes the first chunk", || {
            console.pending() == 0
        });
        console.push(b"second");
        let t = Instant::now();
        let stats = thread.finish(Duration::from_millis(100));
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        assert_eq!(stats.dropped, 6, "the pending bytes are counted");
        assert_eq!(stats.written, 0);
        gate.release();
    }

    #[test]
    fn nothing_after_close_reaches_the_sink() {
        let console = Console::new();
        let sink = Gate::default();
        sink.release();
        let thread = sink.start(&console);
        console.push(b"hi\n");
        console.close();
        console.push(b"reboot: Restarting system\n");
        assert!(!console.congested());
        let stats = thread.finish(Duration::from_secs(5));
        assert_eq!(&*sink.out.lock().unwrap(), b"hi\n");
        assert_eq!(stats.after_close, 26);
        assert_eq!(stats.written, 3);
    }

    #[test]
    fn pipe_that_is_never_read() {
        // The descriptor path: poll + write on a pipe whose reader never
        // reads. finish() must still return within its limit.
        let mut fds = [0; 2];
        // SAFETY: a valid array for pipe(2) to fill.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: pipe(2) returned both descriptors, owned by nobody else.
        let (read_end, write_end) =
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let console = Console::new();
        let thread =
            ConsoleThread::start(console.clone(), ConsoleSink::Fd(write_end), Box::new(|| {}))
                .unwrap();
        let mut pushed = 0;
        while pushed <= 4 * BUFFER_CAPACITY as u64 {
            console.push(&[b'z'; 1024]);
            pushed += 1024;
            std::thread::sleep(Duration::from_micros(50));
        }
        assert!(console.congested(), "the pipe and the buffer fill up");
        let t = Instant::now();
        let stats = thread.finish(Duration::from_millis(100));
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        assert!(stats.written >= 4096, "{stats:?}");
        assert_eq!(stats.written + stats.dropped, pushed, "{stats:?}");
        drop(read_end);
    }
}
