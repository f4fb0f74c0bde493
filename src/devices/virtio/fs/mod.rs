//! virtio-fs (device type 26) with its file system served by a
//! vhost-user backend (virtiofsd), as QEMU's `vhost-user-fs-device` and
//! Cloud Hypervisor's `--fs` do.
//!
//! - [`vhost_user`]: the frontend side of the vhost-user protocol: the
//!   connection, feature negotiation, the guest memory table (guest RAM
//!   is a memfd mapping the daemon maps too) and each queue's rings and
//!   eventfds.
//! - [`device`]: what the transport sees (the tag and the number of
//!   request queues in the configuration space, two queues) and the
//!   worker on the device's thread.
//!
//! The daemon reads the rings and the guest's buffers itself. Queue
//! notifications reach it straight from KVM (the QueueNotify ioeventfd is
//! its kick fd). Its "call" eventfds come to the device thread, which sets
//! the transport's InterruptStatus bit before it raises the interrupt, as
//! virtio-mmio needs. The thread also watches the daemon's socket: if the
//! daemon dies, vmlab answers every request still queued, and every later
//! one, with a FUSE error (EIO), so the guest's file operations fail
//! instead of waiting forever ([`device`]).

pub mod device;
pub mod vhost_user;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

pub use device::Fs;
pub use vhost_user::VhostUserError;

/// The longest tag: `struct virtio_fs_config { u8 tag[36]; le32 num_request_queues; }`.
pub const MAX_TAG_LEN: usize = 36;

/// A virtio-fs device as the user (or vmlab itself, for a `--volume`)
/// describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsConfig {
    /// The tag the guest mounts (`mount -t virtiofs TAG /path`).
    pub tag: String,
    /// The vhost-user socket of the backend (virtiofsd).
    pub socket: PathBuf,
}

/// Checks a tag given by the user: 1 to 36 bytes, no NUL, no white space
/// (it goes on the guest's mount command line).
pub fn validate_tag(tag: &str) -> Result<(), String> {
    if tag.is_empty() {
        return Err("a virtio-fs tag must not be empty".into());
    }
    if tag.len() > MAX_TAG_LEN {
        return Err(format!(
            "virtio-fs tag {tag:?} is {} bytes long; at most {MAX_TAG_LEN}",
            tag.len()
        ));
    }
    if tag
        .bytes()
        .any(|b| b == 0 || b.is_ascii_whitespace() || b == b',' || b == b':')
    {
        return Err(format!(
            "virtio-fs tag {tag:?} contains a space, NUL, ',' or ':'"
        ));
    }
    Ok(())
}

/// What the VMM keeps of a virtio-fs device.
#[derive(Debug, Clone)]
pub struct FsHandle {
    tag: String,
    socket: PathBuf,
    state: Arc<FsState>,
}

/// Shared by the device, its workers and the VMM.
#[derive(Debug, Default)]
pub struct FsState {
    /// The backend closed its socket (or never answered).
    backend_gone: AtomicBool,
    /// Requests vmlab answered with EIO because the backend was gone.
    failed_requests: AtomicU64,
}

impl FsHandle {
    /// The tag.
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// The backend's socket.
    pub fn socket(&self) -> &std::path::Path {
        &self.socket
    }

    /// Whether the backend went away while the VM ran.
    pub fn backend_gone(&self) -> bool {
        self.state.backend_gone.load(Ordering::Acquire)
    }

    /// Requests vmlab failed with EIO after the backend went away.
    pub fn failed_requests(&self) -> u64 {
        self.state.failed_requests.load(Ordering::Relaxed)
    }
}
