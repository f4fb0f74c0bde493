//! `vmlab container`: the same image as a container on the host, through a
//! real OCI runtime (runc or crun), for VM-versus-container comparisons.
//!
//! The path, top to bottom ([`run`]): the image's root and process
//! configuration; the host's cgroup layout and a runtime that works with
//! it ([`runtime::select`]); `config.json` ([`bundle::build_spec`]); a
//! bundle whose root is an overlay on the image root ([`rootfs::Bundle`]);
//! `RUNTIME run` in the foreground with vmlab's stdio; then
//! `RUNTIME delete --force`, unmount, and removal of the bundle, on every
//! path.

pub mod bundle;
pub mod cgroups;
pub mod rootfs;
pub mod runtime;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::image::ImageConfig;
use cgroups::CgroupHost;
use rootfs::{Bundle, RootKind};
use runtime::RunOutcome;
pub use runtime::RuntimeRequest;

/// Exit status for vmlab's own failures, as `docker run` uses 125.
pub const EXIT_VMLAB_ERROR: u8 = 125;

/// The container's network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Network {
    /// A network namespace of its own with only a loopback interface.
    #[default]
    None,
    /// The host's network (no network namespace).
    Host,
}

/// What `vmlab container` was asked to do.
#[derive(Debug, Clone, Default)]
pub struct ContainerOptions {
    /// The image: an OCI layout, a `docker save` archive, or a root
    /// file-system directory.
    pub image: PathBuf,
    /// The command after `--` (replaces the image's Cmd when not empty).
    pub command: Vec<String>,
    /// Which OCI runtime.
    pub runtime: RuntimeRequest,
    /// Memory limit in bytes.
    pub memory: Option<u64>,
    /// Container id and host name; `vmlab-<pid>-<n>` when not given.
    pub name: Option<String>,
    /// Network namespace or host network.
    pub network: Network,
    /// An existing network namespace to join (e.g. `/run/netns/NAME`)
    /// instead of a fresh one; `vmlab compare` puts the container on a veth
    /// pair this way.
    pub netns: Option<PathBuf>,
}

/// What can go wrong on the container path.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Mounting and running runtimes takes root.
    #[error("vmlab container must run as root (it mounts the container's root file system and runs the OCI runtime)")]
    NotRoot,
    /// The image could not be opened or extracted.
    #[error("image: {0}")]
    Image(#[from] crate::image::Error),
    /// The image's `User` cannot be resolved.
    #[error("image user '{user}': {reason}")]
    User {
        /// The `User` value.
        user: String,
        /// Why.
        reason: String,
    },
    /// Neither the image nor the command line names a program.
    #[error("the image has no Entrypoint or Cmd: give a command after --")]
    NoCommand,
    /// The image's working directory is relative.
    #[error("the image's working directory '{0}' is not an absolute path")]
    WorkingDir(String),
    /// The memory limit does not fit the runtime spec's signed 64 bits.
    #[error("memory limit {0} bytes is too large")]
    MemoryLimit(u64),
    /// Building the runtime spec failed.
    #[error("building config.json: {0}")]
    Spec(#[from] oci_spec::OciSpecError),
    /// No runtime is installed.
    #[error("no OCI runtime found (looked for runc and crun in PATH and /usr/sbin, /usr/bin, /sbin, /bin); install one: apt-get install runc")]
    NoRuntime,
    /// Runtimes are installed, but none works on this host.
    #[error("no OCI runtime works on this host: {0}")]
    NoUsableRuntime(String),
    /// The requested runtime is missing or unusable.
    #[error("runtime {runtime}: {reason}")]
    Runtime {
        /// Its name or path.
        runtime: String,
        /// Why it cannot be used.
        reason: String,
    },
    /// The runtime already has a container with this id.
    #[error("{runtime} already has a container named {id} (see `{runtime} list`): choose another --name")]
    NameInUse {
        /// The runtime's name.
        runtime: String,
        /// The id.
        id: String,
    },
    /// The runtime could not start the container's process.
    #[error("{runtime} could not start the container: {message}")]
    Start {
        /// The runtime's name.
        runtime: String,
        /// The runtime's error.
        message: String,
        /// Exit status for it (126, 127, 125).
        code: u8,
    },
    /// Copying the image root (where overlayfs is unavailable) failed.
    #[error("cannot copy the image root: {0}")]
    RootCopy(String),
    /// A file vmlab reads out of the image is not what it must be.
    #[error("the image's {path}: {reason}")]
    ImageFile {
        /// The path inside the image.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A file operation failed.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A host facility (signals, processes) failed.
    #[error("{what}: {source}")]
    Host {
        /// What was being done.
        what: &'static str,
        /// The error.
        source: std::io::Error,
    },
}

impl Error {
    /// vmlab's exit status for this error: the runtime's 126/127 for a
    /// command that cannot be executed or found, else 125.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Start { code, .. } => *code,
            _ => EXIT_VMLAB_ERROR,
        }
    }
}

/// Checks a `--name`: what runc accepts as a container id, and short
/// enough to be a host name.
pub fn parse_name(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!(
            "'{s}' is not a container name: 1-64 letters, digits, '_', '.', '-', starting with a letter or digit"
        ))
    }
}

/// Runs the image as a container and returns its exit status.
pub fn run(opts: &ContainerOptions) -> Result<u8, Error> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(Error::NotRoot);
    }
    let (image_root, image) = open_image(&opts.image)?;
    let host = CgroupHost::detect();
    log::debug!("host cgroups: {}", host.describe());
    let runtime = runtime::select(&opts.runtime, &host)?;
    log::info!(
        "container runtime: {} ({})",
        runtime.version,
        runtime.path.display()
    );

    let (id, bundle_dir) = names(opts.name.as_deref());
    // Checked first because the cleanup deletes container `id` by force:
    // it must be ours, not another one that has this name.
    if runtime.exists(&id) {
        return Err(Error::NameInUse {
            runtime: runtime.name(),
            id,
        });
    }
    let memory_limit = match opts.memory {
        Some(bytes) if host.memory_usable() => Some(bytes),
        Some(_) => {
            log::warn!(
                "no usable memory cgroup controller on this host ({}): running without a memory limit",
                host.describe()
            );
            None
        }
        None => None,
    };
    let terminal = std::io::stdin().is_terminal() && std::io::stdout().is_terminal();
    // Built before anything is mounted: a bad image user or a missing
    // command fails here with nothing to clean up.
    let spec = bundle::build_spec(&bundle::SpecInput {
        image: &image,
        command: &opts.command,
        image_rootfs: &image_root,
        root_path: Path::new("rootfs"),
        hostname: &id,
        terminal,
        memory_limit,
        network: opts.network,
        netns: opts.netns.as_deref(),
        cgroup_namespace: CgroupHost::has_cgroup_namespaces(),
    })?;

    if let Err(e) = rootfs::enter_private_mount_namespace() {
        log::debug!("no private mount namespace ({e}): mounting in the host's");
    }
    // Blocked from before the runtime starts until the bundle is gone, so
    // that a SIGTERM or ^C cannot skip the cleanup. Declared before the
    // bundle: dropped after it.
    let signals = crate::signals::Signals::new().map_err(|source| Error::Host {
        what: "blocking signals",
        source,
    })?;
    let (bundle, kind) = Bundle::create(bundle_dir, &image_root)?;
    if kind == RootKind::Copy {
        log::info!("the container's root is a copy of {}", image_root.display());
    }
    bundle.write_config(&spec)?;
    log::debug!("bundle {}, container {id}", bundle.dir().display());

    let outcome = runtime.run(bundle.dir(), &bundle.log_path(), &id, &signals);
    // Whatever happened: no container, mount or bundle left behind.
    runtime.delete(&id);
    drop(bundle);
    drop(signals);

    match outcome? {
        RunOutcome::Exited(code) => Ok(code),
        RunOutcome::Stopped(sig) => Ok(u8::try_from(128 + sig).unwrap_or(EXIT_VMLAB_ERROR)),
        RunOutcome::StartFailed { message, code } => Err(Error::Start {
            runtime: runtime.name(),
            message,
            code,
        }),
    }
}

/// The container id and the bundle directory for this run.
fn names(name: Option<&str>) -> (String, PathBuf) {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let pid = std::process::id();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let id = match name {
        Some(name) => name.to_string(),
        None => format!("vmlab-{pid}-{n}"),
    };
    // Named after vmlab's pid, not the container name, so a leftover of a
    // killed run with the same --name does not collide.
    let dir = std::env::temp_dir().join(format!("vmlab-bundle-{pid}-{n}"));
    (id, dir)
}

/// The image's root directory (a plain directory as given, or the cached
/// extraction of an image, shared with other runs: only ever the lower
/// layer of the container's overlay) and its process configuration.
fn open_image(path: &Path) -> Result<(PathBuf, ImageConfig), Error> {
    Ok(crate::image::prepare_rootfs_dir(path)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_ids() {
        assert!(parse_name("web-1").is_ok());
        assert!(parse_name("a.b_c").is_ok());
        assert!(parse_name("").is_err());
        assert!(parse_name("-x").is_err());
        assert!(parse_name("a/b").is_err());
        assert!(parse_name("a b").is_err());
        assert!(parse_name(&"x".repeat(65)).is_err());
        let (a, da) = names(None);
        let (b, db) = names(None);
        assert_ne!(a, b);
        assert_ne!(da, db);
        assert!(a.starts_with("vmlab-"));
        let (c, _) = names(Some("web"));
        assert_eq!(c, "web");
    }

    #[test]
    fn exit_codes() {
        assert_eq!(Error::NoRuntime.exit_code(), 125);
        assert_eq!(
            Error::Start {
                runtime: "runc".into(),
                message: "exec: nope: executable file not found".into(),
                code: 127
            }
            .exit_code(),
            127
        );
        assert!(Error::NoRuntime
            .to_string()
            .contains("apt-get install runc"));
    }

    #[test]
    fn missing_image() {
        let e = open_image(Path::new("/nonexistent/image")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/image"), "{e}");
    }
}
