//! The container's network, handed to the guest: the engine's veth wired
//! to a TAP the way Kata Containers does it ("tc redirect").
//!
//! Docker's libnetwork (and Podman/CNI) move one end of a veth pair into
//! the container's network namespace, usually as `eth0`, with an IPv4
//! address, a prefix and a default route. The monitor runs in that
//! namespace and, before `vmlab run` starts:
//!
//! 1. [`discover`] reads the namespace's interfaces and routes
//!    (`ip -j addr show`, `ip -j -4 route show default`) and picks one
//!    interface (below);
//! 2. [`wire`] creates a persistent TAP ([`TAP_NAME`], `ip tuntap add ...
//!    mode tap vnet_hdr`) with the veth's MTU, brings both up, adds an
//!    `ingress` qdisc on each and a u32 filter that matches every frame
//!    (`match u8 0 0`) with `action mirred egress redirect dev OTHER`:
//!
//! ```text
//!   engine's bridge ══ veth peer ══ eth0 (ingress) ──redirect──> tap0_vmlab egress ──> vmlab ──> guest eth0
//!                                   eth0 egress <──redirect── tap0_vmlab (ingress) <── vmlab <── guest eth0
//! ```
//!
//! The guest's NIC gets the veth's MAC address (so the engine's ARP and
//! bridge entries stay valid) and, through the kernel's `ip=` parameter
//! ([`GuestNet::kernel_ip_param`]), the veth's address, prefix and default
//! gateway; [`GuestNet::net_arg`] is the `vmlab run --net` value. The
//! veth keeps its address: every frame it receives is redirected before
//! the namespace's own IP stack could see it.
//!
//! Which interface: the one the IPv4 default route leaves by, if it has an
//! IPv4 address; else the first non-loopback interface (by index) that has
//! one. Everything not handed over (other interfaces, further IPv4
//! addresses, IPv6 addresses, an off-link gateway) becomes a line in
//! [`Interface::notes`], which [`wire`] logs.
//!
//! MTU: the TAP gets the veth's MTU, so nothing larger than the engine's
//! network carries is passed from the guest to the veth unnoticed by the
//! host side. The guest's own eth0 keeps the kernel's default (1500): the
//! kernel's `ip=` has no MTU field and vmlab's virtio-net does not offer
//! VIRTIO_NET_F_MTU. [`GuestNet::mtu`] carries the value for whichever of
//! the two gets it first.
//!
//! Implementation: this module runs iproute2's `ip` and `tc` (JSON output
//! with `-j`, parsed with serde_json) instead of speaking rtnetlink
//! itself; they are on every host the runtime supports, what they do is
//! what an operator would type, and a failure names the command and its
//! stderr in one line. Every command is killed after [`COMMAND_TIMEOUT`].
//!
//! [`unwire`] and [`unwire_all`] undo it (idempotent); [`in_netns`] runs
//! them (or anything) inside another namespace given by path, for
//! `delete`, which runs outside the container's namespace.

use std::io::Read;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::Error;
use crate::devices::virtio::net::MacAddr;

/// The name of the TAP [`wire`] creates (Kata's is `tap0_kata`).
pub const TAP_NAME: &str = "tap0_vmlab";

/// The guest's interface name in the `ip=` parameter (its only NIC).
pub const GUEST_IFNAME: &str = "eth0";

/// How long one `ip` or `tc` command may take before it is killed.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest hostname the kernel's `ip=` takes (`__NEW_UTS_LEN`).
const MAX_HOSTNAME_LEN: usize = 64;

/// The interface [`discover`] chose, as the namespace has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    /// Its name (`eth0`).
    pub name: String,
    /// Its interface index.
    pub index: u32,
    /// Its MAC address (the guest's from now on).
    pub mac: MacAddr,
    /// Its (first primary) IPv4 address.
    pub addr: Ipv4Addr,
    /// The address's prefix length.
    pub prefix: u8,
    /// The IPv4 default route's gateway on this interface.
    pub gateway: Option<Ipv4Addr>,
    /// Its MTU.
    pub mtu: u32,
    /// Whether it is up (IFF_UP); [`wire`] brings it up if not.
    pub up: bool,
    /// What is not handed to the guest, one sentence each.
    pub notes: Vec<String>,
}

/// The guest's network once [`wire`] has run: the `vmlab run` arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestNet {
    /// The TAP vmlab's virtio-net opens.
    pub tap: String,
    /// The guest's MAC address (the veth's).
    pub mac: MacAddr,
    /// The guest's IPv4 address.
    pub addr: Ipv4Addr,
    /// Its prefix length.
    pub prefix: u8,
    /// The default gateway.
    pub gateway: Option<Ipv4Addr>,
    /// The veth's MTU (the TAP has it too).
    pub mtu: u32,
    /// The veth the TAP is wired to.
    pub veth: String,
}

impl GuestNet {
    /// The guest kernel's `ip=` parameter:
    /// `ip=ADDR::GW:NETMASK:HOSTNAME:eth0:off` (no gateway: empty field).
    /// A hostname the parameter cannot carry (a `:`, a space or a comma,
    /// longer than 64 bytes) is left out and logged.
    pub fn kernel_ip_param(&self, hostname: Option<&str>) -> String {
        let gateway = self.gateway.map(|g| g.to_string()).unwrap_or_default();
        let host = match hostname {
            Some(h) if hostname_fits(h) => h,
            Some(h) => {
                log::warn!(
                    "hostname {h:?} cannot go into the kernel's ip= parameter (':', ',', \
                     whitespace or longer than {MAX_HOSTNAME_LEN} bytes); left out"
                );
                ""
            }
            None => "",
        };
        format!(
            "ip={}::{gateway}:{}:{host}:{GUEST_IFNAME}:off",
            self.addr,
            netmask(self.prefix)
        )
    }

    /// The value for `vmlab run --net`: `tap=NAME,mac=MAC`.
    pub fn net_arg(&self) -> String {
        format!("tap={},mac={}", self.tap, self.mac)
    }
}

/// Whether `ip=` can carry `h` as its hostname field.
fn hostname_fits(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= MAX_HOSTNAME_LEN
        && h.bytes()
            .all(|b| b.is_ascii_graphic() && b != b':' && b != b',')
}

/// The dotted netmask of a prefix length (32 and above: all ones).
pub fn netmask(prefix: u8) -> Ipv4Addr {
    let bits = match prefix {
        0 => 0,
        p if p >= 32 => u32::MAX,
        p => u32::MAX << (32 - u32::from(p)),
    };
    Ipv4Addr::from(bits)
}

/// Whether `a` and `b` are in the same `prefix` network.
fn same_network(a: Ipv4Addr, b: Ipv4Addr, prefix: u8) -> bool {
    let mask = u32::from(netmask(prefix));
    u32::from(a) & mask == u32::from(b) & mask
}

/// The interface of the current network namespace to hand to the guest;
/// `None` when it has no interface with IPv4 but loopback (and the TAP).
pub fn discover() -> Result<Option<Interface>, Error> {
    let addrs = run_json("ip", &["-j", "addr", "show"])?;
    let routes = run_json("ip", &["-j", "-4", "route", "show", "default"])?;
    choose_interface(&addrs, &routes)
}

/// [`discover`] on parsed `ip -j addr show` and `ip -j -4 route show
/// default` output.
pub fn choose_interface(addrs: &Value, routes: &Value) -> Result<Option<Interface>, Error> {
    let links = addrs
        .as_array()
        .ok_or_else(|| Error::msg("`ip -j addr show`: not a JSON array"))?;
    let defaults = parse_default_routes(routes);
    let candidates: Vec<&Value> = links
        .iter()
        .filter(|l| !is_loopback(l) && str_field(l, "ifname") != Some(TAP_NAME))
        .collect();
    let with_ipv4 = |l: &&Value| primary_ipv4(l).is_some();
    // The default route's interface first, else the first by index.
    let by_route = defaults.iter().find_map(|(dev, _)| {
        candidates
            .iter()
            .copied()
            .filter(with_ipv4)
            .find(|l| str_field(l, "ifname") == Some(dev.as_str()))
    });
    let mut ordered: Vec<&Value> = candidates.iter().copied().filter(with_ipv4).collect();
    ordered.sort_by_key(|l| l.get("ifindex").and_then(Value::as_u64).unwrap_or(u64::MAX));
    let Some(chosen) = by_route.or_else(|| ordered.first().copied()) else {
        return Ok(None);
    };
    let name = str_field(chosen, "ifname")
        .ok_or_else(|| Error::msg("`ip -j addr show`: an interface without \"ifname\""))?
        .to_string();
    let mac_text = str_field(chosen, "address")
        .ok_or_else(|| Error::msg(format!("interface {name}: no MAC address in `ip -j addr`")))?;
    let mac: MacAddr = mac_text
        .parse()
        .map_err(|e| Error::msg(format!("interface {name}: {e}")))?;
    let (addr, prefix) = primary_ipv4(chosen)
        .ok_or_else(|| Error::msg(format!("interface {name}: no IPv4 address")))?;
    let mtu = chosen
        .get("mtu")
        .and_then(Value::as_u64)
        .and_then(|m| u32::try_from(m).ok())
        .ok_or_else(|| Error::msg(format!("interface {name}: no MTU in `ip -j addr`")))?;
    let index = chosen
        .get("ifindex")
        .and_then(Value::as_u64)
        .and_then(|i| u32::try_from(i).ok())
        .unwrap_or(0);
    let up = has_flag(chosen, "UP");

    let mut notes = Vec::new();
    let gateway = defaults
        .iter()
        .find(|(dev, _)| *dev == name)
        .map(|(_, gw)| *gw);
    for (dev, gw) in &defaults {
        if *dev != name {
            notes.push(format!(
                "default route via {gw} on {dev} not given to the guest (only {name} is wired)"
            ));
        }
    }
    if let Some(gw) = gateway {
        if !same_network(addr, gw, prefix) {
            notes.push(format!(
                "gateway {gw} is outside {addr}/{prefix}: the guest kernel's ip= refuses an \
                 off-link gateway, so the guest may have no default route"
            ));
        }
    }
    for (a, p) in ipv4_addrs(chosen).into_iter().filter(|&(a, _)| a != addr) {
        notes.push(format!(
            "further IPv4 address {a}/{p} on {name} not given to the guest"
        ));
    }
    for a in ipv6_global_addrs(chosen) {
        notes.push(format!(
            "IPv6 address {a} on {name} not given to the guest (IPv4 only)"
        ));
    }
    for l in &candidates {
        let other = str_field(l, "ifname").unwrap_or("?");
        if other == name {
            continue;
        }
        let mut addrs: Vec<String> = ipv4_addrs(l)
            .into_iter()
            .map(|(a, p)| format!("{a}/{p}"))
            .collect();
        addrs.extend(ipv6_global_addrs(l));
        let what = if addrs.is_empty() {
            String::new()
        } else {
            format!(" ({})", addrs.join(", "))
        };
        notes.push(format!(
            "interface {other}{what} not wired: the guest gets one interface ({name})"
        ));
    }
    Ok(Some(Interface {
        name,
        index,
        mac,
        addr,
        prefix,
        gateway,
        mtu,
        up,
        notes,
    }))
}

fn str_field<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

fn has_flag(link: &Value, flag: &str) -> bool {
    link.get("flags")
        .and_then(Value::as_array)
        .is_some_and(|f| f.iter().any(|x| x.as_str() == Some(flag)))
}

fn is_loopback(link: &Value) -> bool {
    str_field(link, "link_type") == Some("loopback") || has_flag(link, "LOOPBACK")
}

/// An interface's IPv4 addresses, primary ones first, in `ip`'s order.
fn ipv4_addrs(link: &Value) -> Vec<(Ipv4Addr, u8)> {
    let Some(infos) = link.get("addr_info").and_then(Value::as_array) else {
        return Vec::new();
    };
    let mut out: Vec<(bool, Ipv4Addr, u8)> = infos
        .iter()
        .filter(|i| str_field(i, "family") == Some("inet"))
        .filter_map(|i| {
            let a: Ipv4Addr = str_field(i, "local")?.parse().ok()?;
            let p = u8::try_from(i.get("prefixlen")?.as_u64()?).ok()?;
            let secondary = i.get("secondary").and_then(Value::as_bool) == Some(true);
            Some((secondary, a, p))
        })
        .filter(|&(_, _, p)| p <= 32)
        .collect();
    out.sort_by_key(|&(secondary, _, _)| secondary);
    out.into_iter().map(|(_, a, p)| (a, p)).collect()
}

fn primary_ipv4(link: &Value) -> Option<(Ipv4Addr, u8)> {
    ipv4_addrs(link).first().copied()
}

/// IPv6 addresses other than link-local ones (which every interface has).
fn ipv6_global_addrs(link: &Value) -> Vec<String> {
    let Some(infos) = link.get("addr_info").and_then(Value::as_array) else {
        return Vec::new();
    };
    infos
        .iter()
        .filter(|i| str_field(i, "family") == Some("inet6"))
        .filter(|i| str_field(i, "scope") != Some("link"))
        .filter_map(|i| {
            let a = str_field(i, "local")?;
            let p = i.get("prefixlen").and_then(Value::as_u64).unwrap_or(128);
            Some(format!("{a}/{p}"))
        })
        .collect()
}

/// (device, gateway) of each IPv4 default route, in `ip`'s order
/// (multipath routes: each next hop).
pub fn parse_default_routes(routes: &Value) -> Vec<(String, Ipv4Addr)> {
    let mut out = Vec::new();
    let Some(routes) = routes.as_array() else {
        return out;
    };
    for r in routes {
        if str_field(r, "dst") != Some("default") {
            continue;
        }
        let mut hops: Vec<&Value> = vec![r];
        if let Some(nh) = r.get("nexthops").and_then(Value::as_array) {
            hops.extend(nh.iter());
        }
        for h in hops {
            let (Some(dev), Some(gw)) = (str_field(h, "dev"), str_field(h, "gateway")) else {
                continue;
            };
            // An IPv6 next hop for IPv4 (RFC 5549) does not parse: skipped.
            if let Ok(gw) = gw.parse::<Ipv4Addr>() {
                out.push((dev.to_string(), gw));
            }
        }
    }
    out
}

/// Wires `iface` to a new TAP ([`TAP_NAME`]) in the current network
/// namespace: TAP created (persistent, vnet_hdr), MTU copied, both up, an
/// ingress qdisc and a redirect filter on each. A TAP of that name left by
/// an earlier monitor is unwired first. On failure what was made is
/// removed again.
pub fn wire(iface: Interface) -> Result<GuestNet, Error> {
    for note in &iface.notes {
        log::warn!("network: {note}");
    }
    let veth = iface.name.as_str();
    let tap = TAP_NAME;
    if link_exists(tap)? {
        log::info!("network: {tap} exists (left by an earlier monitor): unwiring it first");
        unwire(veth, tap)?;
    }
    if has_ingress_qdisc(veth)? {
        return Err(Error::msg(format!(
            "interface {veth} already has an ingress qdisc (another tc user?): \
             not wiring it to {tap}"
        )));
    }
    let guest = GuestNet {
        tap: tap.to_string(),
        mac: iface.mac,
        addr: iface.addr,
        prefix: iface.prefix,
        gateway: iface.gateway,
        mtu: iface.mtu,
        veth: iface.name.clone(),
    };
    if let Err(e) = wire_steps(veth, tap, iface.mtu, iface.up) {
        if let Err(undo) = unwire(veth, tap) {
            log::warn!("network: undoing a failed wiring: {undo}");
        }
        return Err(e);
    }
    log::info!(
        "network: {veth} ({}/{}, gateway {}, mtu {}) redirected to {tap}; guest mac {}",
        guest.addr,
        guest.prefix,
        guest
            .gateway
            .map_or_else(|| "none".to_string(), |g| g.to_string()),
        guest.mtu,
        guest.mac
    );
    Ok(guest)
}

fn wire_steps(veth: &str, tap: &str, mtu: u32, veth_up: bool) -> Result<(), Error> {
    let mtu = mtu.to_string();
    run(
        "ip",
        &["tuntap", "add", "dev", tap, "mode", "tap", "vnet_hdr"],
    )?;
    // No IPv6 link-local address on the TAP: the namespace's stack would
    // otherwise send router solicitations and DAD probes to the guest.
    // Without IPv6 in the kernel this fails, and nothing is lost.
    if let Err(e) = run("ip", &["link", "set", "dev", tap, "addrgenmode", "none"]) {
        log::debug!("network: {e}");
    }
    run("ip", &["link", "set", "dev", tap, "mtu", &mtu])?;
    run("ip", &["link", "set", "dev", tap, "up"])?;
    if !veth_up {
        run("ip", &["link", "set", "dev", veth, "up"])?;
    }
    for (from, to) in [(veth, tap), (tap, veth)] {
        run("tc", &["qdisc", "add", "dev", from, "ingress"])?;
        run(
            "tc",
            &[
                "filter", "add", "dev", from, "parent", "ffff:", "protocol", "all", "u32", "match",
                "u8", "0", "0", "action", "mirred", "egress", "redirect", "dev", to,
            ],
        )?;
    }
    Ok(())
}

/// Removes the wiring of `veth` to `tap` in the current network
/// namespace: the veth's ingress qdisc (with its filters) if a filter
/// redirects to `tap` (or to a deleted device) or it has none, then the TAP (its qdisc goes with
/// it). What is already gone is not an error.
pub fn unwire(veth: &str, tap: &str) -> Result<(), Error> {
    if has_ingress_qdisc(veth)? {
        let targets = ingress_redirect_targets(veth)?;
        if targets.is_empty() || targets.iter().any(|t| is_ours(t, tap)) {
            run("tc", &["qdisc", "del", "dev", veth, "ingress"])?;
        } else {
            log::warn!(
                "network: the ingress qdisc of {veth} redirects to {} and not to {tap}: left alone",
                targets.join(", ")
            );
        }
    }
    if link_exists(tap)? {
        run("ip", &["link", "del", "dev", tap])?;
    }
    Ok(())
}

/// Whether a redirect to `target` is one [`unwire`] removes: to `tap`,
/// or to a device that no longer exists (`tc` shows `*`; the TAP was
/// deleted first), which would drop every frame.
fn is_ours(target: &str, tap: &str) -> bool {
    target == tap || target == "*"
}

/// [`unwire`] for every interface of the current namespace whose ingress
/// filters redirect to [`TAP_NAME`] (or to a deleted device), then the TAP: for `delete`, which
/// knows the namespace but not the veth's name.
pub fn unwire_all() -> Result<(), Error> {
    let links = run_json("ip", &["-j", "link", "show"])?;
    let names: Vec<String> = links
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|l| str_field(l, "ifname"))
                .filter(|n| *n != TAP_NAME)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    for name in names {
        if has_ingress_qdisc(&name)?
            && ingress_redirect_targets(&name)?
                .iter()
                .any(|t| is_ours(t, TAP_NAME))
        {
            run("tc", &["qdisc", "del", "dev", &name, "ingress"])?;
        }
    }
    if link_exists(TAP_NAME)? {
        run("ip", &["link", "del", "dev", TAP_NAME])?;
    }
    Ok(())
}

/// Whether interface `name` exists in the current namespace.
fn link_exists(name: &str) -> Result<bool, Error> {
    let links = run_json("ip", &["-j", "link", "show"])?;
    Ok(links
        .as_array()
        .is_some_and(|a| a.iter().any(|l| str_field(l, "ifname") == Some(name))))
}

/// Whether `dev` has an ingress qdisc; false when `dev` does not exist.
fn has_ingress_qdisc(dev: &str) -> Result<bool, Error> {
    if !link_exists(dev)? {
        return Ok(false);
    }
    let qdiscs = run_json("tc", &["-j", "qdisc", "show", "dev", dev])?;
    Ok(qdiscs_have_ingress(&qdiscs))
}

/// Whether parsed `tc -j qdisc show dev X` lists an ingress qdisc.
pub fn qdiscs_have_ingress(qdiscs: &Value) -> bool {
    qdiscs
        .as_array()
        .is_some_and(|a| a.iter().any(|q| str_field(q, "kind") == Some("ingress")))
}

/// The devices `dev`'s ingress filters redirect to (mirred).
fn ingress_redirect_targets(dev: &str) -> Result<Vec<String>, Error> {
    let filters = run_json("tc", &["-j", "filter", "show", "dev", dev, "ingress"])?;
    Ok(redirect_targets(&filters))
}

/// The `to_dev` of every mirred redirect action in parsed `tc -j filter
/// show` output.
pub fn redirect_targets(filters: &Value) -> Vec<String> {
    let Some(filters) = filters.as_array() else {
        return Vec::new();
    };
    filters
        .iter()
        .filter_map(|f| f.get("options")?.get("actions")?.as_array())
        .flatten()
        .filter(|a| str_field(a, "kind") == Some("mirred"))
        .filter(|a| str_field(a, "mirred_action") == Some("redirect"))
        .filter_map(|a| str_field(a, "to_dev").map(str::to_string))
        .collect()
}

/// Runs `f` inside the network namespace at `path` (`/run/netns/NAME`,
/// `/proc/PID/ns/net`, Docker's `/var/run/docker/netns/...`) and returns
/// its result.
///
/// `f` runs on a new thread that `setns(CLONE_NEWNET)`s into the
/// namespace: a network namespace belongs to a thread, so the calling
/// thread and the rest of the process stay where they are, and processes
/// the thread spawns (`ip`, `tc`) and sockets or TAP fds it opens belong
/// to the namespace. The thread ends with `f`. Needs CAP_SYS_ADMIN.
pub fn in_netns<T, F>(path: &Path, f: F) -> Result<T, Error>
where
    T: Send,
    F: FnOnce() -> T + Send,
{
    let file = std::fs::File::open(path).map_err(Error::io(format!(
        "open network namespace {}",
        path.display()
    )))?;
    std::thread::scope(|s| {
        let handle = s.spawn(|| {
            // SAFETY: setns takes an fd this function owns and no memory;
            // it moves only this thread, which ends with the closure.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(Error::io(format!("setns {}", path.display()))(
                    std::io::Error::last_os_error(),
                ));
            }
            Ok(f())
        });
        handle.join().unwrap_or_else(|_| {
            Err(Error::msg(format!(
                "the thread in network namespace {} panicked",
                path.display()
            )))
        })
    })
}

/// Where iproute2's `ip` or `tc` is: the usual sbin directories, else
/// `$PATH`.
fn tool(name: &str) -> PathBuf {
    ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(name))
}

/// Runs `ip ARGS` or `tc ARGS` and returns its stdout, or an error naming
/// the command and its stderr.
fn run(prog: &str, args: &[&str]) -> Result<String, Error> {
    run_with_timeout(&tool(prog), prog, args, COMMAND_TIMEOUT)
}

fn run_json(prog: &str, args: &[&str]) -> Result<Value, Error> {
    let out = run(prog, args)?;
    let text = out.trim();
    if text.is_empty() {
        // `tc -j` prints nothing for an empty list.
        return Ok(Value::Array(Vec::new()));
    }
    serde_json::from_str(text).map_err(|e| {
        Error::msg(format!(
            "`{prog} {}`: unparsable JSON output: {e}",
            args.join(" ")
        ))
    })
}

fn run_with_timeout(
    path: &Path,
    prog: &str,
    args: &[&str],
    timeout: Duration,
) -> Result<String, Error> {
    let line = format!("{prog} {}", args.join(" "));
    let mut child = Command::new(path)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            let hint = if e.kind() == std::io::ErrorKind::NotFound {
                " (is iproute2 installed?)"
            } else {
                ""
            };
            Error::msg(format!(
                "`{line}`: cannot run {}: {e}{hint}",
                path.display()
            ))
        })?;
    let readers = [
        child.stdout.take().map(|mut r| {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let _ = r.read_to_end(&mut buf);
                buf
            })
        }),
        child.stderr.take().map(|mut r| {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let _ = r.read_to_end(&mut buf);
                buf
            })
        }),
    ];
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Error::msg(format!(
                    "`{line}`: no answer within {} s, killed",
                    timeout.as_secs()
                )));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => return Err(Error::msg(format!("`{line}`: waiting for it: {e}"))),
        }
    };
    let [stdout, stderr] = readers.map(|r| r.and_then(|h| h.join().ok()).unwrap_or_default());
    if status.success() {
        return Ok(String::from_utf8_lossy(&stdout).into_owned());
    }
    let err = String::from_utf8_lossy(&stderr);
    let err = err
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    Err(Error::msg(format!(
        "`{line}` failed ({status}): {}",
        if err.is_empty() { "no message" } else { &err }
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// `ip -j addr show` of a Docker container: lo, eth0 with IPv4 and
    /// IPv6 (global and link-local), as iproute2 6.1 prints it.
    const DOCKER_ADDR: &str = r#"[{"ifindex":1,"ifname":"lo","flags":["LOOPBACK","UP","LOWER_UP"],"mtu":65536,"qdisc":"noqueue","operstate":"UNKNOWN","group":"default","txqlen":1000,"link_type":"loopback","address":"00:00:00:00:00:00","broadcast":"00:00:00:00:00:00","addr_info":[{"family":"inet","local":"127.0.0.1","prefixlen":8,"scope":"host","label":"lo","valid_life_time":4294967295,"preferred_life_time":4294967295},{"family":"inet6","local":"::1","prefixlen":128,"scope":"host","valid_life_time":4294967295,"preferred_life_time":4294967295}]},{"ifindex":18,"link_index":19,"ifname":"eth0","flags":["BROADCAST","MULTICAST","UP","LOWER_UP"],"mtu":1450,"qdisc":"noqueue","operstate":"UP","group":"default","link_type":"ether","address":"02:42:ac:11:00:02","broadcast":"ff:ff:ff:ff:ff:ff","link_netnsid":0,"addr_info":[{"family":"inet","local":"172.17.0.2","prefixlen":16,"broadcast":"172.17.255.255","scope":"global","label":"eth0","valid_life_time":4294967295,"preferred_life_time":4294967295},{"family":"inet6","local":"fd00:dead::2","prefixlen":64,"scope":"global","nodad":true,"valid_life_time":4294967295,"preferred_life_time":4294967295},{"family":"inet6","local":"fe80::42:acff:fe11:2","prefixlen":64,"scope":"link","valid_life_time":4294967295,"preferred_life_time":4294967295}]}]"#;

    const DOCKER_ROUTE: &str =
        r#"[{"dst":"default","gateway":"172.17.0.1","dev":"eth0","flags":[]}]"#;

    fn parse(s: &str) -> Value {
        serde_json::from_str(s).unwrap()
    }

    #[test]
    fn docker_namespace() {
        let i = choose_interface(&parse(DOCKER_ADDR), &parse(DOCKER_ROUTE))
            .unwrap()
            .unwrap();
        assert_eq!(i.name, "eth0");
        assert_eq!(i.index, 18);
        assert_eq!(i.mac, MacAddr([0x02, 0x42, 0xac, 0x11, 0x00, 0x02]));
        assert_eq!(i.addr, Ipv4Addr::new(172, 17, 0, 2));
        assert_eq!(i.prefix, 16);
        assert_eq!(i.gateway, Some(Ipv4Addr::new(172, 17, 0, 1)));
        assert_eq!(i.mtu, 1450);
        assert!(i.up);
        assert_eq!(i.notes.len(), 1, "{:?}", i.notes);
        assert!(i.notes[0].contains("IPv6 address fd00:dead::2/64 on eth0"));
    }

    #[test]
    fn only_loopback_is_none() {
        let addrs = parse(DOCKER_ADDR);
        let lo = json!([addrs[0].clone()]);
        assert_eq!(choose_interface(&lo, &json!([])).unwrap(), None);
        assert_eq!(choose_interface(&json!([]), &json!([])).unwrap(), None);
        // An interface without IPv4 (the TAP, or an IPv6-only one): none.
        let v6only = json!([{"ifindex": 2, "ifname": "eth0", "flags": ["UP"], "mtu": 1500,
            "link_type": "ether", "address": "02:00:00:00:00:01",
            "addr_info": [{"family": "inet6", "local": "fd00::1", "prefixlen": 64, "scope": "global"}]}]);
        assert_eq!(choose_interface(&v6only, &json!([])).unwrap(), None);
        assert!(choose_interface(&json!({}), &json!([])).is_err());
    }

    fn link(index: u64, name: &str, addrs: &[(&str, u64, bool)]) -> Value {
        let infos: Vec<Value> = addrs
            .iter()
            .map(|&(a, p, secondary)| {
                let mut v =
                    json!({"family": "inet", "local": a, "prefixlen": p, "scope": "global"});
                if secondary {
                    v["secondary"] = json!(true);
                }
                v
            })
            .collect();
        json!({"ifindex": index, "ifname": name, "flags": ["BROADCAST"], "mtu": 1500,
            "link_type": "ether", "address": format!("02:00:00:00:00:{index:02x}"),
            "addr_info": infos})
    }

    #[test]
    fn two_interfaces_the_default_route_wins() {
        let addrs = json!([
            link(3, "eth0", &[("10.0.0.2", 24, false)]),
            link(4, "eth1", &[("10.1.0.2", 24, false)]),
            link(5, TAP_NAME, &[]),
        ]);
        let routes = json!([{"dst": "default", "gateway": "10.1.0.1", "dev": "eth1"}]);
        let i = choose_interface(&addrs, &routes).unwrap().unwrap();
        assert_eq!(i.name, "eth1");
        assert!(!i.up);
        assert_eq!(i.gateway, Some(Ipv4Addr::new(10, 1, 0, 1)));
        assert_eq!(
            i.notes,
            ["interface eth0 (10.0.0.2/24) not wired: the guest gets one interface (eth1)"]
        );
        // No default route: the first by index, no gateway.
        let i = choose_interface(&addrs, &json!([])).unwrap().unwrap();
        assert_eq!(i.name, "eth0");
        assert_eq!(i.gateway, None);
        assert_eq!(i.notes.len(), 1);
        assert!(i.notes[0].starts_with("interface eth1 (10.1.0.2/24) not wired"));
    }

    #[test]
    fn primary_address_secondary_and_off_link_gateway() {
        let addrs = json!([link(
            2,
            "eth0",
            &[("10.0.0.9", 24, true), ("10.0.0.2", 24, false)]
        )]);
        let routes = json!([{"dst": "default", "gateway": "169.254.1.1", "dev": "eth0"}]);
        let i = choose_interface(&addrs, &routes).unwrap().unwrap();
        assert_eq!(i.addr, Ipv4Addr::new(10, 0, 0, 2));
        assert_eq!(i.gateway, Some(Ipv4Addr::new(169, 254, 1, 1)));
        assert!(i.notes.iter().any(|n| n.contains("outside 10.0.0.2/24")));
        assert!(i
            .notes
            .iter()
            .any(|n| n.contains("further IPv4 address 10.0.0.9/24")));
    }

    #[test]
    fn bad_mac_is_an_error() {
        let mut l = link(2, "eth0", &[("10.0.0.2", 24, false)]);
        l["address"] = json!("nonsense");
        let e = choose_interface(&json!([l]), &json!([])).unwrap_err();
        assert!(e.to_string().starts_with("interface eth0: "), "{e}");
    }

    #[test]
    fn default_routes() {
        let routes = json!([
            {"dst": "default", "gateway": "10.0.0.1", "dev": "eth0", "metric": 100},
            {"dst": "10.0.0.0/24", "dev": "eth0", "protocol": "kernel", "scope": "link"},
            {"dst": "default", "dev": "wg0", "scope": "link"},
            {"dst": "default", "via": {"family": "inet6", "host": "fe80::1"}, "dev": "eth2"},
            {"dst": "default", "flags": [], "nexthops": [
                {"gateway": "10.1.0.1", "dev": "eth1", "weight": 1, "flags": []},
                {"gateway": "10.2.0.1", "dev": "eth2", "weight": 1, "flags": []}]}
        ]);
        assert_eq!(
            parse_default_routes(&routes),
            [
                ("eth0".to_string(), Ipv4Addr::new(10, 0, 0, 1)),
                ("eth1".to_string(), Ipv4Addr::new(10, 1, 0, 1)),
                ("eth2".to_string(), Ipv4Addr::new(10, 2, 0, 1)),
            ]
        );
        assert!(parse_default_routes(&json!(null)).is_empty());
    }

    /// `tc -j filter show dev v0 ingress` after wiring, from iproute2 6.1.
    const TC_FILTERS: &str = r#"[{"parent":"ffff:","protocol":"all","pref":49152,"kind":"u32","chain":0},{"parent":"ffff:","protocol":"all","pref":49152,"kind":"u32","chain":0,"options":{"fh":"800:","ht_divisor":1}},{"parent":"ffff:","protocol":"all","pref":49152,"kind":"u32","chain":0,"options":{"fh":"800::800","order":2048,"key_ht":"800","bkt":"0","not_in_hw":true,"match":{"value":"0","mask":"0","offmask":"","off":0},"actions":[{"order":1,"kind":"mirred","mirred_action":"redirect","direction":"egress","to_dev":"tap0_vmlab","control_action":{"type":"stolen"},"index":1,"ref":1,"bind":1}]}}]"#;

    #[test]
    fn tc_output() {
        assert_eq!(redirect_targets(&parse(TC_FILTERS)), ["tap0_vmlab"]);
        assert!(redirect_targets(&json!([])).is_empty());
        // The TAP deleted first: the action's device is gone.
        let dangling = TC_FILTERS.replace("\"to_dev\":\"tap0_vmlab\"", "\"to_dev\":\"*\"");
        assert_eq!(redirect_targets(&parse(&dangling)), ["*"]);
        assert!(is_ours("*", TAP_NAME) && is_ours(TAP_NAME, TAP_NAME));
        assert!(!is_ours("eth1", TAP_NAME));
        let qdiscs = parse(
            r#"[{"kind":"noqueue","handle":"0:","root":true,"refcnt":2,"options":{}},{"kind":"ingress","handle":"ffff:","parent":"ffff:fff1","options":{}}]"#,
        );
        assert!(qdiscs_have_ingress(&qdiscs));
        assert!(!qdiscs_have_ingress(&json!([{"kind": "noqueue"}])));
    }

    fn guest(gateway: Option<Ipv4Addr>, prefix: u8) -> GuestNet {
        GuestNet {
            tap: TAP_NAME.into(),
            mac: MacAddr([0x02, 0x42, 0xac, 0x11, 0x00, 0x02]),
            addr: Ipv4Addr::new(172, 17, 0, 2),
            prefix,
            gateway,
            mtu: 1500,
            veth: "eth0".into(),
        }
    }

    #[test]
    fn kernel_ip_parameter() {
        let g = guest(Some(Ipv4Addr::new(172, 17, 0, 1)), 16);
        assert_eq!(
            g.kernel_ip_param(Some("web-1")),
            "ip=172.17.0.2::172.17.0.1:255.255.0.0:web-1:eth0:off"
        );
        assert_eq!(
            g.kernel_ip_param(None),
            "ip=172.17.0.2::172.17.0.1:255.255.0.0::eth0:off"
        );
        // Hostnames the parameter cannot carry are left out.
        for bad in ["a:b", "a b", "a,b", "", &"x".repeat(65)] {
            assert_eq!(
                g.kernel_ip_param(Some(bad)),
                "ip=172.17.0.2::172.17.0.1:255.255.0.0::eth0:off",
                "{bad:?}"
            );
        }
        assert_eq!(
            guest(None, 24).kernel_ip_param(Some("h")),
            "ip=172.17.0.2:::255.255.255.0:h:eth0:off"
        );
        assert_eq!(netmask(0), Ipv4Addr::new(0, 0, 0, 0));
        assert_eq!(netmask(1), Ipv4Addr::new(128, 0, 0, 0));
        assert_eq!(netmask(30), Ipv4Addr::new(255, 255, 255, 252));
        assert_eq!(netmask(32), Ipv4Addr::new(255, 255, 255, 255));
        assert_eq!(netmask(33), Ipv4Addr::new(255, 255, 255, 255));
    }

    #[test]
    fn net_arg_is_what_parse_net_reads() {
        let g = guest(None, 24);
        assert_eq!(g.net_arg(), "tap=tap0_vmlab,mac=02:42:ac:11:00:02");
        let config = crate::cli::parse_net(&g.net_arg()).unwrap();
        assert_eq!(config.tap, TAP_NAME);
        assert_eq!(config.mac, Some(g.mac));
        crate::devices::tap::validate_name(TAP_NAME).unwrap();
    }

    #[test]
    fn command_errors_name_the_command() {
        let e = run_with_timeout(
            Path::new("/nonexistent/ip"),
            "ip",
            &["link"],
            COMMAND_TIMEOUT,
        )
        .unwrap_err();
        assert!(e.to_string().starts_with("`ip link`: cannot run"), "{e}");
        let e = run_with_timeout(
            Path::new("/bin/sh"),
            "sh",
            &["-c", "echo oops >&2; echo more >&2; exit 3"],
            COMMAND_TIMEOUT,
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "`sh -c echo oops >&2; echo more >&2; exit 3` failed (exit status: 3): oops; more"
        );
        let start = Instant::now();
        let e = run_with_timeout(
            Path::new("/bin/sh"),
            "sh",
            &["-c", "exec sleep 30"],
            Duration::from_millis(200),
        )
        .unwrap_err();
        assert!(e.to_string().contains("no answer within"), "{e}");
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn in_netns_of_a_missing_path() {
        let e = in_netns(Path::new("/nonexistent/netns"), || 1).unwrap_err();
        assert!(e
            .to_string()
            .starts_with("open network namespace /nonexistent/netns"));
    }
}
