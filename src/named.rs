//! Named VMs: the state directory of a VM started with
//! `vmlab run --name NAME --detach` (`/run/vmlab/NAME` by default).
//!
//! ```text
//! STATE/NAME/lock         flock(LOCK_EX) held by the VMM for its lifetime
//! STATE/NAME/pid          the VMM's pid
//! STATE/NAME/config.json  what was started, when, where its sockets are
//! STATE/NAME/console.log  the guest console
//! STATE/NAME/vsock.sock   the vsock socket (the guest agent is port 1024)
//! ```
//!
//! The lock decides everything, race-free: a VM is running exactly while
//! its lock is held (the kernel drops a flock when its holder dies, even by
//! SIGKILL), and a name is taken exactly while its lock is held. A new
//! state directory is built under a temporary name with its lock already
//! held and then renamed into place, so no one ever sees a live VM's
//! directory unlocked. Whoever finds a directory whose lock it can take
//! holds a stale one (its VMM died without cleaning up) and removes it
//! under that lock; after taking a lock, the holder checks that the lock
//! file is still the one at the path (a remover may have unlinked it).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Where state directories go without `--state-dir` or `VMLAB_STATE_DIR`.
pub const DEFAULT_STATE_DIR: &str = "/run/vmlab";
/// The environment variable naming the state directory.
pub const STATE_DIR_ENV: &str = "VMLAB_STATE_DIR";
/// The longest name.
pub const MAX_NAME: usize = 64;

const LOCK: &str = "lock";
const PID: &str = "pid";
const CONFIG: &str = "config.json";
const CONSOLE: &str = "console.log";
const VSOCK: &str = "vsock.sock";

/// State-directory errors, each a one-line message for the user.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The name breaks the rules.
    #[error(
        "invalid VM name {0:?}: use 1 to 64 of A-Z a-z 0-9 _ . -, starting with a letter or digit"
    )]
    InvalidName(String),
    /// No VM of that name.
    #[error("no such VM: {0}")]
    NoSuchVm(String),
    /// The name is taken by a running VM.
    #[error("the name {name:?} is in use by a running VM (pid {pid})")]
    InUse {
        /// The name.
        name: String,
        /// Its VMM's pid, if known.
        pid: String,
    },
    /// The VM is not running any more (its VMM died); its state was
    /// removed.
    #[error("VM {name} is not running (its VMM{pid} is gone); its state was removed")]
    NotRunning {
        /// The name.
        name: String,
        /// " (pid N)" if known.
        pid: String,
    },
    /// A file-system operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
}

fn io_err(path: &Path) -> impl Fn(io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Checks a VM name: `[A-Za-z0-9][A-Za-z0-9_.-]{0,63}`.
pub fn validate_name(name: &str) -> Result<(), Error> {
    let b = name.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= MAX_NAME
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'));
    match ok {
        true => Ok(()),
        false => Err(Error::InvalidName(name.to_string())),
    }
}

/// For clap: a valid name.
pub fn parse_name(name: &str) -> Result<String, String> {
    validate_name(name)
        .map(|()| name.to_string())
        .map_err(|e| e.to_string())
}

/// The state directory: `flag` (`--state-dir`), else `VMLAB_STATE_DIR`,
/// else [`DEFAULT_STATE_DIR`].
pub fn state_root(flag: Option<&Path>) -> PathBuf {
    match flag {
        Some(dir) => dir.to_path_buf(),
        None => match std::env::var_os(STATE_DIR_ENV) {
            Some(dir) if !dir.is_empty() => PathBuf::from(dir),
            _ => PathBuf::from(DEFAULT_STATE_DIR),
        },
    }
}

/// What `config.json` records.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Record {
    /// The VM's name.
    pub name: String,
    /// The VMM's pid.
    pub pid: u32,
    /// When it was started, in seconds since the epoch.
    pub created: f64,
    /// The kernel it booted.
    pub kernel: PathBuf,
    /// Guest memory in bytes.
    pub memory: u64,
    /// vCPUs.
    pub cpus: u8,
    /// The main command (empty: none, the guest serves the agent only).
    pub command: Vec<String>,
    /// The guest's vsock CID.
    pub cid: u64,
    /// The vsock socket (the agent is port 1024 behind it).
    pub vsock: PathBuf,
    /// The console log.
    pub console: PathBuf,
}

/// Seconds since the epoch, now.
pub fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The paths of one VM's state.
#[derive(Debug, Clone)]
pub struct Paths {
    /// `STATE/NAME`.
    pub dir: PathBuf,
}

impl Paths {
    /// The paths of VM `name` under `root`.
    pub fn new(root: &Path, name: &str) -> Paths {
        Paths {
            dir: root.join(name),
        }
    }
    /// The VMM's lock file.
    pub fn lock(&self) -> PathBuf {
        self.dir.join(LOCK)
    }
    /// The VMM's pid.
    pub fn pid(&self) -> PathBuf {
        self.dir.join(PID)
    }
    /// `config.json`.
    pub fn config(&self) -> PathBuf {
        self.dir.join(CONFIG)
    }
    /// The console log.
    pub fn console(&self) -> PathBuf {
        self.dir.join(CONSOLE)
    }
    /// The vsock socket.
    pub fn vsock(&self) -> PathBuf {
        self.dir.join(VSOCK)
    }
    /// The VMM's pid as written, or "?".
    pub fn read_pid(&self) -> Option<u32> {
        fs::read_to_string(self.pid()).ok()?.trim().parse().ok()
    }
    /// The record, if readable.
    pub fn read_record(&self) -> Option<Record> {
        serde_json::from_slice(&fs::read(self.config()).ok()?).ok()
    }
}

/// `flock(LOCK_EX | LOCK_NB)`: Ok(true) if taken, Ok(false) if held by
/// someone else.
fn try_lock(file: &File) -> io::Result<bool> {
    // SAFETY: flock takes a descriptor and flags.
    match unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } {
        0 => Ok(true),
        _ => match io::Error::last_os_error() {
            e if e.raw_os_error() == Some(libc::EWOULDBLOCK) => Ok(false),
            e => Err(e),
        },
    }
}

fn open_lock(path: &Path, create: bool) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
}

/// What [`probe`] found at a name.
#[derive(Debug)]
pub enum Probe {
    /// No state directory.
    Missing,
    /// A running VM (its lock is held).
    Running(Paths),
    /// A stale state directory, now locked by the caller (dropping the
    /// value releases it; [`Stale::remove`] cleans up).
    Stale(Stale),
}

/// A stale state directory, locked by us.
#[derive(Debug)]
pub struct Stale {
    /// Its paths.
    pub paths: Paths,
    _lock: File,
}

impl Stale {
    /// Removes the directory (under its lock).
    pub fn remove(self) -> Result<(), Error> {
        remove_dir(&self.paths.dir)
    }
}

fn remove_dir(dir: &Path) -> Result<(), Error> {
    match fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(dir)(e)),
    }
}

/// Finds out whether VM `name` is running.
pub fn probe(root: &Path, name: &str) -> Result<Probe, Error> {
    let paths = Paths::new(root, name);
    let lock_path = paths.lock();
    loop {
        let file = match open_lock(&lock_path, false) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // A directory without a lock file is the debris of a
                // removal that was interrupted; nothing can own it.
                return match paths.dir.exists() {
                    true => {
                        remove_dir(&paths.dir)?;
                        Ok(Probe::Missing)
                    }
                    false => Ok(Probe::Missing),
                };
            }
            Err(e) => return Err(io_err(&lock_path)(e)),
        };
        if !try_lock(&file).map_err(io_err(&lock_path))? {
            return Ok(Probe::Running(paths));
        }
        // Locked by us: still the file at the path? (Someone may have
        // removed the stale directory, and a new VM taken the name, while
        // we waited for nothing: flock is non-blocking, but the open came
        // first.)
        let same = match (file.metadata(), fs::metadata(&lock_path)) {
            (Ok(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
            _ => false,
        };
        if same {
            return Ok(Probe::Stale(Stale { paths, _lock: file }));
        }
    }
}

/// Looks up a running VM; a stale directory is removed and reported as
/// [`Error::NotRunning`].
pub fn running(root: &Path, name: &str) -> Result<Paths, Error> {
    validate_name(name)?;
    match probe(root, name)? {
        Probe::Missing => Err(Error::NoSuchVm(name.to_string())),
        Probe::Running(paths) => Ok(paths),
        Probe::Stale(stale) => {
            let pid = stale
                .paths
                .read_pid()
                .map_or_else(String::new, |p| format!(" (pid {p})"));
            stale.remove()?;
            Err(Error::NotRunning {
                name: name.to_string(),
                pid,
            })
        }
    }
}

/// The names under `root` (state directories, not temporaries), sorted.
pub fn names(root: &Path) -> Result<Vec<String>, Error> {
    let entries = match fs::read_dir(root) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(root)(e)),
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| validate_name(n).is_ok())
        .collect();
    names.sort();
    Ok(names)
}

/// The state of a VM being started, owned by its VMM: dropping it (or
/// the process dying) releases the name.
#[derive(Debug)]
pub struct Owner {
    /// Its paths.
    pub paths: Paths,
    lock: File,
}

impl Owner {
    /// Takes `name` under `root`: creates its state directory with the
    /// lock held, replacing a stale one. [`Error::InUse`] if a running VM
    /// has the name.
    pub fn create(root: &Path, name: &str) -> Result<Owner, Error> {
        validate_name(name)?;
        fs::create_dir_all(root).map_err(io_err(root))?;
        let paths = Paths::new(root, name);
        // Build it under a temporary name, lock held, then rename.
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let tmp = root.join(format!(".tmp-{name}-{}-{seq}", std::process::id()));
        remove_dir(&tmp)?;
        fs::create_dir(&tmp).map_err(io_err(&tmp))?;
        let lock_path = tmp.join(LOCK);
        let lock = open_lock(&lock_path, true).map_err(io_err(&lock_path))?;
        if !try_lock(&lock).map_err(io_err(&lock_path))? {
            // Nobody else knows this path.
            return Err(io_err(&lock_path)(io::Error::other(
                "locked by another process",
            )));
        }
        loop {
            match fs::rename(&tmp, &paths.dir) {
                Ok(()) => return Ok(Owner { paths, lock }),
                Err(e)
                    if matches!(e.raw_os_error(), Some(libc::ENOTEMPTY) | Some(libc::EEXIST)) => {}
                Err(e) => {
                    let _ = remove_dir(&tmp);
                    return Err(io_err(&paths.dir)(e));
                }
            }
            match probe(root, name) {
                Ok(Probe::Missing) => {}
                Ok(Probe::Stale(stale)) => {
                    log::info!("removing the stale state of VM {name}");
                    if let Err(e) = stale.remove() {
                        let _ = remove_dir(&tmp);
                        return Err(e);
                    }
                }
                Ok(Probe::Running(p)) => {
                    let _ = remove_dir(&tmp);
                    return Err(Error::InUse {
                        name: name.to_string(),
                        pid: p.read_pid().map_or("?".into(), |p| p.to_string()),
                    });
                }
                Err(e) => {
                    let _ = remove_dir(&tmp);
                    return Err(e);
                }
            }
        }
    }

    /// Writes `pid` and `config.json` (each replaced atomically).
    pub fn write(&self, record: &Record) -> Result<(), Error> {
        write_atomic(&self.paths.pid(), format!("{}\n", record.pid).as_bytes())?;
        let json = serde_json::to_vec_pretty(record).map_err(|e| Error::Io {
            path: self.paths.config(),
            source: io::Error::other(e),
        })?;
        write_atomic(&self.paths.config(), &json)
    }

    /// The lock's descriptor (kept open across fork: the daemon holds it).
    pub fn lock_fd(&self) -> i32 {
        self.lock.as_raw_fd()
    }

    /// Removes the state directory; the name is free once this returns.
    pub fn remove(self) -> Result<(), Error> {
        remove_dir(&self.paths.dir)
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
    f.write_all(bytes).map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))
}

/// Host memory of a process: (RSS, PSS) in bytes, from
/// `/proc/PID/smaps_rollup`.
pub fn memory(pid: u32) -> Option<(u64, u64)> {
    let text = fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with(name))?;
        let kb: u64 = line[name.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kb * 1024)
    };
    Some((field("Rss:")?, field("Pss:")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vmlab-named-{}-{tag}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn names() {
        for ok in ["a", "A9", "web-1", "x.y_z", "0", &"n".repeat(64)] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "-a",
            ".a",
            "_a",
            "a/b",
            "a b",
            "..",
            "é",
            "a\n",
            &"n".repeat(65),
        ] {
            let e = validate_name(bad).unwrap_err();
            assert!(e.to_string().starts_with("invalid VM name"), "{bad}");
        }
    }

    #[test]
    fn state_root_precedence() {
        assert_eq!(state_root(Some(Path::new("/x"))), PathBuf::from("/x"));
        // The environment is the test process's: only check the fallback
        // shape without touching it.
        match std::env::var_os(STATE_DIR_ENV) {
            Some(v) if !v.is_empty() => assert_eq!(state_root(None), PathBuf::from(v)),
            _ => assert_eq!(state_root(None), PathBuf::from(DEFAULT_STATE_DIR)),
        }
    }

    fn record(name: &str) -> Record {
        Record {
            name: name.into(),
            pid: std::process::id(),
            created: now(),
            kernel: "k".into(),
            memory: 128 << 20,
            cpus: 1,
            command: vec![],
            cid: 3,
            vsock: "v".into(),
            console: "c".into(),
        }
    }

    #[test]
    fn one_name_one_owner_and_stale_state_is_cleaned_up() {
        let root = root("owner");
        let owner = Owner::create(&root, "vm1").unwrap();
        owner.write(&record("vm1")).unwrap();
        assert_eq!(owner.paths.read_pid(), Some(std::process::id()));
        assert_eq!(owner.paths.read_record().unwrap().name, "vm1");
        // A second owner is refused while the first holds the lock (flock
        // locks are per open file, so this holds within one process too).
        let e = Owner::create(&root, "vm1").unwrap_err();
        assert!(matches!(e, Error::InUse { .. }), "{e}");
        assert!(e.to_string().contains("in use"));
        assert!(matches!(probe(&root, "vm1").unwrap(), Probe::Running(_)));
        assert!(running(&root, "vm1").is_ok());
        assert_eq!(super::names(&root).unwrap(), vec!["vm1".to_string()]);
        // No temporary directory is left behind by the refused attempt.
        assert_eq!(fs::read_dir(&root).unwrap().count(), 1);

        // The owner "dies" without cleaning up: its lock goes, the
        // directory stays. The next look finds it stale and removes it.
        drop(owner);
        assert!(root.join("vm1").exists());
        let e = running(&root, "vm1").unwrap_err();
        assert!(matches!(e, Error::NotRunning { .. }), "{e}");
        assert!(!root.join("vm1").exists());
        assert!(matches!(
            running(&root, "vm1").unwrap_err(),
            Error::NoSuchVm(_)
        ));

        // A stale directory does not block a new VM of the same name.
        let first = Owner::create(&root, "vm2").unwrap();
        drop(first);
        let second = Owner::create(&root, "vm2").unwrap();
        assert!(matches!(probe(&root, "vm2").unwrap(), Probe::Running(_)));
        second.remove().unwrap();
        assert!(matches!(probe(&root, "vm2").unwrap(), Probe::Missing));

        // A directory without a lock file (interrupted removal) is debris.
        fs::create_dir_all(root.join("vm3")).unwrap();
        assert!(matches!(probe(&root, "vm3").unwrap(), Probe::Missing));
        assert!(!root.join("vm3").exists());

        assert!(matches!(
            Owner::create(&root, "../x").unwrap_err(),
            Error::InvalidName(_)
        ));
        fs::remove_dir_all(&root).unwrap();
    }

    /// Many racing creators: exactly one wins each round.
    #[test]
    fn racing_creators_one_winner() {
        let root = root("race");
        fs::create_dir_all(&root).unwrap();
        for _ in 0..5 {
            let barrier = std::sync::Arc::new(std::sync::Barrier::new(8));
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    let root = root.clone();
                    let barrier = barrier.clone();
                    std::thread::spawn(move || {
                        barrier.wait();
                        Owner::create(&root, "racy").ok()
                    })
                })
                .collect();
            let owners: Vec<Owner> = handles
                .into_iter()
                .filter_map(|h| h.join().unwrap())
                .collect();
            assert_eq!(owners.len(), 1, "{} owners", owners.len());
            for o in owners {
                o.remove().unwrap();
            }
        }
        // Nothing but the (removed) names was ever visible.
        assert_eq!(fs::read_dir(&root).unwrap().count(), 0);
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn memory_of_this_process() {
        let (rss, pss) = memory(std::process::id()).unwrap();
        assert!(rss > 0 && pss > 0 && pss <= rss);
        assert!(memory(u32::MAX).is_none());
    }
}
