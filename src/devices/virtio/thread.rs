//! One thread per virtio device (as Cloud Hypervisor runs its devices).
//!
//! Each device owns a [`DeviceThread`] from the moment it is created
//! until the VM stops. The thread has its own epoll set over
//!
//! - the fds of the activated device ([`DeviceWorker::register`]): its
//!   queue-notification eventfds (KVM signals them on QueueNotify) and its
//!   backend fds (a TAP);
//! - a kill eventfd ([`DeviceThread::stop`]): the VM is over;
//! - a pause eventfd ([`DeviceThread::pause`]/[`resume`](DeviceThread::resume)):
//!   stop serving queues, e.g. while a snapshot is taken;
//! - a command eventfd: the transport, on a vCPU thread, hands over an
//!   activated device or asks for a reset, through a channel.
//!
//! No lock is shared between devices or with a vCPU: a device blocked in
//! its backend (a long fdatasync) delays nothing but itself. A guest reset
//! is a message: [`DeviceThread::reset`] returns at once, the thread
//! finishes the request it is serving, drops the device's queues and then
//! reports the reset complete ([`DeviceThread::reset_complete`]); the
//! transport reads Status as non-zero until then.
//!
//! Fairness inside a device: a handler serves at most a budget of chains
//! ([`super::queue::QUEUE_BUDGET`]) and returns [`Work::More`] if it left
//! work; the thread then polls instead of sleeping and calls it again only
//! after every other ready fd of the device had its turn, so a busy
//! receive path cannot starve transmit, nor the other way round.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::queue::Work;
use super::Interrupt;

/// epoll data of the thread's own eventfds; a device's tokens must be
/// below [`FIRST_RESERVED_TOKEN`].
const KILL_TOKEN: u64 = u64::MAX;
const PAUSE_TOKEN: u64 = u64::MAX - 1;
const COMMAND_TOKEN: u64 = u64::MAX - 2;
/// Tokens from here up are the thread's.
pub const FIRST_RESERVED_TOKEN: u64 = u64::MAX - 2;

/// Events taken per `epoll_wait`.
const EVENT_BATCH: usize = 16;

/// An activated device as its thread runs it: its queues, backend and
/// buffers.
pub trait DeviceWorker: Send {
    /// Adds the device's fds to the thread's epoll set.
    fn register(&mut self, fds: &mut EpollSet<'_>) -> io::Result<()>;

    /// The fd registered with `token` is ready, or the handler left work
    /// ([`Work::More`]) last time. A handler for an eventfd reads it
    /// first (level-triggered epoll calls again while it is readable).
    fn handle(&mut self, token: u64, fds: &mut EpollSet<'_>) -> Work;

    /// The interrupt of the device, to report a failed activation
    /// (DEVICE_NEEDS_RESET).
    fn interrupt(&self) -> &Interrupt;
}

/// The thread's epoll set, as a worker sees it.
pub struct EpollSet<'a> {
    epoll: &'a Epoll,
    registered: &'a mut Vec<RawFd>,
}

impl EpollSet<'_> {
    /// Watches `fd` for readability, reported as `token`.
    pub fn add(&mut self, fd: &impl AsRawFd, token: u64) -> io::Result<()> {
        if token >= FIRST_RESERVED_TOKEN {
            return Err(io::Error::other(format!("epoll token {token} is reserved")));
        }
        let fd = fd.as_raw_fd();
        self.epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, token),
        )?;
        self.registered.push(fd);
        Ok(())
    }

    /// Turns `fd`'s readable interest on or off (a device that cannot take
    /// more input leaves it alone until it can). epoll still reports
    /// errors and hang-ups of an fd whose interest is off.
    pub fn set_readable(&self, fd: &impl AsRawFd, token: u64, on: bool) -> io::Result<()> {
        let events = if on { EventSet::IN } else { EventSet::empty() };
        self.epoll.ctl(
            ControlOperation::Modify,
            fd.as_raw_fd(),
            EpollEvent::new(events, token),
        )
    }

    /// Stops watching `fd`.
    pub fn remove(&mut self, fd: &impl AsRawFd) {
        let fd = fd.as_raw_fd();
        // The fd may be closed already, which removed it from the set.
        let _ = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        self.registered.retain(|&r| r != fd);
    }
}

enum Command {
    Activate(Box<dyn DeviceWorker>),
    /// Reset number n (counted from 1).
    Reset(u64),
}

/// State shared by the thread and its controllers, all atomic.
#[derive(Default)]
struct Shared {
    resets_requested: AtomicU64,
    resets_done: AtomicU64,
    want_paused: AtomicBool,
    paused: AtomicBool,
}

struct Inner {
    name: String,
    commands: Mutex<Sender<Command>>,
    command_fd: EventFd,
    kill: EventFd,
    pause: EventFd,
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// A device's thread. Cheap to clone: the device keeps one (activation,
/// reset), the device manager another (stop at VM exit).
#[derive(Clone)]
pub struct DeviceThread {
    inner: Arc<Inner>,
}

/// Errors of a device thread.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The epoll set or an eventfd could not be created.
    #[error("device thread {name}: {what}: {source}")]
    Setup {
        /// The thread's name.
        name: String,
        /// What failed.
        what: &'static str,
        /// Why.
        source: io::Error,
    },
    /// The thread has stopped (the VM is shutting down).
    #[error("device thread {0} has stopped")]
    Stopped(String),
}

impl DeviceThread {
    /// Starts a thread named `name` with nothing to serve yet.
    pub fn spawn(name: &str) -> Result<DeviceThread, Error> {
        let setup = |what| {
            let name = name.to_string();
            move |source| Error::Setup { name, what, source }
        };
        let epoll = Epoll::new().map_err(setup("epoll_create"))?;
        let command_fd = EventFd::new(EFD_NONBLOCK).map_err(setup("eventfd"))?;
        let kill = EventFd::new(EFD_NONBLOCK).map_err(setup("eventfd"))?;
        let pause = EventFd::new(EFD_NONBLOCK).map_err(setup("eventfd"))?;
        for (fd, token) in [
            (&command_fd, COMMAND_TOKEN),
            (&kill, KILL_TOKEN),
            (&pause, PAUSE_TOKEN),
        ] {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, token),
                )
                .map_err(setup("epoll_ctl"))?;
        }
        let (tx, rx) = channel();
        let shared = Arc::new(Shared::default());
        let mut run = Runner {
            epoll,
            commands: rx,
            command_fd: command_fd.try_clone().map_err(setup("eventfd"))?,
            kill: kill.try_clone().map_err(setup("eventfd"))?,
            pause: pause.try_clone().map_err(setup("eventfd"))?,
            shared: shared.clone(),
            worker: None,
            registered: Vec::new(),
            pending: Vec::new(),
        };
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || run.run())
            .map_err(setup("spawning the thread"))?;
        Ok(DeviceThread {
            inner: Arc::new(Inner {
                name: name.to_string(),
                commands: Mutex::new(tx),
                command_fd,
                kill,
                pause,
                shared,
                thread: Mutex::new(Some(thread)),
            }),
        })
    }

    /// The thread's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    fn send(&self, command: Command) -> Result<(), Error> {
        let sent = self
            .inner
            .commands
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(command);
        if sent.is_err() {
            return Err(Error::Stopped(self.inner.name.clone()));
        }
        if let Err(e) = self.inner.command_fd.write(1) {
            // Only an overflowing counter fails: the thread is woken.
            log::debug!("device thread {}: {e}", self.inner.name);
        }
        Ok(())
    }

    /// Hands an activated device to the thread. Returns at once.
    pub fn activate(&self, worker: Box<dyn DeviceWorker>) -> Result<(), Error> {
        self.send(Command::Activate(worker))
    }

    /// Asks the thread to drop the activated device (after the request
    /// it serves now, if any). Returns at once; see
    /// [`reset_complete`](Self::reset_complete).
    pub fn reset(&self) {
        let n = self
            .inner
            .shared
            .resets_requested
            .fetch_add(1, Ordering::AcqRel)
            + 1;
        if self.send(Command::Reset(n)).is_err() {
            // No thread, no worker: nothing touches guest memory.
            self.inner.shared.resets_done.store(n, Ordering::Release);
        }
    }

    /// Whether every reset asked for is done: the device no longer
    /// touches guest memory.
    pub fn reset_complete(&self) -> bool {
        let s = &self.inner.shared;
        s.resets_done.load(Ordering::Acquire) == s.resets_requested.load(Ordering::Acquire)
    }

    /// Stops serving the device's queues until [`resume`](Self::resume);
    /// [`is_paused`](Self::is_paused) tells when the thread has.
    pub fn pause(&self) {
        self.inner.shared.want_paused.store(true, Ordering::Release);
        let _ = self.inner.pause.write(1);
    }

    /// Serves the queues again.
    pub fn resume(&self) {
        self.inner
            .shared
            .want_paused
            .store(false, Ordering::Release);
        let _ = self.inner.pause.write(1);
    }

    /// Whether the thread is paused now.
    pub fn is_paused(&self) -> bool {
        self.inner.shared.paused.load(Ordering::Acquire)
    }

    /// Tells the thread to stop (after the request it serves now) and
    /// waits for it. False if it panicked. Later calls return true.
    pub fn stop(&self) -> bool {
        let thread = self
            .inner
            .thread
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let Some(thread) = thread else {
            return true;
        };
        if let Err(e) = self.inner.kill.write(1) {
            log::error!("cannot stop device thread {}: {e}", self.inner.name);
            return false;
        }
        thread.join().is_ok()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(thread) = self
            .thread
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            let _ = self.kill.write(1);
            let _ = thread.join();
        }
    }
}

/// The thread's side.
struct Runner {
    epoll: Epoll,
    commands: Receiver<Command>,
    command_fd: EventFd,
    kill: EventFd,
    pause: EventFd,
    shared: Arc<Shared>,
    worker: Option<Box<dyn DeviceWorker>>,
    registered: Vec<RawFd>,
    /// Tokens whose handler left work, in the order they yielded.
    pending: Vec<u64>,
}

/// Blocks the signals that stop vmlab on the calling thread: device
/// threads start while the VM is built, before the control loop blocks
/// them for its signalfd, and a SIGTERM delivered to a device thread would
/// kill vmlab without flushing its disks.
fn block_stop_signals() {
    // SAFETY: sigset_t is plain data, initialized by sigemptyset.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t and the signal numbers are valid;
    // pthread_sigmask changes only this thread's mask.
    let rc = unsafe {
        libc::sigemptyset(&mut set);
        for sig in crate::signals::STOP_SIGNALS {
            libc::sigaddset(&mut set, sig);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut())
    };
    if rc != 0 {
        log::warn!(
            "device thread: cannot block the stop signals: {}",
            io::Error::from_raw_os_error(rc)
        );
    }
}

impl Runner {
    fn run(&mut self) {
        block_stop_signals();
        let mut events = [EpollEvent::default(); EVENT_BATCH];
        let mut paused = false;
        loop {
            let timeout = if self.pending.is_empty() || paused {
                -1
            } else {
                0
            };
            let n = match self.epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("device thread: epoll_wait: {e}; the device stops");
                    return;
                }
            };
            let mut served: Vec<u64> = Vec::new();
            for event in &events[..n] {
                match event.data() {
                    KILL_TOKEN => return,
                    PAUSE_TOKEN => {
                        let _ = self.pause.read();
                        paused = self.shared.want_paused.load(Ordering::Acquire);
                        self.shared.paused.store(paused, Ordering::Release);
                    }
                    COMMAND_TOKEN => {
                        let _ = self.command_fd.read();
                        self.commands();
                    }
                    token if !paused => {
                        self.handle(token);
                        served.push(token);
                    }
                    // Paused: queue and backend fds stay readable and are
                    // seen again on resume; the thread waits for kill,
                    // pause and commands only.
                    _ => {
                        self.wait_while_paused(&mut paused);
                    }
                }
            }
            if !paused {
                // Handlers that yielded go after every fd that was ready.
                let again: Vec<u64> = self
                    .pending
                    .iter()
                    .copied()
                    .filter(|t| !served.contains(t))
                    .collect();
                for token in again {
                    self.handle(token);
                }
            }
        }
    }

    /// Paused with device fds ready: waits on the thread's own fds only
    /// (level-triggered epoll would otherwise report the device's again
    /// at once).
    fn wait_while_paused(&mut self, paused: &mut bool) {
        let mut fds = [
            libc::pollfd {
                fd: self.kill.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.pause.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.command_fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a live array of three pollfds and the count
        // says three; poll only writes their `revents`.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 3, -1) };
        if n <= 0 {
            return;
        }
        if fds[0].revents != 0 {
            // Seen by the next epoll_wait.
            return;
        }
        if fds[1].revents != 0 {
            let _ = self.pause.read();
            *paused = self.shared.want_paused.load(Ordering::Acquire);
            self.shared.paused.store(*paused, Ordering::Release);
        }
        if fds[2].revents != 0 {
            let _ = self.command_fd.read();
            self.commands();
        }
    }

    fn handle(&mut self, token: u64) {
        let Some(worker) = self.worker.as_mut() else {
            return;
        };
        let mut set = EpollSet {
            epoll: &self.epoll,
            registered: &mut self.registered,
        };
        match worker.handle(token, &mut set) {
            Work::More => {
                if !self.pending.contains(&token) {
                    self.pending.push(token);
                }
            }
            Work::Done => self.pending.retain(|&t| t != token),
        }
    }

    fn commands(&mut self) {
        while let Ok(command) = self.commands.try_recv() {
            match command {
                Command::Activate(mut worker) => {
                    self.drop_worker();
                    let mut set = EpollSet {
                        epoll: &self.epoll,
                        registered: &mut self.registered,
                    };
                    match worker.register(&mut set) {
                        Ok(()) => self.worker = Some(worker),
                        Err(e) => {
                            log::error!("virtio device: cannot watch its fds: {e}");
                            worker.interrupt().signal_needs_reset();
                            self.drop_worker();
                        }
                    }
                }
                Command::Reset(n) => {
                    self.drop_worker();
                    self.shared.resets_done.store(n, Ordering::Release);
                }
            }
        }
    }

    /// Forgets the activated device and its fds.
    fn drop_worker(&mut self) {
        for fd in self.registered.drain(..) {
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        }
        self.pending.clear();
        self.worker = None;
    }
}

/// A worker's event handling on the calling thread, one round at a time
/// (tests of a device's handlers).
#[cfg(test)]
pub(crate) struct TestLoop {
    epoll: Epoll,
    registered: Vec<RawFd>,
}

#[cfg(test)]
impl TestLoop {
    pub(crate) fn new() -> TestLoop {
        TestLoop {
            epoll: Epoll::new().unwrap(),
            registered: Vec::new(),
        }
    }

    /// Adds `worker`'s fds.
    pub(crate) fn register(&mut self, worker: &mut dyn DeviceWorker) {
        worker
            .register(&mut EpollSet {
                epoll: &self.epoll,
                registered: &mut self.registered,
            })
            .unwrap();
    }

    /// One epoll_wait without waiting and the handlers of what is ready.
    pub(crate) fn run_once(&mut self, worker: &mut dyn DeviceWorker) {
        let mut events = [EpollEvent::default(); EVENT_BATCH];
        let n = self.epoll.wait(0, &mut events).unwrap();
        for event in &events[..n] {
            worker.handle(
                event.data(),
                &mut EpollSet {
                    epoll: &self.epoll,
                    registered: &mut self.registered,
                },
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::wait_until;
    use std::sync::atomic::AtomicUsize;
    use std::time::{Duration, Instant};

    /// Two "queues": token 0 always has work (never runs dry), token 1
    /// is served once per notification. Records, each time token 1 is
    /// served, how many turns token 0 had while token 1 was waiting.
    struct Greedy {
        busy: Arc<EventFd>,
        quiet: Arc<EventFd>,
        busy_rounds: Arc<AtomicUsize>,
        quiet_served_at: Arc<Mutex<Vec<usize>>>,
        waited: usize,
        interrupt: Interrupt,
    }

    fn readable(fd: &EventFd) -> bool {
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one live pollfd, count one, no wait.
        unsafe { libc::poll(&mut pfd, 1, 0) == 1 }
    }

    impl DeviceWorker for Greedy {
        fn register(&mut self, fds: &mut EpollSet<'_>) -> io::Result<()> {
            fds.add(&*self.busy, 0)?;
            fds.add(&*self.quiet, 1)
        }
        fn handle(&mut self, token: u64, _fds: &mut EpollSet<'_>) -> Work {
            match token {
                0 => {
                    let _ = self.busy.read();
                    self.busy_rounds.fetch_add(1, Ordering::SeqCst);
                    if readable(&self.quiet) {
                        self.waited += 1;
                    }
                    Work::More
                }
                _ => {
                    let _ = self.quiet.read();
                    self.quiet_served_at.lock().unwrap().push(self.waited);
                    self.waited = 0;
                    Work::Done
                }
            }
        }
        fn interrupt(&self) -> &Interrupt {
            &self.interrupt
        }
    }

    #[test]
    fn a_queue_that_always_has_work_does_not_starve_the_other() {
        let thread = DeviceThread::spawn("test-greedy").unwrap();
        let busy = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let quiet = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let busy_rounds = Arc::new(AtomicUsize::new(0));
        let served = Arc::new(Mutex::new(Vec::new()));
        thread
            .activate(Box::new(Greedy {
                busy: busy.clone(),
                quiet: quiet.clone(),
                busy_rounds: busy_rounds.clone(),
                quiet_served_at: served.clone(),
                waited: 0,
                interrupt: Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()),
            }))
            .unwrap();
        busy.write(1).unwrap();
        wait_until("the busy queue to run", || {
            busy_rounds.load(Ordering::SeqCst) > 100
        });
        for i in 0..20 {
            quiet.write(1).unwrap();
            wait_until("the quiet queue", || served.lock().unwrap().len() > i);
            let waited = served.lock().unwrap()[i];
            // Served in the round it became ready or the next one: the
            // busy queue got at most a couple of turns meanwhile.
            assert!(
                waited <= 2,
                "the quiet queue waited {waited} turns of the busy one"
            );
        }
        assert!(
            busy_rounds.load(Ordering::SeqCst) > 100,
            "the busy queue ran on"
        );
        assert!(thread.stop());
    }

    /// A worker whose handler blocks until told to go on.
    struct Stuck {
        fd: Arc<EventFd>,
        go: Arc<(Mutex<bool>, std::sync::Condvar)>,
        entered: Arc<AtomicBool>,
        interrupt: Interrupt,
    }

    impl DeviceWorker for Stuck {
        fn register(&mut self, fds: &mut EpollSet<'_>) -> io::Result<()> {
            fds.add(&*self.fd, 0)
        }
        fn handle(&mut self, _token: u64, _fds: &mut EpollSet<'_>) -> Work {
            let _ = self.fd.read();
            self.entered.store(true, Ordering::SeqCst);
            let (lock, cv) = &*self.go;
            let mut go = lock.lock().unwrap();
            while !*go {
                go = cv.wait(go).unwrap();
            }
            Work::Done
        }
        fn interrupt(&self) -> &Interrupt {
            &self.interrupt
        }
    }

    #[test]
    fn reset_returns_at_once_and_completes_after_the_request() {
        let thread = DeviceThread::spawn("test-stuck").unwrap();
        assert!(thread.reset_complete(), "nothing to reset yet");
        let fd = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let go = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
        let entered = Arc::new(AtomicBool::new(false));
        thread
            .activate(Box::new(Stuck {
                fd: fd.clone(),
                go: go.clone(),
                entered: entered.clone(),
                interrupt: Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()),
            }))
            .unwrap();
        fd.write(1).unwrap();
        wait_until("the request to start", || entered.load(Ordering::SeqCst));
        let start = Instant::now();
        thread.reset();
        assert!(start.elapsed() < Duration::from_millis(100));
        std::thread::sleep(Duration::from_millis(20));
        assert!(!thread.reset_complete(), "the request is still in flight");
        *go.0.lock().unwrap() = true;
        go.1.notify_all();
        wait_until("the reset", || thread.reset_complete());
        // The worker is gone: a notification reaches nobody.
        entered.store(false, Ordering::SeqCst);
        fd.write(1).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert!(!entered.load(Ordering::SeqCst));
        assert!(thread.stop());
        assert!(thread.stop(), "a second stop is harmless");
    }

    /// Reports whether SIGTERM is blocked on the thread that handles it.
    struct MaskProbe {
        fd: Arc<EventFd>,
        blocked: std::sync::mpsc::Sender<bool>,
        interrupt: Interrupt,
    }

    impl DeviceWorker for MaskProbe {
        fn register(&mut self, fds: &mut EpollSet<'_>) -> io::Result<()> {
            fds.add(&*self.fd, 0)
        }
        fn handle(&mut self, _token: u64, _fds: &mut EpollSet<'_>) -> Work {
            let _ = self.fd.read();
            // SAFETY: plain data, filled by pthread_sigmask.
            let mut mask: libc::sigset_t = unsafe { std::mem::zeroed() };
            // SAFETY: a null new set only reads this thread's mask.
            let member = unsafe {
                libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut mask);
                libc::sigismember(&mask, libc::SIGTERM)
            };
            let _ = self.blocked.send(member == 1);
            Work::Done
        }
        fn interrupt(&self) -> &Interrupt {
            &self.interrupt
        }
    }

    /// Device threads start before the control loop blocks the stop
    /// signals; they block them themselves, or a SIGTERM could land on one
    /// and kill vmlab without flushing its disks.
    #[test]
    fn device_threads_never_take_stop_signals() {
        let thread = DeviceThread::spawn("test-signals").unwrap();
        let fd = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let (tx, rx) = std::sync::mpsc::channel();
        thread
            .activate(Box::new(MaskProbe {
                fd: fd.clone(),
                blocked: tx,
                interrupt: Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()),
            }))
            .unwrap();
        fd.write(1).unwrap();
        assert!(rx.recv_timeout(Duration::from_secs(10)).unwrap());
        assert!(thread.stop());
    }

    #[test]
    fn pause_and_resume() {
        let thread = DeviceThread::spawn("test-pause").unwrap();
        let busy = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let quiet = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let rounds = Arc::new(AtomicUsize::new(0));
        let served = Arc::new(Mutex::new(Vec::new()));
        thread
            .activate(Box::new(Greedy {
                busy: busy.clone(),
                quiet: quiet.clone(),
                busy_rounds: rounds.clone(),
                quiet_served_at: served.clone(),
                waited: 0,
                interrupt: Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()),
            }))
            .unwrap();
        thread.pause();
        wait_until("the pause", || thread.is_paused());
        quiet.write(1).unwrap();
        std::thread::sleep(Duration::from_millis(30));
        assert!(served.lock().unwrap().is_empty(), "paused: nothing served");
        thread.resume();
        wait_until("the resume", || served.lock().unwrap().len() == 1);
        assert!(!thread.is_paused());
        assert!(thread.stop());
    }
}
