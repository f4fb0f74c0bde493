//! A network namespace per test: every TAP, bridge and address a test
//! makes lives in it, and it is deleted (with all of them) on drop.

use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;

/// A network namespace, deleted (with every device in it) on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// `vmlab-net-<pid>-<n>`, with its loopback up; None (the test is
    /// skipped) when this user may not create namespaces.
    pub fn new() -> Option<Netns> {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: network namespaces and TAP devices need root");
            return None;
        }
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("vmlab-net-{}-{n}", std::process::id());
        let status = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("run ip (iproute2)");
        assert!(status.success(), "ip netns add {name}");
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        Some(ns)
    }

    /// `ip -n NS ARGS`, which must succeed.
    pub fn ip(&self, args: &[&str]) {
        let out = Command::new("ip")
            .arg("-n")
            .arg(&self.name)
            .args(args)
            .output()
            .expect("run ip");
        assert!(
            out.status.success(),
            "ip -n {} {}: {}",
            self.name,
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A persistent TAP device, up, with `addr` (CIDR) if given.
    pub fn tap(&self, name: &str, addr: Option<&str>) {
        self.ip(&["tuntap", "add", "dev", name, "mode", "tap"]);
        if let Some(addr) = addr {
            self.ip(&["addr", "add", addr, "dev", name]);
        }
        self.ip(&["link", "set", name, "up"]);
    }

    /// Whether the namespace is still there.
    pub fn exists(&self) -> bool {
        std::path::Path::new("/run/netns").join(&self.name).exists()
    }

    /// Whether the namespace has a network interface `name`.
    pub fn has_link(&self, name: &str) -> bool {
        Command::new("ip")
            .args(["-n", &self.name, "link", "show", "dev", name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// `ip netns exec NS PROGRAM`.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd.stdin(Stdio::null());
        cmd
    }

    /// Runs `f` on a thread inside the namespace (a network namespace
    /// belongs to a thread): its sockets are the namespace's.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> JoinHandle<T> {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            // SAFETY: setns takes the fd of the namespace file, open for
            // the call, and moves only this thread.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .status();
    }
}
