//! The early system setup PID 1 owes its command: pseudo filesystems, the
//! root of `vmlab.root` (a virtio-fs share, with a tmpfs layer over it or
//! by itself), the virtio-fs shares of `vmlab.fs`, the file binds of
//! `vmlab.bind`, the tmpfs mounts of `vmlab.tmpfs`, a hostname and a
//! working loopback interface.
//!
//! Every system call costs ~0.4 ms in this project's test guests, so each
//! step takes the shortest path: mount first and create the directory only
//! when the mount says it is missing (the directories are in the initramfs),
//! or create first where the directory is known to be missing (inside a fresh
//! devtmpfs).

use std::ffi::{CStr, CString};
use std::fmt;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::cmdline::{Bind, RootMode, Tmpfs, Volume};
use crate::{errno_text, warning};

/// One mount to perform.
struct Mount {
    source: &'static CStr,
    target: &'static CStr,
    fstype: &'static CStr,
    flags: libc::c_ulong,
    data: &'static CStr,
    /// The target lives in a fresh devtmpfs, so it certainly does not exist:
    /// create it before mounting instead of after a failed mount.
    mkdir_first: bool,
    /// Not having this filesystem is normal for some kernels (e.g. cgroup2
    /// without CONFIG_CGROUPS): skip it without a warning.
    optional: bool,
}

const NOSUID: libc::c_ulong = libc::MS_NOSUID;
const NODEV: libc::c_ulong = libc::MS_NODEV;
const NOEXEC: libc::c_ulong = libc::MS_NOEXEC;

/// The mounts after `/dev`, in order (`/dev/pts` and `/dev/shm` need /dev;
/// `/sys/fs/cgroup` needs /sys).
const MOUNTS: &[Mount] = &[
    Mount {
        source: c"proc",
        target: c"/proc",
        fstype: c"proc",
        flags: NOSUID | NODEV | NOEXEC,
        data: c"",
        mkdir_first: false,
        optional: false,
    },
    Mount {
        source: c"sysfs",
        target: c"/sys",
        fstype: c"sysfs",
        flags: NOSUID | NODEV | NOEXEC,
        data: c"",
        mkdir_first: false,
        optional: false,
    },
    Mount {
        source: c"devpts",
        target: c"/dev/pts",
        fstype: c"devpts",
        flags: NOSUID | NOEXEC,
        data: c"gid=5,mode=620,ptmxmode=666",
        mkdir_first: true,
        optional: false,
    },
    Mount {
        source: c"shm",
        target: c"/dev/shm",
        fstype: c"tmpfs",
        flags: NOSUID | NODEV,
        data: c"mode=1777",
        mkdir_first: true,
        optional: false,
    },
    Mount {
        source: c"tmpfs",
        target: c"/tmp",
        fstype: c"tmpfs",
        flags: NOSUID | NODEV,
        data: c"mode=1777",
        mkdir_first: false,
        optional: false,
    },
    Mount {
        source: c"tmpfs",
        target: c"/run",
        fstype: c"tmpfs",
        flags: NOSUID | NODEV,
        data: c"mode=755",
        mkdir_first: false,
        optional: false,
    },
    Mount {
        source: c"cgroup2",
        target: c"/sys/fs/cgroup",
        fstype: c"cgroup2",
        flags: NOSUID | NODEV | NOEXEC,
        data: c"",
        mkdir_first: false,
        optional: true,
    },
];

fn last_err() -> io::Error {
    io::Error::last_os_error()
}

fn mkdir(path: &CStr) -> io::Result<()> {
    // SAFETY: valid C string.
    if unsafe { libc::mkdir(path.as_ptr(), 0o755) } == 0 {
        return Ok(());
    }
    let err = last_err();
    if err.raw_os_error() == Some(libc::EEXIST) {
        Ok(())
    } else {
        Err(err)
    }
}

/// mount(2); `None` is NULL. `data` is a C string, as the file systems
/// used here expect.
fn sys_mount(
    source: &CStr,
    target: &CStr,
    fstype: Option<&CStr>,
    flags: libc::c_ulong,
    data: Option<&CStr>,
) -> io::Result<()> {
    let ptr = |s: Option<&CStr>| s.map_or(std::ptr::null(), CStr::as_ptr);
    // SAFETY: every pointer is NULL or a valid C string.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            ptr(fstype),
            flags,
            ptr(data).cast(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(last_err())
    }
}

fn do_mount(m: &Mount) -> io::Result<()> {
    match sys_mount(m.source, m.target, Some(m.fstype), m.flags, Some(m.data)) {
        // EBUSY: already mounted there (e.g. devtmpfs mounted by the kernel
        // when booting from a disk with CONFIG_DEVTMPFS_MOUNT). That is what
        // we want.
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Ok(()),
        other => other,
    }
}

/// Mounts `m`, creating its target when missing.
fn mount(m: &Mount) -> io::Result<()> {
    if m.mkdir_first {
        mkdir(m.target)?;
    }
    match do_mount(m) {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) && !m.mkdir_first => {
            mkdir(m.target)?;
            do_mount(m)
        }
        other => other,
    }
}

/// The mount point of devtmpfs.
pub const DEV: &CStr = c"/dev";

/// Mounts devtmpfs on [`DEV`]. Done first and alone, because the status
/// port (`/dev/port`) and the console node live there.
pub fn mount_dev() -> io::Result<()> {
    mount(&Mount {
        source: c"devtmpfs",
        target: DEV,
        fstype: c"devtmpfs",
        flags: NOSUID,
        data: c"mode=0755",
        mkdir_first: false,
        optional: false,
    })
}

/// Mounts everything else and creates the usual `/dev` symlinks. Failures
/// are warnings: a command may well run without, say, sysfs. Adds the
/// top-level mount points that are mounted to `mounted` (for
/// [`switch_root`]; a nested one such as `/dev/pts` goes with its parent).
pub fn mount_rest(mounted: &mut Vec<&'static CStr>) {
    for m in MOUNTS {
        let result = mount(m);
        if result.is_ok() && !m.target.to_bytes()[1..].contains(&b'/') {
            mounted.push(m.target);
        }
        if let Err(e) = result {
            let missing = matches!(e.raw_os_error(), Some(libc::ENODEV | libc::ENOENT));
            if !(m.optional && missing) {
                warning!(
                    "mount {} on {}: {}",
                    m.fstype.to_string_lossy(),
                    m.target.to_string_lossy(),
                    errno_text(&e)
                );
            }
        }
    }
    // devtmpfs does not provide these; shells and programs expect them.
    for (target, link) in [
        (c"/proc/self/fd", c"/dev/fd"),
        (c"/proc/self/fd/0", c"/dev/stdin"),
        (c"/proc/self/fd/1", c"/dev/stdout"),
        (c"/proc/self/fd/2", c"/dev/stderr"),
    ] {
        // SAFETY: valid C strings.
        if unsafe { libc::symlink(target.as_ptr(), link.as_ptr()) } != 0 {
            let e = last_err();
            if e.raw_os_error() != Some(libc::EEXIST) {
                warning!("symlink {}: {}", link.to_string_lossy(), errno_text(&e));
            }
        }
    }
}

/// Mounts a virtio-fs share (`mount -t virtiofs TAG PATH`, read-only if
/// asked, no other flags or options). The mount point is created, with its
/// parents, only when the mount says it is missing. The error is the
/// mount's, or the mount point's creation (`create the mount point: ...`).
pub fn mount_volume(v: &Volume) -> io::Result<()> {
    let tag = c_string(v.tag.as_bytes())?;
    let path = c_string(v.path.as_os_str().as_bytes())?;
    let flags = if v.readonly { libc::MS_RDONLY } else { 0 };
    // virtiofs takes no data: NULL.
    mount_creating(&v.path, || {
        sys_mount(&tag, &path, Some(c"virtiofs"), flags, None)
    })
}

/// Bind-mounts the file `b.source` onto `b.path` (remounted read-only if
/// asked), as runc does a file mount: a missing `b.path` is created as an
/// empty file, with its parent directories, when the mount says it is
/// missing.
pub fn bind_file(b: &Bind) -> io::Result<()> {
    let source = c_string(b.source.as_os_str().as_bytes())?;
    let target = c_string(b.path.as_os_str().as_bytes())?;
    let bind = || sys_mount(&source, &target, None, libc::MS_BIND, None);
    match b.source.exists() {
        // ENOENT is then the mount point's.
        true => mount_creating_with(&b.path, create_file, bind),
        false => bind(),
    }?;
    if b.readonly {
        // A bind takes no flags but MS_REC: read-only is a remount.
        sys_mount(
            c"none",
            &target,
            None,
            libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
            None,
        )?;
    }
    Ok(())
}

/// Creates `path` as an empty file (an existing one is left as it is),
/// with its parent directories.
fn create_file(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .open(path)
        .map(drop)
}

/// Mounts the tmpfs `t` (its mount point created with its parents if
/// missing).
pub fn mount_tmpfs(t: &Tmpfs) -> io::Result<()> {
    let path = c_string(t.path.as_os_str().as_bytes())?;
    let data = c_string(&t.data)?;
    mount_creating(&t.path, || {
        sys_mount(c"tmpfs", &path, Some(c"tmpfs"), t.flags, Some(&data))
    })
}

/// Runs `mount`; if it fails with ENOENT (virtiofs reports an unknown tag
/// as EINVAL, so ENOENT is the mount point), creates `target` with its
/// parents and runs it once more.
fn mount_creating(target: &Path, mount: impl FnMut() -> io::Result<()>) -> io::Result<()> {
    mount_creating_with(target, |p| std::fs::create_dir_all(p), mount)
}

/// [`mount_creating`] with `create` making the mount point (a directory,
/// or for a file bind an empty file).
fn mount_creating_with(
    target: &Path,
    create: impl FnOnce(&Path) -> io::Result<()>,
    mut mount: impl FnMut() -> io::Result<()>,
) -> io::Result<()> {
    match mount() {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
            create(target).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("create the mount point: {}", errno_text(&e)),
                )
            })?;
            mount()
        }
        other => other,
    }
}

/// Where [`switch_root`] builds the new root, in the initramfs: the share
/// (read-only), the tmpfs with the overlay's upper and work directories,
/// and the overlay of the two.
const LOWER: &CStr = c"/.vmlab/lower";
const RW: &CStr = c"/.vmlab/rw";
const UPPER: &CStr = c"/.vmlab/rw/upper";
const WORK: &CStr = c"/.vmlab/rw/work";
const NEW_ROOT: &CStr = c"/.vmlab/root";
const OVERLAY_OPTIONS: &CStr =
    c"lowerdir=/.vmlab/lower,upperdir=/.vmlab/rw/upper,workdir=/.vmlab/rw/work";

/// A step of [`switch_root`] that failed: `STEP: ERRNO-TEXT`.
#[derive(Debug)]
pub struct StepError {
    pub step: String,
    pub err: io::Error,
}

impl fmt::Display for StepError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.step, errno_text(&self.err))
    }
}

/// Names the step of a result.
fn step<T>(step: impl Into<String>, result: io::Result<T>) -> Result<T, StepError> {
    result.map_err(|err| StepError {
        step: step.into(),
        err,
    })
}

/// Makes the virtio-fs share `tag` the root file system and moves the
/// pseudo file systems of `mounted` (top-level mount points) into it:
/// [`RootMode::Overlay`], the share read-only with a tmpfs over it for the
/// writes (overlayfs); otherwise the share itself, read-write or
/// read-only (where a missing mount point of a pseudo file system cannot
/// be created: that one is left behind, with a warning). Called on the
/// initramfs root, whose rootfs is writable; init keeps running from memory,
/// so the share need not contain it. About 16 system calls.
pub fn switch_root(tag: &str, mode: RootMode, mounted: &[&CStr]) -> Result<(), StepError> {
    let tag = step("the tag", c_string(tag.as_bytes()))?;
    if mode == RootMode::Overlay {
        overlay_root(&tag)?;
    } else {
        let flags = if mode == RootMode::ReadOnly {
            libc::MS_RDONLY
        } else {
            0
        };
        step("create /.vmlab/root", mkdir_parents(NEW_ROOT))?;
        step(
            "mount virtiofs on /.vmlab/root",
            sys_mount(&tag, NEW_ROOT, Some(c"virtiofs"), flags, None),
        )?;
    }
    // /dev, /proc, ... go along (/dev/pts with /dev).
    for fs in mounted {
        match move_into_new_root(fs) {
            Err(e) if mode == RootMode::ReadOnly && e.err.raw_os_error() == Some(libc::EROFS) => {
                warning!(
                    "the read-only root has no {}: not mounted there",
                    fs.to_string_lossy()
                );
            }
            other => other?,
        }
    }
    // Make it `/`, as switch_root(8) does (pivot_root cannot take rootfs
    // away).
    step("chdir /.vmlab/root", chdir(NEW_ROOT))?;
    step(
        "move /.vmlab/root to /",
        sys_mount(c".", c"/", None, libc::MS_MOVE, None),
    )?;
    step("chroot", chroot(c"."))?;
    step("chdir /", chdir(c"/"))
}

/// The share `tag` read-only at [`LOWER`], a tmpfs for the writes, and
/// the overlay of the two at [`NEW_ROOT`].
fn overlay_root(tag: &CStr) -> Result<(), StepError> {
    // The image, read-only.
    step("create /.vmlab/lower", mkdir_parents(LOWER))?;
    step(
        "mount virtiofs on /.vmlab/lower",
        sys_mount(tag, LOWER, Some(c"virtiofs"), libc::MS_RDONLY, None),
    )?;
    // The run's writes.
    step("create /.vmlab/rw", mkdir_parents(RW))?;
    step(
        "mount tmpfs on /.vmlab/rw",
        sys_mount(c"tmpfs", RW, Some(c"tmpfs"), 0, Some(c"mode=755")),
    )?;
    step("create /.vmlab/rw/upper", mkdir(UPPER))?;
    step("create /.vmlab/rw/work", mkdir(WORK))?;
    // The two as one.
    step("create /.vmlab/root", mkdir_parents(NEW_ROOT))?;
    step(
        "mount overlay on /.vmlab/root",
        sys_mount(
            c"overlay",
            NEW_ROOT,
            Some(c"overlay"),
            0,
            Some(OVERLAY_OPTIONS),
        ),
    )
}

/// Moves the mount at `fs` (and those under it) to the same path in
/// [`NEW_ROOT`], creating the mount point there only when the move says it
/// is missing (images usually have /dev, /proc, ...).
fn move_into_new_root(fs: &CStr) -> Result<(), StepError> {
    let mut target = NEW_ROOT.to_bytes().to_vec();
    target.extend_from_slice(fs.to_bytes());
    let target = CString::new(target).expect("no NUL in either part");
    let what = || {
        format!(
            "move {} to {}",
            fs.to_string_lossy(),
            target.to_string_lossy()
        )
    };
    let move_it = || sys_mount(fs, &target, None, libc::MS_MOVE, None);
    match move_it() {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
            step(
                format!("create {}", target.to_string_lossy()),
                mkdir(&target),
            )?;
            step(what(), move_it())
        }
        other => step(what(), other),
    }
}

fn c_string(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// Creates the directory `path` (an existing one is fine); its parents only
/// when mkdir says they are missing.
fn mkdir_parents(path: &CStr) -> io::Result<()> {
    match mkdir(path) {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
            std::fs::create_dir_all(std::ffi::OsStr::from_bytes(path.to_bytes()))
        }
        other => other,
    }
}

fn chdir(path: &CStr) -> io::Result<()> {
    // SAFETY: valid C string.
    if unsafe { libc::chdir(path.as_ptr()) } == 0 {
        Ok(())
    } else {
        Err(last_err())
    }
}

fn chroot(path: &CStr) -> io::Result<()> {
    // SAFETY: valid C string.
    if unsafe { libc::chroot(path.as_ptr()) } == 0 {
        Ok(())
    } else {
        Err(last_err())
    }
}

/// Sets the hostname (the UTS name seen by `hostname` and `uname -n`).
pub fn set_hostname(name: &[u8]) -> io::Result<()> {
    // SAFETY: pointer and length describe a live byte slice.
    if unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) } != 0 {
        return Err(last_err());
    }
    Ok(())
}

/// Brings up the loopback interface so `localhost` works inside the guest
/// (the kernel creates `lo` down).
pub fn loopback_up() {
    if let Err(e) = try_loopback_up() {
        warning!("bring up lo: {}", errno_text(&e));
    }
}

fn try_loopback_up() -> io::Result<()> {
    // SAFETY: plain socket creation.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(last_err());
    }
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(b"lo") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: the ioctls read/write the ifreq we own; fd is our socket. Only
    // the flags member of the union is used, which SIOCGIFFLAGS sets.
    let result = unsafe {
        if libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut ifr) != 0 {
            Err(last_err())
        } else {
            ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            if libc::ioctl(fd, libc::SIOCSIFFLAGS, &ifr) != 0 {
                Err(last_err())
            } else {
                Ok(())
            }
        }
    };
    // SAFETY: closing our own socket.
    unsafe { libc::close(fd) };
    result
}

/// Remounts `/` read-only if it is a disk filesystem; errors are ignored
/// (an initramfs root cannot be remounted, a busy one stays as it is and
/// was synced anyway).
pub fn remount_root_readonly() {
    let root = c"/";
    // SAFETY: both strings are NUL-terminated literals; MS_REMOUNT with a
    // NULL source, type and data only changes the flags of the mount at /.
    let rc = unsafe {
        libc::mount(
            std::ptr::null(),
            root.as_ptr(),
            std::ptr::null(),
            libc::MS_REMOUNT | libc::MS_RDONLY,
            std::ptr::null(),
        )
    };
    let _ = rc;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("vmlab-init-mounts-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        dir
    }

    /// A stand-in for mount(2): ENOENT while the target is missing.
    fn fake_mount(target: &Path, calls: &mut u32) -> io::Result<()> {
        *calls += 1;
        if target.is_dir() {
            Ok(())
        } else {
            Err(io::Error::from_raw_os_error(libc::ENOENT))
        }
    }

    #[test]
    fn missing_mount_point_is_created_with_its_parents() {
        let dir = scratch("create");
        let target = dir.join("a/b/c");
        let mut calls = 0;
        mount_creating(&target, || fake_mount(&target, &mut calls)).unwrap();
        assert!(target.is_dir());
        assert_eq!(calls, 2);
        // An existing one: one mount, nothing created.
        let mut calls = 0;
        mount_creating(&target, || fake_mount(&target, &mut calls)).unwrap();
        assert_eq!(calls, 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn other_errors_are_the_mounts() {
        let dir = scratch("errors");
        let target = dir.join("missing");
        let mut calls = 0;
        let err = mount_creating(&target, || {
            calls += 1;
            Err(io::Error::from_raw_os_error(libc::EINVAL))
        })
        .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
        assert_eq!(calls, 1);
        assert!(!target.exists(), "created a mount point for nothing");

        // A mount point that cannot be created (a file is in the way).
        std::fs::write(dir.join("file"), b"").unwrap();
        let target = dir.join("file/sub");
        let err = mount_creating(&target, || Err(io::Error::from_raw_os_error(libc::ENOENT)))
            .unwrap_err();
        assert_eq!(errno_text(&err), "create the mount point: Not a directory");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
