//! Host directories in the guest (`vmlab run --volume HOST:GUEST[:ro]`):
//! one virtiofsd per share, started, watched and stopped by vmlab.
//!
//! - [`parse_volume`] and [`validate`]: the command line. The host path
//!   must be an existing directory or regular file, the guest path
//!   absolute, and no two volumes may share a guest path.
//! - A host file is not shared by itself (virtio-fs shares directories):
//!   it is hard-linked (or, across file systems, copied) into a private
//!   directory of the run, `files` (or `files-ro` for the `:ro` ones),
//!   which one virtiofsd shares; the guest init mounts that share under
//!   /dev/.vmlab (the devtmpfs, outside the root file system) and
//!   bind-mounts each file onto its guest path.
//! - [`locate_virtiofsd`]: `$VMLAB_VIRTIOFSD`, then `virtiofsd` on `PATH`,
//!   then `/usr/libexec/virtiofsd` (the distributions' Rust virtiofsd;
//!   not QEMU's old C one). scripts/build-virtiofsd.sh installs it.
//! - [`Shares`]: the run's daemons. Each listens on a socket in the run's
//!   directory (a named VM's state directory, else
//!   `<state root>/.run/<vmlab pid>`), runs with `--sandbox chroot` (one
//!   process: `--sandbox namespace` forks a child that would outlive a
//!   killed vmlab), `--cache auto`, `--xattr`, no thread pool (requests
//!   complete in order, which the device relies on if the daemon dies),
//!   and gets SIGKILL from the kernel if vmlab dies (PR_SET_PDEATHSIG).
//!   Dropping [`Shares`] stops the daemons and removes the directory;
//!   [`clean_stale`] removes what a killed vmlab left (the next run calls
//!   it).

use std::fs;
use std::io;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Component, Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::cmdline::{GuestBind, GuestVolume};
use crate::devices::virtio::fs::FsConfig;

/// How long a starting virtiofsd may take to create its socket.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// One `--volume`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeArg {
    /// The host directory or regular file.
    pub host: PathBuf,
    /// Where the guest mounts it (absolute).
    pub guest: String,
    /// `:ro`: the daemon refuses writes, and the guest mounts it read-only.
    pub readonly: bool,
}

/// Parses `HOST:GUEST_PATH[:ro|:rw]` (HOST a directory or a file).
pub fn parse_volume(s: &str) -> Result<VolumeArg, String> {
    let parts: Vec<&str> = s.split(':').collect();
    let (host, guest, readonly) = match parts.as_slice() {
        [host, guest] => (*host, *guest, false),
        [host, guest, "ro"] => (*host, *guest, true),
        [host, guest, "rw"] => (*host, *guest, false),
        [_, _, mode] => return Err(format!("--volume {s}: unknown mode '{mode}' (ro or rw)")),
        _ => return Err(format!("--volume {s}: expected HOST:GUEST_PATH[:ro]")),
    };
    if host.is_empty() {
        return Err(format!("--volume {s}: the host path is empty"));
    }
    if !guest.starts_with('/') {
        return Err(format!(
            "--volume {s}: the guest path '{guest}' is not absolute"
        ));
    }
    if Path::new(guest)
        .components()
        .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
    {
        return Err(format!(
            "--volume {s}: the guest path '{guest}' has '.' or '..' in it"
        ));
    }
    if normalize(guest) == "/" {
        return Err(format!(
            "--volume {s}: a volume cannot be mounted on the guest's /"
        ));
    }
    Ok(VolumeArg {
        host: PathBuf::from(host),
        guest: normalize(guest),
        readonly,
    })
}

/// `/a//b/` as `/a/b`.
fn normalize(path: &str) -> String {
    let mut out = String::new();
    for part in path.split('/').filter(|p| !p.is_empty()) {
        out.push('/');
        out.push_str(part);
    }
    if out.is_empty() {
        out.push('/');
    }
    out
}

/// Checks the volumes against the host: every host path an existing
/// directory or regular file, every guest path used once.
pub fn validate(volumes: &[VolumeArg]) -> Result<(), String> {
    for (i, v) in volumes.iter().enumerate() {
        match fs::metadata(&v.host) {
            Ok(m) if m.is_dir() || m.is_file() => {}
            Ok(_) => {
                return Err(format!(
                    "--volume {}: not a directory or a regular file",
                    v.host.display()
                ))
            }
            Err(e) => return Err(format!("--volume {}: {e}", v.host.display())),
        }
        if let Some(other) = volumes[..i].iter().find(|o| o.guest == v.guest) {
            return Err(format!(
                "--volume: {} and {} are both mounted on {}",
                other.host.display(),
                v.host.display(),
                v.guest
            ));
        }
    }
    Ok(())
}

/// Finds virtiofsd.
pub fn locate_virtiofsd() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("VMLAB_VIRTIOFSD") {
        let path = PathBuf::from(path);
        if is_executable(&path) {
            return Ok(path);
        }
        return Err(format!(
            "VMLAB_VIRTIOFSD={}: not an executable file",
            path.display()
        ));
    }
    let on_path = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("virtiofsd"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    on_path
        .into_iter()
        .chain(
            // Where Debian's and Fedora's virtiofsd packages (the Rust
            // virtiofsd) put it. Not /usr/lib/qemu/virtiofsd: that is
            // QEMU's old C daemon, whose options differ.
            std::iter::once(PathBuf::from("/usr/libexec/virtiofsd")),
        )
        .find(|p| is_executable(p))
        .ok_or_else(|| {
            "--volume needs virtiofsd, which is not installed (scripts/build-virtiofsd.sh \
             installs it; or set VMLAB_VIRTIOFSD)"
                .to_string()
        })
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// One running virtiofsd.
struct Daemon {
    child: Child,
    host: PathBuf,
    tag: String,
    socket: PathBuf,
    /// How it ended, once it did.
    ended: Option<ExitStatus>,
}

/// The run's virtio-fs shares and their daemons.
pub struct Shares {
    dir: PathBuf,
    daemons: Vec<Daemon>,
    guest: Vec<GuestVolume>,
    /// The file volumes' bind mounts.
    binds: Vec<GuestBind>,
    /// The private directories of the file volumes (removed at the end).
    file_dirs: Vec<PathBuf>,
    /// Whether `dir` is the run's own (removed at the end), not a named
    /// VM's state directory.
    own_dir: bool,
}

/// The tag of an image's root share.
pub const ROOT_TAG: &str = "vmlabroot";

/// The tag of the share of the read-write file volumes.
pub const FILES_TAG: &str = "vmlabf";
/// The tag of the share of the `:ro` file volumes.
pub const FILES_RO_TAG: &str = "vmlabfro";
/// Where the guest init mounts the file volumes' shares (`DIR/TAG`): in
/// the guest's devtmpfs, which is not part of the root file system (and
/// moves along when the init switches root).
pub const GUEST_FILES_DIR: &str = "/dev/.vmlab";

/// The share that is the guest's root file system.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RootShare<'a> {
    /// The host directory.
    pub dir: &'a Path,
    /// The daemon refuses writes (`--readonly`).
    pub readonly: bool,
}

/// The pid file in a run directory: the vmlab that owns it.
const OWNER_FILE: &str = "vmlab.pid";

impl Shares {
    /// Starts one virtiofsd per volume, its socket in `dir` (created;
    /// `own_dir`: removed again at the end). Returns once every socket
    /// exists.
    pub fn start(volumes: &[VolumeArg], dir: &Path, own_dir: bool) -> Result<Shares, String> {
        Shares::start_with_root(None, volumes, dir, own_dir)
    }

    /// [`start`](Self::start), plus (first) a share of `root` tagged
    /// [`ROOT_TAG`]: the guest's root file system (an image's, read-only,
    /// or a `--rootfs` directory), which the guest init switches root to.
    pub fn start_with_root(
        root: Option<RootShare<'_>>,
        volumes: &[VolumeArg],
        dir: &Path,
        own_dir: bool,
    ) -> Result<Shares, String> {
        let mut shares = Shares {
            dir: dir.to_path_buf(),
            daemons: Vec::new(),
            guest: Vec::new(),
            binds: Vec::new(),
            file_dirs: Vec::new(),
            own_dir,
        };
        if volumes.is_empty() && root.is_none() {
            return Ok(shares);
        }
        let bin = locate_virtiofsd()?;
        fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        if own_dir {
            fs::write(dir.join(OWNER_FILE), std::process::id().to_string())
                .map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        if let Some(root) = root {
            let v = VolumeArg {
                host: root.dir.to_path_buf(),
                guest: "/".into(),
                readonly: root.readonly,
            };
            let socket = dir.join("root.sock");
            let _ = fs::remove_file(&socket);
            let child = spawn(&bin, &v, &socket)?;
            shares.daemons.push(Daemon {
                child,
                host: v.host,
                tag: ROOT_TAG.into(),
                socket,
                ended: None,
            });
        }
        let is_file = |v: &VolumeArg| fs::metadata(&v.host).is_ok_and(|m| m.is_file());
        for readonly in [false, true] {
            let files: Vec<(usize, &VolumeArg)> = volumes
                .iter()
                .enumerate()
                .filter(|(_, v)| is_file(v) && v.readonly == readonly)
                .collect();
            if !files.is_empty() {
                shares.start_files(&bin, &files, readonly)?;
            }
        }
        for (i, v) in volumes.iter().enumerate() {
            if is_file(v) {
                continue;
            }
            let tag = format!("vmlab{i}");
            let socket = dir.join(format!("fs{i}.sock"));
            let _ = fs::remove_file(&socket);
            let child = spawn(&bin, v, &socket)?;
            shares.daemons.push(Daemon {
                child,
                host: v.host.clone(),
                tag: tag.clone(),
                socket: socket.clone(),
                ended: None,
            });
            shares.guest.push(GuestVolume {
                tag,
                path: v.guest.clone(),
                readonly: v.readonly,
            });
        }
        for d in &mut shares.daemons {
            d.wait_for_socket()?;
        }
        Ok(shares)
    }

    /// The devices to attach, in order.
    pub fn devices(&self) -> Vec<FsConfig> {
        self.daemons
            .iter()
            .map(|d| FsConfig {
                tag: d.tag.clone(),
                socket: d.socket.clone(),
            })
            .collect()
    }

    /// What the guest init mounts: the file volumes' shares first (under
    /// [`GUEST_FILES_DIR`]), then the directories, in order.
    pub fn guest_volumes(&self) -> &[GuestVolume] {
        &self.guest
    }

    /// The file volumes' bind mounts, for the guest init to make after
    /// [`guest_volumes`](Self::guest_volumes).
    pub fn guest_binds(&self) -> &[GuestBind] {
        &self.binds
    }

    /// Shares the host files of `files` (index in the volume list, volume)
    /// through one daemon: each hard-linked (else copied) into a fresh
    /// private directory as `<index>`.
    fn start_files(
        &mut self,
        bin: &Path,
        files: &[(usize, &VolumeArg)],
        readonly: bool,
    ) -> Result<(), String> {
        let (tag, sub) = if readonly {
            (FILES_RO_TAG, self.dir.join("files-ro"))
        } else {
            (FILES_TAG, self.dir.join("files"))
        };
        // A killed run's links, in a named VM's state directory.
        let _ = fs::remove_dir_all(&sub);
        fs::create_dir_all(&sub).map_err(|e| format!("{}: {e}", sub.display()))?;
        self.file_dirs.push(sub.clone());
        let mount = format!("{GUEST_FILES_DIR}/{tag}");
        for (i, v) in files {
            link_or_copy(&v.host, &sub.join(i.to_string()), readonly)?;
            self.binds.push(GuestBind {
                source: format!("{mount}/{i}"),
                path: v.guest.clone(),
                readonly,
            });
        }
        let share = VolumeArg {
            host: sub.clone(),
            guest: mount.clone(),
            readonly,
        };
        let socket = self.dir.join(format!("{tag}.sock"));
        let _ = fs::remove_file(&socket);
        let child = spawn(bin, &share, &socket)?;
        self.daemons.push(Daemon {
            child,
            host: sub,
            tag: tag.into(),
            socket,
            ended: None,
        });
        self.guest.push(GuestVolume {
            tag: tag.into(),
            path: mount,
            readonly,
        });
        Ok(())
    }

    /// One line per daemon that failed (a non-zero status or a signal).
    pub fn failures(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        for d in &mut self.daemons {
            if d.ended.is_none() {
                if let Ok(Some(status)) = d.child.try_wait() {
                    d.ended = Some(status);
                }
            }
            // A daemon exits 0 once vmlab's side of its socket closes at
            // the end of the run; anything else is a failure.
            if let Some(status) = d.ended.filter(|s| !s.success()) {
                out.push(format!(
                    "virtiofsd for {} (tag {}) ended during the run ({}); the guest's I/O on it \
                     failed with EIO from then on",
                    d.host.display(),
                    d.tag,
                    describe(status)
                ));
            }
        }
        out
    }

    /// Stops every daemon and removes its socket (and the run's
    /// directory). Also done on drop.
    pub fn stop(&mut self) {
        for d in &mut self.daemons {
            d.stop();
        }
        for d in self.file_dirs.drain(..) {
            let _ = fs::remove_dir_all(d);
        }
        if self.own_dir && !self.daemons.is_empty() {
            let _ = fs::remove_dir_all(&self.dir);
        }
        self.daemons.clear();
    }
}

impl Drop for Shares {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Daemon {
    fn wait_for_socket(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if self.socket.exists() {
                return Ok(());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                self.ended = Some(status);
                return Err(format!(
                    "virtiofsd for {} exited before it listened ({}); see its messages above",
                    self.host.display(),
                    describe(status)
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "virtiofsd for {} did not create {} within {} s",
                    self.host.display(),
                    self.socket.display(),
                    START_TIMEOUT.as_secs()
                ));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn stop(&mut self) {
        if self.ended.is_none() {
            // SIGTERM first: virtiofsd exits at once either way, and it
            // has nothing to flush (every guest write went to the host
            // file system as it came).
            // SAFETY: kill(2) on our own child's pid, not reaped yet.
            unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(2);
            loop {
                match self.child.try_wait() {
                    Ok(Some(status)) => {
                        self.ended = Some(status);
                        break;
                    }
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(5))
                    }
                    _ => {
                        let _ = self.child.kill();
                        self.ended = self.child.wait().ok();
                        break;
                    }
                }
            }
        }
        let _ = fs::remove_file(&self.socket);
    }
}

/// Puts the host file `host` (its target, if a symbolic link) at `dest`:
/// a hard link, so that the guest's writes reach it; else (another file
/// system, or not allowed) a copy with its owner and mode, and a message
/// saying what that means.
fn link_or_copy(host: &Path, dest: &Path, readonly: bool) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let real = fs::canonicalize(host).map_err(|e| format!("--volume {}: {e}", host.display()))?;
    let link_err = match fs::hard_link(&real, dest) {
        Ok(()) => return Ok(()),
        Err(e) => e,
    };
    fs::copy(&real, dest).map_err(|e| {
        format!(
            "--volume {}: cannot hard-link it into {} ({link_err}) nor copy it there ({e})",
            host.display(),
            dest.display()
        )
    })?;
    if let Ok(m) = fs::metadata(&real) {
        let _ = std::os::unix::fs::chown(dest, Some(m.uid()), Some(m.gid()));
    }
    if readonly {
        log::info!(
            "--volume {}: cannot hard-link it into {} ({link_err}): the guest gets a copy, \
             and later changes on the host do not reach it",
            host.display(),
            dest.display()
        );
    } else {
        log::warn!(
            "--volume {}: cannot hard-link it into {} ({link_err}): the guest gets a copy, \
             and its writes do not reach the host file",
            host.display(),
            dest.display()
        );
    }
    Ok(())
}

fn spawn(bin: &Path, v: &VolumeArg, socket: &Path) -> Result<Child, String> {
    let mut cmd = Command::new(bin);
    cmd.arg("--socket-path")
        .arg(socket)
        .arg("--shared-dir")
        .arg(&v.host)
        .args(["--sandbox", "chroot", "--cache", "auto", "--xattr"])
        .args(["--thread-pool-size", "0", "--inode-file-handles=never"])
        // Warnings about limits root cannot raise here (CAP_SYS_RESOURCE)
        // are noise; errors are shown.
        .args(["--log-level", "error"])
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    if v.readonly {
        cmd.arg("--readonly");
    }
    // SAFETY: the closure runs in the child between fork and exec and
    // calls only prctl, setpgid and getppid, all async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            // If vmlab dies, even by SIGKILL, the kernel kills the daemon.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            // Its own process group: a Ctrl-C or a signal to vmlab's
            // group must not stop the daemon before vmlab has stopped
            // the guest (vmlab stops it last).
            if libc::setpgid(0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            // vmlab died between fork and prctl.
            if libc::getppid() == 1 {
                return Err(io::Error::other("vmlab exited"));
            }
            Ok(())
        });
    }
    cmd.spawn()
        .map_err(|e| format!("cannot start {}: {e}", bin.display()))
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => status.to_string(),
    }
}

/// Removes run directories under `root` whose vmlab is gone (killed
/// before it could clean up): their sockets, and any daemon still
/// running there.
pub fn clean_stale(root: &Path) {
    let Ok(entries) = fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        let Ok(pid) = fs::read_to_string(dir.join(OWNER_FILE)) else {
            continue;
        };
        let Ok(pid) = pid.trim().parse::<i32>() else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        log::info!(
            "removing {} (left by vmlab {pid}, which is gone)",
            dir.display()
        );
        let _ = fs::remove_dir_all(&dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_syntax() {
        assert_eq!(
            parse_volume("/srv/data:/data:ro").unwrap(),
            VolumeArg {
                host: "/srv/data".into(),
                guest: "/data".into(),
                readonly: true
            }
        );
        assert!(!parse_volume("/a:/b//c/").unwrap().readonly);
        assert_eq!(parse_volume("/a:/b//c/").unwrap().guest, "/b/c");
        assert!(parse_volume("/a:b").unwrap_err().contains("not absolute"));
        assert!(parse_volume("/a:/").unwrap_err().contains("guest's /"));
        assert!(parse_volume("/a:/b:rx")
            .unwrap_err()
            .contains("unknown mode"));
        assert!(parse_volume("/a").unwrap_err().contains("expected"));
        assert!(parse_volume(":/b").unwrap_err().contains("empty"));
        assert!(parse_volume("/a:/b/../c").unwrap_err().contains(".."));
    }

    #[test]
    fn validation_against_the_host() {
        let dir = std::env::temp_dir();
        let v = |host: &Path, guest: &str| VolumeArg {
            host: host.to_path_buf(),
            guest: guest.into(),
            readonly: false,
        };
        assert!(validate(&[v(&dir, "/a"), v(&dir, "/b")]).is_ok());
        let e = validate(&[v(&dir, "/a"), v(&dir, "/a")]).unwrap_err();
        assert!(e.contains("both mounted on /a"), "{e}");
        let e = validate(&[v(Path::new("/nonexistent/vmlab"), "/a")]).unwrap_err();
        assert!(e.contains("No such file"), "{e}");
        let e = validate(&[v(Path::new("/dev/null"), "/a")]).unwrap_err();
        assert!(e.contains("not a directory or a regular file"), "{e}");
        // A regular file is a file volume.
        assert!(validate(&[v(Path::new("/proc/self/status"), "/a")]).is_ok());
    }

    #[test]
    fn a_file_volume_is_a_hard_link_of_the_file_it_names() {
        use std::os::unix::fs::MetadataExt;
        let dir = std::env::temp_dir().join(format!("vmlab-vol-link-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("real"), b"data").unwrap();
        std::os::unix::fs::symlink(dir.join("real"), dir.join("sym")).unwrap();
        // Through a symbolic link: the file itself, not the link.
        link_or_copy(&dir.join("sym"), &dir.join("linked"), false).unwrap();
        let ino = |p: &str| fs::metadata(dir.join(p)).unwrap().ino();
        assert_eq!(ino("linked"), ino("real"));
        assert!(!fs::symlink_metadata(dir.join("linked"))
            .unwrap()
            .file_type()
            .is_symlink());
        // Across file systems (/dev/shm is a tmpfs): a copy.
        let shm = Path::new("/dev/shm").join(format!("vmlab-vol-link-{}", std::process::id()));
        if fs::write(&shm, b"").is_ok() {
            let _ = fs::remove_file(&shm);
            link_or_copy(&dir.join("real"), &shm, true).unwrap();
            assert_eq!(fs::read(&shm).unwrap(), b"data");
            let _ = fs::remove_file(&shm);
        }
        let e = link_or_copy(&dir.join("missing"), &dir.join("x"), false).unwrap_err();
        assert!(e.contains("missing"), "{e}");
        let _ = fs::remove_dir_all(&dir);
    }
}
