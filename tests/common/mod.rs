//! Helpers shared by the integration tests: where the guest artifacts are,
//! and running the vmlab binary with a deadline.

#![allow(dead_code)]

mod guest;
mod netns;
#[allow(unused_imports)]
pub use guest::*;
#[allow(unused_imports)]
pub use netns::*;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use vmlab::host::{HostKind, PVM_CMDLINE};

/// A finished vmlab run.
pub struct Run {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Run {
    /// The exit code (None if killed by a signal).
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// Stdout lines without terminal carriage returns.
    pub fn lines(&self) -> Vec<String> {
        self.stdout
            .lines()
            .map(|l| l.trim_end_matches('\r').to_string())
            .collect()
    }

    /// Asserts that stderr contains (`has`) or lacks `needle`.
    pub fn assert_stderr(&self, has: bool, needle: &str) {
        assert_eq!(
            self.stderr.contains(needle),
            has,
            "stderr {} {needle:?}\n{}",
            if has { "lacks" } else { "has" },
            self.dump()
        );
    }

    /// Everything, for assertion messages.
    pub fn dump(&self) -> String {
        format!(
            "status: {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// Directory with vmlinux, bzImage, initramfs.cpio.gz, kernel-release.
pub fn guest_dir() -> PathBuf {
    let dir = std::env::var_os("VMLAB_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/guest"));
    assert!(
        dir.join("vmlinux").exists() && dir.join("initramfs.cpio.gz").exists(),
        "guest artifacts missing in {}: run scripts/build-guest.sh first",
        dir.display()
    );
    dir
}

/// The guest kernel's release string.
pub fn guest_release() -> String {
    std::fs::read_to_string(guest_dir().join("kernel-release"))
        .expect("target/guest/kernel-release")
        .trim()
        .to_string()
}

/// The vmlab binary under test.
/// The vmlab binary under test, with the virtiofsd scripts/build-guest.sh
/// installs (target/guest/virtiofsd) for `--volume`.
pub fn vmlab() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vmlab"));
    cmd.stdin(Stdio::null());
    let virtiofsd = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/guest/virtiofsd");
    if std::env::var_os("VMLAB_VIRTIOFSD").is_none() && virtiofsd.exists() {
        cmd.env("VMLAB_VIRTIOFSD", virtiofsd);
    }
    cmd
}

/// The kind of KVM host the tests must find: `VMLAB_EXPECT_HOST=hardware`
/// (scripts/test-svm.sh sets it in its nested-SVM L1) or `pvm`; unset,
/// whatever vmlab's own detection says this host is.
pub fn expected_host() -> HostKind {
    match std::env::var("VMLAB_EXPECT_HOST").as_deref() {
        Ok("hardware") => HostKind::Hardware,
        Ok("pvm") => HostKind::NestedPvm,
        Ok(other) => panic!("VMLAB_EXPECT_HOST={other}: expected hardware or pvm"),
        Err(_) => HostKind::detect(),
    }
}

/// Checks that a `vmlab run` (with the default `--host-quirks auto` and
/// log level) detected the expected host and applied the PVM workarounds
/// exactly when that host is PVM: its log line, the emulation fallback
/// and `--stats` rows of emulated instructions.
pub fn assert_host_workarounds(stderr: &str) {
    let expected = expected_host();
    let want = format!("host: {} (", expected.describe());
    assert!(
        stderr.contains(&want),
        "vmlab should have detected {want:?}\n--- stderr ---\n{stderr}"
    );
    if expected == HostKind::Hardware {
        for pvm_only in ["adding to the guest command line", "emulation fallback"] {
            assert!(
                !stderr.contains(pvm_only),
                "PVM workaround applied on a hardware host ({pvm_only:?})\n--- stderr ---\n{stderr}"
            );
        }
    }
}

/// Checks the guest's own `/proc/cmdline` (the words after `prefix` on a
/// stdout line the guest printed): it carries the PVM-only options exactly
/// when the expected host is PVM (or `--host-quirks pvm` forced them).
pub fn assert_guest_cmdline(run: &Run, prefix: &str, pvm: bool) {
    let lines = run.lines();
    let cmdline = lines
        .iter()
        .find_map(|l| l.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no {prefix:?} line\n{}", run.dump()));
    let words: Vec<&str> = cmdline.split_whitespace().collect();
    for option in PVM_CMDLINE {
        assert_eq!(
            words.contains(option),
            pvm,
            "guest command line {} {option:?}: {cmdline}\n{}",
            if pvm { "lacks" } else { "carries the PVM-only" },
            run.dump()
        );
    }
}

/// Runs a `vmlab run` that boots a guest with the default `--host-quirks
/// auto` and log level: [`run_with_deadline`] plus
/// [`assert_host_workarounds`].
pub fn run_guest(cmd: Command, limit: Duration) -> Run {
    let run = run_with_deadline(cmd, limit);
    assert_host_workarounds(&run.stderr);
    run
}

/// Runs `cmd`, killing it after `limit`.
pub fn run_with_deadline(mut cmd: Command, limit: Duration) -> Run {
    let start = Instant::now();
    let mut child: Child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vmlab");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_thread = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out.read_to_end(&mut s);
        s
    });
    let err_thread = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        s
    });
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let status = child.wait().expect("wait after kill");
            let stdout = String::from_utf8_lossy(&out_thread.join().unwrap()).into_owned();
            let stderr = String::from_utf8_lossy(&err_thread.join().unwrap()).into_owned();
            panic!(
                "vmlab did not finish within {limit:?} ({status:?})\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}"
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Run {
        status,
        stdout: String::from_utf8_lossy(&out_thread.join().unwrap()).into_owned(),
        stderr: String::from_utf8_lossy(&err_thread.join().unwrap()).into_owned(),
        elapsed: start.elapsed(),
    }
}

/// How long a guest boot may take before a test gives up: generous, since
/// a nested-KVM host boots in ~40 s and CI may run two guests at once.
pub const BOOT_LIMIT: Duration = Duration::from_secs(900);
