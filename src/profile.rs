//! A sampling profiler for the guest: where is the guest's time going?
//!
//! On a nested-KVM host a guest kernel boot takes tens of seconds, nearly
//! all of it inside the guest, where host tools (`perf`) cannot see which
//! guest function runs. `vmlab run --profile-guest FILE` answers that: a
//! thread kicks every vCPU thread at a fixed rate (the same signal vmlab
//! uses to stop them); the kicked vCPU leaves KVM_RUN, records its RIP and
//! whether the guest had interrupts enabled, and re-enters. The samples are
//! written as text (`ms vcpu rip if`), one per line, for
//! `scripts/guest-profile.py` to map onto the kernel's symbols.
//!
//! Each sample costs one extra exit (a few microseconds); at the default
//! 100 Hz that is noise next to a boot's emulation.

use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// One sample of one vCPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    /// Milliseconds since the profiler started.
    pub ms: u64,
    /// Which vCPU.
    pub vcpu: u8,
    /// The guest's instruction pointer.
    pub rip: u64,
    /// Whether RFLAGS.IF was set (interrupts enabled).
    pub interrupts: bool,
    /// Kernel-text addresses found on the stack, innermost first.
    pub stack: Vec<u64>,
}

/// How many bytes of stack a sample scans.
pub const STACK_SCAN_BYTES: u64 = 2048;
/// At most this many stack addresses per sample.
pub const STACK_MAX_FRAMES: usize = 48;

/// Whether `v` can be an address in the x86_64 kernel image mapping
/// (the top 2 GiB, where Linux maps its text).
pub fn looks_like_kernel_text(v: u64) -> bool {
    (0xffff_ffff_8000_0000..0xffff_ffff_c000_0000).contains(&v)
}

/// RFLAGS.IF.
const RFLAGS_IF: u64 = 1 << 9;

impl Sample {
    /// A sample from a vCPU's registers.
    pub fn new(start: Instant, vcpu: u8, rip: u64, rflags: u64) -> Sample {
        Sample {
            ms: u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX),
            vcpu,
            rip,
            interrupts: rflags & RFLAGS_IF != 0,
            stack: Vec::new(),
        }
    }
}

/// Writes samples as text, one per line: `ms vcpu rip(hex) if(0|1)
/// [stack,addresses,...]`.
pub fn write_samples(path: &Path, samples: &[Sample]) -> std::io::Result<()> {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    writeln!(
        out,
        "# vmlab guest profile: ms vcpu rip interrupts-enabled [stack-text-addresses]"
    )?;
    for s in samples {
        write!(
            out,
            "{} {} {:#x} {}",
            s.ms,
            s.vcpu,
            s.rip,
            u8::from(s.interrupts)
        )?;
        let stack: Vec<String> = s.stack.iter().map(|a| format!("{a:x}")).collect();
        if !stack.is_empty() {
            write!(out, " {}", stack.join(","))?;
        }
        writeln!(out)?;
    }
    out.flush()
}

/// The thread that kicks the vCPU threads.
pub struct Sampler {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Sampler {
    /// Kicks each of `threads` with `signal` every `period` until stopped.
    ///
    /// The pthread ids must stay valid until [`Sampler::stop`] returns:
    /// the caller stops the sampler before it joins the vCPU threads (a
    /// finished but unjoined thread keeps its id).
    pub fn start(
        threads: Vec<libc::pthread_t>,
        signal: i32,
        period: Duration,
    ) -> std::io::Result<Sampler> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("profiler".into())
            .spawn(move || {
                while !flag.load(Ordering::Acquire) {
                    std::thread::sleep(period);
                    for &t in &threads {
                        // SAFETY: `t` is a joinable thread that has not
                        // been joined yet (see `start`), so the id is
                        // valid; the signal has a handler installed.
                        unsafe { libc::pthread_kill(t, signal) };
                    }
                }
            })?;
        Ok(Sampler {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops kicking; returns when the thread has ended.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_record_the_interrupt_flag_and_write_as_text() {
        let start = Instant::now();
        let a = Sample::new(start, 0, 0xffff_ffff_8100_0000, 0x202);
        let mut b = Sample::new(start, 1, 0x1000, 0x2);
        b.stack = vec![0xffff_ffff_8100_0010, 0xffff_ffff_8200_0000];
        assert!(a.interrupts);
        assert!(!b.interrupts);
        let path = std::env::temp_dir().join(format!("vmlab-profile-{}.txt", std::process::id()));
        write_samples(&path, &[a, b]).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(
            lines[1].ends_with(" 0 0xffffffff81000000 1"),
            "{}",
            lines[1]
        );
        assert!(
            lines[2].ends_with(" 1 0x1000 0 ffffffff81000010,ffffffff82000000"),
            "{}",
            lines[2]
        );
        assert!(looks_like_kernel_text(0xffff_ffff_8100_0000));
        assert!(!looks_like_kernel_text(0xffff_8880_0000_0000));
    }
}
