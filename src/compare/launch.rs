//! Launching one environment (or the host-side client) and reading its
//! output line by line, each line stamped with the time it arrived, with
//! every wait bounded and interruptible; and the SIGINT/SIGTERM/SIGHUP
//! handling that lets `vmlab compare` stop its children and remove its
//! namespaces and cgroups instead of dying with them in place.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use super::memory::MemCgroup;
use super::netns;
use super::sandbox::Sandbox;

/// The signal that asked vmlab compare to stop, or 0.
static STOP_SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_stop_signal(sig: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    STOP_SIGNAL.store(sig, Ordering::SeqCst);
}

/// Installs the handlers for SIGINT, SIGTERM and SIGHUP: they only record
/// the signal, and every wait in this module looks at it.
pub fn install_stop_handlers() -> std::io::Result<()> {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: a zeroed sigaction is valid; the handler only stores to
        // an atomic (async-signal-safe), and sa_mask is initialized by
        // sigemptyset before use.
        unsafe {
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = on_stop_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            libc::sigemptyset(&mut act.sa_mask);
            // SA_RESTART: reads in the reader threads carry on.
            act.sa_flags = libc::SA_RESTART;
            if libc::sigaction(sig, &act, std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    Ok(())
}

/// The signal that asked vmlab compare to stop, if one did.
pub fn stop_requested() -> Option<i32> {
    match STOP_SIGNAL.load(Ordering::SeqCst) {
        0 => None,
        sig => Some(sig),
    }
}

/// What to start.
#[derive(Debug, Clone, Default)]
pub struct LaunchSpec {
    /// The program.
    pub program: PathBuf,
    /// Its `argv[0]`, if not `program`.
    pub arg0: Option<OsString>,
    /// Its arguments.
    pub args: Vec<OsString>,
    /// Its working directory, if not ours.
    pub cwd: Option<PathBuf>,
    /// A network namespace to join before it executes.
    pub netns: Option<PathBuf>,
    /// Variables added to its environment.
    pub env: Vec<(OsString, OsString)>,
    /// Confinement applied before it executes (the host baseline, which
    /// runs the image's own binary on the host).
    pub sandbox: Option<Sandbox>,
}

/// A line of output, with when it arrived.
enum Event {
    Line(Instant, String),
    Eof,
}

/// What [`Launched::next_line`] returns.
#[derive(Debug)]
pub enum Next {
    /// A line (stdout or stderr), when it arrived, without its newline.
    Line(Instant, String),
    /// Both streams ended.
    Closed,
    /// The deadline passed.
    TimedOut,
    /// vmlab compare was asked to stop by this signal.
    Stopped(i32),
}

/// A running launch.
pub struct Launched {
    child: Child,
    /// When it was spawned.
    pub started: Instant,
    rx: Receiver<Event>,
    open_streams: u8,
    status: Option<ExitStatus>,
}

impl Launched {
    /// Spawns `spec` with its stdout and stderr read line by line, in
    /// `cgroup` and `spec.netns` if given (joined between fork and exec,
    /// so the process's first allocation is already charged there).
    pub fn spawn(spec: &LaunchSpec, cgroup: Option<&MemCgroup>) -> std::io::Result<Launched> {
        let mut cmd = Command::new(&spec.program);
        if let Some(arg0) = &spec.arg0 {
            cmd.arg0(arg0);
        }
        cmd.args(&spec.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(dir) = &spec.cwd {
            cmd.current_dir(dir);
        }
        cmd.envs(spec.env.iter().map(|(k, v)| (k, v)));
        // Opened here, in the parent: between fork and exec only system
        // calls on descriptors that already exist are safe.
        let ns = spec.netns.as_deref().map(netns::open_ns).transpose()?;
        let ns_fd = ns.as_ref().map(std::os::fd::AsRawFd::as_raw_fd);
        let procs_fd = cgroup.map(MemCgroup::procs_fd);
        let sandbox = spec.sandbox.clone();
        // SAFETY: the closure runs in the child between fork and exec and
        // only makes async-signal-safe system calls (write, setns, and the
        // sandbox's unshare/mount/prctl/setres[ug]id/seccomp) on
        // descriptors opened before the fork, which stay open (`ns` and
        // the cgroup outlive the spawn call), and on the sandbox's filter,
        // compiled before the fork; it allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                if let Some(fd) = procs_fd {
                    // "0": the writing process itself.
                    if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if let Some(fd) = ns_fd {
                    if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                match &sandbox {
                    Some(s) => s.enter(),
                    None => Ok(()),
                }
            });
        }
        let started = Instant::now();
        let mut child = cmd.spawn()?;
        drop(ns);
        let (tx, rx) = mpsc::channel();
        let mut open_streams = 0;
        if let Some(out) = child.stdout.take() {
            reader(out, tx.clone());
            open_streams += 1;
        }
        if let Some(err) = child.stderr.take() {
            reader(err, tx);
            open_streams += 1;
        }
        Ok(Launched {
            child,
            started,
            rx,
            open_streams,
            status: None,
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The next line, or why there is none, waiting at most until
    /// `deadline`.
    pub fn next_line(&mut self, deadline: Instant) -> Next {
        loop {
            if let Some(sig) = stop_requested() {
                return Next::Stopped(sig);
            }
            if self.open_streams == 0 {
                return Next::Closed;
            }
            let now = Instant::now();
            if now >= deadline {
                return Next::TimedOut;
            }
            // Short slices, so a stop signal is seen within 200 ms.
            let slice = (deadline - now).min(Duration::from_millis(200));
            match self.rx.recv_timeout(slice) {
                Ok(Event::Line(at, text)) => return Next::Line(at, text),
                Ok(Event::Eof) => self.open_streams -= 1,
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => self.open_streams = 0,
            }
        }
    }

    /// Waits for the exit until `deadline`; `None` if it is still running
    /// then (or a stop signal came).
    pub fn wait_until(&mut self, deadline: Instant) -> Option<ExitStatus> {
        loop {
            if let Some(st) = self.status {
                return Some(st);
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                self.status = Some(st);
                return Some(st);
            }
            if Instant::now() >= deadline || stop_requested().is_some() {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Asks it to stop (SIGTERM: vmlab stops its VM or container and
    /// cleans up), and kills it if it has not exited after `grace`.
    pub fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        if let Some(st) = self.status {
            return Some(st);
        }
        if let Ok(Some(st)) = self.child.try_wait() {
            self.status = Some(st);
            return Some(st);
        }
        if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: kill takes integers; the child has not been reaped
            // (try_wait said it is running), so the pid is still ours.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let deadline = Instant::now() + grace;
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                self.status = Some(st);
                return Some(st);
            }
            if Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let st = self.child.wait().ok();
        self.status = st;
        st
    }
}

impl Drop for Launched {
    fn drop(&mut self) {
        // Nothing is left running behind an error or a stop signal.
        self.stop(Duration::from_secs(5));
    }
}

/// Reads `stream` line by line into `tx`, stamping each line; a final
/// `Eof` says the stream ended. Bytes that are not UTF-8 are replaced.
fn reader(stream: impl Read + Send + 'static, tx: Sender<Event>) {
    std::thread::spawn(move || {
        let mut r = BufReader::new(stream);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match r.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let at = Instant::now();
                    let text = String::from_utf8_lossy(&buf);
                    let text = text.trim_end_matches(['\n', '\r']).to_string();
                    if tx.send(Event::Line(at, text)).is_err() {
                        return;
                    }
                }
            }
        }
        let _ = tx.send(Event::Eof);
    });
}

/// "exit status 0", "killed by signal 9".
pub fn describe_status(st: Option<ExitStatus>) -> String {
    match st {
        Some(st) => match (st.code(), st.signal()) {
            (Some(code), _) => format!("exit status {code}"),
            (None, Some(sig)) => format!("killed by signal {sig}"),
            (None, None) => format!("{st}"),
        },
        None => "did not exit".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> LaunchSpec {
        LaunchSpec {
            program: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
            ..Default::default()
        }
    }

    #[test]
    fn lines_from_both_streams_then_closed() {
        let mut l =
            Launched::spawn(&sh("echo one; echo two >&2; printf 'three\\r\\n'"), None).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut lines = Vec::new();
        loop {
            match l.next_line(deadline) {
                Next::Line(at, t) => {
                    assert!(at >= l.started);
                    lines.push(t);
                }
                Next::Closed => break,
                other => panic!("{other:?}"),
            }
        }
        lines.sort();
        assert_eq!(lines, ["one", "three", "two"]);
        let st = l.wait_until(deadline);
        assert_eq!(describe_status(st), "exit status 0");
    }

    #[test]
    fn waits_are_bounded_and_stop_ends_the_process() {
        let mut l = Launched::spawn(&sh("sleep 30"), None).unwrap();
        let t = Instant::now();
        assert!(matches!(
            l.next_line(Instant::now() + Duration::from_millis(300)),
            Next::TimedOut
        ));
        assert!(l
            .wait_until(Instant::now() + Duration::from_millis(100))
            .is_none());
        let st = l.stop(Duration::from_secs(5));
        assert_eq!(describe_status(st), "killed by signal 15");
        assert!(t.elapsed() < Duration::from_secs(10));
    }

    /// The host baseline's process, as the workload would see itself: not
    /// root, no capabilities, no_new_privs, a seccomp filter, its own
    /// mount/IPC/UTS namespaces; and the denied calls fail.
    #[test]
    fn the_host_baseline_is_unprivileged() {
        let sandbox = crate::compare::sandbox::Sandbox::for_host_baseline().unwrap();
        let mut spec = sh("grep -E '^(Uid|Gid|Groups|CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs|Seccomp):' /proc/self/status; \
             readlink /proc/self/ns/mnt /proc/self/ns/ipc /proc/self/ns/uts | sed 's/^/ns: /'; \
             hostname x 2>/dev/null && echo 'hostname: allowed' || echo 'hostname: refused'");
        spec.sandbox = Some(sandbox.clone());
        let mut l = Launched::spawn(&spec, None).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut out = std::collections::BTreeMap::new();
        let mut ns = Vec::new();
        while let Next::Line(_, t) = l.next_line(deadline) {
            if let Some(n) = t.strip_prefix("ns: ") {
                ns.push(n.to_string());
            } else if let Some((k, v)) = t.split_once(':') {
                out.insert(k.to_string(), v.trim().to_string());
            }
        }
        assert_eq!(
            describe_status(l.wait_until(deadline)),
            "exit status 0",
            "{out:?}"
        );
        let first = |k: &str| out[k].split_whitespace().next().unwrap().to_string();
        assert_ne!(first("Uid"), "0", "{out:?}");
        assert_ne!(first("Gid"), "0", "{out:?}");
        for cap in ["CapInh", "CapPrm", "CapEff", "CapAmb"] {
            assert_eq!(out[cap], "0000000000000000", "{cap}: {out:?}");
        }
        assert_eq!(out["NoNewPrivs"], "1");
        assert_eq!(out["Seccomp"], "2");
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            assert_eq!(first("Uid"), "65534");
            assert_eq!(out["Groups"], "");
            assert_eq!(out["CapBnd"], "0000000000000000");
            let own: Vec<String> = ["mnt", "ipc", "uts"]
                .iter()
                .map(|n| {
                    std::fs::read_link(format!("/proc/self/ns/{n}"))
                        .unwrap()
                        .to_string_lossy()
                        .into_owned()
                })
                .collect();
            assert_eq!(ns.len(), 3, "{ns:?}");
            for (theirs, ours) in ns.iter().zip(&own) {
                assert_ne!(theirs, ours, "namespace shared with vmlab");
            }
        } else {
            eprintln!("not root: only no_new_privs and seccomp were checked (no identity switch, no namespaces)");
        }
        assert_eq!(out["hostname"], "refused");
    }

    #[test]
    fn spawn_failure_is_an_error() {
        let spec = LaunchSpec {
            program: "/nonexistent/program".into(),
            ..Default::default()
        };
        assert!(Launched::spawn(&spec, None).is_err());
    }
}
