//! vmlab as an OCI runtime (`vmlab-runtime`), driven by the real engines:
//! Docker 20.10 (containerd-shim-runc-v2 calls the runtime), Compose,
//! containerd's `ctr` and Podman (conmon). Every container is a micro-VM
//! with vmlab's guest kernel.
//!
//! Set-up, once per test binary ([`engines`]): scripts/install-runtime.sh
//! registers this build's binary (daemon.json, containers.conf,
//! /etc/vmlab/runtime.json), scripts/engines.sh starts containerd and
//! dockerd without systemd (they stay up for the other tests of this binary;
//! scripts/test.sh stops them at its end), scripts/build-oci-images.sh
//! imports the offline images (busybox, PostgreSQL) into Docker and Podman.
//! The tests take one lock, so one VM runs at a time on this 2-core host.
//! After each, [`assert_nothing_left`] checks that the containers it made
//! left nothing: no VMM or virtiofsd process, no VM state under
//! /run/vmlab-oci, no container state under the engine's runtime root, no
//! TAP in the host's namespace.
//!
//! Networking stays on this machine: Docker's default bridge and Podman's
//! CNI bridge, a port published on 127.0.0.1.
//!
//! Needs root, KVM and the engines (scripts/test.sh installs them); without
//! them the tests fail, unless VMLAB_SKIP_ENGINE_TESTS=1 (then each says
//! it skipped).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use common::{run_with_deadline, Run};

const BUSYBOX: &str = "vmlab-busybox:test";
/// A guest boot here is ~10 s; a whole `docker run` of one at most this.
const RUN_LIMIT: Duration = Duration::from_secs(180);
/// Podman needs these on hosts whose root lacks CAP_SYS_RESOURCE.
const PODMAN_ULIMITS: [&str; 4] = [
    "--ulimit",
    "nofile=1024:1024",
    "--ulimit",
    "nproc=1024:1024",
];

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The runtime link scripts/install-runtime.sh makes next to the binary.
fn runtime() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_vmlab")).with_file_name("vmlab-runtime")
}

/// Why the tests cannot run here, if they cannot.
fn missing_prerequisite() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("root".into());
    }
    if !Path::new("/dev/kvm").exists() {
        return Some("/dev/kvm".into());
    }
    for tool in [
        "docker",
        "dockerd",
        "containerd",
        "ctr",
        "podman",
        "docker-compose",
        "script",
        "curl",
    ] {
        let found = ["/usr/bin", "/usr/sbin", "/bin", "/sbin"]
            .iter()
            .any(|d| Path::new(d).join(tool).exists());
        if !found {
            return Some(format!(
                "{tool} (scripts/test.sh installs docker.io, docker-compose, podman, curl)"
            ));
        }
    }
    if !repo().join("target/guest/virtiofsd").exists() {
        return Some("target/guest/virtiofsd (scripts/build-guest.sh)".into());
    }
    None
}

/// Runs a set-up script, panicking with its output if it fails.
fn script(name: &str, args: &[&str]) {
    let mut cmd = Command::new(repo().join("scripts").join(name));
    cmd.args(args).stdin(Stdio::null());
    let run = run_with_deadline(cmd, Duration::from_secs(900));
    assert!(
        run.status.success(),
        "scripts/{name} {}: {}",
        args.join(" "),
        run.dump()
    );
}

/// One test at a time (one VM at a time on this 2-core host).
fn lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// The engines, set up once; `None` (after saying why) when they cannot be.
fn engines() -> Option<MutexGuard<'static, ()>> {
    static READY: OnceLock<Result<(), String>> = OnceLock::new();
    let ready = READY.get_or_init(|| {
        if let Some(why) = missing_prerequisite() {
            return Err(why);
        }
        let bin = env!("CARGO_BIN_EXE_vmlab");
        let kernel = common::guest_dir().join("vmlinux");
        let virtiofsd = repo().join("target/guest/virtiofsd");
        script(
            "install-runtime.sh",
            &[
                "--binary",
                bin,
                "--kernel",
                kernel.to_str().unwrap(),
                "--virtiofsd",
                virtiofsd.to_str().unwrap(),
                "--reload",
            ],
        );
        script("engines.sh", &["start"]);
        script("build-oci-images.sh", &["--podman"]);
        Ok(())
    });
    match ready {
        Ok(()) => Some(lock()),
        Err(why) if std::env::var("VMLAB_SKIP_ENGINE_TESTS").as_deref() == Ok("1") => {
            eprintln!("SKIPPED: the OCI runtime tests need {why} (VMLAB_SKIP_ENGINE_TESTS=1)");
            None
        }
        Err(why) => {
            panic!("the OCI runtime tests need {why}; set VMLAB_SKIP_ENGINE_TESTS=1 to skip them")
        }
    }
}

/// Debian's docker CLI on the local daemon (a newer CLI in /usr/local/bin
/// may shadow it).
fn docker(args: &[&str]) -> Command {
    let mut c = Command::new("/usr/bin/docker");
    c.env("DOCKER_HOST", "unix:///var/run/docker.sock")
        .args(args)
        .stdin(Stdio::null());
    c
}

fn run(mut cmd: Command, limit: Duration) -> Run {
    cmd.stdin(Stdio::null());
    run_with_deadline(cmd, limit)
}

/// Runs and asserts success; its stdout.
fn ok(cmd: Command) -> String {
    let what = format!("{cmd:?}");
    let r = run(cmd, RUN_LIMIT);
    assert!(r.status.success(), "{what}: {}", r.dump());
    r.stdout
}

/// `docker run -d --name NAME --runtime vmlab [FLAGS] busybox CMD...`.
fn run_vm_detached(name: &str, flags: &[&str], cmd: &[&str]) {
    let mut args = vec!["run", "-d", "--name", name, "--runtime", "vmlab"];
    args.extend_from_slice(flags);
    args.push(BUSYBOX);
    args.extend_from_slice(cmd);
    ok(docker(&args));
}

/// Removes containers by name, ignoring those that do not exist.
fn docker_rm(names: &[&str]) {
    let mut args = vec!["rm", "-f"];
    args.extend_from_slice(names);
    let _ = run(docker(&args), RUN_LIMIT);
}

/// Waits until `f` is true, at most `limit`.
fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    f()
}

/// Where an engine keeps a container's runtime state (`--root`).
const DOCKER_ROOT: &str = "/run/docker/runtime-runc/moby";
const CTR_ROOT: &str = "/run/containerd/runc/vmlabtest";
/// Podman gives no `--root`: the runtime's default.
const PODMAN_ROOT: &str = vmlab::oci::state::DEFAULT_ROOT;

/// A container the test made: its engine's root and its ID.
type Made = (PathBuf, String);

fn made(root: &str, id: &str) -> Made {
    (PathBuf::from(root), id.trim().to_string())
}

/// A Docker container's full ID.
fn docker_id(name: &str) -> Made {
    made(
        DOCKER_ROOT,
        &ok(docker(&["inspect", "-f", "{{.Id}}", name])),
    )
}

/// What is left of the containers `made`: their runtime state, their VM's
/// state under /run/vmlab-oci, any VMM or virtiofsd process of those VMs;
/// and any TAP in the host's namespace (there never should be one).
fn leftovers(made: &[Made]) -> Vec<String> {
    let mut left = Vec::new();
    let mut vms = Vec::new();
    for (root, id) in made {
        let dir = root.join(id);
        if dir.exists() {
            left.push(format!("container state {}", dir.display()));
        }
        let vm = vmlab::oci::state::vm_name(root, id);
        let vm_dir = Path::new(vmlab::oci::state::VM_ROOT).join(&vm);
        if vm_dir.exists() {
            left.push(format!("VM state {}", vm_dir.display()));
        }
        vms.push(vm);
    }
    if let Ok(procs) = std::fs::read_dir("/proc") {
        for p in procs.flatten() {
            let Ok(cmd) = std::fs::read(p.path().join("cmdline")) else {
                continue;
            };
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if vms.iter().any(|vm| cmd.contains(vm.as_str())) {
                left.push(format!(
                    "process {}: {cmd}",
                    p.file_name().to_string_lossy()
                ));
            }
        }
    }
    let links = Command::new("ip").args(["-o", "link"]).output();
    if let Ok(o) = links {
        for l in String::from_utf8_lossy(&o.stdout).lines() {
            if l.contains("tap0_vmlab") {
                left.push(format!("TAP in the host namespace: {l}"));
            }
        }
    }
    left
}

/// Nothing of the containers `made` is left (the engines clean up
/// asynchronously: up to 20 s).
fn assert_nothing_left(after: &str, made: &[Made]) {
    assert!(!made.is_empty());
    let clean = wait_until(Duration::from_secs(20), || leftovers(made).is_empty());
    assert!(clean, "left after {after}: {:#?}", leftovers(made));
}

/// A `--cidfile` path for a `docker run --rm` (whose container is gone
/// when the test wants its ID).
fn cidfile(dir: &Path, n: &str) -> String {
    dir.join(n).to_str().unwrap().to_string()
}

fn read_cid(path: &str) -> String {
    std::fs::read_to_string(path).unwrap().trim().to_string()
}

/// The guest kernel's release, which `uname -r` prints in a vmlab
/// container (and not the host's).
fn guest_release() -> String {
    common::guest_release()
}

#[test]
fn docker_run_status_process_flags_volume_and_resources() {
    let Some(_engines) = engines() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let (c1, c2) = (cidfile(tmp.path(), "1"), cidfile(tmp.path(), "2"));
    // The kernel is the VM's, and the exit status passes through.
    let r = run(
        docker(&[
            "run",
            "--rm",
            "--cidfile",
            &c1,
            "--runtime",
            "vmlab",
            BUSYBOX,
            "sh",
            "-c",
            "uname -r; exit 3",
        ]),
        RUN_LIMIT,
    );
    assert_eq!(r.code(), Some(3), "{}", r.dump());
    assert_eq!(r.stdout.trim(), guest_release(), "{}", r.dump());
    let host = ok({
        let mut c = Command::new("uname");
        c.arg("-r");
        c
    });
    assert_ne!(r.stdout.trim(), host.trim(), "uname -r is the host's");

    // -e -w -u -v (read and write, seen on the host) --memory --cpus.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("in"), "from the host\n").unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let vol = format!("{}:/data", dir.path().display());
    let out = ok(docker(&[
        "run",
        "--rm",
        "--cidfile",
        &c2,
        "--runtime",
        "vmlab",
        "-e",
        "GREETING=hello vm",
        "-w",
        "/tmp",
        "-u",
        "1000:1000",
        "-v",
        &vol,
        "--memory",
        "256m",
        "--cpus",
        "2",
        BUSYBOX,
        "sh",
        "-c",
        "echo \"env=$GREETING\"; echo \"pwd=$(pwd)\"; echo \"id=$(id -u):$(id -g)\"; \
         echo \"in=$(cat /data/in)\"; echo written-in-the-vm > /data/out; \
         echo \"mem=$(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo)\"; \
         echo \"cpus=$(nproc)\"",
    ]));
    let get = |k: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .unwrap_or_else(|| panic!("no {k}= in {out}"))
            .to_string()
    };
    assert_eq!(get("env"), "hello vm");
    assert_eq!(get("pwd"), "/tmp");
    assert_eq!(get("id"), "1000:1000");
    assert_eq!(get("in"), "from the host");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("out")).unwrap(),
        "written-in-the-vm\n"
    );
    // 256 MiB plus the documented 64 MiB overhead, less what the kernel
    // keeps for itself.
    let mem: u64 = get("mem").parse().unwrap();
    assert!((256..=320).contains(&mem), "MemTotal {mem} MiB: {out}");
    assert_eq!(get("cpus"), "2");
    assert_nothing_left(
        "docker run --rm",
        &[
            made(DOCKER_ROOT, &read_cid(&c1)),
            made(DOCKER_ROOT, &read_cid(&c2)),
        ],
    );
}

#[test]
fn docker_detached_exec_logs_signals_top_pause_and_stop() {
    let Some(_engines) = engines() else { return };
    let name = "vmlab-oci-detached";
    docker_rm(&[name]);
    run_vm_detached(
        name,
        &[],
        &[
            "sh",
            "-c",
            "trap 'echo caught USR1' USR1; trap 'echo caught TERM; exit 7' TERM; \
             echo started; while true; do sleep 1; done",
        ],
    );
    let me = docker_id(name);
    // exec's status, stdin with -i, a terminal with -it (under script(1),
    // which gives the docker CLI a terminal).
    let r = run(docker(&["exec", name, "sh", "-c", "exit 5"]), RUN_LIMIT);
    assert_eq!(r.code(), Some(5), "{}", r.dump());
    let mut c = docker(&["exec", "-i", name, "sh", "-c", "tr a-z A-Z"]);
    c.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"through stdin\n").unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "THROUGH STDIN\n");
    let tty = ok({
        let mut c = Command::new("script");
        c.args([
            "-qec",
            &format!(
                "DOCKER_HOST=unix:///var/run/docker.sock /usr/bin/docker exec -it {name} \
                 sh -c 'tty; echo rows=$(stty size)'"
            ),
            "/dev/null",
        ]);
        c
    });
    assert!(tty.contains("/dev/pts/"), "docker exec -it: no pty: {tty}");
    assert!(tty.contains("rows="), "{tty}");

    // docker top lists the VMM (the container's host process).
    let top = ok(docker(&["top", name]));
    assert!(top.contains("vmlab"), "{top}");
    // pause stops the VM; exec waits; unpause lets it go on.
    ok(docker(&["pause", name]));
    let st = ok(docker(&["inspect", "-f", "{{.State.Status}}", name]));
    assert_eq!(st.trim(), "paused");
    ok(docker(&["unpause", name]));

    // A signal reaches the guest's process: its trap prints to the log.
    ok(docker(&["kill", "-s", "USR1", name]));
    let logs = || ok(docker(&["logs", name]));
    assert!(
        wait_until(Duration::from_secs(20), || logs().contains("caught USR1")),
        "{}",
        logs()
    );
    assert!(logs().contains("started"));
    // docker stop: SIGTERM handled in the guest, its status is the
    // container's.
    ok(docker(&["stop", "-t", "30", name]));
    let code = ok(docker(&["inspect", "-f", "{{.State.ExitCode}}", name]));
    assert_eq!(code.trim(), "7");
    assert!(logs().contains("caught TERM"));
    // exec into a stopped container: the engine says why.
    let r = run(docker(&["exec", name, "true"]), RUN_LIMIT);
    assert!(!r.status.success());
    assert!(r.stderr.contains("is not running"), "{}", r.dump());
    ok(docker(&["rm", name]));
    assert_nothing_left("docker stop and docker rm", &[me]);
}

#[test]
fn docker_bridge_network_published_port_stop_timeout_and_rm_force() {
    let Some(_engines) = engines() else { return };
    let (server, vm) = ("vmlab-oci-runc-peer", "vmlab-oci-web");
    docker_rm(&[server, vm]);
    // A runc container on the default bridge, serving one line per
    // connection.
    ok(docker(&[
        "run",
        "-d",
        "--name",
        server,
        BUSYBOX,
        "sh",
        "-c",
        "while true; do echo from-runc | nc -l -p 7000; done",
    ]));
    // A vmlab container that serves HTTP on port 80, published on
    // 127.0.0.1, and ignores SIGTERM (so `docker stop -t 2` has to kill it).
    let port = free_port();
    let publish = format!("127.0.0.1:{port}:80");
    run_vm_detached(
        vm,
        &["-p", &publish],
        &[
            "sh",
            "-c",
            "trap '' TERM; mkdir -p /www; echo from-vmlab > /www/index.html; \
             exec httpd -f -p 80 -h /www",
        ],
    );
    let ip = |n: &str| {
        ok(docker(&[
            "inspect",
            "-f",
            "{{.NetworkSettings.IPAddress}}",
            n,
        ]))
        .trim()
        .to_string()
    };
    let (server_ip, vm_ip) = (ip(server), ip(vm));
    let me = docker_id(vm);
    // The host, through Docker's NAT on 127.0.0.1.
    let url = format!("http://127.0.0.1:{port}/");
    let served = wait_until(Duration::from_secs(60), || {
        Command::new("curl")
            .args(["-s", "--max-time", "2", &url])
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("from-vmlab"))
    });
    assert!(served, "{url} did not answer from the VM");
    // The VM reaches the runc container by IP, and back.
    let got = ok(docker(&[
        "exec",
        vm,
        "sh",
        "-c",
        &format!("nc {server_ip} 7000 </dev/null"),
    ]));
    assert_eq!(got.trim(), "from-runc");
    let got = ok(docker(&[
        "exec",
        server,
        "wget",
        "-qO-",
        &format!("http://{vm_ip}/"),
    ]));
    assert_eq!(got.trim(), "from-vmlab");
    // SIGTERM is ignored in the guest: SIGKILL after the timeout.
    let t = Instant::now();
    ok(docker(&["stop", "-t", "2", vm]));
    assert!(t.elapsed() >= Duration::from_secs(2));
    let code = ok(docker(&["inspect", "-f", "{{.State.ExitCode}}", vm]));
    assert_eq!(code.trim(), "137");
    ok(docker(&["rm", "-f", server, vm]));
    assert_nothing_left("docker stop -t 2 and docker rm -f", &[me]);

    // docker rm -f of a running VM.
    run_vm_detached(vm, &[], &["sleep", "600"]);
    ok(docker(&["exec", vm, "true"]));
    let me = docker_id(vm);
    ok(docker(&["rm", "-f", vm]));
    assert_nothing_left("docker rm -f", &[me]);
}

/// A TCP port free on 127.0.0.1 now.
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

#[test]
fn docker_bad_entrypoints_and_vmm_killed_with_sigkill() {
    let Some(_engines) = engines() else { return };
    // An entrypoint that does not exist: 127; one that is not executable:
    // 126; `create` fails with runc's message, which the engine shows.
    let tmp = tempfile::tempdir().unwrap();
    let mut gone = Vec::new();
    for (cmd, code, says) in [
        ("/no/such/program", 127, "no such file or directory"),
        ("no-such-program", 127, "executable file not found"),
        ("/etc/passwd", 126, "permission denied"),
    ] {
        let cid = cidfile(tmp.path(), &format!("{}", gone.len()));
        let r = run(
            docker(&[
                "run",
                "--rm",
                "--cidfile",
                &cid,
                "--runtime",
                "vmlab",
                BUSYBOX,
                cmd,
            ]),
            RUN_LIMIT,
        );
        gone.push(made(DOCKER_ROOT, &read_cid(&cid)));
        assert_eq!(r.code(), Some(code), "{}", r.dump());
        assert!(
            r.stderr.contains("OCI runtime create failed")
                && r.stderr.contains(cmd)
                && r.stderr.contains(says),
            "{}",
            r.dump()
        );
    }
    assert_nothing_left("failed entrypoints", &gone);

    // kill -9 of the VMM: the container stops with 137 and the engine's
    // delete cleans up what the VMM could not.
    let name = "vmlab-oci-killed";
    docker_rm(&[name]);
    run_vm_detached(name, &[], &["sleep", "600"]);
    ok(docker(&["exec", name, "true"]));
    let me = docker_id(name);
    let pid: i32 = ok(docker(&["inspect", "-f", "{{.State.Pid}}", name]))
        .trim()
        .parse()
        .unwrap();
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    assert!(
        String::from_utf8_lossy(&cmdline).contains("run"),
        "pid {pid} is not the VMM"
    );
    // SAFETY: kill on the VMM's pid.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let r = run(docker(&["wait", name]), RUN_LIMIT);
    assert_eq!(r.stdout.trim(), "137", "{}", r.dump());
    ok(docker(&["rm", name]));
    assert_nothing_left("kill -9 of the VMM", &[me]);
}

/// The runtime's own command line, as an engine calls it, on a bundle of
/// the test's own: the lifecycle and the errors a user sees.
#[test]
fn runtime_cli_lifecycle_and_errors() {
    // No engine here: this test also runs in the hardware-style lane
    // (scripts/test-svm.sh), where there is none.
    let _lock = lock();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        if std::env::var("VMLAB_SKIP_ENGINE_TESTS").as_deref() == Ok("1") {
            eprintln!("SKIPPED: the runtime test needs root (VMLAB_SKIP_ENGINE_TESTS=1)");
            return;
        }
        panic!("the runtime test needs root; set VMLAB_SKIP_ENGINE_TESTS=1 to skip it");
    }
    let guest = common::guest_dir();
    let root = tempfile::tempdir().unwrap();
    let bundle = tempfile::tempdir().unwrap();
    // The binary under its runtime name (no link needed); the kernel and
    // virtiofsd of this build.
    let runtime_cmd = || {
        use std::os::unix::process::CommandExt;
        let mut c = Command::new(env!("CARGO_BIN_EXE_vmlab"));
        c.arg0("vmlab-runtime")
            .env("VMLAB_KERNEL", guest.join("vmlinux"))
            .env("VMLAB_VIRTIOFSD", guest.join("virtiofsd"))
            .arg("--root")
            .arg(root.path());
        c
    };
    let rt = |args: &[&str]| {
        let mut c = runtime_cmd();
        c.args(args);
        c.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        c
    };
    let rt_run = |args: &[&str]| {
        let mut c = runtime_cmd();
        c.args(args);
        run(c, RUN_LIMIT)
    };
    let b = bundle.path().to_str().unwrap().to_string();
    // A bundle without config.json.
    let r = rt_run(&["create", "--bundle", &b, "nocfg"]);
    assert_eq!(r.code(), Some(1), "{}", r.dump());
    assert!(r.stderr.contains("no config.json"), "{}", r.dump());
    // An unknown ID.
    for verb in ["state", "start", "kill", "delete"] {
        let r = rt_run(&[verb, "nosuch"]);
        assert_eq!(r.code(), Some(1), "{verb}: {}", r.dump());
        assert!(
            r.stderr.contains("nosuch does not exist"),
            "{verb}: {}",
            r.dump()
        );
    }
    assert!(rt_run(&["delete", "--force", "nosuch"]).status.success());
    assert!(rt_run(&["state", "../x"])
        .stderr
        .contains("invalid container ID"));

    // The busybox tree scripts/build-guest.sh makes (tests/fs.rs boots it
    // too), read-only: root.readonly.
    let rootfs = guest.join("rootfs-tree");
    assert!(
        rootfs.join("bin/busybox").exists(),
        "{} is missing",
        rootfs.display()
    );
    let config = |args: &[&str], hooks: serde_json::Value| {
        let spec = serde_json::json!({
            "ociVersion": "1.0.2",
            "process": {"terminal": false, "user": {"uid": 0, "gid": 0},
                        "args": args, "env": ["PATH=/bin:/usr/bin"], "cwd": "/"},
            "root": {"path": rootfs, "readonly": true},
            "hostname": "bundle",
            "hooks": hooks,
            "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}]}
        });
        std::fs::write(bundle.path().join("config.json"), spec.to_string()).unwrap();
    };
    // A failing prestart hook fails create and leaves nothing.
    config(
        &["true"],
        serde_json::json!({"prestart": [{"path": "/bin/sh", "args": ["sh", "-c", "echo hook says no >&2; exit 1"]}]}),
    );
    let r = rt_run(&["create", "--bundle", &b, "hookfail"]);
    assert_eq!(r.code(), Some(1), "{}", r.dump());
    assert!(r.stderr.contains("hook says no"), "{}", r.dump());
    assert!(!root.path().join("hookfail").exists());
    let root_str = root.path().to_str().unwrap();
    assert_nothing_left("a failed create", &[made(root_str, "hookfail")]);

    // create, state, start, start again, exec, kill, delete.
    config(&["sleep", "600"], serde_json::json!({}));
    let pid_file = bundle.path().join("init.pid");
    let out_file = bundle.path().join("out");
    let mut c = rt(&[
        "create",
        "--bundle",
        &b,
        "--pid-file",
        pid_file.to_str().unwrap(),
        "life",
    ]);
    c.stdout(std::fs::File::create(&out_file).unwrap());
    let st = c.status().unwrap();
    assert!(st.success());
    let pid: u32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let state = |id: &str| -> serde_json::Value {
        let r = rt_run(&["state", id]);
        assert!(r.status.success(), "{}", r.dump());
        serde_json::from_str(&r.stdout).unwrap()
    };
    let s = state("life");
    assert_eq!(s["status"], "created");
    assert_eq!(s["pid"], pid);
    assert!(rt(&["start", "life"]).status().unwrap().success());
    assert_eq!(state("life")["status"], "running");
    let r = rt_run(&["start", "life"]);
    assert_eq!(r.code(), Some(1));
    assert!(r.stderr.contains("start runs once"), "{}", r.dump());
    // exec without --process, the way runc takes a command.
    let r = rt_run(&["exec", "life", "sh", "-c", "hostname; exit 4"]);
    assert_eq!(r.code(), Some(4), "{}", r.dump());
    assert_eq!(r.stdout.trim(), "bundle");
    let r = rt_run(&["ps", "--format", "json", "life"]);
    let pids: Vec<u32> = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(pids, vec![pid]);
    let r = rt_run(&["list", "--format", "json"]);
    assert!(r.stdout.contains("\"life\""), "{}", r.dump());
    // exec with a terminal: the pty master comes to --console-socket
    // (SCM_RIGHTS), the guest process runs on a pty, and a window-size
    // change of the master reaches it.
    let sock_path = bundle.path().join("console.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock_path).unwrap();
    // (Its output is the pty's: this call's own stdio is only for errors,
    // and the detached exec process does not keep it.)
    let r = rt_run(&[
        "exec",
        "--tty",
        "--detach",
        "--console-socket",
        sock_path.to_str().unwrap(),
        "life",
        "sh",
        "-c",
        "tty; echo ready; sleep 3; echo size=$(stty size)",
    ]);
    assert!(r.status.success(), "{}", r.dump());
    let (conn, _) = listener.accept().unwrap();
    let mut name = [0u8; 64];
    let (_, master) =
        vmm_sys_util::sock_ctrl_msg::ScmSocket::recv_with_fd(&conn, &mut name).unwrap();
    let master = master.expect("no pty master on the console socket");
    let set_size = |rows: u16, cols: u16| {
        let ws = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads a winsize from a live struct.
        let r = unsafe {
            libc::ioctl(
                std::os::fd::AsRawFd::as_raw_fd(&master),
                libc::TIOCSWINSZ,
                &ws,
            )
        };
        assert_eq!(r, 0);
    };
    set_size(30, 90);
    let mut reader = master.try_clone().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
    std::thread::spawn(move || {
        use std::io::Read;
        let mut buf = [0u8; 4096];
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut resized = false;
    while !seen.contains("size=") && Instant::now() < deadline {
        if let Ok(b) = rx.recv_timeout(Duration::from_millis(200)) {
            seen.push_str(&String::from_utf8_lossy(&b));
        }
        if !resized && seen.contains("ready") {
            set_size(40, 100);
            resized = true;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while !seen.contains("size=40 100") && Instant::now() < deadline {
        if let Ok(b) = rx.recv_timeout(Duration::from_millis(200)) {
            seen.push_str(&String::from_utf8_lossy(&b));
        }
    }
    assert!(seen.contains("/dev/pts/"), "not on a pty: {seen:?}");
    assert!(
        seen.contains("size=40 100"),
        "the resize did not arrive: {seen:?}"
    );

    // kill 9: the monitor (the VMM) ends; exec into a stopped container.
    assert!(rt(&["kill", "life", "KILL"]).status().unwrap().success());
    assert!(wait_until(Duration::from_secs(10), || state("life")
        ["status"]
        == "stopped"));
    let r = rt_run(&["exec", "life", "true"]);
    assert_eq!(r.code(), Some(1));
    assert!(r.stderr.contains("it is stopped"), "{}", r.dump());
    let r = rt_run(&["kill", "life", "TERM"]);
    assert!(r.stderr.contains("container not running"), "{}", r.dump());
    assert!(rt(&["delete", "life"]).status().unwrap().success());
    assert!(!root.path().join("life").exists());
    assert_nothing_left("runtime kill and delete", &[made(root_str, "life")]);
}

#[test]
fn compose_postgres_server_and_client_both_in_vms() {
    let Some(_engines) = engines() else { return };
    let file = repo().join("tests/data/compose-postgres/docker-compose.yml");
    let compose = |args: &[&str]| {
        let mut c = Command::new("/usr/bin/docker-compose");
        c.env("DOCKER_HOST", "unix:///var/run/docker.sock")
            .env("VMLAB_COMPOSE_RUNTIME", "vmlab")
            .arg("-f")
            .arg(&file)
            .args(["-p", "vmlabocitest"])
            .args(args);
        c
    };
    let _ = run(compose(&["down", "-v"]), RUN_LIMIT);
    let r = run(
        compose(&["up", "--no-color", "--exit-code-from", "client"]),
        Duration::from_secs(600),
    );
    let ids = run(compose(&["ps", "-q"]), RUN_LIMIT).stdout;
    let ids: Vec<Made> = ids.lines().map(|id| made(DOCKER_ROOT, id)).collect();
    let down = run(compose(&["down", "-v"]), RUN_LIMIT);
    assert!(r.status.success(), "{}", r.dump());
    assert!(
        r.stdout.lines().any(|l| l.trim().ends_with("| 42")),
        "{}",
        r.dump()
    );
    assert!(down.status.success(), "{}", down.dump());
    assert_eq!(ids.len(), 2, "docker-compose ps -q: {ids:?}");
    assert_nothing_left("docker-compose down", &ids);
}

#[test]
fn containerd_ctr_and_podman_run_exec_kill() {
    let Some(_engines) = engines() else { return };
    let rt = runtime();
    let rt = rt.to_str().unwrap();
    let ctr = |args: &[&str]| {
        let mut c = Command::new("/usr/bin/ctr");
        c.args(["-n", "vmlabtest"]).args(args);
        c
    };
    // The busybox image, from Docker into containerd's namespace.
    let tar = tempfile::NamedTempFile::new().unwrap();
    ok(docker(&[
        "save",
        "-o",
        tar.path().to_str().unwrap(),
        BUSYBOX,
    ]));
    ok(ctr(&["images", "import", tar.path().to_str().unwrap()]));
    let image = "docker.io/library/vmlab-busybox:test";
    let _ = run(ctr(&["task", "kill", "-s", "SIGKILL", "ctr1"]), RUN_LIMIT);
    let _ = run(ctr(&["task", "rm", "-f", "ctr1"]), RUN_LIMIT);
    let _ = run(ctr(&["container", "rm", "ctr1"]), RUN_LIMIT);
    let r = run(
        ctr(&[
            "run",
            "--rm",
            "--runtime",
            "io.containerd.runc.v2",
            "--runc-binary",
            rt,
            image,
            "ctr0",
            "sh",
            "-c",
            "uname -r; exit 4",
        ]),
        RUN_LIMIT,
    );
    assert_eq!(r.code(), Some(4), "{}", r.dump());
    assert_eq!(r.stdout.trim(), guest_release());
    ok(ctr(&[
        "run",
        "-d",
        "--runtime",
        "io.containerd.runc.v2",
        "--runc-binary",
        rt,
        image,
        "ctr1",
        "sh",
        "-c",
        "trap 'echo usr1 > /tmp/got' USR1; while true; do sleep 1; done",
    ]));
    let r = run(
        ctr(&[
            "task",
            "exec",
            "--exec-id",
            "e1",
            "ctr1",
            "sh",
            "-c",
            "exit 6",
        ]),
        RUN_LIMIT,
    );
    assert_eq!(r.code(), Some(6), "{}", r.dump());
    ok(ctr(&["task", "kill", "-s", "SIGUSR1", "ctr1"]));
    let got = wait_until(Duration::from_secs(20), || {
        run(
            ctr(&["task", "exec", "--exec-id", "e2", "ctr1", "cat", "/tmp/got"]),
            RUN_LIMIT,
        )
        .stdout
        .contains("usr1")
    });
    assert!(got, "SIGUSR1 did not reach the guest's process");
    ok(ctr(&["task", "kill", "-s", "SIGKILL", "ctr1"]));
    assert!(wait_until(Duration::from_secs(20), || {
        run(ctr(&["task", "ls"]), RUN_LIMIT)
            .stdout
            .lines()
            .any(|l| l.starts_with("ctr1") && l.contains("STOPPED"))
    }));
    ok(ctr(&["task", "rm", "ctr1"]));
    ok(ctr(&["container", "rm", "ctr1"]));
    assert_nothing_left(
        "ctr run, exec, kill",
        &[made(CTR_ROOT, "ctr0"), made(CTR_ROOT, "ctr1")],
    );

    // Podman: its own network namespace (a path in the bundle) and bridge.
    let podman = |args: &[&str]| {
        let mut c = Command::new("/usr/bin/podman");
        c.args(["--runtime", rt]).args(args);
        c
    };
    let name = "vmlab-oci-podman";
    let _ = run(podman(&["rm", "-f", name]), RUN_LIMIT);
    let image = "localhost/vmlab-busybox:test";
    let tmp = tempfile::tempdir().unwrap();
    let cid = cidfile(tmp.path(), "podman");
    let mut args = vec!["run", "--rm", "--cidfile", &cid];
    args.extend(PODMAN_ULIMITS);
    args.extend([image, "sh", "-c", "uname -r; ip -4 addr show eth0; exit 4"]);
    let r = run(podman(&args), RUN_LIMIT);
    assert_eq!(r.code(), Some(4), "{}", r.dump());
    assert!(r.stdout.starts_with(&guest_release()), "{}", r.dump());
    assert!(
        r.stdout.contains("inet "),
        "no address on eth0: {}",
        r.dump()
    );
    let mut args = vec!["run", "-d", "--name", name];
    args.extend(PODMAN_ULIMITS);
    args.extend([
        image,
        "sh",
        "-c",
        "trap 'echo caught USR1; exit 9' USR1; while true; do sleep 1; done",
    ]);
    ok(podman(&args));
    let me = made(
        PODMAN_ROOT,
        &ok(podman(&["inspect", "-f", "{{.Id}}", name])),
    );
    let r = run(podman(&["exec", name, "sh", "-c", "exit 6"]), RUN_LIMIT);
    assert_eq!(r.code(), Some(6), "{}", r.dump());
    ok(podman(&["kill", "-s", "USR1", name]));
    let code = ok(podman(&["wait", name]));
    assert_eq!(code.trim(), "9");
    assert!(ok(podman(&["logs", name])).contains("caught USR1"));
    ok(podman(&["rm", name]));
    assert_nothing_left(
        "podman run, exec, kill",
        &[made(PODMAN_ROOT, &read_cid(&cid)), me],
    );
}
