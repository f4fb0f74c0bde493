//! VM-exit accounting for `--stats`: how often each kind of exit happened
//! and how long vmlab spent handling it (from KVM_RUN returning to the
//! next KVM_RUN), per port or device. For virtualization labs this is the
//! answer to "what does a VM exit cost, and what causes them?".

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

/// What a vCPU exited for.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ExitKind {
    /// Port read.
    IoIn(u16),
    /// Port write.
    IoOut(u16),
    /// MMIO read in the named region.
    MmioRead(&'static str),
    /// MMIO write in the named region.
    MmioWrite(&'static str),
    /// HLT reached user space (no in-kernel irqchip would handle it).
    Hlt,
    /// Triple fault.
    Shutdown,
    /// An instruction KVM rejected and vmlab emulated.
    Emulated(String),
    /// KVM_RUN returned early for a signal (a kick).
    Interrupted,
    /// KVM system event (reset, shutdown, crash).
    SystemEvent,
    /// Anything else, named.
    Other(String),
}

impl fmt::Display for ExitKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitKind::IoIn(p) => write!(f, "io-in  port {p:#06x}{}", port_name(*p)),
            ExitKind::IoOut(p) => write!(f, "io-out port {p:#06x}{}", port_name(*p)),
            ExitKind::MmioRead(r) => write!(f, "mmio-read  {r}"),
            ExitKind::MmioWrite(r) => write!(f, "mmio-write {r}"),
            ExitKind::Hlt => write!(f, "hlt"),
            ExitKind::Shutdown => write!(f, "shutdown (triple fault)"),
            ExitKind::Emulated(m) => write!(f, "emulation fallback: {m}"),
            ExitKind::Interrupted => write!(f, "interrupted (kick)"),
            ExitKind::SystemEvent => write!(f, "system event"),
            ExitKind::Other(s) => write!(f, "{s}"),
        }
    }
}

fn port_name(port: u16) -> &'static str {
    match port {
        0x3f8..=0x3ff => " (COM1)",
        0x2f8..=0x2ff | 0x3e8..=0x3ef | 0x2e8..=0x2ef => " (COM2-4 probe)",
        0x60..=0x64 => " (i8042)",
        0x70..=0x71 => " (CMOS/RTC)",
        0x80 => " (POST/io delay)",
        0xf4..=0xf5 => " (vmlab status)",
        0xcf8..=0xcff => " (PCI config)",
        _ => "",
    }
}

/// Count and handling time of one kind of exit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExitStat {
    /// How many.
    pub count: u64,
    /// Total handling time.
    pub time: Duration,
}

/// Exit statistics of one vCPU, or merged over all.
#[derive(Debug, Clone, Default)]
pub struct ExitStats {
    /// Per kind.
    pub by_kind: HashMap<ExitKind, ExitStat>,
    /// Time spent inside KVM_RUN (guest and in-kernel handling).
    pub in_guest: Duration,
    /// Guest RIP samples (`--profile-guest`), in the order taken.
    pub samples: Vec<crate::profile::Sample>,
}

impl ExitStats {
    /// Records one exit.
    pub fn record(&mut self, kind: ExitKind, time: Duration) {
        let s = self.by_kind.entry(kind).or_default();
        s.count += 1;
        s.time += time;
    }

    /// Adds another vCPU's numbers.
    pub fn merge(&mut self, other: &ExitStats) {
        for (k, v) in &other.by_kind {
            let s = self.by_kind.entry(k.clone()).or_default();
            s.count += v.count;
            s.time += v.time;
        }
        self.in_guest += other.in_guest;
        self.samples.extend_from_slice(&other.samples);
    }

    /// Total exits.
    pub fn total(&self) -> ExitStat {
        self.by_kind
            .values()
            .fold(ExitStat::default(), |acc, s| ExitStat {
                count: acc.count + s.count,
                time: acc.time + s.time,
            })
    }

    /// Rows sorted by count, largest first.
    pub fn rows(&self) -> Vec<(&ExitKind, &ExitStat)> {
        let mut rows: Vec<_> = self.by_kind.iter().collect();
        rows.sort_by(|a, b| b.1.count.cmp(&a.1.count).then(a.0.cmp(b.0)));
        rows
    }
}

impl fmt::Display for ExitStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let total = self.total();
        writeln!(
            f,
            "vmlab exit statistics ({} exits to user space)",
            total.count
        )?;
        writeln!(
            f,
            "{:>10}  {:>12}  {:>9}  reason",
            "count", "handling us", "avg us"
        )?;
        for (kind, s) in self.rows() {
            let us = s.time.as_secs_f64() * 1e6;
            let avg = if s.count > 0 {
                us / s.count as f64
            } else {
                0.0
            };
            writeln!(f, "{:>10}  {:>12.0}  {:>9.1}  {kind}", s.count, us, avg)?;
        }
        writeln!(
            f,
            "{:>10}  {:>12.0}  {:>9}  total handling in vmlab",
            total.count,
            total.time.as_secs_f64() * 1e6,
            ""
        )?;
        write!(
            f,
            "time inside KVM_RUN (all vCPUs): {:.3} s",
            self.in_guest.as_secs_f64()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_merge_and_sort() {
        let mut a = ExitStats::default();
        a.record(ExitKind::IoOut(0x3f8), Duration::from_micros(2));
        a.record(ExitKind::IoOut(0x3f8), Duration::from_micros(4));
        a.record(ExitKind::Hlt, Duration::from_micros(1));
        let mut b = ExitStats::default();
        b.record(
            ExitKind::Emulated("popcnt".into()),
            Duration::from_micros(10),
        );
        b.in_guest = Duration::from_secs(1);
        a.merge(&b);
        assert_eq!(a.total().count, 4);
        assert_eq!(a.total().time, Duration::from_micros(17));
        assert_eq!(a.rows()[0].0, &ExitKind::IoOut(0x3f8));
        assert_eq!(a.rows()[0].1.count, 2);
        let text = a.to_string();
        assert!(text.contains("io-out port 0x03f8 (COM1)"));
        assert!(text.contains("emulation fallback: popcnt"));
        assert!(text.contains("4 exits"));
    }
}
