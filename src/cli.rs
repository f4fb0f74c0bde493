//! The command line: `vmlab run ...`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::devices::virtio::{BlockConfig, MacAddr, NetConfig};
use crate::host::QuirksMode;
use crate::raw::CpuMode;
use crate::vsock::VsockConfig;

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
    /// Where named VMs keep their state (default: $VMLAB_STATE_DIR, else
    /// /run/vmlab).
    #[arg(long, global = true, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
// `Run` is much the largest; a command line is parsed once, so boxing it
// would save nothing worth the churn at every match.
#[allow(clippy::large_enum_variant)]
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
    /// Run a command in a running named VM, through its guest agent; exit
    /// with the command's status (126: cannot run, 127: not found).
    Exec(ExecArgs),
    /// List the running named VMs.
    Ps,
    /// Print a named VM's console output.
    Logs(LogsArgs),
    /// Send a signal to a named VM's main process (default: KILL).
    Kill(KillArgs),
    /// Stop a named VM: SIGTERM to its main process, then a guest
    /// power-off, then the VMM is killed.
    Stop(StopArgs),
    /// Remove named VMs' state (a running one only with -f, which kills it).
    Rm(RmArgs),
    /// Read an exit trace written by `vmlab run --trace-exits`.
    #[command(subcommand)]
    Trace(TraceCommand),
}

/// `vmlab exec`.
#[derive(Debug, Args)]
pub struct ExecArgs {
    /// Forward stdin to the command (without it, the command's stdin is at
    /// EOF from the start).
    #[arg(short, long)]
    pub interactive: bool,
    /// Run the command on a terminal in the guest, of the host terminal's
    /// size (the host terminal goes into raw mode while it runs).
    #[arg(short, long)]
    pub tty: bool,
    /// Set an environment variable (repeatable).
    #[arg(short, long = "env", value_name = "K=V", value_parser = parse_env)]
    pub env: Vec<String>,
    /// Working directory in the guest (default: /).
    #[arg(short, long, value_name = "DIR")]
    pub workdir: Option<String>,
    /// User to run as: UID[:GID] or NAME[:GROUP] (default: root).
    #[arg(short, long, value_name = "USER")]
    pub user: Option<String>,
    /// The VM.
    #[arg(value_name = "NAME")]
    pub name: String,
    /// The command and its arguments.
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "COMMAND"
    )]
    pub command: Vec<String>,
}

/// `vmlab logs`.
#[derive(Debug, Args)]
pub struct LogsArgs {
    /// Keep printing new output until the VM stops.
    #[arg(short, long)]
    pub follow: bool,
    /// The VM.
    #[arg(value_name = "NAME")]
    pub name: String,
}

/// `vmlab kill`.
#[derive(Debug, Args)]
pub struct KillArgs {
    /// The VM.
    #[arg(value_name = "NAME")]
    pub name: String,
    /// The signal: a name (KILL, SIGTERM, usr1) or a number.
    #[arg(value_name = "SIGNAL", default_value = "KILL", value_parser = parse_signal)]
    pub signal: u8,
}

/// `vmlab stop`.
#[derive(Debug, Args)]
pub struct StopArgs {
    /// The VM.
    #[arg(value_name = "NAME")]
    pub name: String,
    /// Seconds the main process gets to exit after SIGTERM.
    #[arg(long, short = 't', value_name = "S", default_value_t = 10, value_parser = clap::value_parser!(u64).range(0..=3600))]
    pub timeout: u64,
}

/// `vmlab rm`.
#[derive(Debug, Args)]
pub struct RmArgs {
    /// Kill a running VM first.
    #[arg(short, long)]
    pub force: bool,
    /// The VMs.
    #[arg(value_name = "NAME", required = true)]
    pub names: Vec<String>,
}

/// Parses `K=V` for `exec -e`.
pub fn parse_env(s: &str) -> Result<String, String> {
    match s.split_once('=') {
        Some((k, _)) if !k.is_empty() && !s.contains('\0') => Ok(s.to_string()),
        _ => Err(format!("'{s}' is not KEY=VALUE")),
    }
}

/// Parses `--workdir`: an absolute path without NUL bytes.
pub fn parse_workdir(s: &str) -> Result<String, String> {
    if s.contains('\0') {
        return Err("the working directory contains a NUL byte".into());
    }
    if !s.starts_with('/') {
        return Err(format!("the working directory '{s}' is not absolute"));
    }
    Ok(s.to_string())
}

/// Parses `--user`: `UID[:GID]` or `NAME[:GROUP]`, no part empty.
pub fn parse_user(s: &str) -> Result<String, String> {
    let bad = |why: &str| Err(format!("'{s}' is not UID[:GID] or NAME[:GROUP] ({why})"));
    if s.contains('\0') || s.contains('\n') {
        return bad("a NUL byte or a newline");
    }
    let (user, group) = match s.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (s, None),
    };
    if user.is_empty() || group.is_some_and(str::is_empty) {
        return bad("an empty part");
    }
    if group.is_some_and(|g| g.contains(':')) {
        return bad("more than one ':'");
    }
    for id in std::iter::once(user).chain(group) {
        if id.bytes().all(|b| b.is_ascii_digit()) && id.parse::<u32>().is_err() {
            return bad("an id out of range");
        }
    }
    Ok(s.to_string())
}

/// The longest host name Linux takes (`__NEW_UTS_LEN`).
pub const MAX_HOSTNAME: usize = 64;

/// Parses `--hostname`: 1 to 64 bytes, no NUL.
pub fn parse_hostname(s: &str) -> Result<String, String> {
    if s.is_empty() {
        return Err("the host name is empty".into());
    }
    if s.contains('\0') {
        return Err("the host name contains a NUL byte".into());
    }
    if s.len() > MAX_HOSTNAME {
        return Err(format!(
            "the host name is {} bytes long; Linux takes at most {MAX_HOSTNAME}",
            s.len()
        ));
    }
    Ok(s.to_string())
}

/// The mount-flag words of `--tmpfs` options (the rest go to tmpfs).
pub const TMPFS_FLAGS: &[&str] = &[
    "ro",
    "rw",
    "exec",
    "noexec",
    "suid",
    "nosuid",
    "dev",
    "nodev",
    "sync",
    "async",
    "atime",
    "noatime",
    "diratime",
    "nodiratime",
    "relatime",
    "norelatime",
    "strictatime",
    "nostrictatime",
];

/// Parses `--tmpfs PATH[:OPTIONS]` (Docker's syntax).
pub fn parse_tmpfs(s: &str) -> Result<crate::cmdline::GuestTmpfs, String> {
    if s.contains('\0') {
        return Err(format!("--tmpfs {s:?}: contains a NUL byte"));
    }
    let (path, options) = s.split_once(':').unwrap_or((s, ""));
    let path = crate::volumes::parse_volume(&format!("/:{path}"))
        .map_err(|e| e.replace("--volume /:", "--tmpfs "))?
        .guest;
    for opt in options.split(',').filter(|o| !o.is_empty()) {
        match opt.split_once('=') {
            Some((key, _)) if !key.is_empty() => {}
            None if TMPFS_FLAGS.contains(&opt) => {}
            _ => {
                return Err(format!(
                    "--tmpfs {s}: unknown option '{opt}' (KEY=VALUE for tmpfs, or one of {})",
                    TMPFS_FLAGS.join(", ")
                ))
            }
        }
    }
    Ok(crate::cmdline::GuestTmpfs {
        path,
        options: options.to_string(),
    })
}

/// The signals `vmlab kill` and `vmlab-runtime kill` know by name, with
/// their x86-64 numbers.
const SIGNALS: &[(&str, i32)] = &[
    ("HUP", libc::SIGHUP),
    ("INT", libc::SIGINT),
    ("QUIT", libc::SIGQUIT),
    ("ILL", libc::SIGILL),
    ("TRAP", libc::SIGTRAP),
    ("ABRT", libc::SIGABRT),
    ("IOT", libc::SIGIOT),
    ("BUS", libc::SIGBUS),
    ("FPE", libc::SIGFPE),
    ("KILL", libc::SIGKILL),
    ("USR1", libc::SIGUSR1),
    ("SEGV", libc::SIGSEGV),
    ("USR2", libc::SIGUSR2),
    ("PIPE", libc::SIGPIPE),
    ("ALRM", libc::SIGALRM),
    ("TERM", libc::SIGTERM),
    ("STKFLT", libc::SIGSTKFLT),
    ("CHLD", libc::SIGCHLD),
    ("CONT", libc::SIGCONT),
    ("STOP", libc::SIGSTOP),
    ("TSTP", libc::SIGTSTP),
    ("TTIN", libc::SIGTTIN),
    ("TTOU", libc::SIGTTOU),
    ("URG", libc::SIGURG),
    ("XCPU", libc::SIGXCPU),
    ("XFSZ", libc::SIGXFSZ),
    ("VTALRM", libc::SIGVTALRM),
    ("PROF", libc::SIGPROF),
    ("WINCH", libc::SIGWINCH),
    ("IO", libc::SIGIO),
    ("POLL", libc::SIGPOLL),
    ("PWR", libc::SIGPWR),
    ("SYS", libc::SIGSYS),
];

/// Parses a signal: `KILL`, `SIGKILL`, `kill` or `9` (1 to 64).
pub fn parse_signal(s: &str) -> Result<u8, String> {
    if let Ok(n) = s.parse::<u8>() {
        return match n {
            1..=64 => Ok(n),
            _ => Err(format!("signal {n} is out of range (1 to 64)")),
        };
    }
    let up = s.to_ascii_uppercase();
    let name = up.strip_prefix("SIG").unwrap_or(&up);
    SIGNALS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, v)| *v as u8)
        .ok_or_else(|| format!("unknown signal '{s}'"))
}

/// `vmlab trace`.
#[derive(Debug, Subcommand)]
pub enum TraceCommand {
    /// Summarize a trace: exits by reason, by port or address, by vCPU,
    /// with handling times; optionally draw its timeline as SVG.
    Report(TraceReportArgs),
}

/// `vmlab trace report`.
#[derive(Debug, Args)]
pub struct TraceReportArgs {
    /// The trace file (JSON lines).
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
    /// Also write an SVG timeline of the exits per vCPU to OUT.
    #[arg(long, value_name = "OUT")]
    pub svg: Option<PathBuf>,
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
#[command(group = clap::ArgGroup::new("background").args(["detach", "agent"]))]
pub struct RunArgs {
    /// Guest kernel: an ELF vmlinux or a bzImage.
    #[arg(long, value_name = "PATH", required_unless_present = "raw")]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk (cpio, optionally compressed).
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// Boot a flat binary instead of Linux (teaching guests, docs/LABS.md):
    /// loaded at 0x1000 for --mode real, at 1 MiB for --mode long.
    #[arg(long, value_name = "IMAGE", conflicts_with_all = ["kernel", "initrd", "image", "cmdline", "command"])]
    pub raw: Option<PathBuf>,
    /// With --raw: the guest-physical entry point (default: the load
    /// address); must lie inside the image. Hex with 0x, or decimal.
    #[arg(long, value_name = "ADDR", requires = "raw", value_parser = parse_addr)]
    pub entry: Option<u64>,
    /// With --raw: start the vCPU in real mode (CS:IP = 0:entry, as a boot
    /// sector) or in 64-bit long mode (first GiB identity-mapped).
    #[arg(long, value_enum, requires = "raw")]
    pub mode: Option<CpuMode>,
    /// Write every VM exit to user space to FILE, one JSON line each
    /// (`vmlab trace report FILE` reads it back).
    #[arg(long, value_name = "FILE")]
    pub trace_exits: Option<PathBuf>,
    /// Size limit of the --trace-exits file (units as for --memory;
    /// default 256M); the trace then ends with a note.
    #[arg(long, value_name = "SIZE", requires = "trace_exits", value_parser = parse_size)]
    pub trace_limit: Option<u64>,
    /// Boot a container image: an OCI image layout, a `docker save`
    /// archive, or a root file-system directory. It becomes an ext4 root
    /// disk (/dev/vda; cached, each run boots a throw-away copy), and the
    /// guest runs its Entrypoint/Cmd (or COMMAND) with its Env,
    /// WorkingDir and User, like `docker run`.
    #[arg(long, value_name = "PATH", conflicts_with = "initrd")]
    pub image: Option<PathBuf>,
    /// With --image: how the image's root file system reaches the guest.
    /// `block` (the default): a per-run copy of the image's cached ext4
    /// disk as /dev/vda (what `vmlab compare` measures block I/O on);
    /// `fs`: the cached unpacked image shared read-only over virtio-fs
    /// with a tmpfs layer in the guest for the run's writes (nothing is
    /// copied: a 300 MB image starts as fast as a 3 MB one).
    #[arg(
        long,
        value_enum,
        value_name = "KIND",
        requires = "image",
        default_value = "block"
    )]
    pub root_device: RootDevice,
    /// Boot with the host directory DIR as the guest's root file system,
    /// shared over virtio-fs (no image, no disk): the kernel starts from
    /// a small initramfs holding only vmlab's init, which mounts the
    /// share and switches root to it, then runs COMMAND (required). The
    /// directory should hold /dev, /proc, /sys, /tmp and /run (created
    /// if missing, unless the root is read-only).
    #[arg(
        long,
        value_name = "DIR",
        conflicts_with_all = ["image", "initrd", "raw"],
        requires = "command"
    )]
    pub rootfs: Option<PathBuf>,
    /// With --rootfs: `rw` (the default) mounts DIR read-write as the
    /// root, so the guest's writes land in DIR; `ro` mounts it read-only;
    /// `overlay` mounts it read-only with a per-run tmpfs layer over it
    /// for the guest's writes (DIR is not changed).
    #[arg(
        long,
        value_enum,
        value_name = "MODE",
        requires = "rootfs",
        default_value = "rw"
    )]
    pub rootfs_mode: crate::cmdline::RootMode,
    /// Set an environment variable of the command (repeatable). With
    /// --image, added after the image's Env (so it wins).
    #[arg(short, long = "env", value_name = "K=V", value_parser = parse_env)]
    pub env: Vec<String>,
    /// The command's working directory (absolute; created if missing).
    /// With --image, replaces the image's WorkingDir.
    #[arg(short, long, value_name = "DIR", value_parser = parse_workdir)]
    pub workdir: Option<String>,
    /// The user the command runs as: UID[:GID] or NAME[:GROUP] (names
    /// from the guest's /etc/passwd and /etc/group). With --image,
    /// replaces the image's User.
    #[arg(short, long, value_name = "USER", value_parser = parse_user)]
    pub user: Option<String>,
    /// The guest's host name (1 to 64 bytes; default: vmlab), set before
    /// the command starts; also its HOSTNAME.
    #[arg(long, value_name = "NAME", value_parser = parse_hostname)]
    pub hostname: Option<String>,
    /// Mount a tmpfs at PATH in the guest (created if missing), after the
    /// root and the volumes: Docker's `PATH[:OPTIONS]`, e.g.
    /// `/run:size=64m,mode=755`. Repeatable. OPTIONS are tmpfs's
    /// (size, mode, uid, gid, nr_inodes, ...) and the mount flags ro, rw,
    /// exec, noexec, suid, nosuid, dev, nodev, ...; by default
    /// `nosuid,nodev,noexec`, as Docker's.
    #[arg(long, value_name = "PATH[:OPTIONS]", value_parser = parse_tmpfs)]
    pub tmpfs: Vec<crate::cmdline::GuestTmpfs>,
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
    /// A virtio-vsock device: `cid=N,socket=PATH` (CID 3 to 4294967294).
    /// vmlab listens on the Unix socket PATH: a host program connects,
    /// writes `CONNECT <port>\n` and gets `OK <local port>\n` once the
    /// guest accepts (closed if it refuses); a guest connection to host
    /// port P goes to the Unix socket PATH_P. The guest agent (docs/AGENT.md)
    /// listens on port 1024. A named VM (--name, --detach) always has one,
    /// CID 3 unless given, its socket in the state directory (leave
    /// socket= out).
    #[arg(long, value_name = "SPEC", value_parser = parse_vsock)]
    pub vsock: Option<VsockArg>,
    /// Share a host directory with the guest over virtio-fs:
    /// `HOST_DIR:GUEST_PATH[:ro]`. Repeatable. vmlab starts one virtiofsd
    /// per volume (scripts/build-virtiofsd.sh installs it) and the guest
    /// init mounts it at GUEST_PATH before the command starts; `:ro`
    /// refuses the guest's writes. HOST may also be a regular file
    /// (`/etc/resolv.conf:/etc/resolv.conf:ro`): it is hard-linked into a
    /// private directory of the run (one share for all such files, one
    /// more for the `:ro` ones; a copy if the link fails, whose writes do
    /// not reach the host) and bind-mounted onto GUEST_PATH (an empty file
    /// is created there if missing).
    #[arg(long, value_name = "HOST:GUEST[:ro]", value_parser = crate::volumes::parse_volume)]
    pub volume: Vec<crate::volumes::VolumeArg>,
    /// Attach an already running vhost-user-fs daemon:
    /// `tag=TAG,socket=PATH[,path=GUEST_PATH]`. Repeatable. With path=,
    /// the guest init mounts it there; without, the guest mounts it
    /// itself (`mount -t virtiofs TAG DIR`).
    #[arg(long, value_name = "SPEC", value_parser = parse_fs)]
    pub fs: Vec<FsArg>,
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
    /// Name the VM (for exec, ps, logs, kill, stop, rm): 1 to 64 of
    /// A-Z a-z 0-9 _ . -, starting with a letter or digit.
    #[arg(long, value_name = "NAME", value_parser = crate::named::parse_name)]
    pub name: Option<String>,
    /// Run the VM in the background: print its name once its guest agent
    /// answers, and return. The console goes to its log (`vmlab logs`).
    /// Without --name the name is vm-PID.
    #[arg(long, short = 'd')]
    pub detach: bool,
    /// Run COMMAND through the guest agent rather than as the guest's
    /// main process: its stdout and stderr reach vmlab's stdout and stderr
    /// apart, stdin is forwarded, and vmlab exits with its status. The VM
    /// is a named one while it runs (console in its log); it is stopped
    /// when COMMAND ends.
    #[arg(long, conflicts_with_all = ["detach", "raw", "image"], requires = "command")]
    pub agent: bool,
    /// With --detach or --agent: how long to wait for the guest agent, in
    /// seconds.
    #[arg(long, value_name = "S", default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..=3600), requires = "background")]
    pub ready_timeout: u64,
    /// The command to run in the guest, after `--`.
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

/// Parses a guest-physical address: `0x...` hex or decimal.
pub fn parse_addr(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let parsed = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => t.parse(),
    };
    parsed.map_err(|_| format!("'{s}' is not an address (examples: 0x1000, 4096)"))
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

/// `--vsock` as given: the socket may be left out where something else
/// (a state directory) provides it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockArg {
    /// The guest's CID (checked: 3 to `u32::MAX - 1`).
    pub cid: u64,
    /// The host socket, if given.
    pub socket: Option<PathBuf>,
}

impl VsockArg {
    /// The device configuration; the socket is required.
    pub fn into_config(self) -> Result<VsockConfig, String> {
        let socket = self
            .socket
            .ok_or_else(|| format!("--vsock cid={}: socket=PATH is required", self.cid))?;
        Ok(VsockConfig {
            cid: self.cid,
            socket,
        })
    }
}

/// `--root-device`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RootDevice {
    /// A per-run copy of the image's ext4 disk.
    Block,
    /// The unpacked image over virtio-fs.
    Fs,
}

/// `--fs`: a running vhost-user-fs backend, and where the guest mounts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsArg {
    /// The device.
    pub config: crate::devices::virtio::fs::FsConfig,
    /// Where the guest init mounts it, if anywhere.
    pub path: Option<String>,
}

/// Parses `tag=TAG,socket=PATH[,path=GUEST_PATH]`.
pub fn parse_fs(s: &str) -> Result<FsArg, String> {
    let (mut tag, mut socket, mut path) = (None, None, None);
    for part in s.split(',') {
        let Some((key, value)) = part.split_once('=') else {
            return Err(format!("'{part}' in --fs {s}: expected key=value"));
        };
        match key {
            "tag" => {
                crate::devices::virtio::fs::validate_tag(value)?;
                tag = Some(value.to_string());
            }
            "socket" if !value.is_empty() => socket = Some(PathBuf::from(value)),
            "socket" => return Err("--fs socket=: the path is empty".into()),
            "path" => {
                let v = crate::volumes::parse_volume(&format!("/:{value}"))
                    .map_err(|e| e.replace("--volume /:", "--fs path="))?;
                path = Some(v.guest);
            }
            _ => return Err(format!("unknown --fs option '{key}' (tag, socket, path)")),
        }
    }
    let tag = tag.ok_or_else(|| format!("--fs {s}: tag=TAG is required"))?;
    let socket = socket.ok_or_else(|| format!("--fs {s}: socket=PATH is required"))?;
    Ok(FsArg {
        config: crate::devices::virtio::fs::FsConfig { tag, socket },
        path,
    })
}

/// Parses `cid=N[,socket=PATH]`.
pub fn parse_vsock(s: &str) -> Result<VsockArg, String> {
    let mut cid = None;
    let mut socket = None;
    for part in s.split(',') {
        let Some((key, value)) = part.split_once('=') else {
            return Err(format!("'{part}' in --vsock {s}: expected key=value"));
        };
        match key {
            "cid" => {
                let n: u64 = value
                    .parse()
                    .map_err(|_| format!("cid={value}: not a number (a guest CID is 3 or more)"))?;
                crate::vsock::validate_cid(n)?;
                cid = Some(n);
            }
            "socket" | "path" | "uds_path" if !value.is_empty() => {
                socket = Some(PathBuf::from(value))
            }
            "socket" | "path" | "uds_path" => return Err("socket=: the path is empty".into()),
            _ => return Err(format!("unknown --vsock option '{key}' (cid, socket)")),
        }
    }
    let cid = cid.ok_or_else(|| format!("--vsock {s}: cid=N is required"))?;
    Ok(VsockArg { cid, socket })
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
    fn vsock() {
        let v = parse_vsock("cid=3,socket=/tmp/v.sock").unwrap();
        assert_eq!(v.cid, 3);
        assert_eq!(
            v.clone().into_config().unwrap().socket,
            PathBuf::from("/tmp/v.sock")
        );
        let v = parse_vsock("cid=4294967294").unwrap();
        assert_eq!(v.socket, None);
        assert!(v
            .into_config()
            .unwrap_err()
            .contains("socket=PATH is required"));
        for (bad, why) in [
            ("cid=2", "reserved"),
            ("cid=0", "reserved"),
            ("cid=4294967295", "too large"),
            ("cid=99999999999999999999", "not a number"),
            ("cid=abc", "not a number"),
            ("cid=-3", "not a number"),
            ("socket=/x", "cid=N is required"),
            ("cid=3,socket=", "empty"),
            ("cid=3,color=red", "unknown --vsock option"),
            ("3", "expected key=value"),
        ] {
            let e = parse_vsock(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
        let argv = "vmlab run --kernel k --vsock cid=7,socket=/s";
        let Command::Run(args) = Cli::try_parse_from(argv.split(' ')).unwrap().command else {
            panic!("not run")
        };
        assert_eq!(args.vsock.map(|v| v.cid), Some(7));
    }

    #[test]
    fn cpus() {
        assert_eq!(parse_addr("0x1000"), Ok(0x1000));
        assert_eq!(parse_addr("4096"), Ok(4096));
        assert!(parse_addr("0xg").unwrap_err().contains("not an address"));
        assert!(parse_addr("").is_err());
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
    fn exec_and_lifecycle_args() {
        let argv = "vmlab --state-dir /s exec -i -t -e A=1 -e B= -w /tmp -u 1000:1000 web sh -c";
        let cli = Cli::try_parse_from(argv.split(' ').chain(["exit 7"])).unwrap();
        assert_eq!(cli.state_dir, Some(PathBuf::from("/s")));
        let Command::Exec(a) = cli.command else {
            panic!("not exec")
        };
        assert!(a.interactive && a.tty);
        assert_eq!(a.env, vec!["A=1", "B="]);
        assert_eq!(
            (a.workdir.as_deref(), a.user.as_deref()),
            (Some("/tmp"), Some("1000:1000"))
        );
        assert_eq!(a.name, "web");
        assert_eq!(a.command, vec!["sh", "-c", "exit 7"]);
        // `--` and options of the command after the name.
        let cli = Cli::try_parse_from(["vmlab", "exec", "web", "--", "ls", "-l"]).unwrap();
        let Command::Exec(a) = cli.command else {
            panic!("not exec")
        };
        assert_eq!(a.command, vec!["ls", "-l"]);
        let cli = Cli::try_parse_from(["vmlab", "exec", "web", "ls", "-l"]).unwrap();
        let Command::Exec(a) = cli.command else {
            panic!("not exec")
        };
        assert_eq!(a.command, vec!["ls", "-l"]);
        assert!(Cli::try_parse_from(["vmlab", "exec", "web"]).is_err());
        assert!(Cli::try_parse_from(["vmlab", "exec", "-e", "NOEQ", "web", "true"]).is_err());

        let Command::Kill(k) = Cli::try_parse_from(["vmlab", "kill", "web"])
            .unwrap()
            .command
        else {
            panic!("not kill")
        };
        assert_eq!(k.signal, 9);
        for (s, n) in [("TERM", 15), ("sigusr1", 10), ("2", 2), ("SIGKILL", 9)] {
            assert_eq!(parse_signal(s), Ok(n), "{s}");
        }
        for bad in ["0", "65", "FOO", "SIG", ""] {
            assert!(parse_signal(bad).is_err(), "{bad}");
        }
        let Command::Stop(s) = Cli::try_parse_from(["vmlab", "stop", "web", "--timeout", "3"])
            .unwrap()
            .command
        else {
            panic!("not stop")
        };
        assert_eq!((s.name.as_str(), s.timeout), ("web", 3));
        let argv = ["vmlab", "run", "--kernel", "k", "--name", "a b", "--detach"];
        assert!(Cli::try_parse_from(argv).is_err());
        let argv = ["vmlab", "run", "--kernel", "k", "--name", "web", "-d"];
        let Command::Run(r) = Cli::try_parse_from(argv).unwrap().command else {
            panic!("not run")
        };
        assert!(r.detach && r.name.as_deref() == Some("web") && r.ready_timeout == 120);
        let argv = ["vmlab", "run", "--kernel", "k", "--ready-timeout", "5"];
        assert!(Cli::try_parse_from(argv).is_err());
        let argv = [
            "vmlab",
            "run",
            "--kernel",
            "k",
            "--agent",
            "--ready-timeout",
            "5",
            "--",
            "true",
        ];
        let Command::Run(r) = Cli::try_parse_from(argv).unwrap().command else {
            panic!("not run")
        };
        assert!(r.agent && !r.detach && r.ready_timeout == 5 && r.command == ["true"]);
        // --agent needs a command, and is not --detach.
        assert!(Cli::try_parse_from(["vmlab", "run", "--kernel", "k", "--agent"]).is_err());
        let argv = [
            "vmlab", "run", "--kernel", "k", "--agent", "-d", "--", "true",
        ];
        assert!(Cli::try_parse_from(argv).is_err());
    }

    #[test]
    fn rootfs_and_process_args() {
        let run = |extra: &[&str]| {
            let argv = ["vmlab", "run", "--kernel", "k"].iter().chain(extra);
            Cli::try_parse_from(argv).map(|c| match c.command {
                Command::Run(r) => r,
                _ => panic!("not run"),
            })
        };
        let r = run(&["--rootfs", "/r", "--", "true"]).unwrap();
        assert_eq!(r.rootfs, Some(PathBuf::from("/r")));
        assert_eq!(r.rootfs_mode, crate::cmdline::RootMode::Rw);
        let r = run(&["--rootfs", "/r", "--rootfs-mode", "overlay", "--", "true"]).unwrap();
        assert_eq!(r.rootfs_mode, crate::cmdline::RootMode::Overlay);
        // A command is required; --image, --initrd and --raw conflict;
        // --rootfs-mode needs --rootfs.
        let kind = |extra: &[&str]| run(extra).unwrap_err().kind();
        use clap::error::ErrorKind;
        assert_eq!(
            kind(&["--rootfs", "/r"]),
            ErrorKind::MissingRequiredArgument
        );
        for other in [["--image", "i"], ["--initrd", "i"]] {
            let argv = ["--rootfs", "/r", other[0], other[1], "--", "true"];
            assert_eq!(kind(&argv), ErrorKind::ArgumentConflict, "{other:?}");
        }
        let argv = ["vmlab", "run", "--raw", "g", "--rootfs", "/r"];
        assert!(Cli::try_parse_from(argv).is_err());
        assert!(run(&["--rootfs-mode", "ro", "--", "true"]).is_err());
        assert!(run(&["--rootfs", "/r", "--rootfs-mode", "rx", "--", "true"]).is_err());

        let r = run(&[
            "-e",
            "A=1",
            "--env",
            "B=",
            "-w",
            "/w",
            "-u",
            "app:staff",
            "--hostname",
            "h",
            "--tmpfs",
            "/run",
            "--tmpfs",
            "/t:size=1m,ro",
        ])
        .unwrap();
        assert_eq!(r.env, vec!["A=1", "B="]);
        assert_eq!(
            (
                r.workdir.as_deref(),
                r.user.as_deref(),
                r.hostname.as_deref()
            ),
            (Some("/w"), Some("app:staff"), Some("h"))
        );
        assert_eq!(r.tmpfs[0].path, "/run");
        assert_eq!(r.tmpfs[0].options, "");
        assert_eq!(
            (r.tmpfs[1].path.as_str(), r.tmpfs[1].options.as_str()),
            ("/t", "size=1m,ro")
        );
        for bad in [
            ["--env", "NOEQ"],
            ["--env", "=x"],
            ["--workdir", "rel"],
            ["--user", ""],
            ["--user", "1:"],
            ["--hostname", ""],
            ["--tmpfs", "rel"],
        ] {
            assert!(run(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn process_value_parsers() {
        assert_eq!(parse_workdir("/srv/app"), Ok("/srv/app".into()));
        assert!(parse_workdir("srv").unwrap_err().contains("not absolute"));
        assert!(parse_workdir("/a\0b").unwrap_err().contains("NUL"));
        assert!(parse_env("A=\0").unwrap_err().contains("KEY=VALUE"));
        for ok in ["0", "1000:1000", "app", "app:staff", "1000:staff"] {
            assert_eq!(parse_user(ok), Ok(ok.to_string()));
        }
        for (bad, why) in [
            ("", "empty"),
            (":1", "empty"),
            ("1:", "empty"),
            ("a:b:c", "more than one"),
            ("99999999999", "out of range"),
            ("a\0", "NUL"),
        ] {
            let e = parse_user(bad).unwrap_err();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
        assert_eq!(parse_hostname("web-1"), Ok("web-1".into()));
        assert!(parse_hostname(&"h".repeat(64)).is_ok());
        let e = parse_hostname(&"h".repeat(65)).unwrap_err();
        assert!(e.contains("65 bytes") && e.contains("at most 64"), "{e}");
        assert!(parse_hostname("").unwrap_err().contains("empty"));
        assert!(parse_hostname("a\0b").unwrap_err().contains("NUL"));
    }

    #[test]
    fn tmpfs_syntax() {
        let t = parse_tmpfs("/run:size=64m,mode=755").unwrap();
        assert_eq!(
            (t.path.as_str(), t.options.as_str()),
            ("/run", "size=64m,mode=755")
        );
        let t = parse_tmpfs("/a//b/").unwrap();
        assert_eq!((t.path.as_str(), t.options.as_str()), ("/a/b", ""));
        let t = parse_tmpfs("/x:rw,noexec,nosuid,size=65536k").unwrap();
        assert_eq!(t.options, "rw,noexec,nosuid,size=65536k");
        for (bad, why) in [
            ("run", "not absolute"),
            ("/", "guest's /"),
            ("/a/../b", ".."),
            ("/run:bogus", "unknown option 'bogus'"),
            ("/run:=1", "unknown option '=1'"),
            ("/run\0", "NUL"),
            ("", "not absolute"),
        ] {
            let e = parse_tmpfs(bad).unwrap_err();
            assert!(e.contains(why), "{bad:?}: {e}");
            assert!(e.contains("--tmpfs"), "{bad:?}: {e}");
        }
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
