//! Helpers shared by the integration tests: where the guest artifacts are,
//! and running the vmlab binary with a deadline.

#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

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
pub fn vmlab() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vmlab"));
    cmd.stdin(Stdio::null());
    cmd
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
