//! The benchmark entry point (scripts/bench.py, issue 7) in quick mode: one
//! repetition of each environment (vmlab, QEMU microvm, a runc container),
//! small sizes, no change to docs/BENCHMARKS.md. It checks that every
//! figure is there, as a number or with the reason this host cannot give
//! it, not the figures themselves. Two guest boots in all, plus a few
//! short starts.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

/// Every figure of the report, in the order of the table. Listed here
/// rather than read from the script, so a figure that disappears from the
/// report fails the test.
const FIGURES: &[&str] = &[
    "boot_init_up_s",
    "boot_output_s",
    "first_instruction_ms",
    "first_kvm_run_ms",
    "vmm_cpu_s",
    "vmm_cpu_no_vcpu_s",
    "vmm_overhead_mib",
    "block_write_mib_s",
    "block_read_mib_s",
    "block_randread_iops",
    "net_g2h_mib_s",
    "net_h2g_mib_s",
    "net_rtt_us",
];

/// What vmlab must always measure on a host where it runs at all.
const VMLAB_ALWAYS: &[&str] = &[
    "boot_output_s",
    "first_kvm_run_ms",
    "vmm_cpu_s",
    "vmm_overhead_mib",
    "block_write_mib_s",
    "block_read_mib_s",
    "block_randread_iops",
];

const ENVS: &[&str] = &["vmlab", "qemu", "container"];

/// Two boots on a nested-KVM host, each a minute or more, and several
/// minutes when other guests share the machine.
const LIMIT: Duration = Duration::from_secs(3600);

fn number(v: &serde_json::Value) -> Option<f64> {
    v.as_f64().filter(|x| x.is_finite())
}

#[test]
fn quick_benchmark_reports_every_figure() {
    let guest = guest_dir();
    assert!(
        guest.join("rootfs.ext4").exists(),
        "run scripts/build-guest.sh first"
    );
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = std::env::temp_dir().join(format!("vmlab-bench-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json_path = dir.join("bench.json");
    let md_path = dir.join("bench.md");

    let mut cmd = Command::new("python3");
    cmd.arg(repo.join("scripts/bench.py"))
        .args(["--quick", "--no-docs", "--json"])
        .arg(&json_path)
        .arg("--markdown")
        .arg(&md_path)
        .arg("--vmlab")
        .arg(env!("CARGO_BIN_EXE_vmlab"));
    let run = run_with_deadline(cmd, LIMIT);
    assert_eq!(run.code(), Some(0), "{}", run.dump());

    let text = std::fs::read_to_string(&json_path).unwrap();
    let report: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(report["runs"], 1, "quick mode is one repetition");
    for key in ["cpu", "kernel", "kvm"] {
        assert!(
            report["host"][key].as_str().is_some_and(|s| !s.is_empty()),
            "host description lacks {key}: {}",
            report["host"]
        );
    }
    let figures = &report["figures"];
    for key in FIGURES {
        let row = &figures[*key];
        assert!(row.is_object(), "figure {key} is missing:\n{text}");
        for env in ENVS {
            let cell = &row[*env];
            let measured = number(&cell["median"]).is_some()
                && number(&cell["min"]).is_some()
                && number(&cell["max"]).is_some();
            let reason = cell["reason"]
                .as_str()
                .is_some_and(|r| !r.trim().is_empty());
            assert!(
                measured != reason,
                "{key}/{env}: neither a number with min/max nor a reason (or both): {cell}"
            );
        }
        let both =
            number(&row["vmlab"]["median"]).is_some() && number(&row["qemu"]["median"]).is_some();
        if both {
            assert!(
                number(&row["ratio_vmlab_qemu"]).is_some(),
                "{key}: vmlab and QEMU measured but no ratio: {row}"
            );
        }
    }
    for key in VMLAB_ALWAYS {
        assert!(
            number(&figures[*key]["vmlab"]["median"]).is_some(),
            "vmlab's {key} was not measured: {}",
            figures[*key]
        );
    }
    let goals = report["goals"].as_array().expect("goals");
    assert!(goals.len() >= 4, "{goals:?}");

    // The Markdown has a row per figure, with the host at the top.
    let md = std::fs::read_to_string(&md_path).unwrap();
    assert!(md.starts_with("Host: "), "{md}");
    assert!(md.contains("| figure | vmlab | QEMU microvm | container (runc) | vmlab/QEMU |"));
    let rows = md.lines().filter(|l| l.starts_with("| ")).count();
    assert!(rows > FIGURES.len(), "{md}");
    std::fs::remove_dir_all(&dir).unwrap();
}
