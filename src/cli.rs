//! The command line: `vmlab run ...`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::devices::virtio::{BlockConfig, MacAddr, NetConfig};
use crate::host::QuirksMode;

/// vmlab: a micro-VM monitor on Linux KVM.
#[derive(Debug, Parser)]
#[command(name = "vmlab", version, about, long_about = None)]
pub struct Cli {
    /// More log output on stderr (-v: debug, -vv: trace).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Only warnings and errors on stderr.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot a micro-VM; with `-- COMMAND`, run COMMAND in it and exit with
    /// its status.
    Run(RunArgs),
    /// Run the same image as a container on the host, through an OCI
    /// runtime (runc or crun); with `-- COMMAND`, run COMMAND in it.
    Container(ContainerArgs),
    /// Run the image's workload program on the host, as a container and
    /// as a micro-VM, and report the numbers side by side with the claims
    /// they test.
    Compare(CompareArgs),
}

/// `vmlab compare`.
#[derive(Debug, Args)]
pub struct CompareArgs {
    /// The image, with vmlab-workload in its PATH (e.g.
    /// target/guest/sample-image).
    #[arg(long, value_name = "PATH")]
    pub image: PathBuf,
    /// Guest kernel (default: target/guest/vmlinux of the tree vmlab was
    /// built in).
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Launches per environment (medians and spread are over these).
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub repeat: u32,
    /// Write the report as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Write the report as Markdown to FILE (it is also printed).
    #[arg(long, value_name = "FILE")]
    pub markdown: Option<PathBuf>,
    /// Write an SVG bar chart of the ratios to FILE.
    #[arg(long, value_name = "FILE")]
    pub chart: Option<PathBuf>,
    /// Guest memory of the micro-VM.
    #[arg(long, short = 'm', value_name = "SIZE", default_value = "256M", value_parser = parse_size)]
    pub memory: u64,
    /// OCI runtime for the container (as for `vmlab container`).
    #[arg(long, value_name = "R", default_value = "auto")]
    pub runtime: String,
    /// CPU job: MiB to hash.
    #[arg(long, value_name = "N", default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=65536))]
    pub cpu_mib: u64,
    /// Memory job: MiB per copy (the guest needs twice this).
    #[arg(long, value_name = "N", default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=65536))]
    pub mem_mib: u64,
    /// Disk job: MiB to write and read.
    #[arg(long, value_name = "N", default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=65536))]
    pub disk_mib: u64,
    /// Network job: seconds of sending.
    #[arg(long, value_name = "S", default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=600))]
    pub net_seconds: u64,
    /// Do not measure the network (no namespaces are made).
    #[arg(long)]
    pub no_net: bool,
    /// Longest one launch may take, in seconds, before it is stopped.
    #[arg(long, value_name = "S", default_value_t = 1200, value_parser = clap::value_parser!(u64).range(10..=86400))]
    pub timeout: u64,
}

/// `vmlab container`.
#[derive(Debug, Args)]
pub struct ContainerArgs {
    /// The image: an OCI image layout, a `docker save` archive, or a root
    /// file-system directory.
    #[arg(long, value_name = "PATH")]
    pub image: PathBuf,
    /// OCI runtime: runc, crun, a path to one, or auto (the first of runc,
    /// crun that works on this host).
    #[arg(long, value_name = "R", default_value = "auto", value_parser = crate::container::RuntimeRequest::parse)]
    pub runtime: crate::container::RuntimeRequest,
    /// Memory limit (cgroup): a number of MiB, or with a unit: 512M, 2G.
    #[arg(long, short = 'm', value_name = "SIZE", value_parser = parse_size)]
    pub memory: Option<u64>,
    /// Container id and host name (default: vmlab-PID-N).
    #[arg(long, value_name = "NAME", value_parser = crate::container::parse_name)]
    pub name: Option<String>,
    /// Network: none (a namespace with only loopback) or host.
    #[arg(long, value_enum, default_value_t = crate::container::Network::None)]
    pub network: crate::container::Network,
    /// Join an existing network namespace (e.g. /run/netns/NAME) instead
    /// of a fresh one.
    #[arg(long, value_name = "PATH", conflicts_with = "network")]
    pub netns: Option<PathBuf>,
    /// The command to run in the container, after `--` (replaces the
    /// image's Cmd).
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

/// `vmlab run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Guest kernel: an ELF vmlinux or a bzImage.
    #[arg(long, value_name = "PATH")]
    pub kernel: PathBuf,
    /// Initial ramdisk (cpio, optionally compressed).
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// Boot a container image: an OCI image layout, a `docker save`
    /// archive, or a root file-system directory. It becomes an ext4 root
    /// disk (/dev/vda; cached, each run boots a throw-away copy), and the
    /// guest runs its Entrypoint/Cmd (or COMMAND) with its Env,
    /// WorkingDir and User, like `docker run`.
    #[arg(long, value_name = "PATH", conflicts_with = "initrd")]
    pub image: Option<PathBuf>,
    /// Extra kernel command-line options, appended after vmlab's own.
    #[arg(long, value_name = "STR")]
    pub cmdline: Option<String>,
    /// Guest memory: a number of MiB, or with a unit: 512M, 2G, 1536MiB.
    /// 128 MiB by default, like QEMU and Firecracker: the guest kernel's
    /// memory initialisation grows with it (docs/BOOT.md).
    #[arg(long, short = 'm', value_name = "SIZE", default_value = "128M", value_parser = parse_size)]
    pub memory: u64,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = parse_cpus)]
    pub cpus: u8,
    /// A virtio-blk disk backed by a raw image: `path=FILE[,readonly=on][,id=NAME]`.
    /// Repeatable; the first is /dev/vda, and without --initrd it is the
    /// root filesystem.
    #[arg(long, value_name = "SPEC", value_parser = parse_disk)]
    pub disk: Vec<BlockConfig>,
    /// A virtio-net interface on a host TAP device: `tap=NAME[,mac=MAC]`.
    /// Repeatable (eth0, eth1, ... in order). vmlab creates the TAP if it
    /// does not exist and it may (CAP_NET_ADMIN); the default MAC is a
    /// random locally administered one. Configure the guest side with
    /// `--cmdline ip=ADDR::GATEWAY:NETMASK::eth0:off`.
    #[arg(long, value_name = "SPEC", value_parser = parse_net)]
    pub net: Vec<NetConfig>,
    /// Print the time from vmlab's start to the first KVM_RUN and to the
    /// guest init being up (stderr).
    #[arg(long)]
    pub boot_time: bool,
    /// Print VM-exit statistics at exit (stderr).
    #[arg(long)]
    pub stats: bool,
    /// Sample where the guest runs (its RIP, 100 times a second per vCPU)
    /// and write the samples to FILE; `scripts/guest-profile.py` maps them
    /// onto the kernel's functions.
    #[arg(long, value_name = "FILE")]
    pub profile_guest: Option<PathBuf>,
    /// Host workarounds: detect the host (auto), force the nested-PVM ones
    /// (pvm), or apply none (none).
    #[arg(long, value_enum, default_value_t = QuirksMode::Auto)]
    pub host_quirks: QuirksMode,
    /// The command to run in the guest, after `--`.
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

/// Parses a memory size: plain numbers are MiB; K, M, G, T (optionally
/// followed by `iB` or `B`) are binary units.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits_end);
    if num.is_empty() {
        return Err(format!("'{s}' is not a size (examples: 256, 512M, 2G)"));
    }
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a size (examples: 256, 512M, 2G)"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "m" | "mb" | "mib" => 20,
        "k" | "kb" | "kib" => 10,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(format!("'{s}': unknown unit '{unit}' (use K, M, G or T)")),
    };
    if n == 0 {
        return Err("the size must be greater than zero".into());
    }
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("'{s}' is too large"))
}

/// Parses `path=FILE[,readonly=on|off][,id=NAME]` (a bare FILE is a path).
pub fn parse_disk(s: &str) -> Result<BlockConfig, String> {
    let mut path = None;
    let mut readonly = false;
    let mut id = None;
    for (i, part) in s.split(',').enumerate() {
        let (key, value) = match part.split_once('=') {
            Some(kv) => kv,
            None if i == 0 => ("path", part),
            None => return Err(format!("'{part}' in --disk {s}: expected key=value")),
        };
        match key {
            "path" if !value.is_empty() => path = Some(PathBuf::from(value)),
            "readonly" | "ro" => {
                readonly = match value {
                    "on" | "true" | "yes" | "1" => true,
                    "off" | "false" | "no" | "0" => false,
                    _ => return Err(format!("readonly={value}: use on or off")),
                }
            }
            "id" | "serial" => {
                if value.len() > 20 {
                    return Err(format!("id={value}: at most 20 bytes"));
                }
                id = Some(value.to_string());
            }
            _ => {
                return Err(format!(
                    "unknown --disk option '{key}' (path, readonly, id)"
                ))
            }
        }
    }
    let path = path.ok_or_else(|| format!("--disk {s}: path=FILE is required"))?;
    Ok(BlockConfig { path, readonly, id })
}

/// Parses `tap=NAME[,mac=MAC]` (a bare NAME is the TAP).
pub fn parse_net(s: &str) -> Result<NetConfig, String> {
    let mut tap = None;
    let mut mac = None;
    for (i, part) in s.split(',').enumerate() {
        let (key, value) = match part.split_once('=') {
            Some(kv) => kv,
            None if i == 0 && !part.is_empty() => ("tap", part),
            None => return Err(format!("'{part}' in --net {s}: expected key=value")),
        };
        match key {
            "tap" | "ifname" => {
                crate::devices::tap::validate_name(value).map_err(|e| e.to_string())?;
                tap = Some(value.to_string());
            }
            "mac" => mac = Some(value.parse::<MacAddr>()?),
            _ => return Err(format!("unknown --net option '{key}' (tap, mac)")),
        }
    }
    let tap = tap.ok_or_else(|| format!("--net {s}: tap=NAME is required"))?;
    Ok(NetConfig { tap, mac })
}

fn parse_cpus(s: &str) -> Result<u8, String> {
    let n: u32 = s
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a number of vCPUs"))?;
    if n == 0 {
        return Err("a VM needs at least one vCPU".into());
    }
    let max = crate::arch::mptable::MAX_CPUS;
    u8::try_from(n)
        .ok()
        .filter(|n| *n <= max)
        .ok_or_else(|| format!("vmlab runs at most {max} vCPUs"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("256"), Ok(256 << 20));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("1536MiB"), Ok(1536 << 20));
        assert_eq!(parse_size("65536k"), Ok(64 << 20));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert!(parse_size("").is_err());
        assert!(parse_size("lots").is_err());
        assert!(parse_size("12X").is_err());
        assert!(parse_size("-5M").is_err());
        assert!(parse_size("0").is_err());
        assert!(parse_size("99999999999999999999G").is_err());
        assert!(parse_size("18446744073709551615T").is_err());
    }

    #[test]
    fn disks() {
        let d = parse_disk("path=/img,readonly=on,id=data").unwrap();
        assert_eq!(d.path, PathBuf::from("/img"));
        assert!(d.readonly);
        assert_eq!(d.id.as_deref(), Some("data"));
        let d = parse_disk("/img").unwrap();
        assert!(!d.readonly && d.id.is_none());
        assert!(parse_disk("readonly=on").unwrap_err().contains("path=FILE"));
        assert!(parse_disk("path=/a,readonly=maybe").is_err());
        assert!(parse_disk("path=/a,color=red")
            .unwrap_err()
            .contains("unknown"));
        assert!(parse_disk("path=/a,id=123456789012345678901").is_err());
        assert!(parse_disk("path=/a,junk").is_err());
        assert!(parse_disk("path=").is_err());
    }

    #[test]
    // `Command` has one variant in some builds (no `container`).
    #[allow(irrefutable_let_patterns)]
    fn nets() {
        let n = parse_net("tap=t0,mac=02:00:00:aa:bb:cc").unwrap();
        assert_eq!(n.tap, "t0");
        assert_eq!(n.mac.unwrap().0, [2, 0, 0, 0xaa, 0xbb, 0xcc]);
        let n = parse_net("vmtap1").unwrap();
        assert_eq!((n.tap.as_str(), n.mac), ("vmtap1", None));
        assert!(parse_net("mac=02:00:00:aa:bb:cc")
            .unwrap_err()
            .contains("tap=NAME is required"));
        assert!(parse_net("").is_err());
        assert!(parse_net("tap=t0,mac=zz:00:00:aa:bb:cc")
            .unwrap_err()
            .contains("not a MAC address"));
        assert!(parse_net("tap=t0,mac=02:00:00:aa:bb")
            .unwrap_err()
            .contains("not a MAC address"));
        assert!(parse_net("tap=t0,mac=01:00:5e:00:00:01")
            .unwrap_err()
            .contains("multicast"));
        assert!(parse_net("tap=t0,color=red")
            .unwrap_err()
            .contains("unknown --net option"));
        assert!(parse_net("tap=t0,junk").is_err());
        assert!(parse_net("tap=")
            .unwrap_err()
            .contains("not a valid interface name"));
        assert!(parse_net("tap=much-too-long-name").is_err());
        let cli = Cli::try_parse_from([
            "vmlab",
            "run",
            "--kernel",
            "k",
            "--net",
            "tap=a",
            "--net",
            "tap=b,mac=02:00:00:00:00:02",
        ])
        .unwrap();
        let Command::Run(args) = cli.command else {
            panic!("not run")
        };
        assert_eq!(args.net.len(), 2);
        assert_eq!(args.net[1].tap, "b");
    }

    #[test]
    fn cpus() {
        assert_eq!(parse_cpus("2"), Ok(2));
        assert!(parse_cpus("0").unwrap_err().contains("at least one"));
        assert!(parse_cpus("33").is_err());
        assert!(parse_cpus("two").is_err());
        assert!(parse_cpus("4294967296").is_err());
    }

    #[test]
    fn run_with_command() {
        let cli = Cli::try_parse_from([
            "vmlab", "run", "--kernel", "k", "--cpus", "2", "--", "sh", "-c", "exit 3",
        ])
        .unwrap();
        let Command::Run(args) = cli.command else {
            panic!("not run")
        };
        assert_eq!(args.cpus, 2);
        assert_eq!(args.memory, 128 << 20);
        assert_eq!(args.command, vec!["sh", "-c", "exit 3"]);
    }

    #[test]
    fn kernel_is_required_and_cli_is_consistent() {
        assert!(Cli::try_parse_from(["vmlab", "run"]).is_err());
        assert!(Cli::try_parse_from(["vmlab", "run", "--kernel", "k", "--memory", "x"]).is_err());
        Cli::command().debug_assert();
    }

    #[test]
    fn run_image() {
        let cli = Cli::try_parse_from([
            "vmlab", "run", "--kernel", "k", "--image", "img", "--disk", "d", "--", "id",
        ])
        .unwrap();
        let Command::Run(args) = cli.command else {
            panic!("not run")
        };
        assert_eq!(args.image, Some(PathBuf::from("img")));
        assert_eq!(args.command, vec!["id"]);
        assert_eq!(args.disk.len(), 1);
        let e = Cli::try_parse_from([
            "vmlab", "run", "--kernel", "k", "--image", "img", "--initrd", "i",
        ])
        .unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::ArgumentConflict);
    }

    #[test]
    fn container_with_command() {
        use crate::container::{Network, RuntimeRequest};
        let argv = "vmlab container --image img --runtime crun -m 64M -- sh -c";
        let argv = argv.split(' ').chain(["exit 4"]);
        let cli = Cli::try_parse_from(argv).unwrap();
        let Command::Container(args) = cli.command else {
            panic!("not container")
        };
        assert_eq!(args.runtime, RuntimeRequest::Named("crun".into()));
        assert_eq!(args.memory, Some(64 << 20));
        assert_eq!(args.network, Network::None);
        assert_eq!(args.command, vec!["sh", "-c", "exit 4"]);
        let cli = Cli::try_parse_from(["vmlab", "container", "--image", "img"]).unwrap();
        let Command::Container(args) = cli.command else {
            panic!("not container")
        };
        assert_eq!(args.runtime, RuntimeRequest::Auto);
        assert!(args.memory.is_none() && args.name.is_none());
        assert!(Cli::try_parse_from(["vmlab", "container"]).is_err());
        let bad_name = ["vmlab", "container", "--image", "i", "--name", "a/b"];
        assert!(Cli::try_parse_from(bad_name).is_err());
        let argv = "vmlab container --image i --netns /run/netns/x".split(' ');
        let Command::Container(args) = Cli::try_parse_from(argv).unwrap().command else {
            panic!("not container")
        };
        assert_eq!(args.netns, Some(PathBuf::from("/run/netns/x")));
        let both = "vmlab container --image i --netns /x --network host".split(' ');
        assert!(Cli::try_parse_from(both).is_err());
    }

    #[test]
    fn compare_args() {
        let argv = "vmlab compare --image img --repeat 2 --json r.json --no-net --cpu-mib 4";
        let Command::Compare(a) = Cli::try_parse_from(argv.split(' ')).unwrap().command else {
            panic!("not compare")
        };
        assert_eq!((a.repeat, a.cpu_mib, a.mem_mib, a.disk_mib), (2, 4, 16, 8));
        assert!(a.no_net && a.kernel.is_none() && a.markdown.is_none());
        assert_eq!(a.json, Some(PathBuf::from("r.json")));
        assert_eq!(a.memory, 256 << 20);
        assert_eq!(a.runtime, "auto");
        assert!(Cli::try_parse_from(["vmlab", "compare"]).is_err());
        for bad in [["--repeat", "0"], ["--repeat", "x"], ["--timeout", "1"]] {
            let argv = ["vmlab", "compare", "--image", "i", bad[0], bad[1]];
            assert!(Cli::try_parse_from(argv).is_err(), "{bad:?}");
        }
    }
}
