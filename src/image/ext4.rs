//! The ext4 disk a VM boots an image from: the image's root filesystem
//! plus vmlab's guest init at `/.vmlab/init`, made with `mkfs.ext4 -d`
//! (e2fsprogs), which needs no loop mount and no privileges beyond reading
//! the tree.
//!
//! The cached root filesystem must stay exactly the image (containers use
//! it too), so the init is added to a staging copy of it: a mirror whose
//! regular files are hard links to the cached ones (one `link` per file, no
//! data copied; mkfs.ext4 copies each inode once and keeps real hard links
//! as hard links), with directories, symlinks and device nodes recreated
//! with the same metadata.

use std::collections::HashSet;
use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use super::cache::{remove_stale, temp_name, Temp};
use super::init::GUEST_INIT_PATH;
use super::layers::set_mtime_nofollow;
use super::Error;

/// Free space given to the guest on top of the image's content (the disk
/// file is sparse: unused space costs nothing on the host).
const HEADROOM: u64 = 256 << 20;
/// ext4 metadata beyond inodes: journal, bitmaps, group descriptors.
const METADATA: u64 = 64 << 20;
/// mkfs.ext4's default bytes-per-inode ratio.
const INODE_RATIO: u64 = 16 << 10;

fn io_error<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> Error + 'a {
    move |source| Error::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Builds `out` from the tree `rootfs` and the init binary `init`.
pub fn build(rootfs: &Path, init: &Path, out: &Path) -> Result<(), Error> {
    let dir = out.parent().unwrap_or(Path::new("."));
    remove_stale(dir);
    let stage = dir.join(temp_name("stage", ""));
    let _stage_guard = Temp(Some(stage.clone()));
    // SAFETY: geteuid has no preconditions.
    let chown = unsafe { libc::geteuid() } == 0;
    let root_meta = fs::symlink_metadata(rootfs).map_err(io_error("stat", rootfs))?;
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&stage)
        .map_err(io_error("create", &stage))?;
    let mut m = Mirror {
        chown,
        warned_device: false,
    };
    m.dir(rootfs, &stage)?;
    m.meta(&stage, &root_meta)?;
    inject_init(&stage, init)?;

    let usage = usage(&stage)?;
    let size = round_up(usage.bytes + usage.bytes / 5 + METADATA + HEADROOM, 1 << 20);
    let inodes = usage.inodes + usage.inodes / 2 + 4096;

    let tmp = dir.join(temp_name("disk", ".ext4"));
    let tmp_guard = Temp(Some(tmp.clone()));
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(&tmp)
        .map_err(io_error("create", &tmp))?;
    file.set_len(size).map_err(io_error("size", &tmp))?;
    drop(file);
    mkfs(&stage, &tmp, size, inodes)?;
    fs::rename(&tmp, out).map_err(io_error("rename into place", out))?;
    tmp_guard.keep();
    log::info!(
        "disk image {}: {} MiB ({} MiB of files, {} inodes)",
        out.display(),
        size >> 20,
        usage.bytes >> 20,
        usage.inodes
    );
    Ok(())
}

fn round_up(n: u64, to: u64) -> u64 {
    n.div_ceil(to) * to
}

/// Finds mkfs.ext4 on PATH or in the sbin directories (not on every
/// user's PATH).
fn mkfs_path() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join("mkfs.ext4"))
        .find(|p| p.is_file())
}

fn mkfs(stage: &Path, image: &Path, size: u64, inodes: u64) -> Result<(), Error> {
    let mkfs = mkfs_path().ok_or_else(|| Error::Mkfs {
        path: image.to_path_buf(),
        message: "mkfs.ext4 not found (install e2fsprogs)".into(),
    })?;
    let mut cmd = Command::new(&mkfs);
    // 4 KiB blocks whatever the size (mkfs picks 1 KiB for small file
    // systems: more metadata per byte, slower in the guest).
    cmd.args(["-q", "-F", "-t", "ext4", "-b", "4096", "-L", "vmlab-root"])
        // No lazy initialization: the guest kernel would otherwise spend
        // its first seconds zeroing inode tables and the journal (slow
        // under emulation), as scripts/build-rootfs.sh explains.
        .args([
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0,root_owner=0:0",
        ]);
    // Only when the default ratio would give too few inodes (many small
    // files): more inodes mean more inode table to zero.
    if inodes > size / INODE_RATIO {
        cmd.arg("-N").arg(inodes.to_string());
    }
    cmd.arg("-d").arg(stage).arg(image).env("LC_ALL", "C");
    let out = cmd.output().map_err(|e| Error::Mkfs {
        path: image.to_path_buf(),
        message: format!("cannot run {}: {e}", mkfs.display()),
    })?;
    if !out.status.success() {
        return Err(Error::Mkfs {
            path: image.to_path_buf(),
            message: format!(
                "{} failed ({}): {}",
                mkfs.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(())
}

/// Puts the init at [`GUEST_INIT_PATH`], replacing whatever the image has
/// at `/.vmlab` (nothing, in any real image).
fn inject_init(stage: &Path, init: &Path) -> Result<(), Error> {
    let rel = GUEST_INIT_PATH.trim_start_matches('/');
    let target = stage.join(rel);
    let dir = target.parent().unwrap_or(stage);
    match fs::symlink_metadata(dir) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(dir),
        Ok(_) => fs::remove_file(dir),
        Err(_) => Ok(()),
    }
    .map_err(io_error("remove", dir))?;
    fs::DirBuilder::new()
        .mode(0o755)
        .create(dir)
        .map_err(io_error("create", dir))?;
    let mut src = File::open(init).map_err(io_error("open", init))?;
    let mut dst = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o755)
        .open(&target)
        .map_err(io_error("create", &target))?;
    io::copy(&mut src, &mut dst).map_err(io_error("copy the init to", &target))?;
    dst.set_permissions(fs::Permissions::from_mode(0o755))
        .map_err(io_error("chmod", &target))?;
    Ok(())
}

/// Copies a tree's structure and metadata, hard-linking regular files.
struct Mirror {
    chown: bool,
    warned_device: bool,
}

impl Mirror {
    /// Mirrors the content of directory `src` into the existing `dst`.
    fn dir(&mut self, src: &Path, dst: &Path) -> Result<(), Error> {
        let entries = fs::read_dir(src).map_err(io_error("read directory", src))?;
        for e in entries {
            let e = e.map_err(io_error("read directory", src))?;
            let s = e.path();
            let d = dst.join(e.file_name());
            let m = fs::symlink_metadata(&s).map_err(io_error("stat", &s))?;
            let t = m.file_type();
            if t.is_dir() {
                fs::DirBuilder::new()
                    .mode(0o700)
                    .create(&d)
                    .map_err(io_error("create", &d))?;
                self.dir(&s, &d)?;
                self.meta(&d, &m)?;
            } else if t.is_file() {
                if let Err(e) = fs::hard_link(&s, &d) {
                    // Across file systems (a plain directory elsewhere) or
                    // not allowed (protected_hardlinks): copy.
                    log::debug!("hard link {}: {e}; copying", s.display());
                    self.copy_file(&s, &d, &m)?;
                }
            } else if t.is_symlink() {
                let target = fs::read_link(&s).map_err(io_error("readlink", &s))?;
                std::os::unix::fs::symlink(&target, &d).map_err(io_error("symlink", &d))?;
                self.meta(&d, &m)?;
            } else if t.is_fifo() || t.is_char_device() || t.is_block_device() {
                self.node(&d, &m)?;
            }
            // Sockets are runtime objects, not image content.
        }
        Ok(())
    }

    fn copy_file(&self, s: &Path, d: &Path, m: &fs::Metadata) -> Result<(), Error> {
        // Checked as a regular file by the caller: O_NOFOLLOW|O_NONBLOCK so
        // that one swapped for a link or a FIFO since fails, not hangs.
        let mut src = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(s)
            .map_err(io_error("open", s))?;
        let mut dst = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(d)
            .map_err(io_error("create", d))?;
        io::copy(&mut src, &mut dst).map_err(io_error("copy", d))?;
        drop(dst);
        self.meta(d, m)
    }

    fn node(&mut self, d: &Path, m: &fs::Metadata) -> Result<(), Error> {
        let c = CString::new(d.as_os_str().as_bytes()).map_err(|_| Error::Io {
            what: "mknod",
            path: d.to_path_buf(),
            source: io::Error::from_raw_os_error(libc::EINVAL),
        })?;
        // SAFETY: a valid C string; mode and rdev come from the source
        // node's stat.
        let rc = unsafe { libc::mknod(c.as_ptr(), m.mode(), m.rdev()) };
        if rc != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EPERM) {
                if !self.warned_device {
                    log::warn!(
                        "cannot create device nodes ({} and others skipped): {e}",
                        d.display()
                    );
                    self.warned_device = true;
                }
                return Ok(());
            }
            return Err(io_error("mknod", d)(e));
        }
        self.meta(d, m)
    }

    /// Owner, mode and mtime of `m` onto `d` (never following a symlink).
    fn meta(&self, d: &Path, m: &fs::Metadata) -> Result<(), Error> {
        if self.chown {
            std::os::unix::fs::lchown(d, Some(m.uid()), Some(m.gid()))
                .map_err(io_error("chown", d))?;
        }
        if !m.file_type().is_symlink() {
            fs::set_permissions(d, fs::Permissions::from_mode(m.mode() & 0o7777))
                .map_err(io_error("chmod", d))?;
        }
        let secs = m
            .modified()
            .ok()
            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
            .unwrap_or(Duration::ZERO)
            .as_secs();
        set_mtime_nofollow(d, secs).map_err(io_error("set the mtime of", d))
    }
}

/// What a tree needs on disk.
struct Usage {
    bytes: u64,
    inodes: u64,
}

/// Blocks of file data (each inode once), directories and long symlinks,
/// in 4 KiB blocks, and the number of inodes.
fn usage(root: &Path) -> Result<Usage, Error> {
    let mut seen = HashSet::new();
    let mut u = Usage {
        bytes: 0,
        inodes: 1,
    };
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        u.bytes += 4096;
        for e in fs::read_dir(&dir).map_err(io_error("read directory", &dir))? {
            let e = e.map_err(io_error("read directory", &dir))?;
            let m = fs::symlink_metadata(e.path()).map_err(io_error("stat", &e.path()))?;
            if !seen.insert((m.dev(), m.ino())) {
                continue;
            }
            u.inodes += 1;
            if m.is_dir() {
                stack.push(e.path());
            } else if m.is_file() {
                u.bytes += round_up(m.len(), 4096);
            } else if m.file_type().is_symlink() && m.len() >= 60 {
                // Targets under 60 bytes live in the inode itself.
                u.bytes += 4096;
            }
        }
    }
    Ok(u)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::testutil::TempDir;
    use std::io::Read;

    /// Builds a disk from a small tree and reads it back with debugfs
    /// (e2fsprogs, like mkfs.ext4): the init is there and executable, the
    /// image's files keep owner, mode and hard links, and the source tree
    /// is untouched.
    #[test]
    fn disk_has_the_tree_and_the_init() {
        if mkfs_path().is_none() {
            eprintln!("skipped: mkfs.ext4 not installed");
            return;
        }
        let t = TempDir::new("ext4-build");
        let root = t.path().join("rootfs");
        fs::create_dir_all(root.join("etc")).unwrap();
        fs::write(root.join("etc/a"), b"hello").unwrap();
        fs::hard_link(root.join("etc/a"), root.join("etc/b")).unwrap();
        fs::set_permissions(root.join("etc/a"), fs::Permissions::from_mode(0o640)).unwrap();
        std::os::unix::fs::symlink("/etc/a", root.join("link")).unwrap();
        let init = t.path().join("fake-init");
        fs::write(&init, b"\x7fELF fake").unwrap();
        let out = t.path().join("disk.ext4");
        build(&root, &init, &out).unwrap();
        assert!(!root.join(".vmlab").exists(), "source tree untouched");
        let names: Vec<String> = fs::read_dir(t.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            !names.iter().any(|n| n.contains(".tmp-")),
            "temporaries removed: {names:?}"
        );
        let Some(debugfs) = ["/usr/sbin/debugfs", "/sbin/debugfs"]
            .into_iter()
            .find(|p| Path::new(p).exists())
        else {
            return;
        };
        let stat = |p: &str| {
            let o = Command::new(debugfs)
                .args(["-R", &format!("stat {p}")])
                .arg(&out)
                .output()
                .unwrap();
            String::from_utf8_lossy(&o.stdout).into_owned()
        };
        let s = stat("/.vmlab/init");
        assert!(s.contains("Mode:  0755"), "{s}");
        let s = stat("/etc/a");
        assert!(s.contains("Mode:  0640") && s.contains("Links: 2"), "{s}");
        let cat = Command::new(debugfs)
            .args(["-R", "cat /etc/b"])
            .arg(&out)
            .output()
            .unwrap();
        assert_eq!(cat.stdout, b"hello");
        let mut f = File::open(&out).unwrap();
        let mut sb = vec![0u8; 2048];
        f.read_exact(&mut sb).unwrap();
        assert_eq!(&sb[1024 + 0x38..1024 + 0x3a], &[0x53, 0xef], "ext4 magic");
    }
}
