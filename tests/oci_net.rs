//! `oci::net` on real interfaces: the engine's side is played by two
//! network namespaces of the test's own (`vmlab-ocinet-<pid>-a` and `-b`)
//! with a veth pair between them, 10.231.0.1/24 in `a` and 10.231.0.2/24
//! as `eth0` in `b` (the container's namespace, with a default route via
//! 10.231.0.1, MTU 1400, an IPv6 address and a second interface, as an
//! engine could leave it). Every address stays in those namespaces, which
//! are deleted at the end, failed or not.
//!
//! - `discover()` in `b` finds eth0 with its MAC, address, prefix,
//!   gateway and MTU, and notes the IPv6 address and the other interface.
//! - `wire()` makes the TAP (up, persistent, MTU 1400), the ingress qdiscs
//!   and the two mirred redirect filters, as `tc -j` and `ip -j` show them.
//! - Traffic: the test attaches to the TAP as vmlab's virtio-net does
//!   (`Tap::open`, vnet header), plays the guest, and a UDP datagram sent
//!   from `a` to 10.231.0.2 arrives on the TAP (ARP request first, which
//!   the test answers with the guest's MAC); the test's reply, written to
//!   the TAP, reaches the socket in `a`. Both directions of the redirect.
//! - `unwire()` removes qdiscs, filters and TAP, twice without error; a
//!   second wiring and `unwire_all()` do the same, also after the TAP was
//!   deleted by hand (a filter redirecting to a vanished device).
//! - A namespace with only loopback: `discover()` is `None`.
//!
//! Needs root and iproute2 (`ip`, `tc`); otherwise it says so and passes.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use vmlab::devices::tap::{Tap, VNET_HDR_LEN};
use vmlab::devices::virtio::net::MacAddr;
use vmlab::oci::net::{self, GuestNet, TAP_NAME};

const A_ADDR: Ipv4Addr = Ipv4Addr::new(10, 231, 0, 1);
const B_ADDR: Ipv4Addr = Ipv4Addr::new(10, 231, 0, 2);
const MTU: u32 = 1400;
const UDP_PORT: u16 = 7777;
/// How long a frame may take to show up on the TAP (ARP retries are 1 s
/// apart).
const FRAME_WAIT: Duration = Duration::from_secs(10);

fn tool(name: &str) -> Option<PathBuf> {
    ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

/// Runs a command to completion (ip and tc answer at once), panicking
/// with its stderr when it fails.
fn sh(prog: &str, args: &[&str]) -> String {
    let out = Command::new(tool(prog).unwrap())
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{prog} {}: {e}", args.join(" ")));
    assert!(
        out.status.success(),
        "{prog} {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn json(prog: &str, args: &[&str]) -> Value {
    let out = sh(prog, args);
    if out.trim().is_empty() {
        return Value::Array(Vec::new());
    }
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{prog} {args:?}: {e}: {out}"))
}

/// The two namespaces; deleted on drop (the TAP with them: `ip netns del`
/// drops the last reference once nothing holds the namespace).
struct Namespaces {
    a: String,
    b: String,
}

impl Namespaces {
    fn create() -> Namespaces {
        let pid = std::process::id();
        let ns = Namespaces {
            a: format!("vmlab-ocinet-{pid}-a"),
            b: format!("vmlab-ocinet-{pid}-b"),
        };
        let (a, b) = (ns.a.as_str(), ns.b.as_str());
        let a_addr = format!("{A_ADDR}/24");
        let b_addr = format!("{B_ADDR}/24");
        let mtu = MTU.to_string();
        sh("ip", &["netns", "add", a]);
        sh("ip", &["netns", "add", b]);
        let steps: &[&[&str]] = &[
            &["-n", a, "link", "set", "lo", "up"],
            &["-n", b, "link", "set", "lo", "up"],
            &[
                "-n", a, "link", "add", "veth-a", "mtu", &mtu, "type", "veth", "peer", "name",
                "eth0", "mtu", &mtu, "netns", b,
            ],
            &["-n", a, "addr", "add", &a_addr, "dev", "veth-a"],
            &["-n", b, "addr", "add", &b_addr, "dev", "eth0"],
            &[
                "-n",
                b,
                "addr",
                "add",
                "fd00:231::2/64",
                "dev",
                "eth0",
                "nodad",
            ],
            &["-n", a, "link", "set", "veth-a", "up"],
            &["-n", b, "link", "set", "eth0", "up"],
            &["-n", b, "route", "add", "default", "via", "10.231.0.1"],
            // A second interface the guest does not get.
            // (a veth pair inside b: the host may lack the dummy driver).
            &[
                "-n",
                b,
                "link",
                "add",
                "eth1",
                "type",
                "veth",
                "peer",
                "name",
                "eth1-peer",
            ],
            &["-n", b, "addr", "add", "10.232.0.2/24", "dev", "eth1"],
        ];
        for args in steps {
            sh("ip", args);
        }
        ns
    }

    fn b_path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.b)
    }

    fn a_path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.a)
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = Command::new(tool("ip").unwrap_or_else(|| "ip".into()))
                .args(["netns", "del", ns])
                .status();
        }
    }
}

fn skip_reason() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root".into());
    }
    for t in ["ip", "tc"] {
        if tool(t).is_none() {
            return Some(format!("`{t}` (iproute2) is not installed"));
        }
    }
    if !Path::new("/dev/net/tun").exists() {
        return Some("no /dev/net/tun".into());
    }
    None
}

fn link<'a>(links: &'a Value, name: &str) -> Option<&'a Value> {
    links
        .as_array()?
        .iter()
        .find(|l| l["ifname"].as_str() == Some(name))
}

fn redirects(ns: &str, dev: &str) -> Vec<String> {
    let filters = json(
        "tc",
        &["-n", ns, "-j", "filter", "show", "dev", dev, "ingress"],
    );
    net::redirect_targets(&filters)
}

fn has_ingress(ns: &str, dev: &str) -> bool {
    net::qdiscs_have_ingress(&json("tc", &["-n", ns, "-j", "qdisc", "show", "dev", dev]))
}

/// Checks the wiring as `ip` and `tc` show it.
fn assert_wired(ns: &Namespaces, g: &GuestNet) {
    let b = ns.b.as_str();
    let links = json("ip", &["-n", b, "-j", "-d", "link", "show"]);
    let tap = link(&links, TAP_NAME).expect("the TAP exists");
    let flags: Vec<&str> = tap["flags"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(flags.contains(&"UP"), "TAP not up: {tap}");
    assert_eq!(tap["mtu"].as_u64(), Some(u64::from(MTU)), "{tap}");
    let info = &tap["linkinfo"];
    assert_eq!(info["info_kind"], "tun", "{tap}");
    assert_eq!(info["info_data"]["type"], "tap", "{tap}");
    assert_eq!(info["info_data"]["persist"], true, "{tap}");
    assert!(has_ingress(b, "eth0"));
    assert!(has_ingress(b, TAP_NAME));
    assert_eq!(redirects(b, "eth0"), [TAP_NAME]);
    assert_eq!(redirects(b, TAP_NAME), ["eth0"]);
    // The filter matches everything and sends it out of the other device.
    let filters = sh("tc", &["-n", b, "filter", "show", "dev", "eth0", "ingress"]);
    assert!(
        filters.contains("match 00000000/00000000 at 0"),
        "{filters}"
    );
    assert!(
        filters.contains(&format!("Egress Redirect to device {TAP_NAME}")),
        "{filters}"
    );
    assert_eq!(g.veth, "eth0");
}

fn assert_unwired(ns: &Namespaces) {
    let b = ns.b.as_str();
    let links = json("ip", &["-n", b, "-j", "link", "show"]);
    assert!(link(&links, TAP_NAME).is_none(), "TAP still there");
    assert!(link(&links, "eth0").is_some(), "eth0 must stay");
    assert!(!has_ingress(b, "eth0"), "ingress qdisc still on eth0");
    assert!(redirects(b, "eth0").is_empty());
}

/// Waits (bounded) for a frame on the TAP that `pick` accepts; other
/// frames (IPv6 neighbour discovery of the veth, ...) are skipped.
fn wait_frame(tap: &Tap, what: &str, pick: impl Fn(&[u8]) -> bool) -> Vec<u8> {
    let deadline = Instant::now() + FRAME_WAIT;
    let mut buf = vec![0u8; 65536];
    let mut seen = 0;
    loop {
        match tap.read_frame(&mut buf) {
            Ok(n) if n >= VNET_HDR_LEN + 14 => {
                seen += 1;
                let frame = &buf[VNET_HDR_LEN..n];
                if pick(frame) {
                    return frame.to_vec();
                }
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(
                    Instant::now() < deadline,
                    "no {what} on {TAP_NAME} within {FRAME_WAIT:?} ({seen} other frames)"
                );
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("read {TAP_NAME}: {e}"),
        }
    }
}

fn write_frame(tap: &Tap, frame: &[u8]) {
    let mut buf = vec![0u8; VNET_HDR_LEN];
    buf.extend_from_slice(frame);
    assert_eq!(tap.write_frame(&buf).unwrap(), buf.len());
}

fn ethertype(f: &[u8]) -> u16 {
    u16::from_be_bytes([f[12], f[13]])
}

fn ip_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Plays the guest behind the TAP: answers `a`'s ARP request for
/// 10.231.0.2 with the guest's MAC, receives the datagram, sends a reply.
fn traffic(ns: &Namespaces, g: &GuestNet) {
    let tap = net::in_netns(&ns.b_path(), || Tap::open(TAP_NAME))
        .unwrap()
        .expect("attach to the TAP like vmlab run");
    let sock = net::in_netns(&ns.a_path(), || UdpSocket::bind((A_ADDR, 0)))
        .unwrap()
        .expect("bind a UDP socket in namespace a");
    sock.set_read_timeout(Some(FRAME_WAIT)).unwrap();
    let a_port = sock.local_addr().unwrap().port();
    let probe = b"vmlab-ocinet-probe";
    sock.send_to(probe, (B_ADDR, UDP_PORT)).unwrap();

    // a's ARP request for the guest's address, redirected eth0 → TAP.
    let arp = wait_frame(&tap, "ARP request for 10.231.0.2", |f| {
        ethertype(f) == 0x0806
            && f.len() >= 42
            && f[20..22] == [0, 1]
            && f[38..42] == B_ADDR.octets()
    });
    let a_mac: [u8; 6] = arp[6..12].try_into().unwrap();
    let g_mac = g.mac.0;
    let mut reply = Vec::with_capacity(42);
    reply.extend_from_slice(&a_mac);
    reply.extend_from_slice(&g_mac);
    reply.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 2]);
    reply.extend_from_slice(&g_mac);
    reply.extend_from_slice(&B_ADDR.octets());
    reply.extend_from_slice(&a_mac);
    reply.extend_from_slice(&A_ADDR.octets());
    write_frame(&tap, &reply);

    // The datagram, to the guest's (the veth's) MAC.
    let udp = wait_frame(&tap, "UDP datagram to 10.231.0.2:7777", |f| {
        ethertype(f) == 0x0800
            && f.len() >= 42
            && f[23] == 17
            && f[30..34] == B_ADDR.octets()
            && f[36..38] == UDP_PORT.to_be_bytes()
    });
    assert_eq!(udp[0..6], g_mac, "destination MAC is the guest's");
    let ihl = usize::from(udp[14] & 0x0f) * 4;
    assert_eq!(&udp[14 + ihl + 8..14 + ihl + 8 + probe.len()], probe);

    // The guest's answer: TAP → eth0 → veth-a → the socket.
    let answer = b"vmlab-ocinet-answer";
    let udp_len = 8 + answer.len();
    let total = 20 + udp_len;
    let mut ipv4 = vec![
        0x45,
        0,
        (total >> 8) as u8,
        total as u8,
        0,
        1,
        0x40,
        0,
        64,
        17,
        0,
        0,
    ];
    ipv4.extend_from_slice(&B_ADDR.octets());
    ipv4.extend_from_slice(&A_ADDR.octets());
    let csum = ip_checksum(&ipv4);
    ipv4[10..12].copy_from_slice(&csum.to_be_bytes());
    let mut frame = Vec::new();
    frame.extend_from_slice(&a_mac);
    frame.extend_from_slice(&g_mac);
    frame.extend_from_slice(&[0x08, 0x00]);
    frame.extend_from_slice(&ipv4);
    frame.extend_from_slice(&UDP_PORT.to_be_bytes());
    frame.extend_from_slice(&a_port.to_be_bytes());
    frame.extend_from_slice(&(udp_len as u16).to_be_bytes());
    frame.extend_from_slice(&[0, 0]); // no UDP checksum (allowed on IPv4)
    frame.extend_from_slice(answer);
    write_frame(&tap, &frame);
    let mut buf = [0u8; 256];
    let (n, from) = sock
        .recv_from(&mut buf)
        .expect("the guest's answer reaches namespace a");
    assert_eq!(&buf[..n], answer);
    assert_eq!(from, SocketAddr::from((B_ADDR, UDP_PORT)));
}

#[test]
fn wire_a_veth_to_a_tap_and_back() {
    if let Some(why) = skip_reason() {
        eprintln!("skipped: {why}");
        return;
    }
    let started = Instant::now();
    let ns = Namespaces::create();
    let b = ns.b_path();

    let iface = net::in_netns(&b, net::discover).unwrap().unwrap().unwrap();
    let eth0 = json("ip", &["-n", &ns.b, "-j", "link", "show", "dev", "eth0"]);
    let mac: MacAddr = eth0[0]["address"].as_str().unwrap().parse().unwrap();
    assert_eq!(iface.name, "eth0");
    assert_eq!(iface.mac, mac);
    assert_eq!(iface.addr, B_ADDR);
    assert_eq!(iface.prefix, 24);
    assert_eq!(iface.gateway, Some(A_ADDR));
    assert_eq!(iface.mtu, MTU);
    assert!(iface.up);
    assert!(
        iface.notes.iter().any(|n| n.contains("fd00:231::2/64")),
        "{:?}",
        iface.notes
    );
    assert!(
        iface
            .notes
            .iter()
            .any(|n| n.contains("interface eth1 (10.232.0.2/24) not wired")),
        "{:?}",
        iface.notes
    );

    let g = net::in_netns(&b, || net::wire(iface.clone()))
        .unwrap()
        .unwrap();
    assert_eq!(g.tap, TAP_NAME);
    assert_eq!(g.mac, mac);
    assert_eq!(g.mtu, MTU);
    assert_eq!(
        g.kernel_ip_param(Some("ctr")),
        "ip=10.231.0.2::10.231.0.1:255.255.255.0:ctr:eth0:off"
    );
    let config = vmlab::cli::parse_net(&g.net_arg()).unwrap();
    assert_eq!((config.tap.as_str(), config.mac), (TAP_NAME, Some(mac)));
    assert_wired(&ns, &g);
    // The TAP has no address and the namespace's stack stays out of it.
    assert!(net::in_netns(&b, net::discover)
        .unwrap()
        .unwrap()
        .is_some_and(|i| i.name == "eth0"));

    traffic(&ns, &g);

    // Wiring again while wired: the old wiring is replaced, not doubled.
    let g2 = net::in_netns(&b, || net::wire(iface.clone()))
        .unwrap()
        .unwrap();
    assert_eq!(g2, g);
    assert_wired(&ns, &g2);

    net::in_netns(&b, || net::unwire(&g.veth, &g.tap))
        .unwrap()
        .unwrap();
    assert_unwired(&ns);
    net::in_netns(&b, || net::unwire(&g.veth, &g.tap))
        .unwrap()
        .expect("unwire twice");
    net::in_netns(&b, || net::unwire("no-such-dev", "no-such-tap"))
        .unwrap()
        .expect("unwire of missing interfaces");

    // A second wiring, undone the way `delete` does it.
    let g3 = net::in_netns(&b, || net::wire(iface.clone()))
        .unwrap()
        .unwrap();
    assert_wired(&ns, &g3);
    net::in_netns(&b, net::unwire_all).unwrap().unwrap();
    assert_unwired(&ns);
    net::in_netns(&b, net::unwire_all)
        .unwrap()
        .expect("unwire_all twice");

    // The TAP deleted behind the runtime's back (eth0's filter now
    // redirects to a device that is gone): unwire_all still cleans up.
    let g4 = net::in_netns(&b, || net::wire(iface)).unwrap().unwrap();
    assert_wired(&ns, &g4);
    sh("ip", &["-n", &ns.b, "link", "del", "dev", TAP_NAME]);
    assert_eq!(redirects(&ns.b, "eth0"), ["*"]);
    net::in_netns(&b, net::unwire_all).unwrap().unwrap();
    assert_unwired(&ns);

    // Namespace a was never touched.
    assert!(!has_ingress(&ns.a, "veth-a"));
    eprintln!(
        "wired, traffic both ways, unwired in {:?}",
        started.elapsed()
    );
}

#[test]
fn wire_errors_name_the_command() {
    if let Some(why) = skip_reason() {
        eprintln!("skipped: {why}");
        return;
    }
    // A private namespace (this thread only) with nothing but loopback.
    std::thread::spawn(|| {
        // SAFETY: unshare takes no pointers and moves only this thread.
        assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0);
        assert_eq!(net::discover().unwrap(), None);
        let iface = net::Interface {
            name: "eth9".into(),
            index: 9,
            mac: MacAddr([2, 0, 0, 0, 0, 9]),
            addr: B_ADDR,
            prefix: 24,
            gateway: None,
            mtu: 1500,
            up: false,
            notes: Vec::new(),
        };
        let e = net::wire(iface).unwrap_err().to_string();
        assert!(e.starts_with("`ip link set dev eth9 up` failed"), "{e}");
        assert!(e.contains("eth9"), "{e}");
        assert!(!e.contains('\n'), "{e}");
        // What was made on the way is gone again.
        let links = json("ip", &["-j", "link", "show"]);
        assert!(link(&links, TAP_NAME).is_none(), "TAP left behind");
    })
    .join()
    .unwrap();
}
