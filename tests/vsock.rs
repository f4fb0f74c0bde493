//! virtio-vsock on the real guest, one boot for the whole file:
//!
//! 1. a host CONNECT to a guest port nobody listens on: the guest answers
//!    RST, vmlab closes the host stream without an `OK` line;
//! 2. host → guest: 16 MiB of the workload's data stream through
//!    `vmlab::vsock::connect` to the guest's `vmlab-workload vsock-recv`;
//! 3. guest → host: the guest's `vsock-send` to host port 6000, which
//!    vmlab forwards to the Unix socket `PATH_6000`, 16 MiB;
//! 4. a guest connection to host port 6001, where nothing listens: the
//!    guest's connect fails with ECONNRESET.
//!
//! Both transfers are checked by SHA-256 on both ends (the host's through
//! `sha256sum`) against the digest of the known stream, and timed: on
//! this project's nested-KVM host a guest moves vsock data at a few
//! hundred KiB/s, every guest interrupt and system call being emulated.

mod common;

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;

const TRANSFER_BYTES: u64 = 16 << 20;
/// How long one 16 MiB transfer may take on a busy nested host.
const TRANSFER_LIMIT: Duration = Duration::from_secs(900);
const GUEST_PORT: u32 = 5000;
const HOST_PORT: u32 = 6000;
const HOST_PORT_NOBODY: u32 = 6001;
const GUEST_PORT_NOBODY: u32 = 4999;

/// A directory for the sockets, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        let dir = std::env::temp_dir().join(format!("vmlab-vsock-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn mib_per_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / f64::from(1u32 << 20) / d.as_secs_f64()
}

#[test]
fn host_and_guest_connections_carry_16_mib_each_way() {
    let dir = TempDir::new();
    let socket = dir.0.join("v.sock");
    let expected = expected_digest(TRANSFER_BYTES);
    // The host side of guest → host, listening before the guest boots.
    let forward = UnixListener::bind(dir.0.join(format!("v.sock_{HOST_PORT}")))
        .expect("bind the PATH_6000 listener");

    let script = format!(
        "vmlab-workload vsock-recv --port {GUEST_PORT} --timeout {recv}; \
         vmlab-workload vsock-send --cid 2 --port {HOST_PORT} --bytes {TRANSFER_BYTES} --timeout 300; \
         vmlab-workload vsock-send --cid 2 --port {HOST_PORT_NOBODY} --bytes 1 --timeout 1; \
         echo guest-done",
        recv = TRANSFER_LIMIT.as_secs() + 600
    );
    let mut cmd = vmlab();
    cmd.args(["run", "--kernel"])
        .arg(guest_dir().join("vmlinux"))
        .arg("--disk")
        .arg(format!(
            "path={},readonly=on",
            guest_dir().join("rootfs.ext4").display()
        ))
        .arg("--vsock")
        .arg(format!("cid=3,socket={}", socket.display()))
        .args(["--", "sh", "-c", &script]);
    let mut guest = Guest::spawn("guest", cmd);
    let started = Instant::now();
    guest.wait_for("vsock-recv listening", BOOT_LIMIT, |l| {
        l.contains("vsock-recv listening on port")
    });
    eprintln!("guest listening after {:?}", started.elapsed());

    // 1. Nobody listens on the guest port: the host stream is closed.
    let e = vmlab::vsock::connect(&socket, GUEST_PORT_NOBODY, Duration::from_secs(60))
        .expect_err("CONNECT to a port nobody listens on");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");

    // 2. Host → guest.
    let t = Instant::now();
    let mut conn = vmlab::vsock::connect(&socket, GUEST_PORT, Duration::from_secs(60))
        .expect("CONNECT to the guest's vsock-recv");
    conn.set_write_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    let sent = send_stream(&mut conn, TRANSFER_BYTES, t, TRANSFER_LIMIT)
        .unwrap_or_else(|e| panic!("host → guest: {e}"));
    let took = t.elapsed();
    let line = guest.wait_for("vsock-recv result", Duration::from_secs(120), |l| {
        l.contains(r#""workload":"vsock-recv""#)
    });
    eprintln!(
        "host → guest 16 MiB in {took:?} ({:.2} MiB/s): {line}",
        mib_per_s(TRANSFER_BYTES, took)
    );
    assert_eq!(sent, expected, "host sent the stream");
    assert_stream_line(&line, &expected, Some(TRANSFER_BYTES));
    drop(conn);

    // 3. Guest → host, through PATH_6000.
    let t = Instant::now();
    forward.set_nonblocking(true).unwrap();
    let mut conn = accept_within(Duration::from_secs(300), || {
        forward.accept().map(|(c, _)| c)
    })
    .unwrap_or_else(|e| panic!("PATH_6000: {e}"));
    conn.set_nonblocking(false).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    let (bytes, digest) = receive_stream(&mut conn, t, TRANSFER_LIMIT)
        .unwrap_or_else(|e| panic!("guest → host: {e}"));
    let took = t.elapsed();
    drop(conn);
    let line = guest.wait_for("vsock-send result", Duration::from_secs(120), |l| {
        l.contains(r#""workload":"vsock-send""#)
    });
    eprintln!(
        "guest → host 16 MiB in {took:?} ({:.2} MiB/s): {line}",
        mib_per_s(TRANSFER_BYTES, took)
    );
    assert_eq!(bytes, TRANSFER_BYTES);
    assert_eq!(digest, expected, "host received the stream");
    assert_stream_line(&line, &expected, None);

    // 4. Nothing at PATH_6001: the guest's connect is reset.
    let line = guest.wait_for("the refused connect", Duration::from_secs(120), |l| {
        l.contains(&format!("vsock 2:{HOST_PORT_NOBODY}"))
    });
    assert!(
        line.contains("Connection reset by peer") || line.contains("Connection refused"),
        "{line}"
    );

    guest.wait_for("the end of the script", Duration::from_secs(120), |l| {
        l == "guest-done"
    });
    let (code, stderr) = guest.finish(Duration::from_secs(60));
    assert_eq!(code, Some(0), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        !stderr.contains("refused"),
        "no packet was refused: {stderr}"
    );
    assert!(!socket.exists(), "vmlab removes its socket at exit");
}
