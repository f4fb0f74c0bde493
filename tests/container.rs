//! `vmlab container` with a real OCI runtime (runc, installed by
//! scripts/test.sh): the host's kernel, exit statuses, the image's env,
//! working directory and user, stdin, signals, a memory limit, the
//! runtime choice, and no trace left behind (mounts, bundles, containers,
//! changes to the cached image root). Needs root, like `vmlab container`.

mod common;

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A container starts in tens of milliseconds; this only catches hangs.
const LIMIT: Duration = Duration::from_secs(120);

/// A per-test scratch directory, emptied first.
fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vmlab-ct-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn guest_build_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/guest")
}

/// The sample image (OCI layout: busybox, VMLAB_SAMPLE=1, WorkingDir
/// /work, a non-root User), built by scripts/build-sample-image.sh.
fn sample_image() -> PathBuf {
    let dir = guest_build_dir().join("sample-image");
    assert!(
        dir.join("index.json").is_file(),
        "{} is missing: run scripts/build-sample-image.sh",
        dir.display()
    );
    dir
}

/// A private copy of the guest's root tree (busybox), as a plain root
/// file-system image.
fn rootfs_copy(dir: &Path) -> PathBuf {
    let tree = guest_build_dir().join("rootfs-tree");
    assert!(
        tree.join("bin/busybox").exists(),
        "{} is missing: run scripts/build-guest.sh",
        tree.display()
    );
    let dest = dir.join("rootfs");
    let st = Command::new("cp")
        .arg("-a")
        .arg(&tree)
        .arg(&dest)
        .status()
        .unwrap();
    assert!(st.success());
    dest
}

/// runc, wherever Debian put it (not every environment has /usr/sbin in
/// PATH).
fn runc() -> Command {
    let path = ["/usr/sbin/runc", "/usr/bin/runc", "/usr/local/sbin/runc"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or("runc");
    Command::new(path)
}

fn name(tag: &str) -> String {
    format!("vmlab-test-{}-{tag}", std::process::id())
}

/// `vmlab container --image IMAGE --name NAME [extra] -- cmd`, with its
/// temporary directory (where bundles go) in `tmp`.
fn container(image: &Path, tmp: &Path, name: &str, extra: &[&str], cmd: &[&str]) -> Command {
    std::fs::create_dir_all(tmp).unwrap();
    let mut c = vmlab();
    c.arg("container")
        .arg("--image")
        .arg(image)
        .args(["--name", name])
        .args(extra)
        .arg("--")
        .args(cmd)
        .env("TMPDIR", tmp);
    c
}

fn run(image: &Path, tmp: &Path, name: &str, extra: &[&str], cmd: &[&str]) -> Run {
    run_with_deadline(container(image, tmp, name, extra, cmd), LIMIT)
}

/// No bundle in `tmp`, no container `name` known to runc, no mount of
/// anything under `tmp` on the host.
fn assert_no_leftovers(tmp: &Path, name: &str) {
    let left: Vec<_> = std::fs::read_dir(tmp)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(left.is_empty(), "left in {}: {left:?}", tmp.display());
    let list = runc().args(["list", "-q"]).output().unwrap();
    let list = String::from_utf8_lossy(&list.stdout);
    assert!(
        !list.lines().any(|l| l.trim() == name),
        "runc still knows {name}: {list}"
    );
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let tmp = tmp.to_string_lossy();
    assert!(
        !mounts.lines().any(|l| l.contains(tmp.as_ref())),
        "a mount under {tmp} is left:\n{mounts}"
    );
}

fn host_release() -> String {
    let out = Command::new("uname").arg("-r").output().unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[test]
fn uname_is_the_hosts_and_the_runtime_is_named() {
    let dir = scratch("uname");
    let image = sample_image();
    let tmp = dir.join("tmp");
    let r = run(&image, &tmp, &name("uname"), &[], &["uname", "-r"]);
    assert_eq!(r.code(), Some(0), "{}", r.dump());
    assert_eq!(r.lines(), [host_release()], "{}", r.dump());
    assert!(
        r.stderr.contains("container runtime: runc version"),
        "which runtime ran must be said\n{}",
        r.dump()
    );
    assert_no_leftovers(&tmp, &name("uname"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn exit_statuses() {
    let dir = scratch("exit");
    let image = sample_image();
    let tmp = dir.join("tmp");
    let n = name("exit");
    let r = run(&image, &tmp, &n, &[], &["sh", "-c", "exit 4"]);
    assert_eq!(r.code(), Some(4), "{}", r.dump());
    // As docker run: 127 for a command that is not there, 126 for one
    // that cannot be executed, with the runtime's reason.
    let r = run(&image, &tmp, &n, &[], &["no-such-command"]);
    assert_eq!(r.code(), Some(127), "{}", r.dump());
    assert!(r
        .stderr
        .contains("vmlab: error: runc could not start the container"));
    assert!(r.stderr.contains("no-such-command"), "{}", r.dump());
    let r = run(&image, &tmp, &n, &[], &["/etc/passwd"]);
    assert_eq!(r.code(), Some(126), "{}", r.dump());
    assert_no_leftovers(&tmp, &n);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn image_env_working_dir_and_user_reach_the_process() {
    let dir = scratch("config");
    let image = sample_image();
    let tmp = dir.join("tmp");
    let n = name("config");
    let r = run(
        &image,
        &tmp,
        &n,
        &[],
        &[
            "sh",
            "-c",
            "echo $VMLAB_SAMPLE; pwd; id -u; echo $HOSTNAME; echo $PATH",
        ],
    );
    assert_eq!(r.code(), Some(0), "{}", r.dump());
    let lines = r.lines();
    assert_eq!(lines.len(), 5, "{}", r.dump());
    assert_eq!(lines[0], "1", "image Env\n{}", r.dump());
    assert_eq!(lines[1], "/work", "image WorkingDir\n{}", r.dump());
    let uid: u32 = lines[2].parse().unwrap();
    assert_ne!(uid, 0, "image User (non-root)\n{}", r.dump());
    assert_eq!(lines[3], n, "{}", r.dump());
    assert!(lines[4].contains("/bin"), "{}", r.dump());
    assert_no_leftovers(&tmp, &n);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Path -> (type and mode, owner, size, mtime, content or link hash).
fn snapshot(root: &Path) -> BTreeMap<PathBuf, (u32, u32, u32, u64, i64, u64)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let m = std::fs::symlink_metadata(&p).unwrap();
        let mut h = std::collections::hash_map::DefaultHasher::new();
        if m.file_type().is_symlink() {
            std::fs::read_link(&p).unwrap().hash(&mut h);
        } else if m.is_file() {
            std::fs::read(&p).unwrap().hash(&mut h);
        } else if m.is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                stack.push(e.unwrap().path());
            }
        }
        out.insert(
            p.strip_prefix(root).unwrap().to_path_buf(),
            (m.mode(), m.uid(), m.gid(), m.size(), m.mtime(), h.finish()),
        );
    }
    out
}

#[test]
fn the_image_root_is_not_modified() {
    let dir = scratch("cow");
    let tmp = dir.join("tmp");
    let n = name("cow");
    // Writes as root: a new file, an appended one, a removed one, a new
    // directory, a changed mode.
    let writes = "echo new > /new-file && echo x >> /etc/passwd && rm /bin/ls && \
                  mkdir /newdir && chmod 700 /etc && echo ok";

    // A plain root directory, used in place.
    let plain = rootfs_copy(&dir);
    let before = snapshot(&plain);
    let r = run(&plain, &tmp, &n, &[], &["sh", "-c", writes]);
    assert_eq!(r.code(), Some(0), "{}", r.dump());
    assert_eq!(r.lines(), ["ok"]);
    assert!(
        snapshot(&plain) == before,
        "the plain root directory changed"
    );
    assert_no_leftovers(&tmp, &n);

    // The sample image's cached extraction (what vmlab itself uses), with
    // the image's non-root user: write where it may.
    let image = sample_image();
    let (cached, _) = vmlab::image::prepare_rootfs_dir(&image).unwrap();
    let before = snapshot(&cached);
    let r = run(
        &image,
        &tmp,
        &n,
        &[],
        &[
            "sh",
            "-c",
            "echo new > /tmp/new-file && echo > ./here && echo ok",
        ],
    );
    assert_eq!(r.code(), Some(0), "{}", r.dump());
    assert!(
        snapshot(&cached) == before,
        "the cached root {} changed",
        cached.display()
    );
    assert_no_leftovers(&tmp, &n);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn stdin_reaches_the_process() {
    let dir = scratch("stdin");
    let image = sample_image();
    let tmp = dir.join("tmp");
    let input = dir.join("input");
    std::fs::write(&input, "hello from stdin\nline two\n").unwrap();
    let mut c = container(&image, &tmp, &name("stdin"), &[], &["cat"]);
    c.stdin(std::fs::File::open(&input).unwrap());
    let r = run_with_deadline(c, LIMIT);
    assert_eq!(r.code(), Some(0), "{}", r.dump());
    assert_eq!(r.stdout, "hello from stdin\nline two\n", "{}", r.dump());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn only_loopback_in_the_network_namespace() {
    let dir = scratch("net");
    let image = sample_image();
    let tmp = dir.join("tmp");
    let r = run(&image, &tmp, &name("net"), &[], &["cat", "/proc/net/dev"]);
    assert_eq!(r.code(), Some(0), "{}", r.dump());
    let ifaces: Vec<String> = r
        .lines()
        .iter()
        .filter_map(|l| l.split_once(':').map(|(i, _)| i.trim().to_string()))
        .collect();
    assert_eq!(ifaces, ["lo"], "{}", r.dump());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn memory_limit() {
    let dir = scratch("memory");
    let image = sample_image();
    let tmp = dir.join("tmp");
    let n = name("memory");
    let r = run(
        &image,
        &tmp,
        &n,
        &["--memory", "64M"],
        &[
            "sh",
            "-c",
            "cat /sys/fs/cgroup/memory/memory.limit_in_bytes 2>/dev/null || cat /sys/fs/cgroup/memory.max",
        ],
    );
    assert_eq!(r.code(), Some(0), "{}", r.dump());
    let host = vmlab::container::cgroups::CgroupHost::detect();
    if host.memory_usable() {
        assert_eq!(r.lines(), [(64u64 << 20).to_string()], "{}", r.dump());
    } else {
        assert!(r.stderr.contains("without a memory limit"), "{}", r.dump());
    }
    assert_no_leftovers(&tmp, &n);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Waits until runc reports container `name` running.
fn wait_running(name: &str) {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        let out = runc().args(["state", name]).output().unwrap();
        if String::from_utf8_lossy(&out.stdout).contains("\"running\"") {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("container {name} did not start");
}

/// Starts `cmd` in a container, sends vmlab SIGTERM once it runs, and
/// returns the run and how long vmlab took to exit after the signal.
fn terminate(image: &Path, tmp: &Path, name: &str, cmd: &[&str]) -> (Run, Duration) {
    let mut c = container(image, tmp, name, &[], cmd);
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = c.spawn().unwrap();
    wait_running(name);
    let sent = Instant::now();
    // SAFETY: kill(2) on our own child, still running.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    let took = sent.elapsed();
    let run = Run {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        elapsed: took,
    };
    (run, took)
}

#[test]
fn sigterm_is_passed_on_then_the_container_killed_and_cleaned_up() {
    let dir = scratch("sigterm");
    let image = sample_image();
    let tmp = dir.join("tmp");

    // A process that handles SIGTERM gets it and decides the status.
    let n = name("sigterm-trap");
    let (r, took) = terminate(
        &image,
        &tmp,
        &n,
        &[
            "sh",
            "-c",
            "trap 'exit 7' TERM; while :; do sleep 0.1; done",
        ],
    );
    assert_eq!(r.code(), Some(7), "{}", r.dump());
    assert!(took < Duration::from_secs(2), "{took:?}\n{}", r.dump());
    assert_no_leftovers(&tmp, &n);

    // A PID 1 without a handler ignores it: killed after the grace
    // period, and vmlab reports 128+SIGTERM.
    let n = name("sigterm-kill");
    let (r, took) = terminate(&image, &tmp, &n, &["sleep", "600"]);
    assert_eq!(r.code(), Some(128 + 15), "{}", r.dump());
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(20),
        "{took:?}\n{}",
        r.dump()
    );
    assert!(r.stderr.contains("killing it"), "{}", r.dump());
    assert_no_leftovers(&tmp, &n);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn without_any_runtime_the_error_says_what_to_install() {
    let dir = scratch("noruntime");
    let image = rootfs_copy(&dir);
    // Hide every runc and crun in a private mount namespace.
    let hide = "for d in /usr/local/sbin /usr/local/bin /usr/sbin /usr/bin /sbin /bin; do \
                for r in runc crun; do [ -e $d/$r ] && mount --bind /dev/null $d/$r; done; done; \
                exec \"$@\"";
    let mut c = Command::new("unshare");
    c.args(["-m", "--propagation", "private", "sh", "-c", hide, "sh"])
        .arg(env!("CARGO_BIN_EXE_vmlab"))
        .args(["container", "--image"])
        .arg(&image)
        .args(["--", "true"])
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .stdin(Stdio::null());
    let r = run_with_deadline(c, LIMIT);
    assert_eq!(r.code(), Some(125), "{}", r.dump());
    assert!(
        r.stderr.contains("no OCI runtime found") && r.stderr.contains("apt-get install runc"),
        "{}",
        r.dump()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn crun_is_used_or_skipped_with_a_reason() {
    let crun = ["/usr/bin/crun", "/usr/sbin/crun", "/usr/local/bin/crun"]
        .iter()
        .any(|p| Path::new(p).exists());
    if !crun {
        eprintln!("crun is not installed: nothing to check");
        return;
    }
    let dir = scratch("crun");
    let image = sample_image();
    let tmp = dir.join("tmp");
    let n = name("crun");
    let r = run(&image, &tmp, &n, &["--runtime", "crun"], &["true"]);
    let host = vmlab::container::cgroups::CgroupHost::detect();
    let refused = vmlab::container::runtime::known_incompatibility(
        vmlab::container::runtime::Flavor::Crun,
        &host,
    );
    if refused.is_some() {
        assert_eq!(r.code(), Some(125), "{}", r.dump());
        assert!(r.stderr.contains("hybrid"), "{}", r.dump());
    } else {
        assert_eq!(r.code(), Some(0), "{}", r.dump());
        assert!(r.stderr.contains("crun version"), "{}", r.dump());
    }
    assert_no_leftovers(&tmp, &n);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_name_in_use_is_refused_and_the_other_container_kept() {
    let dir = scratch("inuse");
    let image = sample_image();
    let tmp = dir.join("tmp");
    let n = name("inuse");
    let mut first = container(
        &image,
        &tmp,
        &n,
        &[],
        &[
            "sh",
            "-c",
            "trap 'exit 3' TERM; while :; do sleep 0.1; done",
        ],
    );
    first.stdout(Stdio::null()).stderr(Stdio::null());
    let first = first.spawn().unwrap();
    wait_running(&n);

    let r = run(&image, &dir.join("tmp2"), &n, &[], &["true"]);
    assert_eq!(r.code(), Some(125), "{}", r.dump());
    assert!(
        r.stderr
            .contains(&format!("already has a container named {n}")),
        "{}",
        r.dump()
    );
    // The refused run's cleanup did not touch the running container.
    wait_running(&n);

    // SAFETY: kill(2) on our own child, still running.
    unsafe { libc::kill(first.id() as i32, libc::SIGTERM) };
    let out = first.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert_no_leftovers(&tmp, &n);
    let _ = std::fs::remove_dir_all(&dir);
}
