//! The wire protocol between vmlab (the host) and the guest agent in
//! vmlab-init. docs/AGENT.md describes it for people; this is the one
//! implementation both sides use.
//!
//! A connection carries frames: `u32` little-endian length `N` (of what
//! follows), then `N` bytes: a one-byte type and the payload. `N` is at
//! least 1 and at most [`MAX_FRAME`]; a larger length is rejected from the
//! 4 header bytes alone, before anything is allocated.
//!
//! One connection is one session: its first frame says what it is for
//! ([`Message::Exec`], [`Message::Ping`], [`Message::KillMain`],
//! [`Message::PowerOff`]). An exec session then carries stdin, signals and
//! resizes one way and stdout, stderr and the exit status the other, until
//! the agent sends [`Message::Exit`] (or [`Message::Error`]) and closes. A
//! connection per process needs no stream ids or credit of its own: the
//! transport's flow control (vsock credit, socket buffers) is the
//! back-pressure, and a client that stops reading stalls only its own
//! process.
//!
//! No dependencies and no `unsafe`: the guest init links it and must stay
//! small, and everything a hostile peer sends goes through [`decode`].

use std::fmt;
use std::io::{self, Read, Write};

/// The vsock port the guest agent listens on.
pub const PORT: u32 = 1024;

/// The host vsock port of the OCI runtime's DNS forwarder: the guest
/// init's stub for Docker's embedded DNS sends each query there, DNS over
/// TCP framed (src/oci/dns.rs, guest/init/src/dns.rs).
pub const DNS_PORT: u32 = 53;

/// Docker's embedded DNS server, as a container's resolv.conf names it on
/// a user-defined network.
pub const DOCKER_DNS: std::net::Ipv4Addr = std::net::Ipv4Addr::new(127, 0, 0, 11);

/// Whether a resolv.conf names Docker's embedded DNS (`nameserver
/// 127.0.0.11`), which answers only inside the container's network
/// namespace on the host: both sides decide by this whether to forward.
pub fn names_docker_dns(resolv_conf: &str) -> bool {
    resolv_conf.lines().any(|l| {
        let mut w = l.split_whitespace();
        w.next() == Some("nameserver") && w.next() == Some("127.0.0.11")
    })
}
/// Largest frame (type byte + payload) either side accepts.
pub const MAX_FRAME: usize = 1 << 20;
/// Bytes before the type: the `u32` length.
pub const LEN_BYTES: usize = 4;
/// Largest stdin/stdout/stderr chunk a sender puts in one frame. Smaller
/// than [`MAX_FRAME`] so that a session's frames interleave finely.
pub const MAX_DATA: usize = 64 * 1024;

/// Frame types. Client to agent below 0x80, agent to client from 0x80.
pub mod kind {
    pub const EXEC: u8 = 0x01;
    pub const STDIN: u8 = 0x02;
    pub const SIGNAL: u8 = 0x03;
    pub const RESIZE: u8 = 0x04;
    pub const PING: u8 = 0x05;
    pub const KILL_MAIN: u8 = 0x06;
    pub const POWER_OFF: u8 = 0x07;
    pub const STARTED: u8 = 0x81;
    pub const STDOUT: u8 = 0x82;
    pub const STDERR: u8 = 0x83;
    pub const EXIT: u8 = 0x84;
    pub const ERROR: u8 = 0x85;
    pub const OK: u8 = 0x86;
}

/// A terminal size, in characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WinSize {
    pub rows: u16,
    pub cols: u16,
}

/// What to run: the payload of [`Message::Exec`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ExecRequest {
    /// argv; `argv[0]` is looked up in `PATH`. Non-empty, `argv[0]` too.
    pub argv: Vec<Vec<u8>>,
    /// `KEY=VALUE` entries added to (and overriding) the agent's base
    /// environment.
    pub env: Vec<Vec<u8>>,
    /// Working directory (default: `/`).
    pub cwd: Option<Vec<u8>>,
    /// `uid[:gid]` or `name[:group]`, resolved in the guest (default: root).
    pub user: Option<String>,
    /// Run on a new pseudo-terminal of this size (stdout then carries both
    /// output streams, as with `docker exec -t`).
    pub tty: Option<WinSize>,
    /// Whether the client sends stdin. Without it the process's stdin is
    /// at EOF from the start.
    pub stdin: bool,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// It exited with this status.
    Code(u8),
    /// It was killed by this signal.
    Signal(u8),
}

impl ExitStatus {
    /// The shell's and docker's single number: the code, or 128+N.
    pub fn code(self) -> u8 {
        match self {
            ExitStatus::Code(c) => c,
            ExitStatus::Signal(s) => 128u8.saturating_add(s),
        }
    }
}

/// One frame, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Start a process (first frame of an exec session).
    Exec(ExecRequest),
    /// Bytes for the process's stdin; empty means EOF.
    Stdin(Vec<u8>),
    /// Deliver this signal to the process.
    Signal(u8),
    /// Resize the process's terminal.
    Resize(WinSize),
    /// Is the agent up? Answered with [`Message::Ok`].
    Ping,
    /// Send this signal to the guest's main process (the VM's command).
    KillMain(u8),
    /// Power the guest off: the main process and everything else get
    /// SIGTERM, then SIGKILL, the disks are synced, the VM ends.
    PowerOff,
    /// The process started with this guest pid.
    Started(u32),
    /// Bytes the process wrote to stdout (or to its terminal); empty: EOF.
    Stdout(Vec<u8>),
    /// Bytes the process wrote to stderr; empty: EOF.
    Stderr(Vec<u8>),
    /// The process ended; the last frame of an exec session.
    Exit(ExitStatus),
    /// The request failed. `status` is what a client should exit with
    /// (docker's 126: cannot run, 127: not found, 125: the agent failed).
    Error { status: u8, message: String },
    /// A control request was done.
    Ok,
}

/// Why bytes are not a valid frame.
#[derive(Debug)]
pub enum Error {
    /// The transport failed.
    Io(io::Error),
    /// The connection ended inside a frame.
    Truncated,
    /// The length field is 0 (no room for the type).
    Empty,
    /// The length field is over [`MAX_FRAME`].
    TooLarge(u32),
    /// An unknown frame type.
    UnknownType(u8),
    /// A known type whose payload does not parse.
    Malformed { kind: u8, what: &'static str },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io(e) => write!(f, "{e}"),
            Error::Truncated => write!(f, "connection closed inside a frame"),
            Error::Empty => write!(f, "frame of length 0"),
            Error::TooLarge(n) => write!(f, "frame of {n} bytes (at most {MAX_FRAME})"),
            Error::UnknownType(t) => write!(f, "unknown frame type {t:#04x}"),
            Error::Malformed { kind, what } => write!(f, "malformed frame {kind:#04x}: {what}"),
        }
    }
}

impl std::error::Error for Error {}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::UnexpectedEof => Error::Truncated,
            _ => Error::Io(e),
        }
    }
}

/// Appends one frame of type `kind` with `payload`.
fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(LEN_BYTES + 1 + payload.len());
    // Callers keep payloads under MAX_FRAME (data is chunked by MAX_DATA).
    let len = u32::try_from(payload.len() + 1).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_le_bytes());
    out.push(kind);
    out.extend_from_slice(payload);
    out
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

fn put_list(out: &mut Vec<u8>, items: &[Vec<u8>]) {
    out.extend_from_slice(&(items.len() as u32).to_le_bytes());
    for item in items {
        put_bytes(out, item);
    }
}

const FLAG_TTY: u8 = 1;
const FLAG_STDIN: u8 = 2;
const FLAG_CWD: u8 = 4;
const FLAG_USER: u8 = 8;

impl Message {
    /// The frame type of this message.
    pub fn kind(&self) -> u8 {
        match self {
            Message::Exec(_) => kind::EXEC,
            Message::Stdin(_) => kind::STDIN,
            Message::Signal(_) => kind::SIGNAL,
            Message::Resize(_) => kind::RESIZE,
            Message::Ping => kind::PING,
            Message::KillMain(_) => kind::KILL_MAIN,
            Message::PowerOff => kind::POWER_OFF,
            Message::Started(_) => kind::STARTED,
            Message::Stdout(_) => kind::STDOUT,
            Message::Stderr(_) => kind::STDERR,
            Message::Exit(_) => kind::EXIT,
            Message::Error { .. } => kind::ERROR,
            Message::Ok => kind::OK,
        }
    }

    /// The complete frame, length field included.
    pub fn encode(&self) -> Vec<u8> {
        let mut p = Vec::new();
        match self {
            Message::Exec(req) => {
                let mut flags = 0;
                if req.tty.is_some() {
                    flags |= FLAG_TTY;
                }
                if req.stdin {
                    flags |= FLAG_STDIN;
                }
                if req.cwd.is_some() {
                    flags |= FLAG_CWD;
                }
                if req.user.is_some() {
                    flags |= FLAG_USER;
                }
                p.push(flags);
                let ws = req.tty.unwrap_or_default();
                p.extend_from_slice(&ws.rows.to_le_bytes());
                p.extend_from_slice(&ws.cols.to_le_bytes());
                put_list(&mut p, &req.argv);
                put_list(&mut p, &req.env);
                if let Some(cwd) = &req.cwd {
                    put_bytes(&mut p, cwd);
                }
                if let Some(user) = &req.user {
                    put_bytes(&mut p, user.as_bytes());
                }
            }
            Message::Stdin(d) | Message::Stdout(d) | Message::Stderr(d) => {
                return frame(self.kind(), d)
            }
            Message::Signal(s) | Message::KillMain(s) => p.push(*s),
            Message::Resize(ws) => {
                p.extend_from_slice(&ws.rows.to_le_bytes());
                p.extend_from_slice(&ws.cols.to_le_bytes());
            }
            Message::Ping | Message::PowerOff | Message::Ok => {}
            Message::Started(pid) => p.extend_from_slice(&pid.to_le_bytes()),
            Message::Exit(st) => match st {
                ExitStatus::Code(c) => p.extend_from_slice(&[0, *c]),
                ExitStatus::Signal(s) => p.extend_from_slice(&[1, *s]),
            },
            Message::Error { status, message } => {
                p.push(*status);
                p.extend_from_slice(message.as_bytes());
            }
        }
        frame(self.kind(), &p)
    }
}

/// A cursor over a payload; every read is bounds-checked.
struct Cursor<'a> {
    buf: &'a [u8],
    kind: u8,
}

impl<'a> Cursor<'a> {
    fn bad(&self, what: &'static str) -> Error {
        Error::Malformed {
            kind: self.kind,
            what,
        }
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], Error> {
        if self.buf.len() < n {
            return Err(self.bad(what));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, Error> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, Error> {
        let b = self.take(2, what)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, Error> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn bytes(&mut self, what: &'static str) -> Result<Vec<u8>, Error> {
        let n = self.u32(what)? as usize;
        Ok(self.take(n, what)?.to_vec())
    }

    /// A counted list. The count is checked against what is left (every
    /// item takes at least its 4-byte length), so a huge count cannot make
    /// the decoder loop or allocate beyond the frame.
    fn list(&mut self, what: &'static str) -> Result<Vec<Vec<u8>>, Error> {
        let n = self.u32(what)? as usize;
        if n > self.buf.len() / 4 {
            return Err(self.bad(what));
        }
        (0..n).map(|_| self.bytes(what)).collect()
    }

    fn end(self) -> Result<(), Error> {
        match self.buf.is_empty() {
            true => Ok(()),
            false => Err(self.bad("trailing bytes")),
        }
    }
}

fn decode_exec(c: &mut Cursor<'_>) -> Result<ExecRequest, Error> {
    let flags = c.u8("flags")?;
    if flags & !(FLAG_TTY | FLAG_STDIN | FLAG_CWD | FLAG_USER) != 0 {
        return Err(c.bad("unknown flags"));
    }
    let ws = WinSize {
        rows: c.u16("window size")?,
        cols: c.u16("window size")?,
    };
    if flags & FLAG_TTY == 0 && ws != WinSize::default() {
        return Err(c.bad("window size without a terminal"));
    }
    let argv = c.list("argv")?;
    if argv.first().is_none_or(|a| a.is_empty()) {
        return Err(c.bad("empty command"));
    }
    if argv.iter().any(|a| a.contains(&0)) {
        return Err(c.bad("NUL in an argument"));
    }
    let env = c.list("env")?;
    if env
        .iter()
        .any(|e| e.contains(&0) || e.iter().position(|&b| b == b'=').is_none_or(|i| i == 0))
    {
        return Err(c.bad("env entry is not KEY=VALUE"));
    }
    let cwd = match flags & FLAG_CWD {
        0 => None,
        _ => {
            let d = c.bytes("cwd")?;
            if d.is_empty() || d.contains(&0) {
                return Err(c.bad("cwd"));
            }
            Some(d)
        }
    };
    let user = match flags & FLAG_USER {
        0 => None,
        _ => Some(String::from_utf8(c.bytes("user")?).map_err(|_| c.bad("user is not UTF-8"))?),
    };
    Ok(ExecRequest {
        argv,
        env,
        cwd,
        user,
        tty: (flags & FLAG_TTY != 0).then_some(ws),
        stdin: flags & FLAG_STDIN != 0,
    })
}

/// Decodes the body of a frame (type byte and payload).
pub fn decode_body(kind: u8, payload: &[u8]) -> Result<Message, Error> {
    let mut c = Cursor { buf: payload, kind };
    let msg = match kind {
        kind::EXEC => Message::Exec(decode_exec(&mut c)?),
        kind::STDIN => return Ok(Message::Stdin(payload.to_vec())),
        kind::STDOUT => return Ok(Message::Stdout(payload.to_vec())),
        kind::STDERR => return Ok(Message::Stderr(payload.to_vec())),
        kind::SIGNAL | kind::KILL_MAIN => {
            let s = c.u8("signal")?;
            if s == 0 || s > 64 {
                return Err(c.bad("signal number out of range"));
            }
            match kind {
                kind::SIGNAL => Message::Signal(s),
                _ => Message::KillMain(s),
            }
        }
        kind::RESIZE => Message::Resize(WinSize {
            rows: c.u16("window size")?,
            cols: c.u16("window size")?,
        }),
        kind::PING => Message::Ping,
        kind::POWER_OFF => Message::PowerOff,
        kind::OK => Message::Ok,
        kind::STARTED => Message::Started(c.u32("pid")?),
        kind::EXIT => match (c.u8("exit kind")?, c.u8("exit status")?) {
            (0, code) => Message::Exit(ExitStatus::Code(code)),
            (1, sig) => Message::Exit(ExitStatus::Signal(sig)),
            _ => return Err(c.bad("exit kind")),
        },
        kind::ERROR => {
            let status = c.u8("status")?;
            let message = String::from_utf8_lossy(c.buf).into_owned();
            return Ok(Message::Error { status, message });
        }
        other => return Err(Error::UnknownType(other)),
    };
    c.end()?;
    Ok(msg)
}

/// Checks a length field: the frame's size after it.
fn check_len(len: u32) -> Result<usize, Error> {
    match len as usize {
        0 => Err(Error::Empty),
        n if n > MAX_FRAME => Err(Error::TooLarge(len)),
        n => Ok(n),
    }
}

/// Decodes the first frame in `buf`: `Ok(None)` if more bytes are needed,
/// else the message and how many bytes it took. An oversized length is an
/// error as soon as its 4 bytes are there.
pub fn decode(buf: &[u8]) -> Result<Option<(Message, usize)>, Error> {
    let Some(head) = buf.get(..LEN_BYTES) else {
        return Ok(None);
    };
    let len = check_len(u32::from_le_bytes([head[0], head[1], head[2], head[3]]))?;
    let Some(body) = buf.get(LEN_BYTES..LEN_BYTES + len) else {
        return Ok(None);
    };
    Ok(Some((decode_body(body[0], &body[1..])?, LEN_BYTES + len)))
}

/// Reads one frame. `Ok(None)` on a clean end of the stream (before the
/// first byte of a frame). Allocates at most [`MAX_FRAME`] bytes.
pub fn read_message(r: &mut impl Read) -> Result<Option<Message>, Error> {
    let mut head = [0u8; LEN_BYTES];
    let mut got = 0;
    while got < LEN_BYTES {
        match r.read(&mut head[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(Error::Truncated),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let len = check_len(u32::from_le_bytes(head))?;
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    decode_body(body[0], &body[1..]).map(Some)
}

/// Writes one frame with a single `write_all` (one system call for most
/// frames: they are expensive in a guest).
pub fn write_message(w: &mut impl Write, msg: &Message) -> io::Result<()> {
    w.write_all(&msg.encode())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_dockers_embedded_dns_is_forwarded() {
        assert!(names_docker_dns(
            "search x\nnameserver 127.0.0.11\noptions ndots:0\n"
        ));
        assert!(names_docker_dns("nameserver\t127.0.0.11"));
        assert!(!names_docker_dns("nameserver 10.0.0.1\n"));
        assert!(!names_docker_dns("# nameserver 127.0.0.11\n"));
        assert!(!names_docker_dns("nameserver 127.0.0.111\n"));
    }

    fn all_messages() -> Vec<Message> {
        vec![
            Message::Exec(ExecRequest {
                argv: vec![b"sh".to_vec(), b"-c".to_vec(), b"exit 7".to_vec(), vec![]],
                env: vec![b"A=1".to_vec(), b"EMPTY=".to_vec(), b"B=x=y".to_vec()],
                cwd: Some(b"/srv/my app".to_vec()),
                user: Some("1000:100".into()),
                tty: Some(WinSize {
                    rows: 33,
                    cols: 101,
                }),
                stdin: true,
            }),
            Message::Exec(ExecRequest {
                argv: vec![vec![0xff, 0xfe]],
                ..Default::default()
            }),
            Message::Stdin(vec![]),
            Message::Stdin((0..=255).collect()),
            Message::Signal(10),
            Message::Resize(WinSize {
                rows: 1,
                cols: 65535,
            }),
            Message::Ping,
            Message::KillMain(9),
            Message::PowerOff,
            Message::Started(4242),
            Message::Stdout(vec![0; MAX_DATA]),
            Message::Stderr(b"oops\n".to_vec()),
            Message::Exit(ExitStatus::Code(7)),
            Message::Exit(ExitStatus::Signal(15)),
            Message::Error {
                status: 127,
                message: "nope: not found".into(),
            },
            Message::Ok,
        ]
    }

    #[test]
    fn every_message_round_trips() {
        for msg in all_messages() {
            let bytes = msg.encode();
            assert_eq!(
                u32::from_le_bytes(bytes[..4].try_into().unwrap()) as usize,
                bytes.len() - 4
            );
            assert_eq!(bytes[4], msg.kind());
            let (back, used) = decode(&bytes).unwrap().unwrap();
            assert_eq!(back, msg);
            assert_eq!(used, bytes.len());
            let mut r = &bytes[..];
            assert_eq!(read_message(&mut r).unwrap(), Some(msg));
            assert_eq!(read_message(&mut r).unwrap(), None);
        }
    }

    #[test]
    fn a_stream_of_frames_decodes_in_order() {
        let msgs = all_messages();
        let mut stream = Vec::new();
        for m in &msgs {
            write_message(&mut stream, m).unwrap();
        }
        let mut r = &stream[..];
        for m in &msgs {
            assert_eq!(read_message(&mut r).unwrap().as_ref(), Some(m));
        }
        assert!(read_message(&mut r).unwrap().is_none());
        // The buffer decoder sees the same frames.
        let mut off = 0;
        for m in &msgs {
            let (back, used) = decode(&stream[off..]).unwrap().unwrap();
            assert_eq!(&back, m);
            off += used;
        }
        assert_eq!(off, stream.len());
    }

    #[test]
    fn every_truncation_needs_more_or_is_truncated() {
        for msg in all_messages() {
            let bytes = msg.encode();
            for cut in 0..bytes.len() {
                assert!(
                    decode(&bytes[..cut]).unwrap().is_none(),
                    "{msg:?} cut {cut}"
                );
                let mut r = &bytes[..cut];
                match read_message(&mut r) {
                    Ok(None) if cut == 0 => {}
                    Err(Error::Truncated) if cut > 0 => {}
                    other => panic!("{msg:?} cut at {cut}: {other:?}"),
                }
            }
        }
    }

    /// A reader that would hand out endless zeros: reading a huge frame
    /// from it would allocate and loop forever if the limit were not
    /// checked first.
    struct Endless(Vec<u8>);
    impl Read for Endless {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.0.is_empty() {
                buf.fill(0);
                return Ok(buf.len());
            }
            let n = buf.len().min(self.0.len());
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0.drain(..n);
            Ok(n)
        }
    }

    #[test]
    fn oversized_and_empty_frames_are_rejected_from_the_header() {
        for len in [MAX_FRAME as u32 + 1, u32::MAX, 0x8000_0000] {
            let head = len.to_le_bytes();
            assert!(matches!(decode(&head), Err(Error::TooLarge(n)) if n == len));
            let mut r = Endless(head.to_vec());
            assert!(matches!(read_message(&mut r), Err(Error::TooLarge(_))));
        }
        assert!(matches!(decode(&[0, 0, 0, 0]), Err(Error::Empty)));
        let mut r = &[0u8, 0, 0, 0][..];
        assert!(matches!(read_message(&mut r), Err(Error::Empty)));
        // Exactly the maximum is fine.
        let big = Message::Stdout(vec![7; MAX_FRAME - 1]);
        let mut r = &big.encode()[..];
        assert_eq!(read_message(&mut r).unwrap(), Some(big));
    }

    fn raw(kind: u8, payload: &[u8]) -> Vec<u8> {
        frame(kind, payload)
    }

    fn malformed(bytes: &[u8]) -> bool {
        matches!(decode(bytes), Err(Error::Malformed { .. }))
    }

    #[test]
    fn unknown_types_and_bad_payloads_are_errors() {
        for t in [0u8, 0x08, 0x7f, 0x80, 0x87, 0xff] {
            assert!(matches!(decode(&raw(t, b"")), Err(Error::UnknownType(x)) if x == t));
        }
        // Fixed-size payloads: too short, too long, out of range.
        assert!(malformed(&raw(kind::SIGNAL, b"")));
        assert!(malformed(&raw(kind::SIGNAL, &[9, 9])));
        assert!(malformed(&raw(kind::SIGNAL, &[0])));
        assert!(malformed(&raw(kind::KILL_MAIN, &[65])));
        assert!(malformed(&raw(kind::RESIZE, &[1, 0, 2])));
        assert!(malformed(&raw(kind::STARTED, &[1, 2, 3])));
        assert!(malformed(&raw(kind::EXIT, &[2, 0])));
        assert!(malformed(&raw(kind::EXIT, &[0])));
        assert!(malformed(&raw(kind::PING, &[0])));
        assert!(malformed(&raw(kind::ERROR, b"")));
        // An error message that is not UTF-8 is still delivered.
        assert!(matches!(
            decode(&raw(kind::ERROR, &[126, 0xff])),
            Ok(Some((Message::Error { status: 126, .. }, _)))
        ));
    }

    fn exec_payload(flags: u8, argv: &[&[u8]], env: &[&[u8]], tail: &[u8]) -> Vec<u8> {
        let mut p = vec![flags, 24, 0, 80, 0];
        if flags & FLAG_TTY == 0 && flags != 0 {
            p[1..5].fill(0);
        }
        let owned = |v: &[&[u8]]| v.iter().map(|s| s.to_vec()).collect::<Vec<_>>();
        put_list(&mut p, &owned(argv));
        put_list(&mut p, &owned(env));
        p.extend_from_slice(tail);
        raw(kind::EXEC, &p)
    }

    #[test]
    fn hostile_exec_requests() {
        assert!(decode(&exec_payload(FLAG_TTY, &[b"true"], &[], b"")).is_ok());
        // A window size needs a terminal (one encoding per request).
        assert!(malformed(&exec_payload(0, &[b"true"], &[], b"")));
        // Empty argv, empty program, NUL inside an argument.
        assert!(malformed(&exec_payload(0, &[], &[], b"")));
        assert!(malformed(&exec_payload(0, &[b""], &[], b"")));
        assert!(malformed(&exec_payload(0, &[b"a\0b"], &[], b"")));
        // Bad env entries.
        assert!(malformed(&exec_payload(0, &[b"true"], &[b"NOEQ"], b"")));
        assert!(malformed(&exec_payload(0, &[b"true"], &[b"=v"], b"")));
        // Unknown flags; a flag whose field is missing; trailing bytes.
        assert!(malformed(&exec_payload(0x10, &[b"true"], &[], b"")));
        assert!(malformed(&exec_payload(FLAG_CWD, &[b"true"], &[], b"")));
        assert!(malformed(&exec_payload(
            FLAG_USER,
            &[b"true"],
            &[],
            &[1, 0, 0]
        )));
        assert!(malformed(&exec_payload(0, &[b"true"], &[], b"x")));
        assert!(malformed(&exec_payload(
            FLAG_CWD,
            &[b"true"],
            &[],
            &[0, 0, 0, 0]
        )));
        assert!(malformed(&exec_payload(
            FLAG_USER,
            &[b"true"],
            &[],
            &[1, 0, 0, 0, 0xff]
        )));
        // A huge count or item length is caught against the frame size.
        let mut p = vec![0, 0, 0, 0, 0];
        p.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(malformed(&raw(kind::EXEC, &p)));
        let mut p = vec![0, 0, 0, 0, 0];
        p.extend_from_slice(&1u32.to_le_bytes());
        p.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(malformed(&raw(kind::EXEC, &p)));
    }

    /// Deterministic garbage (xorshift): no input may panic the decoder,
    /// and whatever it accepts re-encodes to the bytes it consumed.
    #[test]
    fn random_bytes_never_panic() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let valid: Vec<Vec<u8>> = all_messages().iter().map(Message::encode).collect();
        for i in 0..20_000 {
            let mut buf = if i % 2 == 0 {
                let n = (next() % 64) as usize;
                (0..n).map(|_| next() as u8).collect::<Vec<u8>>()
            } else {
                // A valid frame with a few bytes flipped (after the length,
                // so it stays small).
                let mut b = valid[(next() as usize) % valid.len()].clone();
                for _ in 0..3 {
                    let at = 4 + (next() as usize) % (b.len() - 4);
                    b[at] ^= next() as u8;
                }
                b
            };
            if i % 3 == 0 && buf.len() >= 4 {
                // Keep random headers plausible sometimes.
                let len = (buf.len() - 4) as u32;
                buf[..4].copy_from_slice(&len.to_le_bytes());
            }
            if let Ok(Some((msg, used))) = decode(&buf) {
                if !matches!(msg, Message::Error { .. }) {
                    assert_eq!(msg.encode(), buf[..used], "{msg:?}");
                }
            }
            let mut r = &buf[..];
            let _ = read_message(&mut r);
        }
    }

    #[test]
    fn exit_status_numbers() {
        assert_eq!(ExitStatus::Code(7).code(), 7);
        assert_eq!(ExitStatus::Signal(9).code(), 137);
        assert_eq!(ExitStatus::Signal(200).code(), 255);
    }

    #[test]
    fn errors_read_well() {
        assert_eq!(
            Error::TooLarge(2_000_000).to_string(),
            "frame of 2000000 bytes (at most 1048576)"
        );
        assert_eq!(
            Error::UnknownType(0x42).to_string(),
            "unknown frame type 0x42"
        );
        let e = decode(&raw(kind::SIGNAL, b"")).unwrap_err();
        assert_eq!(e.to_string(), "malformed frame 0x03: signal");
    }
}
