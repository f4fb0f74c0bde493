//! The `vmlab` binary: parse the command line, build the VM, run it, and
//! exit with the guest command's status.

use std::io::IsTerminal;
use std::os::fd::AsRawFd;
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;

use vmlab::cli::{Cli, Command, RunArgs};
use vmlab::cmdline::InitParams;
use vmlab::host::HostKind;
use vmlab::terminal::RawMode;
use vmlab::vm::{Vm, VmConfig};

/// Exit status for vmlab's own failures (bad input, KVM errors), as
/// `docker run` uses 125.
const EXIT_VMLAB_ERROR: u8 = 125;

fn main() -> ExitCode {
    let started = Instant::now();
    let cli = Cli::parse();
    init_logging(&cli);
    match cli.command {
        Command::Run(args) => match run(args, started) {
            Ok(code) => ExitCode::from(code),
            Err(e) => {
                eprintln!("vmlab: error: {e}");
                ExitCode::from(EXIT_VMLAB_ERROR)
            }
        },
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

fn run(args: RunArgs, started: Instant) -> Result<u8, vmlab::vm::Error> {
    let host = HostKind::resolve(args.host_quirks);
    if !host.cmdline_quirks().is_empty() {
        log::info!(
            "host: {}; adding to the guest command line: {}",
            host.describe(),
            host.cmdline_quirks().join(" ")
        );
    }
    let stdin_tty = std::io::stdin().is_terminal();
    let config = VmConfig {
        kernel: args.kernel,
        initrd: args.initrd,
        cmdline: args.cmdline,
        mem_size: args.memory,
        cpus: args.cpus,
        init: InitParams {
            command: (!args.command.is_empty()).then_some(args.command),
            tty: stdin_tty && std::io::stdout().is_terminal(),
            ..Default::default()
        },
        host,
        forward_stdin: true,
        disks: args.disk,
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
