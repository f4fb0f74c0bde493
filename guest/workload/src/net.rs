//! `net-server` and `net-client`: TCP throughput and round-trip latency.
//!
//! A session is two TCP connections from the client, in this order:
//!
//! 1. throughput: the client sends the hello, then data for `--seconds`,
//!    then shuts down its sending side; the server counts the bytes up to
//!    EOF and answers with the count (8 bytes, little endian). The client's
//!    rate is that count over the time from its first byte to the answer,
//!    so data still in socket buffers when it stops sending is not counted
//!    as sent; the server reports its own receive rate too.
//! 2. latency: the client sends the hello, then `--rtt-count` times one
//!    byte that the server echoes (TCP_NODELAY on both ends), and closes.
//!
//! The hello is [`MAGIC`] and one byte for the phase, so a stray
//! connection (a port scan, another program) ends the server with an error
//! instead of a wrong measurement.
//!
//! The server listens on 127.0.0.1:7430 unless told otherwise: reachable
//! from outside (a container's published port, another machine) only with
//! an explicit `--bind 0.0.0.0`. With `--port 0` the kernel picks a free
//! port; the server always names the address it listens on in one stderr
//! line, `vmlab-workload: net-server listening on ADDR:PORT`, which is also
//! the mark that it is ready. The client takes an IP address (see
//! [`resolve`]).
//!
//! Nothing can hang: the server serves one session and exits (`--once`, the
//! only mode), and gives up at `--timeout` seconds after it starts (default
//! 120), waiting for connections included. The client tries to connect for
//! up to `--timeout` seconds (default 10; it retries while the server is not
//! listening yet, so the two can be started together), waits at most that
//! long on any read or write, and gives up after `--seconds` + 3 ×
//! `--timeout` in total.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use crate::args::{Parsed, Spec};
use crate::error::{Context, Error};
use crate::json::Object;

pub const SERVER_SPEC: Spec = Spec {
    command: "net-server",
    values: &["--port", "--bind", "--timeout"],
    switches: &["--once"],
};

pub const CLIENT_SPEC: Spec = Spec {
    command: "net-client",
    values: &["--host", "--port", "--seconds", "--rtt-count", "--timeout"],
    switches: &[],
};

/// Starts both connections; the last byte is the protocol version.
pub const MAGIC: [u8; 8] = *b"VMLWNET\x01";
const PHASE_THROUGHPUT: u8 = b'T';
const PHASE_LATENCY: u8 = b'L';

pub const DEFAULT_PORT: u16 = 7430;
const DEFAULT_SECONDS: f64 = 5.0;
const DEFAULT_RTT_COUNT: u64 = 1000;
const DEFAULT_SERVER_TIMEOUT: f64 = 120.0;
const DEFAULT_CLIENT_TIMEOUT: f64 = 10.0;
/// Size of each write and read of the throughput phase.
const CHUNK: usize = 128 << 10;

/// What the server measured.
#[derive(Debug)]
pub struct ServerReport {
    pub peer: IpAddr,
    pub received_bytes: u64,
    pub seconds: f64,
    pub rtt_exchanges: u64,
}

/// What the client measured.
#[derive(Debug)]
pub struct ClientReport {
    pub sent_bytes: u64,
    /// The server's count.
    pub received_bytes: u64,
    pub seconds: f64,
    /// Round-trip times in nanoseconds, sorted.
    pub rtts_ns: Vec<u64>,
}

pub fn run_server(args: &Parsed) -> Result<String, Error> {
    let (listener, local, deadline) =
        listen(args, "net-server", DEFAULT_PORT, DEFAULT_SERVER_TIMEOUT)?;
    let r = serve(&listener, deadline)?;
    Ok(Object::new()
        .str("workload", "net-server")
        .str("bind", &local.to_string())
        .str("peer", &r.peer.to_string())
        .u64("received_bytes", r.received_bytes)
        .f64("seconds", r.seconds)
        .f64("mib_per_s", mib(r.received_bytes) / r.seconds)
        .u64("rtt_exchanges", r.rtt_exchanges)
        .finish())
}

pub fn run_client(args: &Parsed) -> Result<String, Error> {
    let host = args
        .text("--host")?
        .ok_or(crate::args::ArgError::Required("--host"))?;
    let port = port(args, DEFAULT_PORT, 1)?;
    let seconds = args.seconds_in("--seconds", DEFAULT_SECONDS, 0.001, 3600.0)?;
    let rtt_count = args.u64_in("--rtt-count", DEFAULT_RTT_COUNT, 1, 10_000_000)?;
    let timeout = args.seconds_in("--timeout", DEFAULT_CLIENT_TIMEOUT, 0.001, 3600.0)?;
    let addrs = resolve(host, port)?;
    let r = client(
        &addrs,
        Duration::from_secs_f64(seconds),
        rtt_count,
        Duration::from_secs_f64(timeout),
    )?;
    let median = percentile_ns(&r.rtts_ns, 50.0);
    let p99 = percentile_ns(&r.rtts_ns, 99.0);
    Ok(Object::new()
        .str("workload", "net-client")
        .str("host", host)
        .u64("port", u64::from(port))
        .u64("sent_bytes", r.sent_bytes)
        .u64("received_bytes", r.received_bytes)
        .f64("seconds", r.seconds)
        .f64("mib_per_s", mib(r.received_bytes) / r.seconds)
        .f64(
            "mbit_per_s",
            r.received_bytes as f64 * 8.0 / 1e6 / r.seconds,
        )
        .u64("rtt_count", r.rtts_ns.len() as u64)
        .f64("rtt_median_us", median / 1e3)
        .f64("rtt_p99_us", p99 / 1e3)
        .f64("rtt_min_us", percentile_ns(&r.rtts_ns, 0.0) / 1e3)
        .finish())
}

/// `--port`; 0 (a free port, chosen by the kernel) only makes sense for
/// the server, hence `min`.
/// `--port` (default `default`, at least `min`).
pub(crate) fn port(args: &Parsed, default: u16, min: u64) -> Result<u16, Error> {
    // In the u16 range, so the cast is exact.
    Ok(args.u64_in("--port", u64::from(default), min, 65535)? as u16)
}

/// The listening side of `net-server` and `net-recv`: `--bind` (default
/// 127.0.0.1), `--port`, `--timeout` (the deadline returned) and the
/// accepted `--once`; binds, returns the listener, the address bound and
/// the deadline, and prints the one stderr line on success
/// (the address actually bound, for `--port 0`, and the readiness mark
/// scripts wait for).
pub(crate) fn listen(
    args: &Parsed,
    workload: &str,
    default_port: u16,
    default_timeout: f64,
) -> Result<(TcpListener, SocketAddr, Instant), Error> {
    let bind: IpAddr = match args.text("--bind")? {
        None => IpAddr::V4(Ipv4Addr::LOCALHOST),
        Some(text) => text.parse().map_err(|_| crate::args::ArgError::BadValue {
            flag: "--bind",
            value: text.to_string(),
            why: "not an IP address".into(),
        })?,
    };
    let port = port(args, default_port, 0)?;
    let timeout = args.seconds_in("--timeout", default_timeout, 0.001, 86_400.0)?;
    // --once is the only mode; accepted so that scripts can say it.
    let _ = args.switch("--once");
    let deadline = Instant::now() + Duration::from_secs_f64(timeout);
    let listener = TcpListener::bind((bind, port)).context(|| format!("bind {bind}:{port}"))?;
    let local = listener.local_addr().context(|| "local address".into())?;
    eprintln!("vmlab-workload: {workload} listening on {local}");
    Ok((listener, local, deadline))
}

pub(crate) fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

/// `--host` as a socket address: an IP address, or `localhost`.
///
/// No name resolution on purpose: in a static glibc binary `getaddrinfo`
/// loads the NSS modules of the glibc it was linked with at run time, which
/// a minimal guest or another distribution's container does not have, and
/// it adds 200 KB to a binary copied under emulation. Scripts pass the
/// address of the host, the container or the guest.
pub(crate) fn resolve(host: &str, port: u16) -> Result<Vec<SocketAddr>, Error> {
    let ip = match host {
        "localhost" => IpAddr::V4(Ipv4Addr::LOCALHOST),
        _ => host.parse().map_err(|_| crate::args::ArgError::BadValue {
            flag: "--host",
            value: host.to_string(),
            why: "not an IP address (names are not resolved)".into(),
        })?,
    };
    Ok(vec![SocketAddr::new(ip, port)])
}

/// Time left until `deadline`, or a timeout error naming `what`.
pub(crate) fn remaining(deadline: Instant, what: &str) -> Result<Duration, Error> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(Error::Failed(format!("timed out {what}")));
    }
    Ok(left)
}

/// Maps a read/write timeout (EAGAIN/ETIMEDOUT from SO_RCVTIMEO) to a
/// readable error.
pub(crate) fn net_error(what: &str, err: io::Error) -> Error {
    match err.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            Error::Failed(format!("timed out {what}"))
        }
        _ => Error::Io {
            what: what.to_string(),
            err,
        },
    }
}

/// Serves one session on `listener` (already bound), all of it before
/// `deadline`.
pub fn serve(listener: &TcpListener, deadline: Instant) -> Result<ServerReport, Error> {
    // 1. Throughput.
    let mut conn = accept(listener, deadline)?;
    let peer = conn.peer_addr().context(|| "peer address".into())?.ip();
    conn.set_read_timeout(Some(remaining(deadline, "receiving")?))
        .context(|| "set read timeout".into())?;
    expect_hello(&mut conn, PHASE_THROUGHPUT)?;
    let mut buf = vec![0u8; CHUNK];
    let mut received = 0u64;
    let mut first_byte: Option<Instant> = None;
    loop {
        let n = match conn.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(net_error("receiving", e)),
        };
        if n == 0 {
            break;
        }
        first_byte.get_or_insert_with(Instant::now);
        received += n as u64;
        remaining(deadline, "receiving")?;
    }
    let seconds = first_byte.map_or(0.0, |t| t.elapsed().as_secs_f64());
    conn.set_write_timeout(Some(remaining(deadline, "answering")?))
        .context(|| "set write timeout".into())?;
    conn.write_all(&received.to_le_bytes())
        .map_err(|e| net_error("sending the byte count", e))?;
    drop(conn);

    // 2. Latency: echo until the client closes.
    let mut conn = accept(listener, deadline)?;
    let peer2 = conn.peer_addr().context(|| "peer address".into())?.ip();
    if peer2 != peer {
        return Err(Error::Failed(format!(
            "second connection from {peer2}, expected {peer}"
        )));
    }
    conn.set_nodelay(true)
        .context(|| "set TCP_NODELAY".into())?;
    let left = remaining(deadline, "echoing")?;
    conn.set_read_timeout(Some(left))
        .and_then(|()| conn.set_write_timeout(Some(left)))
        .context(|| "set timeouts".into())?;
    expect_hello(&mut conn, PHASE_LATENCY)?;
    let mut exchanges = 0u64;
    let mut byte = [0u8; 1];
    loop {
        match conn.read(&mut byte) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(net_error("echoing", e)),
        }
        conn.write_all(&byte).map_err(|e| net_error("echoing", e))?;
        exchanges += 1;
        // A clock read per exchange is cheap next to two system calls.
        remaining(deadline, "echoing")?;
    }
    Ok(ServerReport {
        peer,
        received_bytes: received,
        seconds,
        rtt_exchanges: exchanges,
    })
}

/// Accepts one connection before `deadline` (poll, since accept itself has
/// no timeout), in blocking mode.
pub(crate) fn accept(listener: &TcpListener, deadline: Instant) -> Result<TcpStream, Error> {
    listener
        .set_nonblocking(true)
        .context(|| "set non-blocking mode".into())?;
    loop {
        wait_readable(listener.as_raw_fd(), deadline, "waiting for the client")?;
        // The listener is non-blocking: a connection that was reset
        // between poll and accept is a retry, not an accept that blocks.
        match listener.accept() {
            Ok((conn, _)) => {
                conn.set_nonblocking(false)
                    .context(|| "set blocking mode".into())?;
                return Ok(conn);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) => {}
            Err(err) => {
                return Err(Error::Io {
                    what: "accept".into(),
                    err,
                })
            }
        }
    }
}

/// Waits until `fd` is readable (a listener has a connection), or fails
/// with a timeout naming `what` at `deadline`.
pub(crate) fn wait_readable(fd: RawFd, deadline: Instant, what: &str) -> Result<(), Error> {
    loop {
        let left = remaining(deadline, what)?;
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // Rounded up so that a sub-millisecond rest does not spin.
        let ms =
            libc::c_int::try_from(left.as_millis().saturating_add(1)).unwrap_or(libc::c_int::MAX);
        // SAFETY: one pollfd in a live local, and the count says one.
        let ready = unsafe { libc::poll(&mut pfd, 1, ms) };
        if ready < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(Error::Io {
                what: "poll".into(),
                err,
            });
        }
        if ready > 0 {
            return Ok(());
        }
        // Else the deadline check above ends the loop.
    }
}

fn expect_hello(conn: &mut TcpStream, phase: u8) -> Result<(), Error> {
    let mut hello = [0u8; 9];
    conn.read_exact(&mut hello)
        .map_err(|e| net_error("reading the client's hello", e))?;
    if hello[..8] != MAGIC || hello[8] != phase {
        return Err(Error::Failed(
            "the peer is not a vmlab-workload net-client of this version".into(),
        ));
    }
    Ok(())
}

/// Connects, retrying while nothing listens yet, until `deadline`.
pub(crate) fn connect(addrs: &[SocketAddr], deadline: Instant) -> Result<TcpStream, Error> {
    let mut last_err = None;
    loop {
        for addr in addrs {
            let left = remaining(deadline, &format!("connecting to {addr}"))?;
            match TcpStream::connect_timeout(addr, left) {
                Ok(conn) => return Ok(conn),
                Err(e) => last_err = Some((addr, e)),
            }
        }
        if Instant::now() + Duration::from_millis(50) >= deadline {
            return Err(match last_err {
                Some((addr, err)) => Error::Io {
                    what: format!("connect to {addr}"),
                    err,
                },
                None => Error::Failed("no address to connect to".into()),
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs both phases against a server at `addrs`.
pub fn client(
    addrs: &[SocketAddr],
    seconds: Duration,
    rtt_count: u64,
    timeout: Duration,
) -> Result<ClientReport, Error> {
    let start = Instant::now();
    let deadline = start + seconds + 3 * timeout;
    let io_timeout =
        |what: &str| -> Result<Duration, Error> { Ok(remaining(deadline, what)?.min(timeout)) };

    // 1. Throughput.
    let mut conn = connect(addrs, (start + timeout).min(deadline))?;
    conn.set_write_timeout(Some(io_timeout("sending")?))
        .context(|| "set write timeout".into())?;
    let mut hello = [0u8; 9];
    hello[..8].copy_from_slice(&MAGIC);
    hello[8] = PHASE_THROUGHPUT;
    conn.write_all(&hello)
        .map_err(|e| net_error("sending", e))?;
    let buf = vec![0u8; CHUNK];
    let mut sent = 0u64;
    let begin = Instant::now();
    while begin.elapsed() < seconds {
        conn.write_all(&buf).map_err(|e| net_error("sending", e))?;
        sent += CHUNK as u64;
        remaining(deadline, "sending")?;
    }
    conn.shutdown(Shutdown::Write)
        .context(|| "shutdown".into())?;
    conn.set_read_timeout(Some(io_timeout("waiting for the byte count")?))
        .context(|| "set read timeout".into())?;
    let mut count = [0u8; 8];
    conn.read_exact(&mut count)
        .map_err(|e| net_error("waiting for the byte count", e))?;
    let elapsed = begin.elapsed().as_secs_f64();
    let received = u64::from_le_bytes(count);
    if received != sent {
        return Err(Error::Failed(format!(
            "the server received {received} bytes of {sent}"
        )));
    }
    drop(conn);

    // 2. Latency.
    let mut conn = connect(addrs, (Instant::now() + timeout).min(deadline))?;
    conn.set_nodelay(true)
        .context(|| "set TCP_NODELAY".into())?;
    let t = io_timeout("measuring round trips")?;
    conn.set_read_timeout(Some(t))
        .and_then(|()| conn.set_write_timeout(Some(t)))
        .context(|| "set timeouts".into())?;
    hello[8] = PHASE_LATENCY;
    conn.write_all(&hello)
        .map_err(|e| net_error("measuring round trips", e))?;
    let mut rtts = Vec::with_capacity(usize::try_from(rtt_count).unwrap_or(0));
    let mut byte = [0x2au8];
    for _ in 0..rtt_count {
        let t0 = Instant::now();
        conn.write_all(&byte)
            .and_then(|()| conn.read_exact(&mut byte))
            .map_err(|e| net_error("measuring round trips", e))?;
        rtts.push(u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX));
        remaining(deadline, "measuring round trips")?;
    }
    drop(conn);
    rtts.sort_unstable();
    Ok(ClientReport {
        sent_bytes: sent,
        received_bytes: received,
        seconds: elapsed,
        rtts_ns: rtts,
    })
}

/// Nearest-rank percentile `p` (0 to 100) of sorted values, except the
/// median (p = 50), which averages the two middle values of an even count.
/// NaN for no values.
pub fn percentile_ns(sorted: &[u64], p: f64) -> f64 {
    let n = sorted.len();
    if n == 0 {
        return f64::NAN;
    }
    if p == 50.0 && n.is_multiple_of(2) {
        return (sorted[n / 2 - 1] as f64 + sorted[n / 2] as f64) / 2.0;
    }
    // Rank ceil(p/100 * n), 1-based, at least 1.
    let rank = ((p / 100.0) * n as f64).ceil().max(1.0) as usize;
    sorted[rank.min(n) - 1] as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loopback_listener() -> (TcpListener, SocketAddr) {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let addr = listener.local_addr().unwrap();
        (listener, addr)
    }

    #[test]
    fn session_over_loopback() {
        let (listener, addr) = loopback_listener();
        let server =
            std::thread::spawn(move || serve(&listener, Instant::now() + Duration::from_secs(20)));
        let r = client(
            &[addr],
            Duration::from_millis(200),
            200,
            Duration::from_secs(5),
        )
        .unwrap();
        let s = server.join().unwrap().unwrap();
        assert!(r.sent_bytes > 0);
        assert_eq!(r.received_bytes, r.sent_bytes);
        assert_eq!(s.received_bytes, r.sent_bytes);
        assert_eq!(s.rtt_exchanges, 200);
        assert_eq!(r.rtts_ns.len(), 200);
        assert_eq!(s.peer, IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert!(r.seconds >= 0.2 && r.seconds < 10.0, "{}", r.seconds);
        assert!(r.rtts_ns.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn command_lines_over_loopback() {
        let (listener, addr) = loopback_listener();
        let server =
            std::thread::spawn(move || serve(&listener, Instant::now() + Duration::from_secs(20)));
        let args: Vec<std::ffi::OsString> = [
            "--host",
            "127.0.0.1",
            "--port",
            &addr.port().to_string(),
            "--seconds",
            "0.1",
            "--rtt-count",
            "20",
        ]
        .iter()
        .map(Into::into)
        .collect();
        let line = run_client(&crate::args::parse(&CLIENT_SPEC, &args).unwrap()).unwrap();
        assert!(
            line.starts_with(r#"{"workload":"net-client","host":"127.0.0.1","port":"#),
            "{line}"
        );
        assert!(line.contains(r#""rtt_count":20,"#), "{line}");
        assert!(!line.contains("null"), "{line}");
        server.join().unwrap().unwrap();
    }

    #[test]
    fn server_times_out_without_client() {
        let (listener, _) = loopback_listener();
        let t = Instant::now();
        let err = serve(&listener, t + Duration::from_millis(200)).unwrap_err();
        assert!(
            err.to_string().contains("timed out waiting for the client"),
            "{err}"
        );
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn server_rejects_a_stranger() {
        let (listener, addr) = loopback_listener();
        let server =
            std::thread::spawn(move || serve(&listener, Instant::now() + Duration::from_secs(10)));
        let mut conn = TcpStream::connect(addr).unwrap();
        conn.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
        let err = server.join().unwrap().unwrap_err();
        assert!(
            err.to_string().contains("not a vmlab-workload net-client"),
            "{err}"
        );
    }

    #[test]
    fn server_times_out_on_a_silent_client() {
        let (listener, addr) = loopback_listener();
        let server = std::thread::spawn(move || {
            serve(&listener, Instant::now() + Duration::from_millis(300))
        });
        let conn = TcpStream::connect(addr).unwrap();
        let err = server.join().unwrap().unwrap_err();
        assert!(err.to_string().contains("timed out"), "{err}");
        drop(conn);
    }

    #[test]
    fn client_gives_up_when_nobody_listens() {
        // Bind, learn a free port, close it: nothing listens there now.
        let (listener, addr) = loopback_listener();
        drop(listener);
        let t = Instant::now();
        let err = client(
            &[addr],
            Duration::from_millis(100),
            1,
            Duration::from_millis(300),
        )
        .unwrap_err();
        assert!(
            err.to_string().starts_with(&format!("connect to {addr}")),
            "{err}"
        );
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn percentiles() {
        assert!(percentile_ns(&[], 50.0).is_nan());
        assert_eq!(percentile_ns(&[7], 99.0), 7.0);
        let v: Vec<u64> = (1..=1000).collect();
        assert_eq!(percentile_ns(&v, 50.0), 500.5);
        assert_eq!(percentile_ns(&v, 99.0), 990.0);
        assert_eq!(percentile_ns(&v, 0.0), 1.0);
        assert_eq!(percentile_ns(&v, 100.0), 1000.0);
        assert_eq!(percentile_ns(&[1, 2, 3], 50.0), 2.0);
    }

    #[test]
    fn bad_arguments() {
        let parse = |spec: &Spec, list: &[&str]| {
            let args: Vec<std::ffi::OsString> = list.iter().map(Into::into).collect();
            crate::args::parse(spec, &args).unwrap()
        };
        for list in [
            &["--port", "65536"][..],
            &["--bind", "localhost"],
            &["--bind", "127.0.0.1", "--timeout", "0"],
        ] {
            assert!(
                matches!(run_server(&parse(&SERVER_SPEC, list)), Err(Error::Usage(_))),
                "{list:?}"
            );
        }
        for list in [
            &["--port", "1"][..],
            &["--host", "127.0.0.1", "--seconds", "-1"],
            &["--host", "127.0.0.1", "--rtt-count", "0"],
            &["--host", "example.org"],
            &["--host", "127.0.0.1", "--port", "0"],
        ] {
            assert!(
                matches!(run_client(&parse(&CLIENT_SPEC, list)), Err(Error::Usage(_))),
                "{list:?}"
            );
        }
    }
}
