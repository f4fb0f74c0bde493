//! `mem`: memory copy bandwidth.
//!
//! Copies one buffer of `--mib` MiB into another `--repeat` times with
//! `copy_from_slice` (the libc `memcpy` that real programs use) and reports
//! the best and the median run. Needs twice `--mib` of RAM: with the default
//! 256 MiB, a guest needs more than vmlab's default 256M (`--memory 1G`, or
//! a smaller `--mib`).
//!
//! Both buffers are written once before timing, because a first touch of a
//! page is a page fault (each one several exits in a nested guest) and that
//! is another measurement. Rates count the copied size once (MiB copied per
//! second), not read plus write traffic.

use std::time::Instant;

use crate::args::{Parsed, Spec};
use crate::error::Error;
use crate::json::Object;
use crate::prng::{XorShift64, DATA_SEED};

pub const SPEC: Spec = Spec {
    command: "mem",
    values: &["--mib", "--repeat"],
    switches: &[],
};

const DEFAULT_MIB: u64 = 256;
const MAX_MIB: u64 = 1 << 20;
const DEFAULT_REPEAT: u64 = 5;
const MAX_REPEAT: u64 = 1000;

pub fn run(args: &Parsed) -> Result<String, Error> {
    let mib = args.u64_in("--mib", DEFAULT_MIB, 1, MAX_MIB)?;
    let repeat = args.u64_in("--repeat", DEFAULT_REPEAT, 1, MAX_REPEAT)?;
    let mut times = copy_times(mib, repeat)?;
    times.sort_by(f64::total_cmp);
    let best = times.first().copied().unwrap_or(f64::NAN);
    let median = median(&times);
    let rate = |secs: f64| mib as f64 / secs;
    Ok(Object::new()
        .str("workload", "mem")
        .u64("mib", mib)
        .u64("repeat", repeat)
        .f64("best_mib_per_s", rate(best))
        .f64("median_mib_per_s", rate(median))
        .f64("best_seconds", best)
        .f64("median_seconds", median)
        .finish())
}

/// The duration of each of `repeat` copies of `mib` MiB, in seconds.
fn copy_times(mib: u64, repeat: u64) -> Result<Vec<f64>, Error> {
    let mut src = allocate(mib, 0)?;
    XorShift64::new(DATA_SEED).fill(&mut src);
    // Not zero: a zero fill of fresh memory is one an optimizer may drop,
    // and these pages must really be touched.
    let mut dst = allocate(mib, 0x5a)?;
    let mut times = Vec::new();
    for _ in 0..repeat {
        let start = Instant::now();
        dst.copy_from_slice(std::hint::black_box(&src));
        std::hint::black_box(&mut dst);
        times.push(start.elapsed().as_secs_f64());
    }
    Ok(times)
}

/// `mib` MiB filled with `byte`, or an error (not an abort) when the
/// allocator refuses. With overcommit the kernel may still refuse later, by
/// the OOM killer, while the buffer is filled.
fn allocate(mib: u64, byte: u8) -> Result<Vec<u8>, Error> {
    let too_big = || Error::Failed(format!("cannot allocate {mib} MiB"));
    let bytes = usize::try_from(mib << 20).map_err(|_| too_big())?;
    let mut buf = Vec::new();
    buf.try_reserve_exact(bytes).map_err(|_| too_big())?;
    buf.resize(bytes, byte);
    Ok(buf)
}

/// Median of sorted values (mean of the two middle ones for an even count).
pub fn median(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    match n {
        0 => f64::NAN,
        _ if !n.is_multiple_of(2) => sorted[n / 2],
        _ => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_run() {
        let args =
            crate::args::parse(&SPEC, &["--mib".into(), "4".into(), "--repeat=3".into()]).unwrap();
        let line = run(&args).unwrap();
        assert!(
            line.starts_with(r#"{"workload":"mem","mib":4,"repeat":3,"best_mib_per_s":"#),
            "{line}"
        );
        assert!(!line.contains("null"), "{line}");
    }

    #[test]
    fn copies_really_happen() {
        let times = copy_times(1, 2).unwrap();
        assert_eq!(times.len(), 2);
        assert!(times.iter().all(|&t| t > 0.0));
    }

    #[test]
    fn medians() {
        assert!(median(&[]).is_nan());
        assert_eq!(median(&[3.0]), 3.0);
        assert_eq!(median(&[1.0, 2.0, 10.0]), 2.0);
        assert_eq!(median(&[1.0, 2.0, 4.0, 10.0]), 3.0);
    }

    #[test]
    fn bad_arguments() {
        for bad in [["--mib", "0"], ["--repeat", "0"], ["--mib", "x"]] {
            let args = crate::args::parse(&SPEC, &[bad[0].into(), bad[1].into()]).unwrap();
            assert!(matches!(run(&args), Err(Error::Usage(_))), "{bad:?}");
        }
    }
}
