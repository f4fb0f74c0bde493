//! Host signals, taken through a signalfd so that vmlab handles them as
//! events of its own loops (the VM's control loop, `vmlab container`'s
//! wait for the runtime): the ones that ask vmlab to stop (SIGINT,
//! SIGTERM, SIGHUP, SIGQUIT) and, for a container, SIGCHLD (the runtime
//! exited). A VM flushes its disks before it exits on one; a container
//! gets them passed on.
//!
//! They are blocked while the guard lives and the previous mask restored
//! when it is dropped. Blocked before any other thread starts, they stay
//! blocked in every thread spawned afterwards (vCPUs, devices), so only
//! the signalfd sees them. Children do not inherit the block: Rust's
//! `Command` resets the signal mask before `exec`.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

/// Signals that stop vmlab (and, passed on, the container).
pub const STOP_SIGNALS: [i32; 4] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGQUIT];

/// A signal read from the signalfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    /// The signal number.
    pub signo: i32,
    /// Sent by the kernel (a terminal's ^C or hang-up), not by a process:
    /// the runtime, in vmlab's process group, got it as well.
    pub from_kernel: bool,
}

/// Blocked signals and the signalfd that reports them.
pub struct Signals {
    fd: OwnedFd,
    old_mask: libc::sigset_t,
}

impl Signals {
    /// Blocks SIGCHLD and [`STOP_SIGNALS`] on this thread and opens a
    /// signalfd for them (`vmlab container`).
    pub fn new() -> std::io::Result<Signals> {
        Signals::block(&[libc::SIGCHLD])
    }

    /// Blocks [`STOP_SIGNALS`] only (a VM: its children are not watched).
    pub fn stop_signals() -> std::io::Result<Signals> {
        Signals::block(&[])
    }

    /// Blocks [`STOP_SIGNALS`] and `extra` on this thread and opens a
    /// signalfd for them.
    fn block(extra: &[i32]) -> std::io::Result<Signals> {
        // SAFETY: sigset_t is plain data, initialized by sigemptyset.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: as above; filled by pthread_sigmask.
        let mut old_mask: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid sigset_t and the signal numbers are valid.
        unsafe {
            libc::sigemptyset(&mut set);
            for &sig in STOP_SIGNALS.iter().chain(extra) {
                libc::sigaddset(&mut set, sig);
            }
        }
        // SAFETY: both sets are valid; the old mask is kept for Drop.
        let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old_mask) };
        if rc != 0 {
            return Err(std::io::Error::from_raw_os_error(rc));
        }
        // SAFETY: -1 asks for a new signalfd for the initialized `set`.
        let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) };
        if fd < 0 {
            let e = std::io::Error::last_os_error();
            // SAFETY: restores the mask saved above.
            unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old_mask, std::ptr::null_mut()) };
            return Err(e);
        }
        // SAFETY: `fd` was just returned by signalfd and is owned by no one.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Signals { fd, old_mask })
    }

    /// Waits up to `timeout` (forever with `None`) for a signal; returns
    /// the pending ones (empty on timeout).
    pub fn wait(&self, timeout: Option<Duration>) -> std::io::Result<Vec<Received>> {
        let ms = match timeout {
            // Round up so a short remaining time does not spin at 0 ms.
            Some(t) => i32::try_from(t.as_millis().saturating_add(1)).unwrap_or(i32::MAX),
            None => -1,
        };
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            return if e.kind() == std::io::ErrorKind::Interrupted {
                Ok(Vec::new())
            } else {
                Err(e)
            };
        }
        let mut out = Vec::new();
        while let Some(r) = self.read() {
            out.push(r);
        }
        Ok(out)
    }

    /// The next pending signal, without waiting.
    pub fn read(&self) -> Option<Received> {
        // SAFETY: signalfd_siginfo is plain data.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        // SAFETY: reads at most `size` bytes into `info`.
        let n = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                (&mut info as *mut libc::signalfd_siginfo).cast(),
                size,
            )
        };
        (n == size as isize).then_some(Received {
            signo: info.ssi_signo as i32,
            from_kernel: info.ssi_code == libc::SI_KERNEL,
        })
    }
}

impl AsRawFd for Signals {
    /// The signalfd, to poll in an event loop.
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }
}

impl Drop for Signals {
    fn drop(&mut self) {
        // Signals that arrived and were not read stay pending and are
        // delivered on unblock; drain them first so that a late SIGCHLD
        // (ignored by default anyway) or a stop signal already handled
        // does not kill vmlab during its cleanup.
        while self.read().is_some() {}
        // SAFETY: restores the mask saved in new().
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.old_mask, std::ptr::null_mut()) };
    }
}
