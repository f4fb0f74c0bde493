//! The early system setup PID 1 owes its command: pseudo filesystems, a
//! hostname and a working loopback interface.
//!
//! Every system call costs ~0.4 ms in this project's test guests, so each
//! step takes the shortest path: mount first and create the directory only
//! when the mount says it is missing (the directories are in the initramfs),
//! or create first where the directory is known to be missing (inside a fresh
//! devtmpfs).

use std::ffi::CStr;
use std::io;

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

fn do_mount(m: &Mount) -> io::Result<()> {
    // SAFETY: all pointers are valid C strings; data is a C string as the
    // filesystems used here expect.
    let rc = unsafe {
        libc::mount(
            m.source.as_ptr(),
            m.target.as_ptr(),
            m.fstype.as_ptr(),
            m.flags,
            m.data.as_ptr().cast(),
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let err = last_err();
    // EBUSY: already mounted there (e.g. devtmpfs mounted by the kernel when
    // booting from a disk with CONFIG_DEVTMPFS_MOUNT). That is what we want.
    if err.raw_os_error() == Some(libc::EBUSY) {
        Ok(())
    } else {
        Err(err)
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

/// Mounts devtmpfs on `/dev`. Done first and alone, because the status port
/// (`/dev/port`) and the console node live there.
pub fn mount_dev() -> io::Result<()> {
    mount(&Mount {
        source: c"devtmpfs",
        target: c"/dev",
        fstype: c"devtmpfs",
        flags: NOSUID,
        data: c"mode=0755",
        mkdir_first: false,
        optional: false,
    })
}

/// Mounts everything else and creates the usual `/dev` symlinks. Failures
/// are warnings: a command may well run without, say, sysfs.
pub fn mount_rest() {
    for m in MOUNTS {
        if let Err(e) = mount(m) {
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

/// Sets the hostname (the UTS name seen by `hostname` and `uname -n`).
pub fn set_hostname(name: &str) {
    // SAFETY: pointer and length describe a live byte slice.
    if unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) } != 0 {
        warning!("sethostname {name}: {}", errno_text(&last_err()));
    }
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
