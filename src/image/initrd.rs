//! The initramfs of a VM whose root file system comes over virtio-fs
//! (`vmlab run --image --root-device fs`, `vmlab run --rootfs DIR`):
//! vmlab's guest init as `/init`, the directories it mounts on, and
//! `/dev/console`, in the cpio "newc" format the kernel unpacks. Nothing
//! of the image is in it: the init mounts the root share (read-only with a
//! tmpfs layer over it, or by itself for `--rootfs-mode rw|ro`) and
//! switches root there (guest/init). Built once per init binary and
//! cached next to the images (`initrd-<init digest>.cpio`, renamed into
//! place).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::Error;

/// `c_mode` bits.
const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFCHR: u32 = 0o020000;

/// The cpio archive for `init`, in `cache` (built if missing).
pub fn fs_root_initrd(init: &Path, cache: &Path, init_digest: &str) -> Result<PathBuf, Error> {
    let out = cache.join(format!("initrd-{init_digest}.cpio"));
    if out.is_file() {
        return Ok(out);
    }
    let io = |what: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Io { what, path, source }
    };
    let binary = fs::read(init).map_err(io("read", init))?;
    let mut cpio = Vec::with_capacity(binary.len() + 4096);
    let mut ino = 1;
    let mut entry = |cpio: &mut Vec<u8>, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]| {
        header(cpio, ino, name, mode, rdev, data.len());
        cpio.extend_from_slice(data);
        pad(cpio);
        ino += 1;
    };
    for dir in ["dev", "proc", "sys", "tmp", "run", ".vmlab"] {
        entry(&mut cpio, dir, S_IFDIR | 0o755, (0, 0), &[]);
    }
    // The kernel opens it as init's stdin, stdout and stderr.
    entry(&mut cpio, "dev/console", S_IFCHR | 0o600, (5, 1), &[]);
    entry(&mut cpio, "init", S_IFREG | 0o755, (0, 0), &binary);
    entry(&mut cpio, "TRAILER!!!", 0, (0, 0), &[]);
    fs::create_dir_all(cache).map_err(io("create the cache directory", cache))?;
    let tmp = cache.join(format!(
        "initrd-{init_digest}.cpio.tmp-{}",
        std::process::id()
    ));
    let mut f = fs::File::create(&tmp).map_err(io("create", &tmp))?;
    f.write_all(&cpio).map_err(io("write", &tmp))?;
    drop(f);
    fs::rename(&tmp, &out).map_err(io("rename into place", &out))?;
    Ok(out)
}

/// A newc header and the NUL-terminated name, padded to 4 bytes.
fn header(cpio: &mut Vec<u8>, ino: u32, name: &str, mode: u32, rdev: (u32, u32), size: usize) {
    let fields = [
        ino,
        mode,
        0,                                       // uid
        0,                                       // gid
        if mode & S_IFDIR != 0 { 2 } else { 1 }, // nlink
        0,                                       // mtime
        size as u32,
        0, // devmajor
        0, // devminor
        rdev.0,
        rdev.1,
        name.len() as u32 + 1,
        0, // check
    ];
    cpio.extend_from_slice(b"070701");
    for f in fields {
        cpio.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    cpio.extend_from_slice(name.as_bytes());
    cpio.push(0);
    pad(cpio);
}

fn pad(cpio: &mut Vec<u8>) {
    while !cpio.len().is_multiple_of(4) {
        cpio.push(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_newc_archive_cpio_can_list() {
        let dir = std::env::temp_dir().join(format!("vmlab-initrd-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let init = dir.join("fake-init");
        fs::write(&init, b"#!/bin/true\n").unwrap();
        let out = fs_root_initrd(&init, &dir, "abc").unwrap();
        assert_eq!(out, dir.join("initrd-abc.cpio"));
        let bytes = fs::read(&out).unwrap();
        assert!(bytes.starts_with(b"070701"));
        assert_eq!(bytes.len() % 4, 0);
        if let Ok(o) = std::process::Command::new("cpio")
            .args(["-t", "-F"])
            .arg(&out)
            .output()
        {
            if o.status.success() {
                let names = String::from_utf8_lossy(&o.stdout);
                for want in ["init", "dev/console", ".vmlab"] {
                    assert!(names.lines().any(|l| l == want), "{names}");
                }
            }
        }
        let _ = fs::remove_dir_all(&dir);
    }
}
