//! Running the command and the duties of PID 1: reaping every zombie,
//! noticing when the command ends, handling shutdown requests, and cleaning
//! up the processes left behind.
//!
//! Signals are handled synchronously: init blocks the few signals it cares
//! about and waits for them with `sigwaitinfo`/`sigtimedwait`. A blocked
//! signal is queued even for PID 1 (which otherwise drops signals it has no
//! handler for), needs no handler, no self-pipe, no `signalfd` support in the
//! kernel, and costs one system call per wake-up. SIGCHLD is treated only as
//! "something changed": after every wake-up all exited children are reaped
//! with `waitpid(-1, WNOHANG)`, so coalesced SIGCHLDs lose nothing.
//!
//! The module does not assume it runs as PID 1 (see [`Scope`] and
//! [`Options::poll`]), so the tests run real commands on the host.

use std::ffi::OsString;
use std::io;
use std::mem::MaybeUninit;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::RwLock;
use std::time::{Duration, Instant};

use crate::errno_text;
use crate::status::Event;

/// How long processes left behind get between SIGTERM and SIGKILL.
pub const GRACE: Duration = Duration::from_secs(1);
/// How long to wait for SIGKILLed processes to disappear before giving up
/// (a process stuck in uninterruptible sleep must not keep the VM up).
const KILL_WAIT: Duration = Duration::from_secs(2);

/// docker's convention: the command could not be found.
pub const EXIT_NOT_FOUND: u8 = 127;
/// docker's convention: the command was found but could not be run.
pub const EXIT_CANNOT_RUN: u8 = 126;

/// Maps a `waitpid` status to the exit status reported to the VMM: the exit
/// code, or 128+N for a command killed by signal N (as docker and shells do).
pub fn exit_code(wstatus: libc::c_int) -> u8 {
    if libc::WIFEXITED(wstatus) {
        (libc::WEXITSTATUS(wstatus) & 0xff) as u8
    } else if libc::WIFSIGNALED(wstatus) {
        (128 + libc::WTERMSIG(wstatus)).min(255) as u8
    } else {
        255
    }
}

/// The blocked signal set init waits on.
pub struct Signals {
    set: libc::sigset_t,
}

impl Signals {
    /// Blocks SIGCHLD (a child changed state) and the shutdown requests
    /// busybox's `poweroff`/`reboot`/`halt` send to PID 1 (SIGUSR2, SIGTERM,
    /// SIGUSR1), for the calling thread. Done first thing in init so that a
    /// request arriving early is queued, not lost. Children get an empty mask
    /// again in [`spawn`] (std's `Command` keeps the inherited one).
    pub fn block() -> io::Result<Signals> {
        let mut set = MaybeUninit::<libc::sigset_t>::uninit();
        // SAFETY: sigemptyset initializes the set; sigaddset only modifies it;
        // pthread_sigmask reads it. No memory is shared with anything else.
        unsafe {
            libc::sigemptyset(set.as_mut_ptr());
            for sig in [libc::SIGCHLD, libc::SIGTERM, libc::SIGUSR1, libc::SIGUSR2] {
                libc::sigaddset(set.as_mut_ptr(), sig);
            }
            let set = set.assume_init();
            let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            if rc != 0 {
                return Err(io::Error::from_raw_os_error(rc));
            }
            Ok(Signals { set })
        }
    }

    /// Waits for one of the signals, at most `timeout` (forever if `None`).
    /// Returns the signal, or `None` on timeout or interruption.
    fn wait(&self, timeout: Option<Duration>) -> Option<libc::c_int> {
        // SAFETY: the set is initialized; the timespec lives across the call;
        // the siginfo pointer may be null.
        let sig = unsafe {
            match timeout {
                None => libc::sigwaitinfo(&self.set, std::ptr::null_mut()),
                Some(t) => {
                    let ts = libc::timespec {
                        tv_sec: t.as_secs() as libc::time_t,
                        tv_nsec: t.subsec_nanos() as libc::c_long,
                    };
                    libc::sigtimedwait(&self.set, std::ptr::null_mut(), &ts)
                }
            }
        };
        (sig > 0).then_some(sig)
    }
}

/// Tuning of the supervision loop.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// Also wake up this often and look for exited children. PID 1 in a
    /// single-threaded init needs no polling (`None`): every child exit queues
    /// a SIGCHLD for it. The tests run inside a multi-threaded test harness,
    /// where another thread may swallow the SIGCHLD, so they poll.
    pub poll: Option<Duration>,
}

/// What ended the supervision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The command ended (or could not be started) with this exit status.
    Exited(u8),
    /// Init was asked to power off, reboot or halt before the command ended.
    Shutdown(Event),
}

/// The command to run.
#[derive(Debug, Clone, Default)]
pub struct CommandSpec {
    /// argv; `argv[0]` is looked up in the `PATH` of `env`.
    pub argv: Vec<OsString>,
    /// The complete environment (nothing is inherited from init, whose own
    /// environment is the kernel's leftovers).
    pub env: Vec<(OsString, OsString)>,
    /// `(uid, gid, supplementary groups)` to switch to, if not root.
    pub creds: Option<(u32, u32, Vec<u32>)>,
    /// Make fd 0 (the console) the controlling terminal of the command's new
    /// session, so an interactive shell gets job control and Ctrl-C reaches
    /// the foreground job. Only for PID 1: on a host it would take over the
    /// terminal of whoever runs the tests.
    pub ctty: bool,
    /// Working directory (default: init's own, `/`). The caller checks that
    /// it exists: a missing one would look like "command not found" here.
    pub cwd: Option<PathBuf>,
}

/// The command could not be started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpawnError {
    /// 127 (not found) or 126 (found, but could not be executed).
    pub status: u8,
    /// The message for the console (without the `vmlab-init: ` prefix).
    pub message: String,
}

/// Starts the command in a new session (and process group), as a child of
/// the caller, on init's own stdin/stdout/stderr (the console). Exec errors
/// come back through std's CLOEXEC pipe with their errno, which is mapped
/// to docker's statuses.
pub fn spawn(spec: &CommandSpec) -> Result<libc::pid_t, SpawnError> {
    spawn_child(spec, None).map(|child| child.id() as libc::pid_t)
}

/// Taken shared while a child is spawned and exclusively by [`reap`].
/// When a child's exec fails, std's `Command::spawn` collects that child
/// itself (`waitpid(pid)`) and panics if it is already gone ("wait()
/// should either return Ok or panic"); in the guest that panic is init's
/// and resets the VM. The reaper's `waitpid(-1)` must not take such a
/// child first, which it did when an agent session started a command
/// that was not found while PID 1 reaped.
static SPAWNING: RwLock<()> = RwLock::new(());

/// [`spawn`] with the given stdin, stdout and stderr (the guest agent's
/// pipes or terminal). The caller owns the returned [`Child`]'s pipes; its
/// exit status is collected by the reaper, not through the `Child`.
pub fn spawn_child(spec: &CommandSpec, stdio: Option<[Stdio; 3]>) -> Result<Child, SpawnError> {
    let Some(prog) = spec.argv.first() else {
        return Err(SpawnError {
            status: EXIT_NOT_FOUND,
            message: "empty command".to_string(),
        });
    };
    let mut cmd = Command::new(prog);
    cmd.args(spec.argv.iter().skip(1))
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)));
    if let Some([stdin, stdout, stderr]) = stdio {
        cmd.stdin(stdin).stdout(stdout).stderr(stderr);
    }
    if let Some(dir) = &spec.cwd {
        cmd.current_dir(dir);
    }
    let ctty = spec.ctty;
    let creds = spec.creds.clone();
    // SAFETY: the closure runs in the child between fork and exec and only
    // makes async-signal-safe calls (sigemptyset, sigprocmask, setsid, ioctl,
    // setgroups, setgid, setuid) on data moved into it or on its own stack;
    // it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            // Unblock what init blocked for itself: std's Command leaves the
            // signal mask as inherited, and a command with SIGTERM/SIGCHLD
            // blocked would misbehave in ways hard to trace.
            let mut empty = MaybeUninit::<libc::sigset_t>::uninit();
            libc::sigemptyset(empty.as_mut_ptr());
            if libc::sigprocmask(libc::SIG_SETMASK, empty.as_ptr(), std::ptr::null_mut()) != 0 {
                return Err(io::Error::last_os_error());
            }
            // A new session: the command (and what it starts) form one
            // process group that can be signalled as a whole, and the
            // session can own the console as controlling terminal.
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            if ctty {
                // Best effort: without it the command still runs, just
                // without job control.
                libc::ioctl(0, libc::TIOCSCTTY, 0);
            }
            if let Some((uid, gid, groups)) = &creds {
                if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                    || libc::setgid(*gid) != 0
                    || libc::setuid(*uid) != 0
                {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    // A poisoned lock guards nothing: the guard is only an exclusion.
    let spawning = SPAWNING.read().unwrap_or_else(|e| e.into_inner());
    let spawned = cmd.spawn();
    drop(spawning);
    match spawned {
        Ok(child) => Ok(child),
        Err(e) => {
            let name = prog.to_string_lossy();
            Err(match e.raw_os_error() {
                Some(libc::ENOENT | libc::ENOTDIR) => SpawnError {
                    status: EXIT_NOT_FOUND,
                    message: format!("{name}: not found"),
                },
                _ => SpawnError {
                    status: EXIT_CANNOT_RUN,
                    message: format!("{name}: {}", errno_text(&e)),
                },
            })
        }
    }
}

/// Reaps every exited child. Records the exit status of `main` if it is
/// among them. Returns whether children remain (false on ECHILD).
fn reap(main: libc::pid_t, main_status: &mut Option<u8>) -> bool {
    // Not while a spawn may still collect a child whose exec failed.
    let _spawns_done = SPAWNING.write().unwrap_or_else(|e| e.into_inner());
    loop {
        let mut wstatus = 0;
        // SAFETY: wstatus is a valid out pointer.
        let pid = unsafe { libc::waitpid(-1, &mut wstatus, libc::WNOHANG) };
        match pid {
            0 => return true,
            p if p > 0 => {
                if p == main {
                    *main_status = Some(exit_code(wstatus));
                } else {
                    // A process of the guest agent (or an orphan).
                    crate::agent::child_exited(p, wstatus);
                }
            }
            _ => {
                if io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                return false; // ECHILD: no children at all
            }
        }
    }
}

/// Supervises the running command `main` until it exits or a shutdown is
/// requested, reaping every other child (orphans are re-parented to PID 1,
/// the guest agent's processes are its children) along the way. Without a
/// main command (a VM that only serves the agent) only a shutdown ends it.
pub fn supervise(main: Option<libc::pid_t>, signals: &Signals, opts: &Options) -> Outcome {
    let mut status = None;
    loop {
        // pid 0 is never a child's: no main status is recorded.
        let children_left = reap(main.unwrap_or(0), &mut status);
        if let Some(code) = status {
            return Outcome::Exited(code);
        }
        if let (Some(main), false) = (main, children_left) {
            // Cannot happen unless someone else reaped our child.
            crate::error!("lost track of the command (pid {main})");
            return Outcome::Exited(crate::EXIT_INIT_FAILURE);
        }
        match signals.wait(opts.poll) {
            Some(libc::SIGTERM) => return Outcome::Shutdown(Event::Reboot),
            Some(libc::SIGUSR1) => return Outcome::Shutdown(Event::Halt),
            Some(libc::SIGUSR2) => return Outcome::Shutdown(Event::PowerOff),
            _ => {} // SIGCHLD, timeout or interruption: reap again
        }
    }
}

/// Which processes [`terminate_rest`] signals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Every process but init itself (`kill(-1)`); only for PID 1.
    Everything,
    /// One process group (the command's session, on a host). Used by the
    /// tests, which cannot be PID 1.
    #[cfg_attr(not(test), allow(dead_code))]
    Group(libc::pid_t),
}

/// Sends `sigs` to the processes in `scope`. Returns false if there was no
/// process to signal.
fn send(scope: Scope, sigs: &[libc::c_int]) -> bool {
    let target = match scope {
        Scope::Everything => -1,
        Scope::Group(pgid) => -pgid,
    };
    let mut any = false;
    for &sig in sigs {
        // SAFETY: kill has no memory effects.
        if unsafe { libc::kill(target, sig) } == 0 {
            any = true;
        }
    }
    any
}

/// Waits until no child is left, at most `timeout`. Returns whether all are
/// gone.
fn wait_gone(signals: &Signals, timeout: Duration, opts: &Options) -> bool {
    let start = Instant::now();
    let mut ignored = None;
    loop {
        if !reap(0, &mut ignored) {
            return true;
        }
        let left = timeout.saturating_sub(start.elapsed());
        if left.is_zero() {
            return false;
        }
        let step = opts.poll.map_or(left, |p| p.min(left));
        signals.wait(Some(step));
    }
}

/// Ends every process still running after the command: SIGTERM (with SIGHUP
/// for shells that ignore SIGTERM, and SIGCONT for stopped processes), a
/// short grace period, then SIGKILL. Returns at once when nothing is left.
pub fn terminate_rest(scope: Scope, signals: &Signals, opts: &Options) {
    if !send(scope, &[libc::SIGTERM, libc::SIGHUP, libc::SIGCONT]) {
        let mut ignored = None;
        reap(0, &mut ignored);
        return;
    }
    if wait_gone(signals, GRACE, opts) {
        return;
    }
    send(scope, &[libc::SIGKILL]);
    if !wait_gone(signals, KILL_WAIT, opts) {
        crate::warning!("some processes did not exit after SIGKILL");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn spec(argv: &[&str]) -> CommandSpec {
        CommandSpec {
            argv: argv.iter().map(OsString::from).collect(),
            env: vec![(
                "PATH".into(),
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
            )],
            creds: None,
            ctty: false,
            cwd: None,
        }
    }

    #[test]
    fn exit_code_mapping() {
        // Encodings as the kernel makes them: exited = code << 8,
        // killed = signal number (| 0x80 with a core dump).
        assert_eq!(exit_code(0), 0);
        assert_eq!(exit_code(3 << 8), 3);
        assert_eq!(exit_code(255 << 8), 255);
        assert_eq!(exit_code(libc::SIGKILL), 137);
        assert_eq!(exit_code(libc::SIGTERM), 143);
        assert_eq!(exit_code(libc::SIGSEGV | 0x80), 139);
        // Stopped (0x7f) is not an exit.
        assert_eq!(exit_code(0x137f), 255);
    }

    fn run(spec: &CommandSpec, signals: &Signals, opts: &Options) -> Outcome {
        match spawn(spec) {
            Ok(pid) => {
                let outcome = supervise(Some(pid), signals, opts);
                terminate_rest(Scope::Group(pid), signals, opts);
                outcome
            }
            Err(e) => Outcome::Exited(e.status),
        }
    }

    /// A command whose exec fails while the reaper runs (in the guest:
    /// PID 1's main thread, while an agent session starts a command that
    /// is not found): std's spawn reaps that child itself and panics if
    /// it is gone, which would take init and the VM down.
    #[test]
    fn failed_execs_racing_the_reaper() {
        let _serial = crate::TEST_CHILDREN.lock();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reaper = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    reap(0, &mut None);
                }
            })
        };
        let spawned = std::panic::catch_unwind(|| {
            for _ in 0..300 {
                let err = spawn_child(&spec(&["/no/such/vmlab-cmd"]), None).unwrap_err();
                assert_eq!(err.status, 127);
            }
        });
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        reaper.join().unwrap();
        assert!(spawned.is_ok(), "spawn panicked racing the reaper");
    }

    /// All cases that start processes are in this one test: `waitpid(-1)`
    /// reaps any child of the test process, so two such tests running in
    /// parallel threads would steal each other's children.
    #[test]
    fn runs_commands_like_pid1_would() {
        let _serial = crate::TEST_CHILDREN.lock();
        // Make orphans (the `sleep` below) our children, as they would be
        // PID 1's in the guest, so their reaping is tested too.
        // SAFETY: prctl with integer arguments only.
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        let signals = Signals::block().expect("block signals");
        let opts = Options {
            poll: Some(Duration::from_millis(20)),
        };

        assert_eq!(
            run(&spec(&["sh", "-c", "exit 3"]), &signals, &opts),
            Outcome::Exited(3)
        );
        assert_eq!(run(&spec(&["true"]), &signals, &opts), Outcome::Exited(0));
        assert_eq!(
            run(&spec(&["sh", "-c", "kill -9 $$"]), &signals, &opts),
            Outcome::Exited(137)
        );
        let err = spawn(&spec(&["no-such-command-vmlab"])).unwrap_err();
        assert_eq!(err.status, 127);
        assert_eq!(err.message, "no-such-command-vmlab: not found");
        assert_eq!(
            run(&spec(&["/no/such/dir/cmd"]), &signals, &opts),
            Outcome::Exited(127)
        );

        // Found but not executable: 126.
        let dir = std::env::temp_dir().join(format!("vmlab-init-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("not-executable");
        std::fs::write(&file, "#!/bin/sh\nexit 0\n").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = spawn(&spec(&[file.to_str().unwrap()])).unwrap_err();
        assert_eq!(err.status, 126);
        assert!(
            err.message.ends_with(": Permission denied"),
            "{}",
            err.message
        );
        // A directory is not executable either.
        assert_eq!(
            run(&spec(&[dir.to_str().unwrap()]), &signals, &opts),
            Outcome::Exited(126)
        );
        std::fs::remove_dir_all(&dir).unwrap();

        // The environment is exactly the one given.
        let mut s = spec(&["sh", "-c", "test \"$FOO\" = bar && test -z \"$CARGO\""]);
        s.env.push(("FOO".into(), "bar".into()));
        assert_eq!(run(&s, &signals, &opts), Outcome::Exited(0));

        // The command starts with no blocked signals (init blocks some) and
        // SIGPIPE at its default action (std ignores it in init).
        assert_eq!(
            run(
                &spec(&["grep", "-q", "^SigBlk:[[:space:]]*0*$", "/proc/self/status"]),
                &signals,
                &opts
            ),
            Outcome::Exited(0)
        );
        assert_eq!(
            run(&spec(&["sh", "-c", "kill -PIPE $$"]), &signals, &opts),
            Outcome::Exited(128 + libc::SIGPIPE as u8)
        );

        // The command runs in its own session.
        assert_eq!(
            run(
                &spec(&["sh", "-c", "test \"$(cut -d' ' -f6 /proc/$$/stat)\" = $$"]),
                &signals,
                &opts
            ),
            Outcome::Exited(0)
        );

        // A background process left behind is terminated and reaped quickly
        // (it dies on SIGTERM, so no grace period is waited out).
        let start = Instant::now();
        assert_eq!(
            run(&spec(&["sh", "-c", "sleep 100 & exit 5"]), &signals, &opts),
            Outcome::Exited(5)
        );
        assert!(start.elapsed() < GRACE, "took {:?}", start.elapsed());
        let mut none = None;
        assert!(!reap(0, &mut none), "a child was left behind");

        // One that ignores SIGTERM and SIGHUP gets SIGKILL after the grace.
        let start = Instant::now();
        assert_eq!(
            run(
                &spec(&[
                    "sh",
                    "-c",
                    "(trap '' TERM HUP; sleep 100) & sleep 0.2; exit 7"
                ]),
                &signals,
                &opts
            ),
            Outcome::Exited(7)
        );
        assert!(start.elapsed() >= GRACE, "took {:?}", start.elapsed());
        assert!(!reap(0, &mut none), "a child was left behind");
    }
}
