//! The "virtio" thread: an epoll loop that runs device work off the vCPU
//! threads.
//!
//! A device registers a file descriptor (a queue's notification eventfd)
//! with an [`EventHandler`]; when the fd becomes readable the loop calls
//! the handler with the token the device chose. Registration works from
//! any thread at any time, before or after the loop starts, because
//! devices are activated by the guest driver on a vCPU thread.
//!
//! Handlers run one at a time, so a slow request delays the other
//! devices' work but never a vCPU. A handler must leave its fd unreadable
//! (read the eventfd), or the level-triggered loop calls it again at once.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Name of the event loop's thread.
pub const THREAD_NAME: &str = "virtio";

/// epoll data of the stop eventfd; registrations count up from 1.
const STOP_ID: u64 = 0;

/// Events handled per `epoll_wait`.
const EVENT_BATCH: usize = 32;

/// Work to do when a registered fd becomes readable.
pub trait EventHandler: Send {
    /// `token` is the value given at registration (e.g. a queue index).
    fn handle(&mut self, token: u64);
}

/// A handler shared between the device that owns it and the loop.
pub type SharedHandler = Arc<Mutex<dyn EventHandler>>;

/// Errors of the event loop.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// epoll_create failed.
    #[error("cannot create the virtio event loop's epoll: {0}")]
    Epoll(#[source] io::Error),
    /// The stop eventfd could not be created.
    #[error("cannot create the virtio event loop's stop eventfd: {0}")]
    EventFd(#[source] io::Error),
    /// epoll_ctl refused the fd.
    #[error("cannot add fd {fd} to the virtio event loop: {source}")]
    Register {
        /// The fd.
        fd: RawFd,
        /// Why.
        source: io::Error,
    },
    /// epoll_ctl refused to change the fd's interest.
    #[error("cannot change the interest of fd {fd} in the virtio event loop: {source}")]
    Modify {
        /// The fd.
        fd: RawFd,
        /// Why.
        source: io::Error,
    },
    /// The thread could not be started.
    #[error("cannot start the virtio thread: {0}")]
    Spawn(#[source] io::Error),
    /// epoll_wait failed.
    #[error("virtio event loop: epoll_wait: {0}")]
    Wait(#[source] io::Error),
}

struct Entry {
    token: u64,
    handler: SharedHandler,
}

struct Shared {
    epoll: Epoll,
    stop: EventFd,
    handlers: Mutex<HashMap<u64, Entry>>,
    next_id: AtomicU64,
}

impl Shared {
    fn handlers(&self) -> MutexGuard<'_, HashMap<u64, Entry>> {
        self.handlers.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// An event loop that has not started yet. [`EventLoop::start`] runs it
/// on its own thread; [`EventLoop::handle`] gives devices a way to
/// register with it.
pub struct EventLoop {
    shared: Arc<Shared>,
}

/// Lets devices register fds with the loop, from any thread.
#[derive(Clone)]
pub struct EventLoopHandle {
    shared: Arc<Shared>,
}

/// A registered fd; pass it back to [`EventLoopHandle::unregister`].
#[derive(Debug)]
#[must_use = "a registration must be unregistered before its fd is closed"]
pub struct Registration {
    id: u64,
    fd: RawFd,
}

impl EventLoop {
    /// A new loop with no registrations.
    pub fn new() -> Result<EventLoop, Error> {
        let epoll = Epoll::new().map_err(Error::Epoll)?;
        let stop = EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?;
        epoll
            .ctl(
                ControlOperation::Add,
                stop.as_raw_fd(),
                EpollEvent::new(EventSet::IN, STOP_ID),
            )
            .map_err(|source| Error::Register {
                fd: stop.as_raw_fd(),
                source,
            })?;
        Ok(EventLoop {
            shared: Arc::new(Shared {
                epoll,
                stop,
                handlers: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(STOP_ID + 1),
            }),
        })
    }

    /// A handle for devices.
    pub fn handle(&self) -> EventLoopHandle {
        EventLoopHandle {
            shared: self.shared.clone(),
        }
    }

    /// Runs the loop on a new thread named [`THREAD_NAME`].
    pub fn start(self) -> Result<EventLoopThread, Error> {
        let shared = self.shared.clone();
        let thread = std::thread::Builder::new()
            .name(THREAD_NAME.into())
            .spawn(move || {
                if let Err(e) = run(&shared, -1) {
                    log::error!("{e}; virtio devices stop working");
                }
            })
            .map_err(Error::Spawn)?;
        Ok(EventLoopThread {
            shared: self.shared,
            thread: Some(thread),
        })
    }

    /// Handles the events ready within `timeout_ms` (-1: wait for one) on
    /// the calling thread; returns false once stop was requested. For
    /// tests and single-threaded use.
    pub fn run_once(&self, timeout_ms: i32) -> Result<bool, Error> {
        dispatch(&self.shared, timeout_ms)
    }
}

/// The running loop. Dropping it stops the thread and waits for it.
pub struct EventLoopThread {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl EventLoopThread {
    /// A handle for devices.
    pub fn handle(&self) -> EventLoopHandle {
        EventLoopHandle {
            shared: self.shared.clone(),
        }
    }

    /// Stops the loop after the handler running now (if any) and waits
    /// for the thread. Returns false if the thread panicked.
    pub fn stop(mut self) -> bool {
        self.stop_and_join()
    }

    fn stop_and_join(&mut self) -> bool {
        let Some(thread) = self.thread.take() else {
            return true;
        };
        if let Err(e) = self.shared.stop.write(1) {
            log::warn!("cannot stop the virtio thread: {e}");
            return false;
        }
        thread.join().is_ok()
    }
}

impl Drop for EventLoopThread {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

impl EventLoopHandle {
    /// Calls `handler.handle(token)` on the loop whenever `fd` is
    /// readable, until unregistered. The caller keeps `fd` open until
    /// then.
    pub fn register(
        &self,
        fd: &impl AsRawFd,
        token: u64,
        handler: SharedHandler,
    ) -> Result<Registration, Error> {
        let fd = fd.as_raw_fd();
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        // In the table before epoll knows the fd, so that an event that
        // fires at once finds its handler.
        self.shared.handlers().insert(id, Entry { token, handler });
        if let Err(source) =
            self.shared
                .epoll
                .ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, id))
        {
            self.shared.handlers().remove(&id);
            return Err(Error::Register { fd, source });
        }
        Ok(Registration { id, fd })
    }

    /// Turns a registration's interest in readability on or off, without
    /// forgetting it: a device that cannot take more input (virtio-net
    /// with no receive buffers) leaves its fd alone until it can. epoll
    /// still reports errors and hang-ups of an fd whose interest is off.
    pub fn set_readable(&self, registration: &Registration, readable: bool) -> Result<(), Error> {
        let events = if readable {
            EventSet::IN
        } else {
            EventSet::empty()
        };
        self.shared
            .epoll
            .ctl(
                ControlOperation::Modify,
                registration.fd,
                EpollEvent::new(events, registration.id),
            )
            .map_err(|source| Error::Modify {
                fd: registration.fd,
                source,
            })
    }

    /// Stops calling the registration's handler. An event the loop has
    /// already taken may still reach the handler once after this returns,
    /// so a handler must also be told it is stopped (see the block
    /// device's `running` flag).
    pub fn unregister(&self, registration: Registration) {
        // The fd may already be closed, which removed it from the epoll
        // set; the table entry is what matters.
        let _ = self.shared.epoll.ctl(
            ControlOperation::Delete,
            registration.fd,
            EpollEvent::default(),
        );
        self.shared.handlers().remove(&registration.id);
    }

    /// Number of registrations (for tests and diagnostics).
    pub fn registrations(&self) -> usize {
        self.shared.handlers().len()
    }
}

fn run(shared: &Shared, timeout_ms: i32) -> Result<(), Error> {
    while dispatch(shared, timeout_ms)? {}
    Ok(())
}

/// One epoll_wait and its handlers; false when stop was requested.
fn dispatch(shared: &Shared, timeout_ms: i32) -> Result<bool, Error> {
    let mut events = [EpollEvent::default(); EVENT_BATCH];
    let n = match shared.epoll.wait(timeout_ms, &mut events) {
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(true),
        Err(e) => return Err(Error::Wait(e)),
    };
    for event in &events[..n] {
        let id = event.data();
        if id == STOP_ID {
            let _ = shared.stop.read();
            return Ok(false);
        }
        // Clone the handler out so the table is unlocked while it runs:
        // a device being reset on a vCPU thread must be able to
        // unregister meanwhile.
        let entry = shared
            .handlers()
            .get(&id)
            .map(|e| (e.token, e.handler.clone()));
        if let Some((token, handler)) = entry {
            handler
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .handle(token);
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::{channel, Sender};
    use std::time::Duration;

    struct Forward {
        fd: Arc<EventFd>,
        tx: Sender<(u64, String)>,
    }

    impl EventHandler for Forward {
        fn handle(&mut self, token: u64) {
            let _ = self.fd.read();
            let name = std::thread::current().name().unwrap_or("").to_string();
            let _ = self.tx.send((token, name));
        }
    }

    #[test]
    fn handlers_run_on_the_virtio_thread() {
        let event_loop = EventLoop::new().unwrap();
        let handle = event_loop.handle();
        let thread = event_loop.start().unwrap();
        let fd = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let (tx, rx) = channel();
        let reg = handle
            .register(
                &*fd,
                7,
                Arc::new(Mutex::new(Forward { fd: fd.clone(), tx })),
            )
            .unwrap();
        assert_eq!(handle.registrations(), 1);
        fd.write(1).unwrap();
        let (token, name) = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(token, 7);
        assert_eq!(name, THREAD_NAME);

        handle.unregister(reg);
        assert_eq!(handle.registrations(), 0);
        fd.write(1).unwrap();
        assert!(rx.recv_timeout(Duration::from_millis(20)).is_err());
        assert!(thread.stop());
    }

    #[test]
    fn run_once_dispatches_and_stops() {
        let event_loop = EventLoop::new().unwrap();
        let fd = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let (tx, rx) = channel();
        let _reg = event_loop
            .handle()
            .register(
                &*fd,
                3,
                Arc::new(Mutex::new(Forward { fd: fd.clone(), tx })),
            )
            .unwrap();
        assert!(event_loop.run_once(0).unwrap());
        assert!(rx.try_recv().is_err(), "nothing readable yet");
        fd.write(1).unwrap();
        assert!(event_loop.run_once(0).unwrap());
        assert_eq!(rx.try_recv().unwrap().0, 3);
        event_loop.shared.stop.write(1).unwrap();
        assert!(!event_loop.run_once(0).unwrap());
    }

    #[test]
    fn bad_fd_is_rejected() {
        let event_loop = EventLoop::new().unwrap();
        let (tx, _rx) = channel();
        let fd = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        struct Bad;
        impl AsRawFd for Bad {
            fn as_raw_fd(&self) -> RawFd {
                -1
            }
        }
        let err = event_loop
            .handle()
            .register(&Bad, 0, Arc::new(Mutex::new(Forward { fd, tx })))
            .unwrap_err();
        assert!(matches!(err, Error::Register { fd: -1, .. }));
        assert_eq!(event_loop.handle().registrations(), 0);
    }

    #[test]
    fn dropping_the_thread_stops_it() {
        let thread = EventLoop::new().unwrap().start().unwrap();
        drop(thread);
    }
}
