//! The built binary, as scripts use it: one JSON line on stdout, exit
//! statuses, one-line errors, a net-server/net-client pair over loopback,
//! and the `xattr` tool's plain output.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_vmlab-workload");
/// `cpu --mib 1`; see src/cpu.rs.
const DIGEST_1_MIB: &str = "f29fb072131fcfc725b5ec446ad19960b2b1b4fd78a3cbf5867009111fe602e0";

fn run(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

/// Exit 0 and exactly one line on stdout, which is returned.
fn json_line(args: &[&str]) -> String {
    let out = run(args);
    let stdout = String::from_utf8(out.stdout).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{args:?}: {stderr}");
    assert_eq!(stdout.matches('\n').count(), 1, "{args:?}: {stdout:?}");
    let line = stdout.trim_end().to_string();
    assert!(line.starts_with('{') && line.ends_with('}'), "{line}");
    line
}

fn scratch_dir(tag: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("vmlab-workload-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn start_cpu_mem() {
    let line = json_line(&["start"]);
    assert!(
        line.starts_with(r#"{"workload":"start","ok":true,"pid":"#),
        "{line}"
    );
    let line = json_line(&["cpu", "--mib", "1"]);
    assert!(
        line.ends_with(&format!(r#""digest":"{DIGEST_1_MIB}"}}"#)),
        "{line}"
    );
    let line = json_line(&["mem", "--mib", "2", "--repeat", "2"]);
    assert!(
        line.starts_with(r#"{"workload":"mem","mib":2,"repeat":2,"#),
        "{line}"
    );
}

#[test]
fn disk_on_a_real_directory() {
    // target/tmp is on the build's file system, not a tmpfs.
    let dir = scratch_dir("disk");
    let d = dir.to_str().unwrap();
    for extra in [&[][..], &["--direct"]] {
        let mut args = vec![
            "disk",
            "--path",
            d,
            "--mib",
            "2",
            "--block-size",
            "256K",
            "--random-ops",
            "20",
        ];
        args.extend_from_slice(extra);
        let out = run(&args);
        if out.status.success() {
            let line = String::from_utf8(out.stdout).unwrap();
            let direct = !extra.is_empty();
            assert!(line.contains(&format!(r#""direct":{direct}"#)), "{line}");
        } else {
            // Only acceptable failure: no O_DIRECT on this file system.
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                !extra.is_empty() && err.contains("does not support O_DIRECT"),
                "{err}"
            );
        }
        assert!(!dir.join("vmlab-workload.dat").exists());
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn errors_are_one_line_with_a_status() {
    for (args, status) in [
        (&[][..], 2),
        (&["nope"], 2),
        (&["cpu", "--mib", "x"], 2),
        (&["cpu", "--fast"], 2),
        (&["disk"], 2),
        (&["disk", "--path", "/dev/null"], 1),
        (&["disk", "--path", "/nonexistent-dir/f", "--mib", "1"], 1),
    ] {
        let out = run(args);
        assert_eq!(out.status.code(), Some(status), "{args:?}");
        assert!(out.stdout.is_empty(), "{args:?}");
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(err.starts_with("vmlab-workload: "), "{err}");
        assert_eq!(err.matches('\n').count(), 1, "{args:?}: {err:?}");
    }
    let out = run(&["--version"]);
    assert!(out.status.success());
    assert!(String::from_utf8(out.stdout)
        .unwrap()
        .starts_with("vmlab-workload "));
}

#[test]
fn xattr_set_get_list() {
    use std::os::unix::ffi::OsStrExt;
    let dir = scratch_dir("xattr");
    let file = dir.join("f");
    std::fs::write(&file, b"").unwrap();
    let f = file.to_str().unwrap();
    // The value's bytes as given, not UTF-8 and with a newline.
    let value = std::ffi::OsStr::from_bytes(b"x\xff\ny");
    let out = Command::new(BIN)
        .args(["xattr", "set", f, "user.vmlab"])
        .arg(value)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout.is_empty());
    let out = run(&["xattr", "get", f, "user.vmlab"]);
    assert!(out.status.success());
    assert_eq!(out.stdout, b"x\xff\ny\n");
    let out = run(&["xattr", "list", f]);
    assert!(out.status.success());
    let listed = String::from_utf8(out.stdout).unwrap();
    assert!(listed.lines().any(|l| l == "user.vmlab"), "{listed:?}");
    for (args, status, text) in [
        (
            &["xattr", "get", f, "user.missing"][..],
            1,
            "No data available",
        ),
        (&["xattr", "list", "/nonexistent-vmlab"], 1, "No such file"),
        (&["xattr", "get", f], 2, "usage: vmlab-workload xattr set"),
    ] {
        let out = run(args);
        assert_eq!(out.status.code(), Some(status), "{args:?}");
        assert!(out.stdout.is_empty());
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(
            err.starts_with("vmlab-workload: ") && err.contains(text),
            "{err}"
        );
        assert_eq!(err.matches('\n').count(), 1, "{err:?}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn net_pair_over_loopback() {
    let mut server = Command::new(BIN)
        .args([
            "net-server",
            "--bind",
            "127.0.0.1",
            "--port",
            "0",
            "--timeout",
            "30",
            "--once",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The server names the port it bound on its stderr.
    let mut stderr = BufReader::new(server.stderr.take().unwrap());
    let mut first = String::new();
    stderr.read_line(&mut first).unwrap();
    let port = first
        .trim_end()
        .rsplit(':')
        .next()
        .and_then(|p| p.parse::<u16>().ok())
        .unwrap_or_else(|| panic!("no port in {first:?}"));
    assert!(first.contains("listening on 127.0.0.1:"), "{first}");

    let t = Instant::now();
    let line = json_line(&[
        "net-client",
        "--host",
        "127.0.0.1",
        "--port",
        &port.to_string(),
        "--seconds",
        "0.3",
        "--rtt-count",
        "100",
    ]);
    assert!(t.elapsed() < Duration::from_secs(20));
    assert!(line.contains(r#""rtt_count":100,"#), "{line}");

    let out = server.wait_with_output().unwrap();
    assert!(out.status.success());
    let server_line = String::from_utf8(out.stdout).unwrap();
    assert!(
        server_line.starts_with(r#"{"workload":"net-server","bind":"127.0.0.1:"#),
        "{server_line}"
    );
    assert!(
        server_line.contains(r#""rtt_exchanges":100}"#),
        "{server_line}"
    );
    // Both sides agree on the byte count.
    let count = |l: &str| {
        let from = l.find(r#""received_bytes":"#).unwrap() + r#""received_bytes":"#.len();
        l[from..].split(',').next().unwrap().to_string()
    };
    assert_eq!(count(&line), count(&server_line));
}
