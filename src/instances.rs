//! The named-VM commands: `vmlab run --detach` (daemonizing the VMM and
//! waiting for its guest agent), `exec`, `ps`, `logs`, `kill`, `stop`,
//! `rm`. The state directory is [`crate::named`]; the agent client is
//! [`crate::agent`].

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::agent::{self, ExecRequest, Message, WinSize};
use crate::named::{self, Owner, Paths, Probe};

/// How long a control request or an exec's connection may take to be
/// accepted by the guest.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How often waiting loops look again.
const POLL: Duration = Duration::from_millis(50);
/// After a guest power-off request, how long the VMM gets to end.
const POWEROFF_WAIT: Duration = Duration::from_secs(15);
/// After SIGTERM to the VMM (it flushes its disks and exits), how long
/// before SIGKILL.
const TERM_WAIT: Duration = Duration::from_secs(5);

/// A failed command, as one line for the user.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// State directory.
    #[error(transparent)]
    Named(#[from] named::Error),
    /// Guest agent.
    #[error(transparent)]
    Agent(#[from] agent::Error),
    /// Something else, said in words.
    #[error("{0}")]
    Other(String),
}

impl Error {
    /// The exit status for this error (the agent's 126/127 for exec).
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Agent(e) => e.exit_code(),
            _ => agent::EXIT_FAILURE,
        }
    }
}

fn pid_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: kill with signal 0 only checks for existence.
    unsafe { libc::kill(pid, 0) == 0 }
}

/// Sends `sig` to process `pid`; whether it was delivered. Pid 0 (which
/// kill(2) takes as "my process group") and pids beyond `pid_t` are not
/// signalled.
pub fn signal_pid(pid: u32, sig: libc::c_int) -> bool {
    match libc::pid_t::try_from(pid) {
        // SAFETY: kill has no memory effects.
        Ok(pid) if pid > 0 => unsafe { libc::kill(pid, sig) == 0 },
        _ => false,
    }
}

/// Waits until VM `name` is gone (its state directory removed, or stale
/// and then removed by us) and its VMM process `pid` has exited, at most
/// `timeout`. Returns whether it is gone.
fn wait_gone(root: &Path, name: &str, pid: Option<u32>, timeout: Duration) -> Result<bool, Error> {
    let deadline = Instant::now() + timeout;
    loop {
        let dir_gone = match named::probe(root, name)? {
            Probe::Missing => true,
            Probe::Stale(stale) => {
                stale.remove()?;
                true
            }
            Probe::Running(_) => false,
        };
        if dir_gone && !pid.is_some_and(pid_alive) {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        std::thread::sleep(POLL);
    }
}

/// `vmlab exec` (also the file an OCI exec process reads,
/// [`crate::oci::process`]).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ExecOptions {
    /// The VM.
    pub name: String,
    /// The command.
    pub command: Vec<String>,
    /// `KEY=VALUE`s.
    pub env: Vec<String>,
    /// Working directory.
    pub workdir: Option<String>,
    /// `uid[:gid]`.
    pub user: Option<String>,
    /// Forward stdin.
    pub interactive: bool,
    /// Allocate a terminal.
    pub tty: bool,
}

/// `vmlab exec`: the command's exit status.
pub fn exec(root: &Path, opts: ExecOptions) -> Result<u8, Error> {
    let paths = named::running(root, &opts.name)?;
    let tty = opts.tty.then(|| {
        agent::terminal_size(libc::STDOUT_FILENO)
            .filter(|s| s.rows > 0 && s.cols > 0)
            .unwrap_or(WinSize { rows: 24, cols: 80 })
    });
    let req = ExecRequest {
        argv: opts.command.into_iter().map(String::into_bytes).collect(),
        env: opts.env.into_iter().map(String::into_bytes).collect(),
        cwd: opts.workdir.map(String::into_bytes),
        user: opts.user,
        tty,
        stdin: opts.interactive,
    };
    // Raw mode only when a terminal is asked for and stdin is one; restored
    // on drop.
    let raw = match opts.tty {
        true => crate::terminal::RawMode::enable(io::stdin().as_raw_fd()),
        false => None,
    };
    let status = agent::exec(&paths.vsock(), req, CONNECT_TIMEOUT);
    drop(raw);
    Ok(status?)
}

/// `vmlab kill NAME SIGNAL`.
pub fn kill(root: &Path, name: &str, signal: u8) -> Result<(), Error> {
    let paths = named::running(root, name)?;
    agent::request(&paths.vsock(), &Message::KillMain(signal), CONNECT_TIMEOUT)?;
    Ok(())
}

/// `vmlab stop NAME --timeout S`: SIGTERM to the main process and up to
/// `timeout` for the VM to end (it ends when its main process does), then
/// a guest power-off (everything gets SIGTERM, then SIGKILL, the disks are
/// synced), then SIGTERM to the VMM (which flushes its disks and exits),
/// then SIGKILL. Nothing of the VM is left when it returns Ok.
pub fn stop(root: &Path, name: &str, timeout: Duration) -> Result<(), Error> {
    let paths = named::running(root, name)?;
    let pid = paths.read_pid();
    let socket = paths.vsock();
    match agent::request(
        &socket,
        &Message::KillMain(libc::SIGTERM as u8),
        CONNECT_TIMEOUT,
    ) {
        Ok(()) => {
            if wait_gone(root, name, pid, timeout)? {
                return Ok(());
            }
        }
        // No main process (an agent-only VM), or an agent that does not
        // answer: go on with the power-off.
        Err(e) => log::debug!("stop {name}: SIGTERM to the main process: {e}"),
    }
    match agent::request(&socket, &Message::PowerOff, CONNECT_TIMEOUT) {
        // Sent: the guest may end before its answer gets out, which looks
        // like a closed connection. Wait either way.
        Ok(()) | Err(agent::Error::Closed | agent::Error::Io(_)) => {
            if wait_gone(root, name, pid, POWEROFF_WAIT)? {
                return Ok(());
            }
        }
        Err(e) => log::debug!("stop {name}: power-off: {e}"),
    }
    let Some(pid) = pid else {
        return Err(Error::Other(format!(
            "VM {name} did not stop and its pid is unknown"
        )));
    };
    log::warn!("VM {name} did not power off: stopping its VMM (pid {pid})");
    signal_pid(pid, libc::SIGTERM);
    if wait_gone(root, name, Some(pid), TERM_WAIT)? {
        return Ok(());
    }
    signal_pid(pid, libc::SIGKILL);
    match wait_gone(root, name, Some(pid), TERM_WAIT)? {
        true => Ok(()),
        false => Err(Error::Other(format!(
            "VM {name}: its VMM (pid {pid}) survived SIGKILL"
        ))),
    }
}

/// `vmlab rm [-f] NAME`.
pub fn rm(root: &Path, name: &str, force: bool) -> Result<(), Error> {
    named::validate_name(name)?;
    match named::probe(root, name)? {
        Probe::Missing => Err(named::Error::NoSuchVm(name.to_string()).into()),
        Probe::Stale(stale) => Ok(stale.remove()?),
        Probe::Running(paths) if !force => Err(Error::Other(format!(
            "VM {name} is running (pid {}): stop it first, or use rm -f",
            paths.read_pid().map_or("?".into(), |p| p.to_string())
        ))),
        Probe::Running(paths) => {
            let pid = paths.read_pid();
            if let Some(pid) = pid {
                signal_pid(pid, libc::SIGKILL);
            }
            match wait_gone(root, name, pid, TERM_WAIT)? {
                true => Ok(()),
                false => Err(Error::Other(format!("VM {name} did not go away"))),
            }
        }
    }
}

fn human_duration(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        _ => format!("{}h", s / 3600),
    }
}

/// `vmlab ps`: one line per running VM. Stale state (a VMM that died) is
/// removed and reported on stderr.
pub fn ps(root: &Path, out: &mut impl Write) -> Result<(), Error> {
    let mut rows = vec![[
        "NAME".to_string(),
        "STATE".into(),
        "PID".into(),
        "UPTIME".into(),
        "RSS".into(),
        "PSS".into(),
        "COMMAND".into(),
    ]];
    for name in named::names(root)? {
        let paths = match named::probe(root, &name)? {
            Probe::Missing => continue,
            Probe::Stale(stale) => {
                eprintln!("vmlab: removed the state of VM {name}: its VMM is gone");
                stale.remove()?;
                continue;
            }
            Probe::Running(paths) => paths,
        };
        let record = paths.read_record();
        let pid = paths.read_pid();
        let mib = |b: u64| format!("{:.1}M", b as f64 / (1 << 20) as f64);
        let (rss, pss) = pid
            .and_then(named::memory)
            .map_or(("?".into(), "?".into()), |(r, p)| (mib(r), mib(p)));
        rows.push([
            name,
            "running".into(),
            pid.map_or("?".into(), |p| p.to_string()),
            record
                .as_ref()
                .map_or("?".into(), |r| human_duration(named::now() - r.created)),
            rss,
            pss,
            record.map_or(String::new(), |r| r.command.join(" ")),
        ]);
    }
    let widths: Vec<usize> = (0..7)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    for row in rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i == 6 {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}  ", w = widths[i]));
            }
        }
        let _ = writeln!(out, "{}", line.trim_end());
    }
    Ok(())
}

/// `vmlab logs [-f] NAME`: the console log (of a running VM, or of one
/// whose VMM died, which is then removed); `-f` follows it until the VM
/// stops.
pub fn logs(root: &Path, name: &str, follow: bool, out: &mut impl Write) -> Result<(), Error> {
    named::validate_name(name)?;
    let (paths, stale) = match named::probe(root, name)? {
        Probe::Missing => return Err(named::Error::NoSuchVm(name.to_string()).into()),
        Probe::Running(paths) => (paths, None),
        Probe::Stale(stale) => (stale.paths.clone(), Some(stale)),
    };
    let path = paths.console();
    let mut file =
        File::open(&path).map_err(|e| Error::Other(format!("{}: {e}", path.display())))?;
    let mut buf = vec![0u8; 64 * 1024];
    let copy = |file: &mut File, out: &mut dyn Write, buf: &mut [u8]| -> io::Result<()> {
        loop {
            match file.read(buf)? {
                0 => return out.flush(),
                n => out.write_all(&buf[..n])?,
            }
        }
    };
    let failed = |e: io::Error| Error::Other(format!("{}: {e}", path.display()));
    copy(&mut file, out, &mut buf).map_err(failed)?;
    if let Some(stale) = stale {
        stale.remove()?;
        return Ok(());
    }
    if follow {
        // The open file stays readable after the directory is removed.
        loop {
            std::thread::sleep(Duration::from_millis(200));
            copy(&mut file, out, &mut buf).map_err(failed)?;
            if !matches!(named::probe(root, name)?, Probe::Running(_)) {
                copy(&mut file, out, &mut buf).map_err(failed)?;
                return Ok(());
            }
        }
    }
    Ok(())
}

/// The last `max` bytes of a file (for "why did it not start").
fn tail(file: &mut File, max: u64) -> String {
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(max)));
    let mut s = Vec::new();
    let _ = file.read_to_end(&mut s);
    String::from_utf8_lossy(&s).into_owned()
}

/// What [`daemonize`] returns in each process.
pub enum Forked {
    /// The original process, with the VMM's pid.
    Parent,
    /// The detached VMM (new session, stdin /dev/null, stdout and stderr
    /// to the console log).
    Daemon,
}

/// Double fork: the VMM runs in a new session, not a child of the caller,
/// with stdin from /dev/null and stdout and stderr to `log`. Must be called
/// while the process has one thread.
pub fn daemonize(log: &Path) -> Result<Forked, Error> {
    let log = File::options()
        .append(true)
        .open(log)
        .map_err(|e| Error::Other(format!("{}: {e}", log.display())))?;
    let null = File::open("/dev/null").map_err(|e| Error::Other(format!("/dev/null: {e}")))?;
    let _ = io::stdout().flush();
    let _ = io::stderr().flush();
    // SAFETY: the process is single-threaded here (the caller's promise),
    // so the child may run arbitrary code after fork.
    match unsafe { libc::fork() } {
        -1 => Err(Error::Other(format!(
            "fork: {}",
            io::Error::last_os_error()
        ))),
        0 => {
            // SAFETY: setsid, fork, dup2 and _exit take integer arguments;
            // the intermediate child is single-threaded.
            unsafe {
                libc::setsid();
                match libc::fork() {
                    -1 => libc::_exit(1),
                    0 => {}
                    _ => libc::_exit(0),
                }
                libc::dup2(null.as_raw_fd(), 0);
                libc::dup2(log.as_raw_fd(), 1);
                libc::dup2(log.as_raw_fd(), 2);
            }
            Ok(Forked::Daemon)
        }
        child => {
            let mut status = 0;
            // SAFETY: status is a valid out pointer; child is our child.
            unsafe { libc::waitpid(child, &mut status, 0) };
            Ok(Forked::Parent)
        }
    }
}

/// In the parent of [`daemonize`]: waits until the guest agent of VM
/// `name` answers, at most `timeout`. On failure the VM is stopped, its
/// state removed, and the error says why (with the end of its console).
pub fn wait_ready(root: &Path, name: &str, timeout: Duration) -> Result<(), Error> {
    let paths = Paths::new(root, name);
    // Opened now: it stays readable if the VMM removes the directory.
    let mut console = File::open(paths.console()).ok();
    let why = |console: &mut Option<File>, what: String| {
        let log = console.as_mut().map(|f| tail(f, 2000)).unwrap_or_default();
        let log = log.trim_end();
        match log.is_empty() {
            true => Error::Other(what),
            false => Error::Other(format!("{what}; the end of its console:\n{log}")),
        }
    };
    let deadline = Instant::now() + timeout;
    loop {
        match named::probe(root, name)? {
            Probe::Running(_) => {}
            Probe::Missing => {
                return Err(why(
                    &mut console,
                    format!("VM {name} ended while it booted"),
                ))
            }
            Probe::Stale(stale) => {
                stale.remove()?;
                return Err(why(
                    &mut console,
                    format!("the VMM of {name} died while it booted"),
                ));
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            let pid = paths.read_pid();
            if let Some(pid) = pid {
                signal_pid(pid, libc::SIGKILL);
            }
            wait_gone(root, name, pid, TERM_WAIT)?;
            return Err(why(
                &mut console,
                format!(
                    "the guest agent of VM {name} did not answer within {} s; the VM was stopped",
                    timeout.as_secs()
                ),
            ));
        }
        if paths.vsock().exists() {
            match agent::request(
                &paths.vsock(),
                &Message::Ping,
                left.min(Duration::from_secs(2)),
            ) {
                Ok(()) => return Ok(()),
                Err(e) => log::debug!("waiting for the agent of {name}: {e}"),
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Takes `name` for a VM about to start and writes its console log file.
pub fn create(root: &Path, name: &str) -> Result<Owner, Error> {
    let owner = Owner::create(root, name)?;
    let log = owner.paths.console();
    File::create(&log).map_err(|e| Error::Other(format!("{}: {e}", log.display())))?;
    Ok(owner)
}

/// The record of a VM just started by this process.
pub fn record(owner: &Owner, mut record: named::Record) -> Result<(), Error> {
    record.pid = std::process::id();
    record.vsock = owner.paths.vsock();
    record.console = owner.paths.console();
    Ok(owner.write(&record)?)
}

/// The vsock socket path of a VM's state directory (for --vsock).
pub fn vsock_path(owner: &Owner) -> PathBuf {
    owner.paths.vsock()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vmlab-inst-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn record(name: &str) -> named::Record {
        named::Record {
            name: name.into(),
            pid: 0,
            created: named::now() - 90.0,
            kernel: "k".into(),
            memory: 128 << 20,
            cpus: 1,
            command: vec!["sh".into(), "-c".into(), "sleep 1".into()],
            cid: 3,
            vsock: PathBuf::new(),
            console: PathBuf::new(),
        }
    }

    /// ps lists a VM whose lock is held (here by this process, standing in
    /// for its VMM) and removes one whose holder is gone; logs prints the
    /// console of either.
    #[test]
    fn ps_and_logs_from_the_state_directory() {
        let root = root("ps");
        let live = create(&root, "live").unwrap();
        super::record(&live, record("live")).unwrap();
        std::fs::write(live.paths.console(), "booted\n").unwrap();
        let dead = create(&root, "dead").unwrap();
        super::record(&dead, record("dead")).unwrap();
        std::fs::write(dead.paths.console(), "last words\n").unwrap();
        drop(dead);

        let mut out = Vec::new();
        logs(&root, "dead", false, &mut out).unwrap();
        assert_eq!(out, b"last words\n");
        // Printed once, then removed as stale.
        assert!(!root.join("dead").exists());

        let dead = create(&root, "dead").unwrap();
        drop(dead);
        let mut out = Vec::new();
        ps(&root, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(lines[0].starts_with("NAME"), "{text}");
        let cols: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(
            cols[..4],
            ["live", "running", &std::process::id().to_string(), "90s"]
        );
        assert!(cols[4].ends_with('M') && cols[5].ends_with('M'), "{text}");
        assert_eq!(cols[6..], ["sh", "-c", "sleep", "1"]);
        assert!(!root.join("dead").exists(), "stale state kept");

        let mut out = Vec::new();
        logs(&root, "live", false, &mut out).unwrap();
        assert_eq!(out, b"booted\n");
        assert!(matches!(
            logs(&root, "nope", false, &mut Vec::new()),
            Err(Error::Named(named::Error::NoSuchVm(_)))
        ));
        // A running VM is not removed without -f.
        let e = rm(&root, "live", false).unwrap_err();
        assert!(e.to_string().contains("is running"), "{e}");
        live.remove().unwrap();
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn durations() {
        assert_eq!(human_duration(0.4), "0s");
        assert_eq!(human_duration(119.0), "119s");
        assert_eq!(human_duration(600.0), "10m");
        assert_eq!(human_duration(7300.0), "2h");
        assert_eq!(human_duration(-3.0), "0s");
    }
}
