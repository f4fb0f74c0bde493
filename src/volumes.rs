//! Host directories in the guest (`vmlab run --volume HOST:GUEST[:ro]`):
//! one virtiofsd per share, started, watched and stopped by vmlab.
//!
//! - [`parse_volume`] and [`validate`]: the command line. The host path
//!   must be an existing directory, the guest path absolute, and no two
//!   volumes may share a guest path.
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

use crate::cmdline::GuestVolume;
use crate::devices::virtio::fs::FsConfig;

/// How long a starting virtiofsd may take to create its socket.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// One `--volume`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeArg {
    /// The host directory.
    pub host: PathBuf,
    /// Where the guest mounts it (absolute).
    pub guest: String,
    /// `:ro`: the daemon refuses writes, and the guest mounts it read-only.
    pub readonly: bool,
}

/// Parses `HOST_DIR:GUEST_PATH[:ro|:rw]`.
pub fn parse_volume(s: &str) -> Result<VolumeArg, String> {
    let parts: Vec<&str> = s.split(':').collect();
    let (host, guest, readonly) = match parts.as_slice() {
        [host, guest] => (*host, *guest, false),
        [host, guest, "ro"] => (*host, *guest, true),
        [host, guest, "rw"] => (*host, *guest, false),
        [_, _, mode] => return Err(format!("--volume {s}: unknown mode '{mode}' (ro or rw)")),
        _ => return Err(format!("--volume {s}: expected HOST_DIR:GUEST_PATH[:ro]")),
    };
    if host.is_empty() {
        return Err(format!("--volume {s}: the host directory is empty"));
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
/// directory, every guest path used once.
pub fn validate(volumes: &[VolumeArg]) -> Result<(), String> {
    for (i, v) in volumes.iter().enumerate() {
        match fs::metadata(&v.host) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(format!("--volume {}: not a directory", v.host.display())),
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
    /// Whether `dir` is the run's own (removed at the end), not a named
    /// VM's state directory.
    own_dir: bool,
}

/// The tag of an image's root share.
pub const ROOT_TAG: &str = "vmlabroot";

/// The pid file in a run directory: the vmlab that owns it.
const OWNER_FILE: &str = "vmlab.pid";

impl Shares {
    /// Starts one virtiofsd per volume, its socket in `dir` (created;
    /// `own_dir`: removed again at the end). Returns once every socket
    /// exists.
    pub fn start(volumes: &[VolumeArg], dir: &Path, own_dir: bool) -> Result<Shares, String> {
        Shares::start_with_root(None, volumes, dir, own_dir)
    }

    /// [`start`](Self::start), plus (first) a read-only share of `root`
    /// tagged [`ROOT_TAG`]: an image's root file system, which the guest
    /// init switches root to.
    pub fn start_with_root(
        root: Option<&Path>,
        volumes: &[VolumeArg],
        dir: &Path,
        own_dir: bool,
    ) -> Result<Shares, String> {
        let mut shares = Shares {
            dir: dir.to_path_buf(),
            daemons: Vec::new(),
            guest: Vec::new(),
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
                host: root.to_path_buf(),
                guest: "/".into(),
                readonly: true,
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
        for (i, v) in volumes.iter().enumerate() {
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

    /// What the guest init mounts.
    pub fn guest_volumes(&self) -> &[GuestVolume] {
        &self.guest
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
        let e = validate(&[v(Path::new("/proc/self/status"), "/a")]).unwrap_err();
        assert!(e.contains("not a directory"), "{e}");
    }
}
