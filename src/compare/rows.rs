//! From what the runs printed to the rows of the table: which number of
//! which workload's JSON line each row takes, and the claim from the
//! user's notes (`../shared/seeds/000_*.txt`, in Korean) each row tests,
//! with the rule that decides whether this machine agrees.
//!
//! Pure: the run records come from `super::run_env`, or from a test.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::report::{Better, Check, Claim, Env, Row, RowDef, Sample, Unit};

/// What one launch of one environment produced.
#[derive(Debug, Clone, PartialEq)]
pub struct RunRecord {
    /// Which environment.
    pub env: Env,
    /// Which repetition (1-based).
    pub repetition: u32,
    /// Seconds from spawning the launcher to the `start` line.
    pub first_line_s: Option<f64>,
    /// Peak host memory charged to the environment, or why unknown.
    pub memory: Result<MemoryUse, String>,
    /// Each workload's JSON line, by its `workload` name (`start`, `cpu`,
    /// `mem`, `disk`, `kernel`, `net-server`, and the host side's
    /// `net-client`).
    pub results: BTreeMap<String, Value>,
    /// Why a workload gave no result, by name.
    pub failures: BTreeMap<String, String>,
    /// How the launch ended ("exit status 0", "stopped after 900 s").
    pub outcome: String,
    /// Other measurements of the run (the VMM's own peak RSS).
    pub extra: BTreeMap<String, Value>,
    /// The last lines of its output that were not results (logs, errors).
    pub log: Vec<String>,
}

/// Peak host memory of an environment, and how it was measured.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryUse {
    /// Bytes.
    pub peak_bytes: u64,
    /// How: "cgroup peak" or "sampled RSS".
    pub method: String,
}

impl RunRecord {
    /// An empty record for a launch that is about to start.
    pub fn new(env: Env, repetition: u32) -> RunRecord {
        RunRecord {
            env,
            repetition,
            first_line_s: None,
            memory: Err("not measured".into()),
            results: BTreeMap::new(),
            failures: BTreeMap::new(),
            outcome: "not started".into(),
            extra: BTreeMap::new(),
            log: Vec::new(),
        }
    }

    /// Why `workload` has no result.
    fn why_missing(&self, workload: &str) -> String {
        match self.failures.get(workload) {
            Some(why) => why.clone(),
            None => format!("{workload}: no result ({})", self.outcome),
        }
    }

    /// `workload`'s `field` as a number.
    pub fn number(&self, workload: &str, field: &str) -> Sample {
        match self.results.get(workload) {
            Some(v) => match v.get(field).and_then(Value::as_f64) {
                Some(x) if x.is_finite() => Sample::Number(x),
                _ => Sample::Missing(format!("{workload}: no number '{field}' in its result")),
            },
            None => Sample::Missing(self.why_missing(workload)),
        }
    }

    /// `workload`'s `field` as a text.
    pub fn text(&self, workload: &str, field: &str) -> Sample {
        match self.results.get(workload) {
            Some(v) => match v.get(field).and_then(Value::as_str) {
                Some(t) if !t.is_empty() => Sample::Text(t.to_string()),
                _ => Sample::Missing(format!("{workload}: no text '{field}' in its result")),
            },
            None => Sample::Missing(self.why_missing(workload)),
        }
    }

    /// The record as JSON, for the report's `runs`.
    pub fn json(&self) -> Value {
        json!({
            "env": self.env.key(),
            "repetition": self.repetition,
            "first_line_s": self.first_line_s,
            "memory": match &self.memory {
                Ok(m) => json!({ "peak_bytes": m.peak_bytes, "method": m.method }),
                Err(why) => json!({ "unavailable": why }),
            },
            "results": self.results,
            "failures": self.failures,
            "outcome": self.outcome,
            "extra": self.extra,
            "log": self.log,
        })
    }
}

/// Sizes of the workloads, as run in every environment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sizes {
    /// `cpu --mib`.
    pub cpu_mib: u64,
    /// `mem --mib`.
    pub mem_mib: u64,
    /// `mem --repeat`.
    pub mem_repeat: u64,
    /// `disk --mib`.
    pub disk_mib: u64,
    /// `disk --random-ops`.
    pub random_ops: u64,
    /// `net-client --seconds`.
    pub net_seconds: f64,
    /// `net-client --rtt-count`.
    pub rtt_count: u64,
}

/// Facts measured once, not per run.
#[derive(Debug, Clone, PartialEq)]
pub struct Footprint {
    /// Allocated bytes of the extracted root file system the container
    /// runs on, or why unknown.
    pub container_bytes: Result<u64, String>,
    /// Allocated bytes of the VM's ext4 disk image plus the guest kernel.
    pub vm_bytes: Result<u64, String>,
    /// How each was made up, for the method text.
    pub detail: String,
}

/// "Near native": at most this many times the host's cost.
pub const NEAR_NATIVE: f64 = 1.2;
/// "Slightly slower" (약간 느림): more than the host's cost, at most this
/// many times it.
pub const SLIGHTLY: f64 = 1.5;
/// "Relatively low efficiency" (비교적 낮음): the VM needs at least this
/// many times the container's memory.
pub const MEMORY_FACTOR: f64 = 2.0;
/// "Seconds" (수 초) versus "tens of seconds or minutes" (수십 초~수 분).
pub const TEN_SECONDS: f64 = 10.0;
/// "Tens to hundreds of MB" (수십~수백 MB) versus "GBs" (수 GB 이상).
pub const ONE_GB: f64 = (1u64 << 30) as f64;

/// The user's performance claim (성능 / IO 성능), shared by several rows.
fn perf_claim(io: bool) -> Claim {
    if io {
        Claim {
            text: "I/O: container near-native; VM slower, as it goes through the hypervisor",
            source: "IO 성능: 거의 네이티브 수준 | Hypervisor 통해 전달되어 느림",
            checks: vec![
                Check::CostAtMost(Env::Container, Env::Host, NEAR_NATIVE),
                Check::CostAbove(Env::Vm, Env::Host, NEAR_NATIVE),
            ],
            caveat: None,
        }
    } else {
        Claim {
            text: "performance: container near-native; VM slightly slower (hypervisor in between)",
            source: "성능: 거의 네이티브 | 약간 느림 (Hypervisor 중간 매개)",
            checks: vec![
                Check::CostAtMost(Env::Container, Env::Host, NEAR_NATIVE),
                Check::CostWithin(Env::Vm, Env::Host, 1.0, SLIGHTLY),
            ],
            caveat: None,
        }
    }
}

/// Builds every row from the runs (any order) and the one-off facts.
/// `net_unavailable`: why the network rows could not be measured at all.
pub fn build_rows(
    runs: &[RunRecord],
    sizes: &Sizes,
    footprint: &Footprint,
    memory_method: &str,
    net_unavailable: Option<&str>,
) -> Vec<Row> {
    // Per environment, per run: the sample `f` takes from it.
    let series = |f: &dyn Fn(&RunRecord) -> Sample| -> [Vec<Sample>; 3] {
        Env::ALL.map(|env| runs.iter().filter(|r| r.env == env).map(f).collect())
    };
    let row = |def: RowDef, f: &dyn Fn(&RunRecord) -> Sample| {
        let s = series(f);
        Row::new(def, [&s[0], &s[1], &s[2]])
    };
    let mut rows = Vec::new();

    rows.push(row(
        RowDef {
            key: "start",
            label: "launch to first output line".into(),
            unit: Unit::Seconds,
            better: Better::Lower,
            method: "From spawning the launcher (`sh -c` on the host, `vmlab container`, `vmlab run --image`) to the first line of the workload program (`vmlab-workload start`) on its output, timed on the host. The image is unpacked and its ext4 disk built once before any timing, as `docker pull` would be; what remains is creating the environment: the container's overlay root and runc, the VM's disk copy, guest kernel boot and init.".into(),
            claim: Claim {
                text: "boot: container in seconds; VM in tens of seconds to minutes",
                source: "부팅 속도: 수 초 | 수십 초~수 분",
                checks: vec![
                    Check::Below(Env::Container, TEN_SECONDS),
                    Check::AtLeast(Env::Vm, TEN_SECONDS),
                ],
                caveat: None,
            },
        },
        &|r| match r.first_line_s {
            Some(s) => Sample::Number(s),
            None => Sample::Missing(format!("no start line ({})", r.outcome)),
        },
    ));

    rows.push(row(
        RowDef {
            key: "memory",
            label: "host memory used (peak)".into(),
            unit: Unit::Bytes,
            better: Better::Lower,
            method: format!("Peak memory the host charged to the environment over its whole run, all workloads included: {memory_method}"),
            claim: Claim {
                text: "resource efficiency: container very high; VM relatively low",
                source: "자원 효율성: 매우 높음 | 비교적 낮음",
                checks: vec![Check::CostAbove(Env::Vm, Env::Container, MEMORY_FACTOR)],
                caveat: Some("Only memory is tested here; the CPU side of efficiency is in the CPU and I/O rows."),
            },
        },
        &|r| match &r.memory {
            Ok(m) => Sample::Number(m.peak_bytes as f64),
            Err(why) => Sample::Missing(why.clone()),
        },
    ));

    let fp = |v: &Result<u64, String>| match v {
        Ok(b) => vec![Sample::Number(*b as f64)],
        Err(why) => vec![Sample::Missing(why.clone())],
    };
    let host_fp = vec![Sample::Missing(
        "not applicable: the host runs the workload binary in place, with nothing to store".into(),
    )];
    rows.push(Row::new(
        RowDef {
            key: "footprint",
            label: "disk footprint".into(),
            unit: Unit::Bytes,
            better: Better::Lower,
            method: format!("Disk space (allocated blocks) of what each environment boots from, measured once: {}", footprint.detail),
            claim: Claim {
                text: "disk use: container tens to hundreds of MB; VM several GB or more",
                source: "디스크 사용량: 수십 MB~수백 MB | 수 GB 이상",
                checks: vec![
                    Check::Below(Env::Container, ONE_GB),
                    Check::AtLeast(Env::Vm, ONE_GB),
                ],
                caveat: Some("The claim is about general-purpose images and full VM disks; a micro-VM boots the container's own root file system plus a kernel."),
            },
        },
        [&host_fp, &fp(&footprint.container_bytes), &fp(&footprint.vm_bytes)],
    ));

    rows.push(row(
        RowDef {
            key: "cpu",
            label: format!("CPU job: SHA-256 of {} MiB", sizes.cpu_mib),
            unit: Unit::Seconds,
            better: Better::Lower,
            method: "`vmlab-workload cpu`: single-threaded SHA-256 over generated data (no system calls inside the timed loop), timed by the environment's own clock; equal digests in every environment prove the same work was done.".into(),
            claim: perf_claim(false),
        },
        &|r| r.number("cpu", "seconds"),
    ));

    rows.push(row(
        RowDef {
            key: "mem",
            label: format!(
                "memory bandwidth: copy of {} MiB (median of {})",
                sizes.mem_mib, sizes.mem_repeat
            ),
            unit: Unit::MibPerSec,
            better: Better::Higher,
            method: "`vmlab-workload mem`: memcpy of one buffer into another, both touched beforehand so page faults are not timed; median of the copies.".into(),
            claim: perf_claim(false),
        },
        &|r| r.number("mem", "median_mib_per_s"),
    ));

    let disk_method = |what: &str| {
        format!("`vmlab-workload disk --path .` in the working directory: {what}. Host: a scratch directory on the host's file system; container: its overlay root (upper layer on the same host file system); VM: the image's ext4 root on virtio-blk, backed by a copy of the disk image on the same host file system.")
    };
    rows.push(row(
        RowDef {
            key: "disk_write",
            label: format!("disk: sequential write of {} MiB + fsync", sizes.disk_mib),
            unit: Unit::MibPerSec,
            better: Better::Higher,
            method: disk_method("1 MiB writes, then fsync, timed to durable data"),
            claim: perf_claim(true),
        },
        &|r| r.number("disk", "write_mib_per_s"),
    ));
    rows.push(row(
        RowDef {
            key: "disk_read",
            label: format!("disk: sequential read of {} MiB", sizes.disk_mib),
            unit: Unit::MibPerSec,
            better: Better::Higher,
            method: disk_method(
                "the file read back after dropping its pages from the environment's page cache (posix_fadvise; the host's cache below a VM's disk stays)",
            ),
            claim: perf_claim(true),
        },
        &|r| r.number("disk", "read_mib_per_s"),
    ));
    rows.push(row(
        RowDef {
            key: "disk_random",
            label: format!("disk: {} random 4 KiB reads", sizes.random_ops),
            unit: Unit::Iops,
            better: Better::Higher,
            method: disk_method(
                "4 KiB reads at fixed pseudo-random offsets, cache dropped and read-ahead off",
            ),
            claim: perf_claim(true),
        },
        &|r| r.number("disk", "rand_read_iops"),
    ));

    let net = |r: &RunRecord, field: &str| match net_unavailable {
        Some(why) => Sample::Missing(why.to_string()),
        None => r.number("net-client", field),
    };
    let net_method = "`vmlab-workload net-server --bind 0.0.0.0` in the environment, `net-client` on the host side in a network namespace vmlab compare creates (and removes): host and container are reached over a veth pair from a second namespace (the container joins it with `vmlab container --netns`; the host's server just runs there), the VM over its virtio-net device and a TAP in the client's namespace. No traffic leaves those namespaces.";
    rows.push(row(
        RowDef {
            key: "net_throughput",
            label: format!("network: TCP throughput ({} s)", sizes.net_seconds),
            unit: Unit::MbitPerSec,
            better: Better::Higher,
            method: format!(
                "{net_method} Bytes the server counted over the client's sending time."
            ),
            claim: perf_claim(true),
        },
        &|r| net(r, "mbit_per_s"),
    ));
    rows.push(row(
        RowDef {
            key: "net_latency",
            label: format!("network: TCP round trip (median of {})", sizes.rtt_count),
            unit: Unit::Micros,
            better: Better::Lower,
            method: format!(
                "{net_method} One byte echoed back, TCP_NODELAY, median round-trip time."
            ),
            claim: perf_claim(true),
        },
        &|r| net(r, "rtt_median_us"),
    ));

    rows.push(row(
        RowDef {
            key: "kernel",
            label: "`uname -r` inside".into(),
            unit: Unit::Text,
            better: Better::Lower,
            method: "`uname -r` run by the same script in each environment.".into(),
            claim: Claim {
                text: "`uname -r`: in a container the host's kernel; in each VM a kernel of its own",
                source: "`uname -r` 결과: 호스트 커널과 동일 | 각 VM마다 커널 버전 다름",
                checks: vec![
                    Check::SameText(Env::Container, Env::Host),
                    Check::OtherText(Env::Vm, Env::Host),
                ],
                caveat: Some("A VM could run the same release as the host; the isolation row tells kernels apart by instance, not by version."),
            },
        },
        &|r| r.text("kernel", "release"),
    ));

    rows.push(row(
        RowDef {
            key: "isolation",
            label: "kernel instance (boot_id)".into(),
            unit: Unit::Text,
            better: Better::Lower,
            method: "`/proc/sys/kernel/random/boot_id`, random per booted kernel, read in each environment: equal to the host's means the same running kernel.".into(),
            claim: Claim {
                text: "isolation: container medium (shares the host kernel: namespaces + cgroups); VM strong (a kernel of its own)",
                source: "격리 수준: 중간 (namespace + cgroups) | 강함 (완전 격리된 커널)",
                checks: vec![
                    Check::SameText(Env::Container, Env::Host),
                    Check::OtherText(Env::Vm, Env::Host),
                ],
                caveat: Some("This tests the claim's premise, one shared kernel versus a separate one; the strength of isolation itself (attack surface) is not something a benchmark run can measure."),
            },
        },
        &|r| r.text("kernel", "boot_id"),
    ));
    rows
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compare::report::{Cell, Verdict};
    use crate::compare::tests::sizes;

    fn record(env: Env, rep: u32, lines: &[&str]) -> RunRecord {
        let mut r = RunRecord::new(env, rep);
        for l in lines {
            let v: Value = serde_json::from_str(l).unwrap();
            let name = v["workload"].as_str().unwrap().to_string();
            r.results.insert(name, v);
        }
        r.outcome = "exit status 0".into();
        r
    }

    /// Known timings in, the same numbers out: medians over the runs of
    /// each environment, ratios of those medians, and the verdicts.
    #[test]
    fn known_runs_give_known_rows() {
        let mut runs = Vec::new();
        for (rep, (cpu_host, cpu_vm)) in [(1.0, 1.2), (1.2, 1.4), (1.1, 1.3)].iter().enumerate() {
            let rep = rep as u32 + 1;
            let host_kernel = r#"{"workload":"kernel","release":"6.18.44","boot_id":"aaaa"}"#;
            let mut h = record(
                Env::Host,
                rep,
                &[
                    &format!(r#"{{"workload":"cpu","seconds":{cpu_host}}}"#),
                    host_kernel,
                    r#"{"workload":"net-client","mbit_per_s":1000.0,"rtt_median_us":50.0}"#,
                ],
            );
            h.first_line_s = Some(0.002);
            h.memory = Ok(MemoryUse {
                peak_bytes: 10 << 20,
                method: "cgroup".into(),
            });
            let mut c = record(
                Env::Container,
                rep,
                &[
                    &format!(r#"{{"workload":"cpu","seconds":{cpu_host}}}"#),
                    host_kernel,
                    r#"{"workload":"net-client","mbit_per_s":990.0,"rtt_median_us":52.0}"#,
                ],
            );
            c.first_line_s = Some(0.1 * f64::from(rep));
            c.memory = Ok(MemoryUse {
                peak_bytes: 20 << 20,
                method: "cgroup".into(),
            });
            let mut v = record(
                Env::Vm,
                rep,
                &[
                    &format!(r#"{{"workload":"cpu","seconds":{cpu_vm}}}"#),
                    r#"{"workload":"kernel","release":"6.1.192","boot_id":"bbbb"}"#,
                ],
            );
            v.failures
                .insert("net-client".into(), "connect timed out".into());
            v.first_line_s = Some(40.0 + f64::from(rep));
            v.memory = Ok(MemoryUse {
                peak_bytes: 200 << 20,
                method: "cgroup".into(),
            });
            runs.extend([h, c, v]);
        }
        let footprint = Footprint {
            container_bytes: Ok(4 << 20),
            vm_bytes: Ok(30 << 20),
            detail: "d".into(),
        };
        let rows = build_rows(&runs, &sizes(), &footprint, "cgroup", None);
        let get = |k: &str| rows.iter().find(|r| r.def.key == k).unwrap();

        let start = get("start");
        assert_eq!(start.cell(Env::Container).median(), Some(0.2));
        let Cell::Number { stats, .. } = start.cell(Env::Vm) else {
            panic!()
        };
        assert_eq!((stats.median, stats.min, stats.max), (42.0, 41.0, 43.0));
        assert_eq!(start.judgement.verdict, Verdict::Agrees);

        let cpu = get("cpu");
        assert_eq!(cpu.cell(Env::Host).median(), Some(1.1));
        assert_eq!(cpu.cell(Env::Vm).median(), Some(1.3));
        let r = cpu.ratio(Env::Vm, Env::Host).unwrap();
        assert!((r - 1.3 / 1.1).abs() < 1e-12);
        // 1.18×: slower, and "slightly".
        assert_eq!(cpu.judgement.verdict, Verdict::Agrees);

        let mem = get("memory");
        assert_eq!(mem.ratio(Env::Vm, Env::Container), Ok(10.0));
        assert_eq!(mem.judgement.verdict, Verdict::Agrees);

        let fp = get("footprint");
        assert!(matches!(fp.cell(Env::Host), Cell::Missing(r) if r.starts_with("not applicable")));
        assert_eq!(fp.judgement.verdict, Verdict::Partly);

        let tput = get("net_throughput");
        assert_eq!(tput.cell(Env::Container).median(), Some(990.0));
        assert_eq!(
            tput.cell(Env::Vm),
            &Cell::Missing("connect timed out".into())
        );
        assert_eq!(tput.judgement.verdict, Verdict::Untested);

        // Workloads that printed nothing say so.
        let disk = get("disk_write");
        assert!(
            matches!(disk.cell(Env::Host), Cell::Missing(r) if r == "disk: no result (exit status 0)")
        );

        assert_eq!(get("kernel").judgement.verdict, Verdict::Agrees);
        assert_eq!(get("isolation").cell(Env::Vm), &Cell::Text("bbbb".into()));
        assert_eq!(get("isolation").judgement.verdict, Verdict::Agrees);

        // Without networking every net cell says why.
        let rows = build_rows(&runs, &sizes(), &footprint, "m", Some("not root"));
        let lat = rows.iter().find(|r| r.def.key == "net_latency").unwrap();
        for env in Env::ALL {
            assert_eq!(lat.cell(env), &Cell::Missing("not root".into()));
        }
    }

    #[test]
    fn field_extraction() {
        let mut r = record(
            Env::Vm,
            1,
            &[r#"{"workload":"disk","write_mib_per_s":"x"}"#],
        );
        assert_eq!(
            r.number("disk", "write_mib_per_s"),
            Sample::Missing("disk: no number 'write_mib_per_s' in its result".into())
        );
        r.failures
            .insert("cpu".into(), "cpu: exit status 1: out of memory".into());
        assert_eq!(
            r.number("cpu", "seconds"),
            Sample::Missing("cpu: exit status 1: out of memory".into())
        );
        let j = r.json();
        assert_eq!(j["env"], "vm");
        assert_eq!(j["memory"]["unavailable"], "not measured");
    }
}
