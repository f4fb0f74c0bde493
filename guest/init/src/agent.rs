//! The guest agent: runs processes for the host (`vmlab exec`), signals the
//! main command (`vmlab kill`) and powers the guest off (`vmlab stop`),
//! over AF_VSOCK port [`proto::PORT`]. The protocol is in guest/agent-proto
//! and docs/AGENT.md.
//!
//! One connection is one session, served by its own threads (blocking I/O,
//! no event loop: init stays small, and a session that the host stops
//! reading stalls only itself). An exec session has:
//! - the session thread: reads the client's frames (stdin, signals,
//!   resizes) and applies them;
//! - one pump per output stream (stdout and stderr, or the terminal):
//!   reads what the process writes and sends it in frames of at most
//!   [`proto::MAX_DATA`] bytes;
//! - a waiter: waits for the process's exit status (from PID 1's reaper,
//!   see [`child_exited`]), then for the pumps to reach EOF, and sends
//!   [`Message::Exit`].
//!
//! The processes are PID 1's children, so the main thread's reaper, which
//! reaps every child with `waitpid(-1)`, collects their statuses and hands
//! them over here.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread;

use vmlab_agent_proto::{self as proto, ExecRequest, ExitStatus, Message, WinSize};

use crate::errno_text;
use crate::supervise::{self, CommandSpec, EXIT_CANNOT_RUN};

/// Status for the agent's own failures (docker's 125).
const EXIT_AGENT_FAILURE: u8 = 125;
/// Exit statuses reaped before their session claimed them (the process
/// ended between fork and registration), and orphans' statuses, which
/// nobody claims: a bounded queue, oldest dropped first. The window it
/// covers is microseconds long, so this is ample.
const UNCLAIMED_MAX: usize = 256;
/// Sessions served at once; more are refused with an ERROR frame. Each
/// holds at most one frame (1 MiB) and a 64 KiB buffer per stream, so this
/// bounds what a host can make the agent allocate.
const MAX_SESSIONS: usize = 128;
/// Stack of the agent's threads: they only copy bytes through a 64 KiB
/// heap buffer.
const STACK: usize = 128 * 1024;

#[derive(Default)]
struct Children {
    waiting: HashMap<libc::pid_t, Sender<libc::c_int>>,
    unclaimed: VecDeque<(libc::pid_t, libc::c_int)>,
}

static CHILDREN: Mutex<Option<Children>> = Mutex::new(None);
/// The guest's main process (the VM's command), for [`Message::KillMain`];
/// 0 while there is none.
static MAIN_PID: AtomicI32 = AtomicI32::new(0);
/// Sessions being served.
static SESSIONS: AtomicUsize = AtomicUsize::new(0);

/// One session's place in [`SESSIONS`], given back on drop.
struct Slot;

impl Slot {
    fn take() -> Option<Slot> {
        let n = SESSIONS.fetch_add(1, Ordering::SeqCst);
        if n >= MAX_SESSIONS {
            SESSIONS.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        Some(Slot)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        SESSIONS.fetch_sub(1, Ordering::SeqCst);
    }
}

fn children() -> std::sync::MutexGuard<'static, Option<Children>> {
    // A poisoned lock only means a session thread panicked; the map is
    // still consistent (every operation on it is a single call).
    CHILDREN.lock().unwrap_or_else(|e| e.into_inner())
}

/// Called by the reaper for every reaped child that is not the main
/// command: hands the status to the session waiting for it.
pub fn child_exited(pid: libc::pid_t, wstatus: libc::c_int) {
    let mut guard = children();
    let c = guard.get_or_insert_with(Children::default);
    match c.waiting.remove(&pid) {
        Some(tx) => {
            let _ = tx.send(wstatus);
        }
        None => {
            if c.unclaimed.len() == UNCLAIMED_MAX {
                c.unclaimed.pop_front();
            }
            c.unclaimed.push_back((pid, wstatus));
        }
    }
}

/// Registers interest in `pid`'s exit status.
fn claim(pid: libc::pid_t) -> Receiver<libc::c_int> {
    let (tx, rx) = mpsc::channel();
    let mut guard = children();
    let c = guard.get_or_insert_with(Children::default);
    match c.unclaimed.iter().position(|(p, _)| *p == pid) {
        Some(i) => {
            if let Some((_, status)) = c.unclaimed.remove(i) {
                let _ = tx.send(status);
            }
        }
        None => {
            c.waiting.insert(pid, tx);
        }
    }
    rx
}

/// Records the main command's pid (0: none).
pub fn set_main(pid: libc::pid_t) {
    MAIN_PID.store(pid, Ordering::SeqCst);
}

/// Opens the AF_VSOCK listening socket on `port`, any CID.
fn vsock_listener(port: u32) -> io::Result<OwnedFd> {
    // SAFETY: socket() takes integer arguments; a non-negative result is a
    // new descriptor that nothing else owns.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor (checked above) owned from here on.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let addr = libc::sockaddr_vm {
        svm_family: libc::AF_VSOCK as libc::sa_family_t,
        svm_reserved1: 0,
        svm_port: port,
        svm_cid: libc::VMADDR_CID_ANY,
        svm_zero: [0; 4],
    };
    // SAFETY: addr is a valid sockaddr_vm and its size is passed with it.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_vm).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    };
    // SAFETY: listen takes integer arguments.
    if rc != 0 || unsafe { libc::listen(fd.as_raw_fd(), 128) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

fn accept(listener: &OwnedFd) -> io::Result<UnixStream> {
    loop {
        // SAFETY: null address pointers are allowed; a non-negative result
        // is a new descriptor.
        let fd = unsafe {
            libc::accept4(
                listener.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if fd >= 0 {
            // A vsock stream socket: std's UnixStream only does read,
            // write, shutdown and dup on it, which work on any stream
            // socket.
            // SAFETY: fd is a fresh descriptor, owned by the stream.
            return Ok(unsafe { UnixStream::from_raw_fd(fd) });
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

/// Starts the agent on its own thread, listening on vsock port
/// [`proto::PORT`]. A failure (no vsock device) is reported on the console;
/// the VM runs on without an agent.
pub fn start() {
    let listener = match vsock_listener(proto::PORT) {
        Ok(l) => l,
        Err(e) => {
            crate::error!("agent: vsock port {}: {}", proto::PORT, errno_text(&e));
            return;
        }
    };
    let spawned = thread::Builder::new()
        .name("agent".into())
        .stack_size(STACK)
        .spawn(move || serve(|| accept(&listener)));
    if let Err(e) = spawned {
        crate::error!("agent: thread: {}", errno_text(&e));
    }
}

/// Accepts connections for ever, one session thread each. A failing
/// accept (out of descriptors, say) is logged and retried after a pause
/// rather than ending the agent.
pub fn serve(mut accept: impl FnMut() -> io::Result<UnixStream>) {
    loop {
        match accept() {
            Ok(mut conn) => {
                let Some(slot) = Slot::take() else {
                    let msg = format!("too many sessions (at most {MAX_SESSIONS})");
                    let _ = proto::write_message(&mut conn, &error(EXIT_AGENT_FAILURE, msg));
                    continue;
                };
                let spawned = thread::Builder::new().stack_size(STACK).spawn(move || {
                    let _slot = slot;
                    session(conn)
                });
                if let Err(e) = spawned {
                    crate::warning!("agent: session thread: {}", errno_text(&e));
                }
            }
            Err(e) => {
                crate::warning!("agent: accept: {}", errno_text(&e));
                thread::sleep(std::time::Duration::from_millis(100));
            }
        }
    }
}

/// The connection's write side, shared by the threads of a session; every
/// frame goes out in one locked `write_all`, so frames never interleave.
#[derive(Clone)]
struct Sink(Arc<Mutex<UnixStream>>);

impl Sink {
    fn send(&self, msg: &Message) -> io::Result<()> {
        let mut conn = self.0.lock().unwrap_or_else(|e| e.into_inner());
        proto::write_message(&mut *conn, msg)
    }
}

fn error(status: u8, message: String) -> Message {
    Message::Error { status, message }
}

fn session(mut conn: UnixStream) {
    let first = match proto::read_message(&mut conn) {
        Ok(Some(msg)) => msg,
        Ok(None) => return,
        Err(e) => {
            // A client speaking something else: say why and hang up.
            let reply = error(EXIT_AGENT_FAILURE, format!("bad request: {e}"));
            let _ = proto::write_message(&mut conn, &reply);
            return;
        }
    };
    let reply = match first {
        Message::Exec(req) => return exec_session(conn, req),
        Message::Ping => Message::Ok,
        Message::KillMain(sig) => {
            // The main process's end ends the VM at once: answer first,
            // then signal once the answer has arrived (see PowerOff).
            let pid = MAIN_PID.load(Ordering::SeqCst);
            let reply = match pid {
                // SAFETY: kill with signal 0 only checks for existence.
                p if p > 0 && unsafe { libc::kill(p, 0) } == 0 => Message::Ok,
                p if p > 0 => error(
                    EXIT_AGENT_FAILURE,
                    format!("the main process (pid {p}) is gone"),
                ),
                _ => error(EXIT_AGENT_FAILURE, "the guest has no main process".into()),
            };
            let ok = reply == Message::Ok;
            let _ = proto::write_message(&mut conn, &reply);
            if ok {
                wait_hangup(&mut conn);
                // SAFETY: kill has no memory effects.
                unsafe { libc::kill(pid, libc::c_int::from(sig)) };
            }
            return;
        }
        Message::PowerOff => {
            // PID 1's main thread takes SIGUSR2 as busybox's poweroff and
            // shuts the guest down, which ends the VM within milliseconds:
            // the reply goes out first, and the client's hang-up (or a
            // second) says it arrived before the transport goes away.
            let _ = proto::write_message(&mut conn, &Message::Ok);
            wait_hangup(&mut conn);
            // SAFETY: kill has no memory effects.
            unsafe { libc::kill(libc::getpid(), libc::SIGUSR2) };
            return;
        }
        other => error(
            EXIT_AGENT_FAILURE,
            format!(
                "bad request: frame {:#04x} cannot start a session",
                other.kind()
            ),
        ),
    };
    let _ = proto::write_message(&mut conn, &reply);
}

/// Waits (at most a second) for the client to close the connection: it
/// does once it has read the answer.
fn wait_hangup(conn: &mut UnixStream) {
    let _ = conn.set_read_timeout(Some(std::time::Duration::from_secs(1)));
    let _ = conn.read(&mut [0u8; 1]);
}

/// A pseudo-terminal pair: the master stays with the agent, the slave
/// becomes the process's stdin, stdout and stderr (and controlling tty).
fn open_pty(size: WinSize) -> io::Result<(File, File)> {
    let master = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC)
        .open("/dev/ptmx")?;
    let fd = master.as_raw_fd();
    let unlock: libc::c_int = 0;
    let mut n: libc::c_uint = 0;
    // SAFETY: TIOCSPTLCK reads an int and TIOCGPTN writes an unsigned int,
    // both through pointers to locals that outlive the calls.
    unsafe {
        if libc::ioctl(fd, libc::TIOCSPTLCK, &unlock) != 0
            || libc::ioctl(fd, libc::TIOCGPTN, &mut n) != 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    set_winsize(&master, size)?;
    let slave = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(format!("/dev/pts/{n}"))?;
    Ok((master, slave))
}

fn set_winsize(tty: &File, size: WinSize) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize from a local that outlives the call.
    match unsafe { libc::ioctl(tty.as_raw_fd(), libc::TIOCSWINSZ, &ws) } {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

/// Makes the frame for a chunk of one output stream.
type Frame = fn(Vec<u8>) -> Message;

/// The process's stdio as the agent sees it.
struct Io {
    /// Where the client's stdin goes (`None`: stdin was not asked for).
    stdin: Option<File>,
    /// Output sources and the frame kind each becomes.
    outputs: Vec<(File, Frame)>,
    /// The terminal master, for resizes.
    tty: Option<File>,
}

/// Everything the process needs that can fail before it is started, as
/// the [`Message::Error`] to answer with.
fn prepare(req: &ExecRequest) -> Result<CommandSpec, Message> {
    let creds = match &req.user {
        Some(spec) => {
            let spec = crate::user::parse_spec(spec)
                .map_err(|e| error(EXIT_CANNOT_RUN, format!("user {spec:?}: {e}")))?;
            Some(crate::resolve_user(&spec).map_err(|e| error(EXIT_CANNOT_RUN, e))?)
        }
        None => None,
    };
    let cwd = PathBuf::from(OsString::from_vec(
        req.cwd.clone().unwrap_or_else(|| b"/".to_vec()),
    ));
    match std::fs::metadata(&cwd) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            let msg = format!("working directory {}: Not a directory", cwd.display());
            return Err(error(EXIT_CANNOT_RUN, msg));
        }
        Err(e) => {
            let msg = format!("working directory {}: {}", cwd.display(), errno_text(&e));
            return Err(error(EXIT_CANNOT_RUN, msg));
        }
    }
    let extra: Vec<(OsString, OsString)> = req
        .env
        .iter()
        .filter_map(|e| {
            // KEY=VALUE with a non-empty key: checked by the decoder.
            let eq = e.iter().position(|&b| b == b'=')?;
            Some((
                OsString::from_vec(e[..eq].to_vec()),
                OsString::from_vec(e[eq + 1..].to_vec()),
            ))
        })
        .collect();
    let home = creds
        .as_ref()
        .map_or_else(|| Path::new("/root").to_owned(), |c| c.home.clone());
    Ok(CommandSpec {
        argv: req
            .argv
            .iter()
            .map(|a| OsString::from_vec(a.clone()))
            .collect(),
        env: crate::build_env(&extra, req.tty.is_some(), &home),
        creds: creds.map(|c| (c.uid, c.gid, c.groups)),
        ctty: req.tty.is_some(),
        cwd: Some(cwd),
    })
}

/// Starts the process with pipes or a terminal.
fn start_process(spec: &CommandSpec, req: &ExecRequest) -> Result<(libc::pid_t, Io), Message> {
    let fail =
        |what: &str, e: io::Error| error(EXIT_AGENT_FAILURE, format!("{what}: {}", errno_text(&e)));
    if let Some(size) = req.tty {
        let (master, slave) = open_pty(size).map_err(|e| fail("terminal", e))?;
        let dup = |f: &File| {
            f.try_clone()
                .map(Stdio::from)
                .map_err(|e| fail("terminal", e))
        };
        let stdio = [dup(&slave)?, dup(&slave)?, Stdio::from(slave)];
        let child =
            supervise::spawn_child(spec, Some(stdio)).map_err(|e| error(e.status, e.message))?;
        let reader = master.try_clone().map_err(|e| fail("terminal", e))?;
        let writer = master.try_clone().map_err(|e| fail("terminal", e))?;
        let io = Io {
            stdin: req.stdin.then_some(writer),
            outputs: vec![(reader, Message::Stdout)],
            tty: Some(master),
        };
        return Ok((child.id() as libc::pid_t, io));
    }
    let stdin = match req.stdin {
        true => Stdio::piped(),
        false => Stdio::null(),
    };
    let mut child = supervise::spawn_child(spec, Some([stdin, Stdio::piped(), Stdio::piped()]))
        .map_err(|e| error(e.status, e.message))?;
    let pid = child.id() as libc::pid_t;
    let as_file = |fd: Option<OwnedFd>| fd.map(File::from);
    let mut outputs = Vec::new();
    if let Some(out) = as_file(child.stdout.take().map(OwnedFd::from)) {
        outputs.push((out, Message::Stdout as Frame));
    }
    if let Some(err) = as_file(child.stderr.take().map(OwnedFd::from)) {
        outputs.push((err, Message::Stderr as Frame));
    }
    let io = Io {
        stdin: as_file(child.stdin.take().map(OwnedFd::from)),
        outputs,
        tty: None,
    };
    Ok((pid, io))
}

/// Copies `src` to the client in frames until EOF (EIO on a terminal
/// whose processes are all gone), then sends the empty frame that means
/// EOF. Stops early if the client is gone.
fn pump(mut src: File, frame: Frame, sink: Sink) {
    let mut buf = vec![0u8; proto::MAX_DATA];
    loop {
        match src.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if sink.send(&frame(buf[..n].to_vec())).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break, // EIO: the terminal's last user closed it
        }
    }
    let _ = sink.send(&frame(Vec::new()));
}

fn exit_status(wstatus: libc::c_int) -> ExitStatus {
    if libc::WIFSIGNALED(wstatus) {
        ExitStatus::Signal(libc::WTERMSIG(wstatus) as u8)
    } else {
        ExitStatus::Code(supervise::exit_code(wstatus))
    }
}

fn exec_session(conn: UnixStream, req: ExecRequest) {
    let sink = match conn.try_clone() {
        Ok(w) => Sink(Arc::new(Mutex::new(w))),
        Err(_) => return,
    };
    let started = prepare(&req).and_then(|spec| start_process(&spec, &req));
    let (pid, io) = match started {
        Ok(started) => started,
        Err(reply) => {
            let _ = sink.send(&reply);
            return;
        }
    };
    let status = claim(pid);
    let _ = sink.send(&Message::Started(pid as u32));
    let exited = Arc::new(AtomicBool::new(false));
    let mut pumps = Vec::new();
    for (src, frame) in io.outputs {
        let sink = sink.clone();
        match thread::Builder::new()
            .stack_size(STACK)
            .spawn(move || pump(src, frame, sink))
        {
            Ok(t) => pumps.push(t),
            Err(e) => crate::warning!("agent: output thread: {}", errno_text(&e)),
        }
    }
    let waiter = {
        let sink = sink.clone();
        let exited = exited.clone();
        let conn = conn.try_clone();
        thread::Builder::new().stack_size(STACK).spawn(move || {
            // The reaper always answers: the process is our child.
            let wstatus = status.recv().unwrap_or(0);
            exited.store(true, Ordering::SeqCst);
            // Output written just before the exit is still in the pipes.
            for p in pumps {
                let _ = p.join();
            }
            let _ = sink.send(&Message::Exit(exit_status(wstatus)));
            // Ends the session thread's read below.
            if let Ok(conn) = conn {
                let _ = conn.shutdown(Shutdown::Both);
            }
        })
    };
    if let Err(e) = waiter {
        crate::warning!("agent: waiter thread: {}", errno_text(&e));
    }
    read_client(conn, pid, io.stdin, io.tty, &exited);
}

/// The session thread: applies what the client sends until it hangs up.
/// A client that goes away before the process ends takes its process
/// group with it (SIGKILL), so nothing runs on unwatched.
fn read_client(
    mut conn: UnixStream,
    pid: libc::pid_t,
    mut stdin: Option<File>,
    tty: Option<File>,
    exited: &AtomicBool,
) {
    let signal = |sig: libc::c_int| {
        if !exited.load(Ordering::SeqCst) {
            // SAFETY: kill has no memory effects.
            unsafe { libc::kill(pid, sig) };
        }
    };
    loop {
        match proto::read_message(&mut conn) {
            Ok(Some(Message::Stdin(data))) if data.is_empty() => {
                if let (Some(t), Some(_)) = (&tty, &stdin) {
                    // A terminal has no EOF of its own: the line
                    // discipline's VEOF (^D, at the start of a line).
                    let mut t: &File = t;
                    let _ = t.write_all(&[4]);
                }
                stdin = None;
            }
            Ok(Some(Message::Stdin(data))) => {
                if let Some(s) = &mut stdin {
                    // Blocks while the process does not read: that is the
                    // back-pressure. EPIPE: it closed its stdin.
                    if s.write_all(&data).is_err() {
                        stdin = None;
                    }
                }
            }
            Ok(Some(Message::Signal(sig))) => signal(libc::c_int::from(sig)),
            Ok(Some(Message::Resize(size))) => {
                if let Some(t) = &tty {
                    let _ = set_winsize(t, size);
                }
            }
            Ok(Some(_)) => {} // not meaningful mid-session: ignored
            Ok(None) | Err(_) => break,
        }
    }
    if !exited.load(Ordering::SeqCst) {
        // SAFETY: kill has no memory effects; the process leads its own
        // process group (it was started with setsid).
        unsafe { libc::kill(-pid, libc::SIGKILL) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;
    use std::time::{Duration, Instant};

    /// Runs one request against the agent and collects the replies.
    struct Reply {
        started: bool,
        stdout: Vec<u8>,
        stderr: Vec<u8>,
        end: Option<Message>,
    }

    fn exec(sock: &Path, req: ExecRequest, stdin: &[&[u8]], signal: Option<u8>) -> Reply {
        let mut conn = UnixStream::connect(sock).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let has_stdin = req.stdin;
        proto::write_message(&mut conn, &Message::Exec(req)).unwrap();
        let mut reply = Reply {
            started: false,
            stdout: Vec::new(),
            stderr: Vec::new(),
            end: None,
        };
        let mut writer = conn.try_clone().unwrap();
        let chunks: Vec<Vec<u8>> = stdin.iter().map(|c| c.to_vec()).collect();
        let feeder = thread::spawn(move || {
            if has_stdin {
                for c in chunks {
                    proto::write_message(&mut writer, &Message::Stdin(c)).unwrap();
                }
                proto::write_message(&mut writer, &Message::Stdin(vec![])).unwrap();
            }
            writer
        });
        let mut writer = None;
        while let Some(msg) = proto::read_message(&mut conn).unwrap() {
            match msg {
                Message::Started(_) => {
                    reply.started = true;
                    if let Some(sig) = signal {
                        // Give the shell time to set its trap.
                        thread::sleep(Duration::from_millis(300));
                        let w = writer.get_or_insert_with(|| conn.try_clone().unwrap());
                        proto::write_message(w, &Message::Signal(sig)).unwrap();
                    }
                }
                Message::Stdout(d) => reply.stdout.extend(d),
                Message::Stderr(d) => reply.stderr.extend(d),
                end => {
                    reply.end = Some(end);
                    break;
                }
            }
        }
        feeder.join().unwrap();
        reply
    }

    fn req(argv: &[&str]) -> ExecRequest {
        ExecRequest {
            argv: argv.iter().map(|a| a.as_bytes().to_vec()).collect(),
            ..Default::default()
        }
    }

    /// The agent on a Unix socket on the host, with a reaper thread standing
    /// in for PID 1's. All of it in one test, serialized with the other
    /// test that reaps children (waitpid(-1) takes any child).
    #[test]
    fn agent_sessions_on_the_host() {
        let _serial = crate::TEST_CHILDREN.lock();
        let dir = std::env::temp_dir().join(format!("vmlab-agent-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("agent.sock");
        let _ = std::fs::remove_file(&sock);
        let listener = UnixListener::bind(&sock).unwrap();
        thread::spawn(move || serve(|| listener.accept().map(|(c, _)| c)));
        let stop = Arc::new(AtomicBool::new(false));
        let reaper = {
            let stop = stop.clone();
            thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let mut ws = 0;
                    // SAFETY: ws is a valid out pointer.
                    let pid = unsafe { libc::waitpid(-1, &mut ws, libc::WNOHANG) };
                    if pid > 0 {
                        child_exited(pid, ws);
                    } else {
                        thread::sleep(Duration::from_millis(5));
                    }
                }
            })
        };

        let r = exec(
            &sock,
            req(&["sh", "-c", "echo out; echo err >&2; exit 7"]),
            &[],
            None,
        );
        assert!(r.started);
        assert_eq!(r.stdout, b"out\n");
        assert_eq!(r.stderr, b"err\n");
        assert_eq!(r.end, Some(Message::Exit(ExitStatus::Code(7))));

        // Binary stdin through cat, in several frames, back unchanged.
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        let chunks: Vec<&[u8]> = data.chunks(proto::MAX_DATA).collect();
        let mut r = req(&["cat"]);
        r.stdin = true;
        let r = exec(&sock, r, &chunks, None);
        assert_eq!(r.stdout.len(), data.len());
        assert!(r.stdout == data);
        assert_eq!(r.end, Some(Message::Exit(ExitStatus::Code(0))));

        // Without stdin the process sees EOF at once.
        let r = exec(&sock, req(&["cat"]), &[], None);
        assert_eq!(r.end, Some(Message::Exit(ExitStatus::Code(0))));

        // Not found, not executable, bad working directory.
        let r = exec(&sock, req(&["no-such-command-vmlab"]), &[], None);
        assert!(!r.started);
        assert!(matches!(r.end, Some(Message::Error { status: 127, .. })));
        let r = exec(&sock, req(&["/etc/passwd"]), &[], None);
        assert!(matches!(r.end, Some(Message::Error { status: 126, .. })));
        let mut bad_cwd = req(&["true"]);
        bad_cwd.cwd = Some(b"/no/such/dir".to_vec());
        let r = exec(&sock, bad_cwd, &[], None);
        assert!(
            matches!(r.end, Some(Message::Error { status: 126, ref message }) if message.contains("/no/such/dir"))
        );

        // Environment and working directory.
        let mut e = req(&["sh", "-c", "echo \"$FOO:$PWD:$HOME\""]);
        e.env = vec![b"FOO=bar baz".to_vec()];
        e.cwd = Some(dir.as_os_str().as_encoded_bytes().to_vec());
        let r = exec(&sock, e, &[], None);
        assert_eq!(
            String::from_utf8_lossy(&r.stdout),
            format!("bar baz:{}:/root\n", dir.display())
        );

        // A signal reaches the process's trap; a fatal one is reported.
        let r = exec(
            &sock,
            req(&[
                "sh",
                "-c",
                "trap 'echo got; exit 3' USR1; while :; do sleep 0.05; done",
            ]),
            &[],
            Some(libc::SIGUSR1 as u8),
        );
        assert_eq!(r.stdout, b"got\n");
        assert_eq!(r.end, Some(Message::Exit(ExitStatus::Code(3))));
        let r = exec(&sock, req(&["sleep", "30"]), &[], Some(libc::SIGTERM as u8));
        assert_eq!(r.end, Some(Message::Exit(ExitStatus::Signal(15))));

        // A terminal of the size asked for, with the output on stdout.
        let mut t = req(&["sh", "-c", "stty size; echo err >&2; test -t 0"]);
        t.tty = Some(WinSize {
            rows: 33,
            cols: 101,
        });
        let r = exec(&sock, t, &[], None);
        let out = String::from_utf8_lossy(&r.stdout);
        assert!(out.contains("33 101"), "{out:?}");
        assert!(out.contains("err"), "{out:?}");
        assert!(r.stderr.is_empty());
        assert_eq!(r.end, Some(Message::Exit(ExitStatus::Code(0))));

        // Sessions at once, each with its own output and status.
        let start = Instant::now();
        let handles: Vec<_> = (0..40)
            .map(|i| {
                let sock = sock.clone();
                thread::spawn(move || {
                    let cmd = format!("sleep 0.3; echo {i}; echo e{i} >&2; exit {i}");
                    exec(&sock, req(&["sh", "-c", &cmd]), &[], None)
                })
            })
            .collect();
        for (i, h) in handles.into_iter().enumerate() {
            let r = h.join().unwrap();
            assert_eq!(r.stdout, format!("{i}\n").as_bytes());
            assert_eq!(r.stderr, format!("e{i}\n").as_bytes());
            assert_eq!(r.end, Some(Message::Exit(ExitStatus::Code(i as u8))));
        }
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "{:?}",
            start.elapsed()
        );

        // Control requests and garbage.
        let mut c = UnixStream::connect(&sock).unwrap();
        proto::write_message(&mut c, &Message::Ping).unwrap();
        assert_eq!(proto::read_message(&mut c).unwrap(), Some(Message::Ok));
        let mut c = UnixStream::connect(&sock).unwrap();
        proto::write_message(&mut c, &Message::KillMain(15)).unwrap();
        assert!(matches!(
            proto::read_message(&mut c).unwrap(),
            Some(Message::Error { status: 125, .. })
        ));
        let mut c = UnixStream::connect(&sock).unwrap();
        c.write_all(&u32::MAX.to_le_bytes()).unwrap();
        assert!(matches!(
            proto::read_message(&mut c).unwrap(),
            Some(Message::Error { ref message, .. }) if message.contains("at most")
        ));
        let mut c = UnixStream::connect(&sock).unwrap();
        proto::write_message(&mut c, &Message::Stdin(b"x".to_vec())).unwrap();
        assert!(matches!(
            proto::read_message(&mut c).unwrap(),
            Some(Message::Error { .. })
        ));

        // A client that hangs up mid-session takes its process with it.
        let mut c = UnixStream::connect(&sock).unwrap();
        proto::write_message(&mut c, &Message::Exec(req(&["sleep", "30"]))).unwrap();
        let Some(Message::Started(pid)) = proto::read_message(&mut c).unwrap() else {
            panic!("not started")
        };
        drop(c);
        let deadline = Instant::now() + Duration::from_secs(5);
        // SAFETY: kill with signal 0 only checks for existence.
        while unsafe { libc::kill(pid as i32, 0) } == 0 {
            assert!(Instant::now() < deadline, "pid {pid} survived its client");
            thread::sleep(Duration::from_millis(20));
        }

        stop.store(true, Ordering::SeqCst);
        reaper.join().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
