//! The OCI runtime bundle's `config.json`: what `docker run` would ask of
//! runc for an image and a command. Building it is pure (no runtime, no
//! mounts), so it is unit-tested without root.
//!
//! The defaults follow Docker's (capabilities, masked and read-only paths,
//! device rules) rather than `runc spec`'s, because "the same image as a
//! container" is meant to behave as it would under `docker run`.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use oci_spec::runtime::{
    Capability, LinuxBuilder, LinuxCapabilitiesBuilder, LinuxDeviceCgroupBuilder,
    LinuxMemoryBuilder, LinuxNamespaceBuilder, LinuxNamespaceType, LinuxResourcesBuilder, Mount,
    MountBuilder, ProcessBuilder, RootBuilder, Spec, UserBuilder,
};

use super::{Error, Network};
use crate::image::ImageConfig;

/// `PATH` for images that set none (Docker's default).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The OCI runtime-spec version written to `config.json`. 1.0.2 is what
/// Debian's runc 1.1 implements; newer runtimes accept it too.
pub const OCI_VERSION: &str = "1.0.2";

/// Docker's default capability set for a container process.
const DEFAULT_CAPABILITIES: [Capability; 14] = [
    Capability::Chown,
    Capability::DacOverride,
    Capability::Fsetid,
    Capability::Fowner,
    Capability::Mknod,
    Capability::NetRaw,
    Capability::Setgid,
    Capability::Setuid,
    Capability::Setfcap,
    Capability::Setpcap,
    Capability::NetBindService,
    Capability::SysChroot,
    Capability::Kill,
    Capability::AuditWrite,
];

/// Paths hidden from the container (Docker's list: host information and
/// knobs a container has no business reading).
const MASKED_PATHS: [&str; 11] = [
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

/// Paths the container may read but not write.
const READONLY_PATHS: [&str; 5] = [
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// What a bundle's configuration is made of.
#[derive(Debug, Clone)]
pub struct SpecInput<'a> {
    /// The image's process configuration.
    pub image: &'a ImageConfig,
    /// The command given after `--` (replaces the image's Cmd when not empty).
    pub command: &'a [String],
    /// The image's root filesystem, where user and group names are looked
    /// up (`/etc/passwd`, `/etc/group`).
    pub image_rootfs: &'a Path,
    /// `root.path` as written in `config.json` (relative to the bundle).
    pub root_path: &'a Path,
    /// The container's host name (also `HOSTNAME` in its environment).
    pub hostname: &'a str,
    /// Whether the process gets a terminal (stdin and stdout are ttys).
    pub terminal: bool,
    /// Memory limit in bytes, if the host's memory controller can apply it.
    pub memory_limit: Option<u64>,
    /// Network namespace or the host's network.
    pub network: Network,
    /// An existing network namespace to join (its path, e.g.
    /// `/run/netns/NAME`); takes precedence over `network`.
    pub netns: Option<&'a Path>,
    /// Whether to give the container its own cgroup namespace (the host
    /// kernel has them).
    pub cgroup_namespace: bool,
}

/// Builds the runtime configuration for `input`.
pub fn build_spec(input: &SpecInput) -> Result<Spec, Error> {
    let args = input.image.process_args(input.command);
    if args.is_empty() {
        return Err(Error::NoCommand);
    }
    let cwd = input.image.working_dir();
    if !cwd.starts_with('/') {
        return Err(Error::WorkingDir(cwd.to_string()));
    }
    let user = resolve_user(input.image.user.as_deref(), input.image_rootfs)?;

    let caps: HashSet<Capability> = DEFAULT_CAPABILITIES.into_iter().collect();
    // As in Docker: a non-root process keeps the bounding set (so setuid
    // programs in the image still work) but starts with no effective or
    // permitted capabilities, as it would outside a container.
    let (effective, permitted) = if user.uid == 0 {
        (caps.clone(), caps.clone())
    } else {
        (HashSet::new(), HashSet::new())
    };
    let mut capabilities = LinuxCapabilitiesBuilder::default()
        .bounding(caps)
        .effective(effective)
        .permitted(permitted)
        .build()?;
    // The builder's defaults would also fill the inheritable and ambient
    // sets, handing capabilities to every program the process executes,
    // even as non-root; Docker leaves both empty.
    capabilities.set_inheritable(None);
    capabilities.set_ambient(None);

    let mut oci_user = UserBuilder::default().uid(user.uid).gid(user.gid);
    if !user.additional_gids.is_empty() {
        oci_user = oci_user.additional_gids(user.additional_gids.clone());
    }
    let mut process = ProcessBuilder::default()
        .terminal(input.terminal)
        .user(oci_user.build()?)
        .args(args)
        .env(process_env(
            &input.image.env,
            input.hostname,
            input.terminal,
        ))
        .cwd(cwd)
        .capabilities(capabilities)
        // Docker leaves no_new_privileges off so that su/sudo/ping in an
        // image work as they do on a machine.
        .no_new_privileges(false)
        .build()?;
    // The builder's default caps open files at 1024; Docker does not, the
    // process inherits the host's limits.
    process.set_rlimits(None);

    let mut namespaces = vec![
        LinuxNamespaceType::Pid,
        LinuxNamespaceType::Ipc,
        LinuxNamespaceType::Uts,
        LinuxNamespaceType::Mount,
    ];
    if input.network == Network::None || input.netns.is_some() {
        // A fresh network namespace (the runtime brings up its loopback
        // and nothing else), or the one given, joined by path.
        namespaces.push(LinuxNamespaceType::Network);
    }
    if input.cgroup_namespace {
        namespaces.push(LinuxNamespaceType::Cgroup);
    }
    let namespaces = namespaces
        .into_iter()
        .map(|typ| {
            let ns = LinuxNamespaceBuilder::default().typ(typ);
            match input.netns {
                Some(path) if typ == LinuxNamespaceType::Network => ns.path(path).build(),
                _ => ns.build(),
            }
        })
        .collect::<Result<Vec<_>, _>>()?;

    // Deny every device, as Docker does; the runtime then allows its
    // standard set (null, zero, full, random, urandom, tty, ptmx...).
    let mut resources =
        LinuxResourcesBuilder::default().devices(vec![LinuxDeviceCgroupBuilder::default()
            .allow(false)
            .access("rwm")
            .build()?]);
    if let Some(limit) = input.memory_limit {
        let limit = i64::try_from(limit).map_err(|_| Error::MemoryLimit(limit))?;
        resources = resources.memory(LinuxMemoryBuilder::default().limit(limit).build()?);
    }
    let linux = LinuxBuilder::default()
        .resources(resources.build()?)
        .namespaces(namespaces)
        .masked_paths(MASKED_PATHS.map(String::from).to_vec())
        .readonly_paths(READONLY_PATHS.map(String::from).to_vec())
        .build()?;

    let mut spec = Spec::default();
    spec.set_version(OCI_VERSION.to_string());
    spec.set_process(Some(process));
    spec.set_root(Some(
        RootBuilder::default()
            .path(input.root_path)
            // Writable: the bundle's root is a copy-on-write overlay over
            // the cached image, so writes never reach the cache.
            .readonly(false)
            .build()?,
    ));
    spec.set_hostname(Some(input.hostname.to_string()));
    spec.set_mounts(Some(default_mounts()?));
    spec.set_linux(Some(linux));
    spec.set_annotations(None);
    Ok(spec)
}

/// The file systems every container gets: Docker's set.
fn default_mounts() -> Result<Vec<Mount>, Error> {
    let table: [(&str, &str, &str, &[&str]); 7] = [
        ("/proc", "proc", "proc", &["nosuid", "noexec", "nodev"]),
        (
            "/dev",
            "tmpfs",
            "tmpfs",
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        ),
        (
            "/dev/pts",
            "devpts",
            "devpts",
            &[
                "nosuid",
                "noexec",
                "newinstance",
                "ptmxmode=0666",
                "mode=0620",
                "gid=5",
            ],
        ),
        (
            "/sys",
            "sysfs",
            "sysfs",
            &["nosuid", "noexec", "nodev", "ro"],
        ),
        (
            "/sys/fs/cgroup",
            "cgroup",
            "cgroup",
            &["nosuid", "noexec", "nodev", "relatime", "ro"],
        ),
        (
            "/dev/mqueue",
            "mqueue",
            "mqueue",
            &["nosuid", "noexec", "nodev"],
        ),
        (
            "/dev/shm",
            "tmpfs",
            "shm",
            &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        ),
    ];
    table
        .iter()
        .map(|(destination, typ, source, options)| {
            Ok(MountBuilder::default()
                .destination(destination)
                .typ(*typ)
                .source(source)
                .options(options.iter().map(|o| o.to_string()).collect::<Vec<_>>())
                .build()?)
        })
        .collect()
}

/// The process environment: `HOSTNAME`, `TERM` with a terminal, the
/// image's `Env` (which may override both), and Docker's default `PATH`
/// when the image sets none. Malformed image entries (no `NAME=`) are
/// dropped with a warning: runtimes reject them.
pub fn process_env(image_env: &[String], hostname: &str, terminal: bool) -> Vec<String> {
    let mut env = Vec::new();
    set_env(&mut env, format!("HOSTNAME={hostname}"));
    if terminal {
        set_env(&mut env, "TERM=xterm".to_string());
    }
    for entry in image_env {
        match entry.split_once('=') {
            Some((name, _)) if !name.is_empty() => set_env(&mut env, entry.clone()),
            _ => log::warn!("ignoring the image's environment entry '{entry}' (not NAME=value)"),
        }
    }
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.insert(0, format!("PATH={DEFAULT_PATH}"));
    }
    env
}

/// Sets `NAME=value` in `env`, replacing an earlier value of NAME in place.
fn set_env(env: &mut Vec<String>, entry: String) {
    let name = |e: &str| e.split_once('=').map_or(e.len(), |(n, _)| n.len());
    let key = entry[..name(&entry)].to_string();
    match env.iter_mut().find(|e| e[..name(e)] == key) {
        Some(existing) => *existing = entry,
        None => env.push(entry),
    }
}

/// The numeric identity a process runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedUser {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Supplementary groups (from `/etc/group` memberships).
    pub additional_gids: Vec<u32>,
}

/// Resolves an image's `User` (`user`, `uid`, `user:group`, `uid:gid`, or
/// mixed) against the image's own `/etc/passwd` and `/etc/group`, as
/// Docker does: a name must exist there; a numeric uid need not (its gid is
/// then 0); without an explicit group the user's primary group and the
/// groups listing it as a member apply. `None` or empty means root.
pub fn resolve_user(user: Option<&str>, image_rootfs: &Path) -> Result<ResolvedUser, Error> {
    let spec = user.map(str::trim).unwrap_or("");
    if spec.is_empty() {
        return Ok(ResolvedUser {
            uid: 0,
            gid: 0,
            additional_gids: Vec::new(),
        });
    }
    let passwd = read_image_file(image_rootfs, "/etc/passwd")?;
    let group = read_image_file(image_rootfs, "/etc/group")?;
    resolve_user_in(spec, passwd.as_deref(), group.as_deref())
}

/// [`resolve_user`] on the contents of `/etc/passwd` and `/etc/group`
/// (`None`: the image has no such file).
pub fn resolve_user_in(
    spec: &str,
    passwd: Option<&str>,
    group: Option<&str>,
) -> Result<ResolvedUser, Error> {
    let err = |reason: String| Error::User {
        user: spec.to_string(),
        reason,
    };
    let (user_part, group_part) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    if user_part.is_empty() {
        return Err(err("no user before ':'".into()));
    }
    if group_part == Some("") {
        return Err(err("no group after ':'".into()));
    }

    let passwd_entries = passwd.map(parse_passwd).unwrap_or_default();
    let (uid, mut gid, user_name) = match user_part.parse::<u32>() {
        Ok(uid) => match passwd_entries.iter().find(|e| e.id == uid) {
            Some(e) => (uid, e.gid, Some(e.name.as_str())),
            None => (uid, 0, None),
        },
        Err(_) if is_numeric(user_part) => return Err(err("uid out of range".into())),
        Err(_) => {
            if passwd.is_none() {
                return Err(err(format!(
                    "the image has no /etc/passwd to look up user '{user_part}' in"
                )));
            }
            match passwd_entries.iter().find(|e| e.name == user_part) {
                Some(e) => (e.id, e.gid, Some(e.name.as_str())),
                None => {
                    return Err(err(format!(
                        "no user '{user_part}' in the image's /etc/passwd"
                    )))
                }
            }
        }
    };

    let group_entries = group.map(parse_group).unwrap_or_default();
    let mut additional_gids = Vec::new();
    match group_part {
        Some(g) => {
            gid = match g.parse::<u32>() {
                Ok(gid) => gid,
                Err(_) if is_numeric(g) => return Err(err("gid out of range".into())),
                Err(_) => {
                    if group.is_none() {
                        return Err(err(format!(
                            "the image has no /etc/group to look up group '{g}' in"
                        )));
                    }
                    match group_entries.iter().find(|e| e.name == g) {
                        Some(e) => e.id,
                        None => {
                            return Err(err(format!("no group '{g}' in the image's /etc/group")))
                        }
                    }
                }
            }
        }
        None => {
            if let Some(name) = user_name {
                for e in &group_entries {
                    if e.members.iter().any(|m| m == name)
                        && e.id != gid
                        && !additional_gids.contains(&e.id)
                    {
                        additional_gids.push(e.id);
                    }
                }
            }
        }
    }
    Ok(ResolvedUser {
        uid,
        gid,
        additional_gids,
    })
}

fn is_numeric(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// One line of `/etc/passwd` or `/etc/group`.
#[derive(Debug)]
struct DbEntry {
    name: String,
    id: u32,
    /// Primary gid (`/etc/passwd` only).
    gid: u32,
    /// Member names (`/etc/group` only).
    members: Vec<String>,
}

/// `name:password:uid:gid:...`; comments and malformed lines are skipped.
fn parse_passwd(text: &str) -> Vec<DbEntry> {
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() < 4 || f[0].is_empty() {
                return None;
            }
            Some(DbEntry {
                name: f[0].to_string(),
                id: f[2].trim().parse().ok()?,
                gid: f[3].trim().parse().ok()?,
                members: Vec::new(),
            })
        })
        .collect()
}

/// `name:password:gid:member,member`; comments and malformed lines are
/// skipped.
fn parse_group(text: &str) -> Vec<DbEntry> {
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() < 3 || f[0].is_empty() {
                return None;
            }
            let id = f[2].trim().parse().ok()?;
            let members = f
                .get(3)
                .map(|m| {
                    m.split(',')
                        .map(str::trim)
                        .filter(|m| !m.is_empty())
                        .map(String::from)
                        .collect()
                })
                .unwrap_or_default();
            Some(DbEntry {
                name: f[0].to_string(),
                id,
                gid: 0,
                members,
            })
        })
        .collect()
}

/// Reads `path` (absolute, as seen inside the image) from the image's root
/// filesystem, resolving symbolic links inside that root, never out of it
/// (an image's `/etc/passwd -> /usr/lib/passwd`, or a hostile `../../..`,
/// must not read the host's files). `None` when it does not exist. It
/// must be a regular file of at most 4 MiB ([`crate::untrusted`]).
fn read_image_file(root: &Path, path: &str) -> Result<Option<String>, Error> {
    let resolved = resolve_in_root(root, path).map_err(|source| Error::Io {
        what: "cannot resolve in the image",
        path: PathBuf::from(path),
        source,
    })?;
    match crate::untrusted::read_regular_file(&resolved, crate::untrusted::IMAGE_FILE_LIMIT) {
        Ok(bytes) => Ok(bytes.map(|b| String::from_utf8_lossy(&b).into_owned())),
        Err(crate::untrusted::ReadError::Io(source)) => Err(Error::Io {
            what: "cannot read the image's",
            path: resolved,
            source,
        }),
        Err(why) => Err(Error::ImageFile {
            path: path.to_string(),
            reason: why.to_string(),
        }),
    }
}

/// The host path of `path` inside `root`, following symbolic links as if
/// `root` were `/` (absolute targets restart at `root`, `..` stops there).
pub fn resolve_in_root(root: &Path, path: &str) -> std::io::Result<PathBuf> {
    // Components still to walk, last first.
    let mut pending: Vec<String> = path.split('/').rev().map(String::from).collect();
    let mut resolved = PathBuf::new();
    let mut links = 0;
    while let Some(part) = pending.pop() {
        match part.as_str() {
            "" | "." => continue,
            ".." => {
                resolved.pop();
                continue;
            }
            _ => {}
        }
        let candidate = resolved.join(&part);
        let host = root.join(&candidate);
        match std::fs::symlink_metadata(&host) {
            Ok(m) if m.file_type().is_symlink() => {
                links += 1;
                if links > 40 {
                    return Err(std::io::Error::from_raw_os_error(libc::ELOOP));
                }
                let target = std::fs::read_link(&host)?;
                let target = target.to_string_lossy();
                if target.starts_with('/') {
                    resolved = PathBuf::new();
                }
                pending.extend(target.split('/').rev().map(String::from));
            }
            // A missing component ends the walk as a plain path: the
            // caller's open reports "not found".
            _ => resolved = candidate,
        }
    }
    Ok(root.join(resolved))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
        # a comment\n\
        app:x:1000:1000::/home/app:/bin/sh\n\
        web:x:33:33:www:/var/www:/usr/sbin/nologin\n\
        broken line\n";
    const GROUP: &str = "root:x:0:\n\
        app:x:1000:\n\
        staff:x:50:app,web\n\
        audio:x:29:app\n\
        www:x:33:\n";

    fn user(spec: &str) -> Result<ResolvedUser, Error> {
        resolve_user_in(spec, Some(PASSWD), Some(GROUP))
    }

    fn ids(uid: u32, gid: u32, extra: &[u32]) -> ResolvedUser {
        ResolvedUser {
            uid,
            gid,
            additional_gids: extra.to_vec(),
        }
    }

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn users_by_name_and_number() {
        assert_eq!(user("app").unwrap(), ids(1000, 1000, &[50, 29]));
        assert_eq!(user("1000").unwrap(), ids(1000, 1000, &[50, 29]));
        assert_eq!(user("root").unwrap(), ids(0, 0, &[]));
        // A uid absent from /etc/passwd is fine, with gid 0 (Docker).
        assert_eq!(user("4242").unwrap(), ids(4242, 0, &[]));
        // An explicit group replaces the primary and supplementary ones.
        assert_eq!(user("app:staff").unwrap(), ids(1000, 50, &[]));
        assert_eq!(user("app:7").unwrap(), ids(1000, 7, &[]));
        assert_eq!(user("4242:4343").unwrap(), ids(4242, 4343, &[]));
        assert_eq!(user("web:www").unwrap(), ids(33, 33, &[]));
        assert_eq!(
            resolve_user(None, Path::new("/nonexistent")).unwrap(),
            ids(0, 0, &[])
        );
        assert_eq!(
            resolve_user(Some(""), Path::new("/nonexistent")).unwrap(),
            ids(0, 0, &[])
        );
    }

    #[test]
    fn unknown_users_are_clear_errors() {
        let msg = |spec: &str| user(spec).unwrap_err().to_string();
        assert!(msg("nobody").contains("no user 'nobody' in the image's /etc/passwd"));
        assert!(msg("app:wheel").contains("no group 'wheel'"));
        assert!(msg(":50").contains("no user"));
        assert!(msg("app:").contains("no group"));
        assert!(msg("99999999999").contains("out of range"));
        assert!(msg("app:99999999999").contains("out of range"));
        let e = resolve_user_in("app", None, None).unwrap_err().to_string();
        assert!(
            e.contains("image user 'app'") && e.contains("no /etc/passwd"),
            "{e}"
        );
        // Numeric ids need no database.
        assert_eq!(resolve_user_in("5:6", None, None).unwrap(), ids(5, 6, &[]));
        assert!(resolve_user_in("5:grp", None, None).is_err());
    }

    #[test]
    fn environment() {
        let env = process_env(&s(&["A=1", "HOSTNAME=img"]), "box", false);
        assert_eq!(
            env,
            s(&[&format!("PATH={DEFAULT_PATH}"), "HOSTNAME=img", "A=1"])
        );
        let env = process_env(&s(&["PATH=/opt/bin", "PATHX=2", "bad", "=x"]), "box", true);
        assert_eq!(
            env,
            s(&["HOSTNAME=box", "TERM=xterm", "PATH=/opt/bin", "PATHX=2"])
        );
        // Later image entries win, in place.
        let env = process_env(&s(&["A=1", "B=2", "A=3"]), "h", false);
        assert_eq!(env[1..], s(&["HOSTNAME=h", "A=3", "B=2"]));
    }

    fn rootfs_with_passwd() -> tempdir::TempDir {
        let dir = tempdir::TempDir::new("bundle");
        std::fs::create_dir_all(dir.path().join("etc")).unwrap();
        std::fs::write(dir.path().join("etc/passwd"), PASSWD).unwrap();
        std::fs::write(dir.path().join("etc/group"), GROUP).unwrap();
        dir
    }

    fn input<'a>(image: &'a ImageConfig, command: &'a [String], root: &'a Path) -> SpecInput<'a> {
        SpecInput {
            image,
            command,
            image_rootfs: root,
            root_path: Path::new("rootfs"),
            hostname: "vmlab-1",
            terminal: false,
            memory_limit: None,
            network: Network::None,
            netns: None,
            cgroup_namespace: true,
        }
    }

    #[test]
    fn config_json_shape() {
        let root = rootfs_with_passwd();
        let image = ImageConfig {
            entrypoint: s(&["/bin/busybox"]),
            cmd: s(&["sh"]),
            env: s(&["VMLAB_SAMPLE=1"]),
            working_dir: Some("/work".into()),
            user: Some("app".into()),
        };
        let cmd = s(&["uname", "-r"]);
        let mut inp = input(&image, &cmd, root.path());
        inp.memory_limit = Some(64 << 20);
        let spec = build_spec(&inp).unwrap();
        let json: serde_json::Value = serde_json::to_value(&spec).unwrap();

        assert_eq!(json["ociVersion"], OCI_VERSION);
        assert_eq!(json["hostname"], "vmlab-1");
        assert_eq!(json["root"]["path"], "rootfs");
        assert_eq!(json["root"]["readonly"], false);
        let p = &json["process"];
        assert_eq!(
            p["args"],
            serde_json::json!(["/bin/busybox", "uname", "-r"])
        );
        assert_eq!(p["cwd"], "/work");
        assert_eq!(p["terminal"], false);
        assert_eq!(p["user"]["uid"], 1000);
        assert_eq!(p["user"]["gid"], 1000);
        assert_eq!(p["user"]["additionalGids"], serde_json::json!([50, 29]));
        assert_eq!(p["noNewPrivileges"], false);
        assert!(p.get("rlimits").is_none());
        let env: Vec<&str> = p["env"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert!(env.contains(&"VMLAB_SAMPLE=1") && env.contains(&"HOSTNAME=vmlab-1"));
        assert!(env.iter().any(|e| e.starts_with("PATH=")));
        assert!(!env.iter().any(|e| e.starts_with("TERM=")));
        // Non-root: bounding set only.
        let caps = &p["capabilities"];
        assert_eq!(caps["bounding"].as_array().unwrap().len(), 14);
        assert!(caps["bounding"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!("CAP_NET_BIND_SERVICE")));
        assert_eq!(caps["effective"].as_array().unwrap().len(), 0);
        assert!(caps.get("inheritable").is_none() && caps.get("ambient").is_none());

        let linux = &json["linux"];
        let ns: Vec<&str> = linux["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["type"].as_str().unwrap())
            .collect();
        assert_eq!(ns, ["pid", "ipc", "uts", "mount", "network", "cgroup"]);
        assert_eq!(linux["resources"]["memory"]["limit"], 64 << 20);
        assert_eq!(linux["resources"]["devices"][0]["allow"], false);
        assert!(linux["maskedPaths"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!("/proc/kcore")));
        assert!(linux["readonlyPaths"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!("/proc/sys")));
        let mounts: Vec<&str> = json["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["destination"].as_str().unwrap())
            .collect();
        for m in [
            "/proc",
            "/dev",
            "/dev/pts",
            "/dev/shm",
            "/dev/mqueue",
            "/sys",
        ] {
            assert!(mounts.contains(&m), "{m} in {mounts:?}");
        }
        let sys = json["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["destination"] == "/sys")
            .unwrap();
        assert!(sys["options"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!("ro")));
    }

    #[test]
    fn root_terminal_host_network_no_limit() {
        let root = rootfs_with_passwd();
        let image = ImageConfig {
            cmd: s(&["sh"]),
            ..Default::default()
        };
        let mut inp = input(&image, &[], root.path());
        inp.terminal = true;
        inp.network = Network::Host;
        inp.cgroup_namespace = false;
        let json = serde_json::to_value(build_spec(&inp).unwrap()).unwrap();
        let p = &json["process"];
        assert_eq!(p["args"], serde_json::json!(["sh"]));
        assert_eq!(p["cwd"], "/");
        assert_eq!(p["terminal"], true);
        assert_eq!(p["user"]["uid"], 0);
        assert!(p["user"].get("additionalGids").is_none());
        assert_eq!(p["capabilities"]["effective"].as_array().unwrap().len(), 14);
        assert!(p["env"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!("TERM=xterm")));
        let ns = json["linux"]["namespaces"].as_array().unwrap();
        assert!(!ns
            .iter()
            .any(|n| n["type"] == "network" || n["type"] == "cgroup"));
        assert!(json["linux"]["resources"].get("memory").is_none());
    }

    #[test]
    fn joins_an_existing_network_namespace() {
        let root = rootfs_with_passwd();
        let image = ImageConfig {
            cmd: s(&["sh"]),
            ..Default::default()
        };
        let mut inp = input(&image, &[], root.path());
        inp.netns = Some(Path::new("/run/netns/test"));
        let json = serde_json::to_value(build_spec(&inp).unwrap()).unwrap();
        let ns = json["linux"]["namespaces"].as_array().unwrap();
        let net: Vec<_> = ns.iter().filter(|n| n["type"] == "network").collect();
        assert_eq!(net.len(), 1, "{ns:?}");
        assert_eq!(net[0]["path"], "/run/netns/test");
        // Only the network namespace is joined; the others stay fresh.
        assert!(ns
            .iter()
            .filter(|n| n["type"] != "network")
            .all(|n| n.get("path").is_none()));
    }

    #[test]
    fn bad_images_are_refused() {
        let root = rootfs_with_passwd();
        let empty = ImageConfig::default();
        assert!(matches!(
            build_spec(&input(&empty, &[], root.path())),
            Err(Error::NoCommand)
        ));
        let relative = ImageConfig {
            cmd: s(&["sh"]),
            working_dir: Some("work".into()),
            ..Default::default()
        };
        assert!(matches!(
            build_spec(&input(&relative, &[], root.path())),
            Err(Error::WorkingDir(_))
        ));
        let ghost = ImageConfig {
            cmd: s(&["sh"]),
            user: Some("ghost".into()),
            ..Default::default()
        };
        let e = build_spec(&input(&ghost, &[], root.path())).unwrap_err();
        assert!(e.to_string().contains("no user 'ghost'"), "{e}");
    }

    #[test]
    fn image_files_resolve_inside_the_root() {
        let root = tempdir::TempDir::new("resolve");
        let r = root.path();
        std::fs::create_dir_all(r.join("etc")).unwrap();
        std::fs::create_dir_all(r.join("usr/lib")).unwrap();
        std::fs::write(r.join("usr/lib/passwd"), "app:x:7:8::/:/bin/sh\n").unwrap();
        // Absolute link: must land in the image, not the host's /usr/lib.
        std::os::unix::fs::symlink("/usr/lib/passwd", r.join("etc/passwd")).unwrap();
        // Escaping link: clamped at the image's root.
        std::os::unix::fs::symlink("../../../../../etc/hostname", r.join("etc/group")).unwrap();
        assert_eq!(
            resolve_in_root(r, "/etc/passwd").unwrap(),
            r.join("usr/lib/passwd")
        );
        assert_eq!(
            resolve_in_root(r, "/etc/group").unwrap(),
            r.join("etc/hostname")
        );
        assert_eq!(
            resolve_user(Some("app"), r).unwrap(),
            ResolvedUser {
                uid: 7,
                gid: 8,
                additional_gids: vec![]
            }
        );
        std::os::unix::fs::symlink("loop", r.join("loop")).unwrap();
        assert!(resolve_in_root(r, "/loop").is_err());
    }

    /// Runs `f` on another thread and fails the test if it has not
    /// returned within 10 s (a FIFO read blocks forever).
    fn within_10s<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(std::time::Duration::from_secs(10))
            .expect("the user lookup did not return within 10 s (hung on the file)")
    }

    fn mkfifo(path: &Path) {
        let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
        // SAFETY: a valid C string.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    }

    #[test]
    fn image_passwd_must_be_a_small_regular_file() {
        let root = tempdir::TempDir::new("passwd-kinds");
        let r = root.path().to_path_buf();
        std::fs::create_dir_all(r.join("etc")).unwrap();
        let lookup = |r: &Path| {
            let r = r.to_path_buf();
            within_10s(move || resolve_user(Some("app"), &r).map_err(|e| e.to_string()))
        };

        // A FIFO nobody writes to: refused at once, not a hang.
        mkfifo(&r.join("etc/passwd"));
        let e = lookup(&r).unwrap_err();
        assert!(
            e.contains("/etc/passwd") && e.contains("not a regular file"),
            "{e}"
        );
        std::fs::remove_file(r.join("etc/passwd")).unwrap();

        // A huge (sparse) file: refused without reading it.
        let f = std::fs::File::create(r.join("etc/passwd")).unwrap();
        f.set_len(1 << 40).unwrap();
        drop(f);
        let e = lookup(&r).unwrap_err();
        assert!(
            e.contains("/etc/passwd") && e.contains("larger than"),
            "{e}"
        );
        std::fs::remove_file(r.join("etc/passwd")).unwrap();

        // A directory.
        std::fs::create_dir(r.join("etc/passwd")).unwrap();
        let e = lookup(&r).unwrap_err();
        assert!(e.contains("not a regular file"), "{e}");
        std::fs::remove_dir(r.join("etc/passwd")).unwrap();

        // A character device (/dev/zero's numbers): needs root to make.
        let dev = std::ffi::CString::new(r.join("etc/passwd").to_str().unwrap()).unwrap();
        // SAFETY: a valid C string.
        let made = unsafe { libc::mknod(dev.as_ptr(), libc::S_IFCHR | 0o644, libc::makedev(1, 5)) };
        if made == 0 {
            let e = lookup(&r).unwrap_err();
            assert!(e.contains("not a regular file"), "{e}");
            std::fs::remove_file(r.join("etc/passwd")).unwrap();
        } else {
            eprintln!("skipped the character-device case: mknod needs root");
        }

        // /etc/group is read the same way.
        std::fs::write(r.join("etc/passwd"), PASSWD).unwrap();
        mkfifo(&r.join("etc/group"));
        let e = lookup(&r).unwrap_err();
        assert!(
            e.contains("/etc/group") && e.contains("not a regular file"),
            "{e}"
        );
        std::fs::remove_file(r.join("etc/group")).unwrap();

        // A symlink to a FIFO is resolved (inside the root) and refused too.
        std::os::unix::fs::symlink("/run/fifo", r.join("etc/group")).unwrap();
        std::fs::create_dir_all(r.join("run")).unwrap();
        mkfifo(&r.join("run/fifo"));
        let e = lookup(&r).unwrap_err();
        assert!(e.contains("not a regular file"), "{e}");

        // And a normal pair still works.
        std::fs::remove_file(r.join("etc/group")).unwrap();
        std::fs::write(r.join("etc/group"), GROUP).unwrap();
        assert_eq!(lookup(&r).unwrap(), ids(1000, 1000, &[50, 29]));
    }

    /// A scratch directory removed on drop (no tempfile crate needed).
    mod tempdir {
        use std::path::{Path, PathBuf};
        use std::sync::atomic::{AtomicU32, Ordering};

        pub struct TempDir(PathBuf);

        impl TempDir {
            pub fn new(tag: &str) -> TempDir {
                static N: AtomicU32 = AtomicU32::new(0);
                let path = std::env::temp_dir().join(format!(
                    "vmlab-unit-{tag}-{}-{}",
                    std::process::id(),
                    N.fetch_add(1, Ordering::Relaxed)
                ));
                let _ = std::fs::remove_dir_all(&path);
                std::fs::create_dir_all(&path).unwrap();
                TempDir(path)
            }
            pub fn path(&self) -> &Path {
                &self.0
            }
        }

        impl Drop for TempDir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }
}
