//! `--chart`: an SVG bar chart of how many times the container and the VM
//! cost what the baseline costs, one group of bars per numeric row, on a
//! logarithmic axis (the VM's factors on a nested-KVM host span three
//! orders of magnitude). Hand-written: a few rectangles and labels need no
//! plotting library.

use std::fmt::Write;

use super::report::{sig3, Env, Report, Unit};

const WIDTH: f64 = 960.0;
const LABEL_W: f64 = 330.0;
const PLOT_X: f64 = LABEL_W + 10.0;
const PLOT_W: f64 = WIDTH - PLOT_X - 90.0;
const BAR_H: f64 = 14.0;
const GROUP_H: f64 = 46.0;
const TOP: f64 = 78.0;

/// One group of bars.
#[derive(Debug, Clone, PartialEq)]
pub struct Group {
    /// The row's label.
    pub label: String,
    /// What 1× means: "host" or "container".
    pub base: Env,
    /// Container and VM factors, or why there is none.
    pub bars: Vec<(Env, Result<f64, String>)>,
}

/// The groups of a report: every numeric row, against the host where the
/// host has a value, else against the container (memory, footprint).
pub fn groups(report: &Report) -> Vec<Group> {
    report
        .rows
        .iter()
        .filter(|r| r.def.unit != Unit::Text)
        .map(|r| {
            let base = match r.cell(Env::Host).median() {
                Some(_) => Env::Host,
                None => Env::Container,
            };
            let bars = [Env::Container, Env::Vm]
                .into_iter()
                .filter(|e| *e != base)
                .map(|e| {
                    // Say why a bar is missing: the cell's own reason.
                    let f = match r.cell(e).median() {
                        Some(_) => r.cost(e, base),
                        None => Err(r.cell(e).why_none()),
                    };
                    (e, f)
                })
                .collect();
            Group {
                label: r.def.label.clone(),
                base,
                bars,
            }
        })
        .collect()
}

/// The chart as an SVG document.
pub fn svg(groups: &[Group], title: &str) -> String {
    let factors: Vec<f64> = groups
        .iter()
        .flat_map(|g| g.bars.iter().filter_map(|(_, f)| f.as_ref().ok().copied()))
        .filter(|f| f.is_finite() && *f > 0.0)
        .collect();
    // Whole decades around every factor and around 1.
    let lo = factors
        .iter()
        .copied()
        .fold(1.0f64, f64::min)
        .log10()
        .floor() as i32;
    let hi = factors
        .iter()
        .copied()
        .fold(1.0f64, f64::max)
        .log10()
        .ceil() as i32;
    let hi = hi.max(lo + 1);
    let x = |f: f64| PLOT_X + (f.log10() - f64::from(lo)) / f64::from(hi - lo) * PLOT_W;
    let height = TOP + GROUP_H * groups.len() as f64 + 40.0;

    let mut s = String::new();
    // Writing into a String cannot fail.
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="10" y="22" font-size="15" font-weight="bold">{}</text>"#,
        escape(title)
    );
    let _ = writeln!(
        s,
        r#"<text x="10" y="42">How many times the baseline's cost (time, memory, disk; or 1/rate), log scale; 1× = same as the baseline, right of it = worse.</text>"#
    );
    let legend = [(Env::Container, "container"), (Env::Vm, "micro-VM")];
    for (i, (env, name)) in legend.iter().enumerate() {
        let lx = PLOT_X + 150.0 * i as f64;
        let _ = writeln!(
            s,
            r#"<rect x="{lx}" y="52" width="12" height="12" fill="{}"/><text x="{}" y="62">{name}</text>"#,
            color(*env),
            lx + 16.0
        );
    }
    // Decade grid lines, 1× emphasized.
    for d in lo..=hi {
        let gx = x(10f64.powi(d));
        let (stroke, w) = if d == 0 { ("#333", 1.5) } else { ("#ccc", 1.0) };
        let _ = writeln!(
            s,
            r#"<line x1="{gx:.1}" y1="{TOP}" x2="{gx:.1}" y2="{:.1}" stroke="{stroke}" stroke-width="{w}"/>"#,
            height - 30.0
        );
        let _ = writeln!(
            s,
            r#"<text x="{gx:.1}" y="{:.1}" text-anchor="middle">{}×</text>"#,
            height - 14.0,
            escape(&decade_label(d))
        );
    }
    for (i, g) in groups.iter().enumerate() {
        let gy = TOP + GROUP_H * i as f64 + 6.0;
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            LABEL_W,
            gy + BAR_H,
            escape(&g.label)
        );
        let _ = writeln!(
            s,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="end" fill="#666">vs {}</text>"##,
            LABEL_W,
            gy + 2.0 * BAR_H + 2.0,
            g.base.label()
        );
        for (j, (env, f)) in g.bars.iter().enumerate() {
            let by = gy + (BAR_H + 3.0) * j as f64;
            match f {
                Ok(f) if f.is_finite() && *f > 0.0 => {
                    let (x0, x1) = (x(1.0), x(*f));
                    let (left, w) = if x1 >= x0 {
                        (x0, x1 - x0)
                    } else {
                        (x1, x0 - x1)
                    };
                    let _ = writeln!(
                        s,
                        r#"<rect x="{left:.1}" y="{by:.1}" width="{:.1}" height="{BAR_H}" fill="{}"><title>{}: {}×</title></rect>"#,
                        w.max(1.0),
                        color(*env),
                        env.label(),
                        sig3(*f)
                    );
                    let _ = writeln!(
                        s,
                        r#"<text x="{:.1}" y="{:.1}">{}×</text>"#,
                        left + w.max(1.0) + 4.0,
                        by + BAR_H - 3.0,
                        sig3(*f)
                    );
                }
                Ok(f) => {
                    let _ = writeln!(
                        s,
                        r##"<text x="{:.1}" y="{:.1}" fill="#a00">{}: no factor ({})</text>"##,
                        PLOT_X,
                        by + BAR_H - 3.0,
                        env.label(),
                        escape(&sig3(*f))
                    );
                }
                Err(why) => {
                    let _ = writeln!(
                        s,
                        r##"<text x="{:.1}" y="{:.1}" fill="#a00">{}: not measured ({})</text>"##,
                        PLOT_X,
                        by + BAR_H - 3.0,
                        env.label(),
                        escape(&shorten(why, 80))
                    );
                }
            }
        }
    }
    s.push_str("</svg>\n");
    s
}

fn color(env: Env) -> &'static str {
    match env {
        Env::Host => "#888888",
        Env::Container => "#2a7ab0",
        Env::Vm => "#d0671f",
    }
}

fn decade_label(d: i32) -> String {
    if d >= 0 {
        format!("{}", 10u64.pow(d.unsigned_abs()))
    } else {
        format!("{}", 10f64.powi(d))
    }
}

fn shorten(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

/// XML text and attribute escaping.
fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal well-formedness check: every tag closes in order,
    /// attributes are quoted, and no raw `&` or `<` is in text.
    pub(crate) fn check_well_formed(svg: &str) {
        let mut stack: Vec<String> = Vec::new();
        let mut rest = svg;
        while let Some(open) = rest.find('<') {
            let text = &rest[..open];
            assert!(!text.contains('>'), "stray > in {text:?}");
            for (i, _) in text.match_indices('&') {
                let ent = &text[i..];
                assert!(
                    ["&amp;", "&lt;", "&gt;", "&quot;"]
                        .iter()
                        .any(|e| ent.starts_with(e)),
                    "raw & in {text:?}"
                );
            }
            let close = rest[open..].find('>').expect("unclosed tag") + open;
            let tag = &rest[open + 1..close];
            assert!(!tag.contains('<'), "< inside tag {tag:?}");
            assert_eq!(
                tag.matches('"').count() % 2,
                0,
                "unbalanced quotes in {tag:?}"
            );
            if let Some(name) = tag.strip_prefix('/') {
                assert_eq!(stack.pop().as_deref(), Some(name), "mismatched </{name}>");
            } else if !tag.ends_with('/') {
                let name = tag.split_whitespace().next().unwrap_or("").to_string();
                stack.push(name);
            }
            rest = &rest[close + 1..];
        }
        assert!(stack.is_empty(), "unclosed: {stack:?}");
        assert!(rest.trim().is_empty());
    }

    #[test]
    fn svg_is_well_formed_with_bars_and_reasons() {
        let groups = vec![
            Group {
                label: "disk: write <8 MiB> & fsync".into(),
                base: Env::Host,
                bars: vec![(Env::Container, Ok(1.05)), (Env::Vm, Ok(250.0))],
            },
            Group {
                label: "memory".into(),
                base: Env::Container,
                bars: vec![(Env::Vm, Err("cgroup \"gone\" & no RSS".into()))],
            },
            Group {
                label: "faster".into(),
                base: Env::Host,
                bars: vec![(Env::Container, Ok(0.5)), (Env::Vm, Ok(0.0))],
            },
        ];
        let s = svg(&groups, "t & <t>");
        check_well_formed(&s);
        assert!(s.starts_with("<svg ") && s.ends_with("</svg>\n"));
        // Axis from 0.1× (0.5 rounds down a decade) to 1000× (250 up).
        assert!(
            s.contains(">0.1×</text>") && s.contains(">1000×</text>"),
            "{s}"
        );
        assert!(s.contains("<title>micro-VM: 250×</title>"));
        assert!(s.contains("not measured (cgroup &quot;gone&quot; &amp; no RSS)"));
        assert!(s.contains("write &lt;8 MiB&gt; &amp; fsync"));
        assert_eq!(s.matches("<rect x=").count(), 2 + 3, "legend + three bars");
    }

    #[test]
    fn empty_chart_is_still_a_document() {
        let s = svg(&[], "nothing");
        check_well_formed(&s);
        assert!(s.contains(">1×</text>") && s.contains(">10×</text>"));
    }
}
