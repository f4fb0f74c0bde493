//! `vmlab run`: boot a guest kernel (or a container image) in a micro-VM,
//! run one command in it, and end with the command's status, as the
//! library entry point the binary calls (like [`crate::container::run`]
//! and [`crate::compare::run`]).
//!
//! [`vm_config`] turns the command line into a [`VmConfig`] (an `--image`
//! becomes the root disk and the init's process); [`run`] builds the VM,
//! puts the terminal in raw mode while the guest owns it, runs the guest
//! and prints the reports asked for (`--boot-time`, `--stats`,
//! `--profile-guest`) on stderr.

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use crate::cli::{RootDevice, RunArgs, VsockArg};
use crate::cmdline::{GuestVolume, InitParams};
use crate::devices::console::ConsoleSink;
use crate::devices::virtio::BlockConfig;
use crate::host::HostKind;
use crate::image::VmImage;
use crate::named::{Owner, Paths};
use crate::raw::{CpuMode, RawImage};
use crate::terminal::RawMode;
use crate::trace::Tracer;
use crate::vm::{Payload, RunReport, Vm, VmConfig};
use crate::volumes::{RootShare, Shares};
use crate::vsock::VsockConfig;

/// Exit status for vmlab's own failures (bad input, KVM errors), as
/// `docker run` uses 125.
pub const EXIT_VMLAB_ERROR: u8 = 125;

/// Why `vmlab run` failed before or while running the guest.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Building or running the VM.
    #[error(transparent)]
    Vm(#[from] crate::vm::Error),
    /// Preparing `--image`.
    #[error(transparent)]
    Image(#[from] crate::image::Error),
    /// Creating the `--trace-exits` file.
    #[error("--trace-exits {path}: {source}")]
    Trace {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A command-line problem clap cannot see (e.g. `--vsock` without a
    /// socket).
    #[error("{0}")]
    Usage(String),
    /// A named VM's state directory or its guest agent.
    #[error(transparent)]
    Instance(#[from] crate::instances::Error),
    /// A `--volume` or `--fs` that cannot be used (a missing host
    /// directory, virtiofsd not installed or not starting).
    #[error("{0}")]
    Volume(String),
}

impl Error {
    /// vmlab's exit status for this error: 2 for usage errors (as clap's),
    /// else [`EXIT_VMLAB_ERROR`].
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Usage(_) => 2,
            _ => EXIT_VMLAB_ERROR,
        }
    }
}

/// What vmlab's own standard streams are.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Streams {
    /// stdin is a terminal.
    pub stdin_tty: bool,
    /// stdout is a terminal.
    pub stdout_tty: bool,
}

impl Streams {
    /// vmlab's actual stdin and stdout.
    pub fn detect() -> Streams {
        use std::io::IsTerminal;
        Streams {
            stdin_tty: std::io::stdin().is_terminal(),
            stdout_tty: std::io::stdout().is_terminal(),
        }
    }
}

/// The guest CID of a named VM without `--vsock cid=N` (the first one a
/// guest may have: 0-2 are reserved).
pub const DEFAULT_CID: u64 = 3;

/// The guest profiler's sampling period (`--profile-guest`).
const PROFILE_PERIOD: Duration = Duration::from_millis(10);

/// An `--image` as the VM boots it.
#[derive(Clone, Copy)]
pub enum ImageBoot<'a> {
    /// `--root-device block`: the per-run copy of its ext4 disk.
    Disk(&'a VmImage),
    /// `--root-device fs`: its cached directory over virtio-fs (`run`
    /// starts the share and passes the initramfs as `--initrd`).
    Fs(&'a crate::image::FsImage),
}

/// The VM that `args` describe. `args` is consumed: its disks and
/// command move into the configuration. With `image`, the init runs the
/// image's process (a disk image's disk comes first, /dev/vda), with
/// `--env`, `--workdir`, `--user` and `--hostname` over it. Fails
/// (a usage error) when `--vsock` names no socket. `named`: the state
/// directory of a named VM, which always gets a vsock device with its
/// socket there (where exec, kill and stop look for it).
pub fn vm_config(
    args: RunArgs,
    host: HostKind,
    image: Option<ImageBoot<'_>>,
    streams: Streams,
    named: Option<&Paths>,
) -> Result<VmConfig, Error> {
    let payload = match (args.raw, args.kernel) {
        (Some(path), _) => Payload::Raw(RawImage {
            path,
            mode: args.mode.unwrap_or(CpuMode::Real),
            entry: args.entry,
        }),
        (None, Some(kernel)) => Payload::Linux {
            kernel,
            initrd: args.initrd,
        },
        // clap requires --kernel unless --raw is given.
        (None, None) => {
            return Err(Error::Vm(crate::vm::Error::Config(
                "--kernel or --raw is required".into(),
            )))
        }
    };
    let vsock = match (args.vsock, named) {
        (Some(v), Some(_)) if v.socket.is_some() => {
            return Err(Error::Usage(
                "--vsock socket=PATH cannot be used with --name or --detach: a named VM's \
                 socket is in its state directory"
                    .into(),
            ))
        }
        (Some(v), Some(paths)) => Some(VsockConfig {
            cid: v.cid,
            socket: paths.vsock(),
        }),
        (v, None) => v
            .map(VsockArg::into_config)
            .transpose()
            .map_err(Error::Usage)?,
        (None, Some(paths)) => Some(VsockConfig {
            cid: DEFAULT_CID,
            socket: paths.vsock(),
        }),
    };
    let mut init = InitParams {
        command: (!args.command.is_empty()).then_some(args.command),
        // The guest's console is a terminal only when a person types at it.
        tty: streams.stdin_tty && streams.stdout_tty && !args.detach,
        // The guest agent whenever there is a vsock device to reach it by.
        agent: vsock.is_some(),
        ..Default::default()
    };
    let flags = ProcessFlags {
        env: args.env,
        workdir: args.workdir,
        user: args.user,
        hostname: args.hostname,
    };
    let mut disks = args.disk;
    let mut cmdline = args.cmdline;
    match image {
        Some(ImageBoot::Disk(image)) => boot_image(image, &mut init, &mut disks, &mut cmdline),
        Some(ImageBoot::Fs(image)) => {
            image_process(&mut init, &image.argv, &image.config);
            init.root_fs = Some(crate::volumes::ROOT_TAG.to_string());
        }
        None => {}
    }
    if args.rootfs.is_some() {
        // `run` starts the share and passes the initramfs as --initrd.
        init.root_fs = Some(crate::volumes::ROOT_TAG.to_string());
        init.root_mode = args.rootfs_mode;
    }
    flags.apply(&mut init);
    init.tmpfs = args.tmpfs;
    Ok(VmConfig {
        payload,
        cmdline,
        mem_size: args.memory,
        cpus: args.cpus,
        init,
        host,
        // A detached VMM's stdin is /dev/null.
        forward_stdin: !args.detach,
        disks,
        nets: args.net,
        vsock,
        fs: Vec::new(),
        profile_period: args.profile_guest.as_ref().map(|_| PROFILE_PERIOD),
        trace: None,
    })
}

/// `--image`: the per-run copy of the image's disk becomes /dev/vda (the
/// root: without an initrd the VM builder adds `root=/dev/vda rw`), the kernel
/// starts vmlab's init injected into it, and the init runs the image's
/// process with its environment, working directory and user.
fn boot_image(
    image: &VmImage,
    init: &mut InitParams,
    disks: &mut Vec<BlockConfig>,
    cmdline: &mut Option<String>,
) {
    disks.insert(
        0,
        BlockConfig {
            path: image.disk.path().to_path_buf(),
            readonly: false,
            id: None,
        },
    );
    image_process(init, &image.argv, &image.config);
    // Before the user's --cmdline, which can still override it.
    let init_arg = format!("init={}", crate::image::GUEST_INIT_PATH);
    *cmdline = Some(match cmdline.take() {
        Some(user) => format!("{init_arg} {user}"),
        None => init_arg,
    });
}

/// `--env`, `--workdir`, `--user`, `--hostname`: what the command line
/// sets of the guest command's process, over an image's.
#[derive(Debug, Clone, Default)]
struct ProcessFlags {
    env: Vec<String>,
    workdir: Option<String>,
    user: Option<String>,
    hostname: Option<String>,
}

impl ProcessFlags {
    /// Sets them on `init`, after the image's values: the environment
    /// entries go after the image's (the init lets a later entry win),
    /// the rest replace the image's.
    fn apply(&self, init: &mut InitParams) {
        init.env.extend(self.env.iter().cloned());
        if let Some(dir) = &self.workdir {
            init.workdir = Some(dir.clone());
        }
        if let Some(user) = &self.user {
            init.user = Some(user.clone());
        }
        if let Some(name) = &self.hostname {
            init.hostname = Some(name.clone());
        }
    }
}

/// `--rootfs DIR`: DIR must be an existing directory.
fn check_rootfs(dir: &std::path::Path) -> Result<(), Error> {
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(Error::Usage(format!(
            "--rootfs {}: not a directory",
            dir.display()
        ))),
        Err(e) => Err(Error::Usage(format!("--rootfs {}: {e}", dir.display()))),
    }
}

/// The init runs the image's process: `argv` with the image's
/// environment, working directory and user (either root device).
fn image_process(init: &mut InitParams, argv: &[String], config: &crate::image::ImageConfig) {
    init.command = Some(argv.to_vec());
    init.env = config.env.clone();
    init.workdir = Some(config.working_dir().to_string());
    init.user = config.user.clone();
}

/// Runs `vmlab run`: returns vmlab's exit status (the command's, 0 for a
/// clean guest shutdown, 128+N after host signal N, 125 when the guest
/// crashed). `started` is when vmlab started, for `--boot-time`. `owner`:
/// the state directory of a named VM, held by this process.
pub fn run(
    args: RunArgs,
    started: Instant,
    streams: Streams,
    owner: Option<&Owner>,
) -> Result<u8, Error> {
    let (host, why) = HostKind::resolve_why(args.host_quirks);
    if host.cmdline_quirks().is_empty() {
        log::info!("host: {} ({why}): no workarounds", host.describe());
    } else if args.raw.is_some() {
        // A raw image has no kernel command line to add them to.
        log::info!("host: {} ({why})", host.describe());
    } else {
        log::info!(
            "host: {} ({why}); adding to the guest command line: {}",
            host.describe(),
            host.cmdline_quirks().join(" ")
        );
    }
    let mut args = args;
    // The virtiofsd of each --volume; lives until the VM is done, and
    // stops them (and removes their sockets) on every way out of here.
    // --image --root-device fs: the image's cached directory, shared.
    let fs_image = match (&args.image, args.root_device) {
        (Some(path), RootDevice::Fs) => Some(crate::image::prepare_vm_fs(path, &args.command)?),
        _ => None,
    };
    // --rootfs DIR: DIR itself is the root share, booted from the
    // generic initramfs (clap keeps --image, --initrd and --raw out).
    let rootfs = args.rootfs.clone();
    if let Some(dir) = &rootfs {
        check_rootfs(dir)?;
        args.initrd = Some(crate::image::fs_root_initramfs()?);
    }
    let root = match (&fs_image, &rootfs) {
        (Some(i), _) => Some(RootShare {
            dir: &i.rootfs,
            readonly: true,
        }),
        (None, Some(dir)) => Some(RootShare {
            dir,
            readonly: args.rootfs_mode != crate::cmdline::RootMode::Rw,
        }),
        (None, None) => None,
    };
    let mut shares = start_shares(&mut args, owner, root)?;
    // Lives until the VM is done: dropping it removes the run's disk.
    let image = match (&args.image, &fs_image) {
        (Some(path), None) => Some(crate::image::prepare_vm(path, &args.command)?),
        _ => None,
    };
    if let Some(i) = &fs_image {
        args.initrd = Some(i.initrd.clone());
        // No disk: the image's own directory is the root.
        args.image = None;
    }
    let (boot_time, stats, profile) = (args.boot_time, args.stats, args.profile_guest.clone());
    let trace_path = args.trace_exits.clone();
    let tracer = match &trace_path {
        Some(path) => Some(
            Tracer::create(
                path,
                args.trace_limit.unwrap_or(crate::trace::DEFAULT_LIMIT),
            )
            .map_err(|source| Error::Trace {
                path: path.display().to_string(),
                source,
            })?,
        ),
        None => None,
    };
    let fs_args = std::mem::take(&mut args.fs);
    let boot = match (&image, &fs_image) {
        (Some(i), _) => Some(ImageBoot::Disk(i)),
        (None, Some(i)) => Some(ImageBoot::Fs(i)),
        (None, None) => None,
    };
    let mut config = vm_config(args, host, boot, streams, owner.map(|o| &o.paths))?;
    config.trace = tracer.as_ref().and_then(Tracer::sender);
    config.fs = shares.devices();
    config.init.volumes = shares.guest_volumes().to_vec();
    config.init.binds = shares.guest_binds().to_vec();
    for f in fs_args {
        if let Some(path) = f.path {
            config.init.volumes.push(GuestVolume {
                tag: f.config.tag.clone(),
                path,
                readonly: false,
            });
        }
        config.fs.push(f.config);
    }
    let sink = ConsoleSink::stdout().map_err(|source| crate::vm::Error::Host {
        what: "duplicating stdout for the console",
        source,
    })?;
    let vm = Vm::build(&config, sink)?;
    log::debug!("guest command line: {}", vm.cmdline());

    // Raw mode only while the guest owns the terminal; restored on drop.
    let raw = if streams.stdin_tty && config.forward_stdin {
        RawMode::enable(std::io::stdin().as_raw_fd())
    } else {
        None
    };
    let report = vm.run();
    drop(raw);
    let report = report?;
    if let (Some(tracer), Some(path)) = (tracer, &trace_path) {
        // The vCPU threads, and with them every other sender, are gone.
        drop(config);
        finish_trace(tracer, path);
    }

    if boot_time {
        eprintln!("{}", boot_time_line(&report, started));
    }
    if stats {
        eprintln!("{}", report.stats);
        eprintln!(
            "vmlab: console: {} bytes written, {} dropped",
            report.console.written, report.console.dropped
        );
        eprintln!(
            "vmlab: run time {:.3} s",
            (report.ended - started).as_secs_f64()
        );
    }
    if let Some(path) = &profile {
        let mut samples = report.stats.samples.clone();
        samples.sort_by_key(|s| (s.ms, s.vcpu));
        match crate::profile::write_samples(path, &samples) {
            Ok(()) => eprintln!(
                "vmlab: {} guest samples written to {}",
                samples.len(),
                path.display()
            ),
            Err(e) => eprintln!("vmlab: cannot write {}: {e}", path.display()),
        }
    }
    if let Some(msg) = report.outcome.failure_message() {
        eprintln!("vmlab: {msg}");
    }
    for line in shares.failures() {
        eprintln!("vmlab: {line}");
    }
    shares.stop();
    log::debug!("outcome: {:?}", report.outcome);
    Ok(u8::try_from(report.outcome.exit_code()).unwrap_or(EXIT_VMLAB_ERROR))
}

/// Checks `--volume` and `--fs` (taking the volumes out of `args`) and
/// starts a virtiofsd per volume, its socket in the named VM's state
/// directory or in a directory of this run's under the state root.
fn start_shares(
    args: &mut RunArgs,
    owner: Option<&Owner>,
    root: Option<RootShare<'_>>,
) -> Result<Shares, Error> {
    let volumes = std::mem::take(&mut args.volume);
    crate::volumes::validate(&volumes).map_err(Error::Volume)?;
    let mut paths: Vec<&str> = volumes.iter().map(|v| v.guest.as_str()).collect();
    let mut tags: Vec<&str> = Vec::new();
    for f in &args.fs {
        if let Some(path) = &f.path {
            if paths.contains(&path.as_str()) {
                return Err(Error::Usage(format!(
                    "--fs tag={}: {path} is already the mount point of another share",
                    f.config.tag
                )));
            }
            paths.push(path);
        }
        if tags.contains(&f.config.tag.as_str()) || f.config.tag.starts_with("vmlab") {
            return Err(Error::Usage(format!(
                "--fs tag={}: the tag is used twice, or starts with 'vmlab' (the tags of \
                 --volume shares)",
                f.config.tag
            )));
        }
        tags.push(&f.config.tag);
        if !f.config.socket.exists() {
            return Err(Error::Volume(format!(
                "--fs tag={}: {}: no such socket (is the daemon running?)",
                f.config.tag,
                f.config.socket.display()
            )));
        }
    }
    if volumes.is_empty() && root.is_none() {
        return Shares::start(&[], std::path::Path::new("/"), false).map_err(Error::Volume);
    }
    let (dir, own) = match owner {
        Some(o) => (o.paths.dir.clone(), false),
        None => {
            let runs = crate::named::state_root(None).join(".run");
            crate::volumes::clean_stale(&runs);
            (runs.join(std::process::id().to_string()), true)
        }
    };
    Shares::start_with_root(root, &volumes, &dir, own).map_err(Error::Volume)
}

/// Waits for the exit trace's last line and says on stderr if it is not
/// the whole story.
fn finish_trace(tracer: Tracer, path: &std::path::Path) {
    match tracer.finish() {
        Ok(t) => {
            if t.stopped_at_limit {
                eprintln!(
                    "vmlab: the exit trace {} reached its size limit and stopped early",
                    path.display()
                );
            }
            if t.dropped > 0 {
                eprintln!(
                    "vmlab: {} exits were not traced (the trace writer fell behind)",
                    t.dropped
                );
            }
        }
        Err(e) => eprintln!("vmlab: cannot write {}: {e}", path.display()),
    }
}

/// The `--boot-time` report.
fn boot_time_line(report: &RunReport, started: Instant) -> String {
    let ms = |t: Option<Instant>| match t {
        Some(t) => format!("{:.1} ms", (t - started).as_secs_f64() * 1e3),
        None => "never".to_string(),
    };
    format!(
        "vmlab: boot time: first KVM_RUN after {}, guest init up after {}",
        ms(report.first_run),
        ms(report.init_up)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn args(argv: &[&str]) -> RunArgs {
        let cli =
            crate::cli::Cli::try_parse_from(["vmlab", "run"].iter().chain(argv).copied()).unwrap();
        match cli.command {
            crate::cli::Command::Run(a) => a,
            _ => unreachable!("parsed `vmlab run`"),
        }
    }

    const TTY: Streams = Streams {
        stdin_tty: true,
        stdout_tty: true,
    };

    #[test]
    fn raw_config_from_the_command_line() {
        let a = args(&["--raw", "/g.bin", "--mode", "long", "--entry", "0x100010"]);
        let c = vm_config(a, HostKind::Hardware, None, Streams::default(), None).unwrap();
        assert_eq!(
            c.payload,
            Payload::Raw(RawImage {
                path: std::path::PathBuf::from("/g.bin"),
                mode: CpuMode::Long,
                entry: Some(0x10_0010),
            })
        );
        let c = vm_config(
            args(&["--raw", "/g.bin"]),
            HostKind::Hardware,
            None,
            TTY,
            None,
        )
        .unwrap();
        assert!(matches!(
            c.payload,
            Payload::Raw(RawImage {
                mode: CpuMode::Real,
                entry: None,
                ..
            })
        ));
    }

    #[test]
    fn config_from_the_command_line() {
        let a = args(&[
            "--kernel",
            "/k",
            "--initrd",
            "/i",
            "--cpus",
            "2",
            "-m",
            "256M",
            "--disk",
            "/d.img,readonly=on",
            "--cmdline",
            "loglevel=7",
            "--",
            "echo",
            "hi",
        ]);
        let c = vm_config(a, HostKind::Hardware, None, Streams::default(), None).unwrap();
        assert_eq!(
            c.payload,
            Payload::Linux {
                kernel: std::path::PathBuf::from("/k"),
                initrd: Some(std::path::PathBuf::from("/i")),
            }
        );
        assert_eq!(c.cpus, 2);
        assert_eq!(c.mem_size, 256 << 20);
        assert_eq!(c.disks.len(), 1);
        assert!(c.disks[0].readonly);
        assert_eq!(c.cmdline.as_deref(), Some("loglevel=7"));
        assert_eq!(
            c.init.command,
            Some(vec!["echo".to_string(), "hi".to_string()])
        );
        assert!(!c.init.tty);
        assert!(c.forward_stdin);
        assert_eq!(c.profile_period, None);
    }

    #[test]
    fn shell_on_a_terminal_and_profiling() {
        let a = args(&["--kernel", "/k", "--profile-guest", "/tmp/p.txt"]);
        let c = vm_config(a, HostKind::Hardware, None, TTY, None).unwrap();
        assert_eq!(c.init.command, None, "no command: a shell");
        assert!(c.init.tty);
        assert_eq!(c.profile_period, Some(PROFILE_PERIOD));
        // A terminal on one side only is not an interactive console.
        let half = Streams {
            stdin_tty: true,
            stdout_tty: false,
        };
        let c = vm_config(
            args(&["--kernel", "/k"]),
            HostKind::Hardware,
            None,
            half,
            None,
        )
        .unwrap();
        assert!(!c.init.tty);
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        let dir = std::env::temp_dir().join(format!("vmlab-run-test-{}", std::process::id()));
        let missing = dir.join("no-such-kernel");
        let a = args(&["--kernel", missing.to_str().unwrap(), "--", "true"]);
        let e = run(a, Instant::now(), Streams::default(), None).unwrap_err();
        // Without /dev/kvm the error is about KVM; with it, the kernel.
        let msg = e.to_string();
        assert!(
            msg.contains("no-such-kernel") || msg.contains("/dev/kvm"),
            "{msg}"
        );

        let image = dir.join("no-such-image.tar");
        let a = args(&["--kernel", "/k", "--image", image.to_str().unwrap()]);
        let e = run(a, Instant::now(), Streams::default(), None).unwrap_err();
        assert!(matches!(e, Error::Image(_)), "{e}");
        assert!(e.to_string().contains("no-such-image"), "{e}");
    }

    #[test]
    fn a_named_vm_gets_a_vsock_device_and_the_agent() {
        let paths = Paths::new(std::path::Path::new("/state"), "web");
        let c = vm_config(
            args(&["--kernel", "/k", "--name", "web", "-d"]),
            HostKind::Hardware,
            None,
            TTY,
            Some(&paths),
        )
        .unwrap();
        let v = c.vsock.unwrap();
        assert_eq!((v.cid, v.socket), (DEFAULT_CID, paths.vsock()));
        assert!(c.init.agent && !c.init.tty && !c.forward_stdin);
        let c = vm_config(
            args(&["--kernel", "/k", "--name", "web", "--vsock", "cid=7"]),
            HostKind::Hardware,
            None,
            Streams::default(),
            Some(&paths),
        )
        .unwrap();
        assert_eq!(c.vsock.unwrap().cid, 7);
        let e = vm_config(
            args(&[
                "--kernel",
                "/k",
                "--name",
                "w",
                "--vsock",
                "cid=7,socket=/s",
            ]),
            HostKind::Hardware,
            None,
            Streams::default(),
            Some(&paths),
        )
        .unwrap_err();
        assert!(e.to_string().contains("state directory"), "{e}");
        // No vsock device, no agent; --vsock alone enables it.
        let c = vm_config(
            args(&["--kernel", "/k"]),
            HostKind::Hardware,
            None,
            TTY,
            None,
        )
        .unwrap();
        assert!(c.vsock.is_none() && !c.init.agent);
        let a = args(&["--kernel", "/k", "--vsock", "cid=5,socket=/tmp/v.sock"]);
        let c = vm_config(a, HostKind::Hardware, None, TTY, None).unwrap();
        assert!(c.init.agent);
    }

    #[test]
    fn rootfs_and_process_flags() {
        use crate::cmdline::RootMode;
        let a = args(&[
            "--kernel",
            "/k",
            "--rootfs",
            "/srv/root",
            "-e",
            "A=1",
            "--env",
            "B=x=y",
            "--workdir",
            "/app",
            "--user",
            "1000:1000",
            "--hostname",
            "web",
            "--tmpfs",
            "/run:size=64m,mode=755",
            "--",
            "id",
        ]);
        let c = vm_config(a, HostKind::Hardware, None, Streams::default(), None).unwrap();
        assert_eq!(c.init.root_fs.as_deref(), Some(crate::volumes::ROOT_TAG));
        assert_eq!(c.init.root_mode, RootMode::Rw, "rw by default");
        assert_eq!(c.init.env, vec!["A=1", "B=x=y"]);
        assert_eq!(c.init.workdir.as_deref(), Some("/app"));
        assert_eq!(c.init.user.as_deref(), Some("1000:1000"));
        assert_eq!(c.init.hostname.as_deref(), Some("web"));
        assert_eq!(c.init.tmpfs.len(), 1);
        assert_eq!(c.init.tmpfs[0].options, "size=64m,mode=755");
        assert_eq!(c.init.command, Some(vec!["id".to_string()]));
        for (mode, want) in [("ro", RootMode::Ro), ("overlay", RootMode::Overlay)] {
            let a = args(&[
                "--kernel",
                "/k",
                "--rootfs",
                "/r",
                "--rootfs-mode",
                mode,
                "--",
                "true",
            ]);
            let c = vm_config(a, HostKind::Hardware, None, Streams::default(), None).unwrap();
            assert_eq!(c.init.root_mode, want);
        }
        // Without --rootfs: no root share, the default mode.
        let c = vm_config(
            args(&["--kernel", "/k", "--", "true"]),
            HostKind::Hardware,
            None,
            Streams::default(),
            None,
        )
        .unwrap();
        assert_eq!(
            (c.init.root_fs, c.init.root_mode),
            (None, RootMode::Overlay)
        );
        assert!(c.init.hostname.is_none() && c.init.tmpfs.is_empty());
    }

    #[test]
    fn flags_override_the_images_process() {
        let config = crate::image::ImageConfig {
            entrypoint: vec![],
            cmd: vec!["sh".into()],
            env: vec!["PATH=/bin".into(), "A=image".into()],
            working_dir: Some("/work".into()),
            user: Some("1000".into()),
        };
        let mut init = InitParams::default();
        image_process(&mut init, &["sh".to_string()], &config);
        let flags = ProcessFlags {
            env: vec!["A=flag".into()],
            workdir: Some("/tmp".into()),
            user: None,
            hostname: Some("h".into()),
        };
        flags.apply(&mut init);
        // After the image's: the init lets the later entry win.
        assert_eq!(init.env, vec!["PATH=/bin", "A=image", "A=flag"]);
        assert_eq!(init.workdir.as_deref(), Some("/tmp"));
        assert_eq!(init.user.as_deref(), Some("1000"), "the image's is kept");
        assert_eq!(init.hostname.as_deref(), Some("h"));
    }

    #[test]
    fn a_rootfs_must_be_a_directory() {
        let e = check_rootfs(std::path::Path::new("/nonexistent/vmlab-root")).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(e
            .to_string()
            .starts_with("--rootfs /nonexistent/vmlab-root: No such file"));
        let e = check_rootfs(std::path::Path::new("/proc/self/status")).unwrap_err();
        assert_eq!(e.to_string(), "--rootfs /proc/self/status: not a directory");
        assert!(check_rootfs(&std::env::temp_dir()).is_ok());
    }

    #[test]
    fn out_of_range_memory_is_refused_before_kvm() {
        let a = args(&["--kernel", "/k", "-m", "16M"]);
        let e = run(a, Instant::now(), Streams::default(), None).unwrap_err();
        assert!(e.to_string().contains("too small"), "{e}");
    }

    #[test]
    fn boot_time_line_says_never_for_a_missing_mark() {
        let started = Instant::now();
        let report = RunReport {
            outcome: crate::vm::Outcome::PowerOff,
            first_run: Some(started + Duration::from_millis(5)),
            init_up: None,
            ended: started,
            stats: Default::default(),
            console: Default::default(),
        };
        let line = boot_time_line(&report, started);
        assert!(line.contains("first KVM_RUN after 5.0 ms"), "{line}");
        assert!(line.ends_with("guest init up after never"), "{line}");
    }
}
