//! `vmlab trace report FILE [--svg OUT]`: what an exit trace says, as a
//! table (exits by reason and by port or address, per vCPU, handling
//! time) and as an SVG timeline of exits per vCPU.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::BufRead;
use std::path::Path;

use super::Reason;

/// Errors reading a trace.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file cannot be read.
    #[error("{path}: {source}")]
    Read {
        /// The trace file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A line is not a vmlab exit record.
    #[error("{path} line {line}: not a vmlab exit-trace record: {why}")]
    Malformed {
        /// The trace file.
        path: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        why: String,
    },
    /// No record at all.
    #[error("{path}: no exit records (is it a `vmlab run --trace-exits` file?)")]
    Empty {
        /// The trace file.
        path: String,
    },
}

/// One exit read back from a trace.
#[derive(Debug, Clone, PartialEq)]
pub struct Exit {
    /// ns since the VM started.
    pub t_ns: u64,
    /// vCPU.
    pub vcpu: u8,
    /// Why.
    pub reason: Reason,
    /// Port or address, where there is one.
    pub target: Option<u64>,
    /// Region or device name, where there is one.
    pub region: Option<String>,
    /// Handling time in ns.
    pub handle_ns: u64,
}

/// A trace read back.
#[derive(Debug, Clone, Default)]
pub struct Trace {
    /// Every exit, in file order.
    pub exits: Vec<Exit>,
    /// The notes (`stopped`, `end`) as they were written.
    pub notes: Vec<serde_json::Value>,
}

impl Trace {
    /// Reads a trace file.
    pub fn read(path: &Path) -> Result<Trace, Error> {
        let shown = path.display().to_string();
        let file = std::fs::File::open(path).map_err(|source| Error::Read {
            path: shown.clone(),
            source,
        })?;
        Trace::parse(std::io::BufReader::new(file), &shown)
    }

    /// Reads a trace from `input`; `path` names it in errors.
    pub fn parse(input: impl BufRead, path: &str) -> Result<Trace, Error> {
        let mut trace = Trace::default();
        for (i, line) in input.lines().enumerate() {
            let line = line.map_err(|source| Error::Read {
                path: path.into(),
                source,
            })?;
            if line.trim().is_empty() {
                continue;
            }
            let malformed = |why: String| Error::Malformed {
                path: path.into(),
                line: i + 1,
                why,
            };
            let v: serde_json::Value =
                serde_json::from_str(&line).map_err(|e| malformed(e.to_string()))?;
            if v.get("note").is_some() {
                trace.notes.push(v);
                continue;
            }
            trace.exits.push(exit_of(&v).map_err(malformed)?);
        }
        if trace.exits.is_empty() {
            return Err(Error::Empty { path: path.into() });
        }
        Ok(trace)
    }
}

fn exit_of(v: &serde_json::Value) -> Result<Exit, String> {
    let num = |k: &str| {
        v.get(k)
            .and_then(serde_json::Value::as_u64)
            .ok_or_else(|| format!("no number \"{k}\""))
    };
    let reason_name = v
        .get("reason")
        .and_then(serde_json::Value::as_str)
        .ok_or("no \"reason\"")?;
    let reason = Reason::from_name(reason_name).ok_or(format!("unknown reason {reason_name:?}"))?;
    let vcpu = u8::try_from(num("vcpu")?).map_err(|_| "vcpu out of range".to_string())?;
    let target = match (v.get("port"), v.get("addr")) {
        (Some(p), _) => Some(p.as_u64().ok_or("\"port\" is not a number")?),
        (None, Some(a)) => {
            let a = a.as_str().ok_or("\"addr\" is not a string")?;
            let hex = a.strip_prefix("0x").ok_or("\"addr\" is not 0x...")?;
            Some(u64::from_str_radix(hex, 16).map_err(|e| format!("\"addr\": {e}"))?)
        }
        (None, None) => None,
    };
    Ok(Exit {
        t_ns: num("t_ns")?,
        vcpu,
        reason,
        target,
        region: v.get("region").and_then(|r| r.as_str()).map(String::from),
        handle_ns: num("handle_ns")?,
    })
}

/// Count and handling time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    /// Exits.
    pub count: u64,
    /// Total handling time, ns.
    pub handle_ns: u64,
}

impl Tally {
    fn add(&mut self, e: &Exit) {
        self.count += 1;
        self.handle_ns += e.handle_ns;
    }
}

/// The numbers of a trace.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// All exits.
    pub total: Tally,
    /// By reason.
    pub by_reason: BTreeMap<Reason, Tally>,
    /// By reason, port or address and region.
    pub by_target: BTreeMap<(Reason, u64, String), Tally>,
    /// By vCPU.
    pub by_vcpu: BTreeMap<u8, Tally>,
    /// First and last exit time.
    pub span_ns: (u64, u64),
}

/// Sums a trace up.
pub fn summarize(trace: &Trace) -> Summary {
    let mut s = Summary {
        span_ns: (u64::MAX, 0),
        ..Summary::default()
    };
    for e in &trace.exits {
        s.total.add(e);
        s.by_reason.entry(e.reason).or_default().add(e);
        s.by_vcpu.entry(e.vcpu).or_default().add(e);
        if let Some(t) = e.target {
            let region = e.region.clone().unwrap_or_default();
            s.by_target.entry((e.reason, t, region)).or_default().add(e);
        }
        s.span_ns = (s.span_ns.0.min(e.t_ns), s.span_ns.1.max(e.t_ns));
    }
    s
}

/// The summary as text.
pub fn text(trace: &Trace, s: &Summary) -> String {
    let mut out = String::new();
    let secs = (s.span_ns.1 - s.span_ns.0) as f64 / 1e9;
    let _ = writeln!(
        out,
        "{} exits on {} vCPU(s) over {:.3} s of the VM's life ({:.0} exits/s), {:.3} ms handling in vmlab",
        s.total.count,
        s.by_vcpu.len(),
        secs,
        if secs > 0.0 { s.total.count as f64 / secs } else { 0.0 },
        s.total.handle_ns as f64 / 1e6
    );
    let row = |out: &mut String, t: &Tally, what: &str| {
        let avg = t.handle_ns as f64 / t.count.max(1) as f64 / 1e3;
        let _ = writeln!(
            out,
            "{:>10}  {:>7.1}%  {:>9.1}  {what}",
            t.count,
            100.0 * t.count as f64 / s.total.count.max(1) as f64,
            avg
        );
    };
    let _ = writeln!(
        out,
        "\nby reason\n{:>10}  {:>8}  {:>9}  reason",
        "exits", "share", "avg us"
    );
    let mut reasons: Vec<_> = s.by_reason.iter().collect();
    reasons.sort_by(|a, b| b.1.count.cmp(&a.1.count).then(a.0.cmp(b.0)));
    for (r, t) in reasons {
        row(&mut out, t, r.name());
    }
    let _ = writeln!(
        out,
        "\nby port or address (top 15)\n{:>10}  {:>8}  {:>9}  target",
        "exits", "share", "avg us"
    );
    let mut targets: Vec<_> = s.by_target.iter().collect();
    targets.sort_by(|a, b| b.1.count.cmp(&a.1.count).then(a.0.cmp(b.0)));
    for ((r, t, region), tally) in targets.into_iter().take(15) {
        let at = if matches!(r, Reason::IoIn | Reason::IoOut) {
            format!("port {t:#06x}")
        } else {
            format!("{t:#x}")
        };
        let region = if region.is_empty() {
            String::new()
        } else {
            format!(" ({region})")
        };
        row(&mut out, tally, &format!("{} {at}{region}", r.name()));
    }
    let _ = writeln!(
        out,
        "\nby vCPU\n{:>10}  {:>8}  {:>9}  vCPU",
        "exits", "share", "avg us"
    );
    for (v, t) in &s.by_vcpu {
        row(&mut out, t, &v.to_string());
    }
    for note in &trace.notes {
        if note["note"] == "stopped" {
            let _ = writeln!(
                out,
                "\nnote: the trace stopped early: {}",
                note["reason"].as_str().unwrap_or("size limit")
            );
        }
        if note["note"] == "end" && note["dropped"].as_u64().unwrap_or(0) > 0 {
            let _ = writeln!(
                out,
                "\nnote: {} exits were not recorded (the writer fell behind)",
                note["dropped"]
            );
        }
    }
    if !trace.notes.iter().any(|n| n["note"] == "end") {
        let _ = writeln!(
            out,
            "\nnote: no end line: the VM did not finish writing this trace"
        );
    }
    out
}

/// `ns` in the unit that shows differences across `span` ns.
fn time_label(ns: f64, span: f64) -> String {
    if span >= 1e9 {
        format!("{:.2} s", ns / 1e9)
    } else if span >= 1e6 {
        format!("{:.2} ms", ns / 1e6)
    } else {
        format!("{:.1} us", ns / 1e3)
    }
}

const COLORS: [(Reason, &str); 10] = [
    (Reason::IoIn, "#1f77b4"),
    (Reason::IoOut, "#aec7e8"),
    (Reason::MmioRead, "#2ca02c"),
    (Reason::MmioWrite, "#98df8a"),
    (Reason::Hlt, "#7f7f7f"),
    (Reason::Shutdown, "#000000"),
    (Reason::Emulation, "#d62728"),
    (Reason::Interrupted, "#ff7f0e"),
    (Reason::SystemEvent, "#9467bd"),
    (Reason::Other, "#8c564b"),
];

fn color(r: Reason) -> &'static str {
    COLORS
        .iter()
        .find(|(c, _)| *c == r)
        .map(|(_, c)| *c)
        .unwrap_or("#000000")
}

/// An SVG timeline: one strip per vCPU, time across, and in each of
/// [`BINS`] time slices a bar stacked by reason whose height is the
/// slice's exits on a log scale.
pub fn svg(trace: &Trace, s: &Summary) -> String {
    const BINS: usize = 240;
    const LEFT: f64 = 70.0;
    const W: f64 = 960.0;
    const STRIP: f64 = 120.0;
    const TOP: f64 = 50.0;
    let plot_w = W - LEFT - 20.0;
    let bin_w = plot_w / BINS as f64;
    let (t0, t1) = s.span_ns;
    let span = (t1 - t0).max(1) as f64;
    let vcpus: Vec<u8> = s.by_vcpu.keys().copied().collect();
    let mut bins: BTreeMap<(u8, usize), BTreeMap<Reason, u64>> = BTreeMap::new();
    for e in &trace.exits {
        let b = (((e.t_ns - t0) as f64 / span) * (BINS - 1) as f64) as usize;
        *bins
            .entry((e.vcpu, b))
            .or_default()
            .entry(e.reason)
            .or_default() += 1;
    }
    let max = bins
        .values()
        .map(|m| m.values().sum::<u64>())
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let scale = |n: f64| (1.0 + n).ln() / (1.0 + max).ln() * (STRIP - 20.0);
    let height = TOP + STRIP * vcpus.len() as f64 + 60.0;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        out,
        r#"<text x="{LEFT}" y="20" font-size="15">VM exits to user space per vCPU over time ({} exits in {}; bar height: exits per slice, log scale, max {max})</text>"#,
        s.total.count,
        time_label(span, span)
    );
    for (row, v) in vcpus.iter().enumerate() {
        let base = TOP + STRIP * (row as f64 + 1.0) - 10.0;
        let _ = writeln!(
            out,
            r#"<text x="5" y="{:.1}">vCPU {v}</text><line x1="{LEFT}" y1="{base:.1}" x2="{:.1}" y2="{base:.1}" stroke="gray"/>"#,
            base - STRIP / 2.0,
            LEFT + plot_w
        );
        for ((_, b), reasons) in bins.range((*v, 0)..=(*v, BINS)) {
            let total: u64 = reasons.values().sum();
            let h = scale(total as f64);
            let mut y = base;
            for (r, n) in reasons {
                let part = h * *n as f64 / total as f64;
                y -= part;
                let _ = writeln!(
                    out,
                    r#"<rect x="{:.1}" y="{y:.1}" width="{:.1}" height="{part:.1}" fill="{}"><title>{} x{n}</title></rect>"#,
                    LEFT + *b as f64 * bin_w,
                    bin_w.max(1.0),
                    color(*r),
                    r.name()
                );
            }
        }
    }
    let axis_y = TOP + STRIP * vcpus.len() as f64 + 5.0;
    for i in 0..=4 {
        let x = LEFT + plot_w * i as f64 / 4.0;
        let t = time_label(t0 as f64 + span * i as f64 / 4.0, span);
        let _ = writeln!(
            out,
            r#"<text x="{x:.1}" y="{:.1}" text-anchor="middle">{t}</text>"#,
            axis_y + 12.0
        );
    }
    let mut x = LEFT;
    for (r, c) in COLORS {
        if s.by_reason.contains_key(&r) {
            let _ = writeln!(
                out,
                r#"<rect x="{x:.1}" y="{:.1}" width="10" height="10" fill="{c}"/><text x="{:.1}" y="{:.1}">{}</text>"#,
                axis_y + 25.0,
                x + 14.0,
                axis_y + 34.0,
                r.name()
            );
            x += 110.0;
        }
    }
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::ExitRecord;

    fn sample() -> String {
        let mut lines = Vec::new();
        for i in 0..50u64 {
            let rec = ExitRecord {
                t_ns: i * 1000,
                vcpu: (i % 2) as u8,
                reason: if i % 5 == 0 {
                    Reason::MmioWrite
                } else {
                    Reason::IoOut
                },
                addr: if i % 5 == 0 { 0xd000_0050 } else { 0x3f8 },
                size: 1,
                data: 0x41,
                region: if i % 5 == 0 { "virtio-mmio" } else { "COM1" },
                handle_ns: 1000,
            };
            lines.push(rec.to_json());
        }
        lines.push(r#"{"note":"end","records":50,"dropped":0,"not_written_after_stop":0,"stopped_at_limit":false}"#.into());
        lines.join("\n")
    }

    #[test]
    fn summary_counts_what_was_traced() {
        let trace = Trace::parse(sample().as_bytes(), "t").unwrap();
        let s = summarize(&trace);
        assert_eq!(s.total.count, 50);
        assert_eq!(s.by_reason[&Reason::MmioWrite].count, 10);
        assert_eq!(s.by_reason[&Reason::IoOut].count, 40);
        assert_eq!(s.by_vcpu.len(), 2);
        assert_eq!(
            s.by_target[&(Reason::IoOut, 0x3f8, "COM1".into())].count,
            40
        );
        let t = text(&trace, &s);
        assert!(t.contains("50 exits on 2 vCPU(s)"), "{t}");
        assert!(t.contains("io_out port 0x03f8 (COM1)"), "{t}");
        assert!(!t.contains("no end line"), "{t}");
        let svg = svg(&trace, &s);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("vCPU 1"));
    }

    #[test]
    fn malformed_traces_name_the_line() {
        let bad =
            "{\"t_ns\":1,\"vcpu\":0,\"reason\":\"io_out\",\"port\":1,\"handle_ns\":1}\nnot json\n";
        let e = Trace::parse(bad.as_bytes(), "f").unwrap_err().to_string();
        assert!(
            e.starts_with("f line 2: not a vmlab exit-trace record"),
            "{e}"
        );
        let e = Trace::parse(
            "{\"t_ns\":1,\"vcpu\":0,\"reason\":\"warp\",\"handle_ns\":1}".as_bytes(),
            "f",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("unknown reason \"warp\""), "{e}");
        let e = Trace::parse(
            "{\"vcpu\":0,\"reason\":\"hlt\",\"handle_ns\":1}".as_bytes(),
            "f",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("no number \"t_ns\""), "{e}");
        let e = Trace::parse("\n".as_bytes(), "f").unwrap_err().to_string();
        assert!(e.contains("no exit records"), "{e}");
    }
}
