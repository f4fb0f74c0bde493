//! The `vmlab` binary: parse the command line, call the library's entry
//! point for the subcommand (`vmlab::run::run`, `vmlab::container::run`,
//! `vmlab::compare::run`), and exit with its status.

use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;

use vmlab::cli::{
    Cli, Command, CompareArgs, ContainerArgs, RunArgs, TraceCommand, TraceReportArgs,
};
use vmlab::instances::{self, Forked};
use vmlab::named::{self, Owner};
use vmlab::run::EXIT_VMLAB_ERROR;

fn main() -> ExitCode {
    let started = Instant::now();
    // `vmlab-runtime` (a link to this binary) is the OCI runtime.
    let argv0 = std::env::args_os().next().unwrap_or_default();
    if std::path::Path::new(&argv0).file_name()
        == Some(std::ffi::OsStr::new(vmlab::oci::RUNTIME_NAME))
    {
        return vmlab::oci::cli::main(std::env::args_os().collect());
    }
    let cli = Cli::parse();
    init_logging(&cli);
    let quiet = cli.quiet;
    let root = named::state_root(cli.state_dir.as_deref());
    let done = |r: Result<(), instances::Error>| match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmlab: error: {e}");
            ExitCode::from(e.exit_code())
        }
    };
    match cli.command {
        Command::Run(args) => match start(checked(args), started, &root) {
            Ok(code) => ExitCode::from(code),
            Err(e) => {
                eprintln!("vmlab: error: {e}");
                ExitCode::from(e.exit_code())
            }
        },
        Command::Exec(a) => {
            let opts = instances::ExecOptions {
                name: a.name,
                command: a.command,
                env: a.env,
                workdir: a.workdir,
                user: a.user,
                interactive: a.interactive,
                tty: a.tty,
            };
            match instances::exec(&root, opts) {
                Ok(code) => ExitCode::from(code),
                Err(e) => {
                    eprintln!("vmlab: error: {e}");
                    ExitCode::from(e.exit_code())
                }
            }
        }
        Command::Ps => done(instances::ps(&root, &mut std::io::stdout())),
        Command::Logs(a) => done(instances::logs(
            &root,
            &a.name,
            a.follow,
            &mut std::io::stdout(),
        )),
        Command::Kill(a) => done(instances::kill(&root, &a.name, a.signal)),
        Command::Stop(a) => done(
            instances::stop(&root, &a.name, std::time::Duration::from_secs(a.timeout))
                .map(|()| println!("{}", a.name)),
        ),
        Command::Rm(a) => {
            let mut code = ExitCode::SUCCESS;
            for name in &a.names {
                match instances::rm(&root, name, a.force) {
                    Ok(()) => println!("{name}"),
                    Err(e) => {
                        eprintln!("vmlab: error: {e}");
                        code = ExitCode::from(e.exit_code());
                    }
                }
            }
            code
        }

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
        Command::Trace(TraceCommand::Report(args)) => match trace_report(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("vmlab: error: {e}");
                ExitCode::from(EXIT_VMLAB_ERROR)
            }
        },
    }
}

/// Usage rules of `vmlab run` that clap's attributes cannot say: clap
/// skips `requires = "raw"` on --entry and --mode when --kernel (which
/// conflicts with --raw) is given.
fn checked(args: RunArgs) -> RunArgs {
    if args.raw.is_none() && (args.entry.is_some() || args.mode.is_some()) {
        use clap::CommandFactory;
        Cli::command()
            .error(
                clap::error::ErrorKind::MissingRequiredArgument,
                "--entry and --mode go with --raw IMAGE",
            )
            .exit();
    }
    args
}

/// `vmlab trace report`: the summary on stdout, the SVG where asked.
fn trace_report(args: &TraceReportArgs) -> Result<(), String> {
    use vmlab::trace::report;
    let trace = report::Trace::read(&args.file).map_err(|e| e.to_string())?;
    let summary = report::summarize(&trace);
    print!("{}", report::text(&trace, &summary));
    if let Some(out) = &args.svg {
        std::fs::write(out, report::svg(&trace, &summary))
            .map_err(|e| format!("cannot write {}: {e}", out.display()))?;
    }
    Ok(())
}

/// `vmlab run`: in the foreground, or with `--detach` as a background VMM
/// that outlives this process. A named VM (`--name`, or any detached one)
/// has a state directory for as long as its VMM runs.
fn start(
    mut args: RunArgs,
    started: Instant,
    root: &std::path::Path,
) -> Result<u8, vmlab::run::Error> {
    // --agent: the VM starts as a detached, agent-only one; this process
    // then runs the command in it as `vmlab exec` would, and stops it.
    let through_agent = args.agent.then(|| std::mem::take(&mut args.command));
    args.detach |= args.agent;
    let name = match (&args.name, args.detach) {
        (Some(name), _) => name.clone(),
        (None, true) => format!("vm-{}", std::process::id()),
        (None, false) => {
            return vmlab::run::run(args, started, vmlab::run::Streams::detect(), None)
        }
    };
    let owner = instances::create(root, &name)?;
    if args.detach {
        // Before any thread exists: the VMM is forked from here.
        match instances::daemonize(&owner.paths.console())? {
            Forked::Parent => {
                // The daemon holds the lock now (the same open file).
                drop(owner);
                let ready = instances::wait_ready(
                    root,
                    &name,
                    std::time::Duration::from_secs(args.ready_timeout),
                );
                let Some(command) = through_agent else {
                    ready?;
                    println!("{name}");
                    return Ok(0);
                };
                let status = ready.and_then(|()| run_in_agent(root, &name, command));
                // Whatever the command did, the VM goes with it.
                let stopped = instances::stop(root, &name, std::time::Duration::from_secs(10));
                let status = status?;
                stopped?;
                return Ok(status);
            }
            Forked::Daemon => {}
        }
    }
    let result = run_named(args, started, &owner, &name);
    if let Err(e) = &result {
        // The daemon's stderr is the console log.
        eprintln!("vmlab: error: {e}");
    }
    if let Err(e) = owner.remove() {
        eprintln!("vmlab: error: {e}");
    }
    result
}

/// `vmlab run --agent -- COMMAND`, once the VM's agent answers: COMMAND
/// with this process's stdin, stdout and stderr, each its own stream (a
/// terminal when both ends are one), like `vmlab exec -i [-t]`.
fn run_in_agent(
    root: &std::path::Path,
    name: &str,
    command: Vec<String>,
) -> Result<u8, instances::Error> {
    use std::io::IsTerminal;
    let tty = std::io::stdin().is_terminal() && std::io::stdout().is_terminal();
    instances::exec(
        root,
        instances::ExecOptions {
            name: name.to_string(),
            command,
            env: Vec::new(),
            workdir: None,
            user: None,
            interactive: true,
            tty,
        },
    )
}

fn run_named(
    args: RunArgs,
    started: Instant,
    owner: &Owner,
    name: &str,
) -> Result<u8, vmlab::run::Error> {
    let record = named::Record {
        name: name.to_string(),
        pid: 0,
        created: named::now(),
        // What boots: the kernel, or a --raw image.
        kernel: args
            .kernel
            .clone()
            .or_else(|| args.raw.clone())
            .unwrap_or_default(),
        memory: args.memory,
        cpus: args.cpus,
        command: args.command.clone(),
        cid: args
            .vsock
            .as_ref()
            .map_or(vmlab::run::DEFAULT_CID, |v| v.cid),
        vsock: Default::default(),
        console: Default::default(),
    };
    instances::record(owner, record)?;
    vmlab::run::run(args, started, vmlab::run::Streams::detect(), Some(owner))
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
