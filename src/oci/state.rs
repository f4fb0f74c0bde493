//! A container's state directory: `ROOT/ID/` with `state.json` (what
//! `create` recorded), `start.fifo` (the monitor blocks opening it until
//! `start` writes to it, as runc's `exec.fifo`), `plan.json` (the VM the
//! monitor starts) and `execs/` (the pid files of exec processes).
//!
//! A pid alone does not identify a process for long: the record keeps the
//! monitor's start time (`/proc/PID/stat` field 22) too, and a pid whose
//! start time differs is a stopped container, not a running stranger.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{Error, Result};

/// `--root` when the engine gives none (runc's is /run/runc).
pub const DEFAULT_ROOT: &str = "/run/vmlab-runtime";

/// Where the micro-VMs of containers keep their named-VM state
/// (`vmlab exec`'s, with the vsock and virtiofsd sockets in it). Short on
/// purpose: a Unix socket path has at most 107 bytes, and engines' roots
/// plus a 64-character ID do not fit.
pub const VM_ROOT: &str = "/run/vmlab-oci";

/// What `create` recorded.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Record {
    /// The container ID.
    pub id: String,
    /// The bundle directory (absolute).
    pub bundle: PathBuf,
    /// The monitor's pid (0 while it is being created).
    pub pid: u32,
    /// The monitor's start time in clock ticks since boot.
    pub start_time: u64,
    /// When `create` ran (RFC 3339).
    pub created: String,
    /// `start` has run.
    pub started: bool,
    /// `pause` has run and `resume` has not.
    pub paused: bool,
    /// The name of the container's VM under [`VM_ROOT`].
    pub vm: String,
    /// The bundle's annotations.
    pub annotations: HashMap<String, String>,
    /// The network namespace the engine gave by path (unwired at delete).
    pub netns: Option<PathBuf>,
}

/// What the OCI spec calls the container's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// `create` has not finished.
    Creating,
    /// Created, not started.
    Created,
    /// Started, the workload runs.
    Running,
    /// Paused.
    Paused,
    /// The workload ended (or the monitor died).
    Stopped,
}

impl Status {
    /// The spec's word for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Creating => "creating",
            Status::Created => "created",
            Status::Running => "running",
            Status::Paused => "paused",
            Status::Stopped => "stopped",
        }
    }
}

/// The paths of one container's state.
#[derive(Debug, Clone)]
pub struct Container {
    /// `ROOT/ID`.
    pub dir: PathBuf,
}

/// Checks a container ID: what runc accepts (`[\w+-\.]+`), at most 1024
/// bytes, and not `.` or `..`.
pub fn validate_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 1024
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'+' | b'-' | b'.'));
    match ok {
        true => Ok(()),
        false => Err(Error::msg(format!("invalid container ID '{id}'"))),
    }
}

/// The VM name for container `id` under `root`: 16 hex digits of a
/// SHA-256 of both, so engines' long IDs give short socket paths and two
/// roots with the same ID do not collide.
pub fn vm_name(root: &Path, id: &str) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(root.as_os_str().as_encoded_bytes());
    h.update([0]);
    h.update(id.as_bytes());
    let d = h.finalize();
    let mut s = String::from("c");
    for b in &d[..8] {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

impl Container {
    /// Container `id` under `root` (not checked for existence).
    pub fn new(root: &Path, id: &str) -> Result<Container> {
        validate_id(id)?;
        Ok(Container { dir: root.join(id) })
    }
    /// `state.json`.
    pub fn record_path(&self) -> PathBuf {
        self.dir.join("state.json")
    }
    /// `start.fifo`.
    pub fn fifo(&self) -> PathBuf {
        self.dir.join("start.fifo")
    }
    /// `plan.json`.
    pub fn plan(&self) -> PathBuf {
        self.dir.join("plan.json")
    }
    /// `monitor.err`: why the monitor ended before it started the VM.
    pub fn failure(&self) -> PathBuf {
        self.dir.join("monitor.err")
    }
    /// `execs/`: one pid file per exec process.
    pub fn execs(&self) -> PathBuf {
        self.dir.join("execs")
    }
    /// Whether the state directory exists.
    pub fn exists(&self) -> bool {
        self.dir.is_dir()
    }
    /// The record; a missing directory is "does not exist".
    pub fn load(&self, id: &str) -> Result<Record> {
        let path = self.record_path();
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::msg(format!("container {id} does not exist")))
            }
            Err(e) => return Err(Error::io(format!("read {}", path.display()))(e)),
        };
        serde_json::from_slice(&bytes)
            .map_err(|e| Error::msg(format!("{}: corrupt state: {e}", path.display())))
    }
    /// Writes the record atomically ([`write_atomic`]).
    pub fn save(&self, record: &Record) -> Result<()> {
        let json = serde_json::to_string_pretty(record)
            .map_err(|e| Error::msg(format!("encode state: {e}")))?;
        write_atomic(&self.record_path(), &json)
    }
    /// The pids of the exec processes still alive.
    pub fn exec_pids(&self) -> Vec<u32> {
        let Ok(dir) = fs::read_dir(self.execs()) else {
            return Vec::new();
        };
        dir.flatten()
            .filter_map(|e| {
                let text = fs::read_to_string(e.path()).ok()?;
                let (pid, start) = text.trim().split_once(' ')?;
                let (pid, start) = (pid.parse().ok()?, start.parse().ok()?);
                (start_time(pid) == Some(start)).then_some(pid)
            })
            .collect()
    }
}

/// Writes `text` to `path` atomically: `.NAME.tmp` beside it, renamed
/// into place, so a reader sees the old file or the new one.
pub fn write_atomic(path: &Path, text: &str) -> Result<()> {
    let name = path
        .file_name()
        .ok_or_else(|| Error::msg(format!("{}: not a file path", path.display())))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    fs::write(&tmp, text).map_err(Error::io(format!("write {}", tmp.display())))?;
    fs::rename(&tmp, path).map_err(Error::io(format!("write {}", path.display())))
}

/// The status of the container `record` describes, from its monitor.
pub fn status(record: &Record) -> Status {
    if record.pid == 0 {
        return Status::Creating;
    }
    if start_time(record.pid) != Some(record.start_time) || zombie(record.pid) {
        return Status::Stopped;
    }
    match (record.started, record.paused) {
        (false, _) => Status::Created,
        (true, true) => Status::Paused,
        (true, false) => Status::Running,
    }
}

/// `/proc/PID/stat` split after the command (which may hold spaces and
/// parentheses): field 3 onwards.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// The start time of process `pid` (clock ticks since boot), if it exists.
pub fn start_time(pid: u32) -> Option<u64> {
    // Field 22 is the 20th after the command.
    stat_fields(pid)?.get(19)?.parse().ok()
}

/// Whether `pid` has exited and waits to be reaped.
fn zombie(pid: u32) -> bool {
    stat_fields(pid).is_some_and(|f| f.first().is_some_and(|s| s == "Z" || s == "X"))
}

/// The state JSON of the OCI runtime spec (`state`, and the hooks' stdin).
pub fn state_json(record: &Record, status: Status) -> serde_json::Value {
    let mut v = serde_json::json!({
        "ociVersion": "1.0.2",
        "id": record.id,
        "status": status.as_str(),
        "bundle": record.bundle,
        "rootfs": record.bundle.join("rootfs"),
        "created": record.created,
        "annotations": record.annotations,
    });
    if status != Status::Stopped && record.pid != 0 {
        v["pid"] = serde_json::json!(record.pid);
    }
    v
}

/// Now, as RFC 3339 in UTC with nanoseconds (what runc writes).
pub fn rfc3339_now() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:09}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        now.subsec_nanos()
    )
}

/// Days since 1970-01-01 to (year, month, day), Howard Hinnant's
/// algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// The containers under `root`, sorted by ID.
pub fn list(root: &Path) -> Vec<(String, Container)> {
    let Ok(dir) = fs::read_dir(root) else {
        return Vec::new();
    };
    let mut out: Vec<(String, Container)> = dir
        .flatten()
        .filter(|e| e.path().join("state.json").is_file())
        .filter_map(|e| {
            let id = e.file_name().into_string().ok()?;
            Some((id, Container { dir: e.path() }))
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(validate_id("abc-1.2_3+x").is_ok());
        for bad in ["", ".", "..", "a/b", "a b", "a\0"] {
            assert!(validate_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn vm_names_are_short_and_distinct() {
        let a = vm_name(Path::new("/r1"), "x");
        let b = vm_name(Path::new("/r2"), "x");
        assert_eq!(a.len(), 17);
        assert_ne!(a, b);
        assert!(crate::named::validate_name(&a).is_ok());
    }

    #[test]
    fn dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_429), (2025, 12, 7));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert!(rfc3339_now().ends_with('Z'));
    }

    #[test]
    fn own_process_is_alive_and_not_a_zombie() {
        let pid = std::process::id();
        assert!(start_time(pid).is_some());
        assert!(!zombie(pid));
        assert_eq!(start_time(u32::MAX), None);
    }
}
