//! The host terminal: raw mode while a guest console is attached to it,
//! restored on every way out.
//!
//! Not vmm-sys-util's `Terminal`: its raw mode clears only ICANON, ECHO
//! and ISIG, so a `vmlab exec -t` session would still have the host
//! translate CR to NL and post-process output (OPOST), and its
//! `set_canon_mode` sets those flags back instead of restoring the
//! terminal as it was. `cfmakeraw` on a saved copy, restored on drop,
//! gives the guest the bytes typed and the user their terminal back.

use std::os::fd::RawFd;

/// Puts a terminal in raw mode and restores it when dropped.
pub struct RawMode {
    fd: RawFd,
    saved: libc::termios,
}

impl RawMode {
    /// Raw mode on `fd` if it is a terminal; `None` if it is not.
    pub fn enable(fd: RawFd) -> Option<RawMode> {
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(fd) } != 1 {
            return None;
        }
        // SAFETY: termios is plain data; tcgetattr fills it or fails.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `saved` is a valid termios to write to.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return None;
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw only modifies the struct it is given.
        unsafe { libc::cfmakeraw(&mut raw) };
        // Keep output post-processing so host-side messages stay readable;
        // the guest's tty does its own newline translation.
        raw.c_oflag = saved.c_oflag;
        // SAFETY: `raw` is a valid termios for this descriptor.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return None;
        }
        Some(RawMode { fd, saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: restores the settings read from the same descriptor.
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
    }
}
