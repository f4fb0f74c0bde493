//! File operations on trees and paths vmlab does not control: an image's
//! root file system (its author chose every file type, size and link) and
//! the shared temporary directory (any local user can create names there).
//!
//! - [`read_regular_file`]: a file that must be a regular file of bounded
//!   size (a FIFO would block vmlab forever, `/dev/zero` or a 1 TiB sparse
//!   file would be read without end).
//! - [`PrivateDir`]: a directory made atomically with a name nobody could
//!   predict, mode 0700 (`mkdtemp`), removed when dropped.
//! - [`copy_into`]: copies a file into a directory, creating the copy with
//!   `O_CREAT|O_EXCL|O_NOFOLLOW` so that a planted name or symbolic link
//!   makes it fail instead of writing through it.

use std::ffi::{CString, OsString};
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// The most vmlab reads of a small configuration file out of an image
/// (`/etc/passwd`, `/etc/group`): far above any real one.
pub const IMAGE_FILE_LIMIT: u64 = 4 << 20;

/// Why [`read_regular_file`] refused a file.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// Not a regular file (a FIFO, device, socket, directory or, as the
    /// last component, a symbolic link).
    #[error("not a regular file (a {0})")]
    NotRegular(&'static str),
    /// Larger than the limit.
    #[error("larger than {limit} bytes ({size} bytes)")]
    TooLarge {
        /// Its size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// Opening or reading it failed.
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Reads `path`, which must be a regular file of at most `limit` bytes.
/// `Ok(None)` when it does not exist. It is opened with `O_NOFOLLOW`
/// (the caller resolves links, inside the image root) and `O_NONBLOCK`
/// (opening a FIFO does not wait for a writer), then checked with
/// `fstat` on the open descriptor, so a file swapped after a check is
/// still caught; the read itself stops at `limit + 1` bytes whatever the
/// file claims.
pub fn read_regular_file(path: &Path, limit: u64) -> Result<Option<Vec<u8>>, ReadError> {
    let file = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        // O_NOFOLLOW on a symbolic link.
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(ReadError::NotRegular("symbolic link"))
        }
        Err(e) => return Err(e.into()),
    };
    let meta = file.metadata()?;
    let t = meta.file_type();
    if !t.is_file() {
        return Err(ReadError::NotRegular(kind_name(&t)));
    }
    if meta.len() > limit {
        return Err(ReadError::TooLarge {
            size: meta.len(),
            limit,
        });
    }
    let mut buf = Vec::with_capacity(meta.len() as usize);
    file.take(limit + 1).read_to_end(&mut buf)?;
    if buf.len() as u64 > limit {
        // It grew after the fstat.
        return Err(ReadError::TooLarge {
            size: buf.len() as u64,
            limit,
        });
    }
    Ok(Some(buf))
}

/// A name for a file type, for messages.
pub fn kind_name(t: &std::fs::FileType) -> &'static str {
    if t.is_dir() {
        "directory"
    } else if t.is_fifo() {
        "FIFO"
    } else if t.is_char_device() {
        "character device"
    } else if t.is_block_device() {
        "block device"
    } else if t.is_socket() {
        "socket"
    } else if t.is_symlink() {
        "symbolic link"
    } else {
        "regular file"
    }
}

/// A private directory (see the module documentation), removed with its
/// content when dropped.
#[derive(Debug)]
pub struct PrivateDir(PathBuf);

impl PrivateDir {
    /// Creates `<parent>/<prefix>XXXXXX` with `mkdtemp`: atomically, mode
    /// 0700, failing rather than reusing anything already there.
    pub fn create_in(parent: &Path, prefix: &str) -> io::Result<PrivateDir> {
        let mut template = parent
            .join(format!("{prefix}XXXXXX"))
            .into_os_string()
            .into_vec();
        template.push(0);
        let mut template = CString::from_vec_with_nul(template)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?
            .into_bytes_with_nul();
        // SAFETY: `template` is a writable NUL-terminated buffer ending in
        // "XXXXXX" that mkdtemp fills in place; it outlives the call.
        let p = unsafe { libc::mkdtemp(template.as_mut_ptr().cast()) };
        if p.is_null() {
            return Err(io::Error::last_os_error());
        }
        template.pop();
        Ok(PrivateDir(PathBuf::from(OsString::from_vec(template))))
    }

    /// [`PrivateDir::create_in`] the temporary directory (`$TMPDIR`, else
    /// `/tmp`).
    pub fn create(prefix: &str) -> io::Result<PrivateDir> {
        PrivateDir::create_in(&std::env::temp_dir(), prefix)
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        // remove_dir_all does not follow symbolic links inside.
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Copies `src` to `dir/name`, which must not exist yet: the copy is
/// created with `O_CREAT|O_EXCL|O_NOFOLLOW` (a planted file or symbolic
/// link at that name is an error, never written through) and mode 0600
/// before its permission bits are set to `mode`. Returns the new path.
pub fn copy_into(src: &Path, dir: &Path, name: &str, mode: u32) -> io::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let dest = dir.join(name);
    let mut from = File::open(src)?;
    if !from.metadata()?.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a regular file", src.display()),
        ));
    }
    let mut to = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&dest)?;
    io::copy(&mut from, &mut to)?;
    to.set_permissions(std::fs::Permissions::from_mode(mode))?;
    Ok(dest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regular_files_only_and_bounded() {
        let d = PrivateDir::create("vmlab-unit-untrusted-").unwrap();
        let f = d.path().join("f");
        std::fs::write(&f, b"abc").unwrap();
        assert_eq!(read_regular_file(&f, 3).unwrap().unwrap(), b"abc");
        assert!(matches!(
            read_regular_file(&f, 2),
            Err(ReadError::TooLarge { size: 3, limit: 2 })
        ));
        assert!(read_regular_file(&d.path().join("none"), 9)
            .unwrap()
            .is_none());
        std::os::unix::fs::symlink(&f, d.path().join("l")).unwrap();
        assert!(matches!(
            read_regular_file(&d.path().join("l"), 9),
            Err(ReadError::NotRegular("symbolic link"))
        ));
        assert!(matches!(
            read_regular_file(d.path(), 9),
            Err(ReadError::NotRegular("directory"))
        ));
    }

    #[test]
    fn private_dirs_are_fresh_and_0700() {
        use std::os::unix::fs::PermissionsExt;
        let a = PrivateDir::create("vmlab-unit-priv-").unwrap();
        let b = PrivateDir::create("vmlab-unit-priv-").unwrap();
        assert_ne!(a.path(), b.path());
        let m = std::fs::symlink_metadata(a.path()).unwrap();
        assert!(m.is_dir());
        assert_eq!(m.permissions().mode() & 0o777, 0o700);
        let p = a.path().to_path_buf();
        drop(a);
        assert!(!p.exists());
    }

    #[test]
    fn copies_never_write_through_a_planted_link() {
        let d = PrivateDir::create("vmlab-unit-copy-").unwrap();
        let src = d.path().join("src");
        std::fs::write(&src, b"payload").unwrap();
        let victim = d.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        std::os::unix::fs::symlink(&victim, d.path().join("dst")).unwrap();
        assert!(copy_into(&src, d.path(), "dst", 0o644).is_err());
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        let out = copy_into(&src, d.path(), "fresh", 0o755).unwrap();
        assert_eq!(std::fs::read(out).unwrap(), b"payload");
    }
}
