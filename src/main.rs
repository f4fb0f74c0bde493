//! The `vmlab` binary: parse the command line, build the VM, run it, and
//! exit with the guest command's status.

use std::io::IsTerminal;
use std::os::fd::AsRawFd;
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;

use vmlab::cli::{Cli, Command, CompareArgs, ContainerArgs, RunArgs};
use vmlab::cmdline::InitParams;
use vmlab::devices::virtio::BlockConfig;
use vmlab::host::HostKind;
use vmlab::image::VmImage;
use vmlab::terminal::RawMode;
use vmlab::vm::{Vm, VmConfig};

/// Exit status for vmlab's own failures (bad input, KVM errors), as
/// `docker run` uses 125.
const EXIT_VMLAB_ERROR: u8 = 125;

fn main() -> ExitCode {
    let started = Instant::now();
    let cli = Cli::parse();
    init_logging(&cli);
    let quiet = cli.quiet;
    match cli.command {
        Command::Run(args) => match run(args, started) {
            Ok(code) => ExitCode::from(code),
            Err(e) => {
                eprintln!("vmlab: error: {e}");
                ExitCode::from(EXIT_VMLAB_ERROR)
            }
        },
        Command::Container(args) => match vmlab::container::run(&container_options(args)) {
            Ok(code) => ExitCode::from(code),
            Err(e) => {
                eprintln!("vmlab: error: {e}");
                ExitCode::from(e.exit_code())
            }
        },
        Command::Compare(args) => match compare(args, !quiet) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("vmlab: error: {e}");
                ExitCode::from(e.exit_code())
            }
        },
    }
}

/// `vmlab compare`: runs the comparison, prints the Markdown report and
/// writes the files asked for.
fn compare(args: CompareArgs, progress: bool) -> Result<(), vmlab::compare::Error> {
    // The command as typed, for the report (arguments with spaces quoted).
    let command_line = std::env::args()
        .map(|a| match a.contains([' ', '\'', '"']) {
            true => format!("'{}'", a.replace('\'', r"'\''")),
            false => a,
        })
        .collect::<Vec<_>>()
        .join(" ");
    let opts = vmlab::compare::CompareOptions {
        image: args.image,
        kernel: args.kernel,
        repeat: args.repeat,
        vm_memory: args.memory,
        runtime: args.runtime,
        sizes: vmlab::compare::rows::Sizes {
            cpu_mib: args.cpu_mib,
            mem_mib: args.mem_mib,
            mem_repeat: 3,
            disk_mib: args.disk_mib,
            random_ops: 500,
            net_seconds: args.net_seconds as f64,
            rtt_count: 100,
        },
        timeout: std::time::Duration::from_secs(args.timeout),
        network: !args.no_net,
        progress,
        command_line,
    };
    let report = vmlab::compare::run(&opts)?;
    let md = vmlab::compare::write_outputs(
        &report,
        args.json.as_deref(),
        args.markdown.as_deref(),
        args.chart.as_deref(),
    )?;
    print!("{md}");
    Ok(())
}

fn container_options(args: ContainerArgs) -> vmlab::container::ContainerOptions {
    vmlab::container::ContainerOptions {
        image: args.image,
        command: args.command,
        runtime: args.runtime,
        memory: args.memory,
        name: args.name,
        network: args.network,
        netns: args.netns,
    }
}

fn init_logging(cli: &Cli) {
    let level = match (cli.quiet, cli.verbose) {
        (true, _) => log::LevelFilter::Warn,
        (false, 0) => log::LevelFilter::Info,
        (false, 1) => log::LevelFilter::Debug,
        (false, _) => log::LevelFilter::Trace,
    };
    env_logger::Builder::new()
        .filter_level(level)
        .format_target(false)
        .format_timestamp(None)
        .parse_env("VMLAB_LOG")
        .init();
}

/// Why `vmlab run` failed before or while running the guest.
#[derive(Debug, thiserror::Error)]
enum RunError {
    #[error(transparent)]
    Vm(#[from] vmlab::vm::Error),
    #[error(transparent)]
    Image(#[from] vmlab::image::Error),
}

/// `--image`: the per-run copy of the image's disk becomes /dev/vda (the
/// root: without an initrd vm.rs adds `root=/dev/vda rw`), the kernel
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
    init.command = Some(image.argv.clone());
    init.env = image.config.env.clone();
    init.workdir = Some(image.config.working_dir().to_string());
    init.user = image.config.user.clone();
    // Before the user's --cmdline, which can still override it.
    let init_arg = format!("init={}", vmlab::image::GUEST_INIT_PATH);
    *cmdline = Some(match cmdline.take() {
        Some(user) => format!("{init_arg} {user}"),
        None => init_arg,
    });
}

fn run(args: RunArgs, started: Instant) -> Result<u8, RunError> {
    let host = HostKind::resolve(args.host_quirks);
    if !host.cmdline_quirks().is_empty() {
        log::info!(
            "host: {}; adding to the guest command line: {}",
            host.describe(),
            host.cmdline_quirks().join(" ")
        );
    }
    let stdin_tty = std::io::stdin().is_terminal();
    // Lives until the VM is done: dropping it removes the run's disk.
    let image = match &args.image {
        Some(path) => Some(vmlab::image::prepare_vm(path, &args.command)?),
        None => None,
    };
    let mut init = InitParams {
        command: (!args.command.is_empty()).then_some(args.command),
        tty: stdin_tty && std::io::stdout().is_terminal(),
        ..Default::default()
    };
    let mut disks = args.disk;
    let mut cmdline = args.cmdline;
    if let Some(image) = &image {
        boot_image(image, &mut init, &mut disks, &mut cmdline);
    }
    let config = VmConfig {
        kernel: args.kernel,
        initrd: args.initrd,
        cmdline,
        mem_size: args.memory,
        cpus: args.cpus,
        init,
        host,
        forward_stdin: true,
        disks,
        nets: args.net,
        profile_period: args
            .profile_guest
            .as_ref()
            .map(|_| std::time::Duration::from_millis(10)),
    };
    let vm = Vm::build(&config, Box::new(std::io::stdout()))?;
    log::debug!("guest command line: {}", vm.cmdline());

    // Raw mode only while the guest owns the terminal; restored on drop.
    let raw = if stdin_tty {
        RawMode::enable(std::io::stdin().as_raw_fd())
    } else {
        None
    };
    let report = vm.run();
    drop(raw);
    let report = report?;

    if args.boot_time {
        let ms = |t: Option<Instant>| match t {
            Some(t) => format!("{:.1} ms", (t - started).as_secs_f64() * 1e3),
            None => "never".to_string(),
        };
        eprintln!(
            "vmlab: boot time: first KVM_RUN after {}, guest init up after {}",
            ms(report.first_run),
            ms(report.init_up)
        );
    }
    if args.stats {
        eprintln!("{}", report.stats);
        eprintln!(
            "vmlab: run time {:.3} s",
            (report.ended - started).as_secs_f64()
        );
    }
    if let Some(path) = &args.profile_guest {
        let mut samples = report.stats.samples.clone();
        samples.sort_by_key(|s| (s.ms, s.vcpu));
        match vmlab::profile::write_samples(path, &samples) {
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
    log::debug!("outcome: {:?}", report.outcome);
    Ok(u8::try_from(report.outcome.exit_code()).unwrap_or(EXIT_VMLAB_ERROR))
}
