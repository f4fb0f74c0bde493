//! Host processes for guest processes: the terminal given to the engine
//! (`--console-socket`) and `exec`.
//!
//! With `process.terminal`, the runtime makes a pty, sends the master to
//! the engine over `--console-socket` with SCM_RIGHTS (as runc does, the
//! pty's name as the message), and the host process (the monitor, or an
//! exec process) gets the slave as stdin, stdout, stderr and controlling
//! terminal. The engine resizes the master; the kernel sends SIGWINCH to
//! the slave's foreground process, and vmlab's agent client turns that into
//! a RESIZE for the guest's pty (docs/AGENT.md).
//!
//! An exec is `vmlab-runtime __exec DIR FILE`: a host process that waits
//! for the guest agent, runs the process there (`vmlab exec`'s code) with
//! its own stdio and exits with the guest process's status, which is what
//! the shim reaps from the exec's `--pid-file`.

use std::ffi::CStr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use super::{Error, Result};
use crate::instances::ExecOptions;

/// A pty pair.
pub struct Pty {
    /// The master (for the engine).
    pub master: OwnedFd,
    /// The slave (the process's stdio).
    pub slave: OwnedFd,
    /// The slave's path.
    pub name: String,
}

/// Opens a new pty pair.
pub fn open_pty() -> Result<Pty> {
    let err = |what: &str| Error::io(what.to_string())(std::io::Error::last_os_error());
    // SAFETY: posix_openpt returns a new fd or -1.
    let m = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
    if m < 0 {
        return Err(err("posix_openpt"));
    }
    // SAFETY: m is a new fd owned by nobody else.
    let master = unsafe { OwnedFd::from_raw_fd(m) };
    // SAFETY: grantpt/unlockpt on the master fd we own.
    if unsafe { libc::grantpt(m) } != 0 || unsafe { libc::unlockpt(m) } != 0 {
        return Err(err("unlockpt"));
    }
    let mut buf = [0 as libc::c_char; 128];
    // SAFETY: ptsname_r writes at most buf.len() bytes, NUL-terminated.
    if unsafe { libc::ptsname_r(m, buf.as_mut_ptr(), buf.len()) } != 0 {
        return Err(err("ptsname_r"));
    }
    // SAFETY: ptsname_r succeeded: buf holds a NUL-terminated string.
    let name = unsafe { CStr::from_ptr(buf.as_ptr()) };
    // SAFETY: open of a NUL-terminated path; a new fd or -1.
    let s = unsafe {
        libc::open(
            name.as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    };
    if s < 0 {
        return Err(err("open the pty slave"));
    }
    // SAFETY: s is a new fd owned by nobody else.
    let slave = unsafe { OwnedFd::from_raw_fd(s) };
    Ok(Pty {
        master,
        slave,
        name: name.to_string_lossy().into_owned(),
    })
}

/// Sends the pty master to the engine's `--console-socket`.
pub fn send_console(socket: &Path, pty: &Pty) -> Result<()> {
    use vmm_sys_util::sock_ctrl_msg::ScmSocket;
    let s = UnixStream::connect(socket).map_err(Error::io(format!(
        "connect to --console-socket {}",
        socket.display()
    )))?;
    s.send_with_fd(pty.name.as_bytes(), pty.master.as_raw_fd())
        .map_err(|e| Error::msg(format!("send the console to {}: {e}", socket.display())))?;
    Ok(())
}

/// A new pty whose master goes to `socket` (`--console-socket`), when
/// one is asked for: `None` without a socket.
pub fn console(socket: Option<&Path>) -> Result<Option<Pty>> {
    let Some(socket) = socket else {
        return Ok(None);
    };
    let pty = open_pty()?;
    send_console(socket, &pty)?;
    Ok(Some(pty))
}

/// For `pre_exec`: a new session, with `terminal` (a pty slave) as its
/// controlling terminal and stdio when given ([`attach_terminal`]).
/// Async-signal-safe calls only.
pub fn new_session(terminal: Option<i32>) -> std::io::Result<()> {
    match terminal {
        Some(fd) => attach_terminal(fd),
        // SAFETY: setsid has no memory effects.
        None => match unsafe { libc::setsid() } {
            -1 => Err(std::io::Error::last_os_error()),
            _ => Ok(()),
        },
    }
}

/// Makes `fd` stdin, stdout, stderr and the controlling terminal of the
/// calling process, in a new session. For `pre_exec`: async-signal-safe
/// calls only.
pub fn attach_terminal(fd: i32) -> std::io::Result<()> {
    // SAFETY: setsid, ioctl and dup2 on fds this process has; no memory
    // effects beyond the fd table.
    unsafe {
        if libc::setsid() < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if libc::ioctl(fd, libc::TIOCSCTTY, 0) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        for target in 0..3 {
            if libc::dup2(fd, target) < 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    Ok(())
}

/// The exec for an OCI `process` JSON (`exec --process FILE`) in VM `vm`:
/// what the `__exec` process reads from its file. Its stdin is always
/// forwarded (the engine gives /dev/null without `-i`).
pub fn exec_options(vm: &str, p: &oci_spec::runtime::Process) -> Result<ExecOptions> {
    let args = p.args().clone().unwrap_or_default();
    if args.is_empty() || args[0].is_empty() {
        return Err(Error::msg("the process has no args"));
    }
    let workdir = p
        .cwd()
        .to_str()
        .filter(|c| !c.is_empty())
        .map(str::to_string);
    Ok(ExecOptions {
        name: vm.to_string(),
        command: args,
        env: p.env().clone().unwrap_or_default(),
        workdir,
        user: Some(format!("{}:{}", p.user().uid(), p.user().gid())),
        interactive: true,
        tty: p.terminal().unwrap_or(false),
    })
}

/// How long an exec waits for a booting guest's agent.
const AGENT_WAIT: Duration = Duration::from_secs(120);

/// The `__exec` process: runs `spec` in the guest, returns its status.
pub fn exec_main(spec_file: &Path) -> u8 {
    let opts: ExecOptions = match std::fs::read(spec_file)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
    {
        Ok(o) => o,
        Err(e) => {
            eprintln!("vmlab-runtime: exec: {}: {e}", spec_file.display());
            return 125;
        }
    };
    let _ = std::fs::remove_file(spec_file);
    let root = Path::new(super::state::VM_ROOT);
    if let Err(e) = wait_for_agent(root, &opts.name, AGENT_WAIT) {
        eprintln!("vmlab-runtime: exec: {e}");
        return 125;
    }
    match crate::instances::exec(root, opts) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vmlab-runtime: exec: {e}");
            e.exit_code()
        }
    }
}

/// Waits until the agent of VM `vm` answers a ping, at most `timeout`.
pub fn wait_for_agent(root: &Path, vm: &str, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let socket = crate::named::Paths::new(root, vm).vsock();
    let mut last = String::from("its VM has not started");
    while Instant::now() < deadline {
        if socket.exists() {
            match crate::agent::request(
                &socket,
                &vmlab_agent_proto::Message::Ping,
                Duration::from_secs(2),
            ) {
                Ok(()) => return Ok(()),
                Err(e) => last = e.to_string(),
            }
        }
        match crate::named::probe(root, vm) {
            Ok(crate::named::Probe::Running(_)) | Ok(crate::named::Probe::Missing) => {}
            Ok(crate::named::Probe::Stale(_)) => {
                return Err(Error::msg("the container's VM has stopped"))
            }
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(Error::msg(format!(
        "the guest agent did not answer within {} s ({last})",
        timeout.as_secs()
    )))
}
