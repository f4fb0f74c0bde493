//! VM-exit accounting for `--stats`: how often each kind of exit happened
//! and how long vmlab spent handling it (from KVM_RUN returning to the
//! next KVM_RUN), per port or device. For virtualization labs this is the
//! answer to "what does a VM exit cost, and what causes them?".

use std::fmt;
use std::time::Duration;

use crate::emulate::EmulatedInsn;

/// The MMIO regions exits are counted by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MmioRegion {
    /// The virtio-mmio device windows.
    VirtioMmio,
    /// The IOAPIC page (normally handled in KVM).
    Ioapic,
    /// The local APIC page (normally handled in KVM).
    Lapic,
    /// No device there.
    Unassigned,
}

impl MmioRegion {
    const ALL: [MmioRegion; 4] = [
        MmioRegion::VirtioMmio,
        MmioRegion::Ioapic,
        MmioRegion::Lapic,
        MmioRegion::Unassigned,
    ];

    /// The name in the report.
    pub const fn name(self) -> &'static str {
        match self {
            MmioRegion::VirtioMmio => "virtio-mmio",
            MmioRegion::Ioapic => "ioapic",
            MmioRegion::Lapic => "lapic",
            MmioRegion::Unassigned => "unassigned",
        }
    }
}

/// What a vCPU exited for. `Copy` and without heap data: recording an
/// exit is an array update on the vCPU thread, never an allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ExitKind {
    /// Port read.
    IoIn(u16),
    /// Port write.
    IoOut(u16),
    /// MMIO read in the region.
    MmioRead(MmioRegion),
    /// MMIO write in the region.
    MmioWrite(MmioRegion),
    /// HLT reached user space (no in-kernel irqchip would handle it).
    Hlt,
    /// Triple fault.
    Shutdown,
    /// An instruction KVM rejected and vmlab emulated.
    Emulated(EmulatedInsn),
    /// An instruction KVM rejected and vmlab could not emulate.
    EmulationFailed,
    /// KVM_RUN returned early for a signal (a kick).
    Interrupted,
    /// KVM system event (reset, shutdown, crash).
    SystemEvent,
    /// KVM_EXIT_INTERNAL_ERROR.
    InternalError,
    /// KVM_EXIT_FAIL_ENTRY.
    FailEntry,
    /// KVM_RUN itself failed.
    RunError,
    /// An exit vmlab does not expect.
    Unexpected,
}

/// The kinds without a port, in table order.
const SIMPLE: [ExitKind; 8] = [
    ExitKind::Hlt,
    ExitKind::Shutdown,
    ExitKind::EmulationFailed,
    ExitKind::Interrupted,
    ExitKind::SystemEvent,
    ExitKind::InternalError,
    ExitKind::FailEntry,
    ExitKind::RunError,
];
/// Size of the table of kinds without a port: the simple ones, then
/// `Unexpected`, then reads and writes per MMIO region, then one per
/// emulated instruction.
const FIXED: usize = SIMPLE.len() + 1 + 2 * MmioRegion::ALL.len() + EmulatedInsn::ALL.len();

impl ExitKind {
    /// The slot of a kind without a port in [`ExitStats`]' fixed table.
    fn slot(self) -> Option<usize> {
        let mmio = SIMPLE.len() + 1;
        let emulated = mmio + 2 * MmioRegion::ALL.len();
        Some(match self {
            ExitKind::IoIn(_) | ExitKind::IoOut(_) => return None,
            ExitKind::Unexpected => SIMPLE.len(),
            ExitKind::MmioRead(r) => mmio + 2 * r as usize,
            ExitKind::MmioWrite(r) => mmio + 2 * r as usize + 1,
            ExitKind::Emulated(i) => emulated + i as usize,
            simple => SIMPLE.iter().position(|k| *k == simple)?,
        })
    }

    /// The kind in slot `slot` of the fixed table.
    fn of_slot(slot: usize) -> Option<ExitKind> {
        let mmio = SIMPLE.len() + 1;
        let emulated = mmio + 2 * MmioRegion::ALL.len();
        match slot {
            s if s < SIMPLE.len() => Some(SIMPLE[s]),
            s if s == SIMPLE.len() => Some(ExitKind::Unexpected),
            s if s < emulated => {
                let region = MmioRegion::ALL[(s - mmio) / 2];
                Some(match (s - mmio) % 2 {
                    0 => ExitKind::MmioRead(region),
                    _ => ExitKind::MmioWrite(region),
                })
            }
            s => EmulatedInsn::ALL
                .get(s - emulated)
                .map(|i| ExitKind::Emulated(*i)),
        }
    }
}

impl fmt::Display for ExitKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitKind::IoIn(p) => write!(f, "io-in  port {p:#06x}{}", port_name(*p)),
            ExitKind::IoOut(p) => write!(f, "io-out port {p:#06x}{}", port_name(*p)),
            ExitKind::MmioRead(r) => write!(f, "mmio-read  {}", r.name()),
            ExitKind::MmioWrite(r) => write!(f, "mmio-write {}", r.name()),
            ExitKind::Hlt => write!(f, "hlt"),
            ExitKind::Shutdown => write!(f, "shutdown (triple fault)"),
            ExitKind::Emulated(m) => write!(f, "emulation fallback: {m}"),
            ExitKind::EmulationFailed => write!(f, "emulation fallback: failed"),
            ExitKind::Interrupted => write!(f, "interrupted (kick)"),
            ExitKind::SystemEvent => write!(f, "system event"),
            ExitKind::InternalError => write!(f, "internal error"),
            ExitKind::FailEntry => write!(f, "fail entry"),
            ExitKind::RunError => write!(f, "KVM_RUN error"),
            ExitKind::Unexpected => write!(f, "unexpected exit"),
        }
    }
}

/// The device (or what a guest probes for) at a port, "" if none.
pub fn port_region(port: u16) -> &'static str {
    match port {
        0x3f8..=0x3ff => "COM1",
        0x2f8..=0x2ff | 0x3e8..=0x3ef | 0x2e8..=0x2ef => "COM2-4 probe",
        0x60..=0x64 => "i8042",
        0x70..=0x71 => "CMOS/RTC",
        0x80 => "POST/io delay",
        0xf4..=0xf5 => "vmlab status",
        0xcf8..=0xcff => "PCI config",
        _ => "",
    }
}

fn port_name(port: u16) -> String {
    match port_region(port) {
        "" => String::new(),
        name => format!(" ({name})"),
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

impl ExitStat {
    fn add(&mut self, other: ExitStat) {
        self.count += other.count;
        self.time += other.time;
    }
}

/// Port exits are counted in a fixed open-addressing table: a guest uses
/// a handful of ports; more distinct ports than slots share one overflow
/// row instead of allocating.
const PORT_SLOTS: usize = 64;

#[derive(Debug, Clone, Copy, Default)]
struct PortSlot {
    /// Port and direction (bit 16: write), plus 1; 0 is a free slot.
    key: u32,
    stat: ExitStat,
}

/// Exit statistics of one vCPU, or merged over all.
#[derive(Debug, Clone)]
pub struct ExitStats {
    fixed: [ExitStat; FIXED],
    ports: [PortSlot; PORT_SLOTS],
    /// Port exits that found the port table full.
    other_ports: ExitStat,
    /// Time spent inside KVM_RUN (guest and in-kernel handling).
    pub in_guest: Duration,
    /// Guest RIP samples (`--profile-guest`), in the order taken.
    pub samples: Vec<crate::profile::Sample>,
}

impl Default for ExitStats {
    fn default() -> Self {
        ExitStats {
            fixed: [ExitStat::default(); FIXED],
            ports: [PortSlot::default(); PORT_SLOTS],
            other_ports: ExitStat::default(),
            in_guest: Duration::ZERO,
            samples: Vec::new(),
        }
    }
}

fn port_key(kind: ExitKind) -> Option<u32> {
    match kind {
        ExitKind::IoIn(p) => Some(u32::from(p) + 1),
        ExitKind::IoOut(p) => Some((u32::from(p) | 1 << 16) + 1),
        _ => None,
    }
}

fn port_kind(key: u32) -> ExitKind {
    let k = key - 1;
    let port = (k & 0xffff) as u16;
    match k >> 16 {
        0 => ExitKind::IoIn(port),
        _ => ExitKind::IoOut(port),
    }
}

impl ExitStats {
    /// Records one exit: an array update, no allocation.
    pub fn record(&mut self, kind: ExitKind, time: Duration) {
        self.add(kind, ExitStat { count: 1, time });
    }

    fn add(&mut self, kind: ExitKind, stat: ExitStat) {
        if let Some(slot) = kind.slot() {
            self.fixed[slot].add(stat);
            return;
        }
        let Some(key) = port_key(kind) else { return };
        let start = (key as usize).wrapping_mul(0x9e37) % PORT_SLOTS;
        for i in 0..PORT_SLOTS {
            let slot = &mut self.ports[(start + i) % PORT_SLOTS];
            if slot.key == key || slot.key == 0 {
                slot.key = key;
                slot.stat.add(stat);
                return;
            }
        }
        self.other_ports.add(stat);
    }

    /// The numbers of one kind.
    pub fn get(&self, kind: ExitKind) -> ExitStat {
        self.rows()
            .into_iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, s)| s)
            .unwrap_or_default()
    }

    /// Adds another vCPU's numbers.
    pub fn merge(&mut self, other: &ExitStats) {
        for (slot, s) in other.fixed.iter().enumerate() {
            self.fixed[slot].add(*s);
        }
        for p in other.ports.iter().filter(|p| p.key != 0) {
            self.add(port_kind(p.key), p.stat);
        }
        self.other_ports.add(other.other_ports);
        self.in_guest += other.in_guest;
        self.samples.extend_from_slice(&other.samples);
    }

    /// Total exits.
    pub fn total(&self) -> ExitStat {
        let mut total = self.other_ports;
        for s in self.fixed.iter().chain(self.ports.iter().map(|p| &p.stat)) {
            total.add(*s);
        }
        total
    }

    /// The kinds that happened, sorted by count, largest first (built
    /// for the report: this allocates).
    pub fn rows(&self) -> Vec<(ExitKind, ExitStat)> {
        let mut rows: Vec<(ExitKind, ExitStat)> = self
            .fixed
            .iter()
            .enumerate()
            .filter_map(|(slot, s)| Some((ExitKind::of_slot(slot)?, *s)))
            .chain(
                self.ports
                    .iter()
                    .filter(|p| p.key != 0)
                    .map(|p| (port_kind(p.key), p.stat)),
            )
            .filter(|(_, s)| s.count > 0)
            .collect();
        rows.sort_by(|a, b| b.1.count.cmp(&a.1.count).then(a.0.cmp(&b.0)));
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
        let other_ports = (self.other_ports.count > 0).then_some(self.other_ports);
        let rows = self.rows().into_iter().map(|(k, s)| (k.to_string(), s));
        for (kind, s) in rows.chain(other_ports.map(|s| ("io (other ports)".to_string(), s))) {
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
            ExitKind::Emulated(EmulatedInsn::Popcnt),
            Duration::from_micros(10),
        );
        b.in_guest = Duration::from_secs(1);
        a.merge(&b);
        assert_eq!(a.total().count, 4);
        assert_eq!(a.total().time, Duration::from_micros(17));
        assert_eq!(a.rows()[0].0, ExitKind::IoOut(0x3f8));
        assert_eq!(a.rows()[0].1.count, 2);
        let text = a.to_string();
        assert!(text.contains("io-out port 0x03f8 (COM1)"));
        assert!(text.contains("emulation fallback: popcnt"));
        assert!(text.contains("4 exits"));
    }

    #[test]
    fn every_fixed_slot_round_trips() {
        for slot in 0..FIXED {
            let kind = ExitKind::of_slot(slot).unwrap();
            assert_eq!(kind.slot(), Some(slot), "{kind:?}");
        }
        assert_eq!(ExitKind::of_slot(FIXED), None);
        assert_eq!(ExitKind::IoIn(1).slot(), None);
    }

    #[test]
    fn many_ports_fill_the_table_then_share_a_row() {
        let mut s = ExitStats::default();
        for port in 0..200u16 {
            s.record(ExitKind::IoIn(port), Duration::from_micros(1));
            s.record(ExitKind::IoOut(port), Duration::from_micros(1));
        }
        s.record(ExitKind::IoIn(0), Duration::from_micros(1));
        assert_eq!(s.total().count, 401);
        assert_eq!(s.get(ExitKind::IoIn(0)).count, 2);
        assert_eq!(s.rows().len(), PORT_SLOTS);
        assert_eq!(s.other_ports.count, 400 - PORT_SLOTS as u64);
        assert!(s.to_string().contains("io (other ports)"));
        let mut merged = ExitStats::default();
        merged.merge(&s);
        merged.merge(&s);
        assert_eq!(merged.total().count, 802);
    }
}
