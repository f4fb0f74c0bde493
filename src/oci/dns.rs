//! The host half of Docker's embedded DNS for a VM (the guest half is
//! guest/init/src/dns.rs): on a user-defined network the container's
//! resolv.conf says `nameserver 127.0.0.11`, which answers only inside the
//! container's network namespace. The monitor forks this forwarder there
//! before it becomes the VMM; it listens on the VM's vsock port 53
//! (`VM/vsock.sock_53`, Firecracker's model for guest-initiated
//! connections) and pipes each connection, DNS over TCP, to
//! 127.0.0.11:53. It dies with the VMM (PR_SET_PDEATHSIG).
//!
//! Bounded: [`MAX_CONNECTIONS`] at once, [`TIMEOUT`] per read and write,
//! [`MAX_MESSAGE`] bytes per direction.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmlab_agent_proto::DOCKER_DNS;
/// The vsock port the guest's stub connects to.
pub const VSOCK_PORT: u32 = vmlab_agent_proto::DNS_PORT;
/// Most connections at once.
const MAX_CONNECTIONS: usize = 32;
/// Per read or write.
const TIMEOUT: Duration = Duration::from_secs(10);
/// Most bytes one connection carries each way.
const MAX_MESSAGE: u64 = 1 << 20;
/// How long the forwarder waits for the VM's state directory.
const VM_DIR_WAIT: Duration = Duration::from_secs(300);

/// Whether the resolv.conf the plan gives the guest (its `--volume
/// FILE:/etc/resolv.conf[:ro]`) names 127.0.0.11.
pub fn wanted(run_args: &[String]) -> bool {
    let resolv = run_args
        .windows(2)
        .filter(|w| w[0] == "--volume")
        .find_map(|w| {
            let v = w[1].strip_suffix(":ro").unwrap_or(&w[1]);
            v.strip_suffix(":/etc/resolv.conf")
        });
    resolv
        .and_then(|path| std::fs::read_to_string(path).ok())
        .is_some_and(|c| vmlab_agent_proto::names_docker_dns(&c))
}

/// Forks the forwarder for the VM whose state directory is `vm_dir` (made
/// by `vmlab run` after the monitor's exec). Call only while the process
/// is single-threaded (the monitor before its exec).
pub fn spawn_forwarder(vm_dir: PathBuf) -> std::io::Result<()> {
    // SAFETY: getpid has no preconditions.
    let parent = unsafe { libc::getpid() };
    // SAFETY: the caller is single-threaded, so the child may run
    // ordinary Rust code after fork.
    match unsafe { libc::fork() } {
        -1 => Err(std::io::Error::last_os_error()),
        0 => {
            // SAFETY: prctl, getppid and open/dup2 on /dev/null: no memory
            // effects beyond the fd table.
            unsafe {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                if libc::getppid() != parent {
                    libc::_exit(0);
                }
                let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
                if null >= 0 {
                    for fd in 0..3 {
                        libc::dup2(null, fd);
                    }
                    libc::close(null);
                }
            }
            serve(&vm_dir);
            // SAFETY: _exit ends the child without running the parent's
            // atexit handlers.
            unsafe { libc::_exit(0) }
        }
        _ => Ok(()),
    }
}

fn serve(vm_dir: &Path) {
    let deadline = Instant::now() + VM_DIR_WAIT;
    while !vm_dir.is_dir() {
        if Instant::now() > deadline {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut path = vm_dir.join("vsock.sock").into_os_string();
    path.push(format!("_{VSOCK_PORT}"));
    let Ok(listener) = UnixListener::bind(&path) else {
        return;
    };
    let live = Arc::new(AtomicUsize::new(0));
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        if live.load(Ordering::Relaxed) >= MAX_CONNECTIONS {
            continue;
        }
        live.fetch_add(1, Ordering::Relaxed);
        let count = Arc::clone(&live);
        let spawned = std::thread::Builder::new()
            .name("dns-forward".into())
            .spawn(move || {
                let _ = forward(conn);
                count.fetch_sub(1, Ordering::Relaxed);
            });
        if spawned.is_err() {
            live.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Pipes one guest connection to 127.0.0.11:53 over TCP and back.
fn forward(guest: UnixStream) -> std::io::Result<()> {
    let dns = TcpStream::connect_timeout(&SocketAddr::from((DOCKER_DNS, 53)), TIMEOUT)?;
    guest.set_read_timeout(Some(TIMEOUT))?;
    guest.set_write_timeout(Some(TIMEOUT))?;
    dns.set_read_timeout(Some(TIMEOUT))?;
    dns.set_write_timeout(Some(TIMEOUT))?;
    let (mut g_in, mut d_out) = (guest.try_clone()?, dns.try_clone()?);
    let up = std::thread::Builder::new()
        .name("dns-up".into())
        .spawn(move || {
            let _ = std::io::copy(&mut (&mut g_in).take(MAX_MESSAGE), &mut d_out);
            let _ = d_out.shutdown(std::net::Shutdown::Write);
        })?;
    let (mut d_in, mut g_out) = (dns, guest);
    let _ = std::io::copy(&mut (&mut d_in).take(MAX_MESSAGE), &mut g_out);
    let _ = g_out.flush();
    let _ = g_out.shutdown(std::net::Shutdown::Both);
    let _ = up.join();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_resolv_conf_naming_127_0_0_11_wants_it() {
        let dir = std::env::temp_dir().join(format!("vmlab-dns-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b) = (dir.join("a"), dir.join("b"));
        std::fs::write(&a, "nameserver 127.0.0.11\noptions ndots:0\n").unwrap();
        std::fs::write(&b, "nameserver 10.0.0.1\n").unwrap();
        let args = |p: &Path| {
            vec![
                "--volume".to_string(),
                format!("{}:/etc/resolv.conf", p.display()),
            ]
        };
        assert!(wanted(&args(&a)));
        let ro = vec![
            "--volume".to_string(),
            format!("{}:/etc/resolv.conf:ro", a.display()),
        ];
        assert!(wanted(&ro));
        assert!(!wanted(&args(&b)));
        assert!(!wanted(&[]));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
