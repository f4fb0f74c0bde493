//! A guest whose console lines a test reads as they come, and the
//! workload's data stream with its SHA-256 (host side), shared by the
//! network and vsock tests.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Seed and piece size of vmlab-workload's data stream (guest/workload
/// prng.rs and transfer.rs): xorshift64 (13, 7, 17) outputs, little
/// endian, generated in 128 KiB pieces.
pub const DATA_SEED: u64 = 0x9e37_79b9_7f4a_7c15;
pub const CHUNK: usize = 128 << 10;

/// A stream whose sending side can be shut (TCP, Unix).
pub trait HalfClose: Read + Write {
    fn shut_write(&self) -> std::io::Result<()>;
}

impl HalfClose for std::net::TcpStream {
    fn shut_write(&self) -> std::io::Result<()> {
        self.shutdown(std::net::Shutdown::Write)
    }
}

impl HalfClose for std::os::unix::net::UnixStream {
    fn shut_write(&self) -> std::io::Result<()> {
        self.shutdown(std::net::Shutdown::Write)
    }
}

/// Sends `len` bytes of the stream on `conn` (within `limit` from
/// `start`), shuts its sending side and waits for the receiver to close;
/// the digest of what was sent.
pub fn send_stream(
    conn: &mut impl HalfClose,
    len: u64,
    start: Instant,
    limit: Duration,
) -> Result<String, String> {
    let mut stream = Stream::new();
    let mut sha = Sha256Sum::new();
    let mut buf = vec![0u8; CHUNK];
    let mut sent = 0u64;
    while sent < len {
        if start.elapsed() > limit {
            return Err(format!("sending took more than {limit:?}"));
        }
        let n = (len - sent).min(CHUNK as u64) as usize;
        stream.fill(&mut buf[..n]);
        sha.update(&buf[..n]);
        conn.write_all(&buf[..n])
            .map_err(|e| format!("send after {sent} bytes: {e}"))?;
        sent += n as u64;
    }
    conn.shut_write().map_err(|e| e.to_string())?;
    let mut rest = [0u8; 16];
    match conn.read(&mut rest) {
        Ok(0) => Ok(sha.hex()),
        Ok(_) => Err("the receiver sent data".into()),
        Err(e) => Err(format!("waiting for the receiver to close: {e}")),
    }
}

/// Calls `accept` (of a non-blocking listener) until it yields a
/// connection, for up to `limit`.
pub fn accept_within<T>(
    limit: Duration,
    mut accept: impl FnMut() -> std::io::Result<T>,
) -> Result<T, String> {
    let start = Instant::now();
    loop {
        match accept() {
            Ok(c) => return Ok(c),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if start.elapsed() > limit {
                    return Err(format!("nobody connected within {limit:?}"));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(format!("accept: {e}")),
        }
    }
}

/// Reads `conn` to its end (within `limit` from `start`): (bytes, digest).
pub fn receive_stream(
    conn: &mut impl Read,
    start: Instant,
    limit: Duration,
) -> Result<(u64, String), String> {
    let mut sha = Sha256Sum::new();
    let mut buf = vec![0u8; CHUNK];
    let mut received = 0u64;
    loop {
        if start.elapsed() > limit {
            return Err(format!("receiving took more than {limit:?}"));
        }
        match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                sha.update(&buf[..n]);
                received += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("receive after {received} bytes: {e}")),
        }
    }
    Ok((received, sha.hex()))
}

/// A running vmlab whose stdout lines arrive on a channel; killed on drop.
pub struct Guest {
    pub name: &'static str,
    pub child: Child,
    lines: Receiver<String>,
    pub seen: Vec<String>,
    stderr: JoinHandle<String>,
}

impl Guest {
    /// Starts `cmd` (a vmlab run) with its stdout lines on a channel.
    pub fn spawn(name: &'static str, mut cmd: Command) -> Guest {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn vmlab");
        let stdout = child.stdout.take().expect("stdout");
        let mut stderr = child.stderr.take().expect("stderr");
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line.trim_end_matches('\r').to_string()).is_err() {
                    break;
                }
            }
        });
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        });
        Guest {
            name,
            child,
            lines,
            seen: Vec::new(),
            stderr,
        }
    }

    /// The first line (from now on) that `pred` accepts, within `limit`.
    pub fn wait_for(&mut self, what: &str, limit: Duration, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left.min(Duration::from_secs(5))) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if pred(&line) {
                        return line;
                    }
                }
                Err(RecvTimeoutError::Timeout) if Instant::now() < deadline => {}
                Err(e) => {
                    let _ = self.child.kill();
                    panic!(
                        "{}: no {what} within {limit:?} ({e:?}); output so far:\n{}",
                        self.name,
                        self.seen.join("\n")
                    );
                }
            }
        }
    }

    /// Waits for vmlab to exit (bounded); its exit code and stderr.
    pub fn finish(self, limit: Duration) -> (Option<i32>, String) {
        let (code, _, stderr) = self.finish_with_lines(limit);
        (code, stderr)
    }

    /// [`finish`](Self::finish), with every stdout line seen.
    pub fn finish_with_lines(mut self, limit: Duration) -> (Option<i32>, Vec<String>, String) {
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "{}: vmlab did not exit\n{}",
                    self.name,
                    self.seen.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) {
            self.seen.push(line);
        }
        let stderr = std::mem::replace(&mut self.stderr, std::thread::spawn(String::new));
        let stderr = stderr.join().unwrap_or_default();
        super::assert_host_workarounds(&stderr);
        (status.code(), std::mem::take(&mut self.seen), stderr)
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The workload's data stream: `len` bytes.
pub struct Stream {
    state: u64,
}

impl Stream {
    pub fn new() -> Stream {
        Stream { state: DATA_SEED }
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let mut x = self.state;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.state = x;
            chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
        }
    }
}

/// SHA-256 through the host's `sha256sum`, independent of the guest's
/// implementation.
pub struct Sha256Sum {
    child: Child,
}

impl Sha256Sum {
    pub fn new() -> Sha256Sum {
        let child = Command::new("sha256sum")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("sha256sum");
        Sha256Sum { child }
    }

    pub fn update(&mut self, data: &[u8]) {
        self.child
            .stdin
            .as_mut()
            .expect("stdin")
            .write_all(data)
            .expect("write to sha256sum");
    }

    pub fn hex(mut self) -> String {
        drop(self.child.stdin.take());
        let mut out = String::new();
        self.child
            .stdout
            .take()
            .expect("stdout")
            .read_to_string(&mut out)
            .expect("read sha256sum");
        let _ = self.child.wait();
        out.split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string()
    }
}

/// The digest of the first `len` bytes of the data stream.
pub fn expected_digest(len: u64) -> String {
    let mut stream = Stream::new();
    let mut sha = Sha256Sum::new();
    let mut buf = vec![0u8; CHUNK];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(CHUNK as u64) as usize;
        stream.fill(&mut buf[..n]);
        sha.update(&buf[..n]);
        done += n as u64;
    }
    sha.hex()
}

/// Asserts what a workload's JSON result line reports of the data stream:
/// its SHA-256 `digest`, and with `bytes` its length.
pub fn assert_stream_line(line: &str, digest: &str, bytes: Option<u64>) {
    assert_eq!(json_field(line, "sha256"), Some(digest), "{line}");
    if let Some(bytes) = bytes {
        assert_eq!(
            json_field(line, "bytes"),
            Some(bytes.to_string().as_str()),
            "{line}"
        );
    }
}

/// The value of `"key":"..."` or `"key":N` in a workload JSON line.
pub fn json_field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let start = line.find(&format!("\"{key}\":"))? + key.len() + 3;
    let rest = &line[start..];
    let rest = rest.strip_prefix('"').unwrap_or(rest);
    let end = rest.find(['"', ',', '}'])?;
    Some(&rest[..end])
}
