//! `vmlab-runtime`: vmlab as an OCI runtime, called by Docker, Podman and
//! containerd the way they call runc (runc's command line, the OCI
//! runtime spec's lifecycle and state).
//!
//! Each container is one micro-VM with vmlab's kernel. The pieces:
//!
//! - [`cli`]: the runc-compatible command line and the dispatch.
//! - [`state`]: a container's state directory under `--root`.
//! - [`spec`]: the bundle's `config.json` turned into a `vmlab run`
//!   command line (root over virtio-fs, mounts, process, resources).
//! - [`monitor`]: the process whose pid `create` writes to `--pid-file`.
//!   It enters or makes the container's network namespace, waits for
//!   `start`, wires the engine's veth to a TAP ([`net`]) and then becomes
//!   `vmlab run` (the same pid), so it lives until the workload ends and
//!   exits with its status: the contract every engine's shim relies on.
//! - [`process`]: `exec` (a host process per guest process, through the
//!   guest agent) and the terminal handed to `--console-socket`.
//!
//! ../shared/oci-runtime-notes.md (in the project notes) and README's
//! "vmlab as an OCI runtime" say how the engines call it.

pub mod cli;
pub mod dns;
pub mod monitor;
pub mod net;
pub mod process;
pub mod spec;
pub mod state;

/// The name the runtime answers to (a link to the `vmlab` binary).
pub const RUNTIME_NAME: &str = "vmlab-runtime";

/// A failed runtime call, one line for the engine to show.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Said in words.
    #[error("{0}")]
    Msg(String),
    /// A system call or file operation.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        source: std::io::Error,
    },
}

impl Error {
    /// A message error.
    pub fn msg(s: impl Into<String>) -> Error {
        Error::Msg(s.into())
    }
    /// An I/O error with what was being done.
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let what = what.into();
        move |source| Error::Io { what, source }
    }
}

/// The result of a runtime call.
pub type Result<T> = std::result::Result<T, Error>;

/// Waits until `fd` is readable (or hung up): true; false when `timeout`
/// (`None`: none) passed first. An interrupted wait is resumed.
pub(crate) fn wait_readable(
    fd: std::os::fd::BorrowedFd<'_>,
    timeout: Option<std::time::Duration>,
) -> std::io::Result<bool> {
    use std::os::fd::AsRawFd;
    let deadline = timeout.map(|t| std::time::Instant::now() + t);
    loop {
        let ms = match deadline {
            // Rounded up, so a short remainder does not spin at 0 ms.
            Some(d) => {
                let left = d.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    return Ok(false);
                }
                i32::try_from(left.as_millis().saturating_add(1)).unwrap_or(i32::MAX)
            }
            None => -1,
        };
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll on one pollfd, valid for the call.
        match unsafe { libc::poll(&mut pfd, 1, ms) } {
            n if n > 0 => return Ok(true),
            0 => {}
            _ => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
}
