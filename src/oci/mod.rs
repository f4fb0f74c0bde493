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
