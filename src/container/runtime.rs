//! Finding an OCI runtime that works on this host, and driving it:
//! `run` in the foreground, `kill`, `delete`.
//!
//! "Works" is decided before anything is started: the runtime must answer
//! `--version`, and crun is skipped on a hybrid cgroup layout whose cgroup2
//! side has controllers, which it refuses ("cgroups in hybrid mode not
//! supported, drop all controllers from cgroupv2", whatever its cgroup
//! manager), while runc works there.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::cgroups::{CgroupHost, CgroupMode};
use super::Error;
use crate::signals::Signals;

/// Runtimes tried, in order, when none is named.
pub const AUTO_ORDER: [&str; 2] = ["runc", "crun"];

/// Where runtimes are looked for after `PATH` (Debian installs runc in
/// /usr/sbin, which a non-login environment may leave out of `PATH`).
const FALLBACK_DIRS: [&str; 6] = [
    "/usr/local/sbin",
    "/usr/local/bin",
    "/usr/sbin",
    "/usr/bin",
    "/sbin",
    "/bin",
];

/// How long a container has to stop after vmlab passed it a stop signal,
/// before it is killed (a PID 1 without a handler ignores SIGTERM).
pub const STOP_GRACE: Duration = Duration::from_secs(3);

/// How long the runtime has to exit after the container was killed,
/// before the runtime itself is.
const KILL_GRACE: Duration = Duration::from_secs(5);

/// Which runtime `--runtime` asks for.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum RuntimeRequest {
    /// The first of [`AUTO_ORDER`] that works here.
    #[default]
    Auto,
    /// A program name looked up in `PATH` (`runc`, `crun`).
    Named(String),
    /// A path to the runtime's executable.
    Path(PathBuf),
}

impl RuntimeRequest {
    /// Parses `--runtime`: `auto`, a name, or a path (anything with a `/`).
    pub fn parse(s: &str) -> Result<RuntimeRequest, String> {
        let s = s.trim();
        if s.is_empty() {
            return Err("empty runtime: use runc, crun, a path, or auto".into());
        }
        Ok(if s == "auto" {
            RuntimeRequest::Auto
        } else if s.contains('/') {
            RuntimeRequest::Path(PathBuf::from(s))
        } else {
            RuntimeRequest::Named(s.to_string())
        })
    }
}

/// Which runtime implementation a program is (what vmlab knows of it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// runc (Go, the reference implementation).
    Runc,
    /// crun (C).
    Crun,
    /// Something else that takes runc's command line.
    Other,
}

impl Flavor {
    /// From the program's file name.
    pub fn of(path: &Path) -> Flavor {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name.starts_with("runc") {
            Flavor::Runc
        } else if name.starts_with("crun") {
            Flavor::Crun
        } else {
            Flavor::Other
        }
    }
}

/// A runtime that was found and answered.
#[derive(Debug, Clone)]
pub struct Runtime {
    /// Its executable.
    pub path: PathBuf,
    /// Which implementation.
    pub flavor: Flavor,
    /// First line of `--version` (`runc version 1.1.5+ds1`).
    pub version: String,
}

/// Why a runtime cannot be used on `host`, when vmlab knows it cannot.
pub fn known_incompatibility(flavor: Flavor, host: &CgroupHost) -> Option<String> {
    if flavor == Flavor::Crun && host.mode == CgroupMode::Hybrid && !host.v2_controllers.is_empty()
    {
        return Some(format!(
            "crun does not support this host's hybrid cgroup layout ({}): it fails with \
             \"cgroups in hybrid mode not supported\"; use runc (apt-get install runc)",
            host.describe()
        ));
    }
    None
}

/// Picks the runtime for `request`: the named or given one if it works
/// here, or the first of [`AUTO_ORDER`] that does. Skipped runtimes are
/// logged with the reason.
pub fn select(request: &RuntimeRequest, host: &CgroupHost) -> Result<Runtime, Error> {
    match request {
        RuntimeRequest::Auto => {
            let mut reasons = Vec::new();
            for name in AUTO_ORDER {
                let Some(path) = find_program(name) else {
                    continue;
                };
                match check(&path, host) {
                    Ok(rt) => return Ok(rt),
                    Err(reason) => {
                        log::info!("not using {}: {reason}", path.display());
                        reasons.push(format!("{}: {reason}", path.display()));
                    }
                }
            }
            if reasons.is_empty() {
                Err(Error::NoRuntime)
            } else {
                Err(Error::NoUsableRuntime(reasons.join("; ")))
            }
        }
        RuntimeRequest::Named(name) => {
            let path = find_program(name).ok_or_else(|| Error::Runtime {
                runtime: name.clone(),
                reason: format!(
                    "not found in PATH or {}; install it (apt-get install {})",
                    FALLBACK_DIRS.join(", "),
                    if name == "crun" { "crun" } else { "runc" }
                ),
            })?;
            check(&path, host).map_err(|reason| Error::Runtime {
                runtime: path.display().to_string(),
                reason,
            })
        }
        RuntimeRequest::Path(path) => {
            let meta = std::fs::metadata(path).map_err(|e| Error::Runtime {
                runtime: path.display().to_string(),
                reason: e.to_string(),
            })?;
            if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
                return Err(Error::Runtime {
                    runtime: path.display().to_string(),
                    reason: "not an executable file".into(),
                });
            }
            check(path, host).map_err(|reason| Error::Runtime {
                runtime: path.display().to_string(),
                reason,
            })
        }
    }
}

/// Whether the runtime at `path` can work here: no known incompatibility,
/// and `--version` answers.
fn check(path: &Path, host: &CgroupHost) -> Result<Runtime, String> {
    let flavor = Flavor::of(path);
    if let Some(reason) = known_incompatibility(flavor, host) {
        return Err(reason);
    }
    let out = Command::new(path)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run it: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "`{} --version` failed ({}): {}",
            path.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let version = String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or("")
        .trim()
        .to_string();
    Ok(Runtime {
        path: path.to_path_buf(),
        flavor,
        version: if version.is_empty() {
            "unknown version".into()
        } else {
            version
        },
    })
}

/// `name` in `PATH`, then in [`FALLBACK_DIRS`].
fn find_program(name: &str) -> Option<PathBuf> {
    let path_var = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path_var)
        .chain(FALLBACK_DIRS.iter().map(PathBuf::from))
        .filter(|dir| dir.is_absolute())
        .map(|dir| dir.join(name))
        .find(|p| {
            std::fs::metadata(p)
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

/// How a container run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunOutcome {
    /// The container's process exited with this status (128+N if killed
    /// by signal N), as the runtime reported it.
    Exited(u8),
    /// vmlab was asked to stop by signal N and had to kill the container.
    Stopped(i32),
    /// The runtime failed before or while starting the process.
    StartFailed {
        /// The runtime's own error message.
        message: String,
        /// Exit status to report (126, 127 or 125, as `docker run`).
        code: u8,
    },
}

impl Runtime {
    /// The runtime's name for messages (`runc`).
    pub fn name(&self) -> String {
        self.path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| self.path.display().to_string())
    }

    /// The runtime command with its global options: errors go, as JSON
    /// lines, to `log` as well, so that vmlab can tell a runtime failure
    /// from the container's own exit status.
    fn command(&self, log: Option<&Path>) -> Command {
        let mut cmd = Command::new(&self.path);
        if let (Some(log), Flavor::Runc | Flavor::Crun) = (log, self.flavor) {
            cmd.arg("--log").arg(log).arg("--log-format").arg("json");
        }
        cmd
    }

    /// Runs the bundle in `bundle_dir` as container `id`, in the
    /// foreground with vmlab's stdin, stdout and stderr, and waits for it.
    /// Stop signals (from `signals`) are passed to the container; if it is
    /// still running [`STOP_GRACE`] later, or on a second signal, it is
    /// killed.
    pub fn run(
        &self,
        bundle_dir: &Path,
        log: &Path,
        id: &str,
        signals: &Signals,
    ) -> Result<RunOutcome, Error> {
        let started = Instant::now();
        let mut child = self
            .command(Some(log))
            .arg("run")
            .arg("--bundle")
            .arg(bundle_dir)
            .arg(id)
            .spawn()
            .map_err(|e| Error::Runtime {
                runtime: self.path.display().to_string(),
                reason: format!("cannot start it: {e}"),
            })?;
        let pid = child.id() as libc::pid_t;
        let mut stop_signal: Option<i32> = None;
        let mut phase = Phase::Running;
        let status: ExitStatus = loop {
            if let Some(status) = child.try_wait().map_err(host("waiting for the runtime"))? {
                break status;
            }
            let now = Instant::now();
            let deadline = match phase {
                Phase::Running | Phase::Abandoned => None,
                Phase::Grace(t) => Some(t + STOP_GRACE),
                Phase::Killed(t) => Some(t + KILL_GRACE),
            };
            if deadline.is_some_and(|d| d <= now) {
                phase = if let Phase::Grace(_) = phase {
                    log::info!("the container did not stop: killing it");
                    self.kill(id);
                    Phase::Killed(now)
                } else {
                    log::warn!("{} did not exit: killing it", self.name());
                    let _ = child.kill();
                    Phase::Abandoned
                };
                continue;
            }
            let received = signals
                .wait(deadline.map(|d| d - now))
                .map_err(host("waiting for signals"))?;
            for r in received.into_iter().filter(|r| r.signo != libc::SIGCHLD) {
                match phase {
                    Phase::Running => {
                        log::info!(
                            "received signal {}: passing it to the container ({} s to stop)",
                            r.signo,
                            STOP_GRACE.as_secs()
                        );
                        // A terminal's signal reached the runtime too (same
                        // process group), which forwards it itself.
                        if !r.from_kernel {
                            // SAFETY: kill(2) on our own child's pid, not
                            // reaped yet (try_wait above returned None).
                            unsafe { libc::kill(pid, r.signo) };
                        }
                        stop_signal = Some(r.signo);
                        phase = Phase::Grace(Instant::now());
                    }
                    Phase::Grace(_) => {
                        log::info!("received signal {} again: killing the container", r.signo);
                        self.kill(id);
                        phase = Phase::Killed(Instant::now());
                    }
                    Phase::Killed(_) | Phase::Abandoned => {}
                }
            }
        };
        log::debug!(
            "{} exited after {:.1} ms: {status}",
            self.name(),
            started.elapsed().as_secs_f64() * 1e3
        );

        let code = match (status.code(), status.signal()) {
            (Some(c), _) => u8::try_from(c).unwrap_or(super::EXIT_VMLAB_ERROR),
            (None, Some(sig)) => u8::try_from(128 + sig).unwrap_or(super::EXIT_VMLAB_ERROR),
            (None, None) => super::EXIT_VMLAB_ERROR,
        };
        if let (Some(sig), Phase::Killed(_) | Phase::Abandoned) = (stop_signal, phase) {
            return Ok(RunOutcome::Stopped(sig));
        }
        if code != 0 {
            let log_text = std::fs::read_to_string(log).unwrap_or_default();
            if let Some(message) = last_error(&log_text) {
                let code = start_failure_code(&message);
                return Ok(RunOutcome::StartFailed { message, code });
            }
        }
        Ok(RunOutcome::Exited(code))
    }

    /// Whether the runtime knows a container `id` (`RUNTIME state ID`).
    pub fn exists(&self, id: &str) -> bool {
        self.command(None)
            .args(["state", id])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// `RUNTIME kill ID KILL`, best effort.
    pub fn kill(&self, id: &str) {
        let _ = self
            .command(None)
            .args(["kill", id, "KILL"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }

    /// `RUNTIME delete --force ID`, best effort: after `run` the runtime
    /// has normally deleted the container itself; this catches a runtime
    /// that died or was killed and left it (and its process) behind.
    pub fn delete(&self, id: &str) {
        let _ = self
            .command(None)
            .args(["delete", "--force", id])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Where [`Runtime::run`] is in stopping a container.
#[derive(Debug, Clone, Copy)]
enum Phase {
    /// Running; no stop asked.
    Running,
    /// A stop signal was passed on at this time.
    Grace(Instant),
    /// `RUNTIME kill` was sent at this time.
    Killed(Instant),
    /// The runtime itself was killed; waiting for it to be reaped.
    Abandoned,
}

fn host(what: &'static str) -> impl Fn(std::io::Error) -> Error {
    move |source| Error::Host { what, source }
}

/// The last error-level message in a runtime's JSON log, without the
/// runtime's "runc run failed: " prefix.
pub fn last_error(log: &str) -> Option<String> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| matches!(v["level"].as_str(), Some("error" | "fatal")))
        .filter_map(|v| v["msg"].as_str().map(str::to_string))
        .next_back()
        .map(|m| {
            let m = m.trim();
            m.strip_prefix("runc run failed: ")
                .or_else(|| m.strip_prefix("runc: "))
                .unwrap_or(m)
                .to_string()
        })
}

/// The status `docker run` gives a start failure: 127 when the command
/// was not found, 126 when it could not be executed, else 125.
pub fn start_failure_code(message: &str) -> u8 {
    let m = message.to_lowercase();
    if !m.contains("exec") {
        return super::EXIT_VMLAB_ERROR;
    }
    if m.contains("executable file not found") || m.contains("no such file or directory") {
        127
    } else if m.contains("permission denied") || m.contains("exec format error") {
        126
    } else {
        super::EXIT_VMLAB_ERROR
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hybrid(v2: &[&str]) -> CgroupHost {
        CgroupHost {
            mode: CgroupMode::Hybrid,
            v1_controllers: vec!["memory".into(), "cpu".into()],
            v2_mount: Some("/sys/fs/cgroup/unified".into()),
            v2_controllers: v2.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn requests() {
        assert_eq!(RuntimeRequest::parse("auto"), Ok(RuntimeRequest::Auto));
        assert_eq!(
            RuntimeRequest::parse("crun"),
            Ok(RuntimeRequest::Named("crun".into()))
        );
        assert_eq!(
            RuntimeRequest::parse("/opt/runc"),
            Ok(RuntimeRequest::Path("/opt/runc".into()))
        );
        assert_eq!(
            RuntimeRequest::parse("./runc"),
            Ok(RuntimeRequest::Path("./runc".into()))
        );
        assert!(RuntimeRequest::parse(" ").is_err());
    }

    #[test]
    fn flavors() {
        assert_eq!(Flavor::of(Path::new("/usr/sbin/runc")), Flavor::Runc);
        assert_eq!(Flavor::of(Path::new("/usr/bin/crun")), Flavor::Crun);
        assert_eq!(Flavor::of(Path::new("/opt/youki")), Flavor::Other);
    }

    #[test]
    fn crun_is_skipped_on_hybrid_hosts_with_v2_controllers() {
        let reason = known_incompatibility(Flavor::Crun, &hybrid(&["hugetlb"])).unwrap();
        assert!(reason.contains("hybrid"), "{reason}");
        assert!(known_incompatibility(Flavor::Runc, &hybrid(&["hugetlb"])).is_none());
        assert!(known_incompatibility(Flavor::Crun, &hybrid(&[])).is_none());
        let mut unified = hybrid(&["memory"]);
        unified.mode = CgroupMode::Unified;
        assert!(known_incompatibility(Flavor::Crun, &unified).is_none());
    }

    #[test]
    fn runtime_errors_from_the_log() {
        let log = r#"{"level":"warning","msg":"something","time":"t"}
{"level":"error","msg":"runc run failed: unable to start container process: exec: \"nope\": executable file not found in $PATH","time":"t"}
"#;
        let msg = last_error(log).unwrap();
        assert_eq!(
            msg,
            "unable to start container process: exec: \"nope\": executable file not found in $PATH"
        );
        assert_eq!(start_failure_code(&msg), 127);
        assert_eq!(
            start_failure_code(
                "unable to start container process: exec: \"/etc/passwd\": permission denied"
            ),
            126
        );
        assert_eq!(
            start_failure_code("exec: \"/nope\": stat /nope: no such file or directory"),
            127
        );
        assert_eq!(
            start_failure_code("error mounting \"proc\": no such file or directory"),
            125
        );
        assert!(last_error("not json\n{\"level\":\"info\",\"msg\":\"x\"}\n").is_none());
        assert!(last_error("").is_none());
    }

    #[test]
    fn missing_runtimes_are_clear_errors() {
        let host = hybrid(&[]);
        let e = select(&RuntimeRequest::Path("/nonexistent/runc".into()), &host)
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/runc"), "{e}");
        let e = select(&RuntimeRequest::Path("/etc/passwd".into()), &host)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not an executable"), "{e}");
        let e = select(
            &RuntimeRequest::Named("no-such-runtime-vmlab".into()),
            &host,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("not found") && e.contains("apt-get install"),
            "{e}"
        );
    }
}
