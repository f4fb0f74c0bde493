//! Host memory an environment costs: a memory cgroup made for each launch,
//! whose peak usage counts everything the launch charged to the host
//! (process memory, including a VMM's guest RAM, plus page cache and
//! kernel memory), the same way for the host's processes, the container
//! (runc makes the container's own cgroup inside ours) and the VMM.
//! Where no cgroup can be made, a sampler sums the resident memory of the
//! launch's process tree instead, and says so.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// A memory cgroup for one launch; removed when dropped.
#[derive(Debug)]
pub struct MemCgroup {
    dir: PathBuf,
    /// Open for the child to write itself into before it executes.
    procs: File,
    /// `memory.max_usage_in_bytes` (v1) or `memory.peak` (v2).
    peak_file: PathBuf,
    /// For the method text.
    pub kind: &'static str,
}

impl MemCgroup {
    /// Makes `name` below vmlab's own memory cgroup.
    pub fn create(name: &str) -> Result<MemCgroup, String> {
        let own = fs::read_to_string("/proc/self/cgroup")
            .map_err(|e| format!("/proc/self/cgroup: {e}"))?;
        let mountinfo = fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| format!("/proc/self/mountinfo: {e}"))?;
        let (base, kind, peak) = locate(&own, &mountinfo)
            .ok_or("no memory cgroup controller to measure with (neither a cgroup v1 memory hierarchy nor a cgroup2 one with the memory controller)")?;
        let dir = base.join(name);
        fs::create_dir(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let peak_file = dir.join(peak);
        // Both must exist: on cgroup2 the memory files only appear when
        // the parent delegates the controller.
        let procs = OpenOptions::new()
            .write(true)
            .open(dir.join("cgroup.procs"));
        let procs = match (procs, peak_file.exists()) {
            (Ok(f), true) => f,
            (Ok(_), false) => {
                let _ = fs::remove_dir(&dir);
                return Err(format!(
                    "{} has no {peak}: the memory controller is not enabled there",
                    dir.display()
                ));
            }
            (Err(e), _) => {
                let _ = fs::remove_dir(&dir);
                return Err(format!("{}/cgroup.procs: {e}", dir.display()));
            }
        };
        Ok(MemCgroup {
            dir,
            procs,
            peak_file,
            kind,
        })
    }

    /// The descriptor a child writes "0" to (itself) between fork and exec.
    pub fn procs_fd(&self) -> RawFd {
        self.procs.as_raw_fd()
    }

    /// Peak usage in bytes so far.
    pub fn peak(&self) -> Result<u64, String> {
        let text = fs::read_to_string(&self.peak_file)
            .map_err(|e| format!("{}: {e}", self.peak_file.display()))?;
        text.trim()
            .parse()
            .map_err(|_| format!("{}: not a number: {text:?}", self.peak_file.display()))
    }
}

impl Drop for MemCgroup {
    fn drop(&mut self) {
        // rmdir fails while a process is still in it (one that is exiting,
        // or a runc cgroup being torn down): retry for a moment.
        for _ in 0..50 {
            match fs::remove_dir(&self.dir) {
                Ok(()) => return,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
        log::warn!("could not remove the cgroup {}", self.dir.display());
    }
}

/// vmlab's memory cgroup directory, its kind, and its peak file, from
/// `/proc/self/cgroup` and `/proc/self/mountinfo`. A cgroup v1 memory
/// hierarchy wins (on a hybrid host that is where the controller is).
fn locate(own: &str, mountinfo: &str) -> Option<(PathBuf, &'static str, &'static str)> {
    let mut v1_path = None;
    let mut v2_path = None;
    for line in own.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        if controllers.split(',').any(|c| c == "memory") {
            v1_path = Some(path.to_string());
        } else if controllers.is_empty() {
            v2_path = Some(path.to_string());
        }
    }
    for line in mountinfo.lines() {
        let Some((before, after)) = line.split_once(" - ") else {
            continue;
        };
        let fields: Vec<&str> = before.split(' ').collect();
        let (Some(root), Some(mount_point)) = (fields.get(3), fields.get(4)) else {
            continue;
        };
        let mut after = after.split(' ');
        let fstype = after.next().unwrap_or("");
        let options = after.nth(1).unwrap_or("");
        let join = |path: &str| {
            // The mount may show only a subtree (root != "/"): the path in
            // /proc/self/cgroup is relative to the hierarchy's top.
            let rel = path.strip_prefix(root).unwrap_or(path);
            Path::new(mount_point).join(rel.trim_start_matches('/'))
        };
        match (fstype, &v1_path, &v2_path) {
            ("cgroup", Some(p), _) if options.split(',').any(|o| o == "memory") => {
                return Some((join(p), "cgroup v1", "memory.max_usage_in_bytes"));
            }
            ("cgroup2", _, Some(p)) if v1_path.is_none() => {
                return Some((join(p), "cgroup v2", "memory.peak"));
            }
            _ => {}
        }
    }
    None
}

/// The fallback: the peak, over samples every 50 ms, of the summed
/// high-water RSS of the processes in a tree that are alive at once.
pub struct RssSampler {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<u64>>,
}

impl RssSampler {
    /// Starts sampling the tree rooted at `pid`.
    pub fn start(pid: u32) -> RssSampler {
        Self::sample(move || tree_rss(pid))
    }

    /// Starts sampling the VmHWM of `pid` alone (no /proc scan: cheap).
    pub fn start_single(pid: u32) -> RssSampler {
        Self::sample(move || vm_hwm(pid).unwrap_or(0))
    }

    fn sample(f: impl Fn() -> u64 + Send + 'static) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut peak = 0;
            while !flag.load(Ordering::Relaxed) {
                peak = peak.max(f());
                std::thread::sleep(Duration::from_millis(50));
            }
            peak
        });
        RssSampler {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops and returns the peak in bytes.
    pub fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().and_then(|t| t.join().ok()).unwrap_or(0)
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// VmHWM (peak RSS) of `pid` in bytes, if it is alive.
pub fn vm_hwm(pid: u32) -> Option<u64> {
    status_kib(pid, "VmHWM:").map(|k| k * 1024)
}

fn status_kib(pid: u32, key: &str) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    line[key.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// Sum of VmHWM over `root` and its descendants alive now, in bytes.
fn tree_rss(root: u32) -> u64 {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(entries) = fs::read_dir("/proc") {
        for e in entries.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if let Some(ppid) = parent_of(pid) {
                children.entry(ppid).or_default().push(pid);
            }
        }
    }
    let mut total = 0;
    let mut todo = vec![root];
    while let Some(pid) = todo.pop() {
        total += status_kib(pid, "VmHWM:").unwrap_or(0) * 1024;
        if let Some(c) = children.get(&pid) {
            todo.extend(c);
        }
    }
    total
}

/// The parent pid, from `/proc/PID/stat` (after the command's closing
/// parenthesis, which may itself contain spaces and parentheses).
fn parent_of(pid: u32) -> Option<u32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID_CGROUP: &str = "9:name=systemd:/\n4:memory:/process_api/abc\n1:cpu:/\n0::/\n";
    const HYBRID_MOUNTS: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn finds_the_memory_hierarchy() {
        let (dir, kind, peak) = locate(HYBRID_CGROUP, HYBRID_MOUNTS).unwrap();
        assert_eq!(dir, Path::new("/sys/fs/cgroup/memory/process_api/abc"));
        assert_eq!((kind, peak), ("cgroup v1", "memory.max_usage_in_bytes"));
        let unified = "0::/user.slice/session-1.scope\n";
        let mounts = "30 23 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n";
        let (dir, kind, peak) = locate(unified, mounts).unwrap();
        assert_eq!(dir, Path::new("/sys/fs/cgroup/user.slice/session-1.scope"));
        assert_eq!((kind, peak), ("cgroup v2", "memory.peak"));
        // A mount of a subtree (as inside a container).
        let mounts = "35 31 0:32 /process_api /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n";
        let (dir, _, _) = locate(HYBRID_CGROUP, mounts).unwrap();
        assert_eq!(dir, Path::new("/sys/fs/cgroup/memory/abc"));
        assert!(locate("", "").is_none());
    }

    #[test]
    fn own_process_is_measured() {
        let me = std::process::id();
        assert!(vm_hwm(me).unwrap() > 0);
        assert!(tree_rss(me) >= vm_hwm(me).unwrap());
        assert_eq!(parent_of(me), Some(std::os::unix::process::parent_id()));
    }
}
