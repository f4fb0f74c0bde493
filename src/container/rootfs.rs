//! The bundle directory and the container's root file system in it.
//!
//! The root is an overlayfs whose lower layer is the cached image root
//! (read only) and whose upper and work directories are in the bundle, so
//! a container can write anywhere without touching the cache, and its
//! writes vanish with the bundle. Where overlayfs cannot be mounted (e.g.
//! the temp directory is itself on an overlay), the image root is copied
//! instead.
//!
//! The mount is made in a private mount namespace of vmlab's own (the
//! runtime, a child, inherits it): it never shows on the host, and it goes
//! away with vmlab even if vmlab is killed before its cleanup.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::Error;

/// A bundle directory: `config.json`, the runtime's log, and `rootfs/`
/// (with `upper/` and `work/` behind it). Dropping it unmounts the root
/// and removes the directory.
#[derive(Debug)]
pub struct Bundle {
    dir: PathBuf,
    mounted: bool,
}

/// How the bundle's root file system was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RootKind {
    /// An overlay on the image root.
    Overlay,
    /// A copy of the image root.
    Copy,
}

impl Bundle {
    /// Creates `dir` (it must not exist) and the container's root in it,
    /// backed by `image_root`.
    pub fn create(dir: PathBuf, image_root: &Path) -> Result<(Bundle, RootKind), Error> {
        let io = |what: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| Error::Io { what, path, source }
        };
        let lower = image_root
            .canonicalize()
            .map_err(io("cannot open the image root", image_root))?;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(io("cannot create the bundle directory", &dir))?;
        // From here on, Drop cleans up whatever was made.
        let mut bundle = Bundle {
            dir,
            mounted: false,
        };
        for sub in ["rootfs", "upper", "work"] {
            let p = bundle.dir.join(sub);
            std::fs::create_dir(&p).map_err(io("cannot create", &p))?;
        }
        match bundle.mount_overlay(&lower) {
            Ok(()) => {
                bundle.mounted = true;
                Ok((bundle, RootKind::Overlay))
            }
            Err(reason) => {
                log::info!("cannot mount an overlay on the image root ({reason}): copying it");
                bundle.copy_root(&lower)?;
                Ok((bundle, RootKind::Copy))
            }
        }
    }

    /// The bundle directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The container's root, `rootfs` in the bundle.
    pub fn rootfs(&self) -> PathBuf {
        self.dir.join("rootfs")
    }

    /// Where the runtime writes its log.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("runtime.log")
    }

    /// Writes `config.json`.
    pub fn write_config(&self, spec: &oci_spec::runtime::Spec) -> Result<(), Error> {
        let path = self.dir.join("config.json");
        let json = serde_json::to_vec_pretty(spec).map_err(|e| Error::Io {
            what: "cannot serialize",
            path: path.clone(),
            source: e.into(),
        })?;
        std::fs::write(&path, json).map_err(|source| Error::Io {
            what: "cannot write",
            path,
            source,
        })
    }

    fn mount_overlay(&self, lower: &Path) -> Result<(), String> {
        let upper = self.dir.join("upper");
        let work = self.dir.join("work");
        // The option string separates with ',' and lower layers with ':'.
        for p in [lower, upper.as_path(), work.as_path()] {
            if p.as_os_str()
                .as_bytes()
                .iter()
                .any(|b| matches!(b, b',' | b':' | b'\\'))
            {
                return Err(format!(
                    "{} has a character overlayfs options cannot carry (',' ':' '\\')",
                    p.display()
                ));
            }
        }
        let mut data = b"lowerdir=".to_vec();
        data.extend_from_slice(lower.as_os_str().as_bytes());
        data.extend_from_slice(b",upperdir=");
        data.extend_from_slice(upper.as_os_str().as_bytes());
        data.extend_from_slice(b",workdir=");
        data.extend_from_slice(work.as_os_str().as_bytes());
        let data = CString::new(data).map_err(|_| "a path has a NUL byte".to_string())?;
        let target = CString::new(self.rootfs().as_os_str().as_bytes())
            .map_err(|_| "a path has a NUL byte".to_string())?;
        // SAFETY: all pointers are valid NUL-terminated strings that outlive
        // the call.
        let rc = unsafe {
            libc::mount(
                c"overlay".as_ptr(),
                target.as_ptr(),
                c"overlay".as_ptr(),
                0,
                data.as_ptr().cast(),
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error().to_string());
        }
        Ok(())
    }

    /// `cp -a IMAGE_ROOT/. rootfs/`: keeps owners, modes, links, device
    /// nodes and extended attributes, and shares blocks where the file
    /// system can (reflink).
    fn copy_root(&self, lower: &Path) -> Result<(), Error> {
        let mut src = lower.as_os_str().to_owned();
        src.push("/.");
        let out = Command::new("cp")
            .args(["-a", "--reflink=auto"])
            .arg(&src)
            .arg(self.rootfs())
            .stdin(Stdio::null())
            .output()
            .map_err(|source| Error::Host {
                what: "running cp",
                source,
            })?;
        if !out.status.success() {
            return Err(Error::RootCopy(format!(
                "cp -a {} {}: {}",
                lower.display(),
                self.rootfs().display(),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(())
    }

    fn unmount(&mut self) -> bool {
        if !self.mounted {
            return true;
        }
        let Ok(target) = CString::new(self.rootfs().as_os_str().as_bytes()) else {
            return false;
        };
        // SAFETY: `target` is a valid NUL-terminated path.
        let mut rc = unsafe { libc::umount2(target.as_ptr(), 0) };
        if rc != 0 {
            // Still busy (a runtime that left a process behind): detach it
            // now, the kernel frees it when the last user goes.
            // SAFETY: as above.
            rc = unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        }
        if rc != 0 {
            log::warn!(
                "cannot unmount {}: {}",
                self.rootfs().display(),
                std::io::Error::last_os_error()
            );
            return false;
        }
        self.mounted = false;
        true
    }
}

impl Drop for Bundle {
    fn drop(&mut self) {
        if self.unmount() {
            if let Err(e) = std::fs::remove_dir_all(&self.dir) {
                log::warn!("cannot remove the bundle {}: {e}", self.dir.display());
            }
        } else {
            // Never walk into a still-mounted root: only the bundle's own
            // files are removed.
            for f in ["config.json", "runtime.log"] {
                let _ = std::fs::remove_file(self.dir.join(f));
            }
            log::warn!(
                "leaving {} behind (its root is still mounted)",
                self.dir.display()
            );
        }
    }
}

/// Moves vmlab (this thread, and the children it starts from now on) into
/// a mount namespace of its own, whose mounts do not propagate to the
/// host's. Fails without root; the caller may then go on in the host's
/// namespace.
pub fn enter_private_mount_namespace() -> std::io::Result<()> {
    // SAFETY: unshare(2) with a valid flag; it affects this thread only,
    // which is the one that mounts and spawns the runtime.
    if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // Slave, not private: mounts the host makes later still show here.
    // SAFETY: valid NUL-terminated target; the other pointers may be null
    // for a propagation change.
    let rc = unsafe {
        libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_SLAVE,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
