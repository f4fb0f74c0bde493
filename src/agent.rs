//! The host side of the guest agent (guest/init/src/agent.rs; protocol in
//! guest/agent-proto and docs/AGENT.md): connect through the VM's vsock
//! socket, run a process with vmlab's stdin, stdout and stderr, forward
//! signals and terminal resizes, return its exit status; and the control
//! requests `vmlab kill` and `vmlab stop` use.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use vmlab_agent_proto::{self as proto, ExecRequest, ExitStatus, Message, WinSize};

/// docker's status for a failure of the tool itself.
pub const EXIT_FAILURE: u8 = 125;

/// Talking to the agent failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The vsock socket could not be reached, or the guest did not accept.
    #[error("cannot reach the guest agent through {socket}: {source}")]
    Connect {
        /// The VM's vsock socket.
        socket: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The connection failed after it was made.
    #[error("guest agent connection: {0}")]
    Io(#[from] io::Error),
    /// The agent sent something that is not the protocol.
    #[error("guest agent: {0}")]
    Protocol(#[from] proto::Error),
    /// The agent closed the connection before the answer (the guest
    /// stopped?).
    #[error("the guest agent closed the connection (did the VM stop?)")]
    Closed,
    /// The agent refused or failed the request.
    #[error("{message}")]
    Agent {
        /// The exit status it suggests (126, 127, 125).
        status: u8,
        /// Its explanation.
        message: String,
    },
    /// An answer that does not fit the request.
    #[error("guest agent: unexpected answer {0:?}")]
    Unexpected(u8),
}

impl Error {
    /// The exit status `vmlab exec`/`kill`/`stop` give for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Agent { status, .. } => *status,
            _ => EXIT_FAILURE,
        }
    }
}

/// Opens a connection to the agent of the VM whose vsock socket is
/// `socket`, waiting at most `timeout` for the guest to accept.
pub fn connect(socket: &Path, timeout: Duration) -> Result<UnixStream, Error> {
    crate::vsock::connect(socket, proto::PORT, timeout).map_err(|source| Error::Connect {
        socket: socket.to_path_buf(),
        source,
    })
}

/// Sends a control request ([`Message::Ping`], [`Message::KillMain`],
/// [`Message::PowerOff`]) and waits for its [`Message::Ok`].
pub fn request(socket: &Path, msg: &Message, timeout: Duration) -> Result<(), Error> {
    let mut conn = connect(socket, timeout)?;
    conn.set_read_timeout(Some(timeout))?;
    proto::write_message(&mut conn, msg)?;
    match proto::read_message(&mut conn)? {
        Some(Message::Ok) => Ok(()),
        Some(Message::Error { status, message }) => Err(Error::Agent { status, message }),
        Some(other) => Err(Error::Unexpected(other.kind())),
        None => Err(Error::Closed),
    }
}

/// The write side of the connection, shared by the stdin and signal
/// threads.
type Writer = Arc<Mutex<UnixStream>>;

fn send(w: &Writer, msg: &Message) -> io::Result<()> {
    let mut conn = w.lock().unwrap_or_else(|e| e.into_inner());
    proto::write_message(&mut *conn, msg)
}

/// The size of the terminal on `fd`, if it is one.
pub fn terminal_size(fd: i32) -> Option<WinSize> {
    // SAFETY: winsize is plain data; TIOCGWINSZ fills it or fails.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ writes a winsize to a local that outlives the call.
    match unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) } {
        0 => Some(WinSize {
            rows: ws.ws_row,
            cols: ws.ws_col,
        }),
        _ => None,
    }
}

/// Signals `vmlab exec` forwards to the process (and SIGWINCH, which
/// becomes a resize of its terminal).
const FORWARDED: [libc::c_int; 7] = [
    libc::SIGINT,
    libc::SIGTERM,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGWINCH,
];

/// Blocks the forwarded signals in the calling thread (and the threads it
/// starts later) and returns their set, for [`forward_signals`].
fn block_forwarded() -> io::Result<libc::sigset_t> {
    // SAFETY: the set is initialized by sigemptyset before use, and
    // pthread_sigmask only reads it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in FORWARDED {
            libc::sigaddset(&mut set, sig);
        }
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        Ok(set)
    }
}

/// The signal thread: every forwarded signal becomes a frame.
fn forward_signals(set: libc::sigset_t, w: Writer, tty: bool) {
    loop {
        let mut sig: libc::c_int = 0;
        // SAFETY: set is initialized; sig is a valid out pointer.
        if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
            continue;
        }
        let msg = match sig {
            libc::SIGWINCH if tty => match terminal_size(libc::STDOUT_FILENO) {
                Some(size) => Message::Resize(size),
                None => continue,
            },
            libc::SIGWINCH => continue,
            // The FORWARDED numbers are all below 64.
            sig => Message::Signal(sig as u8),
        };
        if send(&w, &msg).is_err() {
            return;
        }
    }
}

/// The stdin thread: vmlab's stdin to the process, then EOF.
fn forward_stdin(w: Writer) {
    let mut buf = vec![0u8; proto::MAX_DATA];
    let stdin = io::stdin();
    let mut stdin = stdin.lock();
    loop {
        match stdin.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if send(&w, &Message::Stdin(buf[..n].to_vec())).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    let _ = send(&w, &Message::Stdin(Vec::new()));
}

/// Runs `req` in the guest with vmlab's own stdin (if `req.stdin`),
/// stdout and stderr, forwarding signals and (with a terminal) resizes.
/// Returns the process's exit status (128+N if killed by signal N).
pub fn exec(socket: &Path, req: ExecRequest, timeout: Duration) -> Result<u8, Error> {
    let tty = req.tty.is_some();
    let stdin = req.stdin;
    let mut conn = connect(socket, timeout)?;
    proto::write_message(&mut conn, &Message::Exec(req))?;
    let writer: Writer = Arc::new(Mutex::new(conn.try_clone()?));
    // Before any thread starts, so that they all inherit the mask.
    let set = block_forwarded()?;
    {
        let w = writer.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || forward_signals(set, w, tty))?;
    }
    if stdin {
        let w = writer.clone();
        std::thread::Builder::new()
            .name("stdin".into())
            .spawn(move || forward_stdin(w))?;
    }
    let stdout = io::stdout();
    let stderr = io::stderr();
    loop {
        match proto::read_message(&mut conn)? {
            Some(Message::Started(_)) => {}
            // A closed stdout (`| head`) must not end the session: the
            // process's status is still wanted.
            Some(Message::Stdout(d)) if !d.is_empty() => {
                let mut out = stdout.lock();
                let _ = out.write_all(&d).and_then(|()| out.flush());
            }
            Some(Message::Stderr(d)) if !d.is_empty() => {
                let mut err = stderr.lock();
                let _ = err.write_all(&d).and_then(|()| err.flush());
            }
            Some(Message::Stdout(_) | Message::Stderr(_)) => {} // EOF
            Some(Message::Exit(status)) => return Ok(status.code()),
            Some(Message::Error { status, message }) => {
                return Err(Error::Agent { status, message })
            }
            Some(other) => return Err(Error::Unexpected(other.kind())),
            None => return Err(Error::Closed),
        }
    }
}

/// Whether fd 0 and fd 1 are both terminals (what `-t` uses for raw mode
/// and the initial size).
pub fn stdio_is_terminal() -> bool {
    // SAFETY: isatty only inspects the descriptors.
    unsafe {
        libc::isatty(io::stdin().as_raw_fd()) == 1 && libc::isatty(io::stdout().as_raw_fd()) == 1
    }
}
