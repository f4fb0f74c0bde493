//! Host directories in the guest over virtio-fs (`vmlab run --volume`),
//! with the real virtiofsd scripts/build-guest.sh installs: what the guest
//! writes is on the host byte for byte and the other way round; modes,
//! owners, symlinks, hard links, xattrs, renames, fsync and a 1,000-file
//! walk behave as on the host; a `:ro` share refuses writes; a killed
//! virtiofsd gives the guest EIO and vmlab a clear message, no hang; and
//! no virtiofsd or socket outlives vmlab, however it ends. The root disk
//! is read-only, so the shares are mounted under the guest's /tmp (a
//! tmpfs), where the init can create their mount points.

mod common;

use std::ffi::CString;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// Files of the tree walk, in `TREE_DIRS` directories.
const TREE_FILES: usize = 1000;
const TREE_DIRS: usize = 10;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vmlab-fs-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `vmlab run` of the root-disk guest (busybox, vmlab-workload) with
/// `volumes`, running `script`; its own state root.
fn guest_command(state: &Path, volumes: &[String], script: &str) -> Command {
    let mut cmd = vmlab();
    cmd.env("VMLAB_STATE_DIR", state)
        .args(["run", "--kernel"])
        .arg(guest_dir().join("vmlinux"))
        .arg("--disk")
        .arg(format!(
            "path={},readonly=on",
            guest_dir().join("rootfs.ext4").display()
        ));
    for v in volumes {
        cmd.args(["--volume", v]);
    }
    cmd.args(["--", "sh", "-c", script]);
    cmd
}

/// The value of the guest's `KEY=...` line.
fn value(run: &Run, key: &str) -> String {
    let prefix = format!("{key}=");
    run.lines()
        .iter()
        .find_map(|l| l.strip_prefix(&prefix).map(str::to_string))
        .unwrap_or_else(|| panic!("no {key}= line\n{}", run.dump()))
}

fn sha256_hex(data: &[u8]) -> String {
    let out = Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(data)?;
            c.wait_with_output()
        })
        .expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

fn getxattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    let p = CString::new(path.to_str().unwrap()).unwrap();
    let n = CString::new(name).unwrap();
    let mut buf = vec![0u8; 256];
    // SAFETY: valid C strings and a buffer of the length passed.
    let len = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    (len >= 0).then(|| {
        buf.truncate(len as usize);
        buf
    })
}

fn setxattr(path: &Path, name: &str, value: &[u8]) {
    let p = CString::new(path.to_str().unwrap()).unwrap();
    let n = CString::new(name).unwrap();
    // SAFETY: valid C strings and a value of the length passed.
    let rc = unsafe {
        libc::setxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(
        rc,
        0,
        "setxattr {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

/// Every file under `dir` with its size and modification time, to show
/// that a read-only share is as it was.
fn listing(dir: &Path) -> Vec<(PathBuf, u64, i64)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let m = std::fs::symlink_metadata(e.path()).unwrap();
            if m.is_dir() {
                todo.push(e.path());
            }
            out.push((e.path(), m.len(), m.mtime()));
        }
    }
    out.sort();
    out
}

/// The guest's side of `share_behaves_as_the_host`.
const SCRIPT: &str = r#"
cd /tmp/rw || exit 9
echo "HOSTSHA=$(sha256sum host.bin | cut -d' ' -f1)"
echo "OWNED=$(stat -c '%a %u %g' owned.txt)"
echo "LINK=$(readlink link)"
echo "HARD=$(stat -c '%h' hard1) $(stat -c '%i' hard1) $(stat -c '%i' hard2)"
echo "XATTR=$(vmlab-workload xattr get xattr.txt user.vmlab)"
vmlab-workload xattr set xattr.txt user.guest from-guest
head -c 200000 /dev/urandom > guest.bin
sync guest.bin && echo "FSYNC=ok"
echo "GUESTSHA=$(sha256sum guest.bin | cut -d' ' -f1)"
chmod 604 guest.bin
chown 42:43 guest.bin
mkdir -p d1 d2 && echo moved > d1/f && mv d1/f d2/f
ln -s host.bin glink
ln host.bin ghard
rm -f gone.txt
t0=$(date +%s)
echo "WALK=$(find tree -type f | wc -l)"
echo "WALKSIZE=$(find tree -type f -size 10c | wc -l)"
echo "WALKSECS=$(( $(date +%s) - t0 ))"
if echo x > /tmp/ro/new.txt 2>/dev/null; then echo RO=written; else echo RO=refused; fi
if rm -f /tmp/ro/keep.txt 2>/dev/null; then echo RORM=removed; else echo RORM=refused; fi
echo "ROREAD=$(cat /tmp/ro/keep.txt)"
echo "MOUNTS=$(grep -c virtiofs /proc/mounts)"
"#;

#[test]
fn share_behaves_as_the_host() {
    let base = scratch("share");
    let (rw, ro, state) = (base.join("rw"), base.join("ro"), base.join("state"));
    std::fs::create_dir_all(&rw).unwrap();
    std::fs::create_dir_all(&ro).unwrap();
    // Host side, before the guest starts.
    let host_bytes: Vec<u8> = (0..300_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(rw.join("host.bin"), &host_bytes).unwrap();
    std::fs::write(rw.join("owned.txt"), b"owned").unwrap();
    std::fs::set_permissions(rw.join("owned.txt"), std::fs::Permissions::from_mode(0o640)).unwrap();
    std::os::unix::fs::chown(rw.join("owned.txt"), Some(1234), Some(5678)).unwrap();
    std::os::unix::fs::symlink("host.bin", rw.join("link")).unwrap();
    std::fs::write(rw.join("hard1"), b"hard").unwrap();
    std::fs::hard_link(rw.join("hard1"), rw.join("hard2")).unwrap();
    std::fs::write(rw.join("xattr.txt"), b"x").unwrap();
    setxattr(&rw.join("xattr.txt"), "user.vmlab", b"from-host");
    std::fs::write(rw.join("gone.txt"), b"bye").unwrap();
    for i in 0..TREE_FILES {
        let dir = rw.join("tree").join(format!("d{}", i % TREE_DIRS));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("f{i}")), b"0123456789").unwrap();
    }
    std::fs::write(ro.join("keep.txt"), b"keep").unwrap();
    // The script is too long for the kernel command line: it comes over
    // the read-only share.
    std::fs::write(ro.join("check.sh"), SCRIPT).unwrap();
    let ro_before = listing(&ro);

    let cmd = guest_command(
        &state,
        &[
            format!("{}:/tmp/rw", rw.display()),
            format!("{}:/tmp/ro:ro", ro.display()),
        ],
        "sh /tmp/ro/check.sh",
    );
    let run = run_guest(cmd, BOOT_LIMIT);
    assert_eq!(run.code(), Some(0), "{}", run.dump());
    eprintln!(
        "share test: guest done after {:?}; walk {} s",
        run.elapsed,
        value(&run, "WALKSECS")
    );

    // Host to guest.
    assert_eq!(
        value(&run, "HOSTSHA"),
        sha256_hex(&host_bytes),
        "{}",
        run.dump()
    );
    assert_eq!(value(&run, "OWNED"), "640 1234 5678", "{}", run.dump());
    assert_eq!(value(&run, "LINK"), "host.bin");
    let hard = value(&run, "HARD");
    let words: Vec<&str> = hard.split(' ').collect();
    assert_eq!(words.len(), 3, "{hard}");
    assert_eq!(words[0], "2", "link count of hard1: {hard}");
    assert_eq!(
        words[1], words[2],
        "hard1 and hard2 are one inode in the guest: {hard}"
    );
    assert_eq!(value(&run, "XATTR"), "from-host");
    assert_eq!(value(&run, "WALK"), TREE_FILES.to_string());
    assert_eq!(
        value(&run, "WALKSIZE"),
        TREE_FILES.to_string(),
        "every file 10 bytes"
    );
    assert_eq!(value(&run, "MOUNTS"), "2");

    // Guest to host.
    let guest_bin = std::fs::read(rw.join("guest.bin")).unwrap();
    assert_eq!(guest_bin.len(), 200_000);
    assert_eq!(value(&run, "FSYNC"), "ok");
    assert_eq!(
        value(&run, "GUESTSHA"),
        sha256_hex(&guest_bin),
        "byte for byte"
    );
    let m = std::fs::metadata(rw.join("guest.bin")).unwrap();
    assert_eq!(m.mode() & 0o7777, 0o604);
    assert_eq!((m.uid(), m.gid()), (42, 43));
    assert_eq!(std::fs::read(rw.join("d2/f")).unwrap(), b"moved\n");
    assert!(!rw.join("d1/f").exists(), "renamed away");
    assert_eq!(
        std::fs::read_link(rw.join("glink")).unwrap(),
        Path::new("host.bin")
    );
    assert_eq!(
        std::fs::metadata(rw.join("ghard")).unwrap().ino(),
        std::fs::metadata(rw.join("host.bin")).unwrap().ino()
    );
    assert_eq!(std::fs::metadata(rw.join("host.bin")).unwrap().nlink(), 2);
    assert_eq!(
        getxattr(&rw.join("xattr.txt"), "user.guest").as_deref(),
        Some(&b"from-guest"[..])
    );
    assert!(!rw.join("gone.txt").exists());

    // The read-only share.
    assert_eq!(value(&run, "RO"), "refused", "{}", run.dump());
    assert_eq!(value(&run, "RORM"), "refused", "{}", run.dump());
    assert_eq!(value(&run, "ROREAD"), "keep");
    assert_eq!(listing(&ro), ro_before, "the read-only share changed");

    // Clean exit: no daemon, no run directory.
    assert_no_daemon(&base);
    assert_no_run_dirs(&state);
    let _ = std::fs::remove_dir_all(&base);
}

/// virtiofsd processes whose command line mentions `needle`.
fn daemons(needle: &Path) -> Vec<u32> {
    let needle = needle.to_str().unwrap();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains("virtiofsd") && cmdline.contains(needle) {
            out.push(pid);
        }
    }
    out
}

/// No virtiofsd serves anything under `base` (within 5 s: a killed
/// vmlab's daemons get their SIGKILL from the kernel).
fn assert_no_daemon(base: &Path) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = daemons(base);
        if left.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "virtiofsd left running: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The run directories under the state root (`.run/<pid>`).
fn run_dirs(state: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(state.join(".run"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

fn assert_no_run_dirs(state: &Path) {
    let left = run_dirs(state);
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// Boots a guest that prints READY and then waits, returning it once
/// READY is on its console.
fn ready_guest(base: &Path, state: &Path, script: &str) -> Guest {
    let share = base.join("share");
    std::fs::create_dir_all(&share).unwrap();
    std::fs::write(share.join("before.txt"), b"before").unwrap();
    std::fs::write(share.join("after.txt"), b"after").unwrap();
    let cmd = guest_command(state, &[format!("{}:/tmp/s", share.display())], script);
    let mut guest = Guest::spawn("fs", cmd);
    guest.wait_for("READY", BOOT_LIMIT, |l| l == "READY");
    guest
}

/// What a [`Guest`] left: its remaining stdout lines, exit code, stderr.
struct Finished {
    code: Option<i32>,
    lines: Vec<String>,
    stderr: String,
}

impl Finished {
    fn of(guest: Guest, limit: Duration) -> Finished {
        let (code, lines, stderr) = guest.finish_with_lines(limit);
        Finished {
            code,
            lines,
            stderr,
        }
    }

    fn value(&self, key: &str) -> String {
        let prefix = format!("{key}=");
        self.lines
            .iter()
            .find_map(|l| l.strip_prefix(&prefix).map(str::to_string))
            .unwrap_or_else(|| panic!("no {key}= line\n{}\n{}", self.lines.join("\n"), self.stderr))
    }
}

#[test]
fn killed_virtiofsd_gives_the_guest_eio_not_a_hang() {
    let base = scratch("kill");
    let state = base.join("state");
    // after.txt is looked up only after the daemon is gone: nothing of it
    // is cached in the guest.
    let guest = ready_guest(
        &base,
        &state,
        "cat /tmp/s/before.txt; echo; echo READY; sleep 4; \
         cat /tmp/s/after.txt; echo CAT=$?; ls /tmp/s/ >/dev/null; echo LS=$?; \
         echo x > /tmp/s/new.txt; echo WRITE=$?",
    );
    let pids = daemons(&base);
    assert_eq!(pids.len(), 1, "one virtiofsd: {pids:?}");
    // SAFETY: kill(2) of the test's own grandchild.
    unsafe { libc::kill(pids[0] as i32, libc::SIGKILL) };
    let run = Finished::of(guest, Duration::from_secs(300));
    let all = format!("{}\n{}", run.lines.join("\n"), run.stderr);
    assert_eq!(run.code, Some(0), "{all}");
    assert_ne!(run.value("CAT"), "0", "{all}");
    assert_ne!(run.value("LS"), "0", "{all}");
    assert_ne!(run.value("WRITE"), "0", "{all}");
    assert!(
        all.contains("Input/output error"),
        "the guest saw EIO\n{all}"
    );
    assert!(all.contains("closed its socket"), "{all}");
    assert!(
        all.contains("ended during the run (killed by signal 9)"),
        "{all}"
    );
    assert!(!base.join("share/new.txt").exists());
    assert_no_run_dirs(&state);
    let _ = std::fs::remove_dir_all(&base);
}

fn signal(guest: &Guest, sig: i32) {
    // SAFETY: kill(2) of the test's own child.
    unsafe { libc::kill(guest.child.id() as i32, sig) };
}

#[test]
fn no_virtiofsd_outlives_vmlab() {
    let base = scratch("exit");
    let state = base.join("state");
    // SIGTERM: vmlab stops the guest, then its daemons.
    let guest = ready_guest(&base, &state, "echo READY; sleep 600");
    assert_eq!(daemons(&base).len(), 1);
    signal(&guest, libc::SIGTERM);
    let (code, stderr) = guest.finish(Duration::from_secs(120));
    assert_eq!(code, Some(128 + libc::SIGTERM), "{stderr}");
    assert_no_daemon(&base);
    assert_no_run_dirs(&state);

    // SIGKILL: the kernel kills the daemon (PR_SET_PDEATHSIG); the run
    // directory stays until the next run with a volume removes it.
    let guest = ready_guest(&base, &state, "echo READY; sleep 600");
    signal(&guest, libc::SIGKILL);
    let _ = Finished::of(guest, Duration::from_secs(60));
    assert_no_daemon(&base);
    assert_eq!(run_dirs(&state).len(), 1, "the killed run's directory");
    // The next run cleans up, even one that fails before it boots (and
    // stops the daemon it started on that error path too).
    let mut cmd2 = vmlab();
    cmd2.env("VMLAB_STATE_DIR", &state).args([
        "run",
        "--kernel",
        "/nonexistent/vmlinux",
        "--volume",
        &format!("{}:/tmp/s", base.join("share").display()),
        "--",
        "true",
    ]);
    let run = run_with_deadline(cmd2, Duration::from_secs(60));
    assert_ne!(run.code(), Some(0), "{}", run.dump());
    assert_no_daemon(&base);
    assert_no_run_dirs(&state);
    let _ = std::fs::remove_dir_all(&base);
}

/// `--image --root-device fs`: the image's cached directory is the root,
/// read-only under a tmpfs layer: the guest writes where the image lets
/// its user write, and neither the cached tree nor the cache directory
/// gets anything of the run (no per-run copy).
#[test]
fn image_root_over_virtio_fs_without_a_copy() {
    let image = guest_dir().join("sample-image");
    let (rootfs, _) = vmlab::image::prepare_rootfs_dir(&image).expect("the sample image");
    let cache = rootfs.parent().unwrap().parent().unwrap().to_path_buf();
    let tree_before = listing(&rootfs);
    let cache_before = listing(&cache);
    let state = scratch("image").join("state");
    let mut cmd = vmlab();
    cmd.env("VMLAB_STATE_DIR", &state)
        .args(["run", "--kernel"])
        .arg(guest_dir().join("vmlinux"))
        .arg("--image")
        .arg(&image)
        .args(["--root-device", "fs", "--"])
        .args([
            "sh",
            "-c",
            "echo ROOT=$(grep ' / ' /proc/mounts | cut -d' ' -f3); \
             echo USER=$(id -u):$(id -g); echo CWD=$(pwd); \
             echo new > new.txt && echo WRITE=$(cat new.txt); \
             echo README=$(cat README); echo VIRTIO=$(ls /sys/bus/virtio/devices | wc -l)",
        ]);
    let run = run_guest(cmd, BOOT_LIMIT);
    assert_eq!(run.code(), Some(0), "{}", run.dump());
    assert_eq!(value(&run, "ROOT"), "overlay", "{}", run.dump());
    assert_eq!(value(&run, "USER"), "1000:1000");
    assert_eq!(value(&run, "CWD"), "/work");
    assert_eq!(value(&run, "WRITE"), "new");
    assert_eq!(value(&run, "README"), "the image's working directory");
    // The root share only: no disk.
    assert_eq!(value(&run, "VIRTIO"), "1");
    assert!(listing(&rootfs) == tree_before, "the cached image changed");
    // The one thing a run may add: the initramfs for this init build,
    // made once (by a cold cache's first run), never a copy of the image.
    let added: Vec<PathBuf> = listing(&cache)
        .into_iter()
        .filter(|e| !cache_before.contains(e))
        .map(|(p, _, _)| p)
        .filter(|p| {
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            let initrd = name.starts_with("initrd-") && name.ends_with(".cpio");
            !(initrd && p.parent() == Some(cache.as_path()))
        })
        .collect();
    assert!(
        added.is_empty(),
        "the run left files in the image cache: {added:?}"
    );
    assert_no_run_dirs(&state);
}

/// `--rootfs DIR` (rw, the default): a host directory holding a busybox
/// root is the guest's `/` over virtio-fs, no image and no disk, and what
/// the guest writes is in DIR; in the same boot, `--env`, `--workdir`,
/// `--user`, `--hostname` reach the command, a host file is a volume
/// (read and written through; a `:ro` one refuses writes) and `--tmpfs`
/// mounts a tmpfs with its options.
#[test]
fn rootfs_directory_with_process_flags_file_volumes_and_tmpfs() {
    let base = scratch("rootfs");
    let (root, state) = (base.join("root"), base.join("state"));
    let tree = guest_dir().join("rootfs-tree");
    assert!(
        tree.join("bin/busybox").exists(),
        "run scripts/build-guest.sh"
    );
    let st = Command::new("cp")
        .arg("-a")
        .arg(&tree)
        .arg(&root)
        .status()
        .unwrap();
    assert!(st.success());
    // The working directory is the user's, so it can write there.
    std::fs::create_dir_all(root.join("srv/app")).unwrap();
    std::os::unix::fs::chown(root.join("srv/app"), Some(1000), Some(1000)).unwrap();
    let (conf, ro) = (base.join("app.conf"), base.join("ro.txt"));
    std::fs::write(&conf, b"from-host\n").unwrap();
    std::os::unix::fs::chown(&conf, Some(1000), Some(1000)).unwrap();
    std::fs::write(&ro, b"read-only\n").unwrap();
    assert!(!root.join("etc/app.conf").exists());

    let mut cmd = vmlab();
    cmd.env("VMLAB_STATE_DIR", &state)
        .args(["run", "--kernel"])
        .arg(guest_dir().join("vmlinux"))
        .arg("--rootfs")
        .arg(&root)
        .args(["--env", "K=hello world", "-e", "PATH=/bin:/usr/bin:/sbin"])
        .args(["--workdir", "/srv/app", "--user", "1000:1000"])
        .args(["--hostname", "web-1"])
        .arg("--volume")
        .arg(format!("{}:/etc/app.conf", conf.display()))
        .arg("--volume")
        .arg(format!("{}:/etc/ro.txt:ro", ro.display()))
        .args(["--tmpfs", "/mnt/scratch:size=8m,mode=1777"])
        .args([
            "--",
            "sh",
            "-c",
            "echo ROOT=$(grep ' / ' /proc/mounts | cut -d' ' -f3,4 | cut -d, -f1); \
             echo ID=$(id -u):$(id -g); echo CWD=$(pwd); echo HOST=$(hostname); \
             echo HOSTNAME=$HOSTNAME; echo K=$K; \
             echo from-guest > out.txt && echo WROTE=yes; \
             echo CONF=$(cat /etc/app.conf); echo guest-line >> /etc/app.conf && echo APPEND=ok; \
             echo RO=$(cat /etc/ro.txt); \
             if echo x >> /etc/ro.txt 2>/dev/null; then echo ROWRITE=written; else echo ROWRITE=refused; fi; \
             echo TMPFS=$(grep ' /mnt/scratch ' /proc/mounts | cut -d' ' -f3,4); \
             touch /mnt/scratch/t && echo TMPFSWRITE=ok",
        ]);
    let run = run_guest(cmd, BOOT_LIMIT);
    assert_eq!(run.code(), Some(0), "{}", run.dump());
    eprintln!("rootfs test: guest done after {:?}", run.elapsed);
    assert_eq!(value(&run, "ROOT"), "virtiofs rw", "{}", run.dump());
    assert_eq!(value(&run, "ID"), "1000:1000");
    assert_eq!(value(&run, "CWD"), "/srv/app");
    assert_eq!(value(&run, "HOST"), "web-1");
    assert_eq!(value(&run, "HOSTNAME"), "web-1");
    assert_eq!(value(&run, "K"), "hello world");
    // The guest's write is in DIR, as that user.
    assert_eq!(value(&run, "WROTE"), "yes", "{}", run.dump());
    let out = root.join("srv/app/out.txt");
    assert_eq!(std::fs::read(&out).unwrap(), b"from-guest\n");
    assert_eq!(std::fs::metadata(&out).unwrap().uid(), 1000);
    // The file volume: read and written through to the host file; the
    // root got only the empty mount point, as runc makes it.
    assert_eq!(value(&run, "CONF"), "from-host");
    assert_eq!(value(&run, "APPEND"), "ok", "{}", run.dump());
    assert_eq!(std::fs::read(&conf).unwrap(), b"from-host\nguest-line\n");
    assert_eq!(std::fs::read(root.join("etc/app.conf")).unwrap(), b"");
    assert_eq!(value(&run, "RO"), "read-only");
    assert_eq!(value(&run, "ROWRITE"), "refused");
    assert_eq!(std::fs::read(&ro).unwrap(), b"read-only\n");
    // The tmpfs, with its size and Docker's default flags.
    let tmpfs = value(&run, "TMPFS");
    assert!(
        tmpfs.starts_with("tmpfs ") && tmpfs.contains("size=8192k") && tmpfs.contains("noexec"),
        "{tmpfs}\n{}",
        run.dump()
    );
    assert_eq!(value(&run, "TMPFSWRITE"), "ok");
    assert!(!root.join("mnt/scratch/t").exists(), "the tmpfs is not DIR");
    // Nothing of the run is left: daemons, run directory, the file links.
    assert_no_daemon(&base);
    assert_no_run_dirs(&state);
    assert_eq!(std::fs::metadata(&conf).unwrap().nlink(), 1);
    let _ = std::fs::remove_dir_all(&base);
}
