//! The virtio-fs device: what the transport sees (type 26, a high-priority
//! queue and one request queue, the tag in the configuration space), and
//! the worker that runs on the device's own thread once the driver starts
//! the device.
//!
//! The worker sets the backend's rings up (on the device thread, so that no
//! vCPU waits for the daemon), relays its "call" eventfds as interrupts,
//! and watches its socket. When the daemon goes away it takes the queues
//! over: from the used index on, each request is answered with a FUSE
//! error reply (`-EIO`), and each FORGET (no reply) is returned empty.
//! vmlab starts virtiofsd without a thread pool, so the daemon completes
//! requests in order and the used index is exactly where its unanswered
//! requests begin.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use virtio_queue::desc::split::Descriptor;
use virtio_queue::QueueT;
use vm_memory::{Address, Bytes, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::vhost_user::Backend;
use super::{FsConfig, FsHandle, FsState, MAX_TAG_LEN};
use crate::devices::virtio::device::{Activation, Device, DeviceModel};
use crate::devices::virtio::queue::{ChainError, VirtQueue, Work, QUEUE_BUDGET};
use crate::devices::virtio::thread::{self, DeviceWorker, EpollSet};
use crate::devices::virtio::{
    feature, ActivateError, DeviceQueue, Interrupt, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};

/// virtio-fs's device ID (virtio 1.2, 5.11).
pub const VIRTIO_ID_FS: u32 = 26;
/// Queue 0 is the high-priority queue (FORGET, INTERRUPT); 1 the requests.
pub const NUM_QUEUES: usize = 2;
/// Entries of each queue (Linux sizes its rings to this).
pub const QUEUE_SIZE: u16 = 1024;
/// Most descriptors in one chain vmlab reads when it answers for a dead
/// backend (headers plus a 1 MiB read in 4 KiB pages, and some).
pub const MAX_CHAIN: usize = 512;
/// Name of the device's thread.
pub const THREAD_NAME: &str = "virtio-fs";
/// EIO, as a FUSE reply carries it (negated errno).
const FUSE_EIO: i32 = -libc::EIO;
/// `struct fuse_out_header { u32 len; i32 error; u64 unique; }`.
const FUSE_OUT_HEADER_LEN: u32 = 16;
/// `struct fuse_in_header`'s `unique` is at this offset.
const FUSE_IN_UNIQUE_OFFSET: u64 = 8;

const TOKEN_SOCKET: u64 = 100;
/// Tokens `TOKEN_CALL + i`: queue i's call eventfd.
const TOKEN_CALL: u64 = 0;
/// Tokens `TOKEN_NOTIFY + i`: queue i's notifications, once vmlab serves it.
const TOKEN_NOTIFY: u64 = 50;

/// The virtio-fs device.
pub type Fs = Device<FsModel>;

/// virtio-fs's own state: the backend connection and what the VMM sees.
pub struct FsModel {
    /// The connection; `None` once it failed. Used by the worker on the
    /// device thread only (the lock is never contended).
    backend: Arc<Mutex<Option<Backend>>>,
    socket: String,
    state: Arc<FsState>,
    tag: String,
}

impl Device<FsModel> {
    /// Connects to the vhost-user backend of `config` (which must be
    /// running and listening), hands it guest memory (a memfd mapping) and
    /// starts the device's thread.
    pub fn connect(config: &FsConfig, mem: &GuestMemoryMmap) -> Result<Fs, super::VhostUserError> {
        let backend = Backend::connect(&config.socket, NUM_QUEUES, mem)?;
        // Indirect descriptors are not offered: vmlab must be able to read
        // every chain itself if it has to answer for a dead backend.
        let features =
            backend.features() & (feature(VIRTIO_F_VERSION_1) | feature(VIRTIO_RING_F_EVENT_IDX));
        let mut config_space = vec![0u8; MAX_TAG_LEN + 4];
        config_space[..config.tag.len()].copy_from_slice(config.tag.as_bytes());
        // num_request_queues
        config_space[MAX_TAG_LEN..].copy_from_slice(&1u32.to_le_bytes());
        let model = FsModel {
            backend: Arc::new(Mutex::new(Some(backend))),
            socket: config.socket.display().to_string(),
            state: Arc::default(),
            tag: config.tag.clone(),
        };
        Device::new(model, features, config_space, vec![QUEUE_SIZE; NUM_QUEUES]).map_err(|e| {
            super::VhostUserError {
                socket: config.socket.display().to_string(),
                what: "starting the device thread",
                reason: e.to_string(),
            }
        })
    }

    /// Tag, socket and state, for the VMM.
    pub fn handle(&self) -> FsHandle {
        let m = self.model();
        FsHandle {
            tag: m.tag.clone(),
            socket: m.socket.clone().into(),
            state: m.state.clone(),
        }
    }
}

impl DeviceModel for FsModel {
    const NAME: &'static str = THREAD_NAME;

    fn device_type(&self) -> u32 {
        VIRTIO_ID_FS
    }

    fn start(&mut self, a: Activation) -> Result<Box<dyn DeviceWorker>, ActivateError> {
        if a.queues.len() != NUM_QUEUES {
            return Err(ActivateError::QueueNotReady {
                index: NUM_QUEUES - 1,
            });
        }
        for (index, q) in a.queues.iter().enumerate() {
            if !q.queue.ready() {
                return Err(ActivateError::QueueNotReady { index });
            }
        }
        let mut calls = Vec::with_capacity(NUM_QUEUES);
        for _ in 0..NUM_QUEUES {
            calls.push(
                EventFd::new(EFD_NONBLOCK).map_err(|source| thread::Error::Setup {
                    name: THREAD_NAME.into(),
                    what: "call eventfd",
                    source,
                })?,
            );
        }
        Ok(Box::new(Worker {
            backend: self.backend.clone(),
            started: false,
            mem: a.mem,
            queues: a.queues,
            calls,
            interrupt: a.interrupt,
            features: a.features,
            state: self.state.clone(),
            tag: self.tag.clone(),
            served: Vec::new(),
        }))
    }
}

/// An activated virtio-fs device on its thread.
struct Worker {
    backend: Arc<Mutex<Option<Backend>>>,
    /// The backend's rings are set up (and must be stopped on a reset).
    started: bool,
    mem: GuestMemoryMmap,
    queues: Vec<DeviceQueue>,
    calls: Vec<EventFd>,
    interrupt: Arc<Interrupt>,
    features: u64,
    state: Arc<FsState>,
    tag: String,
    /// The queues vmlab serves itself (the backend is gone); empty while
    /// the backend runs.
    served: Vec<VirtQueue>,
}

impl DeviceWorker for Worker {
    fn register(&mut self, fds: &mut EpollSet<'_>) -> io::Result<()> {
        let mut backend = self.backend.lock().unwrap_or_else(|p| p.into_inner());
        let started = match backend.as_mut() {
            Some(b) => {
                let rings: Vec<_> = self
                    .queues
                    .iter()
                    .zip(&self.calls)
                    .map(|(q, call)| (&q.queue, &*q.notify, call))
                    .collect();
                match b.start(&self.mem, self.features, &rings) {
                    Ok(()) => Some(b.socket_fd()),
                    Err(e) => {
                        log::error!(
                            "virtio-fs {:?}: {e}; the guest's requests fail with EIO",
                            self.tag
                        );
                        None
                    }
                }
            }
            None => None,
        };
        match started {
            Some(socket) => {
                self.started = true;
                for (i, call) in self.calls.iter().enumerate() {
                    fds.add(call, TOKEN_CALL + i as u64)?;
                }
                fds.add(&socket, TOKEN_SOCKET)?;
            }
            None => {
                *backend = None;
                drop(backend);
                self.take_over(fds)?;
            }
        }
        Ok(())
    }

    fn handle(&mut self, token: u64, fds: &mut EpollSet<'_>) -> Work {
        match token {
            TOKEN_SOCKET => {
                // The backend sends nothing unasked: readable means it
                // closed the connection (it exited or crashed).
                let fd = self
                    .backend
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .take()
                    .map(|b| b.socket_fd());
                if let Some(fd) = fd {
                    fds.remove(&fd);
                }
                log::error!(
                    "virtio-fs {:?}: the vhost-user backend closed its socket (virtiofsd \
                     exited?); the guest's file operations on this share now fail with EIO",
                    self.tag
                );
                self.started = false;
                if let Err(e) = self.take_over(fds) {
                    log::error!("virtio-fs {:?}: {e}", self.tag);
                    self.interrupt.signal_needs_reset();
                    return Work::Done;
                }
                self.fail_all()
            }
            t if t >= TOKEN_NOTIFY && t < TOKEN_NOTIFY + NUM_QUEUES as u64 => self.fail_all(),
            t if t < NUM_QUEUES as u64 => {
                let _ = self.calls[t as usize].read();
                self.interrupt.signal_used_buffer();
                Work::Done
            }
            _ => Work::Done,
        }
    }

    fn interrupt(&self) -> &Interrupt {
        &self.interrupt
    }
}

impl Worker {
    /// The backend is gone: vmlab serves the queues from where the
    /// backend's completions end.
    fn take_over(&mut self, fds: &mut EpollSet<'_>) -> io::Result<()> {
        self.state.backend_gone.store(true, Ordering::Release);
        for (i, q) in std::mem::take(&mut self.queues).into_iter().enumerate() {
            let mut vq = VirtQueue::new(q, MAX_CHAIN);
            let used = vq
                .queue
                .used_idx(&self.mem, Ordering::Acquire)
                .map(|w| w.0)
                .unwrap_or(0);
            vq.queue.set_next_avail(used);
            vq.queue.set_next_used(used);
            fds.add(&**vq.notify_fd(), TOKEN_NOTIFY + i as u64)?;
            self.served.push(vq);
        }
        Ok(())
    }

    /// Answers every queued request with EIO.
    fn fail_all(&mut self) -> Work {
        let mut work = Work::Done;
        let mut failed = 0u64;
        for vq in &mut self.served {
            vq.ack_notification();
            let mem = &self.mem;
            let served = vq.serve(mem, &self.interrupt, QUEUE_BUDGET, |chain| {
                failed += 1;
                fail_request(mem, chain)
            });
            match served {
                Ok(w) => work = work.or(w),
                Err(broken) => {
                    log::warn!(
                        "virtio-fs {:?}: {broken}; the device needs a reset",
                        self.tag
                    );
                    self.interrupt.signal_needs_reset();
                    self.served.clear();
                    return Work::Done;
                }
            }
        }
        self.state
            .failed_requests
            .fetch_add(failed, Ordering::Relaxed);
        work
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if !self.started {
            return;
        }
        let mut backend = self.backend.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = backend.as_mut() {
            if let Err(e) = b.stop(NUM_QUEUES) {
                log::warn!("virtio-fs {:?}: {e}", self.tag);
                *backend = None;
            }
        }
    }
}

/// A FUSE request the backend will never answer: writes a reply header
/// with `-EIO` into its first writable buffer (none: a FORGET, which
/// wants no reply). Returns the used length.
fn fail_request(mem: &GuestMemoryMmap, chain: Result<&[Descriptor], ChainError>) -> u32 {
    let Ok(descs) = chain else {
        return 0;
    };
    let Some(request) = descs
        .first()
        .filter(|d| !d.is_write_only() && d.len() >= 16)
    else {
        return 0;
    };
    let Some(reply) = descs
        .iter()
        .find(|d| d.is_write_only() && d.len() >= FUSE_OUT_HEADER_LEN)
    else {
        return 0;
    };
    let Some(unique_at) = request.addr().checked_add(FUSE_IN_UNIQUE_OFFSET) else {
        return 0;
    };
    let Ok(unique) = mem.read_obj::<u64>(unique_at) else {
        return 0;
    };
    let mut header = [0u8; FUSE_OUT_HEADER_LEN as usize];
    header[0..4].copy_from_slice(&FUSE_OUT_HEADER_LEN.to_le_bytes());
    header[4..8].copy_from_slice(&FUSE_EIO.to_le_bytes());
    header[8..16].copy_from_slice(&unique.to_le_bytes());
    match mem.write_slice(&header, reply.addr()) {
        Ok(()) => FUSE_OUT_HEADER_LEN,
        Err(_) => 0,
    }
}
