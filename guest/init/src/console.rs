//! The console: init's messages, the tty mode, and draining output.
//!
//! fds 0/1/2 of init are `/dev/console` (ttyS0), opened by the kernel from
//! the node in the root filesystem (the initramfs carries one: the kernel
//! opens the console before init can mount devtmpfs, and Rust's runtime
//! aborts before `main` if fds 0-2 are closed and `/dev/null` is missing).
//! The command inherits them, so everything the command prints and
//! everything init says goes over the same serial line to the VMM.

use std::io;

/// Writes one message line to stderr in a single `write` (messages must not
/// be split, and every system call is expensive in the guest). Errors are
/// ignored on purpose: init has nowhere else to report them, and must not
/// panic (`eprintln!` would, e.g. on EIO from a hung-up tty).
pub fn log_line(msg: &str) {
    let mut line = String::with_capacity(msg.len() + 13);
    line.push_str("vmlab-init: ");
    line.push_str(msg);
    line.push('\n');
    let mut buf = line.as_bytes();
    while !buf.is_empty() {
        // SAFETY: writes from a live buffer of the given length.
        let n = unsafe { libc::write(2, buf.as_ptr().cast(), buf.len()) };
        if n > 0 {
            buf = buf.get(n as usize..).unwrap_or(&[]);
        } else if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        } else {
            return;
        }
    }
}

/// Sets the console mode for `vmlab.tty`.
///
/// `tty = true`: the host side is a terminal that does its own line editing
/// display; the kernel's default cooked mode with echo is right, and is left
/// untouched (no system call).
///
/// `tty = false`: the host side is a pipe or file. Echo would duplicate the
/// input into the output, ONLCR would turn `\n` into `\r\n`, and canonical
/// mode would interpret erase/kill characters and buffer lines, so the tty is
/// made raw (`cfmakeraw`: no echo, no output processing, no line discipline
/// editing, no signal characters, 8-bit clean).
pub fn set_mode(tty: bool) -> io::Result<()> {
    if tty {
        return Ok(());
    }
    // SAFETY: termios is plain old data; tcgetattr fills it in fully.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: t is a valid termios for the duration of the calls.
    unsafe {
        if libc::tcgetattr(0, &mut t) != 0 {
            return Err(io::Error::last_os_error());
        }
        libc::cfmakeraw(&mut t);
    }
    t.c_cc[libc::VMIN] = 1;
    t.c_cc[libc::VTIME] = 0;
    // SAFETY: as above. One tty underlies fds 0, 1 and 2, so setting it once
    // on fd 0 applies to all of them.
    if unsafe { libc::tcsetattr(0, libc::TCSANOW, &t) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Waits until everything written to the console has left the UART. The VMM
/// stops the VM when it sees the exit status, so without this the tail of the
/// command's output could still be in the tty buffer and be lost. Errors (e.g.
/// stdout is not a tty) are ignored: there is nothing to drain then.
pub fn drain() {
    // SAFETY: tcdrain only waits on the descriptor.
    unsafe { libc::tcdrain(1) };
}
