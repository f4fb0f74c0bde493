//! The host end of virtio-vsock: Unix sockets, as Firecracker does it.
//!
//! - vmlab listens on the socket PATH. A host process connects and
//!   writes `CONNECT <port>\n`; vmlab opens a connection to that guest
//!   port and, once the guest accepts, answers `OK <local port>\n`; then
//!   the stream carries the connection's bytes. If the guest refuses (RST),
//!   vmlab closes the stream without an answer.
//! - A guest connection to host port P is forwarded to the Unix socket
//!   `PATH_P`; if nothing listens there the guest gets RST.
//!
//! [`connect`] is the client side of the handshake, for host programs.

use std::io::{self, Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The longest `CONNECT <port>\n` line vmlab reads (a u32 port is ten
/// digits; some slack for spaces).
pub const MAX_CONNECT_LINE: usize = 32;

/// Why the vsock socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// bind/listen failed.
    #[error("cannot listen on the vsock socket {path}: {source}")]
    Listen {
        /// The socket path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// Something other than a socket is in the way.
    #[error("vsock socket {0}: the path exists and is not a socket (remove it or choose another)")]
    NotASocket(PathBuf),
    /// A live process listens there.
    #[error("vsock socket {0} is in use by a running process")]
    InUse(PathBuf),
    /// The stale socket could not be removed.
    #[error("cannot remove the stale vsock socket {path}: {source}")]
    Stale {
        /// The socket path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
}

/// The listening socket and its file, which is removed when this is
/// dropped (if it is still the one vmlab created).
#[derive(Debug)]
pub struct HostSocket {
    listener: UnixListener,
    path: PathBuf,
    /// (device, inode) of the socket file vmlab created.
    id: Option<(u64, u64)>,
}

impl HostSocket {
    /// Listens on `path`: a stale socket file (nobody listening) is
    /// removed first; a live one or a non-socket is an error.
    pub fn bind(path: &Path) -> Result<HostSocket, SocketError> {
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() {
                return Err(SocketError::NotASocket(path.to_path_buf()));
            }
            if UnixStream::connect(path).is_ok() {
                return Err(SocketError::InUse(path.to_path_buf()));
            }
            std::fs::remove_file(path).map_err(|source| SocketError::Stale {
                path: path.to_path_buf(),
                source,
            })?;
        }
        let listener = UnixListener::bind(path).map_err(|source| SocketError::Listen {
            path: path.to_path_buf(),
            source,
        })?;
        listener
            .set_nonblocking(true)
            .map_err(|source| SocketError::Listen {
                path: path.to_path_buf(),
                source,
            })?;
        let id = std::fs::symlink_metadata(path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        Ok(HostSocket {
            listener,
            path: path.to_path_buf(),
            id,
        })
    }

    /// The listener (non-blocking).
    pub fn listener(&self) -> &UnixListener {
        &self.listener
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The socket for guest connections to host port `port`: `PATH_port`.
    pub fn port_path(&self, port: u32) -> PathBuf {
        let mut p = self.path.as_os_str().to_os_string();
        p.push(format!("_{port}"));
        PathBuf::from(p)
    }

    /// Removes the socket file if it is still vmlab's (a new vmlab may
    /// have replaced it).
    pub fn remove(&self) {
        let ours = std::fs::symlink_metadata(&self.path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        if ours.is_some() && ours == self.id {
            if let Err(e) = std::fs::remove_file(&self.path) {
                log::debug!("cannot remove {}: {e}", self.path.display());
            }
        }
    }
}

impl Drop for HostSocket {
    fn drop(&mut self) {
        self.remove();
    }
}

/// Parses a `CONNECT <port>` line (without its newline).
pub fn parse_connect(line: &[u8]) -> Option<u32> {
    let line = std::str::from_utf8(line).ok()?;
    let port = line.strip_prefix("CONNECT ")?.trim_end_matches('\r');
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    port.parse().ok()
}

/// Connects to the Unix socket at `path` without blocking: a listener
/// whose backlog is full counts as refusing (the device thread never
/// waits for a host program).
pub fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain old data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path too long or not valid",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: socket() takes no pointers; a negative result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just created and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: addr is a live, initialised sockaddr_un and len does not
    // exceed its size (checked above).
    let rc = unsafe {
        libc::connect(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            (&addr as *const libc::sockaddr_un).cast(),
            len as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(fd))
}

/// The host side of the handshake: connects to vmlab's vsock socket,
/// asks for guest port `port`, and waits up to `timeout` for the `OK`
/// line. The stream returned carries the connection's bytes (blocking,
/// no timeouts). A guest that refuses gives `ConnectionRefused`.
pub fn connect(socket: &Path, port: u32, timeout: Duration) -> io::Result<UnixStream> {
    let deadline = Instant::now() + timeout;
    let mut stream = UnixStream::connect(socket)?;
    stream.write_all(format!("CONNECT {port}\n").as_bytes())?;
    let mut line = Vec::with_capacity(MAX_CONNECT_LINE);
    let mut byte = [0u8; 1];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("vsock port {port}: no answer from the guest within {timeout:?}"),
            ));
        }
        stream.set_read_timeout(Some(left))?;
        // One byte at a time: what follows the line is the guest's.
        match stream.read(&mut byte) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    format!("vsock port {port}: the guest refused the connection"),
                ))
            }
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) if line.len() < MAX_CONNECT_LINE => line.push(byte[0]),
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "vsock: the handshake answer is too long",
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e),
        }
    }
    let ok = std::str::from_utf8(&line)
        .ok()
        .and_then(|l| l.strip_prefix("OK "))
        .is_some_and(|p| p.parse::<u32>().is_ok());
    if !ok {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "vsock: unexpected handshake answer {:?}",
                String::from_utf8_lossy(&line)
            ),
        ));
    }
    stream.set_read_timeout(None)?;
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_path(tag: &str) -> PathBuf {
        std::env::temp_dir().join(format!(
            "vmlab-vsock-unix-{}-{tag}.sock",
            std::process::id()
        ))
    }

    #[test]
    fn connect_lines() {
        assert_eq!(parse_connect(b"CONNECT 52"), Some(52));
        assert_eq!(parse_connect(b"CONNECT 4294967295"), Some(u32::MAX));
        assert_eq!(parse_connect(b"CONNECT 52\r"), Some(52));
        assert_eq!(parse_connect(b"CONNECT 4294967296"), None);
        assert_eq!(parse_connect(b"CONNECT "), None);
        assert_eq!(parse_connect(b"CONNECT -1"), None);
        assert_eq!(parse_connect(b"CONNECT +1"), None);
        assert_eq!(parse_connect(b"connect 52"), None);
        assert_eq!(parse_connect(b"CONNECT 5 2"), None);
        assert_eq!(parse_connect(b"\xffCONNECT 5"), None);
    }

    #[test]
    fn bind_replaces_stale_sockets_and_refuses_live_ones() {
        let path = temp_path("bind");
        let _ = std::fs::remove_file(&path);
        let s = HostSocket::bind(&path).unwrap();
        assert!(matches!(
            HostSocket::bind(&path),
            Err(SocketError::InUse(_))
        ));
        assert_eq!(
            s.port_path(1234),
            PathBuf::from(format!("{}_1234", path.display()))
        );
        // A socket file nobody listens on any more is stale.
        let stale = UnixListener::bind(temp_path("stale")).unwrap();
        drop(stale);
        let again = HostSocket::bind(&temp_path("stale")).unwrap();
        drop(again);
        assert!(!temp_path("stale").exists(), "removed on drop");
        drop(s);
        assert!(!path.exists());
        std::fs::write(&path, b"not a socket").unwrap();
        assert!(matches!(
            HostSocket::bind(&path),
            Err(SocketError::NotASocket(_))
        ));
        std::fs::remove_file(&path).unwrap();
        let e = HostSocket::bind(Path::new("/nonexistent-dir/x.sock")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent-dir/x.sock"), "{e}");
    }

    #[test]
    fn nonblocking_connect() {
        let path = temp_path("nb");
        let _ = std::fs::remove_file(&path);
        assert!(connect_nonblocking(&path).is_err());
        let l = UnixListener::bind(&path).unwrap();
        let mut c = connect_nonblocking(&path).unwrap();
        let (mut s, _) = l.accept().unwrap();
        c.write_all(b"hi").unwrap();
        let mut b = [0u8; 2];
        s.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"hi");
        std::fs::remove_file(&path).unwrap();
        let long = PathBuf::from("/".repeat(200));
        assert_eq!(
            connect_nonblocking(&long).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
    }

    #[test]
    fn client_handshake() {
        let path = temp_path("client");
        let _ = std::fs::remove_file(&path);
        let l = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            for answer in [&b"OK 1073741824\nrest"[..], b"", b"NO\n"] {
                let (mut s, _) = l.accept().unwrap();
                let mut line = [0u8; 11];
                s.read_exact(&mut line).unwrap();
                assert_eq!(&line, b"CONNECT 52\n");
                s.write_all(answer).unwrap();
            }
        });
        let mut s = connect(&path, 52, Duration::from_secs(5)).unwrap();
        let mut rest = [0u8; 4];
        s.read_exact(&mut rest).unwrap();
        assert_eq!(&rest, b"rest");
        let e = connect(&path, 52, Duration::from_secs(5)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused);
        let e = connect(&path, 52, Duration::from_secs(5)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        server.join().unwrap();
        std::fs::remove_file(&path).unwrap();
    }
}
