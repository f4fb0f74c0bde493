//! `vmlab compare --repeat 1`: one launch of each environment (one guest
//! boot) gives a complete report: every cell of every row is a number, a
//! text or a stated reason, in the JSON and in the Markdown, the chart is
//! an SVG document, and nothing is left behind (namespaces, cgroups). As
//! root (what scripts/test.sh runs as) the container and network rows are
//! measured too, and the kernel rows hold the expected kernels.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use serde_json::Value;

/// One guest boot plus its workloads: minutes on a nested-KVM host.
const LIMIT: Duration = Duration::from_secs(1800);

const ROWS: [&str; 12] = [
    "start",
    "memory",
    "footprint",
    "cpu",
    "mem",
    "disk_write",
    "disk_read",
    "disk_random",
    "net_throughput",
    "net_latency",
    "kernel",
    "isolation",
];

fn sample_image() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/guest/sample-image");
    assert!(
        dir.join("index.json").is_file(),
        "{} is missing: run scripts/build-sample-image.sh",
        dir.display()
    );
    dir
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A cell is exactly one of: statistics with a finite median, a text, a
/// reason.
fn check_cell(row: &str, env: &str, cell: &Value) {
    let obj = cell
        .as_object()
        .unwrap_or_else(|| panic!("{row}/{env}: {cell}"));
    if let Some(m) = obj.get("median") {
        let m = m.as_f64().unwrap_or(f64::NAN);
        assert!(m.is_finite() && m >= 0.0, "{row}/{env}: {cell}");
        let (min, max) = (obj["min"].as_f64().unwrap(), obj["max"].as_f64().unwrap());
        assert!(min <= m && m <= max, "{row}/{env}: {cell}");
        assert_eq!(obj["n"], 1, "{row}/{env}: one run per environment");
        assert_eq!(obj["values"].as_array().unwrap().len(), 1);
    } else if let Some(t) = obj.get("text") {
        assert!(!t.as_str().unwrap_or("").is_empty(), "{row}/{env}: {cell}");
    } else {
        let why = obj.get("unavailable").and_then(Value::as_str);
        assert!(
            why.is_some_and(|w| !w.trim().is_empty()),
            "{row}/{env}: neither a number, a text nor a reason: {cell}"
        );
    }
}

/// Splits a Markdown table row on unescaped pipes.
fn md_cells(line: &str) -> Vec<String> {
    let inner = line.trim().trim_start_matches('|').trim_end_matches('|');
    let mut cells = Vec::new();
    let mut cur = String::new();
    let mut prev = ' ';
    for c in inner.chars() {
        if c == '|' && prev != '\\' {
            cells.push(cur.trim().to_string());
            cur.clear();
        } else {
            cur.push(c);
        }
        prev = c;
    }
    cells.push(cur.trim().to_string());
    cells
}

#[test]
fn compare_repeat_1_gives_a_complete_report() {
    let dir = std::env::temp_dir().join(format!("vmlab-compare-it-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (json, md, svg) = (dir.join("c.json"), dir.join("c.md"), dir.join("c.svg"));
    let mut cmd = vmlab();
    cmd.arg("compare")
        .arg("--image")
        .arg(sample_image())
        .arg("--kernel")
        .arg(guest_dir().join("vmlinux"))
        .args(["--repeat", "1", "--net-seconds", "1", "--cpu-mib", "8"])
        .arg("--json")
        .arg(&json)
        .arg("--markdown")
        .arg(&md)
        .arg("--chart")
        .arg(&svg);
    let run = run_with_deadline(cmd, LIMIT);
    assert_eq!(run.code(), Some(0), "{}", run.dump());

    // JSON: every row, every cell.
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["repeat"], 1);
    let host = &report["host"];
    assert!(!host["cpu"].as_str().unwrap().is_empty());
    if host["nested_kvm"] == true {
        assert!(host["warning"]
            .as_str()
            .unwrap()
            .contains("inflates every VM cost"));
    }
    let rows = report["rows"].as_array().unwrap();
    let keys: Vec<&str> = rows.iter().map(|r| r["key"].as_str().unwrap()).collect();
    assert_eq!(keys, ROWS);
    for row in rows {
        let key = row["key"].as_str().unwrap();
        for env in ["host", "container", "vm"] {
            check_cell(key, env, &row["values"][env]);
        }
        for ratio in ["container_vs_host", "vm_vs_host", "vm_vs_container"] {
            let r = &row["ratios"][ratio];
            assert!(
                r.as_f64().is_some_and(f64::is_finite) || r["unavailable"].is_string(),
                "{key}/{ratio}: {r}"
            );
        }
        let claim = &row["claim"];
        assert!(!claim["source"].as_str().unwrap().is_empty(), "{key}");
        assert!(!claim["rule"].as_str().unwrap().is_empty(), "{key}");
        let verdict = claim["verdict"].as_str().unwrap();
        assert!(
            ["agrees", "partly", "disagrees", "untested"].contains(&verdict),
            "{key}: {verdict}"
        );
    }
    let row = |k: &str| rows.iter().find(|r| r["key"] == k).unwrap();
    let text = |k: &str, env: &str| row(k)["values"][env]["text"].as_str().map(str::to_string);

    // What is always measurable: the host runs, the VM boots.
    let host_release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert_eq!(text("kernel", "host").as_deref(), Some(host_release.trim()));
    assert_eq!(text("kernel", "vm"), Some(guest_release()));
    assert_ne!(text("isolation", "vm"), text("isolation", "host"));
    for (k, env) in [
        ("start", "host"),
        ("start", "vm"),
        ("cpu", "host"),
        ("cpu", "vm"),
    ] {
        assert!(row(k)["values"][env]["median"].is_number(), "{k}/{env}");
    }
    assert!(row("footprint")["values"]["vm"]["median"].as_f64().unwrap() > 0.0);
    assert!(row("footprint")["values"]["host"]["unavailable"].is_string());
    // The same work everywhere.
    let digests: Vec<&str> = report["runs"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["results"]["cpu"]["digest"].as_str())
        .collect();
    assert!(
        digests.len() >= 2 && digests.iter().all(|d| *d == digests[0]),
        "{digests:?}"
    );
    if is_root() {
        assert_eq!(
            text("kernel", "container").as_deref(),
            Some(host_release.trim())
        );
        assert_eq!(text("isolation", "container"), text("isolation", "host"));
        for k in ["start", "memory", "cpu", "net_throughput", "net_latency"] {
            for env in ["host", "container"] {
                assert!(
                    row(k)["values"][env]["median"].is_number(),
                    "{k}/{env}: {}",
                    row(k)["values"][env]
                );
            }
        }
        assert_eq!(row("kernel")["claim"]["verdict"], "agrees");
    }

    // Markdown: the same rows, nine non-empty cells each, and every
    // measurement cell a number, a text or "not measured: why".
    let md = std::fs::read_to_string(&md).unwrap();
    assert_eq!(md, run.stdout, "the printed report is the file");
    let table: Vec<&str> = md.lines().filter(|l| l.starts_with("| ")).collect();
    assert_eq!(table.len(), 1 + ROWS.len(), "{md}");
    for line in &table[1..] {
        let cells = md_cells(line);
        assert_eq!(cells.len(), 9, "{line}");
        assert!(cells.iter().all(|c| !c.is_empty()), "{line}");
        for c in &cells[1..4] {
            assert!(
                c.starts_with("not measured: ")
                    || c.starts_with("not applicable")
                    || c.starts_with('`')
                    || c.starts_with(|ch: char| ch.is_ascii_digit()),
                "cell {c:?} in {line}"
            );
        }
    }
    assert!(md.contains("Command: `"), "{md}");

    let svg = std::fs::read_to_string(&svg).unwrap();
    assert!(svg.starts_with("<svg ") && svg.trim_end().ends_with("</svg>"));
    assert_eq!(svg.matches("<text").count(), svg.matches("</text>").count());

    // Nothing left behind: its namespaces (named after its pid, as are
    // its memory cgroups) are gone, and so are the cgroups.
    let mut pid = None;
    for word in run.stderr.split_whitespace() {
        if let Some(rest) = word.strip_prefix("vmlab-cmp-") {
            assert!(
                !Path::new("/run/netns").join(word).exists(),
                "namespace {word} left behind"
            );
            pid = rest.split('-').next().map(str::to_string);
        }
    }
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    let memory_cgroup = own
        .lines()
        .find_map(|l| l.split_once(":memory:").map(|(_, p)| p.to_string()));
    if let (Some(pid), Some(path)) = (pid, memory_cgroup) {
        let dir = Path::new("/sys/fs/cgroup/memory").join(path.trim_start_matches('/'));
        let prefix = format!("vmlab-compare-{pid}-");
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            assert!(
                !name.starts_with(&prefix),
                "cgroup {name} left behind in {}",
                dir.display()
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The children of `pid` (from /proc/*/stat).
fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(child) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        let ppid = stat[close + 1..].split_whitespace().nth(1);
        if ppid == Some(pid.to_string().as_str()) {
            out.push(child);
        }
    }
    out
}

/// SIGTERM while the micro-VM boots: vmlab compare stops it, removes its
/// namespaces and cgroups, and exits with 128+15 in bounded time.
#[test]
fn a_stop_signal_leaves_nothing_behind() {
    use std::io::BufRead;
    if !is_root() {
        return; // no namespaces or cgroups to leave behind
    }
    let mut cmd = vmlab();
    cmd.arg("compare")
        .arg("--image")
        .arg(sample_image())
        .arg("--kernel")
        .arg(guest_dir().join("vmlinux"))
        .args(["--repeat", "1", "--net-seconds", "1"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let pid = child.id();
    let stderr = child.stderr.take().unwrap();
    // Host and container take seconds; then the VM starts.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let mut seen = String::new();
    let start = std::time::Instant::now();
    while !seen.contains("micro-VM ...") {
        assert!(start.elapsed() < LIMIT, "no VM launch:\n{seen}");
        if let Ok(line) = rx.recv_timeout(Duration::from_secs(1)) {
            seen.push_str(&line);
            seen.push('\n');
        }
    }
    std::thread::sleep(Duration::from_secs(2));
    let launched = children_of(pid);
    assert!(!launched.is_empty(), "the VMM should be running:\n{seen}");
    // SAFETY: kill takes integers; `child` has not been waited for.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGTERM) }, 0);
    let t = std::time::Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if t.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("vmlab compare did not stop within 60 s of SIGTERM:\n{seen}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(status.code(), Some(143), "{seen}");
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(2)) {
        seen.push_str(&line);
        seen.push('\n');
    }
    assert!(seen.contains("stopped by signal 15"), "{seen}");
    for p in launched {
        let gone = !Path::new(&format!("/proc/{p}")).exists()
            || std::fs::read_to_string(format!("/proc/{p}/stat")).is_ok_and(|s| s.contains(") Z "));
        assert!(gone, "child {p} of vmlab compare still runs");
    }
    for side in ["peer", "srv"] {
        let ns = format!("/run/netns/vmlab-cmp-{pid}-{side}");
        assert!(!Path::new(&ns).exists(), "{ns} left behind");
    }
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    if let Some(path) = own
        .lines()
        .find_map(|l| l.split_once(":memory:").map(|(_, p)| p))
    {
        let dir = Path::new("/sys/fs/cgroup/memory").join(path.trim_start_matches('/'));
        let prefix = format!("vmlab-compare-{pid}-");
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            assert!(!name.starts_with(&prefix), "cgroup {name} left behind");
        }
    }
}

#[test]
fn an_image_without_the_workload_is_an_error() {
    // The guest's root tree is busybox and vmlab's init, no vmlab-workload.
    let tree = guest_dir().join("rootfs-tree");
    if tree.join("usr/bin/vmlab-workload").exists() || tree.join("bin/vmlab-workload").exists() {
        return;
    }
    let mut cmd = vmlab();
    cmd.arg("compare")
        .arg("--image")
        .arg(&tree)
        .arg("--kernel")
        .arg(guest_dir().join("vmlinux"));
    let run = run_with_deadline(cmd, Duration::from_secs(120));
    assert_eq!(run.code(), Some(125), "{}", run.dump());
    assert!(
        run.stderr.contains("no executable vmlab-workload"),
        "{}",
        run.dump()
    );
}
