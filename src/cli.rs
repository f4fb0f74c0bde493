//! The command line: `vmlab run ...`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::devices::virtio::BlockConfig;
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
        let Command::Run(args) = cli.command;
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
}
