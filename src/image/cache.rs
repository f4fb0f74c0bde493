//! The image cache: extracted root filesystems and ext4 disks, keyed by
//! image ID, and the per-run disk copies a VM boots.
//!
//! ```text
//! ~/.cache/vmlab/images/                ($XDG_CACHE_HOME/vmlab/images)
//!   sha256-<image ID>/
//!     rootfs/                           the applied layers (shared, read-only)
//!     vmlab-init-<init digest>.ext4     rootfs + vmlab's init, for VMs
//!     *.tmp-<pid>-<n>[.ext4]            in the making, or a run's disk copy
//!   dir-<path digest>/                  ext4 disks of plain directories
//! ```
//!
//! The image ID is the config's digest, which pins every layer through the
//! diff IDs that `oci::apply_layer` verifies: the same image read from an
//! OCI layout or a `docker save` archive shares one entry. Everything is
//! built under a temporary name and renamed into place, so a reader never
//! sees a partial tree or disk, and two vmlab processes building the same
//! image at once both succeed (the second rename loses and its copy is
//! dropped). Temporaries of processes that died are removed on the next
//! build in the same directory.

use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use oci_spec::image::Digest;

use super::digest::{sha256_of, Hasher};
use super::oci::{self, Resolved, Source, Store};
use super::{ext4, Error, ImageConfig};

/// The image cache directory: `$XDG_CACHE_HOME/vmlab/images`, else
/// `$HOME/.cache/vmlab/images` (where vmlab also caches its guest kernel).
pub fn cache_root() -> Result<PathBuf, Error> {
    let abs = |v: Option<std::ffi::OsString>| v.map(PathBuf::from).filter(|p| p.is_absolute());
    if let Some(x) = abs(std::env::var_os("XDG_CACHE_HOME")) {
        return Ok(x.join("vmlab/images"));
    }
    abs(std::env::var_os("HOME"))
        .map(|h| h.join(".cache/vmlab/images"))
        .ok_or(Error::NoCacheDir)
}

/// An image's root filesystem, ready to be used or turned into a disk.
pub(crate) struct Prepared {
    /// The root filesystem directory.
    pub rootfs: PathBuf,
    /// The process configuration.
    pub config: ImageConfig,
    /// Where its disk images go.
    disk_dir: PathBuf,
    /// Whether a disk built earlier may be reused (not for a plain
    /// directory, which can change at any time).
    reusable: bool,
}

/// Opens, verifies and (if needed) extracts `image`.
pub(crate) fn prepare(image: &Path, cache: &Path) -> Result<Prepared, Error> {
    match oci::open(image)? {
        Source::RootfsDir(dir) => {
            // One disk per directory (replaced on every build) rather than
            // a new one per run.
            let canonical = fs::canonicalize(&dir).map_err(|source| Error::Access {
                path: dir.clone(),
                source,
            })?;
            let key = sha256_of(canonical.as_os_str().as_encoded_bytes());
            Ok(Prepared {
                rootfs: dir,
                config: ImageConfig::default(),
                disk_dir: cache.join(format!("dir-{}", short(&key))),
                reusable: false,
            })
        }
        Source::Image(store) => {
            let r = oci::resolve(&store)?;
            let rootfs = extracted(&store, &r, cache)?;
            Ok(Prepared {
                rootfs,
                config: r.config,
                disk_dir: key_dir(cache, &r.id),
                reusable: true,
            })
        }
    }
}

/// The ext4 disk of a prepared image with the init `init`, building it if
/// needed.
pub(crate) fn disk(p: &Prepared, init: &Path) -> Result<PathBuf, Error> {
    // 16 hex digits tell init builds apart; the cache is not a security
    // boundary (the full digest would only make names longer).
    let out = p
        .disk_dir
        .join(format!("vmlab-init-{}.ext4", short(&file_digest(init)?)));
    if p.reusable && out.is_file() {
        return Ok(out);
    }
    create_dir(&p.disk_dir)?;
    ext4::build(&p.rootfs, init, &out)?;
    remove_other_disks(&p.disk_dir, &out);
    Ok(out)
}

/// Removes the disks this image had with other init builds: a rebuilt
/// init would otherwise leave one more disk per build. Runs in progress
/// are not disturbed: they boot their own copies.
fn remove_other_disks(dir: &Path, keep: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        let p = e.path();
        if name.starts_with("vmlab-init-") && name.ends_with(".ext4") && p != keep {
            log::debug!("removing the outdated disk {}", p.display());
            let _ = fs::remove_file(&p);
        }
    }
}

/// [`super::prepare_rootfs_dir`] with an explicit cache directory.
pub fn prepare_rootfs_dir_in(image: &Path, cache: &Path) -> Result<(PathBuf, ImageConfig), Error> {
    let p = prepare(image, cache)?;
    Ok((p.rootfs, p.config))
}

/// [`super::prepare_ext4`] with an explicit cache directory.
pub fn prepare_ext4_in(
    image: &Path,
    init: &Path,
    cache: &Path,
) -> Result<(PathBuf, ImageConfig), Error> {
    let p = prepare(image, cache)?;
    let out = disk(&p, init)?;
    Ok((out, p.config))
}

/// The 16 hex digits after `algorithm:`.
/// The short digest of an init binary that names the artifacts built
/// with it.
pub(crate) fn init_digest(init: &Path) -> Result<String, Error> {
    Ok(short(&file_digest(init)?).to_string())
}

fn short(digest: &str) -> &str {
    let hex = digest.split_once(':').map_or(digest, |(_, h)| h);
    hex.get(..16).unwrap_or(hex)
}

fn key_dir(cache: &Path, id: &Digest) -> PathBuf {
    cache.join(format!("{}-{}", id.algorithm(), id.digest()))
}

fn file_digest(path: &Path) -> Result<String, Error> {
    let io = |source| Error::Io {
        what: "read",
        path: path.to_path_buf(),
        source,
    };
    let mut f = File::open(path).map_err(io)?;
    let mut h = Hasher::sha256();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = f.read(&mut buf).map_err(io)?;
        if n == 0 {
            return Ok(h.finish());
        }
        h.update(buf.get(..n).unwrap_or(&[]));
    }
}

/// Creates a cache directory, private to the user: extracted images hold
/// set-user-ID programs and device nodes with the image's owners and modes,
/// which other local users must not reach (Docker's image store is
/// root-only for the same reason).
fn create_dir(dir: &Path) -> Result<(), Error> {
    let err = |source| Error::Io {
        what: "create the cache directory",
        path: dir.to_path_buf(),
        source,
    };
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(err)?;
    // Also when it existed already (made by an older vmlab).
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(err)
}

/// The image's extracted root filesystem, building it if needed.
fn extracted(store: &Store, r: &Resolved, cache: &Path) -> Result<PathBuf, Error> {
    let base = key_dir(cache, &r.id);
    let rootfs = base.join("rootfs");
    if rootfs.is_dir() {
        oci::check_layers_present(store, r)?;
        log::debug!(
            "image {}: cached root filesystem {}",
            r.id,
            rootfs.display()
        );
        return Ok(rootfs);
    }
    create_dir(&base)?;
    remove_stale(&base);
    let tmp = base.join(temp_name("rootfs", ""));
    fs::DirBuilder::new()
        .mode(0o755)
        .create(&tmp)
        .map_err(|source| Error::Io {
            what: "create",
            path: tmp.clone(),
            source,
        })?;
    let guard = Temp(Some(tmp.clone()));
    log::info!(
        "image {}: extracting {} layer(s) into {}",
        store.path().display(),
        r.layers.len(),
        rootfs.display()
    );
    let limits = super::layers::Limits::from_env().map_err(Error::Limits)?;
    let mut budget = super::layers::Budget::new(limits);
    for layer in &r.layers {
        oci::apply_layer(store, layer, &tmp, &mut budget)?;
    }
    // The root directory of a root filesystem: 0755 whatever the umask.
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755)).map_err(|source| Error::Io {
        what: "chmod",
        path: tmp.clone(),
        source,
    })?;
    match fs::rename(&tmp, &rootfs) {
        Ok(()) => guard.keep(),
        // Another vmlab finished the same image first: use its tree.
        Err(_) if rootfs.is_dir() => drop(guard),
        Err(source) => {
            return Err(Error::Io {
                what: "rename into place",
                path: rootfs,
                source,
            })
        }
    }
    Ok(rootfs)
}

/// `<prefix>.tmp-<pid>-<n><suffix>`: unique within the host, and tells
/// [`remove_stale`] which process owns it.
pub(crate) fn temp_name(prefix: &str, suffix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}.tmp-{}-{n}{suffix}", std::process::id())
}

fn pid_of_temp(name: &OsStr) -> Option<i32> {
    let s = name.to_str()?;
    let rest = &s[s.find(".tmp-")? + 5..];
    rest.split('-').next()?.parse().ok()
}

fn process_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Removes temporaries of processes that no longer run (killed mid-build,
/// or a VM run that ended with SIGKILL).
pub(crate) fn remove_stale(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let Some(pid) = pid_of_temp(&e.file_name()) else {
            continue;
        };
        if process_alive(pid) {
            continue;
        }
        let p = e.path();
        log::debug!("removing stale {}", p.display());
        let _ = match e.file_type() {
            Ok(t) if t.is_dir() => fs::remove_dir_all(&p),
            _ => fs::remove_file(&p),
        };
    }
}

/// A temporary path removed on drop unless kept.
pub(crate) struct Temp(pub(crate) Option<PathBuf>);

impl Temp {
    /// Keeps the path (it was renamed into place).
    pub(crate) fn keep(mut self) {
        self.0 = None;
    }
}

impl Drop for Temp {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let r = match fs::symlink_metadata(&p) {
                Ok(m) if m.is_dir() => fs::remove_dir_all(&p),
                Ok(_) => fs::remove_file(&p),
                Err(_) => Ok(()),
            };
            if let Err(e) = r {
                log::warn!("cannot remove {}: {e}", p.display());
            }
        }
    }
}

/// A VM's private copy of a cached disk image, removed when dropped: the
/// guest writes to it and its writes are discarded with it, as a
/// container's writable layer is with the container.
#[derive(Debug)]
pub struct RunDisk {
    path: PathBuf,
}

impl RunDisk {
    /// Copies `image` next to itself (same file system: reflinks work
    /// where the file system has them), keeping holes.
    pub fn copy_of(image: &Path) -> Result<RunDisk, Error> {
        let dir = image.parent().unwrap_or(Path::new("."));
        remove_stale(dir);
        let stem = image.file_stem().and_then(OsStr::to_str).unwrap_or("disk");
        let path = dir.join(temp_name(&format!("run-{stem}"), ".ext4"));
        let guard = Temp(Some(path.clone()));
        sparse_copy(image, &path).map_err(|source| Error::Io {
            what: "copy the disk image to",
            path: path.clone(),
            source,
        })?;
        guard.keep();
        Ok(RunDisk { path })
    }

    /// The copy's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for RunDisk {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_file(&self.path) {
            log::warn!("cannot remove the run's disk {}: {e}", self.path.display());
        }
    }
}

/// `FICLONE` (`_IOW(0x94, 9, int)`): share all blocks copy-on-write.
const FICLONE: libc::c_ulong = 0x4004_9409;

/// Copies `src` to a new file `dst`: a reflink if the file system can,
/// else only the data extents (`SEEK_DATA`/`SEEK_HOLE`), so a mostly
/// empty disk image costs what its data costs.
pub(crate) fn sparse_copy(src: &Path, dst: &Path) -> io::Result<()> {
    let s = File::open(src)?;
    let len = s.metadata()?.len();
    let d = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dst)?;
    // SAFETY: FICLONE takes the source descriptor as its argument; both
    // descriptors are open for the duration of the call.
    if unsafe { libc::ioctl(d.as_raw_fd(), FICLONE, s.as_raw_fd()) } == 0 {
        return Ok(());
    }
    d.set_len(len)?;
    let mut off = 0u64;
    while off < len {
        let data = match seek(&s, off, libc::SEEK_DATA) {
            Ok(p) => p,
            // No data after `off`: the rest is a hole.
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => break,
            // No SEEK_DATA support: everything is data.
            Err(_) => off,
        };
        let hole = seek(&s, data, libc::SEEK_HOLE).unwrap_or(len).min(len);
        copy_range(&s, &d, data, hole)?;
        off = hole.max(data + 1);
    }
    d.sync_all()
}

fn seek(f: &File, off: u64, whence: libc::c_int) -> io::Result<u64> {
    let off = libc::off_t::try_from(off).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: lseek on an open descriptor; no memory is passed.
    let r = unsafe { libc::lseek(f.as_raw_fd(), off, whence) };
    u64::try_from(r).map_err(|_| io::Error::last_os_error())
}

fn copy_range(s: &File, d: &File, start: u64, end: u64) -> io::Result<()> {
    let (mut in_off, mut out_off) = (start as libc::loff_t, start as libc::loff_t);
    let end_off = end as libc::loff_t;
    while in_off < end_off {
        let want = usize::try_from(end_off - in_off)
            .unwrap_or(usize::MAX)
            .min(1 << 30);
        // SAFETY: both descriptors are open; the offsets are ours and
        // copy_file_range updates them.
        let n = unsafe {
            libc::copy_file_range(
                s.as_raw_fd(),
                &mut in_off,
                d.as_raw_fd(),
                &mut out_off,
                want,
                0,
            )
        };
        if n > 0 {
            continue;
        }
        if n == 0 {
            return Ok(());
        }
        // copy_file_range not possible here (EXDEV on old kernels, ENOSYS,
        // EINVAL on some file systems): plain reads and writes.
        let mut buf = vec![0u8; 1 << 20];
        let mut pos = u64::try_from(in_off).unwrap_or(0);
        while pos < end {
            let want = usize::try_from(end - pos)
                .unwrap_or(usize::MAX)
                .min(buf.len());
            let n = s.read_at(&mut buf[..want], pos)?;
            if n == 0 {
                return Ok(());
            }
            d.write_all_at(buf.get(..n).unwrap_or(&[]), pos)?;
            pos += n as u64;
        }
        return Ok(());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::testutil::TempDir;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn sparse_copy_keeps_holes_and_data() {
        let t = TempDir::new("cache-sparse");
        let src = t.path().join("src");
        let f = File::create(&src).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(b"start", 0).unwrap();
        f.write_all_at(b"middle", 32 << 20).unwrap();
        f.write_all_at(b"end", (64 << 20) - 3).unwrap();
        drop(f);
        let dst = t.path().join("dst");
        sparse_copy(&src, &dst).unwrap();
        let a = fs::read(&src).unwrap();
        let b = fs::read(&dst).unwrap();
        assert!(a == b, "same content");
        let m = fs::metadata(&dst).unwrap();
        assert_eq!(m.len(), 64 << 20);
        assert!(
            m.blocks() * 512 < 4 << 20,
            "holes kept: {} blocks",
            m.blocks()
        );
    }

    #[test]
    fn temp_names_carry_the_pid() {
        let n = temp_name("rootfs", "");
        assert_eq!(pid_of_temp(OsStr::new(&n)), Some(std::process::id() as i32));
        let n = temp_name("run-x", ".ext4");
        assert!(n.ends_with(".ext4"));
        assert_eq!(pid_of_temp(OsStr::new("rootfs")), None);
    }

    #[test]
    fn stale_temporaries_of_dead_processes_are_removed() {
        let t = TempDir::new("cache-stale");
        // PID beyond pid_max: never alive.
        let stale = t.path().join("rootfs.tmp-2147483647-0");
        fs::create_dir(&stale).unwrap();
        fs::write(stale.join("f"), b"x").unwrap();
        let mine = t.path().join(temp_name("rootfs", ""));
        fs::create_dir(&mine).unwrap();
        let other = t.path().join("rootfs");
        fs::create_dir(&other).unwrap();
        remove_stale(t.path());
        assert!(!stale.exists());
        assert!(mine.exists() && other.exists());
    }
}
