//! The guest console on real KVM: a guest printing into a stdout nobody
//! reads does not keep vmlab from stopping on SIGTERM, and a command's
//! output is exactly what the command printed (nothing the guest prints
//! after reporting its exit status reaches stdout; issue 13).

mod common;

use std::io::{BufRead, BufReader};
use std::os::fd::AsRawFd;
use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;

fn initramfs_run() -> std::process::Command {
    let dir = guest_dir();
    let mut cmd = vmlab();
    cmd.args(["run", "--kernel"])
        .arg(dir.join("vmlinux"))
        .arg("--initrd")
        .arg(dir.join("initramfs.cpio.gz"));
    cmd
}

/// A guest prints without end into a pipe that is never read. Once the
/// console buffer is full (the vCPU did not block: vmlab logs it from the
/// vCPU's own UART write), SIGTERM stops vmlab within 5 s with 128+15.
#[test]
fn sigterm_with_unread_stdout() {
    let mut cmd = initramfs_run();
    // -v: the debug line that says the console buffer filled up.
    cmd.args(["-v", "--", "sh", "-c"])
        .arg("while :; do echo xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx; done")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn vmlab");
    let stdout = child.stdout.take().unwrap();
    // The smallest pipe: it fills after a page, then only the console
    // buffer takes the guest's output.
    // SAFETY: fcntl on a descriptor this test owns.
    unsafe { libc::fcntl(stdout.as_raw_fd(), libc::F_SETPIPE_SZ, 4096) };
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line.clone());
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    let started = Instant::now();
    let mut full = false;
    while started.elapsed() < BOOT_LIMIT {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) if line.contains("console: the output buffer is full") => {
                full = true;
                break;
            }
            Ok(_) | Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("vmlab ended early ({status:?})\n{}", reader.join().unwrap());
        }
    }
    if !full {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "the console buffer never filled\n{}",
            reader.join().unwrap()
        );
    }
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let signalled = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if signalled.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("vmlab ignored SIGTERM for 30 s\n{}", reader.join().unwrap());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let took = signalled.elapsed();
    drop(stdout);
    let log = reader.join().unwrap();
    eprintln!("vmlab stopped {took:?} after SIGTERM");
    assert!(
        took <= Duration::from_secs(5),
        "vmlab took {took:?} to stop after SIGTERM\n{log}"
    );
    assert_eq!(status.code(), Some(128 + 15), "{log}");
}

/// `vmlab run -- echo hi` prints exactly "hi\n", every time: the kernel's
/// `reboot: Restarting system` (printed after the init reported the exit
/// status) must never reach stdout. Issue 13 asks for 20 runs. A boot
/// takes 10-15 s on an idle nested-KVM host and minutes on a busy one,
/// where a 2-vCPU guest may not boot at all (seen with main's vmlab too:
/// both vCPUs inside KVM_RUN for 7 minutes after 36 exits), so by default
/// this runs 4 one-vCPU guests, 2 at a time. `VMLAB_STDOUT_RUNS=20`,
/// `VMLAB_STDOUT_PARALLEL` and `VMLAB_STDOUT_CPUS=2` give the full check
/// (the SVM lane, where a boot takes a fraction of a second, runs that).
#[test]
fn command_stdout_is_exact() {
    let env = |name: &str, default: usize| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let runs = env("VMLAB_STDOUT_RUNS", 4);
    let parallel = env("VMLAB_STDOUT_PARALLEL", 2).max(1);
    let cpus = env("VMLAB_STDOUT_CPUS", 1).to_string();
    let started = Instant::now();
    let mut done = 0;
    while done < runs {
        let batch = parallel.min(runs - done);
        let handles: Vec<_> = (0..batch)
            .map(|_| {
                let cpus = cpus.clone();
                std::thread::spawn(move || {
                    let mut cmd = initramfs_run();
                    cmd.args(["--cpus", &cpus, "--", "echo", "hi"]);
                    run_with_deadline(cmd, BOOT_LIMIT)
                })
            })
            .collect();
        for (i, h) in handles.into_iter().enumerate() {
            let run = h.join().expect("run thread");
            assert_eq!(run.code(), Some(0), "run {}\n{}", done + i, run.dump());
            assert_eq!(run.stdout, "hi\n", "run {}\n{}", done + i, run.dump());
        }
        done += batch;
    }
    eprintln!(
        "{runs} runs with {cpus} vCPU(s), {parallel} at a time, in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}
