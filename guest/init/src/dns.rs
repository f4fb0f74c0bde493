//! Docker's embedded DNS server inside a VM.
//!
//! On a user-defined network Docker gives a container
//! `nameserver 127.0.0.11`: a resolver that exists only inside the
//! container's network namespace on the host (an iptables DNAT to a socket
//! of dockerd there). In a VM, 127.0.0.11 is the guest's own loopback. So
//! when the resolv.conf init was given names it, init answers UDP queries
//! on 127.0.0.11:53 itself and passes each one, as DNS over TCP (a 2-byte
//! length, then the message), over a vsock connection to host port
//! [`HOST_PORT`], where the runtime's forwarder, in the container's
//! namespace, sends it on to 127.0.0.11:53 (src/oci/dns.rs).
//!
//! Bounded: at most [`MAX_INFLIGHT`] queries at once (more are dropped; a
//! resolver retries), each with a [`TIMEOUT`] on every step.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use vmlab_agent_proto::DOCKER_DNS;
/// The host vsock port the runtime's forwarder listens on.
pub const HOST_PORT: u32 = vmlab_agent_proto::DNS_PORT;
/// The host's CID.
const HOST_CID: u32 = 2;
/// Most queries in flight.
const MAX_INFLIGHT: usize = 16;
/// Per step (connect, send, receive).
const TIMEOUT: Duration = Duration::from_secs(5);

/// Starts the stub if /etc/resolv.conf names 127.0.0.11.
pub fn start_if_wanted() {
    match std::fs::read_to_string("/etc/resolv.conf") {
        Ok(c) if vmlab_agent_proto::names_docker_dns(&c) => {}
        _ => return,
    }
    let sock = match UdpSocket::bind(SocketAddr::from((DOCKER_DNS, 53))) {
        Ok(s) => s,
        Err(e) => {
            crate::console::log_line(&format!("warning: DNS stub on 127.0.0.11:53: {e}"));
            return;
        }
    };
    let spawned = std::thread::Builder::new()
        .name("dns".into())
        .spawn(move || serve(&sock));
    if let Err(e) = spawned {
        crate::console::log_line(&format!("warning: DNS stub thread: {e}"));
    }
}

fn serve(sock: &UdpSocket) {
    let inflight = Arc::new(AtomicUsize::new(0));
    let mut buf = [0u8; 4096];
    loop {
        let Ok((n, from)) = sock.recv_from(&mut buf) else {
            continue;
        };
        if inflight.load(Ordering::Relaxed) >= MAX_INFLIGHT {
            continue;
        }
        let (Some(query), Ok(reply_sock)) = (buf.get(..n).map(<[u8]>::to_vec), sock.try_clone())
        else {
            continue;
        };
        inflight.fetch_add(1, Ordering::Relaxed);
        let count = Arc::clone(&inflight);
        let spawned = std::thread::Builder::new()
            .name("dns-query".into())
            .spawn(move || {
                if let Ok(answer) = ask_host(&query) {
                    let _ = reply_sock.send_to(&answer, from);
                }
                count.fetch_sub(1, Ordering::Relaxed);
            });
        if spawned.is_err() {
            inflight.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// One query over DNS-over-TCP framing to the host forwarder.
fn ask_host(query: &[u8]) -> io::Result<Vec<u8>> {
    let len = u16::try_from(query.len()).map_err(|_| io::ErrorKind::InvalidInput)?;
    let mut s = std::fs::File::from(vsock_connect(HOST_CID, HOST_PORT)?);
    let mut msg = Vec::with_capacity(query.len() + 2);
    msg.extend_from_slice(&len.to_be_bytes());
    msg.extend_from_slice(query);
    s.write_all(&msg)?;
    let mut l = [0u8; 2];
    s.read_exact(&mut l)?;
    let mut answer = vec![0u8; usize::from(u16::from_be_bytes(l))];
    s.read_exact(&mut answer)?;
    Ok(answer)
}

fn vsock_connect(cid: u32, port: u32) -> io::Result<OwnedFd> {
    // SAFETY: socket() takes integer arguments; a non-negative result is a
    // new descriptor nothing else owns.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is fresh (checked above) and owned from here on.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let tv = libc::timeval {
        tv_sec: TIMEOUT.as_secs() as libc::time_t,
        tv_usec: 0,
    };
    for opt in [libc::SO_RCVTIMEO, libc::SO_SNDTIMEO] {
        // SAFETY: setsockopt reads a timeval of the given size.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
    }
    let addr = libc::sockaddr_vm {
        svm_family: libc::AF_VSOCK as libc::sa_family_t,
        svm_reserved1: 0,
        svm_port: port,
        svm_cid: cid,
        svm_zero: [0; 4],
    };
    // SAFETY: addr is a valid sockaddr_vm and its size is passed with it.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_vm).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    };
    match rc {
        0 => Ok(fd),
        _ => Err(io::Error::last_os_error()),
    }
}
