//! Boots the real guest kernel on real KVM. Each guest boot costs ~40 s on
//! a nested-KVM host, so each test checks several things in one boot.

mod common;

use common::*;
use vmlab::host::HostKind;

/// vmlinux + the gzip initramfs: the guest's kernel release (not the
/// host's), a reboot from inside the guest through the i8042 reset line,
/// and the --stats and --boot-time reports.
#[test]
fn vmlinux_gzip_initramfs_release_reboot_stats() {
    let dir = guest_dir();
    let mut cmd = vmlab();
    cmd.args(["run", "--kernel"])
        .arg(dir.join("vmlinux"))
        .arg("--initrd")
        .arg(dir.join("initramfs.cpio.gz"))
        .args(["--stats", "--boot-time", "--"])
        .args([
            "sh",
            "-c",
            "uname -r; echo \"cmdline: $(cat /proc/cmdline)\"; reboot -f",
        ]);
    let run = run_guest(cmd, BOOT_LIMIT);
    let lines = run.lines();
    let release = guest_release();
    assert_eq!(
        run.code(),
        Some(0),
        "reboot from the guest ends vmlab cleanly\n{}",
        run.dump()
    );
    assert!(
        lines.contains(&release),
        "guest release {release} printed\n{}",
        run.dump()
    );
    let host_release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    if host_release.trim() != release {
        assert!(
            !lines.iter().any(|l| l == host_release.trim()),
            "{}",
            run.dump()
        );
    }
    // The PVM-only options reach the guest on a PVM host and only there.
    assert_guest_cmdline(&run, "cmdline: ", expected_host() == HostKind::NestedPvm);
    // --stats: a table with serial-port exits, the status port and the
    // i8042 reset.
    assert!(
        run.stderr.contains("vmlab exit statistics"),
        "{}",
        run.dump()
    );
    assert!(
        run.stderr.contains("io-out port 0x03f8 (COM1)"),
        "{}",
        run.dump()
    );
    assert!(
        run.stderr.contains("io-out port 0x00f4 (vmlab status)"),
        "{}",
        run.dump()
    );
    assert!(
        run.stderr.contains("io-out port 0x0064 (i8042)"),
        "the reset went through the i8042\n{}",
        run.dump()
    );
    assert!(run.stderr.contains("time inside KVM_RUN"), "{}", run.dump());
    // --boot-time: both marks present.
    let line = run
        .stderr
        .lines()
        .find(|l| l.contains("boot time:"))
        .unwrap_or_else(|| panic!("no boot time line\n{}", run.dump()));
    assert!(
        line.contains("first KVM_RUN after") && !line.contains("never"),
        "{line}"
    );
}

/// bzImage, 2 vCPUs: the guest sees both CPUs, pipelines (two processes
/// switching on and off the CPUs, each with its own TLS) work, and the
/// command's exit status becomes vmlab's.
#[test]
fn bzimage_two_cpus_nproc_and_exit_status() {
    let dir = guest_dir();
    let mut cmd = vmlab();
    cmd.args(["run", "--kernel"])
        .arg(dir.join("bzImage"))
        .arg("--initrd")
        .arg(dir.join("initramfs.cpio"))
        .args(["--cpus", "2", "--", "sh", "-c", "uname -r; nproc; exit 3"]);
    let run = run_guest(cmd, BOOT_LIMIT);
    assert_eq!(run.code(), Some(3), "{}", run.dump());
    let lines = run.lines();
    assert!(lines.contains(&guest_release()), "{}", run.dump());
    assert!(
        lines.iter().any(|l| l == "2"),
        "nproc prints 2\n{}",
        run.dump()
    );
}

/// A guest whose kernel panics (no init can be found) makes vmlab exit
/// non-zero and quote the panic.
#[test]
fn guest_panic_is_reported() {
    let dir = guest_dir();
    let mut cmd = vmlab();
    cmd.args(["run", "--kernel"])
        .arg(dir.join("vmlinux"))
        .args(["--cmdline", "rdinit=/nonexistent init=/nonexistent"]);
    let run = run_guest(cmd, BOOT_LIMIT);
    assert_eq!(run.code(), Some(125), "{}", run.dump());
    assert!(
        run.stderr
            .contains("the guest kernel panicked: Kernel panic - not syncing"),
        "{}",
        run.dump()
    );
}

/// vmlinux + the uncompressed initramfs with `--host-quirks MODE`.
fn run_with_quirks(mode: &str, command: &[&str]) -> Run {
    let dir = guest_dir();
    let mut cmd = vmlab();
    cmd.args(["run", "--host-quirks", mode, "--kernel"])
        .arg(dir.join("vmlinux"))
        .arg("--initrd")
        .arg(dir.join("initramfs.cpio"))
        .arg("--")
        .args(command);
    run_with_deadline(cmd, BOOT_LIMIT)
}

/// `--host-quirks pvm` forced on any host: the workarounds are harmless
/// on hardware virtualization (scripts/test-svm.sh runs this on nested
/// SVM), so the guest boots, gets every PVM-only option and runs the
/// command with the emulation fallback armed.
#[test]
fn forced_pvm_quirks_boot_on_any_host() {
    let script = "echo \"cmdline: $(cat /proc/cmdline)\"; exit 5";
    let run = run_with_quirks("pvm", &["sh", "-c", script]);
    assert_eq!(run.code(), Some(5), "{}", run.dump());
    run.assert_stderr(true, "(forced by --host-quirks pvm); adding");
    run.assert_stderr(true, "emulation fallback on");
    assert_guest_cmdline(&run, "cmdline: ", true);
}

/// `--host-quirks none` on a PVM host fails as docs/HOST.md says: the
/// guest kernel reaches an instruction this host's KVM rejects, and
/// without the emulation fallback vmlab stops with KVM's internal error
/// (exit status 125). Hardware hosts skip it (nothing to fail there).
#[test]
fn no_quirks_on_a_pvm_host_stops_at_a_rejected_instruction() {
    if expected_host() != HostKind::NestedPvm {
        eprintln!("skipped: this host is not a PVM host (nothing to fail without workarounds)");
        return;
    }
    let run = run_with_quirks("none", &["echo", "hi"]);
    assert_eq!(run.code(), Some(125), "{}", run.dump());
    run.assert_stderr(
        true,
        "KVM internal error (suberror 1): KVM could not run the guest's instruction",
    );
    run.assert_stderr(false, "emulation fallback on");
    assert!(!run.lines().iter().any(|l| l == "hi"), "{}", run.dump());
}
