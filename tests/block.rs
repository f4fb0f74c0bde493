//! virtio-blk on the real guest: root filesystem from a disk, data written
//! by the guest reaching the host image, read-only disks, several disks at
//! once, and a clean stop on SIGTERM. Two guest boots in all.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;

const DATA_MIB: usize = 64;

fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vmlab-block-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// 64 MiB of pseudo-random bytes (xorshift; incompressible, no zero pages).
fn random_image(path: &Path, seed: u64) -> Vec<u8> {
    let mut data = vec![0u8; DATA_MIB << 20];
    let mut x = seed | 1;
    for chunk in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    std::fs::write(path, &data).unwrap();
    data
}

fn sha256_hex(path: &Path) -> String {
    let out = std::process::Command::new("sha256sum")
        .arg(path)
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// A scratch directory with a 64 MiB random `source.img`, an empty 64 MiB
/// `data.img`, and the source's checksum.
struct Images {
    dir: PathBuf,
    source: PathBuf,
    data: PathBuf,
    source_sum: String,
}

fn images(name: &str, seed: u64) -> Images {
    let dir = scratch_dir(name);
    let source = dir.join("source.img");
    let data = dir.join("data.img");
    random_image(&source, seed);
    std::fs::File::create(&data)
        .unwrap()
        .set_len((DATA_MIB << 20) as u64)
        .unwrap();
    let source_sum = sha256_hex(&source);
    Images {
        dir,
        source,
        data,
        source_sum,
    }
}

/// `vmlab run` with the read-only root (vda), the data disk (vdb) and the
/// read-only source disk (vdc), running `script` in the guest.
fn vmlab_with_disks(images: &Images, data_opts: &str, script: &str) -> std::process::Command {
    let mut cmd = vmlab();
    cmd.args(["run", "--kernel"])
        .arg(guest_dir().join("vmlinux"))
        .arg("--disk")
        .arg(format!("path={},readonly=on", rootfs().display()))
        .arg("--disk")
        .arg(format!("path={}{data_opts}", images.data.display()))
        .arg("--disk")
        .arg(format!("path={},readonly=on", images.source.display()))
        .args(["--", "sh", "-c", script]);
    cmd
}

fn rootfs() -> PathBuf {
    let path = guest_dir().join("rootfs.ext4");
    assert!(
        path.exists(),
        "run scripts/build-guest.sh: {} is missing",
        path.display()
    );
    path
}

/// Root on a read-only virtio disk; the guest copies 64 MiB from a
/// read-only source disk to a data disk with direct I/O, syncs, checksums
/// the data disk (read back with direct I/O: on a nested-KVM host the guest
/// kernel's page cache moves about 1 MB/s), fails to write the read-only
/// disk, and powers off. The host then finds exactly those bytes in the
/// data image.
#[test]
fn guest_writes_reach_the_host_image_and_readonly_is_enforced() {
    let img = images("write", 0x1234_5678);
    let (data, source, source_sum) = (&img.data, &img.source, img.source_sum.as_str());

    let script = format!(
        "dd if=/dev/vdc of=/dev/vdb bs=1M count={DATA_MIB} iflag=direct oflag=direct 2>/dev/null || echo dd-failed; \
         sync; \
         echo guest-sum $(dd if=/dev/vdb bs=1M iflag=direct 2>/dev/null | sha256sum); \
         if echo overwrite > /dev/vdc; then echo ro-write-succeeded; else echo ro-write-refused; fi; \
         echo vdc-ro=$(cat /sys/block/vdc/ro) vda-ro=$(cat /sys/block/vda/ro); \
         grep ' / ' /proc/mounts; \
         poweroff"
    );
    let cmd = vmlab_with_disks(&img, ",id=data", &script);
    let run = run_guest(cmd, BOOT_LIMIT);
    assert_eq!(
        run.code(),
        Some(0),
        "poweroff ends vmlab with 0\n{}",
        run.dump()
    );
    let lines = run.lines();
    let guest_sum = lines
        .iter()
        .find_map(|l| l.strip_prefix("guest-sum "))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no guest checksum\n{}", run.dump()))
        .to_string();
    assert!(!lines.iter().any(|l| l == "dd-failed"), "{}", run.dump());
    assert_eq!(
        guest_sum.as_str(),
        source_sum,
        "guest read back what it wrote\n{}",
        run.dump()
    );
    assert_eq!(
        sha256_hex(data).as_str(),
        source_sum,
        "host image holds the guest's data"
    );
    assert_eq!(
        sha256_hex(source).as_str(),
        source_sum,
        "read-only source unchanged"
    );
    assert!(
        lines.iter().any(|l| l == "ro-write-refused"),
        "{}",
        run.dump()
    );
    assert!(
        lines.iter().any(|l| l == "vdc-ro=1 vda-ro=1"),
        "{}",
        run.dump()
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("/dev/root / ext4 ro") || l.starts_with("/dev/vda / ext4 ro")),
        "root is the read-only ext4 disk\n{}",
        run.dump()
    );
    std::fs::remove_dir_all(&img.dir).unwrap();
}

/// SIGTERM right after the guest's `sync` returned: vmlab stops the guest,
/// exits 143, and the image holds everything the guest had synced.
#[test]
fn sigterm_after_guest_sync_keeps_the_data() {
    let img = images("sigterm", 0xdead_beef);

    let script = format!(
        "dd if=/dev/vdc of=/dev/vdb bs=1M count={DATA_MIB} iflag=direct oflag=direct 2>/dev/null; sync; echo synced; sleep 600"
    );
    let mut child = vmlab_with_disks(&img, "", &script)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut seen = Vec::new();
    loop {
        match rx.recv_timeout(Duration::from_secs(5)) {
            Ok(line) => {
                let synced = line.trim_end() == "synced";
                seen.push(line);
                if synced {
                    break;
                }
            }
            Err(_) if start.elapsed() > BOOT_LIMIT => {
                let _ = child.kill();
                panic!("guest never synced: {seen:?}");
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                let mut err = String::new();
                let _ = child.stderr.take().unwrap().read_to_string(&mut err);
                panic!("vmlab ended before the guest synced: {seen:?}\n{err}");
            }
        }
    }
    // Stop it the way a user or an init system would.
    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let exit = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "vmlab did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(exit.code(), Some(143), "128 + SIGTERM");
    let mut stderr = String::new();
    let _ = child.stderr.take().unwrap().read_to_string(&mut stderr);
    assert_host_workarounds(&stderr);
    assert_eq!(
        sha256_hex(&img.data),
        img.source_sum,
        "synced data is in the host image"
    );
    std::fs::remove_dir_all(&img.dir).unwrap();
}
