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

/// `--raw`: an empty image, an entry outside it, an image larger than
/// where it goes in guest memory, a directory, options without --raw.
#[test]
fn raw_image_errors() {
    let empty = scratch("empty.bin");
    std::fs::write(&empty, b"").unwrap();
    fails_with(&["run", "--raw", s(&empty)], "the image is empty");
    let small = scratch("small.bin");
    std::fs::write(&small, [0xf4u8; 16]).unwrap();
    fails_with(
        &["run", "--raw", s(&small), "--entry", "0x2000"],
        "--entry 0x2000 is outside the image, which is loaded at 0x1000..0x1010",
    );
    fails_with(
        &[
            "run",
            "--raw",
            s(&small),
            "--mode",
            "long",
            "--entry",
            "0x1000",
        ],
        "outside the image, which is loaded at 0x100000..0x100010",
    );
    fails_with(
        &["run", "--raw", s(&small), "--entry", "xyz"],
        "not an address",
    );
    // 1 MiB does not fit between 0x1000 and the EBDA in real mode; 40 MiB
    // does not fit above 1 MiB in a 32 MiB guest.
    let big = scratch("big.bin");
    std::fs::write(&big, vec![0x90u8; 40 << 20]).unwrap();
    fails_with(
        &["run", "--raw", s(&big)],
        "do not fit in guest memory at 0x1000",
    );
    fails_with(
        &["run", "--raw", s(&big), "--mode", "long", "-m", "32"],
        "do not fit in guest memory at 0x100000",
    );
    fails_with(&["run", "--raw", "/tmp"], "not a regular file");
    fails_with(&["run", "--raw", "/nonexistent.bin"], "/nonexistent.bin");
    fails_with(&["run", "--raw", s(&small), "--cpus", "2"], "one vCPU");
    fails_with(
        &["run", "--kernel", "k", "--entry", "0x1000"],
        "go with --raw",
    );
    fails_with(
        &["run", "--raw", s(&small), "--kernel", "k"],
        "cannot be used with",
    );
    let _ = std::fs::remove_file(&big);
}

/// `vmlab trace report` on what is not an exit trace.
#[test]
fn trace_report_errors() {
    fails_with(
        &["trace", "report", "/nonexistent.jsonl"],
        "/nonexistent.jsonl",
    );
    let bad = scratch("bad.jsonl");
    std::fs::write(&bad, "{\"note\":\"end\"}\nnot json\n").unwrap();
    fails_with(
        &["trace", "report", s(&bad)],
        "line 2: not a vmlab exit-trace record",
    );
    let empty = scratch("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    fails_with(&["trace", "report", s(&empty)], "no exit records");
    let unwritable = scratch("t.jsonl");
    fails_with(
        &[
            "run",
            "--raw",
            s(&unwritable),
            "--trace-exits",
            "/nonexistent/dir/trace.jsonl",
        ],
        "--trace-exits /nonexistent/dir/trace.jsonl",
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

/// Malformed `--net` specifications: usage errors (status 2) naming the
/// problem.
#[test]
fn net_spec_errors() {
    for (spec, needle) in [
        ("tap=t0,mac=zz:00:00:00:00:01", "not a MAC address"),
        ("tap=t0,mac=02:00:00:00:01", "not a MAC address"),
        ("tap=t0,mac=01:00:5e:00:00:01", "multicast"),
        ("mac=02:00:00:00:00:01", "tap=NAME is required"),
        ("tap=a/b", "not a valid interface name"),
        ("tap=t0,speed=fast", "unknown --net option"),
    ] {
        fails_with(&["run", "--kernel", "k", "--net", spec], needle);
        let mut cmd = vmlab();
        cmd.args(["run", "--kernel", "k", "--net", spec]);
        let run = run_with_deadline(cmd, LIMIT);
        assert_eq!(run.code(), Some(2), "{spec}\n{}", run.dump());
    }
}

#[test]
fn vsock_spec_errors() {
    for (spec, needle) in [
        ("cid=2", "CID 2 is reserved"),
        ("cid=0,socket=/tmp/x", "reserved"),
        ("cid=4294967295,socket=/tmp/x", "too large"),
        ("cid=abc,socket=/tmp/x", "not a number"),
        ("socket=/tmp/x", "cid=N is required"),
        ("cid=3,port=5", "unknown --vsock option"),
    ] {
        let mut cmd = vmlab();
        cmd.args(["run", "--kernel", "k", "--vsock", spec]);
        let run = run_with_deadline(cmd, LIMIT);
        assert_eq!(run.code(), Some(2), "{spec}\n{}", run.dump());
        assert!(run.stderr.contains(needle), "{spec}\n{}", run.dump());
        assert!(!run.stderr.contains("panicked"), "{}", run.dump());
    }
    // No socket and nothing (a --name state directory) to supply one.
    let mut cmd = vmlab();
    cmd.args(["run", "--kernel", "k", "--vsock", "cid=3"]);
    let run = run_with_deadline(cmd, LIMIT);
    assert_eq!(run.code(), Some(2), "{}", run.dump());
    assert!(
        run.stderr.contains("socket=PATH is required"),
        "{}",
        run.dump()
    );
}

/// Socket paths vmlab cannot listen on: a missing directory, a file that
/// is not a socket (left alone), a socket a live process listens on.
/// A clear error and status 125, before the guest starts.
#[test]
fn vsock_socket_errors() {
    let kernel = guest_dir().join("vmlinux");
    let not_socket = scratch("not-a-socket");
    std::fs::write(&not_socket, b"data").unwrap();
    let live = scratch("live.sock");
    let _ = std::fs::remove_file(&live);
    let _listener = std::os::unix::net::UnixListener::bind(&live).unwrap();
    let too_long = format!("/tmp/{}.sock", "x".repeat(120));
    for (path, needle) in [
        (
            "/nonexistent-dir/v.sock",
            "cannot listen on the vsock socket /nonexistent-dir/v.sock",
        ),
        (s(&not_socket), "is not a socket"),
        (s(&live), "in use"),
        (too_long.as_str(), "cannot listen on the vsock socket"),
    ] {
        let spec = format!("cid=3,socket={path}");
        fails_with(&["run", "--kernel", s(&kernel), "--vsock", &spec], needle);
        let mut cmd = vmlab();
        cmd.args(["run", "--kernel", s(&kernel), "--vsock", &spec]);
        let run = run_with_deadline(cmd, LIMIT);
        assert_eq!(run.code(), Some(125), "{path}\n{}", run.dump());
    }
    assert_eq!(std::fs::read(&not_socket).unwrap(), b"data");
    assert!(live.exists(), "a live socket is not removed");
}

/// TAP devices vmlab cannot use, in a network namespace of the test's own
/// (so the names certainly do not exist and nothing on the host is
/// touched): a missing TAP while vmlab lacks CAP_NET_ADMIN (dropped from
/// its bounding set, so root is not enough), and a name that is not a TAP.
/// A clear error and status 125, before the guest starts.
#[test]
fn tap_errors() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root for a network namespace");
        return;
    }
    let ns = format!("vmlab-net-cli-{}", std::process::id());
    let ip = |args: &[&str]| {
        std::process::Command::new("ip")
            .args(args)
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    assert!(ip(&["netns", "add", &ns]), "ip netns add {ns}");
    let kernel = guest_dir().join("vmlinux");
    let in_ns = |prefix: &[&str], net: &str| {
        let mut cmd = std::process::Command::new("ip");
        cmd.args(["netns", "exec", &ns])
            .args(prefix)
            .arg(env!("CARGO_BIN_EXE_vmlab"))
            .args(["run", "--kernel"])
            .arg(&kernel)
            .args(["--net", net, "--", "true"])
            .stdin(std::process::Stdio::null());
        run_with_deadline(cmd, LIMIT)
    };
    let result = std::panic::catch_unwind(|| {
        let run = in_ns(
            &[
                "setpriv",
                "--inh-caps=-net_admin",
                "--bounding-set=-net_admin",
                "--",
            ],
            "tap=vmlabnope0",
        );
        assert_eq!(run.code(), Some(125), "{}", run.dump());
        assert!(
            run.stderr.contains(
                "vmlab: error: tap vmlabnope0: no such device and no permission to create it \
                 (CAP_NET_ADMIN)"
            ),
            "{}",
            run.dump()
        );
        assert!(!run.stderr.contains("panicked"), "{}", run.dump());
        let run = in_ns(&[], "tap=lo");
        assert_eq!(run.code(), Some(125), "{}", run.dump());
        assert!(
            run.stderr
                .contains("tap lo: the interface exists but is not a TAP device"),
            "{}",
            run.dump()
        );
    });
    ip(&["netns", "delete", &ns]);
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

/// `vmlab container` with bad input: vmlab's own failure, status 125 (2
/// for usage errors), before any runtime is started.
#[test]
fn container_errors() {
    let exits_125 = |args: &[&str], needle: &str| {
        fails_with(args, needle);
        let mut cmd = vmlab();
        cmd.args(args);
        let run = run_with_deadline(cmd, LIMIT);
        assert_eq!(run.code(), Some(125), "{}", run.dump());
    };
    exits_125(
        &["container", "--image", "/nonexistent/image", "--", "true"],
        "image: /nonexistent/image",
    );
    // A plain directory is a valid image; the runtime is not.
    let rootfs = scratch("container-rootfs");
    std::fs::create_dir_all(&rootfs).unwrap();
    exits_125(
        &[
            "container",
            "--image",
            s(&rootfs),
            "--runtime",
            "/nonexistent/runc",
            "--",
            "true",
        ],
        "runtime /nonexistent/runc",
    );
    exits_125(
        &[
            "container",
            "--image",
            s(&rootfs),
            "--runtime",
            "no-such-oci-runtime",
            "--",
            "true",
        ],
        "not found",
    );
    fails_with(
        &["container", "--image", s(&rootfs), "--memory", "lots"],
        "not a size",
    );
    fails_with(
        &["container", "--image", s(&rootfs), "--name", "a/b"],
        "not a container name",
    );
    fails_with(&["container", "--", "true"], "--image");
}

/// A minimal OCI image layout in `dir`: one uncompressed layer with the
/// given (path, content) entries, written as raw tar headers so that
/// hostile paths survive, and a config with `cmd` (none if empty).
/// Returns the layer blob's path.
fn tiny_layout(dir: &std::path::Path, entries: &[(&str, &[u8])], cmd: &[&str]) -> PathBuf {
    use sha2::{Digest, Sha256};
    let sha = |b: &[u8]| {
        let d = Sha256::digest(b);
        format!(
            "sha256:{}",
            d.iter().map(|x| format!("{x:02x}")).collect::<String>()
        )
    };
    let _ = std::fs::remove_dir_all(dir);
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |b: &[u8]| {
        let d = sha(b);
        let p = blobs.join(&d[7..]);
        std::fs::write(&p, b).unwrap();
        (d, p)
    };
    let mut tar = tar::Builder::new(Vec::new());
    for (path, data) in entries {
        let mut h = tar::Header::new_gnu();
        h.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_cksum();
        tar.append(&h, *data).unwrap();
    }
    let layer = tar.into_inner().unwrap();
    let (layer_digest, layer_path) = put(&layer);
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": if cmd.is_empty() { serde_json::json!({}) } else { serde_json::json!({"Cmd": cmd}) },
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]}
    }))
    .unwrap();
    let (config_digest, _) = put(&config);
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": layer_digest, "size": layer.len()}]
    }))
    .unwrap();
    let (manifest_digest, _) = put(&manifest);
    std::fs::write(
        dir.join("index.json"),
        serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "manifests": [
            {"mediaType": "application/vnd.oci.image.manifest.v1+json",
             "digest": manifest_digest, "size": manifest.len()}]}))
        .unwrap(),
    )
    .unwrap();
    layer_path
}

/// `vmlab run --image` with bad images: status 125 and a message naming
/// the problem, before any guest is built (the kernel does not even
/// exist), and nothing written outside the cache.
#[test]
fn run_image_errors() {
    let cache = scratch("image-cache");
    let image_fails = |image: &std::path::Path, extra: &[&str], needle: &str| {
        let mut cmd = vmlab();
        cmd.env("XDG_CACHE_HOME", &cache)
            .args(["run", "--kernel", "/nonexistent/vmlinux", "--image"])
            .arg(image)
            .args(extra);
        let run = run_with_deadline(cmd, LIMIT);
        assert_eq!(run.code(), Some(125), "{}", run.dump());
        assert!(!run.stderr.contains("panicked"), "{}", run.dump());
        assert!(
            run.stderr.contains("vmlab: error:") && run.stderr.contains(needle),
            "expected '{needle}'\n{}",
            run.dump()
        );
    };
    image_fails(
        std::path::Path::new("/nonexistent/image"),
        &["--", "true"],
        "/nonexistent/image: No such file",
    );
    let text = scratch("not-an-image.txt");
    std::fs::write(&text, "hello\n".repeat(200)).unwrap();
    image_fails(&text, &["--", "true"], "not an image");

    let layout = scratch("corrupt-layout");
    let layer = tiny_layout(&layout, &[("bin/x", b"x")], &["/bin/x"]);
    let mut bytes = std::fs::read(&layer).unwrap();
    bytes[512] ^= 1;
    std::fs::write(&layer, bytes).unwrap();
    image_fails(&layout, &["--", "true"], "digest mismatch");

    let layout = scratch("missing-blob");
    let layer = tiny_layout(&layout, &[("bin/x", b"x")], &["/bin/x"]);
    std::fs::remove_file(layer).unwrap();
    image_fails(&layout, &["--", "true"], "is missing from the image");

    let layout = scratch("escaping-layer");
    tiny_layout(&layout, &[("../escaped-by-layer", b"x")], &["/bin/x"]);
    image_fails(&layout, &["--", "true"], "`..` component");
    assert!(!scratch("escaped-by-layer").exists());
    assert!(!layout.parent().unwrap().join("escaped-by-layer").exists());

    let layout = scratch("no-cmd");
    tiny_layout(&layout, &[("bin/x", b"x")], &[]);
    image_fails(&layout, &[], "no Entrypoint or Cmd");

    // --image replaces the initramfs: both is a usage error.
    let mut cmd = vmlab();
    cmd.args([
        "run", "--kernel", "k", "--image", "i", "--initrd", "r", "--", "true",
    ]);
    let run = run_with_deadline(cmd, LIMIT);
    assert_eq!(run.code(), Some(2), "{}", run.dump());
    assert!(run.stderr.contains("cannot be used with"), "{}", run.dump());
}

/// A private state directory for the named-VM commands.
fn state_dir(tag: &str) -> PathBuf {
    let dir = scratch(&format!("state-{tag}"));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn fails_in(state: &std::path::Path, args: &[&str], needle: &str) {
    let mut full = vec!["--state-dir", s(state)];
    full.extend_from_slice(args);
    fails_with(&full, needle);
}

#[test]
fn named_vm_unknown_and_invalid_names() {
    let state = state_dir("unknown");
    for args in [
        &["exec", "nosuchvm", "--", "true"][..],
        &["kill", "nosuchvm"],
        &["stop", "nosuchvm"],
        &["logs", "nosuchvm"],
        &["rm", "nosuchvm"],
    ] {
        fails_in(&state, args, "no such VM: nosuchvm");
    }
    for args in [
        &["exec", "a/b", "true"][..],
        &["kill", "../x"],
        &["stop", "--", "-bad"],
        &["rm", ".hidden"],
    ] {
        fails_in(&state, args, "invalid VM name");
    }
    fails_in(
        &state,
        &["run", "--kernel", "/k", "--name", "a b", "--detach"],
        "invalid VM name",
    );
    fails_in(&state, &["kill", "vm", "SIGFOO"], "unknown signal");
    fails_in(
        &state,
        &["exec", "vm", "-e", "NOEQUALS", "true"],
        "KEY=VALUE",
    );
    fails_in(&state, &["exec", "vm"], "required");
    // ps on an empty (missing) state directory lists nothing, and works.
    let mut cmd = vmlab();
    cmd.args(["--state-dir", s(&state), "ps"]);
    let run = run_with_deadline(cmd, LIMIT);
    assert_eq!(run.code(), Some(0), "{}", run.dump());
    assert_eq!(run.lines().len(), 1, "{}", run.dump());
    assert!(run.stdout.starts_with("NAME"), "{}", run.dump());
}

#[test]
fn named_vm_in_use_and_stopped() {
    let state = state_dir("inuse");
    // This process holds the name, as a running VMM would.
    let owner = vmlab::named::Owner::create(&state, "busy").unwrap();
    std::fs::write(owner.paths.pid(), format!("{}\n", std::process::id())).unwrap();
    fails_in(
        &state,
        &[
            "run",
            "--kernel",
            "/nonexistent",
            "--name",
            "busy",
            "--detach",
        ],
        "in use by a running VM",
    );
    fails_in(&state, &["rm", "busy"], "is running");
    // The "VMM" dies without cleaning up: every command sees a stopped VM,
    // the first one removes the stale state.
    drop(owner);
    fails_in(&state, &["exec", "busy", "true"], "is not running");
    assert!(!state.join("busy").exists());
    fails_in(&state, &["exec", "busy", "true"], "no such VM");
    let _ = std::fs::remove_dir_all(&state);
}

#[test]
fn detach_failure_cleans_up() {
    let state = state_dir("detachfail");
    fails_in(
        &state,
        &[
            "run",
            "--kernel",
            "/nonexistent/vmlinux",
            "--name",
            "bad",
            "--detach",
        ],
        "cannot read kernel /nonexistent/vmlinux",
    );
    assert!(!state.join("bad").exists(), "state left behind");
    let _ = std::fs::remove_dir_all(&state);
}

#[test]
fn volume_errors() {
    let dir = scratch("vol-dir");
    std::fs::create_dir_all(&dir).unwrap();
    let file = scratch("vol-file");
    std::fs::write(&file, b"x").unwrap();
    let kernel = guest_dir().join("vmlinux");
    let k = s(&kernel);
    let d = s(&dir);
    for (volumes, needle) in [
        (
            vec![format!("{d}/missing:/data")],
            "No such file or directory",
        ),
        (
            vec!["/dev/null:/data".to_string()],
            "not a directory or a regular file",
        ),
        (vec![format!("{d}:data")], "not absolute"),
        (vec![format!("{d}:/data:rx")], "unknown mode"),
        (
            vec![format!("{d}:/data"), format!("{d}:/data/")],
            "both mounted on /data",
        ),
    ] {
        let mut args = vec!["run", "--kernel", k];
        for v in &volumes {
            args.extend(["--volume", v]);
        }
        fails_with(&args, needle);
    }
    // --rootfs: not a directory, missing, no command; bad process flags.
    let f = s(&file);
    fails_with(
        &["run", "--kernel", k, "--rootfs", f, "--", "true"],
        &format!("--rootfs {f}: not a directory"),
    );
    let missing = format!("{d}/missing");
    fails_with(
        &["run", "--kernel", k, "--rootfs", &missing, "--", "true"],
        "No such file or directory",
    );
    fails_with(&["run", "--kernel", k, "--rootfs", d], "COMMAND");
    let long = "h".repeat(65);
    for (flag, value, needle) in [
        ("--hostname", long.as_str(), "at most 64"),
        ("--env", "NOEQ", "not KEY=VALUE"),
        ("--workdir", "rel", "not absolute"),
        ("--user", "a:b:c", "more than one ':'"),
        ("--tmpfs", "/run:bogus", "unknown option 'bogus'"),
    ] {
        fails_with(&["run", "--kernel", k, flag, value, "--", "true"], needle);
    }
    // virtiofsd not installed.
    let mut cmd = vmlab();
    cmd.env_remove("VMLAB_VIRTIOFSD")
        .env("PATH", "/nonexistent")
        .args(["run", "--kernel", k, "--volume", &format!("{d}:/data")]);
    let run = run_with_deadline(cmd, LIMIT);
    if std::path::Path::new("/usr/libexec/virtiofsd").exists() {
        eprintln!("skipped: the 'virtiofsd not installed' check (a system virtiofsd exists)");
    } else {
        assert_ne!(run.code(), Some(0), "{}", run.dump());
        run.assert_stderr(true, "virtiofsd, which is not installed");
        let errors = run.stderr.lines().filter(|l| l.contains("error")).count();
        assert_eq!(errors, 1, "one error line\n{}", run.dump());
    }
    // --fs: a tag twice, a socket that is not there.
    fails_with(
        &["run", "--kernel", k, "--fs", "tag=a,socket=/nonexistent/s"],
        "no such socket",
    );
    fails_with(
        &["run", "--kernel", k, "--fs", "socket=/s"],
        "tag=TAG is required",
    );
    fails_with(
        &[
            "run",
            "--kernel",
            k,
            "--fs",
            &format!("tag={},socket=/s", "t".repeat(37)),
        ],
        "at most 36",
    );
}
