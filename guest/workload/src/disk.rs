//! `disk`: sequential write, sequential read and 4 KiB random reads.
//!
//! On a file, a directory (a scratch file `vmlab-workload.dat` inside it,
//! removed afterwards, also on failure) or, with `--force`, a block device
//! (whose first `--mib` MiB are overwritten; never created or removed).
//!
//! 1. write `--mib` MiB sequentially in `--block-size` pieces, then fsync;
//!    the time includes the fsync, so it is the time to durable data;
//! 2. drop the file's clean pages from the page cache
//!    (`posix_fadvise(DONTNEED)`, which needs no privilege and touches
//!    nothing else) and read it back sequentially;
//! 3. drop the cache again, disable read-ahead (`FADV_RANDOM`) and do
//!    `--random-ops` 4 KiB reads at 4 KiB-aligned offsets from the fixed
//!    PRNG, so every run reads the same blocks.
//!
//! Without `--direct` the reads still go through the page cache of the
//! kernel the workload runs on (dropped before each read phase, reported as
//! `cache_dropped`); in a guest the host's page cache for the image file
//! sits below that and is not dropped: that is part of what a VM costs or
//! saves, and `--direct` in the guest does not bypass it either.
//!
//! `--direct` opens with O_DIRECT, with 4096-aligned buffers, offsets and
//! sizes. A file system without O_DIRECT support (tmpfs before Linux 6.6,
//! some FUSE and overlay setups) fails with EINVAL: the workload then stops
//! with an error that says so, rather than silently measuring buffered I/O
//! under a `--direct` label.

use std::alloc::{self, Layout};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::time::Instant;

use crate::args::{ArgError, Parsed, Spec};
use crate::error::{errno_text, Context, Error};
use crate::json::Object;
use crate::prng::{XorShift64, DATA_SEED, OFFSET_SEED};

pub const SPEC: Spec = Spec {
    command: "disk",
    values: &["--path", "--mib", "--block-size", "--random-ops"],
    switches: &["--direct", "--force"],
};

/// The scratch file's name inside a directory target.
pub const SCRATCH_NAME: &str = "vmlab-workload.dat";
const DEFAULT_MIB: u64 = 64;
const MAX_MIB: u64 = 1 << 20;
const DEFAULT_BLOCK: u64 = 1 << 20;
const MAX_BLOCK: u64 = 64 << 20;
const DEFAULT_RANDOM_OPS: u64 = 2000;
const MAX_RANDOM_OPS: u64 = 100_000_000;
/// Alignment of buffers, offsets and sizes: O_DIRECT needs the logical
/// block size, which is at most 4096 on Linux block devices.
const ALIGN: usize = 4096;
/// Size of each random read.
const RANDOM_READ: usize = 4096;

/// What `--path` turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Block,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::File => "file",
            Kind::Dir => "dir",
            Kind::Block => "block",
        }
    }
}

/// Where the workload will write, decided from `stat` alone (nothing is
/// opened), so that a refusal happens before any byte can be written.
#[derive(Debug, PartialEq, Eq)]
pub struct Target {
    pub kind: Kind,
    /// The file or device actually written.
    pub file: PathBuf,
}

pub fn plan(path: &Path, force: bool, mib: u64) -> Result<Target, Error> {
    let kind = match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => Kind::Dir,
        Ok(m) if m.is_file() => Kind::File,
        Ok(m) if m.file_type().is_block_device() => {
            if !force {
                return Err(Error::Failed(format!(
                    "{} is a block device: the disk workload would overwrite its first {mib} MiB; add --force if that is intended",
                    path.display()
                )));
            }
            Kind::Block
        }
        Ok(_) => {
            return Err(Error::Failed(format!(
                "{} is not a regular file, directory or block device",
                path.display()
            )))
        }
        // A new file is created (and kept: the caller named it).
        Err(e) if e.kind() == io::ErrorKind::NotFound => Kind::File,
        Err(err) => {
            return Err(Error::Io {
                what: format!("stat {}", path.display()),
                err,
            })
        }
    };
    let file = match kind {
        Kind::Dir => path.join(SCRATCH_NAME),
        _ => path.to_owned(),
    };
    Ok(Target { kind, file })
}

struct Options {
    path: PathBuf,
    mib: u64,
    block: usize,
    random_ops: u64,
    direct: bool,
    force: bool,
}

fn options(args: &Parsed) -> Result<Options, ArgError> {
    let path = args.path("--path")?;
    let mib = args.u64_in("--mib", DEFAULT_MIB, 1, MAX_MIB)?;
    let block = args.size_in("--block-size", DEFAULT_BLOCK, ALIGN as u64, MAX_BLOCK)?;
    if !block.is_multiple_of(ALIGN as u64) {
        return Err(ArgError::BadValue {
            flag: "--block-size",
            value: block.to_string(),
            why: format!("must be a multiple of {ALIGN}"),
        });
    }
    Ok(Options {
        path,
        mib,
        // At most MAX_BLOCK, so it fits.
        block: block as usize,
        random_ops: args.u64_in("--random-ops", DEFAULT_RANDOM_OPS, 1, MAX_RANDOM_OPS)?,
        direct: args.switch("--direct"),
        force: args.switch("--force"),
    })
}

pub fn run(args: &Parsed) -> Result<String, Error> {
    let opts = options(args)?;
    let target = plan(&opts.path, opts.force, opts.mib)?;
    // Removes the scratch file however this function returns.
    let _scratch = (target.kind == Kind::Dir).then(|| Scratch(target.file.clone()));
    let r = measure(&target, &opts)?;
    let total_mib = opts.mib as f64;
    Ok(Object::new()
        .str("workload", "disk")
        .str("path", &target.file.to_string_lossy())
        .str("kind", target.kind.name())
        .u64("mib", opts.mib)
        .u64("block_size", opts.block as u64)
        .u64("random_ops", opts.random_ops)
        .bool("direct", opts.direct)
        .bool("cache_dropped", r.cache_dropped)
        .f64("write_seconds", r.write)
        .f64("write_mib_per_s", total_mib / r.write)
        .f64("read_seconds", r.read)
        .f64("read_mib_per_s", total_mib / r.read)
        .f64("rand_read_seconds", r.random)
        .f64("rand_read_iops", opts.random_ops as f64 / r.random)
        .finish())
}

/// Phase durations in seconds.
struct Results {
    write: f64,
    read: f64,
    random: f64,
    cache_dropped: bool,
}

fn measure(target: &Target, opts: &Options) -> Result<Results, Error> {
    let path = &target.file;
    let total = opts.mib << 20;
    let flags = if opts.direct { libc::O_DIRECT } else { 0 };
    let mut buf = AlignedBuf::new(opts.block)?;
    XorShift64::new(DATA_SEED).fill(&mut buf);

    // 1. Sequential write + fsync.
    let is_block = target.kind == Kind::Block;
    let mut file = OpenOptions::new()
        .write(true)
        .create(!is_block)
        .truncate(!is_block)
        .custom_flags(flags)
        .open(path)
        .map_err(|e| {
            io_error(
                opts.direct,
                format!("open {} for writing", path.display()),
                e,
            )
        })?;
    if is_block {
        let size = file
            .seek(SeekFrom::End(0))
            .and_then(|size| file.rewind().map(|()| size))
            .context(|| format!("size of {}", path.display()))?;
        if size < total {
            return Err(Error::Failed(format!(
                "{} has {size} bytes, fewer than --mib {}",
                path.display(),
                opts.mib
            )));
        }
    }
    let start = Instant::now();
    let mut offset = 0u64;
    let mut index = 0u64;
    while offset < total {
        let n = (total - offset).min(opts.block as u64) as usize;
        // A block number at the start of each block makes every block
        // distinct, so no deduplicating layer can shortcut the writes.
        buf[..8].copy_from_slice(&index.to_le_bytes());
        file.write_all(&buf[..n])
            .map_err(|e| io_error(opts.direct, format!("write {}", path.display()), e))?;
        offset += n as u64;
        index += 1;
    }
    file.sync_all()
        .context(|| format!("fsync {}", path.display()))?;
    let write = start.elapsed().as_secs_f64();
    let mut cache_dropped = fadvise(&file, total, libc::POSIX_FADV_DONTNEED);
    drop(file);

    // 2. Sequential read.
    let mut file = OpenOptions::new()
        .read(true)
        .custom_flags(flags)
        .open(path)
        .map_err(|e| {
            io_error(
                opts.direct,
                format!("open {} for reading", path.display()),
                e,
            )
        })?;
    let start = Instant::now();
    let mut offset = 0u64;
    while offset < total {
        let n = (total - offset).min(opts.block as u64) as usize;
        file.read_exact(&mut buf[..n]).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                Error::Failed(format!(
                    "{} ended at about {offset} bytes while reading back {total}: changed by someone else?",
                    path.display()
                ))
            } else {
                io_error(opts.direct, format!("read {}", path.display()), e)
            }
        })?;
        offset += n as u64;
    }
    let read = start.elapsed().as_secs_f64();

    // 3. Random 4 KiB reads.
    cache_dropped &= fadvise(&file, total, libc::POSIX_FADV_DONTNEED);
    // Without read-ahead each read fetches 4 KiB, not a window around it;
    // only a hint, so its failure changes nothing.
    fadvise(&file, total, libc::POSIX_FADV_RANDOM);
    let mut small = AlignedBuf::new(RANDOM_READ)?;
    let blocks = total / RANDOM_READ as u64;
    let mut rng = XorShift64::new(OFFSET_SEED);
    let start = Instant::now();
    for _ in 0..opts.random_ops {
        let at = rng.below(blocks) * RANDOM_READ as u64;
        file.read_exact_at(&mut small, at)
            .map_err(|e| io_error(opts.direct, format!("read {} at {at}", path.display()), e))?;
    }
    let random = start.elapsed().as_secs_f64();

    Ok(Results {
        write,
        read,
        random,
        cache_dropped,
    })
}

/// An I/O error; with `--direct`, EINVAL is the file system refusing
/// O_DIRECT (the workload's own alignment is always right), said plainly.
fn io_error(direct: bool, what: String, err: io::Error) -> Error {
    if direct && err.raw_os_error() == Some(libc::EINVAL) {
        Error::Failed(format!(
            "{what}: {}: the file system does not support O_DIRECT here; run without --direct",
            errno_text(&err)
        ))
    } else {
        Error::Io { what, err }
    }
}

/// `posix_fadvise` over the first `len` bytes; true if the kernel took it.
fn fadvise(file: &File, len: u64, advice: libc::c_int) -> bool {
    // 0 means "to the end of the file", right for any length that does not
    // fit (none here: --mib is at most 1 TiB).
    let len = libc::off_t::try_from(len).unwrap_or(0);
    // SAFETY: posix_fadvise takes integers only and touches no memory.
    unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, len, advice) == 0 }
}

/// Removes the scratch file when dropped.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        // Nothing to do if it was never created.
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A zeroed heap buffer aligned to [`ALIGN`], as O_DIRECT requires (a `Vec`
/// only guarantees the alignment of its element type).
struct AlignedBuf {
    ptr: NonNull<u8>,
    layout: Layout,
}

impl AlignedBuf {
    fn new(len: usize) -> Result<AlignedBuf, Error> {
        let layout = Layout::from_size_align(len.max(1), ALIGN)
            .map_err(|_| Error::Failed(format!("invalid buffer size {len}")))?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(ptr)
            .ok_or_else(|| Error::Failed(format!("cannot allocate a {len}-byte buffer")))?;
        Ok(AlignedBuf { ptr, layout })
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr points to layout.size() initialized (zeroed) bytes
        // owned by self, alive until drop.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.layout.size()) }
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in deref, and &mut self makes the borrow unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: ptr was allocated by alloc_zeroed with this very layout.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TempDir;
    use std::ffi::OsString;

    fn run_with(list: &[&str]) -> Result<String, Error> {
        let args: Vec<OsString> = list.iter().map(OsString::from).collect();
        run(&crate::args::parse(&SPEC, &args).map_err(Error::Usage)?)
    }

    fn check_line(line: &str, direct: bool) {
        assert!(line.starts_with(r#"{"workload":"disk","path":"#), "{line}");
        assert!(line.contains(&format!(r#""direct":{direct}"#)), "{line}");
        for key in ["write_mib_per_s", "read_mib_per_s", "rand_read_iops"] {
            assert!(line.contains(&format!(r#""{key}":"#)), "{key}: {line}");
        }
        assert!(!line.contains("null"), "{line}");
    }

    #[test]
    fn directory_buffered() {
        let dir = TempDir::new("disk");
        let d = dir.path().to_str().unwrap();
        let line = run_with(&[
            "--path",
            d,
            "--mib",
            "2",
            "--block-size",
            "64K",
            "--random-ops",
            "50",
        ])
        .unwrap();
        check_line(&line, false);
        assert!(line.contains(r#""kind":"dir""#), "{line}");
        assert!(line.contains(&format!("{SCRATCH_NAME}\"")), "{line}");
        assert!(line.contains(r#""cache_dropped":true"#), "{line}");
        assert!(
            !dir.path().join(SCRATCH_NAME).exists(),
            "the scratch file is removed"
        );
    }

    /// O_DIRECT on the system temp dir: works on ext4/xfs/btrfs (and tmpfs
    /// since Linux 6.6); elsewhere the documented error, never a silent
    /// fallback.
    #[test]
    fn directory_direct() {
        let dir = TempDir::new("disk-direct");
        let d = dir.path().to_str().unwrap();
        match run_with(&[
            "--path",
            d,
            "--mib",
            "2",
            "--block-size",
            "8K",
            "--random-ops",
            "50",
            "--direct",
        ]) {
            Ok(line) => check_line(&line, true),
            Err(Error::Failed(msg)) if msg.contains("does not support O_DIRECT") => {
                eprintln!("no O_DIRECT in {d}: {msg}");
            }
            Err(e) => panic!("{e}"),
        }
        assert!(!dir.path().join(SCRATCH_NAME).exists());
    }

    #[test]
    fn named_file_is_created_and_kept() {
        let dir = TempDir::new("disk-file");
        let file = dir.path().join("data.img");
        let f = file.to_str().unwrap();
        let line = run_with(&["--path", f, "--mib=1", "--random-ops=10"]).unwrap();
        check_line(&line, false);
        assert!(line.contains(r#""kind":"file""#), "{line}");
        assert_eq!(std::fs::metadata(&file).unwrap().len(), 1 << 20);
        // The content is the data stream with block numbers on top.
        let data = std::fs::read(&file).unwrap();
        assert_eq!(data[..8], 0u64.to_le_bytes());
        let mut expected = vec![0u8; 16];
        XorShift64::new(DATA_SEED).fill(&mut expected);
        assert_eq!(data[8..16], expected[8..16]);
    }

    #[test]
    fn refusals_happen_before_anything_is_opened() {
        // Only `plan` is called: it stats and never opens, so this cannot
        // write to a real device even if the check were wrong.
        let block = [
            "/dev/vda",
            "/dev/sda",
            "/dev/nvme0n1",
            "/dev/loop0",
            "/dev/xvda",
        ]
        .iter()
        .map(Path::new)
        .find(|p| std::fs::metadata(p).is_ok_and(|m| m.file_type().is_block_device()));
        if let Some(dev) = block {
            match plan(dev, false, 64) {
                Err(Error::Failed(msg)) => assert!(msg.contains("--force"), "{msg}"),
                other => panic!("{other:?}"),
            }
            assert_eq!(plan(dev, true, 64).unwrap().kind, Kind::Block);
        }
        assert!(matches!(
            plan(Path::new("/dev/null"), true, 1),
            Err(Error::Failed(_))
        ));
        let err = plan(Path::new("/nonexistent-dir/x/y"), false, 1).unwrap();
        assert_eq!(err.kind, Kind::File); // fails later, at open
        let err = run_with(&["--path", "/nonexistent-dir/x/y", "--mib", "1"]).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("open /nonexistent-dir/x/y for writing: "),
            "{err}"
        );
    }

    #[test]
    fn bad_arguments() {
        for list in [
            &["--mib", "1"][..],
            &["--path", "/tmp", "--block-size", "1000"],
            &["--path", "/tmp", "--block-size", "128M"],
            &["--path", "/tmp", "--random-ops", "0"],
            &["--path", "/tmp", "--mib", "-3"],
        ] {
            assert!(matches!(run_with(list), Err(Error::Usage(_))), "{list:?}");
        }
    }

    #[test]
    fn einval_under_direct_is_explained() {
        let e = io_error(
            true,
            "write f".into(),
            io::Error::from_raw_os_error(libc::EINVAL),
        );
        assert!(e.to_string().contains("does not support O_DIRECT"), "{e}");
        let e = io_error(
            false,
            "write f".into(),
            io::Error::from_raw_os_error(libc::EINVAL),
        );
        assert_eq!(e.to_string(), "write f: Invalid argument");
    }

    #[test]
    fn aligned_buffers() {
        for len in [1, 4096, 12288, 1 << 20] {
            let mut b = AlignedBuf::new(len).unwrap();
            assert_eq!(b.as_ptr() as usize % ALIGN, 0);
            assert_eq!(b.len(), len);
            assert!(b.iter().all(|&x| x == 0));
            b[len - 1] = 1;
        }
    }
}
