//! `net-send` and `net-recv`: one TCP connection carrying a known number
//! of bytes of the fixed data stream, with the SHA-256 of what each end
//! sent or received, so that a test can check a transfer end to end
//! (host to guest, guest to host, guest to guest) by comparing digests.
//!
//! The data is [`XorShift64`] from [`DATA_SEED`], the same stream as the
//! `cpu` workload, generated in 128 KiB pieces (a multiple of 8 bytes, so
//! the stream does not depend on how it is cut): anyone can produce the
//! expected bytes without this program.
//!
//! The sender writes its bytes, shuts down its sending side and waits for
//! the receiver to close: its time covers delivery, not just the copy
//! into socket buffers. The receiver reads to the end, closes, and
//! reports. Neither can hang: the receiver gives up `--timeout` seconds
//! after it starts (waiting for the connection included); the sender tries
//! to connect for `--timeout` seconds and waits at most that long on any
//! one write or read.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, TcpListener};
use std::time::{Duration, Instant};

use crate::args::{ArgError, Parsed, Spec};
use crate::error::{Context, Error};
use crate::json::Object;
use crate::net::{accept, connect, listen, mib, net_error, port, remaining, resolve};
use crate::prng::{XorShift64, DATA_SEED};
use crate::sha256::{hex, Sha256};

pub const SEND_SPEC: Spec = Spec {
    command: "net-send",
    values: &["--host", "--port", "--bytes", "--timeout"],
    switches: &[],
};

pub const RECV_SPEC: Spec = Spec {
    command: "net-recv",
    values: &["--port", "--bind", "--timeout"],
    switches: &["--once"],
};

pub const DEFAULT_PORT: u16 = 7431;
const DEFAULT_BYTES: u64 = 64 << 20;
const DEFAULT_SEND_TIMEOUT: f64 = 30.0;
const DEFAULT_RECV_TIMEOUT: f64 = 600.0;
/// Size of each write and read; a multiple of 8 (see the module doc).
const CHUNK: usize = 128 << 10;

/// What one end saw.
#[derive(Debug)]
pub struct Transfer {
    pub bytes: u64,
    pub seconds: f64,
    pub sha256: [u8; 32],
}

pub fn run_send(args: &Parsed) -> Result<String, Error> {
    let host = args.text("--host")?.ok_or(ArgError::Required("--host"))?;
    let port = port(args, DEFAULT_PORT, 1)?;
    let bytes = args.size_in("--bytes", DEFAULT_BYTES, 0, 1 << 40)?;
    let timeout = args.seconds_in("--timeout", DEFAULT_SEND_TIMEOUT, 0.001, 3600.0)?;
    let addrs = resolve(host, port)?;
    let t = send(&addrs, bytes, Duration::from_secs_f64(timeout))?;
    Ok(t.report(
        Object::new()
            .str("workload", "net-send")
            .str("host", host)
            .u64("port", u64::from(port)),
    ))
}

pub fn run_recv(args: &Parsed) -> Result<String, Error> {
    let (listener, local, deadline) = listen(args, "net-recv", DEFAULT_PORT, DEFAULT_RECV_TIMEOUT)?;
    let (peer, t) = receive(&listener, deadline)?;
    Ok(t.report(
        Object::new()
            .str("workload", "net-recv")
            .str("bind", &local.to_string())
            .str("peer", &peer.to_string()),
    ))
}

impl Transfer {
    /// `head` (the workload and its addresses) followed by bytes,
    /// seconds, MiB/s and SHA-256: the JSON line of every transfer.
    pub(crate) fn report(&self, head: Object) -> String {
        head.u64("bytes", self.bytes)
            .f64("seconds", self.seconds)
            .f64("mib_per_s", mib(self.bytes) / self.seconds.max(1e-9))
            .str("sha256", &hex(&self.sha256))
            .finish()
    }
}

/// A connected stream the transfer runs over: TCP here, AF_VSOCK in
/// [`crate::vsock`].
pub(crate) trait Conn: Read + Write {
    /// SO_RCVTIMEO / SO_SNDTIMEO.
    fn set_timeouts(&self, read: Duration, write: Duration) -> io::Result<()>;
    /// Ends the sending side (the peer reads EOF).
    fn shutdown_write(&self) -> io::Result<()>;
}

impl Conn for std::net::TcpStream {
    fn set_timeouts(&self, read: Duration, write: Duration) -> io::Result<()> {
        self.set_read_timeout(Some(read))?;
        self.set_write_timeout(Some(write))
    }

    fn shutdown_write(&self) -> io::Result<()> {
        self.shutdown(Shutdown::Write)
    }
}

/// Sends `bytes` bytes of the data stream to the first of `addrs` that
/// accepts, and waits for the receiver to close.
pub fn send(
    addrs: &[std::net::SocketAddr],
    bytes: u64,
    timeout: Duration,
) -> Result<Transfer, Error> {
    let mut conn = connect(addrs, Instant::now() + timeout)?;
    send_over(&mut conn, bytes, timeout)
}

/// Sends `bytes` bytes of the data stream on `conn`, shuts its sending
/// side and waits for the receiver to close; `timeout` bounds each write
/// and the wait.
pub(crate) fn send_over(
    conn: &mut impl Conn,
    bytes: u64,
    timeout: Duration,
) -> Result<Transfer, Error> {
    conn.set_timeouts(timeout, timeout)
        .context(|| "set timeouts".into())?;
    let mut rng = XorShift64::new(DATA_SEED);
    let mut sha = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let begin = Instant::now();
    let mut sent = 0u64;
    while sent < bytes {
        let n = usize::try_from(bytes - sent).map_or(CHUNK, |left| left.min(CHUNK));
        let piece = &mut buf[..n];
        rng.fill(piece);
        sha.update(piece);
        conn.write_all(piece).map_err(|e| net_error("sending", e))?;
        sent += n as u64;
    }
    conn.shutdown_write().context(|| "shutdown".into())?;
    // The receiver closes once it has read everything: wait for that.
    let mut rest = [0u8; 64];
    loop {
        match conn.read(&mut rest) {
            Ok(0) => break,
            Ok(_) => {
                return Err(Error::Failed(
                    "the receiver sent data; it is not a net-recv".into(),
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(net_error("waiting for the receiver to close", e)),
        }
    }
    Ok(Transfer {
        bytes: sent,
        seconds: begin.elapsed().as_secs_f64(),
        sha256: sha.finalize(),
    })
}

/// Accepts one connection on `listener` and reads it to the end, all
/// before `deadline`.
pub fn receive(listener: &TcpListener, deadline: Instant) -> Result<(IpAddr, Transfer), Error> {
    let conn = accept(listener, deadline)?;
    let peer = conn.peer_addr().context(|| "peer address".into())?.ip();
    Ok((peer, receive_over(conn, deadline)?))
}

/// Reads `conn` to its end before `deadline`, then closes it.
pub(crate) fn receive_over(mut conn: impl Conn, deadline: Instant) -> Result<Transfer, Error> {
    let mut sha = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut received = 0u64;
    let mut first_byte: Option<Instant> = None;
    loop {
        let left = remaining(deadline, "receiving")?;
        conn.set_timeouts(left, left)
            .context(|| "set read timeout".into())?;
        let n = match conn.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(net_error("receiving", e)),
        };
        if n == 0 {
            break;
        }
        first_byte.get_or_insert_with(Instant::now);
        sha.update(&buf[..n]);
        received += n as u64;
    }
    let seconds = first_byte.map_or(0.0, |t| t.elapsed().as_secs_f64());
    drop(conn);
    Ok(Transfer {
        bytes: received,
        seconds,
        sha256: sha.finalize(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, SocketAddr};

    fn stream_digest(bytes: usize) -> [u8; 32] {
        let mut data = vec![0u8; bytes];
        let mut rng = XorShift64::new(DATA_SEED);
        // Cut as the sender cuts it.
        for piece in data.chunks_mut(CHUNK) {
            rng.fill(piece);
        }
        crate::sha256::digest(&data)
    }

    #[test]
    fn transfer_over_loopback() {
        for bytes in [0u64, 1, 8, 4095, CHUNK as u64 + 3, 3 << 20] {
            let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
            let addr: SocketAddr = listener.local_addr().unwrap();
            let server = std::thread::spawn(move || {
                receive(&listener, Instant::now() + Duration::from_secs(20))
            });
            let sent = send(&[addr], bytes, Duration::from_secs(5)).unwrap();
            let (peer, got) = server.join().unwrap().unwrap();
            assert_eq!(peer, IpAddr::V4(Ipv4Addr::LOCALHOST));
            assert_eq!(sent.bytes, bytes);
            assert_eq!(got.bytes, bytes);
            assert_eq!(sent.sha256, got.sha256, "{bytes}");
            assert_eq!(sent.sha256, stream_digest(bytes as usize), "{bytes}");
        }
    }

    #[test]
    fn the_stream_starts_with_the_cpu_workload_data() {
        // First 8 bytes: xorshift64 of DATA_SEED, little endian.
        let mut rng = XorShift64::new(DATA_SEED);
        let mut x = DATA_SEED;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let mut b = [0u8; 8];
        rng.fill(&mut b);
        assert_eq!(b, x.to_le_bytes());
    }

    #[test]
    fn receiver_times_out_without_sender() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let t = Instant::now();
        let err = receive(&listener, t + Duration::from_millis(200)).unwrap_err();
        assert!(err.to_string().contains("timed out"), "{err}");
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn command_lines() {
        let parse = |spec: &Spec, list: &[&str]| {
            let args: Vec<std::ffi::OsString> = list.iter().map(Into::into).collect();
            crate::args::parse(spec, &args).unwrap()
        };
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = listener.local_addr().unwrap().port().to_string();
        let server = std::thread::spawn(move || {
            receive(&listener, Instant::now() + Duration::from_secs(20))
        });
        let line = run_send(&parse(
            &SEND_SPEC,
            &["--host", "127.0.0.1", "--port", &port, "--bytes", "1M"],
        ))
        .unwrap();
        let (_, got) = server.join().unwrap().unwrap();
        assert!(
            line.starts_with(r#"{"workload":"net-send","host":"127.0.0.1","port":"#),
            "{line}"
        );
        assert!(line.contains(r#""bytes":1048576,"#), "{line}");
        assert!(
            line.contains(&format!(r#""sha256":"{}""#, hex(&got.sha256))),
            "{line}"
        );
        for list in [
            &["--port", "1"][..],
            &["--host", "127.0.0.1", "--bytes", "lots"],
            &["--host", "127.0.0.1", "--port", "0"],
            &["--host", "localhost.example"],
        ] {
            assert!(
                matches!(run_send(&parse(&SEND_SPEC, list)), Err(Error::Usage(_))),
                "{list:?}"
            );
        }
        for list in [&["--port", "65536"][..], &["--bind", "anywhere"]] {
            assert!(
                matches!(run_recv(&parse(&RECV_SPEC, list)), Err(Error::Usage(_))),
                "{list:?}"
            );
        }
    }
}
