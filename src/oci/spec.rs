//! The bundle's `config.json` turned into the micro-VM that runs it: a
//! [`Plan`], which is the `vmlab run` command line the monitor becomes,
//! plus what the monitor itself does first (the network namespace).
//!
//! - `root.path` is the guest's root over virtio-fs, read-write (so the
//!   writes land in the engine's upper layer and `docker diff`, `docker cp`
//!   and `docker commit` see them), or read-only with `root.readonly`.
//! - bind mounts become `--volume`s (a directory or a single file, as
//!   Docker's /etc/resolv.conf, /etc/hostname and /etc/hosts); `tmpfs`
//!   mounts become `--tmpfs`; proc, sysfs, devpts, mqueue, /dev and
//!   /dev/shm are the guest init's own; anything else is skipped with a
//!   log line.
//! - `process`: args, env, cwd, uid:gid and the hostname go to the guest
//!   init; a terminal is the monitor's stdio (a pty, see
//!   [`super::process`]).
//! - `linux.resources`: the memory limit plus [`MEMORY_OVERHEAD`] is the
//!   VM's RAM (the guest kernel and init live in that overhead, so the
//!   workload keeps about its limit); the CPU quota, rounded up to whole
//!   vCPUs (or the size of the cpuset), is the VM's vCPU count, at most
//!   the host's.

use std::path::{Path, PathBuf};

use oci_spec::runtime::{LinuxNamespaceType, Spec};
use serde::{Deserialize, Serialize};

use super::{Error, Result};

/// The VM's RAM without a memory limit.
pub const DEFAULT_MEMORY: u64 = 512 << 20;
/// What the guest kernel and vmlab's init take, added to a memory limit.
pub const MEMORY_OVERHEAD: u64 = 64 << 20;
/// The smallest VM vmlab boots.
const MIN_MEMORY: u64 = 128 << 20;

/// Where the runtime finds vmlab's guest kernel and virtiofsd.
pub const CONFIG_FILE: &str = "/etc/vmlab/runtime.json";

/// The runtime's own configuration ([`CONFIG_FILE`], written by
/// scripts/install-runtime.sh); `VMLAB_KERNEL` and `VMLAB_VIRTIOFSD`
/// override it, and without either, the build's `target/guest/` next to
/// the binary is used.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RuntimeConfig {
    /// The guest kernel (vmlinux or bzImage).
    #[serde(default)]
    pub kernel: Option<PathBuf>,
    /// virtiofsd.
    #[serde(default)]
    pub virtiofsd: Option<PathBuf>,
}

impl RuntimeConfig {
    /// The configuration in effect for this call.
    pub fn load() -> Result<RuntimeConfig> {
        let mut config = match std::fs::read(CONFIG_FILE) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| Error::msg(format!("{CONFIG_FILE}: {e}")))?,
            Err(_) => RuntimeConfig::default(),
        };
        let guest = std::env::current_exe()
            .ok()
            .and_then(|exe| Some(exe.parent()?.parent()?.join("guest")));
        if let Some(k) = std::env::var_os("VMLAB_KERNEL").filter(|k| !k.is_empty()) {
            config.kernel = Some(PathBuf::from(k));
        }
        if let Some(v) = std::env::var_os("VMLAB_VIRTIOFSD").filter(|v| !v.is_empty()) {
            config.virtiofsd = Some(PathBuf::from(v));
        }
        if config.kernel.is_none() {
            config.kernel = guest.as_ref().map(|g| g.join("vmlinux"));
        }
        if config.virtiofsd.is_none() {
            config.virtiofsd = guest.map(|g| g.join("virtiofsd")).filter(|v| v.is_file());
        }
        match &config.kernel {
            Some(k) if k.is_file() => Ok(config),
            Some(k) => Err(Error::msg(format!(
                "vmlab's guest kernel {} does not exist (set \"kernel\" in {CONFIG_FILE} \
                 with scripts/install-runtime.sh, or VMLAB_KERNEL)",
                k.display()
            ))),
            None => Err(Error::msg(format!(
                "no guest kernel configured ({CONFIG_FILE} or VMLAB_KERNEL)"
            ))),
        }
    }
}

/// Which network namespace the VM's monitor runs in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum NetNs {
    /// The engine made it (Podman, CRI): enter it.
    Path(PathBuf),
    /// The spec asks for one without a path (Docker): make a new one; the
    /// engine's prestart hook then moves a veth into it.
    New,
    /// No network namespace in the spec: the host's (the VM then gets no
    /// network device).
    Host,
}

/// The VM for a bundle.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// The arguments of `vmlab run` (without `--net`, which the monitor
    /// adds once it has wired the network).
    pub run_args: Vec<String>,
    /// The network namespace.
    pub netns: NetNs,
    /// `process.terminal`.
    pub terminal: bool,
    /// The guest's host name.
    pub hostname: Option<String>,
    /// virtiofsd, for the monitor's environment.
    pub virtiofsd: Option<PathBuf>,
    /// What of the spec a VM does not do, for the log.
    pub skipped: Vec<String>,
}

/// Reads `BUNDLE/config.json`.
pub fn load(bundle: &Path) -> Result<Spec> {
    let path = bundle.join("config.json");
    if !path.is_file() {
        return Err(Error::msg(format!(
            "bundle {}: no config.json",
            bundle.display()
        )));
    }
    Spec::load(&path).map_err(|e| Error::msg(format!("{}: {e}", path.display())))
}

/// Mount destinations the guest init makes itself.
const GUEST_OWN: &[&str] = &[
    "/proc",
    "/dev",
    "/dev/pts",
    "/dev/shm",
    "/dev/mqueue",
    "/sys",
    "/sys/fs/cgroup",
];

/// The plan for `spec`, whose bundle is `bundle`, with the runtime's
/// `config`. `host_cpus`: the vCPU ceiling.
pub fn plan(spec: &Spec, bundle: &Path, config: &RuntimeConfig, host_cpus: u32) -> Result<Plan> {
    let root = spec
        .root()
        .as_ref()
        .ok_or_else(|| Error::msg("config.json has no root"))?;
    let rootfs = match root.path().is_absolute() {
        true => root.path().clone(),
        false => bundle.join(root.path()),
    };
    if !rootfs.is_dir() {
        return Err(Error::msg(format!(
            "root.path {}: not a directory",
            rootfs.display()
        )));
    }
    let process = spec
        .process()
        .as_ref()
        .ok_or_else(|| Error::msg("config.json has no process"))?;
    let args = process.args().clone().unwrap_or_default();
    if args.is_empty() || args[0].is_empty() {
        return Err(Error::msg("process.args is empty"));
    }
    check_entrypoint(&rootfs, process)?;
    let kernel = config
        .kernel
        .as_ref()
        .ok_or_else(|| Error::msg("no guest kernel configured"))?;
    let mut skipped = Vec::new();
    let mut a: Vec<String> = vec![
        "--kernel".into(),
        path_str(kernel)?,
        "--rootfs".into(),
        path_str(&rootfs)?,
        "--rootfs-mode".into(),
        match root.readonly() {
            Some(true) => "ro".into(),
            _ => "rw".into(),
        },
    ];
    let (memory, cpus) = resources(spec, host_cpus);
    a.push("-m".into());
    a.push(format!("{}M", memory >> 20));
    a.push("--cpus".into());
    a.push(cpus.to_string());
    for e in process.env().iter().flatten() {
        if e.contains('=') {
            a.push("--env".into());
            a.push(e.clone());
        }
    }
    let cwd = process.cwd();
    if !cwd.as_os_str().is_empty() {
        a.push("--workdir".into());
        a.push(path_str(cwd)?);
    }
    let user = process.user();
    a.push("--user".into());
    a.push(format!("{}:{}", user.uid(), user.gid()));
    let hostname = spec.hostname().clone().filter(|h| !h.is_empty());
    if let Some(h) = &hostname {
        a.push("--hostname".into());
        a.push(h.clone());
    }
    for m in spec.mounts().iter().flatten() {
        let dest = path_str(m.destination())?;
        let typ = m.typ().as_deref().unwrap_or("");
        let options = m.options().clone().unwrap_or_default();
        let bind = typ == "bind" || options.iter().any(|o| o == "bind" || o == "rbind");
        let ro = options.iter().any(|o| o == "ro");
        if bind {
            let Some(source) = m.source() else {
                skipped.push(format!("bind mount {dest} without a source"));
                continue;
            };
            let meta = std::fs::metadata(source);
            match meta {
                Ok(md) if md.is_dir() || md.is_file() => {
                    let mut v = format!("{}:{dest}", path_str(source)?);
                    if ro {
                        v.push_str(":ro");
                    }
                    a.push("--volume".into());
                    a.push(v);
                }
                Ok(_) => skipped.push(format!(
                    "bind mount of {} on {dest}: not a file or directory (devices and \
                     sockets do not cross into a VM)",
                    source.display()
                )),
                Err(e) => {
                    return Err(Error::msg(format!(
                        "bind mount source {}: {e}",
                        source.display()
                    )))
                }
            }
            continue;
        }
        if GUEST_OWN.contains(&dest.as_str()) {
            continue;
        }
        match typ {
            "tmpfs" => {
                let opts: Vec<&str> = options
                    .iter()
                    .map(String::as_str)
                    .filter(|o| o.starts_with("size=") || o.starts_with("mode="))
                    .collect();
                a.push("--tmpfs".into());
                a.push(match opts.is_empty() {
                    true => dest,
                    false => format!("{dest}:{}", opts.join(",")),
                });
            }
            "proc" | "sysfs" | "devpts" | "mqueue" | "cgroup" | "cgroup2" => skipped.push(format!(
                "{typ} on {dest}: the guest has its own at the usual place"
            )),
            other => skipped.push(format!("mount type '{other}' on {dest}")),
        }
    }
    let netns = match spec.linux().as_ref().and_then(|l| l.namespaces().as_ref()) {
        Some(nss) => match nss.iter().find(|n| n.typ() == LinuxNamespaceType::Network) {
            Some(n) => match n.path() {
                Some(p) if !p.as_os_str().is_empty() => NetNs::Path(p.clone()),
                _ => NetNs::New,
            },
            None => NetNs::Host,
        },
        None => NetNs::Host,
    };
    a.push("--".into());
    a.extend(args);
    Ok(Plan {
        run_args: a,
        netns,
        terminal: process.terminal().unwrap_or(false),
        hostname,
        virtiofsd: config.virtiofsd.clone(),
        skipped,
    })
}

/// The VM's RAM in bytes and vCPUs for the spec's `linux.resources`.
pub fn resources(spec: &Spec, host_cpus: u32) -> (u64, u32) {
    let res = spec.linux().as_ref().and_then(|l| l.resources().as_ref());
    let limit = res
        .and_then(|r| r.memory().as_ref())
        .and_then(|m| m.limit())
        .filter(|&l| l > 0)
        .map(|l| l as u64);
    let memory = match limit {
        // Whole MiB, at least the smallest VM.
        Some(l) => (l.saturating_add(MEMORY_OVERHEAD).div_ceil(1 << 20) << 20).max(MIN_MEMORY),
        None => DEFAULT_MEMORY,
    };
    let cpu = res.and_then(|r| r.cpu().as_ref());
    let from_quota = cpu.and_then(|c| {
        let quota = c.quota().filter(|&q| q > 0)? as u64;
        let period = c.period().filter(|&p| p > 0).unwrap_or(100_000);
        Some(quota.div_ceil(period))
    });
    let from_set = cpu.and_then(|c| c.cpus().as_deref()).and_then(cpuset_count);
    let cpus = from_quota.or(from_set).unwrap_or(1);
    let cpus = u32::try_from(cpus)
        .unwrap_or(u32::MAX)
        .clamp(1, host_cpus.max(1));
    (memory, cpus)
}

/// How many CPUs a cpuset list (`0-3,5`) names; `None` if malformed.
fn cpuset_count(list: &str) -> Option<u64> {
    let mut n = 0u64;
    for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        n += match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u64, u64) = (a.parse().ok()?, b.parse().ok()?);
                b.checked_sub(a)? + 1
            }
            None => {
                part.parse::<u64>().ok()?;
                1
            }
        };
    }
    (n > 0).then_some(n)
}

/// `PATH` when the process's environment has none (runc's default).
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The most symbolic links one lookup follows (Linux's MAXSYMLINKS).
const MAX_SYMLINKS: u32 = 40;

/// Checks at `create`, as runc does, that `process.args[0]` names an
/// executable file in the root file system: looked up in the process's
/// `PATH` when it has no `/`, relative to `cwd` otherwise; symbolic links
/// are followed inside `rootfs` (an absolute target, or `..` past the top,
/// stays in it). The messages are runc's, which engines turn into exit
/// status 127 (not found) and 126 (permission denied).
pub fn check_entrypoint(rootfs: &Path, process: &oci_spec::runtime::Process) -> Result<()> {
    let args = process.args().clone().unwrap_or_default();
    let Some(cmd) = args.first() else {
        return Ok(());
    };
    let candidates: Vec<PathBuf> = match cmd.contains('/') {
        true => vec![process.cwd().join(cmd)],
        false => {
            let path = process
                .env()
                .iter()
                .flatten()
                .find_map(|e| e.strip_prefix("PATH="))
                .unwrap_or(DEFAULT_PATH)
                .to_string();
            path.split(':')
                .filter(|d| !d.is_empty())
                .map(|d| Path::new(d).join(cmd))
                .collect()
        }
    };
    let mut denied = false;
    for c in &candidates {
        let Some(found) = resolve_in_root(rootfs, c) else {
            continue;
        };
        match std::fs::metadata(&found) {
            Ok(m)
                if m.is_file()
                    && std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o111 != 0 =>
            {
                return Ok(())
            }
            Ok(_) => denied = true,
            Err(_) => {}
        }
    }
    match (cmd.contains('/'), denied) {
        (_, true) => Err(Error::msg(format!("exec: \"{cmd}\": permission denied"))),
        (true, false) => Err(Error::msg(format!(
            "exec: \"{cmd}\": stat {cmd}: no such file or directory"
        ))),
        (false, false) => Err(Error::msg(format!(
            "exec: \"{cmd}\": executable file not found in $PATH"
        ))),
    }
}

/// For a read-only root (`root.readonly`, as the CRI gives a pod's
/// sandbox): makes the mount points of the bind and tmpfs mounts that the
/// root lacks, on the host, as runc does before it makes the root
/// read-only (the guest could not: its root share is read-only). A file
/// for a file source, else a directory; paths resolved inside the root.
pub fn prepare_readonly_root(spec: &Spec, bundle: &Path) -> Result<()> {
    let Some(root) = spec.root().as_ref() else {
        return Ok(());
    };
    if root.readonly() != Some(true) {
        return Ok(());
    }
    let rootfs = match root.path().is_absolute() {
        true => root.path().clone(),
        false => bundle.join(root.path()),
    };
    for m in spec.mounts().iter().flatten() {
        let dest = m.destination();
        let own = ["/proc", "/dev", "/sys"]
            .iter()
            .any(|p| dest.starts_with(p));
        let typ = m.typ().as_deref().unwrap_or("");
        let options = m.options().clone().unwrap_or_default();
        let bind = typ == "bind" || options.iter().any(|o| o == "bind" || o == "rbind");
        if own || !(bind || typ == "tmpfs") {
            continue;
        }
        let file = bind && m.source().as_ref().is_some_and(|s| s.is_file());
        ensure_in_root(&rootfs, dest, file).map_err(|e| {
            Error::msg(format!(
                "read-only root {}: mount point {}: {e}",
                rootfs.display(),
                dest.display()
            ))
        })?;
    }
    Ok(())
}

/// Creates `dest` (absolute in the container) under `rootfs` with its
/// missing parents, each resolved inside the root.
fn ensure_in_root(rootfs: &Path, dest: &Path, file: bool) -> std::io::Result<()> {
    use std::path::Component;
    let names: Vec<_> = dest
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            _ => None,
        })
        .collect();
    let mut cur = PathBuf::from("/");
    for (i, name) in names.iter().enumerate() {
        let parent = cur.clone();
        cur.push(name);
        if resolve_in_root(rootfs, &cur).is_some() {
            continue;
        }
        let host_parent = resolve_in_root(rootfs, &parent).ok_or(std::io::ErrorKind::NotFound)?;
        let host = host_parent.join(name);
        match i + 1 == names.len() && file {
            true => {
                std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&host)?;
            }
            false => std::fs::create_dir(&host)?,
        }
    }
    Ok(())
}

/// `path` (absolute in the container) resolved to a host path under
/// `rootfs`, following symbolic links as the container would see them;
/// `None` if a component is missing or there are too many links.
fn resolve_in_root(rootfs: &Path, path: &Path) -> Option<PathBuf> {
    use std::path::Component;
    let mut todo: Vec<std::ffi::OsString> = path
        .components()
        .rev()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some("..".into()),
            _ => None,
        })
        .collect();
    let mut done: Vec<std::ffi::OsString> = Vec::new();
    let mut links = 0;
    while let Some(name) = todo.pop() {
        if name == ".." {
            done.pop();
            continue;
        }
        let mut host = rootfs.to_path_buf();
        host.extend(&done);
        host.push(&name);
        let meta = std::fs::symlink_metadata(&host).ok()?;
        if !meta.file_type().is_symlink() {
            done.push(name);
            continue;
        }
        links += 1;
        if links > MAX_SYMLINKS {
            return None;
        }
        let target = std::fs::read_link(&host).ok()?;
        if target.is_absolute() {
            done.clear();
        }
        for c in target.components().rev() {
            match c {
                Component::Normal(n) => todo.push(n.to_os_string()),
                Component::ParentDir => todo.push("..".into()),
                _ => {}
            }
        }
    }
    let mut host = rootfs.to_path_buf();
    host.extend(&done);
    Some(host)
}

fn path_str(p: &Path) -> Result<String> {
    p.to_str()
        .map(str::to_string)
        .ok_or_else(|| Error::msg(format!("{}: not UTF-8", p.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_points_of_a_read_only_root_are_made_inside_it() {
        use std::os::unix::fs::symlink;
        let dir = tempfile::tempdir().unwrap();
        let (root, host) = (dir.path().join("rootfs"), dir.path().join("host"));
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::create_dir_all(&host).unwrap();
        std::fs::write(host.join("resolv.conf"), "nameserver 10.0.0.1\n").unwrap();
        // A link out of the root: the mount point goes inside the root.
        symlink("/", root.join("escape")).unwrap();
        let json = serde_json::json!({
            "ociVersion": "1.0.2",
            "root": {"path": "rootfs", "readonly": true},
            "mounts": [
                {"destination": "/etc/resolv.conf", "type": "bind",
                 "source": host.join("resolv.conf"), "options": ["rbind", "ro"]},
                {"destination": "/data/deep", "type": "bind", "source": host, "options": ["rbind"]},
                {"destination": "/escape/x", "type": "tmpfs", "source": "tmpfs"},
                {"destination": "/dev/shm", "type": "tmpfs", "source": "shm"}
            ]
        });
        let spec: Spec = serde_json::from_value(json).unwrap();
        prepare_readonly_root(&spec, dir.path()).unwrap();
        assert!(root.join("etc/resolv.conf").is_file());
        assert!(root.join("data/deep").is_dir());
        assert!(root.join("x").is_dir(), "/escape/x is /x inside the root");
        assert!(!root.join("dev").exists());
        // Idempotent.
        prepare_readonly_root(&spec, dir.path()).unwrap();
    }

    #[test]
    fn entrypoints_are_found_in_the_root_as_runc_does() {
        use std::os::unix::fs::{symlink, PermissionsExt};
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        std::fs::create_dir_all(r.join("bin")).unwrap();
        std::fs::create_dir_all(r.join("usr/bin")).unwrap();
        std::fs::create_dir_all(r.join("etc")).unwrap();
        std::fs::write(r.join("bin/busybox"), b"x").unwrap();
        std::fs::set_permissions(r.join("bin/busybox"), PermissionsExt::from_mode(0o755)).unwrap();
        std::fs::write(r.join("etc/passwd"), b"root").unwrap();
        // An absolute link, resolved inside the root, and a relative one
        // climbing past the top.
        symlink("/bin/busybox", r.join("bin/sh")).unwrap();
        symlink("../../../../bin/busybox", r.join("usr/bin/env")).unwrap();
        // A link that points at the host's /etc/passwd must not be
        // taken from the host.
        symlink("/etc/shadow", r.join("bin/evil")).unwrap();
        let process = |args: &[&str], env: &[&str]| -> oci_spec::runtime::Process {
            serde_json::from_value(serde_json::json!({
                "user": {"uid": 0, "gid": 0}, "args": args, "env": env, "cwd": "/etc"
            }))
            .unwrap()
        };
        let check = |args: &[&str], env: &[&str]| {
            check_entrypoint(r, &process(args, env)).map_err(|e| e.to_string())
        };
        assert!(check(&["sh"], &[]).is_ok());
        assert!(check(&["/bin/sh", "-c", "true"], &[]).is_ok());
        assert!(check(&["env"], &["PATH=/usr/bin"]).is_ok());
        assert!(check(&["../bin/busybox"], &[]).is_ok());
        let e = check(&["nope"], &[]).unwrap_err();
        assert!(e.contains("executable file not found"), "{e}");
        let e = check(&["/no/such"], &[]).unwrap_err();
        assert!(
            e.contains("\"/no/such\"") && e.contains("no such file or directory"),
            "{e}"
        );
        let e = check(&["/etc/passwd"], &[]).unwrap_err();
        assert!(e.contains("permission denied"), "{e}");
        let e = check(&["/etc"], &[]).unwrap_err();
        assert!(e.contains("permission denied"), "{e}");
        assert!(check(&["/bin/evil"], &[]).is_err());
        assert!(check(&["sh"], &["PATH=/nowhere"]).is_err());
    }

    fn spec(json: &str) -> Spec {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn a_docker_like_bundle() {
        let dir = std::env::temp_dir().join(format!("vmlab-spec-test-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("rootfs/bin")).unwrap();
        std::fs::write(dir.join("rootfs/bin/sh"), "").unwrap();
        std::fs::set_permissions(
            dir.join("rootfs/bin/sh"),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        std::fs::write(dir.join("resolv.conf"), "nameserver 10.0.0.1\n").unwrap();
        let json = format!(
            r#"{{
            "ociVersion": "1.0.2",
            "root": {{"path": "rootfs"}},
            "hostname": "abc",
            "process": {{"args": ["sh", "-c", "exit 3"], "env": ["A=1", "bad"],
                         "cwd": "/w", "user": {{"uid": 1000, "gid": 1000}}}},
            "mounts": [
              {{"destination": "/proc", "type": "proc", "source": "proc"}},
              {{"destination": "/etc/resolv.conf", "type": "bind",
                "source": "{d}/resolv.conf", "options": ["rbind", "rprivate"]}},
              {{"destination": "/data", "type": "bind", "source": "{d}", "options": ["rbind", "ro"]}},
              {{"destination": "/run", "type": "tmpfs", "source": "tmpfs",
                "options": ["nosuid", "size=65536k", "mode=755"]}}
            ],
            "linux": {{"namespaces": [{{"type": "network"}}, {{"type": "mount"}}],
                       "resources": {{"memory": {{"limit": 268435456}},
                                      "cpu": {{"quota": 150000, "period": 100000}}}}}}
            }}"#,
            d = dir.display()
        );
        let config = RuntimeConfig {
            kernel: Some("/k".into()),
            virtiofsd: None,
        };
        let p = plan(&spec(&json), &dir, &config, 2).unwrap();
        let a = p.run_args.join(" ");
        let root = dir.join("rootfs");
        assert!(
            a.starts_with(&format!(
                "--kernel /k --rootfs {} --rootfs-mode rw -m 320M --cpus 2",
                root.display()
            )),
            "{a}"
        );
        assert!(
            a.contains("--env A=1 --workdir /w --user 1000:1000 --hostname abc"),
            "{a}"
        );
        assert!(!a.contains("bad"), "{a}");
        assert!(
            a.contains(&format!(
                "--volume {d}/resolv.conf:/etc/resolv.conf ",
                d = dir.display()
            )),
            "{a}"
        );
        assert!(
            a.contains(&format!("--volume {}:/data:ro", dir.display())),
            "{a}"
        );
        assert!(a.contains("--tmpfs /run:size=65536k,mode=755"), "{a}");
        assert!(a.ends_with("-- sh -c exit 3"), "{a}");
        assert_eq!(p.netns, NetNs::New);
        assert!(!p.terminal);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_bundles_are_clear_errors() {
        let config = RuntimeConfig {
            kernel: Some("/k".into()),
            virtiofsd: None,
        };
        let e = plan(&spec(r#"{"ociVersion":"1"}"#), Path::new("/"), &config, 1).unwrap_err();
        assert!(e.to_string().contains("no root"), "{e}");
        let e = plan(
            &spec(r#"{"root": {"path": "/no/such/dir"}}"#),
            Path::new("/"),
            &config,
            1,
        )
        .unwrap_err();
        assert!(e.to_string().contains("not a directory"), "{e}");
        let e = load(Path::new("/no/such/bundle")).unwrap_err();
        assert!(e.to_string().contains("no config.json"), "{e}");
    }

    #[test]
    fn resources_and_cpusets() {
        let s = spec(r#"{"linux": {"resources": {"cpu": {"cpus": "0-2,5"}}}}"#);
        assert_eq!(resources(&s, 8), (DEFAULT_MEMORY, 4));
        assert_eq!(resources(&s, 2), (DEFAULT_MEMORY, 2));
        let s = spec(r#"{"linux": {"resources": {"memory": {"limit": 1000}}}}"#);
        assert_eq!(resources(&s, 2), (MIN_MEMORY, 1));
        assert_eq!(cpuset_count("3-1"), None);
        assert_eq!(cpuset_count("x"), None);
        assert_eq!(cpuset_count("7"), Some(1));
    }
}
