//! The frontend side of the vhost-user protocol, over rust-vmm's `vhost`
//! crate: what vmlab tells a backend about guest memory and each queue.
//!
//! The sequence (vhost-user spec, "Starting and stopping rings"):
//! - at attach time: SET_OWNER, GET_FEATURES, GET/SET_PROTOCOL_FEATURES,
//!   SET_MEM_TABLE (every RAM region as the memfd behind it);
//! - when the driver starts the device: SET_FEATURES (what the driver
//!   accepted), then per queue SET_VRING_NUM, SET_VRING_ADDR (as vmlab's
//!   own virtual addresses: the backend translates them through the memory
//!   table), SET_VRING_BASE, SET_VRING_CALL, SET_VRING_KICK and
//!   SET_VRING_ENABLE;
//! - on a reset: GET_VRING_BASE per queue, which stops the ring.
//!
//! Every reply is awaited with a timeout ([`REPLY_TIMEOUT`]): a backend
//! that stops answering fails the call instead of hanging vmlab.

use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::Duration;

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// VHOST_USER_F_PROTOCOL_FEATURES: a feature bit of vhost-user itself,
/// never offered to the guest.
pub const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;

/// How long vmlab waits for any one reply of the backend.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// A vhost-user call that failed.
#[derive(Debug, thiserror::Error)]
#[error("vhost-user backend at {socket}: {what}: {reason}")]
pub struct VhostUserError {
    /// The backend's socket.
    pub socket: String,
    /// The request.
    pub what: &'static str,
    /// Why.
    pub reason: String,
}

/// A connected backend.
pub struct Backend {
    frontend: Frontend,
    socket: String,
    /// The virtio features the backend offers (without the vhost-user bit).
    features: u64,
    protocol: bool,
}

impl Backend {
    /// Connects to the backend at `socket`, negotiates the protocol and
    /// gives it guest memory, which must be file-backed (a memfd).
    pub fn connect(
        socket: &Path,
        queues: usize,
        mem: &GuestMemoryMmap,
    ) -> Result<Backend, VhostUserError> {
        let name = socket.display().to_string();
        let fail = |what: &'static str| {
            let socket = name.clone();
            move |e: vhost::Error| VhostUserError {
                socket,
                what,
                reason: e.to_string(),
            }
        };
        let mut frontend = Frontend::connect(socket, queues as u64).map_err(fail("connect"))?;
        set_timeout(&frontend, REPLY_TIMEOUT).map_err(|e| VhostUserError {
            socket: name.clone(),
            what: "SO_RCVTIMEO",
            reason: e.to_string(),
        })?;
        frontend.set_owner().map_err(fail("SET_OWNER"))?;
        let offered = frontend.get_features().map_err(fail("GET_FEATURES"))?;
        let protocol = offered & VHOST_USER_F_PROTOCOL_FEATURES != 0;
        if protocol {
            let theirs = frontend
                .get_protocol_features()
                .map_err(fail("GET_PROTOCOL_FEATURES"))?;
            // MQ: the backend says how many queues it serves (checked
            // below); REPLY_ACK: every request is acknowledged, so an
            // error surfaces at the request that caused it.
            let wanted = VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK;
            frontend
                .set_protocol_features(theirs & wanted)
                .map_err(fail("SET_PROTOCOL_FEATURES"))?;
            if theirs.contains(VhostUserProtocolFeatures::MQ) {
                let n = frontend.get_queue_num().map_err(fail("GET_QUEUE_NUM"))?;
                if n < queues as u64 {
                    return Err(VhostUserError {
                        socket: name,
                        what: "GET_QUEUE_NUM",
                        reason: format!("serves {n} queues, the device has {queues}"),
                    });
                }
            }
        }
        let regions = mem
            .iter()
            .map(VhostUserMemoryRegionInfo::from_guest_region)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| VhostUserError {
                socket: name.clone(),
                what: "SET_MEM_TABLE",
                reason: format!("guest memory is not shareable (not a memfd): {e}"),
            })?;
        frontend
            .set_mem_table(&regions)
            .map_err(fail("SET_MEM_TABLE"))?;
        Ok(Backend {
            frontend,
            socket: name,
            features: offered & !VHOST_USER_F_PROTOCOL_FEATURES,
            protocol,
        })
    }

    /// The virtio features the backend offers.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// The connection (its fd reports the backend's hang-up).
    pub fn socket_fd(&self) -> std::os::fd::RawFd {
        self.frontend.as_raw_fd()
    }

    fn fail(&self, what: &'static str) -> impl Fn(vhost::Error) -> VhostUserError + '_ {
        move |e| VhostUserError {
            socket: self.socket.clone(),
            what,
            reason: e.to_string(),
        }
    }

    /// The driver started the device: tells the backend the accepted
    /// features and every queue's rings, kick and call eventfds.
    pub fn start(
        &mut self,
        mem: &GuestMemoryMmap,
        acked: u64,
        queues: &[(&Queue, &EventFd, &EventFd)],
    ) -> Result<(), VhostUserError> {
        let extra = if self.protocol {
            VHOST_USER_F_PROTOCOL_FEATURES
        } else {
            0
        };
        self.frontend
            .set_features(acked | extra)
            .map_err(self.fail("SET_FEATURES"))?;
        for (index, (queue, kick, call)) in queues.iter().enumerate() {
            let hva = |addr: u64, what| {
                mem.get_host_address(GuestAddress(addr))
                    .map(|p| p as u64)
                    .map_err(|e| VhostUserError {
                        socket: self.socket.clone(),
                        what: "SET_VRING_ADDR",
                        reason: format!("queue {index}: the {what} is outside guest memory: {e}"),
                    })
            };
            let config = VringConfigData {
                queue_max_size: queue.max_size(),
                queue_size: queue.size(),
                flags: 0,
                desc_table_addr: hva(queue.desc_table(), "descriptor table")?,
                used_ring_addr: hva(queue.used_ring(), "used ring")?,
                avail_ring_addr: hva(queue.avail_ring(), "available ring")?,
                log_addr: None,
            };
            self.frontend
                .set_vring_num(index, queue.size())
                .map_err(self.fail("SET_VRING_NUM"))?;
            self.frontend
                .set_vring_addr(index, &config)
                .map_err(self.fail("SET_VRING_ADDR"))?;
            self.frontend
                .set_vring_base(index, queue.next_avail())
                .map_err(self.fail("SET_VRING_BASE"))?;
            self.frontend
                .set_vring_call(index, call)
                .map_err(self.fail("SET_VRING_CALL"))?;
            self.frontend
                .set_vring_kick(index, kick)
                .map_err(self.fail("SET_VRING_KICK"))?;
            if self.protocol {
                self.frontend
                    .set_vring_enable(index, true)
                    .map_err(self.fail("SET_VRING_ENABLE"))?;
            }
        }
        Ok(())
    }

    /// The driver reset the device: stops every ring (GET_VRING_BASE).
    pub fn stop(&mut self, queues: usize) -> Result<(), VhostUserError> {
        for index in 0..queues {
            if self.protocol {
                self.frontend
                    .set_vring_enable(index, false)
                    .map_err(self.fail("SET_VRING_ENABLE"))?;
            }
            self.frontend
                .get_vring_base(index)
                .map_err(self.fail("GET_VRING_BASE"))?;
        }
        Ok(())
    }
}

/// Bounds every wait for a reply on the connection.
fn set_timeout(frontend: &Frontend, timeout: Duration) -> std::io::Result<()> {
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: libc::suseconds_t::from(timeout.subsec_micros() as i32),
    };
    // SAFETY: the fd is the frontend's live socket; `tv` is a valid
    // timeval of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            frontend.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            std::ptr::addr_of!(tv).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
