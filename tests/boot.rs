//! Boots the real guest kernel on real KVM. Each guest boot costs ~40 s on
//! a nested-KVM host, so each test checks several things in one boot.

mod common;

use common::*;

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
        .args(["sh", "-c", "uname -r; reboot -f"]);
    let run = run_with_deadline(cmd, BOOT_LIMIT);
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
    let run = run_with_deadline(cmd, BOOT_LIMIT);
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
    let run = run_with_deadline(cmd, BOOT_LIMIT);
    assert_eq!(run.code(), Some(125), "{}", run.dump());
    assert!(
        run.stderr
            .contains("the guest kernel panicked: Kernel panic - not syncing"),
        "{}",
        run.dump()
    );
}
