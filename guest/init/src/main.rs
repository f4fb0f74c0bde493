//! `vmlab-init`: PID 1 of vmlab guests.
//!
//! It sets up the minimum a command expects (pseudo filesystems, console,
//! hostname, loopback, the root and the virtio-fs shares it was given),
//! runs the command the VMM put on the kernel command line (`vmlab.*`
//! parameters, see [`cmdline`]), acts as the reaper of all orphans while it
//! runs, and reports its exit status to the VMM through the
//! vmlab status device (see [`status`]) before rebooting, which ends the VM.
//!
//! It is a single static binary with no shell in the boot path because in
//! this project's test guests every system call costs ~0.4 ms and every
//! fork+exec ~0.4 s: init makes a few dozen system calls and exactly one
//! fork+exec (the command).
//!
//! Exit statuses follow docker: the command's own status, 128+N if killed by
//! signal N, 127 if it was not found (or the `vmlab.*` parameters are
//! malformed, or a virtio-fs share, a file bind or a tmpfs could not be
//! mounted, or the root share not made the root),
//! 126 if it could not be executed, 125 if init itself failed.

mod agent;
mod cmdline;
mod console;
mod dns;
mod mounts;
mod status;
mod supervise;
mod user;

use std::ffi::OsString;
use std::io::{self, Read};
use std::os::unix::ffi::OsStringExt;
use std::path::Path;

use status::{Event, StatusPort};
use supervise::{CommandSpec, Options, Outcome, Scope, Signals};

/// Prints `vmlab-init: <message>` on the console.
macro_rules! error {
    ($($arg:tt)*) => { $crate::console::log_line(&format!($($arg)*)) };
}
/// Prints `vmlab-init: warning: <message>` on the console.
macro_rules! warning {
    ($($arg:tt)*) => {
        $crate::console::log_line(&format!("warning: {}", format_args!($($arg)*)))
    };
}
pub(crate) use {error, warning};

/// Serializes the tests that start and reap processes: `waitpid(-1)`
/// takes any child of the test process.
#[cfg(test)]
static TEST_CHILDREN: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Status for init's own failures (docker's 125).
pub const EXIT_INIT_FAILURE: u8 = 125;
/// Status for malformed `vmlab.*` parameters, and for a virtio-fs share
/// that cannot be mounted or made the root (nothing could be run: 127).
const EXIT_BAD_CMDLINE: u8 = 127;

const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const HOSTNAME: &str = "vmlab";
/// TERM when the host side is a terminal. vt100 rather than linux: the host
/// terminal is an xterm-like emulator, not the Linux VGA console, and every
/// terminfo database has vt100.
const TTY_TERM: &str = "vt100";
/// The shell run when no command is given.
const DEFAULT_SHELL: &str = "/bin/sh";

/// An OS error as its bare errno text ("No such file or directory"), without
/// std's " (os error 2)" suffix, for `vmlab-init: <what>: <errno text>`.
pub fn errno_text(err: &io::Error) -> String {
    let text = err.to_string();
    match text.rfind(" (os error ") {
        Some(i) => text[..i].to_string(),
        None => text,
    }
}

/// The host name `vmlab.hostname` set, if any (for the commands'
/// `HOSTNAME`, the agent's too).
static HOSTNAME_SET: std::sync::OnceLock<OsString> = std::sync::OnceLock::new();

/// The command's environment: a fixed base, then `vmlab.env` (which may
/// override any of it). Nothing comes from init's own environment, which
/// holds whatever the kernel passed (TERM=linux, HOME=/, stray parameters).
fn build_env(extra: &[(OsString, OsString)], tty: bool, home: &Path) -> Vec<(OsString, OsString)> {
    let mut env: Vec<(OsString, OsString)> = vec![
        ("PATH".into(), PATH.into()),
        ("HOME".into(), home.as_os_str().to_owned()),
        (
            "HOSTNAME".into(),
            HOSTNAME_SET
                .get()
                .cloned()
                .unwrap_or_else(|| HOSTNAME.into()),
        ),
    ];
    if tty {
        env.push(("TERM".into(), TTY_TERM.into()));
    }
    for (key, value) in extra {
        match env.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value.clone(),
            None => env.push((key.clone(), value.clone())),
        }
    }
    env
}

/// Reads a file that may legitimately be missing (`/etc/passwd` in a minimal
/// image): `Ok(None)` if it does not exist.
fn read_optional(path: &str) -> io::Result<Option<String>> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(String::from_utf8_lossy(&bytes).into_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn resolve_user(spec: &user::UserSpec) -> Result<user::Creds, String> {
    let read = |path: &str| read_optional(path).map_err(|e| format!("{path}: {}", errno_text(&e)));
    // Numeric uid:gid needs no files, but supplementary groups and HOME do,
    // as with docker; the reads cost a few system calls only when
    // vmlab.user is given.
    let passwd = read("/etc/passwd")?;
    let group = read("/etc/group")?;
    user::resolve(spec, passwd.as_deref(), group.as_deref())
}

fn read_cmdline() -> io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(4096);
    std::fs::File::open("/proc/cmdline")?.read_to_end(&mut buf)?;
    Ok(buf)
}

/// Steps 2 to 5: parse the parameters, prepare and run the command. Returns
/// how it ended; every failure is reported on the console here. `mounted`:
/// the top-level pseudo file systems, which go along if the root changes.
fn run(signals: &Signals, opts: &Options, mounted: &[&std::ffi::CStr]) -> Outcome {
    let raw = match read_cmdline() {
        Ok(raw) => raw,
        Err(e) => {
            error!("read /proc/cmdline: {}", errno_text(&e));
            return Outcome::Exited(EXIT_INIT_FAILURE);
        }
    };
    let cfg = match cmdline::parse(&raw) {
        Ok(cfg) => cfg,
        Err(e) => {
            error!("{e}");
            return Outcome::Exited(EXIT_BAD_CMDLINE);
        }
    };
    if cfg.quiet {
        // SYSLOG_ACTION_CONSOLE_LEVEL (8): only KERN_EMERG reaches the console.
        // SAFETY: this action does not touch the buffer argument.
        if unsafe { libc::klogctl(8, std::ptr::null_mut(), 1) } != 0 {
            warning!(
                "set console log level: {}",
                errno_text(&io::Error::last_os_error())
            );
        }
    }
    if let Err(e) = console::set_mode(cfg.tty) {
        warning!("set console mode: {}", errno_text(&e));
    }
    if let Some(name) = &cfg.hostname {
        if let Err(e) = mounts::set_hostname(name) {
            error!(
                "sethostname {}: {}",
                String::from_utf8_lossy(name),
                errno_text(&e)
            );
            return Outcome::Exited(EXIT_INIT_FAILURE);
        }
        let _ = HOSTNAME_SET.set(OsString::from_vec(name.clone()));
    }
    // The root first, then the shares (whose mount points may be created
    // in the root's writable layer): the user's files (/etc/passwd), the
    // working directory and the command itself may all live in them.
    if let Some(tag) = &cfg.root_fs {
        if let Err(e) = mounts::switch_root(tag, cfg.root_mode, mounted) {
            error!("cannot use virtio-fs share {tag} as the root: {e}");
            return Outcome::Exited(EXIT_BAD_CMDLINE);
        }
    }
    for v in &cfg.volumes {
        if let Err(e) = mounts::mount_volume(v) {
            error!(
                "cannot mount virtio-fs share {} at {}: {}",
                v.tag.to_string_lossy(),
                v.path.display(),
                errno_text(&e)
            );
            return Outcome::Exited(EXIT_BAD_CMDLINE);
        }
    }
    // Files of the shares just mounted (under /dev/.vmlab), then tmpfs
    // mounts, which may go over anything before them.
    for b in &cfg.binds {
        if let Err(e) = mounts::bind_file(b) {
            error!(
                "cannot bind-mount {} onto {}: {}",
                b.source.display(),
                b.path.display(),
                errno_text(&e)
            );
            return Outcome::Exited(EXIT_BAD_CMDLINE);
        }
    }
    for t in &cfg.tmpfs {
        if let Err(e) = mounts::mount_tmpfs(t) {
            error!(
                "cannot mount a tmpfs at {}: {}",
                t.path.display(),
                errno_text(&e)
            );
            return Outcome::Exited(EXIT_BAD_CMDLINE);
        }
    }
    let creds = match cfg.user.as_ref().map(resolve_user).transpose() {
        Ok(creds) => creds,
        Err(msg) => {
            error!("{msg}");
            return Outcome::Exited(EXIT_INIT_FAILURE);
        }
    };
    if let Some(dir) = &cfg.workdir {
        // Like docker, a missing working directory is created. The change is
        // made in init itself (its own cwd does not matter, all its paths are
        // absolute) so that a failure here is not mistaken for "command not
        // found" by the exec error mapping.
        if let Err(e) = std::fs::create_dir_all(dir).and_then(|()| std::env::set_current_dir(dir)) {
            error!("working directory {}: {}", dir.display(), errno_text(&e));
            return Outcome::Exited(EXIT_INIT_FAILURE);
        }
    }
    if cfg.agent {
        // Before the command starts, so that `vmlab run --detach` can
        // reach it while the command runs.
        agent::start();
        // Docker's embedded DNS, through the runtime's forwarder (vsock).
        dns::start_if_wanted();
        if cfg.cmd.is_none() {
            // Nothing to run but the agent: serve until powered off.
            return supervise::supervise(None, signals, opts);
        }
    }
    let home = creds
        .as_ref()
        .map_or_else(|| Path::new("/root").to_owned(), |c| c.home.clone());
    let spec = CommandSpec {
        argv: cfg
            .cmd
            .clone()
            .unwrap_or_else(|| vec![DEFAULT_SHELL.into()]),
        env: build_env(&cfg.env, cfg.tty, &home),
        creds: creds.map(|c| (c.uid, c.gid, c.groups)),
        // The console is the command's controlling terminal only when the
        // host side is a terminal (`vmlab.tty`: job control, Ctrl-C), as
        // with `docker run -t`. Otherwise it must not be: when a session
        // leader whose controlling terminal is not a pty exits, Linux hangs
        // that terminal up (disassociate_ctty -> tty_vhangup_session), and
        // the hangup flushes the UART's transmit buffer. With two vCPUs on
        // hardware-speed KVM, `echo hi`'s output was still in that buffer
        // (its THRE interrupt pending on the other vCPU) when echo exited,
        // and `vmlab run -- echo hi` printed nothing in 1 of 20 runs (the
        // SVM lane's tests/console.rs).
        ctty: cfg.tty,
        cwd: None,
    };
    match supervise::spawn(&spec) {
        Ok(pid) => {
            agent::set_main(pid);
            supervise::supervise(Some(pid), signals, opts)
        }
        Err(e) => {
            error!("{}", e.message);
            Outcome::Exited(e.status)
        }
    }
}

/// Step 5/6, the end: stop what is left, make the output and the disks
/// durable, tell the VMM, and reset the machine. Never returns.
fn finish(port: &StatusPort, signals: Option<&Signals>, opts: &Options, outcome: Outcome) -> ! {
    if let Some(signals) = signals {
        supervise::terminate_rest(Scope::Everything, signals, opts);
    }
    // The VMM stops the VM as soon as it sees the status: the output must
    // have left the UART and the data must be on the disks before that.
    console::drain();
    // SAFETY: sync has no memory effects.
    unsafe { libc::sync() };
    // Leave a disk root clean, as any init does at shutdown: remounting it
    // read-only commits the ext4 journal, so the image can later be
    // mounted from a read-only disk without recovery. Nothing to do (and
    // a harmless EINVAL/EBUSY) on an initramfs root.
    mounts::remount_root_readonly();
    match outcome {
        Outcome::Exited(code) => port.exit_status(code),
        Outcome::Shutdown(event) => port.event(event),
    }
    reboot()
}

/// Resets the machine (`reboot=k`: through the keyboard controller), so the
/// VM ends even under a VMM that ignores the status port. Never returns.
fn reboot() -> ! {
    // SAFETY: reboot takes an integer command; on success it does not return.
    unsafe { libc::reboot(libc::LINUX_REBOOT_CMD_RESTART) };
    error!("reboot: {}", errno_text(&io::Error::last_os_error()));
    loop {
        // SAFETY: pause only sleeps until a signal arrives.
        unsafe { libc::pause() };
    }
}

/// A panic (a bug: no code path is meant to panic) would abort init and
/// panic the kernel, and the VMM would never learn a status. Report 125 and
/// reset instead.
fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        error!("internal error: {info}");
        console::drain();
        // SAFETY: sync has no memory effects.
        unsafe { libc::sync() };
        status::exit_status_from_anywhere(EXIT_INIT_FAILURE);
        reboot();
    }));
}

fn main() {
    if std::process::id() != 1 {
        // Everything below (mounts, kill(-1), reboot) is only right for the
        // init of a VM.
        error!("must run as PID 1 (the init of a vmlab guest)");
        std::process::exit(EXIT_INIT_FAILURE.into());
    }
    // First, so that a shutdown request sent early is queued, not lost.
    let signals = Signals::block();
    // The top-level pseudo file systems that are mounted.
    let mut mounted = Vec::new();
    match mounts::mount_dev() {
        Ok(()) => mounted.push(mounts::DEV),
        Err(e) => warning!("mount devtmpfs on /dev: {}", errno_text(&e)),
    }
    let port = StatusPort::open();
    port.event(Event::Up);
    install_panic_hook();

    mounts::mount_rest(&mut mounted);
    if let Err(e) = mounts::set_hostname(HOSTNAME.as_bytes()) {
        warning!("sethostname {HOSTNAME}: {}", errno_text(&e));
    }
    mounts::loopback_up();

    let opts = Options::default();
    let outcome = match &signals {
        Ok(signals) => run(signals, &opts, &mounted),
        Err(e) => {
            error!("block signals: {}", errno_text(e));
            Outcome::Exited(EXIT_INIT_FAILURE)
        }
    };
    finish(&port, signals.as_ref().ok(), &opts, outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_text_strips_the_os_error_suffix() {
        let e = io::Error::from_raw_os_error(libc::ENOENT);
        assert_eq!(errno_text(&e), "No such file or directory");
        let e = io::Error::other("plain");
        assert_eq!(errno_text(&e), "plain");
    }

    #[test]
    fn environment() {
        let env = build_env(&[], true, Path::new("/root"));
        let get = |env: &[(OsString, OsString)], k: &str| {
            env.iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.to_string_lossy().into_owned())
        };
        assert_eq!(get(&env, "PATH").as_deref(), Some(PATH));
        assert_eq!(get(&env, "HOME").as_deref(), Some("/root"));
        assert_eq!(get(&env, "TERM").as_deref(), Some("vt100"));
        assert_eq!(get(&env, "HOSTNAME").as_deref(), Some("vmlab"));

        let extra = vec![
            ("PATH".into(), "/app/bin".into()),
            ("FOO".into(), "bar".into()),
        ];
        let env = build_env(&extra, false, Path::new("/home/app"));
        assert_eq!(get(&env, "PATH").as_deref(), Some("/app/bin"));
        assert_eq!(get(&env, "FOO").as_deref(), Some("bar"));
        assert_eq!(get(&env, "HOME").as_deref(), Some("/home/app"));
        assert_eq!(get(&env, "TERM"), None);
        // One entry per key.
        assert_eq!(env.iter().filter(|(k, _)| k == "PATH").count(), 1);
    }
}
