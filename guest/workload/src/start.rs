//! `start`: a marker line for start-time measurements.
//!
//! It does nothing but read two clocks and the kernel release, so that the
//! time from launching it (on the host, in a container, or as a vmlab
//! guest's command) to this line is the start cost of the environment, and
//! the clock values let a caller place the line on the guest's own
//! timeline: `boottime_ns` is the time since that kernel booted, including
//! suspend; `monotonic_ns` is comparable with other CLOCK_MONOTONIC readings
//! of the same kernel.

use crate::error::{Context, Error};
use crate::json::Object;

pub const SPEC: crate::args::Spec = crate::args::Spec {
    command: "start",
    values: &[],
    switches: &[],
};

pub fn run() -> Result<String, Error> {
    // Clocks first: they are the measurement, the rest is metadata.
    let monotonic =
        clock_ns(libc::CLOCK_MONOTONIC).context(|| "clock_gettime(CLOCK_MONOTONIC)".into())?;
    let boottime =
        clock_ns(libc::CLOCK_BOOTTIME).context(|| "clock_gettime(CLOCK_BOOTTIME)".into())?;
    let kernel = kernel_release().context(|| "uname".into())?;
    Ok(Object::new()
        .str("workload", "start")
        .bool("ok", true)
        .u64("pid", u64::from(std::process::id()))
        .str("kernel", &kernel)
        .u64("monotonic_ns", monotonic)
        .u64("boottime_ns", boottime)
        .finish())
}

/// A clock's value in nanoseconds.
pub fn clock_ns(clock: libc::clockid_t) -> std::io::Result<u64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the live local `ts`.
    if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // Both fields are non-negative for these clocks; a negative value would
    // be a kernel bug, mapped to 0 rather than wrapped.
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(ts.tv_nsec).unwrap_or(0);
    Ok(secs.saturating_mul(1_000_000_000).saturating_add(nanos))
}

/// `uname -r`: the release of the running kernel, which tells the three
/// environments apart (a container shares the host's, a guest has its own).
pub fn kernel_release() -> std::io::Result<String> {
    // SAFETY: utsname is plain old data; all-zero is a valid value.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: uname fills the live local struct and nothing else.
    if unsafe { libc::uname(&mut uts) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // The field is NUL-terminated by the kernel; stop at the first NUL, or
    // at the end of the array should one ever be missing.
    let bytes: Vec<u8> = uts
        .release
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_line() {
        let line = run().unwrap();
        assert!(
            line.starts_with(r#"{"workload":"start","ok":true,"pid":"#),
            "{line}"
        );
        let release = kernel_release().unwrap();
        assert!(!release.is_empty());
        assert!(line.contains(&format!(r#""kernel":"{release}""#)), "{line}");
        assert!(line.contains(r#""monotonic_ns":"#) && line.contains(r#""boottime_ns":"#));
        // Boot time includes everything monotonic does (plus suspend).
        let mono = clock_ns(libc::CLOCK_MONOTONIC).unwrap();
        let boot = clock_ns(libc::CLOCK_BOOTTIME).unwrap();
        assert!(mono > 0 && boot + 1_000_000 >= mono);
    }
}
