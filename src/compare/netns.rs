//! The private network the network rows run on: two network namespaces,
//! a veth pair between them and a TAP for the VM, made with `ip` and
//! always removed (on drop, so also on errors and after Ctrl-C).
//!
//! ```text
//!  namespace <prefix>-peer (clients, the VMM)          namespace <prefix>-srv
//!  ┌───────────────────────────────────────┐          ┌──────────────────────────┐
//!  │ net-client                            │          │ host's net-server,       │
//!  │ veth  10.213.0.1/30 ══════════════════╪══ veth ══│ or the container joined  │
//!  │ tap   10.213.1.1/30 ── vmlab run ── virtio-net ─ │ by --netns: 10.213.0.2   │
//!  │                      guest eth0 10.213.1.2       └──────────────────────────┘
//!  └───────────────────────────────────────┘
//! ```
//!
//! Neither namespace has any other interface or a default route, so no
//! packet can leave them. The names carry vmlab's pid, and namespaces left
//! by a vmlab that was killed (SIGKILL skips every cleanup) are removed by
//! the next `vmlab compare`.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Where `ip netns` keeps its namespaces.
pub const NETNS_DIR: &str = "/run/netns";
/// Every namespace name starts with this.
const PREFIX: &str = "vmlab-cmp-";

/// Addresses (inside the namespaces only).
pub const PEER_VETH_ADDR: &str = "10.213.0.1";
/// The server side of the veth pair: host's and container's net-server.
pub const SERVER_ADDR: &str = "10.213.0.2";
/// The host end of the VM's TAP.
pub const TAP_HOST_ADDR: &str = "10.213.1.1";
/// The guest's address on its eth0.
pub const GUEST_ADDR: &str = "10.213.1.2";
/// Netmask of both /30 links.
pub const NETMASK: &str = "255.255.255.252";
/// The TAP's name inside the peer namespace (a private namespace: no clash
/// with the host's interfaces).
pub const TAP_NAME: &str = "cmptap0";

/// Why the network could not be set up; the network rows carry it.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// Namespaces and interfaces need CAP_NET_ADMIN and CAP_SYS_ADMIN.
    #[error("network namespaces need root")]
    NotRoot,
    /// iproute2 is missing.
    #[error("the `ip` command (iproute2) is not installed")]
    NoIp,
    /// An `ip` command failed.
    #[error("`ip {args}` failed: {message}")]
    Ip {
        /// Its arguments.
        args: String,
        /// Its stderr, or why it could not run.
        message: String,
    },
    /// The TUN/TAP driver is missing.
    #[error("/dev/net/tun is missing (no TUN/TAP driver): the VM cannot get a network device")]
    NoTun,
}

/// The two namespaces and their links; removed when dropped.
#[derive(Debug)]
pub struct TestNet {
    ip: PathBuf,
    /// The clients' and the VMM's namespace.
    pub peer: String,
    /// The host's and container's server namespace.
    pub srv: String,
}

impl TestNet {
    /// Creates the namespaces, the veth pair and the TAP.
    pub fn create() -> Result<TestNet, NetError> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(NetError::NotRoot);
        }
        let ip = find_ip().ok_or(NetError::NoIp)?;
        if !Path::new(crate::devices::tap::TUN_DEVICE).exists() {
            return Err(NetError::NoTun);
        }
        remove_stale(&ip);
        let pid = std::process::id();
        let net = TestNet {
            ip,
            peer: format!("{PREFIX}{pid}-peer"),
            srv: format!("{PREFIX}{pid}-srv"),
        };
        // From here on, dropping `net` removes whatever was made.
        net.ip(&["netns", "add", &net.peer])?;
        net.ip(&["netns", "add", &net.srv])?;
        let (p, s) = (net.peer.as_str(), net.srv.as_str());
        let peer_addr = format!("{PEER_VETH_ADDR}/30");
        let srv_addr = format!("{SERVER_ADDR}/30");
        let tap_addr = format!("{TAP_HOST_ADDR}/30");
        let steps: [&[&str]; 11] = [
            &["-n", p, "link", "set", "lo", "up"],
            &["-n", s, "link", "set", "lo", "up"],
            &[
                "-n",
                p,
                "link",
                "add",
                "veth-peer",
                "type",
                "veth",
                "peer",
                "name",
                "veth-srv",
                "netns",
                s,
            ],
            &["-n", p, "addr", "add", &peer_addr, "dev", "veth-peer"],
            &["-n", s, "addr", "add", &srv_addr, "dev", "veth-srv"],
            &["-n", p, "link", "set", "veth-peer", "up"],
            &["-n", s, "link", "set", "veth-srv", "up"],
            // A persistent TAP with the flags vmlab attaches with
            // (IFF_NO_PI is ip's default, vnet_hdr as vmlab asks), so the
            // address is in place before the VM starts.
            &[
                "-n", p, "tuntap", "add", "dev", TAP_NAME, "mode", "tap", "vnet_hdr",
            ],
            &["-n", p, "addr", "add", &tap_addr, "dev", TAP_NAME],
            &["-n", p, "link", "set", TAP_NAME, "up"],
            &["-n", p, "link", "show", TAP_NAME],
        ];
        for args in steps {
            net.ip(args)?;
        }
        Ok(net)
    }

    /// The namespace file to join (`setns`) for the peer side.
    pub fn peer_path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.peer)
    }

    /// The namespace file of the server side.
    pub fn srv_path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.srv)
    }

    /// The kernel command-line option that configures the guest's eth0.
    pub fn guest_ip_option() -> String {
        format!("ip={GUEST_ADDR}::{TAP_HOST_ADDR}:{NETMASK}::eth0:off")
    }

    fn ip(&self, args: &[&str]) -> Result<(), NetError> {
        run_ip(&self.ip, args)
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        // The persistent TAP is deleted explicitly: a namespace that goes
        // away takes its virtual interfaces along, but only once nothing
        // holds it open any more.
        let _ = run_ip(&self.ip, &["-n", &self.peer, "link", "del", TAP_NAME]);
        for ns in [&self.peer, &self.srv] {
            if let Err(e) = run_ip(&self.ip, &["netns", "del", ns]) {
                log::warn!("removing network namespace {ns}: {e}");
            }
        }
    }
}

/// Opens a namespace file for `setns` (see `launch`).
pub fn open_ns(path: &Path) -> std::io::Result<File> {
    File::open(path)
}

fn find_ip() -> Option<PathBuf> {
    ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

fn run_ip(ip: &Path, args: &[&str]) -> Result<(), NetError> {
    let out = Command::new(ip)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| NetError::Ip {
            args: args.join(" "),
            message: e.to_string(),
        })?;
    if out.status.success() {
        return Ok(());
    }
    Err(NetError::Ip {
        args: args.join(" "),
        message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
    })
}

/// Removes namespaces of `vmlab compare` runs whose process is gone.
fn remove_stale(ip: &Path) {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = stale_pid(&name) else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        log::info!("removing network namespace {name}, left by vmlab process {pid}");
        let _ = run_ip(ip, &["-n", &name, "link", "del", TAP_NAME]);
        let _ = run_ip(ip, &["netns", "del", &name]);
    }
}

/// The pid in a name this module makes (`vmlab-cmp-<pid>-peer|srv`).
fn stale_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(PREFIX)?;
    let (pid, side) = rest.split_once('-')?;
    matches!(side, "peer" | "srv").then_some(())?;
    pid.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_of_leftovers() {
        assert_eq!(stale_pid("vmlab-cmp-1234-peer"), Some(1234));
        assert_eq!(stale_pid("vmlab-cmp-1234-srv"), Some(1234));
        assert_eq!(stale_pid("vmlab-cmp-x-srv"), None);
        assert_eq!(stale_pid("vmlab-cmp-1234-other"), None);
        assert_eq!(stale_pid("vmlab-net-smoke"), None);
    }

    #[test]
    fn guest_option() {
        assert_eq!(
            TestNet::guest_ip_option(),
            "ip=10.213.1.2::10.213.1.1:255.255.255.252::eth0:off"
        );
        crate::devices::tap::validate_name(TAP_NAME).unwrap();
    }
}
