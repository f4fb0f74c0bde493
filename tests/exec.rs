//! Named VMs and the guest agent, end to end: ONE guest booted with
//! `vmlab run --detach` for the whole file (a boot costs ~15 s on this
//! host), shared by the tests through a fixture, stopped by the last test
//! (`zz_kill_and_stop`), which then checks that nothing is left.
//!
//! The guest's main process ignores SIGTERM and records SIGUSR1, so that
//! `vmlab kill NAME USR1` can be seen to reach it and `vmlab stop` has to
//! fall back to the guest power-off within its timeout. As root, the VM
//! runs in a network namespace of its own on a TAP device that vmlab
//! creates; after `stop` that TAP, too, must be gone.

mod common;

use std::io::{Read, Write};
use std::os::fd::FromRawFd;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::*;
use sha2::{Digest, Sha256};

const EXEC_LIMIT: Duration = Duration::from_secs(300);

struct Vm {
    name: String,
    state: PathBuf,
    pid: u32,
    /// The namespace the VM runs in, with the TAP vmlab created for it
    /// (None without root: the TAP check is then skipped, and says so).
    ns: Option<Netns>,
}

/// The TAP device the VM's virtio-net uses: vmlab creates it (it does not
/// exist before), so it must be gone once the VM has stopped.
const TAP: &str = "vmlab-exec0";

/// The VM, or why it could not be started (kept, so that the other tests
/// fail at once instead of each booting again).
static VM: OnceLock<Result<Vm, String>> = OnceLock::new();
/// Tests using the VM right now: the last test waits for them before it
/// stops it.
static USERS: AtomicUsize = AtomicUsize::new(0);

struct Use(&'static Vm);

impl Drop for Use {
    fn drop(&mut self) {
        USERS.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Whatever happens to the tests, the VM does not outlive the test
/// process (the harness ends with `exit`, which runs this).
extern "C" fn kill_vm_at_exit() {
    if let Some(Ok(vm)) = VM.get() {
        // SAFETY: kill has no memory effects.
        unsafe { libc::kill(vm.pid as i32, libc::SIGKILL) };
        let _ = std::fs::remove_dir_all(&vm.state);
        if let Some(ns) = vm.ns.as_ref().filter(|ns| ns.exists()) {
            // The static is never dropped: delete the namespace here.
            let _ = Command::new("ip")
                .args(["netns", "delete", &ns.name])
                .status();
        }
    }
}

const MAIN: &str = "echo main-started; \
    trap 'echo usr1 > /tmp/main-usr1' USR1; trap '' TERM; \
    while :; do sleep 100000 & wait $!; done";

fn vm() -> Use {
    USERS.fetch_add(1, Ordering::SeqCst);
    let vm = VM.get_or_init(|| {
        let guest = guest_dir();
        let state = std::env::temp_dir().join(format!("vmlab-exec-state-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&state);
        let name = format!("exec-{}", std::process::id());
        let ns = Netns::new();
        let mut cmd = match &ns {
            Some(ns) => ns.command(env!("CARGO_BIN_EXE_vmlab")),
            None => {
                eprintln!("skipped: the TAP check of zz_kill_and_stop (needs root)");
                vmlab()
            }
        };
        cmd.env("VMLAB_STATE_DIR", &state).args([
            "run",
            "--kernel",
            guest.join("vmlinux").to_str().unwrap(),
            "--initrd",
            guest.join("initramfs.cpio.gz").to_str().unwrap(),
            "--name",
            &name,
            "--detach",
            // A busy host (two guests booting, builds) can take minutes.
            "--ready-timeout",
            "800",
        ]);
        if ns.is_some() {
            cmd.args(["--net", &format!("tap={TAP}")]);
        }
        cmd.args(["--", "sh", "-c", MAIN]);
        // SAFETY: registers a function without arguments.
        unsafe { libc::atexit(kill_vm_at_exit) };
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run_with_deadline(cmd, BOOT_LIMIT)
        }))
        .map_err(|_| "vmlab run --detach did not finish in time".to_string())?;
        if run.code() != Some(0) || run.lines() != vec![name.clone()] {
            return Err(format!("run --detach failed\n{}", run.dump()));
        }
        eprintln!("exec tests: VM {name} up after {:?}", run.elapsed);
        let pid: u32 = std::fs::read_to_string(state.join(&name).join("pid"))
            .map_err(|e| e.to_string())?
            .trim()
            .parse()
            .map_err(|e| format!("pid file: {e}"))?;
        Ok(Vm {
            name,
            state,
            pid,
            ns,
        })
    });
    match vm {
        Ok(vm) => Use(vm),
        Err(e) => panic!("the shared VM did not start: {e}"),
    }
}

impl Use {
    fn cmd(&self, args: &[&str]) -> Command {
        let mut cmd = vmlab();
        cmd.env("VMLAB_STATE_DIR", &self.0.state).args(args);
        cmd
    }

    /// `vmlab exec NAME -- argv`.
    fn exec(&self, opts: &[&str], argv: &[&str]) -> Run {
        let mut args = vec!["exec"];
        args.extend_from_slice(opts);
        args.push(&self.0.name);
        args.push("--");
        args.extend_from_slice(argv);
        run_with_deadline(self.cmd(&args), EXEC_LIMIT)
    }

    fn sh(&self, script: &str) -> Run {
        self.exec(&[], &["sh", "-c", script])
    }
}

#[test]
fn exit_status_and_docker_codes() {
    let vm = vm();
    let run = vm.sh("exit 7");
    assert_eq!(run.code(), Some(7), "{}", run.dump());
    let run = vm.exec(&[], &["true"]);
    assert_eq!(run.code(), Some(0), "{}", run.dump());
    let run = vm.exec(&[], &["no-such-command"]);
    assert_eq!(run.code(), Some(127), "{}", run.dump());
    assert!(
        run.stderr.contains("no-such-command: not found"),
        "{}",
        run.dump()
    );
    let run = vm.exec(&[], &["/etc"]);
    assert_eq!(run.code(), Some(126), "{}", run.dump());
    // Killed by a signal: 128+N.
    let run = vm.sh("kill -9 $$");
    assert_eq!(run.code(), Some(137), "{}", run.dump());
    // Environment, working directory, user.
    let run = vm.exec(
        &["-e", "FOO=bar baz", "-w", "/tmp", "-u", "1234:5678"],
        &["sh", "-c", "echo \"$FOO|$(pwd)|$(id -u):$(id -g)\""],
    );
    assert_eq!(run.code(), Some(0), "{}", run.dump());
    assert_eq!(
        run.lines(),
        vec!["bar baz|/tmp|1234:5678"],
        "{}",
        run.dump()
    );
    let run = vm.exec(&["-w", "/no/such/dir"], &["true"]);
    assert_eq!(run.code(), Some(126), "{}", run.dump());
}

#[test]
fn stdin_carries_1_mib_of_binary_data() {
    let vm = vm();
    let mut data = vec![0u8; 1 << 20];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut data)
        .unwrap();
    let want = hex(&Sha256::digest(&data));
    for argv in [&["cat"][..], &["sha256sum"]] {
        let mut cmd = vm.cmd(&["exec", "-i", &vm.0.name, "--"]);
        cmd.args(argv)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let start = Instant::now();
        let mut child = cmd.spawn().unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let input = data.clone();
        let feeder = std::thread::spawn(move || stdin.write_all(&input).unwrap());
        let out = child.wait_with_output().unwrap();
        feeder.join().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{argv:?}: {stderr}");
        let got = match argv[0] {
            "cat" => {
                assert_eq!(out.stdout.len(), data.len(), "{stderr}");
                hex(&Sha256::digest(&out.stdout))
            }
            _ => String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .next()
                .unwrap_or("")
                .to_string(),
        };
        assert_eq!(got, want, "{argv:?}");
        eprintln!("1 MiB through {argv:?}: {:?}", start.elapsed());
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn stderr_arrives_apart_from_stdout() {
    let vm = vm();
    let run = vm.sh("echo out1; echo err1 >&2; echo out2; echo err2 >&2; exit 3");
    assert_eq!(run.code(), Some(3), "{}", run.dump());
    assert_eq!(run.stdout, "out1\nout2\n", "{}", run.dump());
    assert_eq!(run.stderr, "err1\nerr2\n", "{}", run.dump());
}

#[test]
fn a_signal_reaches_a_guest_trap() {
    let vm = vm();
    let mut cmd = vm.cmd(&[
        "exec",
        &vm.0.name,
        "--",
        "sh",
        "-c",
        "trap 'echo got-usr1; exit 5' USR1; echo ready; while :; do sleep 1; done",
    ]);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    while !String::from_utf8_lossy(&seen).contains("ready") {
        let n = stdout.read(&mut buf).unwrap();
        assert!(
            n > 0,
            "exec ended early: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    // SAFETY: kill has no memory effects; the pid is our child's.
    unsafe { libc::kill(child.id() as i32, libc::SIGUSR1) };
    stdout.read_to_end(&mut seen).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(5), "{}", String::from_utf8_lossy(&seen));
    assert!(String::from_utf8_lossy(&seen).contains("got-usr1"));
}

#[test]
fn tty_has_the_host_terminal_size() {
    let vm = vm();
    let ws = libc::winsize {
        ws_row: 37,
        ws_col: 111,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let (mut master, mut slave) = (0, 0);
    // SAFETY: openpty writes two descriptors; the name may be null; the
    // termios and winsize pointers are read only.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &ws,
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors are fresh and owned here.
    let (master, slave) = unsafe {
        (
            std::fs::File::from_raw_fd(master),
            std::fs::File::from_raw_fd(slave),
        )
    };
    let mut cmd = vm.cmd(&[
        "exec",
        "-t",
        &vm.0.name,
        "--",
        "sh",
        "-c",
        "stty size; test -t 0 && test -t 1 && echo is-a-tty",
    ]);
    cmd.stdin(slave.try_clone().unwrap())
        .stdout(slave.try_clone().unwrap())
        .stderr(slave);
    let mut child = cmd.spawn().unwrap();
    // Our copies of the slave are closed (moved into the child's stdio),
    // so the master reads EIO once vmlab exits.
    let reader = std::thread::spawn(move || {
        let mut master = master;
        let mut out = Vec::new();
        let mut buf = [0u8; 1024];
        while let Ok(n) = master.read(&mut buf) {
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&out).into_owned()
    });
    let status = child.wait().unwrap();
    drop(cmd);
    let out = reader.join().unwrap();
    assert_eq!(status.code(), Some(0), "{out}");
    assert!(out.contains("37 111"), "{out:?}");
    assert!(out.contains("is-a-tty"), "{out:?}");
}

#[test]
fn twenty_concurrent_execs() {
    let vm = vm();
    let start = Instant::now();
    let handles: Vec<_> = (0..20)
        .map(|i| {
            let mut cmd = vm.cmd(&[
                "exec",
                &vm.0.name,
                "--",
                "sh",
                "-c",
                &format!("echo out-{i}; echo err-{i} >&2; exit {i}"),
            ]);
            std::thread::spawn(move || {
                cmd.stdin(Stdio::null());
                run_with_deadline(cmd, EXEC_LIMIT)
            })
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        let run = h.join().unwrap();
        assert_eq!(run.code(), Some(i as i32), "{}", run.dump());
        assert_eq!(run.stdout, format!("out-{i}\n"), "{}", run.dump());
        assert_eq!(run.stderr, format!("err-{i}\n"), "{}", run.dump());
    }
    eprintln!("20 concurrent execs: {:?}", start.elapsed());
}

#[test]
fn ps_and_logs_show_the_vm() {
    let vm = vm();
    let run = run_with_deadline(vm.cmd(&["ps"]), EXEC_LIMIT);
    assert_eq!(run.code(), Some(0), "{}", run.dump());
    let line = run
        .lines()
        .into_iter()
        .find(|l| l.starts_with(&vm.0.name))
        .unwrap_or_else(|| panic!("not in ps\n{}", run.dump()));
    let cols: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(cols[1], "running", "{line}");
    assert_eq!(cols[2], vm.0.pid.to_string(), "{line}");
    assert!(cols[4].ends_with('M') && cols[5].ends_with('M'), "{line}");
    let run = run_with_deadline(vm.cmd(&["logs", &vm.0.name]), EXEC_LIMIT);
    assert_eq!(run.code(), Some(0), "{}", run.dump());
    assert!(run.stdout.contains("main-started"), "{}", run.dump());
}

/// Runs last (tests start in name order; it waits for the others to let
/// go of the VM): `kill` reaches the main process, `stop` ends a main
/// process that ignores SIGTERM within its timeout, and nothing is left.
/// `vmlab run --agent -- CMD`: a VM of its own (not the shared one), CMD
/// run through the agent, its stdout and stderr apart, its exit status
/// vmlab's, and the VM gone afterwards.
#[test]
fn run_through_the_agent_keeps_stdout_and_stderr_apart() {
    let guest = guest_dir();
    let state = std::env::temp_dir().join(format!("vmlab-run-agent-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&state);
    let mut cmd = vmlab();
    cmd.env("VMLAB_STATE_DIR", &state).args([
        "run",
        "--agent",
        "--ready-timeout",
        "800",
        "--kernel",
        guest.join("vmlinux").to_str().unwrap(),
        "--initrd",
        guest.join("initramfs.cpio.gz").to_str().unwrap(),
        "--",
        "sh",
        "-c",
        "echo to-stdout; echo to-stderr >&2; exit 3",
    ]);
    let run = run_with_deadline(cmd, BOOT_LIMIT);
    assert_eq!(run.code(), Some(3), "{}", run.dump());
    assert_eq!(run.stdout, "to-stdout\n", "{}", run.dump());
    assert!(
        run.stderr.contains("to-stderr\n") && !run.stderr.contains("to-stdout"),
        "{}",
        run.dump()
    );
    let left: Vec<_> = std::fs::read_dir(&state)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "state left behind: {left:?}");
    let _ = std::fs::remove_dir_all(&state);
}

#[test]
fn zz_kill_and_stop() {
    let vm = vm();
    // The boot took long enough for every earlier test to have started
    // and registered; wait until they are done with the VM.
    let deadline = Instant::now() + Duration::from_secs(600);
    std::thread::sleep(Duration::from_millis(500));
    while USERS.load(Ordering::SeqCst) > 1 {
        assert!(Instant::now() < deadline, "other tests still use the VM");
        std::thread::sleep(Duration::from_millis(100));
    }

    let run = run_with_deadline(vm.cmd(&["kill", &vm.0.name, "USR1"]), EXEC_LIMIT);
    assert_eq!(run.code(), Some(0), "{}", run.dump());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let run = vm.sh("cat /tmp/main-usr1 2>/dev/null || true");
        if run.stdout.trim() == "usr1" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "SIGUSR1 never reached the main process"
        );
        std::thread::sleep(Duration::from_millis(500));
    }

    let dir = vm.0.state.join(&vm.0.name);
    let socket = dir.join("vsock.sock");
    assert!(socket.exists() && dir.join("lock").exists());
    if let Some(ns) = &vm.0.ns {
        assert!(ns.has_link(TAP), "no TAP {TAP} while the VM runs");
    }
    let start = Instant::now();
    let run = run_with_deadline(vm.cmd(&["stop", &vm.0.name, "--timeout", "3"]), EXEC_LIMIT);
    let took = start.elapsed();
    assert_eq!(run.code(), Some(0), "{}", run.dump());
    assert!(
        took >= Duration::from_secs(3),
        "TERM was ignored, yet: {took:?}"
    );
    assert!(took < Duration::from_secs(3 + 20), "stop took {took:?}");
    eprintln!("stop with a main process that ignores SIGTERM: {took:?}");
    assert_ne!(
        // SAFETY: signal 0 only checks whether the process exists.
        unsafe { libc::kill(vm.0.pid as i32, 0) },
        0,
        "VMM still there"
    );
    assert!(!dir.exists(), "state directory left behind");
    assert!(!socket.exists());
    if let Some(ns) = &vm.0.ns {
        assert!(!ns.has_link(TAP), "TAP {TAP} left behind");
        let _ = Command::new("ip")
            .args(["netns", "delete", &ns.name])
            .status();
    }
    let run = run_with_deadline(vm.cmd(&["ps"]), EXEC_LIMIT);
    assert!(!run.stdout.contains(&vm.0.name), "{}", run.dump());
    let run = vm.exec(&[], &["true"]);
    assert_eq!(run.code(), Some(125), "{}", run.dump());
    assert!(run.stderr.contains("no such VM"), "{}", run.dump());
    let _ = std::fs::remove_dir_all(&vm.0.state);
}
