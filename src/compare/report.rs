//! The comparison report: statistics over repeated runs, the claims from
//! the user's notes and whether this machine's numbers agree, and the
//! Markdown and JSON renderings.
//!
//! Everything here is pure (no processes, no clocks), so it is tested with
//! known inputs: the numbers in a report are exactly the medians, minima,
//! maxima and ratios of what the runs printed, nothing interpolated or
//! estimated.

use serde_json::{json, Value};

/// The three ways the same workload runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Env {
    /// Directly on the host (the baseline).
    Host,
    /// Under an OCI runtime (`vmlab container`).
    Container,
    /// In a vmlab micro-VM (`vmlab run --image`).
    Vm,
}

impl Env {
    /// In column order.
    pub const ALL: [Env; 3] = [Env::Host, Env::Container, Env::Vm];

    /// The JSON key.
    pub fn key(self) -> &'static str {
        match self {
            Env::Host => "host",
            Env::Container => "container",
            Env::Vm => "vm",
        }
    }

    /// For people.
    pub fn label(self) -> &'static str {
        match self {
            Env::Host => "host",
            Env::Container => "container",
            Env::Vm => "micro-VM",
        }
    }

    fn index(self) -> usize {
        match self {
            Env::Host => 0,
            Env::Container => 1,
            Env::Vm => 2,
        }
    }
}

/// What a row's numbers are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Seconds.
    Seconds,
    /// Bytes.
    Bytes,
    /// MiB per second.
    MibPerSec,
    /// Operations per second.
    Iops,
    /// Megabits (10^6) per second.
    MbitPerSec,
    /// Microseconds.
    Micros,
    /// Not a number: text compared for equality.
    Text,
}

impl Unit {
    fn key(self) -> &'static str {
        match self {
            Unit::Seconds => "s",
            Unit::Bytes => "bytes",
            Unit::MibPerSec => "MiB/s",
            Unit::Iops => "IOPS",
            Unit::MbitPerSec => "Mbit/s",
            Unit::Micros => "us",
            Unit::Text => "text",
        }
    }

    /// A value for people: three significant digits and a unit that fits.
    pub fn format(self, v: f64) -> String {
        match self {
            Unit::Seconds if v.abs() < 1e-3 => format!("{} µs", sig3(v * 1e6)),
            Unit::Seconds if v.abs() < 1.0 => format!("{} ms", sig3(v * 1e3)),
            Unit::Seconds => format!("{} s", sig3(v)),
            Unit::Bytes if v.abs() >= f64::from(1u32 << 30) => {
                format!("{} GiB", sig3(v / f64::from(1u32 << 30)))
            }
            Unit::Bytes if v.abs() >= f64::from(1u32 << 20) => {
                format!("{} MiB", sig3(v / f64::from(1u32 << 20)))
            }
            Unit::Bytes if v.abs() >= 1024.0 => format!("{} KiB", sig3(v / 1024.0)),
            Unit::Bytes => format!("{v:.0} B"),
            Unit::MibPerSec => format!("{} MiB/s", sig3(v)),
            Unit::Iops => format!("{} IOPS", sig3(v)),
            Unit::MbitPerSec => format!("{} Mbit/s", sig3(v)),
            Unit::Micros if v.abs() >= 1000.0 => format!("{} ms", sig3(v / 1e3)),
            Unit::Micros => format!("{} µs", sig3(v)),
            Unit::Text => sig3(v),
        }
    }

    /// Just the number part of [`Unit::format`] in the unit `like` chose,
    /// for the spread next to a median.
    fn format_bare(self, v: f64, like: f64) -> String {
        let scaled = match self {
            Unit::Seconds if like.abs() < 1e-3 => v * 1e6,
            Unit::Seconds if like.abs() < 1.0 => v * 1e3,
            Unit::Bytes if like.abs() >= f64::from(1u32 << 30) => v / f64::from(1u32 << 30),
            Unit::Bytes if like.abs() >= f64::from(1u32 << 20) => v / f64::from(1u32 << 20),
            Unit::Bytes if like.abs() >= 1024.0 => v / 1024.0,
            Unit::Micros if like.abs() >= 1000.0 => v / 1e3,
            _ => v,
        };
        sig3(scaled)
    }
}

/// Three significant digits, without an exponent for everyday sizes.
pub fn sig3(v: f64) -> String {
    if !v.is_finite() {
        return format!("{v}");
    }
    let a = v.abs();
    let decimals = if a >= 100.0 || a == 0.0 {
        0
    } else if a >= 10.0 {
        1
    } else if a >= 1.0 {
        2
    } else {
        // 0.0123 -> 4 decimals: two for the leading zeros, then three digits.
        let lead = (-a.log10()).floor() as usize;
        (lead + 3).min(9)
    };
    format!("{v:.decimals$}")
}

/// Whether smaller or larger numbers are better.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Better {
    /// Times, sizes, memory.
    Lower,
    /// Rates.
    Higher,
}

/// Order statistics of one environment's values over the repetitions.
#[derive(Debug, Clone, PartialEq)]
pub struct Stats {
    /// How many values.
    pub n: usize,
    /// The median (the mean of the two middle values for an even count).
    pub median: f64,
    /// Smallest value.
    pub min: f64,
    /// Largest value.
    pub max: f64,
    /// First quartile (linear interpolation between order statistics).
    pub q1: f64,
    /// Third quartile.
    pub q3: f64,
    /// The values in run order.
    pub values: Vec<f64>,
}

impl Stats {
    /// The statistics of `values`; `None` if there are none or any is not
    /// finite (a NaN would make every order statistic meaningless).
    pub fn of(values: &[f64]) -> Option<Stats> {
        if values.is_empty() || values.iter().any(|v| !v.is_finite()) {
            return None;
        }
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        Some(Stats {
            n: sorted.len(),
            median: quantile(&sorted, 0.5),
            min: sorted[0],
            max: sorted[sorted.len() - 1],
            q1: quantile(&sorted, 0.25),
            q3: quantile(&sorted, 0.75),
            values: values.to_vec(),
        })
    }
}

/// The `p` quantile of sorted, non-empty `sorted`, interpolating linearly
/// between the two nearest order statistics (for p = 0.5 this is the usual
/// median).
pub fn quantile(sorted: &[f64], p: f64) -> f64 {
    let Some(last) = sorted.len().checked_sub(1) else {
        return f64::NAN;
    };
    let pos = p.clamp(0.0, 1.0) * last as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    let frac = pos - lo as f64;
    sorted[lo] + (sorted[hi] - sorted[lo]) * frac
}

/// One run's contribution to one row.
#[derive(Debug, Clone, PartialEq)]
pub enum Sample {
    /// A measured number.
    Number(f64),
    /// A measured text (a kernel release, a boot id).
    Text(String),
    /// Nothing measured, and why.
    Missing(String),
}

/// One cell of the table: one environment's value for one row.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    /// Statistics over the runs that produced a number; `note` says how
    /// many runs did not, and why.
    Number {
        /// The statistics.
        stats: Stats,
        /// Runs without a value.
        note: Option<String>,
    },
    /// A text value (the same in every run, or each distinct one).
    Text(String),
    /// Why there is no value.
    Missing(String),
}

impl Cell {
    /// Summarizes one environment's samples over the runs.
    pub fn from_samples(samples: &[Sample]) -> Cell {
        let numbers: Vec<f64> = samples
            .iter()
            .filter_map(|s| match s {
                Sample::Number(v) => Some(*v),
                _ => None,
            })
            .collect();
        let mut texts: Vec<&str> = Vec::new();
        let mut reasons: Vec<&str> = Vec::new();
        for s in samples {
            match s {
                Sample::Text(t) if !texts.contains(&t.as_str()) => texts.push(t),
                Sample::Missing(r) if !reasons.contains(&r.as_str()) => reasons.push(r),
                _ => {}
            }
        }
        let missing = samples
            .iter()
            .filter(|s| matches!(s, Sample::Missing(_)))
            .count();
        let note = (missing > 0).then(|| {
            format!(
                "{missing} of {} runs gave no value: {}",
                samples.len(),
                reasons.join("; ")
            )
        });
        if let Some(stats) = Stats::of(&numbers) {
            return Cell::Number { stats, note };
        }
        if !numbers.is_empty() {
            return Cell::Missing("a run produced a value that is not a finite number".into());
        }
        if !texts.is_empty() {
            return Cell::Text(texts.join(" / "));
        }
        match reasons.is_empty() {
            true => Cell::Missing("not run".into()),
            false => Cell::Missing(reasons.join("; ")),
        }
    }

    /// The median, for a numeric cell.
    pub fn median(&self) -> Option<f64> {
        match self {
            Cell::Number { stats, .. } => Some(stats.median),
            _ => None,
        }
    }

    fn text(&self) -> Option<&str> {
        match self {
            Cell::Text(t) => Some(t),
            _ => None,
        }
    }

    /// Why the cell has no number (or a text where a number is needed).
    pub fn why_none(&self) -> String {
        match self {
            Cell::Missing(r) => r.clone(),
            Cell::Text(_) => "a text, not a number".into(),
            Cell::Number { .. } => "a number, not a text".into(),
        }
    }

    /// The cell in the Markdown table: median (min–max) and how many runs.
    pub fn markdown(&self, unit: Unit) -> String {
        match self {
            Cell::Number { stats, note } => {
                let mut s = unit.format(stats.median);
                if stats.n > 1 {
                    s.push_str(&format!(
                        " ({}–{}, n={})",
                        unit.format_bare(stats.min, stats.median),
                        unit.format_bare(stats.max, stats.median),
                        stats.n
                    ));
                }
                if let Some(note) = note {
                    s.push_str(&format!(" [{note}]"));
                }
                s
            }
            Cell::Text(t) => format!("`{t}`"),
            // "not applicable: ..." is a reason of its own, not a failure.
            Cell::Missing(reason) if reason.starts_with("not applicable") => reason.clone(),
            Cell::Missing(reason) => format!("not measured: {reason}"),
        }
    }

    /// The cell in the JSON report.
    pub fn json(&self) -> Value {
        match self {
            Cell::Number { stats, note } => json!({
                "median": stats.median,
                "min": stats.min,
                "max": stats.max,
                "q1": stats.q1,
                "q3": stats.q3,
                "n": stats.n,
                "values": stats.values,
                "note": note,
            }),
            Cell::Text(t) => json!({ "text": t }),
            Cell::Missing(reason) => json!({ "unavailable": reason }),
        }
    }
}

/// One testable part of a claim.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Check {
    /// The environment's median is below the limit (in the row's unit).
    Below(Env, f64),
    /// The environment's median is at least the limit.
    AtLeast(Env, f64),
    /// The environment costs at most `limit` times the base: its median
    /// over the base's for lower-is-better rows, the inverse for rates.
    CostAtMost(Env, Env, f64),
    /// The environment costs more than `limit` times the base.
    CostAbove(Env, Env, f64),
    /// The environment costs more than `lo` and at most `hi` times the base.
    CostWithin(Env, Env, f64, f64),
    /// The two texts are equal.
    SameText(Env, Env),
    /// The two texts differ.
    OtherText(Env, Env),
}

/// A claim from the user's notes and how it is tested.
#[derive(Debug, Clone)]
pub struct Claim {
    /// In English.
    pub text: &'static str,
    /// The source phrase in the notes (Korean), with its table.
    pub source: &'static str,
    /// All must hold for "agrees"; some for "partly".
    pub checks: Vec<Check>,
    /// Anything the reader must know about what the checks do not cover.
    pub caveat: Option<&'static str>,
}

/// Whether this machine's numbers agree with a claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Every check holds.
    Agrees,
    /// Some hold, some do not.
    Partly,
    /// None holds.
    Disagrees,
    /// A value a check needs was not measured.
    Untested,
}

impl Verdict {
    fn key(self) -> &'static str {
        match self {
            Verdict::Agrees => "agrees",
            Verdict::Partly => "partly",
            Verdict::Disagrees => "disagrees",
            Verdict::Untested => "untested",
        }
    }
}

/// A claim evaluated against one row.
#[derive(Debug, Clone, PartialEq)]
pub struct Judgement {
    /// The outcome.
    pub verdict: Verdict,
    /// The rule in words, e.g. "container < 10 s and micro-VM ≥ 10 s".
    pub rule: String,
    /// Each check with the numbers it used and its result.
    pub detail: String,
}

/// The definition of a row before it is filled.
#[derive(Debug, Clone)]
pub struct RowDef {
    /// JSON key.
    pub key: &'static str,
    /// For people, with the workload's size.
    pub label: String,
    /// What the numbers are.
    pub unit: Unit,
    /// Which direction is better (ignored for text).
    pub better: Better,
    /// How each environment's value is measured.
    pub method: String,
    /// What the user's notes say.
    pub claim: Claim,
}

/// A filled row.
#[derive(Debug, Clone)]
pub struct Row {
    /// Its definition.
    pub def: RowDef,
    /// Host, container, VM.
    pub cells: [Cell; 3],
    /// The claim's evaluation.
    pub judgement: Judgement,
}

impl Row {
    /// Fills `def` with each environment's samples (host, container, VM).
    pub fn new(def: RowDef, samples: [&[Sample]; 3]) -> Row {
        Row::from_cells(def, samples.map(Cell::from_samples))
    }

    /// Builds a row from ready cells and judges its claim.
    pub fn from_cells(def: RowDef, cells: [Cell; 3]) -> Row {
        let mut row = Row {
            def,
            cells,
            judgement: Judgement {
                verdict: Verdict::Untested,
                rule: String::new(),
                detail: String::new(),
            },
        };
        row.judgement = judge(&row);
        row
    }

    /// The cell of `env`.
    pub fn cell(&self, env: Env) -> &Cell {
        &self.cells[env.index()]
    }

    /// The plain ratio of medians, `a / b`, or why there is none.
    pub fn ratio(&self, a: Env, b: Env) -> Result<f64, String> {
        let (x, y) = medians(self, a, b)?;
        if y == 0.0 {
            return Err(format!("the {} value is 0", b.label()));
        }
        Ok(x / y)
    }

    /// How many times worse `env` is than `base`: the ratio of medians for
    /// lower-is-better rows, its inverse for rates. 1 is the same; 2 is
    /// twice the time (or half the rate).
    pub fn cost(&self, env: Env, base: Env) -> Result<f64, String> {
        let (x, y) = medians(self, env, base)?;
        let (num, den, zero) = match self.def.better {
            Better::Lower => (x, y, base),
            Better::Higher => (y, x, env),
        };
        if den == 0.0 {
            return Err(format!("the {} value is 0", zero.label()));
        }
        Ok(num / den)
    }
}

fn medians(row: &Row, a: Env, b: Env) -> Result<(f64, f64), String> {
    if row.def.unit == Unit::Text {
        return Err("text, not a number".into());
    }
    let x = row
        .cell(a)
        .median()
        .ok_or_else(|| format!("no {} value", a.label()))?;
    let y = row
        .cell(b)
        .median()
        .ok_or_else(|| format!("no {} value", b.label()))?;
    Ok((x, y))
}

/// Evaluates the row's claim: each check on the medians, then "agrees" if
/// all hold, "partly" if some do, "disagrees" if none does, "untested" if
/// any check lacks a value.
fn judge(row: &Row) -> Judgement {
    let def = &row.def;
    let mut rules = Vec::new();
    let mut details = Vec::new();
    let mut held = 0;
    let mut missing = Vec::new();
    for check in &def.claim.checks {
        let rule = describe(check, def.unit);
        match evaluate(row, check) {
            Ok((ok, numbers)) => {
                held += usize::from(ok);
                details.push(format!(
                    "{rule}: {numbers} → {}",
                    if ok { "yes" } else { "no" }
                ));
            }
            Err(why) => {
                details.push(format!("{rule}: not tested ({why})"));
                missing.push(why);
            }
        }
        rules.push(rule);
    }
    let total = def.claim.checks.len();
    let verdict = if !missing.is_empty() || total == 0 {
        Verdict::Untested
    } else if held == total {
        Verdict::Agrees
    } else if held == 0 {
        Verdict::Disagrees
    } else {
        Verdict::Partly
    };
    Judgement {
        verdict,
        rule: rules.join(" and "),
        detail: details.join("; "),
    }
}

fn describe(check: &Check, unit: Unit) -> String {
    let u = |v: f64| unit.format(v);
    match *check {
        Check::Below(e, v) => format!("{} < {}", e.label(), u(v)),
        Check::AtLeast(e, v) => format!("{} ≥ {}", e.label(), u(v)),
        Check::CostAtMost(e, b, v) => format!("{} ≤ {}× the {}", e.label(), sig3(v), b.label()),
        Check::CostAbove(e, b, v) => format!("{} > {}× the {}", e.label(), sig3(v), b.label()),
        Check::CostWithin(e, b, lo, hi) => format!(
            "{} between {}× and {}× the {}",
            e.label(),
            sig3(lo),
            sig3(hi),
            b.label()
        ),
        Check::SameText(a, b) => format!("{} = {}", a.label(), b.label()),
        Check::OtherText(a, b) => format!("{} ≠ {}", a.label(), b.label()),
    }
}

/// Whether `check` holds, with the numbers it compared.
fn evaluate(row: &Row, check: &Check) -> Result<(bool, String), String> {
    let unit = row.def.unit;
    let median = |e: Env| {
        row.cell(e)
            .median()
            .ok_or_else(|| format!("{}: {}", e.label(), row.cell(e).why_none()))
    };
    let text = |e: Env| {
        row.cell(e)
            .text()
            .map(str::to_string)
            .ok_or_else(|| format!("{}: {}", e.label(), row.cell(e).why_none()))
    };
    let cost = |e: Env, b: Env| -> Result<f64, String> {
        median(e)?;
        median(b)?;
        row.cost(e, b)
    };
    Ok(match *check {
        Check::Below(e, v) => {
            let m = median(e)?;
            (m < v, unit.format(m))
        }
        Check::AtLeast(e, v) => {
            let m = median(e)?;
            (m >= v, unit.format(m))
        }
        Check::CostAtMost(e, b, v) => {
            let c = cost(e, b)?;
            (c <= v, format!("{}×", sig3(c)))
        }
        Check::CostAbove(e, b, v) => {
            let c = cost(e, b)?;
            (c > v, format!("{}×", sig3(c)))
        }
        Check::CostWithin(e, b, lo, hi) => {
            let c = cost(e, b)?;
            (c > lo && c <= hi, format!("{}×", sig3(c)))
        }
        Check::SameText(a, b) => {
            let (x, y) = (text(a)?, text(b)?);
            (x == y, format!("{x} vs {y}"))
        }
        Check::OtherText(a, b) => {
            let (x, y) = (text(a)?, text(b)?);
            (x != y, format!("{x} vs {y}"))
        }
    })
}

/// Where the comparison ran.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HostInfo {
    /// CPU model name.
    pub cpu: String,
    /// Online CPUs.
    pub cores: usize,
    /// The host kernel's release.
    pub kernel: String,
    /// RAM in bytes.
    pub memory_bytes: u64,
    /// The KVM in use, for people.
    pub kvm: String,
    /// Whether KVM is nested without hardware virtualization (kvm_pvm).
    pub nested: bool,
}

/// Everything the report says besides the rows.
#[derive(Debug, Clone, Default)]
pub struct Context {
    /// The command line that made it.
    pub command: String,
    /// The host.
    pub host: HostInfo,
    /// Repetitions per environment.
    pub repeat: u32,
    /// Lines about the set-up (image, guest, runtime, sizes).
    pub setup: Vec<String>,
    /// Things that went wrong or limit the numbers.
    pub notes: Vec<String>,
    /// Each run as it happened, in order, for the JSON's `runs`.
    pub runs: Vec<Value>,
}

/// The finished comparison.
#[derive(Debug, Clone)]
pub struct Report {
    /// Set-up and host.
    pub context: Context,
    /// The table.
    pub rows: Vec<Row>,
}

/// What a nested KVM does to the numbers; said in every report from such
/// a host.
pub const NESTED_WARNING: &str = "This host's KVM is nested and has no hardware virtualization (kvm_pvm, \"pagetable-based\"): the guest kernel runs deprivileged with shadow page tables, and much of its code (every system call, page fault, interrupt-disabled section and device access) traps and is emulated. That inflates every VM cost here (boot, page faults, system calls, I/O) far beyond what the same micro-VM costs on hardware KVM (VT-x/AMD-V), where it boots in about 0.1-0.5 s. The container and host numbers are not affected.";

impl Report {
    /// The JSON report.
    pub fn json(&self) -> Value {
        let rows: Vec<Value> = self.rows.iter().map(row_json).collect();
        let h = &self.context.host;
        json!({
            "vmlab_compare": 1,
            "command": self.context.command,
            "host": {
                "cpu": h.cpu,
                "cores": h.cores,
                "kernel": h.kernel,
                "memory_bytes": h.memory_bytes,
                "kvm": h.kvm,
                "nested_kvm": h.nested,
                "warning": h.nested.then_some(NESTED_WARNING),
            },
            "repeat": self.context.repeat,
            "setup": self.context.setup,
            "notes": self.context.notes,
            "rows": rows,
            "runs": self.context.runs,
        })
    }

    /// The Markdown report.
    pub fn markdown(&self) -> String {
        let c = &self.context;
        let h = &c.host;
        let mut out = String::new();
        out.push_str(
            "# vmlab compare: the same workload on the host, in a container and in a micro-VM\n\n",
        );
        out.push_str(&format!(
            "Host: {}, {} CPUs, {} RAM, Linux {}; KVM: {}.\n\n",
            h.cpu,
            h.cores,
            Unit::Bytes.format(h.memory_bytes as f64),
            h.kernel,
            h.kvm
        ));
        if h.nested {
            out.push_str(&format!("> **Nested KVM.** {NESTED_WARNING}\n\n"));
        }
        for line in &c.setup {
            out.push_str(&format!("- {line}\n"));
        }
        out.push_str(&format!(
            "- Each cell: median over {} run{} (min–max and n when more than one); the three environments were run interleaved, one launch each per repetition, in a rotating order.\n\n",
            c.repeat,
            if c.repeat == 1 { "" } else { "s" }
        ));
        out.push_str("| measure | host | container | micro-VM | container ÷ host | VM ÷ host | VM ÷ container | claim in the notes | this machine |\n");
        out.push_str("|---|---|---|---|---|---|---|---|---|\n");
        for row in &self.rows {
            let ratio = |a: Env, b: Env| match row.ratio(a, b) {
                Ok(r) => format!("{}×", sig3(r)),
                Err(why) => format!("n/a ({why})"),
            };
            let cells = [
                row.def.label.clone(),
                row.cell(Env::Host).markdown(row.def.unit),
                row.cell(Env::Container).markdown(row.def.unit),
                row.cell(Env::Vm).markdown(row.def.unit),
                ratio(Env::Container, Env::Host),
                ratio(Env::Vm, Env::Host),
                ratio(Env::Vm, Env::Container),
                format!("{} ({})", row.def.claim.text, row.def.claim.source),
                verdict_text(&row.judgement),
            ];
            let cells: Vec<String> = cells.iter().map(|s| md_escape(s)).collect();
            out.push_str(&format!("| {} |\n", cells.join(" | ")));
        }
        out.push_str("\nRatios are of medians. \"this machine\" applies the rule below to the medians: **agrees** when every part of the claim holds, **partly** when some do, **disagrees** when none does, **untested** when a value is missing.\n\n");
        out.push_str("## How each row is measured, and the rule\n\n");
        for row in &self.rows {
            let method = row.def.method.trim_end_matches('.');
            out.push_str(&format!(
                "- **{}** — {method}. Claim: {} ({}). Rule: {}. Here: {}.{}\n",
                row.def.label,
                row.def.claim.text,
                row.def.claim.source,
                row.judgement.rule,
                row.judgement.detail,
                row.def
                    .claim
                    .caveat
                    .map(|c| format!(" {c}"))
                    .unwrap_or_default()
            ));
        }
        if !c.notes.is_empty() {
            out.push_str("\n## Notes\n\n");
            for n in &c.notes {
                out.push_str(&format!("- {n}\n"));
            }
        }
        out.push_str(&format!("\nCommand: `{}`\n", c.command));
        out
    }
}

fn verdict_text(j: &Judgement) -> String {
    match j.verdict {
        Verdict::Untested => format!("untested: {}", j.detail),
        v => v.key().to_string(),
    }
}

fn row_json(row: &Row) -> Value {
    let ratio = |a: Env, b: Env| match row.ratio(a, b) {
        Ok(r) => json!(r),
        Err(why) => json!({ "unavailable": why }),
    };
    let mut cells = serde_json::Map::new();
    for env in Env::ALL {
        cells.insert(env.key().to_string(), row.cell(env).json());
    }
    json!({
        "key": row.def.key,
        "label": row.def.label,
        "unit": row.def.unit.key(),
        "better": match row.def.better { Better::Lower => "lower", Better::Higher => "higher" },
        "method": row.def.method,
        "values": cells,
        "ratios": {
            "container_vs_host": ratio(Env::Container, Env::Host),
            "vm_vs_host": ratio(Env::Vm, Env::Host),
            "vm_vs_container": ratio(Env::Vm, Env::Container),
        },
        "claim": {
            "text": row.def.claim.text,
            "source": row.def.claim.source,
            "caveat": row.def.claim.caveat,
            "rule": row.judgement.rule,
            "verdict": row.judgement.verdict.key(),
            "detail": row.judgement.detail,
        },
    })
}

/// A table cell must not end the cell early or break the line.
fn md_escape(s: &str) -> String {
    s.replace('|', "\\|").replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nums(v: &[f64]) -> Vec<Sample> {
        v.iter().map(|x| Sample::Number(*x)).collect()
    }

    fn def(unit: Unit, better: Better, checks: Vec<Check>) -> RowDef {
        RowDef {
            key: "t",
            label: "test row".into(),
            unit,
            better,
            method: "how".into(),
            claim: Claim {
                text: "claim",
                source: "출처",
                checks,
                caveat: None,
            },
        }
    }

    #[test]
    fn medians_quartiles_and_spread_of_known_values() {
        let s = Stats::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.n, s.median, s.min, s.max), (3, 2.0, 1.0, 3.0));
        assert_eq!((s.q1, s.q3), (1.5, 2.5));
        assert_eq!(s.values, vec![3.0, 1.0, 2.0], "run order is kept");
        // Even count: the mean of the two middle values.
        let s = Stats::of(&[10.0, 40.0, 20.0, 30.0]).unwrap();
        assert_eq!(s.median, 25.0);
        assert_eq!((s.q1, s.q3), (17.5, 32.5));
        let s = Stats::of(&[7.5]).unwrap();
        assert_eq!(
            (s.median, s.min, s.max, s.q1, s.q3),
            (7.5, 7.5, 7.5, 7.5, 7.5)
        );
        assert!(Stats::of(&[]).is_none());
        assert!(Stats::of(&[1.0, f64::NAN]).is_none());
        assert!(Stats::of(&[1.0, f64::INFINITY]).is_none());
    }

    #[test]
    fn cells_say_why_there_is_no_number() {
        let c = Cell::from_samples(&[
            Sample::Number(2.0),
            Sample::Missing("boom".into()),
            Sample::Number(4.0),
        ]);
        let Cell::Number { stats, note } = &c else {
            panic!("{c:?}")
        };
        assert_eq!(stats.median, 3.0);
        assert_eq!(note.as_deref(), Some("1 of 3 runs gave no value: boom"));
        let c = Cell::from_samples(&[Sample::Missing("a".into()), Sample::Missing("a".into())]);
        assert_eq!(c, Cell::Missing("a".into()));
        assert_eq!(c.markdown(Unit::Seconds), "not measured: a");
        assert_eq!(c.json(), json!({ "unavailable": "a" }));
        let na = Cell::Missing("not applicable: nothing to store".into());
        assert_eq!(na.markdown(Unit::Bytes), "not applicable: nothing to store");
        assert_eq!(Cell::from_samples(&[]), Cell::Missing("not run".into()));
        let t = Cell::from_samples(&[Sample::Text("6.1".into()), Sample::Text("6.1".into())]);
        assert_eq!(t, Cell::Text("6.1".into()));
    }

    #[test]
    fn formatting() {
        assert_eq!(sig3(1234.6), "1235");
        assert_eq!(sig3(12.345), "12.3");
        assert_eq!(sig3(1.2345), "1.23");
        assert_eq!(sig3(0.012345), "0.0123");
        assert_eq!(sig3(0.0), "0");
        assert_eq!(Unit::Seconds.format(0.0031), "3.10 ms");
        assert_eq!(Unit::Seconds.format(62.25), "62.2 s");
        assert_eq!(Unit::Seconds.format(0.0000123), "12.3 µs");
        assert_eq!(Unit::Bytes.format(3.0 * 1048576.0), "3.00 MiB");
        assert_eq!(Unit::Bytes.format(2.5 * 1073741824.0), "2.50 GiB");
        assert_eq!(Unit::Micros.format(15388.0), "15.4 ms");
        let c = Cell::from_samples(&nums(&[0.002, 0.003, 0.004]));
        assert_eq!(c.markdown(Unit::Seconds), "3.00 ms (2.00–4.00, n=3)");
    }

    #[test]
    fn ratios_and_costs_of_medians() {
        // Rates: the VM's median 25 MiB/s against the host's 100.
        let row = Row::new(
            def(Unit::MibPerSec, Better::Higher, vec![]),
            [
                &nums(&[100.0, 90.0, 110.0]),
                &nums(&[95.0]),
                &nums(&[20.0, 25.0, 30.0]),
            ],
        );
        assert_eq!(row.ratio(Env::Vm, Env::Host), Ok(0.25));
        assert_eq!(
            row.cost(Env::Vm, Env::Host),
            Ok(4.0),
            "a quarter of the rate costs 4×"
        );
        assert_eq!(row.ratio(Env::Container, Env::Host), Ok(0.95));
        // Times: the plain ratio is the cost.
        let row = Row::new(
            def(Unit::Seconds, Better::Lower, vec![]),
            [&nums(&[2.0]), &nums(&[2.2]), &nums(&[0.0])],
        );
        assert!((row.cost(Env::Container, Env::Host).unwrap() - 1.1).abs() < 1e-12);
        assert_eq!(
            row.ratio(Env::Host, Env::Vm),
            Err("the micro-VM value is 0".into())
        );
        let row = Row::new(
            def(Unit::Seconds, Better::Lower, vec![]),
            [
                &[Sample::Missing("no host".into())],
                &nums(&[1.0]),
                &nums(&[1.0]),
            ],
        );
        assert_eq!(row.ratio(Env::Vm, Env::Host), Err("no host value".into()));
    }

    #[test]
    fn verdicts_follow_the_stated_rule() {
        let start = || {
            def(
                Unit::Seconds,
                Better::Lower,
                vec![
                    Check::Below(Env::Container, 10.0),
                    Check::AtLeast(Env::Vm, 10.0),
                ],
            )
        };
        let host: &[Sample] = &nums(&[0.003]);
        let row = Row::new(start(), [host, &nums(&[0.2, 0.3]), &nums(&[40.0, 60.0])]);
        assert_eq!(row.judgement.verdict, Verdict::Agrees);
        assert_eq!(
            row.judgement.rule,
            "container < 10.0 s and micro-VM ≥ 10.0 s"
        );
        assert!(
            row.judgement
                .detail
                .contains("micro-VM ≥ 10.0 s: 50.0 s → yes"),
            "{}",
            row.judgement.detail
        );
        // A hardware-KVM micro-VM boots in a fraction of a second.
        let row = Row::new(start(), [host, &nums(&[0.25]), &nums(&[0.4])]);
        assert_eq!(row.judgement.verdict, Verdict::Partly);
        let row = Row::new(start(), [host, &nums(&[12.0]), &nums(&[0.4])]);
        assert_eq!(row.judgement.verdict, Verdict::Disagrees);
        let row = Row::new(
            start(),
            [host, &nums(&[0.2]), &[Sample::Missing("kvm".into())]],
        );
        assert_eq!(row.judgement.verdict, Verdict::Untested);
        assert!(
            row.judgement.detail.contains("micro-VM: kvm"),
            "{}",
            row.judgement.detail
        );

        // Rates: near-native container, slower VM.
        let io = def(
            Unit::MibPerSec,
            Better::Higher,
            vec![
                Check::CostAtMost(Env::Container, Env::Host, 1.2),
                Check::CostAbove(Env::Vm, Env::Host, 1.2),
            ],
        );
        let row = Row::new(
            io.clone(),
            [&nums(&[100.0]), &nums(&[90.0]), &nums(&[10.0])],
        );
        assert_eq!(row.judgement.verdict, Verdict::Agrees);
        let row = Row::new(io, [&nums(&[100.0]), &nums(&[50.0]), &nums(&[99.0])]);
        assert_eq!(row.judgement.verdict, Verdict::Disagrees);
        let within = def(
            Unit::Seconds,
            Better::Lower,
            vec![Check::CostWithin(Env::Vm, Env::Host, 1.0, 1.5)],
        );
        let row = Row::new(
            within.clone(),
            [&nums(&[1.0]), &nums(&[1.0]), &nums(&[1.4])],
        );
        assert_eq!(row.judgement.verdict, Verdict::Agrees);
        let row = Row::new(within, [&nums(&[1.0]), &nums(&[1.0]), &nums(&[3.0])]);
        assert_eq!(row.judgement.verdict, Verdict::Disagrees);

        let kernel = def(
            Unit::Text,
            Better::Lower,
            vec![
                Check::SameText(Env::Container, Env::Host),
                Check::OtherText(Env::Vm, Env::Host),
            ],
        );
        let t = |s: &str| vec![Sample::Text(s.into())];
        let row = Row::new(kernel, [&t("6.18"), &t("6.18"), &t("6.1.192")]);
        assert_eq!(row.judgement.verdict, Verdict::Agrees);
        assert_eq!(
            row.ratio(Env::Vm, Env::Host),
            Err("text, not a number".into())
        );
    }

    fn sample_report() -> Report {
        let start = def(
            Unit::Seconds,
            Better::Lower,
            vec![
                Check::Below(Env::Container, 10.0),
                Check::AtLeast(Env::Vm, 10.0),
            ],
        );
        let rows = vec![
            Row::new(start, [&nums(&[0.003]), &nums(&[0.2]), &nums(&[50.0])]),
            Row::new(
                def(
                    Unit::Bytes,
                    Better::Lower,
                    vec![Check::AtLeast(Env::Vm, 1e9)],
                ),
                [
                    &[Sample::Missing("n/a | none".into())],
                    &nums(&[4e6]),
                    &nums(&[3e7]),
                ],
            ),
        ];
        Report {
            context: Context {
                command: "vmlab compare --image x".into(),
                host: HostInfo {
                    cpu: "CPU".into(),
                    cores: 2,
                    kernel: "6.18".into(),
                    memory_bytes: 1 << 30,
                    kvm: "nested".into(),
                    nested: true,
                },
                repeat: 1,
                setup: vec!["image x".into()],
                notes: vec!["a note".into()],
                runs: vec![json!({"env": "host"})],
            },
            rows,
        }
    }

    #[test]
    fn json_shape() {
        let j = sample_report().json();
        assert_eq!(j["vmlab_compare"], 1);
        assert_eq!(j["host"]["nested_kvm"], true);
        assert!(j["host"]["warning"].as_str().unwrap().contains("nested"));
        let rows = j["rows"].as_array().unwrap();
        assert_eq!(rows.len(), 2);
        let r = &rows[0];
        assert_eq!(r["values"]["vm"]["median"], 50.0);
        assert_eq!(r["values"]["vm"]["n"], 1);
        assert_eq!(r["ratios"]["vm_vs_container"], 250.0);
        assert_eq!(r["claim"]["verdict"], "agrees");
        let r = &rows[1];
        assert_eq!(r["values"]["host"]["unavailable"], "n/a | none");
        assert_eq!(r["ratios"]["vm_vs_host"]["unavailable"], "no host value");
        assert_eq!(r["claim"]["verdict"], "disagrees");
        assert_eq!(j["runs"][0]["env"], "host");
    }

    #[test]
    fn markdown_table_has_every_cell() {
        let md = sample_report().markdown();
        assert!(md.contains("> **Nested KVM.**"), "{md}");
        let table: Vec<&str> = md.lines().filter(|l| l.starts_with("| ")).collect();
        assert_eq!(table.len(), 3, "header and two rows:\n{md}");
        for line in &table {
            // A pipe inside a cell is escaped, so each row splits into
            // exactly nine non-empty cells.
            let cells: Vec<&str> = split_md_row(line);
            assert_eq!(cells.len(), 9, "{line}");
            assert!(cells.iter().all(|c| !c.trim().is_empty()), "{line}");
        }
        assert!(
            table[2].contains("not measured: n/a \\| none"),
            "{}",
            table[2]
        );
        assert!(table[1].contains("| agrees |"), "{}", table[1]);
        assert!(md.contains("Command: `vmlab compare --image x`"));
    }

    /// Splits a Markdown table row on unescaped pipes.
    pub(crate) fn split_md_row(line: &str) -> Vec<&str> {
        let inner = line.trim().trim_start_matches('|').trim_end_matches('|');
        let mut cells = Vec::new();
        let mut start = 0;
        let bytes = inner.as_bytes();
        for i in 0..bytes.len() {
            if bytes[i] == b'|' && (i == 0 || bytes[i - 1] != b'\\') {
                cells.push(&inner[start..i]);
                start = i + 1;
            }
        }
        cells.push(&inner[start..]);
        cells
    }
}
