//! `vmlab run --image`: the sample image (scripts/build-sample-image.sh)
//! boots in a real guest, as an OCI layout and as a `docker save` archive.
//! Two boots (~50 s each on a nested-KVM host), each checking several
//! things.

mod common;

use std::path::{Path, PathBuf};

use common::*;

/// The sample image's user and working directory (scripts/sample_image.py).
const SAMPLE_UID: &str = "1000";
const SAMPLE_WORKDIR: &str = "/work";

fn sample(name: &str) -> PathBuf {
    let p = guest_dir().join(name);
    assert!(
        p.exists(),
        "{} missing: run scripts/build-sample-image.sh (scripts/build-guest.sh does)",
        p.display()
    );
    p
}

/// An image cache of the tests' own, kept across runs (the first run
/// builds the image's disk, later ones reuse it).
fn cache_home() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/tmp/image-test-cache");
    std::fs::create_dir_all(&p).unwrap();
    p
}

/// Every file under `dir` whose name contains `needle`.
fn files_named(dir: &Path, needle: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                if e.file_name() != "rootfs" {
                    stack.push(p);
                }
            } else if e.file_name().to_string_lossy().contains(needle) {
                out.push(p);
            }
        }
    }
    out
}

/// OCI layout, command given: the guest kernel (not the host's), the
/// image's Env, WorkingDir and User, the layers' whiteout and opaque
/// directory, a writable working directory, and the command's exit status.
/// The run's disk copy is gone afterwards and the cached disk unchanged.
#[test]
fn oci_layout_command_env_workdir_user_exit_status() {
    let dir = guest_dir();
    let image = sample("sample-image");
    let cache = cache_home();
    let script = "uname -r; echo \"sample=$VMLAB_SAMPLE\"; echo \"pwd=$(pwd)\"; \
                  echo \"uid=$(id -u) gid=$(id -g)\"; \
                  test -e /etc/motd && echo motd-present || echo motd-whited-out; \
                  echo \"opt=$(ls /opt/sample | tr '\\n' ' ')\"; \
                  echo hi > written && echo write-ok; \
                  exit 4";
    let mut cmd = vmlab();
    cmd.env("XDG_CACHE_HOME", &cache)
        .args(["run", "--kernel"])
        .arg(dir.join("vmlinux"))
        .arg("--image")
        .arg(&image)
        .args(["--", "sh", "-c", script]);
    let run = run_guest(cmd, BOOT_LIMIT);
    let lines = run.lines();
    let has = |l: &str| lines.iter().any(|x| x == l);
    assert_eq!(run.code(), Some(4), "exit status\n{}", run.dump());
    let release = guest_release();
    assert!(has(&release), "guest release {release}\n{}", run.dump());
    let host = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    if host.trim() != release {
        assert!(!has(host.trim()), "not the host's kernel\n{}", run.dump());
    }
    assert!(has("sample=1"), "image Env\n{}", run.dump());
    assert!(
        has(&format!("pwd={SAMPLE_WORKDIR}")),
        "image WorkingDir\n{}",
        run.dump()
    );
    assert!(
        has(&format!("uid={SAMPLE_UID} gid={SAMPLE_UID}")),
        "image User\n{}",
        run.dump()
    );
    assert!(has("motd-whited-out"), "whiteout\n{}", run.dump());
    assert!(has("opt=new.txt "), "opaque directory\n{}", run.dump());
    assert!(
        has("write-ok"),
        "working directory writable\n{}",
        run.dump()
    );

    let disks = files_named(&cache, "vmlab-init-");
    assert!(!disks.is_empty(), "cached disk in {}", cache.display());
    assert!(
        files_named(&cache, "run-").is_empty(),
        "the run's disk copy is removed: {:?}",
        files_named(&cache, "run-")
    );
    // The guest wrote to its copy only, as a container writes to its own
    // layer: the cached disk has no trace of it.
    if let Some(debugfs) = ["/usr/sbin/debugfs", "/sbin/debugfs"]
        .into_iter()
        .find(|p| Path::new(p).exists())
    {
        for disk in &disks {
            let out = std::process::Command::new(debugfs)
                .args(["-R", "ls /work"])
                .arg(disk)
                .output()
                .unwrap();
            let listing = String::from_utf8_lossy(&out.stdout);
            assert!(listing.contains("README"), "{listing}");
            assert!(!listing.contains("written"), "{listing}");
        }
    }
}

/// `docker save` archive, no command: the image's default Cmd
/// (`vmlab-workload start`) runs and prints the same JSON shape as the
/// same program on the host.
#[test]
fn docker_archive_default_cmd_workload_json() {
    let dir = guest_dir();
    let image = sample("sample-image.tar");
    let mut cmd = vmlab();
    cmd.env("XDG_CACHE_HOME", cache_home())
        .args(["run", "--kernel"])
        .arg(dir.join("vmlinux"))
        .arg("--image")
        .arg(&image);
    let run = run_guest(cmd, BOOT_LIMIT);
    assert_eq!(run.code(), Some(0), "{}", run.dump());
    let line = run
        .lines()
        .into_iter()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("no JSON line\n{}", run.dump()));
    let guest: serde_json::Value =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
    assert_eq!(guest["workload"], "start", "{line}");
    assert_eq!(guest["ok"], true, "{line}");
    assert_eq!(guest["kernel"], guest_release().as_str(), "{line}");

    // The same program on the host: same keys, same value types.
    let host_bin = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/x86_64-unknown-linux-gnu/release/vmlab-workload");
    if host_bin.exists() {
        let out = std::process::Command::new(&host_bin)
            .arg("start")
            .output()
            .unwrap();
        let host: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(shape(&guest), shape(&host), "guest {guest}\nhost {host}");
    }
}

/// Keys and JSON types of an object.
fn shape(v: &serde_json::Value) -> Vec<(String, &'static str)> {
    let mut out: Vec<(String, &'static str)> = v
        .as_object()
        .map(|o| {
            o.iter()
                .map(|(k, v)| {
                    let t = match v {
                        serde_json::Value::Null => "null",
                        serde_json::Value::Bool(_) => "bool",
                        serde_json::Value::Number(_) => "number",
                        serde_json::Value::String(_) => "string",
                        serde_json::Value::Array(_) => "array",
                        serde_json::Value::Object(_) => "object",
                    };
                    (k.clone(), t)
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}
