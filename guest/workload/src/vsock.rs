//! `vsock-send` and `vsock-recv`: `net-send` / `net-recv` over AF_VSOCK
//! (the same data stream, the same SHA-256 report), for a guest with a
//! virtio-vsock device and the host at CID 2.
//!
//! `vsock-recv` listens on any CID at `--port` (default 7431), prints
//! `vmlab-workload: vsock-recv listening on port P` on stderr when ready,
//! takes one connection and reads it to its end. `vsock-send` connects to
//! `--cid` (default 2, the host) and `--port`, retrying while the peer
//! refuses for up to `--timeout` seconds, then sends `--bytes`.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use crate::args::{Parsed, Spec};
use crate::error::{Context, Error};
use crate::json::Object;
use crate::net::{remaining, wait_readable};
use crate::transfer::{receive_over, send_over, Conn};

pub const SEND_SPEC: Spec = Spec {
    command: "vsock-send",
    values: &["--cid", "--port", "--bytes", "--timeout"],
    switches: &[],
};

pub const RECV_SPEC: Spec = Spec {
    command: "vsock-recv",
    values: &["--port", "--timeout"],
    switches: &["--once"],
};

const DEFAULT_PORT: u64 = 7431;
/// VMADDR_CID_HOST.
const HOST_CID: u64 = 2;
const DEFAULT_BYTES: u64 = 64 << 20;
const DEFAULT_SEND_TIMEOUT: f64 = 30.0;
const DEFAULT_RECV_TIMEOUT: f64 = 600.0;

/// A connected AF_VSOCK stream socket.
struct VsockStream {
    file: File,
}

impl Read for VsockStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }
}

impl Write for VsockStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn set_timeout(fd: i32, option: libc::c_int, d: Duration) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: libc::time_t::try_from(d.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_usec: libc::suseconds_t::from(d.subsec_micros().max(1)),
    };
    // SAFETY: setsockopt reads one timeval from a live local of that size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            option,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

impl Conn for VsockStream {
    fn set_timeouts(&self, read: Duration, write: Duration) -> io::Result<()> {
        set_timeout(self.file.as_raw_fd(), libc::SO_RCVTIMEO, read)?;
        set_timeout(self.file.as_raw_fd(), libc::SO_SNDTIMEO, write)
    }

    fn shutdown_write(&self) -> io::Result<()> {
        // SAFETY: shutdown takes no pointers.
        if unsafe { libc::shutdown(self.file.as_raw_fd(), libc::SHUT_WR) } == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

fn socket() -> io::Result<OwnedFd> {
    // SAFETY: socket takes no pointers; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn address(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain old data; all zeroes is valid.
    let mut a: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    a.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    a.svm_cid = cid;
    a.svm_port = port;
    a
}

const ADDR_LEN: libc::socklen_t = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;

/// Connects to `cid:port`, retrying while it is refused, until `deadline`.
fn connect(cid: u32, port: u32, deadline: Instant) -> Result<VsockStream, Error> {
    let what = format!("connect to vsock {cid}:{port}");
    loop {
        let fd = socket().context(|| "socket(AF_VSOCK)".into())?;
        let a = address(cid, port);
        // SAFETY: `a` is a live sockaddr_vm and ADDR_LEN its size.
        let rc = unsafe {
            libc::connect(
                fd.as_raw_fd(),
                (&a as *const libc::sockaddr_vm).cast(),
                ADDR_LEN,
            )
        };
        if rc == 0 {
            return Ok(VsockStream {
                file: File::from(fd),
            });
        }
        let err = io::Error::last_os_error();
        let retry = matches!(
            err.raw_os_error(),
            Some(libc::ECONNRESET | libc::ECONNREFUSED | libc::EINTR)
        );
        if !retry || Instant::now() + Duration::from_millis(100) >= deadline {
            return Err(Error::Io { what, err });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn port(args: &Parsed) -> Result<u32, Error> {
    // In the u32 range, so the cast is exact.
    Ok(args.u64_in("--port", DEFAULT_PORT, 0, u64::from(u32::MAX - 1))? as u32)
}

pub fn run_send(args: &Parsed) -> Result<String, Error> {
    let cid = args.u64_in("--cid", HOST_CID, 0, u64::from(u32::MAX - 1))? as u32;
    let port = port(args)?;
    let bytes = args.size_in("--bytes", DEFAULT_BYTES, 0, 1 << 40)?;
    let timeout = args.seconds_in("--timeout", DEFAULT_SEND_TIMEOUT, 0.001, 3600.0)?;
    let timeout = Duration::from_secs_f64(timeout);
    let mut conn = connect(cid, port, Instant::now() + timeout)?;
    let t = send_over(&mut conn, bytes, timeout)?;
    Ok(t.report(
        Object::new()
            .str("workload", "vsock-send")
            .u64("cid", u64::from(cid))
            .u64("port", u64::from(port)),
    ))
}

pub fn run_recv(args: &Parsed) -> Result<String, Error> {
    let port = port(args)?;
    let timeout = args.seconds_in("--timeout", DEFAULT_RECV_TIMEOUT, 0.001, 86_400.0)?;
    let _ = args.switch("--once");
    let deadline = Instant::now() + Duration::from_secs_f64(timeout);
    let listener = socket().context(|| "socket(AF_VSOCK)".into())?;
    let a = address(libc::VMADDR_CID_ANY, port);
    // SAFETY: `a` is a live sockaddr_vm and ADDR_LEN its size.
    let rc = unsafe {
        libc::bind(
            listener.as_raw_fd(),
            (&a as *const libc::sockaddr_vm).cast(),
            ADDR_LEN,
        )
    };
    // SAFETY: listen takes no pointers.
    if rc != 0 || unsafe { libc::listen(listener.as_raw_fd(), 1) } != 0 {
        return Err(Error::Io {
            what: format!("listen on vsock port {port}"),
            err: io::Error::last_os_error(),
        });
    }
    eprintln!("vmlab-workload: vsock-recv listening on port {port}");
    wait_readable(listener.as_raw_fd(), deadline, "waiting for the client")?;
    remaining(deadline, "waiting for the client")?;
    // SAFETY: null address pointers are allowed (the peer is not wanted).
    let fd = unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(Error::Io {
            what: "accept".into(),
            err: io::Error::last_os_error(),
        });
    }
    // SAFETY: a new fd owned by nobody else.
    let conn = VsockStream {
        file: File::from(unsafe { OwnedFd::from_raw_fd(fd) }),
    };
    let t = receive_over(conn, deadline)?;
    Ok(t.report(
        Object::new()
            .str("workload", "vsock-recv")
            .u64("port", u64::from(port)),
    ))
}
