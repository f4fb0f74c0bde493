//! Container images: OCI image layouts, `docker save` archives and plain
//! root-filesystem directories, turned into a root filesystem (a directory
//! for an OCI runtime, an ext4 disk for a micro-VM) plus the image's
//! process configuration.
//!
//! - `oci`: finding the config and the layers, verifying digests;
//! - [`layers`]: applying layer tarballs (whiteouts, opaque directories,
//!   refusing entries that would escape the root);
//! - `cache`: the extracted root filesystems and ext4 disks, cached by
//!   image ID under `~/.cache/vmlab/images`, and per-run disk copies;
//! - `ext4`: the disk image for a VM, with vmlab's init injected;
//! - `init`: finding the vmlab-init binary.

mod cache;
mod config;
mod digest;
mod ext4;
mod init;
mod initrd;
pub mod layers;
mod oci;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod testutil;

use std::io;
use std::path::{Path, PathBuf};

/// Entry points for the fuzz targets in `fuzz/` (the `fuzzing` feature).
#[cfg(feature = "fuzzing")]
pub mod fuzzing {
    use super::{oci, Error, ImageConfig};
    use std::path::Path;

    /// Opens the image at `path` (an OCI layout or `docker save` directory
    /// or archive) and resolves its index, manifest and config, verifying
    /// their digests, without applying any layer: the config and the
    /// number of layers.
    pub fn resolve(path: &Path) -> Result<(ImageConfig, usize), Error> {
        match oci::open(path)? {
            oci::Source::RootfsDir(_) => Ok((ImageConfig::default(), 0)),
            oci::Source::Image(store) => {
                let r = oci::resolve(&store)?;
                Ok((r.config, r.layers.len()))
            }
        }
    }
}

pub use cache::{cache_root, prepare_ext4_in, prepare_rootfs_dir_in, RunDisk};
pub use config::ImageConfig;
pub use init::{find_init, GUEST_INIT_PATH};

/// Why an image could not be used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The image path cannot be read.
    #[error("{}: {source}", path.display())]
    Access {
        /// The path given.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The path exists but is no image vmlab knows.
    #[error("{}: not an image: {reason}", path.display())]
    NotAnImage {
        /// The path given.
        path: PathBuf,
        /// What it looks like instead.
        reason: String,
    },
    /// Malformed image metadata (JSON, digests, counts).
    #[error("{0}")]
    Format(String),
    /// A blob's content does not match the digest that names it.
    #[error("{what}: digest mismatch: expected {expected}, got {actual} (the image is corrupt or was modified)")]
    DigestMismatch {
        /// Which blob.
        what: String,
        /// The digest the metadata gives.
        expected: String,
        /// The digest of the content.
        actual: String,
    },
    /// A blob's size does not match its descriptor.
    #[error("{what}: size mismatch: the descriptor says {expected} bytes, the blob has {actual}")]
    SizeMismatch {
        /// Which blob.
        what: String,
        /// Descriptor size.
        expected: u64,
        /// Actual size.
        actual: u64,
    },
    /// A file the metadata names is not in the image.
    #[error("{}: {what} is missing from the image", image.display())]
    MissingBlob {
        /// Which file.
        what: String,
        /// The image.
        image: PathBuf,
    },
    /// No linux/amd64 image in an index.
    #[error("{}: no linux/amd64 image in the index (found: {found})", image.display())]
    NoPlatform {
        /// The image.
        image: PathBuf,
        /// The platforms that were there.
        found: String,
    },
    /// Something valid that vmlab does not handle.
    #[error("{0}")]
    Unsupported(String),
    /// A layer could not be applied (an unsafe entry, a broken archive, a
    /// host file system error).
    #[error("{layer}: {source}")]
    Layer {
        /// Image and layer.
        layer: String,
        /// What went wrong.
        source: layers::Error,
    },
    /// `VMLAB_IMAGE_MAX_BYTES` or `VMLAB_IMAGE_MAX_ENTRIES` is malformed.
    #[error("image limits: {0}")]
    Limits(String),
    /// A host file operation failed (cache, disk image).
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// The operation.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// No directory to cache images in.
    #[error("no cache directory for images: set XDG_CACHE_HOME or HOME")]
    NoCacheDir,
    /// mkfs.ext4 is missing or failed.
    #[error("making the ext4 disk image {}: {message}", path.display())]
    Mkfs {
        /// The image being made.
        path: PathBuf,
        /// What went wrong, with mkfs.ext4's own message.
        message: String,
    },
    /// The guest init binary cannot be found or used.
    #[error("{0}")]
    Init(String),
    /// Neither the command line nor the image names a program.
    #[error("{}: the image has no Entrypoint or Cmd: give a command after --", image.display())]
    NoCommand {
        /// The image.
        image: PathBuf,
    },
}

/// The image's root filesystem as a directory, and its process
/// configuration: the extracted layers, cached under
/// `$XDG_CACHE_HOME/vmlab/images/<image ID>/rootfs` (or `~/.cache/...`)
/// and built atomically (a temporary directory renamed into place), or, for
/// a plain root-filesystem directory, that directory itself with a default
/// configuration.
///
/// The directory is shared by every user of the image: treat it as
/// read-only (stack a writable layer on it, e.g. overlayfs).
pub fn prepare_rootfs_dir(image: &Path) -> Result<(PathBuf, ImageConfig), Error> {
    prepare_rootfs_dir_in(image, &cache_root()?)
}

/// The image's root filesystem as an ext4 disk image for a VM, with
/// vmlab's guest init (`init`, see [`find_init`]) at [`GUEST_INIT_PATH`],
/// and its process configuration. Cached next to the root filesystem
/// directory, keyed by the image ID and the init binary's digest; for a
/// plain directory it is rebuilt on every call. Boot a [`RunDisk`] copy of
/// it, not the file itself: the cached disk must stay as built.
pub fn prepare_ext4(image: &Path, init: &Path) -> Result<(PathBuf, ImageConfig), Error> {
    prepare_ext4_in(image, init, &cache_root()?)
}

/// Everything `vmlab run --image` needs: a per-run copy of the image's
/// disk (removed when dropped), and what the guest init must run.
pub struct VmImage {
    /// The disk to boot as /dev/vda.
    pub disk: RunDisk,
    /// The argument vector: entrypoint + (command or Cmd).
    pub argv: Vec<String>,
    /// The image's configuration.
    pub config: ImageConfig,
}

/// `vmlab run --image --root-device fs`: the image's cached root file
/// system (shared read-only over virtio-fs; nothing is copied), the
/// initramfs with vmlab's init that switches root to it, and what the
/// init must run.
pub struct FsImage {
    /// The image's root file system directory (shared, read-only).
    pub rootfs: PathBuf,
    /// The initramfs to boot.
    pub initrd: PathBuf,
    /// The argument vector: entrypoint + (command or Cmd).
    pub argv: Vec<String>,
    /// The image's configuration.
    pub config: ImageConfig,
}

/// Prepares `image` for a VM whose root is the image's directory over
/// virtio-fs, running `command` (empty: the image's Cmd).
pub fn prepare_vm_fs(image: &Path, command: &[String]) -> Result<FsImage, Error> {
    let cache = cache_root()?;
    let prepared = cache::prepare(image, &cache)?;
    let argv = prepared.config.process_args(command);
    if argv.is_empty() {
        return Err(Error::NoCommand {
            image: image.to_path_buf(),
        });
    }
    let initrd = fs_root_initrd_in(&cache)?;
    Ok(FsImage {
        rootfs: prepared.rootfs,
        initrd,
        argv,
        config: prepared.config,
    })
}

/// The generic initramfs of a VM whose root file system is a virtio-fs
/// share (vmlab's init and the directories it mounts on, nothing else;
/// cached next to the images): what `--image --root-device fs` and
/// `vmlab run --rootfs DIR` boot.
pub fn fs_root_initramfs() -> Result<PathBuf, Error> {
    fs_root_initrd_in(&cache_root()?)
}

fn fs_root_initrd_in(cache: &Path) -> Result<PathBuf, Error> {
    let init = find_init()?;
    let digest = cache::init_digest(&init)?;
    initrd::fs_root_initrd(&init, cache, &digest)
}

/// Prepares `image` for a VM boot running `command` (empty: the image's
/// Cmd), as `docker run IMAGE [COMMAND...]` would.
pub fn prepare_vm(image: &Path, command: &[String]) -> Result<VmImage, Error> {
    // The image first: its errors are about the user's input.
    let prepared = cache::prepare(image, &cache_root()?)?;
    let argv = prepared.config.process_args(command);
    if argv.is_empty() {
        return Err(Error::NoCommand {
            image: image.to_path_buf(),
        });
    }
    let ext4 = cache::disk(&prepared, &find_init()?)?;
    let disk = RunDisk::copy_of(&ext4)?;
    Ok(VmImage {
        disk,
        argv,
        config: prepared.config,
    })
}
