//! The host's cgroup layout, read from `/proc/self/mountinfo`: which
//! runtime can work with it, and whether a memory limit can be applied.

use std::path::{Path, PathBuf};

/// How cgroups are mounted on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupMode {
    /// Only cgroup v1 hierarchies.
    Legacy,
    /// cgroup v1 controllers plus a cgroup2 mount beside them (typically
    /// `/sys/fs/cgroup/unified`): systemd's "hybrid" layout.
    Hybrid,
    /// A single cgroup2 hierarchy at `/sys/fs/cgroup`.
    Unified,
    /// No cgroup file system mounted.
    None,
}

/// The host's cgroup mounts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupHost {
    /// The layout.
    pub mode: CgroupMode,
    /// Controllers of the mounted v1 hierarchies (`memory`, `cpu`, ...).
    pub v1_controllers: Vec<String>,
    /// Where cgroup2 is mounted, if it is.
    pub v2_mount: Option<PathBuf>,
    /// The controllers the cgroup2 root offers (`cgroup.controllers`).
    pub v2_controllers: Vec<String>,
}

impl CgroupHost {
    /// Reads this host's layout.
    pub fn detect() -> CgroupHost {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        CgroupHost::from_mountinfo(&mountinfo, |mount| {
            std::fs::read_to_string(mount.join("cgroup.controllers")).ok()
        })
    }

    /// The layout described by `mountinfo`; `controllers` reads a cgroup2
    /// mount's `cgroup.controllers`.
    pub fn from_mountinfo(
        mountinfo: &str,
        controllers: impl Fn(&Path) -> Option<String>,
    ) -> CgroupHost {
        let mut v1_controllers: Vec<String> = Vec::new();
        let mut v2_mount = None;
        for line in mountinfo.lines() {
            // id parent dev root mountpoint options [optional...] - fstype source superoptions
            let Some((before, after)) = line.split_once(" - ") else {
                continue;
            };
            let mount_point = match before.split(' ').nth(4) {
                Some(m) => unescape_mountinfo(m),
                None => continue,
            };
            let mut after = after.split(' ');
            let fstype = after.next().unwrap_or("");
            let super_options = after.nth(1).unwrap_or("");
            match fstype {
                "cgroup" => {
                    for opt in super_options.split(',') {
                        // Named hierarchies (name=systemd) and mount flags
                        // are not controllers.
                        if matches!(
                            opt,
                            "rw" | "ro" | "relatime" | "noatime" | "nosuid" | "nodev" | "noexec"
                        ) || opt.contains('=')
                            || opt.is_empty()
                        {
                            continue;
                        }
                        if !v1_controllers.iter().any(|c| c == opt) {
                            v1_controllers.push(opt.to_string());
                        }
                    }
                }
                "cgroup2" if v2_mount.is_none() => v2_mount = Some(PathBuf::from(mount_point)),
                _ => {}
            }
        }
        let v2_controllers = v2_mount
            .as_deref()
            .and_then(controllers)
            .map(|s| s.split_whitespace().map(String::from).collect())
            .unwrap_or_default();
        let mode = match (&v2_mount, v1_controllers.is_empty()) {
            (Some(m), _) if m == Path::new("/sys/fs/cgroup") => CgroupMode::Unified,
            (Some(_), false) => CgroupMode::Hybrid,
            (Some(_), true) => CgroupMode::Unified,
            (None, false) => CgroupMode::Legacy,
            (None, true) => CgroupMode::None,
        };
        CgroupHost {
            mode,
            v1_controllers,
            v2_mount,
            v2_controllers,
        }
    }

    /// Whether a runtime can apply a memory limit: the v1 memory
    /// controller is mounted, or (unified layout) cgroup2 offers it.
    pub fn memory_usable(&self) -> bool {
        match self.mode {
            CgroupMode::Unified => self.v2_controllers.iter().any(|c| c == "memory"),
            CgroupMode::Legacy | CgroupMode::Hybrid => {
                self.v1_controllers.iter().any(|c| c == "memory")
            }
            CgroupMode::None => false,
        }
    }

    /// Whether the kernel has cgroup namespaces.
    pub fn has_cgroup_namespaces() -> bool {
        Path::new("/proc/self/ns/cgroup").exists()
    }

    /// One line for logs and error messages.
    pub fn describe(&self) -> String {
        let v2 = match &self.v2_mount {
            Some(m) => format!(
                "cgroup2 at {} (controllers: {})",
                m.display(),
                if self.v2_controllers.is_empty() {
                    "none".to_string()
                } else {
                    self.v2_controllers.join(" ")
                }
            ),
            None => "no cgroup2".to_string(),
        };
        let mode = match self.mode {
            CgroupMode::Legacy => "cgroup v1",
            CgroupMode::Hybrid => "hybrid",
            CgroupMode::Unified => "cgroup v2",
            CgroupMode::None => "no cgroups",
        };
        format!(
            "{mode}: v1 controllers [{}], {v2}",
            self.v1_controllers.join(" ")
        )
    }
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let value = b[i + 1..i + 4]
                .iter()
                .fold(0u32, |v, c| v * 8 + u32::from(c - b'0'));
            // \ooo above \377 is not a byte: keep it as written.
            match u8::try_from(value) {
                Ok(byte) => out.push(byte),
                Err(_) => out.extend_from_slice(&b[i..i + 4]),
            }
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This project's machines (hybrid, the memory controller in v1,
    /// hugetlb on the cgroup2 side).
    const HYBRID: &str = "\
25 30 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
31 25 0:26 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:27 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:28 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
34 31 0:29 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
35 31 0:30 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
36 31 0:31 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    const UNIFIED: &str = "\
31 25 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
";

    #[test]
    fn hybrid_layout() {
        let host = CgroupHost::from_mountinfo(HYBRID, |m| {
            assert_eq!(m, Path::new("/sys/fs/cgroup/unified"));
            Some("hugetlb\n".into())
        });
        assert_eq!(host.mode, CgroupMode::Hybrid);
        assert_eq!(host.v1_controllers, ["cpu", "memory", "cpuacct"]);
        assert_eq!(host.v2_controllers, ["hugetlb"]);
        assert!(host.memory_usable());
        assert!(host.describe().contains("hybrid"));
    }

    #[test]
    fn unified_layout() {
        let host =
            CgroupHost::from_mountinfo(UNIFIED, |_| Some("cpuset cpu io memory pids".into()));
        assert_eq!(host.mode, CgroupMode::Unified);
        assert!(host.memory_usable());
        let host = CgroupHost::from_mountinfo(UNIFIED, |_| Some("cpu pids".into()));
        assert!(!host.memory_usable());
    }

    #[test]
    fn legacy_and_none() {
        let legacy: String = HYBRID
            .lines()
            .filter(|l| !l.contains("cgroup2"))
            .map(|l| format!("{l}\n"))
            .collect();
        let host = CgroupHost::from_mountinfo(&legacy, |_| None);
        assert_eq!(host.mode, CgroupMode::Legacy);
        assert!(host.memory_usable());
        let host = CgroupHost::from_mountinfo("garbage\n", |_| None);
        assert_eq!(host.mode, CgroupMode::None);
        assert!(!host.memory_usable());
    }

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mountinfo("/a\\040b"), "/a b");
        assert_eq!(unescape_mountinfo("/a\\"), "/a\\");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
    }
}
