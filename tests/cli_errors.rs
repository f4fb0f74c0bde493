//! Bad input: a one-line error naming the problem and a non-zero exit,
//! never a panic. None of these boots a guest.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;

const LIMIT: Duration = Duration::from_secs(60);

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vmlab-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// Runs vmlab with `args` and checks it failed cleanly with `needle` in
/// its error.
fn fails_with(args: &[&str], needle: &str) {
    let mut cmd = vmlab();
    cmd.args(args);
    let run = run_with_deadline(cmd, LIMIT);
    let code = run.code();
    assert!(
        code.is_some() && code != Some(0),
        "must fail\n{}",
        run.dump()
    );
    assert!(
        !run.stderr.contains("panicked"),
        "vmlab panicked\n{}",
        run.dump()
    );
    assert!(
        run.stderr.to_lowercase().contains(&needle.to_lowercase()),
        "expected '{needle}' in the error\n{}",
        run.dump()
    );
    let error_lines = run.stderr.lines().filter(|l| l.contains("error")).count();
    assert!(error_lines >= 1, "{}", run.dump());
}

fn s(p: &std::path::Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn missing_kernel() {
    fails_with(
        &["run", "--kernel", "/nonexistent/vmlinux"],
        "cannot read kernel /nonexistent/vmlinux",
    );
}

#[test]
fn kernel_is_a_directory() {
    fails_with(&["run", "--kernel", "/tmp"], "directory");
}

#[test]
fn random_bytes_are_not_a_kernel() {
    let path = scratch("random.bin");
    let mut bytes = vec![0u8; 64 * 1024];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for b in bytes.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    bytes[0] = 0;
    std::fs::write(&path, &bytes).unwrap();
    fails_with(&["run", "--kernel", s(&path)], "is not a Linux kernel");
}

#[test]
fn truncated_elf_kernel() {
    let full = std::fs::read(guest_dir().join("vmlinux")).unwrap();
    let path = scratch("truncated-vmlinux");
    std::fs::write(&path, &full[..full.len().min(100_000)]).unwrap();
    fails_with(&["run", "--kernel", s(&path)], "cannot load kernel");
}

#[test]
fn truncated_bzimage() {
    let full = std::fs::read(guest_dir().join("bzImage")).unwrap();
    let path = scratch("truncated-bzImage");
    std::fs::write(&path, &full[..2048]).unwrap();
    fails_with(&["run", "--kernel", s(&path)], "cannot load kernel");
}

#[test]
fn initrd_that_does_not_fit() {
    let path = scratch("huge-initrd");
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(200 << 20).unwrap(); // sparse: costs no disk
    let kernel = guest_dir().join("vmlinux");
    fails_with(
        &[
            "run",
            "--kernel",
            s(&kernel),
            "--initrd",
            s(&path),
            "--memory",
            "128M",
        ],
        "does not fit in guest memory",
    );
}

#[test]
fn missing_initrd() {
    let kernel = guest_dir().join("vmlinux");
    fails_with(
        &[
            "run",
            "--kernel",
            s(&kernel),
            "--initrd",
            "/nonexistent.cpio",
        ],
        "cannot read initrd",
    );
}

#[test]
fn memory_too_small() {
    let kernel = guest_dir().join("vmlinux");
    fails_with(
        &["run", "--kernel", s(&kernel), "--memory", "8M"],
        "too small",
    );
}

#[test]
fn memory_not_a_size() {
    fails_with(&["run", "--kernel", "k", "--memory", "lots"], "not a size");
    fails_with(&["run", "--kernel", "k", "--memory", "12Q"], "unknown unit");
}

#[test]
fn zero_cpus() {
    fails_with(
        &["run", "--kernel", "k", "--cpus", "0"],
        "at least one vCPU",
    );
}

#[test]
fn command_line_too_long() {
    let kernel = guest_dir().join("vmlinux");
    let long = "x".repeat(3000);
    fails_with(
        &["run", "--kernel", s(&kernel), "--cmdline", &long],
        "this kernel accepts at most",
    );
}

#[test]
fn command_too_long_for_the_command_line() {
    let kernel = guest_dir().join("vmlinux");
    let arg = "y".repeat(1500);
    fails_with(
        &["run", "--kernel", s(&kernel), "--", "echo", &arg],
        "this kernel accepts at most",
    );
}

#[test]
fn unknown_flag() {
    fails_with(
        &["run", "--kernel", "k", "--frobnicate"],
        "unexpected argument",
    );
}

#[test]
fn disk_errors() {
    let kernel = guest_dir().join("vmlinux");
    let k = s(&kernel);
    fails_with(
        &["run", "--kernel", k, "--disk", "path=/nonexistent.img"],
        "no such file",
    );
    fails_with(&["run", "--kernel", k, "--disk", "path=/tmp"], "directory");
    let odd = scratch("odd.img");
    std::fs::write(&odd, vec![0u8; 1000]).unwrap();
    fails_with(
        &["run", "--kernel", k, "--disk", &format!("path={}", s(&odd))],
        "512",
    );
    fails_with(
        &["run", "--kernel", k, "--disk", "path=/x,readonly=perhaps"],
        "readonly=perhaps",
    );
    fails_with(
        &["run", "--kernel", k, "--disk", "color=red"],
        "unknown --disk option",
    );
}

/// A disk image the user may not write, attached without readonly=on. Root
/// ignores file modes, so the file is made immutable (chattr +i), which
/// refuses writes even to root.
#[test]
fn unwritable_disk_needs_readonly() {
    let kernel = guest_dir().join("vmlinux");
    let image = scratch("immutable.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let chattr = |flag: &str| {
        std::process::Command::new("chattr")
            .arg(flag)
            .arg(&image)
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    assert!(
        chattr("+i"),
        "chattr +i must work on {} for this test",
        image.display()
    );
    let disk = format!("path={}", s(&image));
    let result = std::panic::catch_unwind(|| {
        fails_with(
            &["run", "--kernel", s(&kernel), "--disk", &disk],
            "is not writable",
        );
    });
    assert!(chattr("-i"));
    std::fs::remove_file(&image).unwrap();
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}
