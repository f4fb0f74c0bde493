//! runc's command line, for the engines: `vmlab-runtime [--root DIR]
//! [--log FILE] [--log-format text|json] [--debug] VERB ...`.
//!
//! Each verb is a function below that loads or makes the container's state
//! ([`super::state`]) and returns a `Result`. A failure is one line in the
//! `--log` file (as a JSON object with `--log-format json`, which is where
//! containerd's shim reads the message it shows) and on stderr without a
//! log, and exit status 1.

use std::ffi::OsString;
use std::fs;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand, ValueEnum};

use super::spec::{self, NetNs, RuntimeConfig};
use super::state::{self, Container, Record, Status};
use super::{monitor, net, process, Error, Result, RUNTIME_NAME};

/// The runtime's command line (runc's).
#[derive(Debug, Parser)]
#[command(
    name = "vmlab-runtime",
    version,
    about = "vmlab as an OCI runtime: each container is a micro-VM (runc's command line)"
)]
pub struct RuntimeCli {
    /// Where containers' state lives.
    #[arg(long, global = true, value_name = "DIR")]
    pub root: Option<PathBuf>,
    /// Where log lines go (default: stderr).
    #[arg(long, global = true, value_name = "FILE")]
    pub log: Option<PathBuf>,
    /// The log's format.
    #[arg(long = "log-format", global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log debug lines too.
    #[arg(long, global = true)]
    pub debug: bool,
    /// Accepted for runc compatibility (a VM has no host cgroup of its own).
    #[arg(long = "systemd-cgroup", global = true)]
    pub systemd_cgroup: bool,
    /// Accepted for runc compatibility.
    #[arg(long, global = true, value_name = "VALUE")]
    pub rootless: Option<String>,
    /// The verb.
    #[command(subcommand)]
    pub command: Verb,
}

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// `time="..." level=error msg="..."`.
    Text,
    /// One JSON object per line.
    Json,
}

/// The runtime's verbs.
#[derive(Debug, Subcommand)]
pub enum Verb {
    /// Create a container (its VM starts at `start`).
    Create(CreateArgs),
    /// Start a created container.
    Start(IdArg),
    /// Print a container's state (the OCI state JSON).
    State(IdArg),
    /// Send a signal to a container's process.
    Kill(KillArgs),
    /// Delete a container.
    Delete(DeleteArgs),
    /// Run another process in a running container.
    Exec(ExecArgs),
    /// List a container's host processes.
    Ps(PsArgs),
    /// Pause a container (its VM's vCPUs).
    Pause(IdArg),
    /// Resume a paused container.
    Resume(IdArg),
    /// Update a container's resources (accepted; a VM's RAM and vCPUs are
    /// fixed at boot).
    Update(UpdateArgs),
    /// Print what this runtime supports (JSON).
    Features,
    /// List containers.
    List(ListArgs),
    /// The pid-file process (started by `create`).
    #[command(name = "__monitor", hide = true)]
    Monitor {
        /// The container's state directory.
        dir: PathBuf,
        /// Its VM's name.
        vm: String,
    },
    /// An exec process (started by `exec`).
    #[command(name = "__exec", hide = true)]
    ExecProcess {
        /// The exec's options file.
        file: PathBuf,
    },
}

/// A container ID.
#[derive(Debug, clap::Args)]
pub struct IdArg {
    /// The container ID.
    pub id: String,
}

/// `create`.
#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    /// The bundle directory (default: the current directory).
    #[arg(long, short = 'b', value_name = "DIR")]
    pub bundle: Option<PathBuf>,
    /// Where to write the pid of the container's host process.
    #[arg(long, value_name = "FILE")]
    pub pid_file: Option<PathBuf>,
    /// The Unix socket that gets the pty master (with `process.terminal`).
    #[arg(long, value_name = "PATH")]
    pub console_socket: Option<PathBuf>,
    /// Accepted for runc compatibility.
    #[arg(long)]
    pub no_pivot: bool,
    /// Accepted for runc compatibility.
    #[arg(long)]
    pub no_new_keyring: bool,
    /// Accepted for runc compatibility (extra fds do not cross into a VM).
    #[arg(long, value_name = "N")]
    pub preserve_fds: Option<u32>,
    /// The container ID.
    pub id: String,
}

/// `kill`.
#[derive(Debug, clap::Args)]
pub struct KillArgs {
    /// Signal every process of the container (the VM and its execs).
    #[arg(long, short = 'a')]
    pub all: bool,
    /// The container ID.
    pub id: String,
    /// The signal: a number or a name (KILL, SIGKILL).
    #[arg(default_value = "SIGTERM")]
    pub signal: String,
}

/// `delete`.
#[derive(Debug, clap::Args)]
pub struct DeleteArgs {
    /// Kill a running container first; a missing one is not an error.
    #[arg(long, short = 'f')]
    pub force: bool,
    /// The container ID.
    pub id: String,
}

/// `exec`.
#[derive(Debug, clap::Args)]
pub struct ExecArgs {
    /// The process, as the OCI spec's `process` JSON (`-`: stdin).
    #[arg(long, short = 'p', value_name = "FILE")]
    pub process: Option<PathBuf>,
    /// Do not wait for the process: its host process's pid goes to
    /// --pid-file and carries its exit status.
    #[arg(long, short = 'd')]
    pub detach: bool,
    /// Where to write the exec's host process pid.
    #[arg(long, value_name = "FILE")]
    pub pid_file: Option<PathBuf>,
    /// The Unix socket that gets the pty master (with a terminal).
    #[arg(long, value_name = "PATH")]
    pub console_socket: Option<PathBuf>,
    /// A terminal (without --process).
    #[arg(long, short = 't')]
    pub tty: bool,
    /// The working directory (without --process).
    #[arg(long, value_name = "DIR")]
    pub cwd: Option<String>,
    /// K=V (without --process).
    #[arg(long, short = 'e', value_name = "K=V")]
    pub env: Vec<String>,
    /// UID[:GID] (without --process).
    #[arg(long, short = 'u', value_name = "UID[:GID]")]
    pub user: Option<String>,
    /// Accepted for runc compatibility.
    #[arg(long, value_name = "N")]
    pub preserve_fds: Option<u32>,
    /// Accepted for runc compatibility.
    #[arg(long)]
    pub no_new_privs: bool,
    /// Accepted for runc compatibility (capabilities are the guest's).
    #[arg(long = "cap", short = 'c', value_name = "CAP")]
    pub caps: Vec<String>,
    /// The container ID.
    pub id: String,
    /// The command (without --process).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
}

/// `ps`.
#[derive(Debug, clap::Args)]
pub struct PsArgs {
    /// table or json.
    #[arg(long, short = 'f', default_value = "table")]
    pub format: String,
    /// The container ID.
    pub id: String,
    /// Accepted for runc compatibility (ps(1) options).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub ps_args: Vec<String>,
}

/// `update`.
#[derive(Debug, clap::Args)]
pub struct UpdateArgs {
    /// The new `linux.resources` JSON (`-`: stdin).
    #[arg(long, short = 'r', value_name = "FILE")]
    pub resources: Option<PathBuf>,
    /// Every other runc update flag (--memory, --cpu-quota, ...): accepted.
    #[arg(long = "memory", value_name = "BYTES")]
    pub memory: Option<String>,
    /// Accepted.
    #[arg(long = "cpu-quota", value_name = "N")]
    pub cpu_quota: Option<String>,
    /// Accepted.
    #[arg(long = "cpu-period", value_name = "N")]
    pub cpu_period: Option<String>,
    /// Accepted.
    #[arg(long = "cpuset-cpus", value_name = "LIST")]
    pub cpuset_cpus: Option<String>,
    /// Accepted.
    #[arg(long = "pids-limit", value_name = "N")]
    pub pids_limit: Option<String>,
    /// The container ID.
    pub id: String,
}

/// `list`.
#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// table or json.
    #[arg(long, short = 'f', default_value = "table")]
    pub format: String,
    /// IDs only.
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

/// Where log lines go.
struct Log {
    file: Option<fs::File>,
    json: bool,
    debug: bool,
}

impl Log {
    fn open(cli: &RuntimeCli) -> Log {
        let file = cli.log.as_ref().and_then(|p| {
            fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(p)
                .ok()
        });
        Log {
            file,
            json: cli.log_format == LogFormat::Json,
            debug: cli.debug,
        }
    }

    fn line(&self, level: &str, msg: &str) {
        if level == "debug" && !self.debug {
            return;
        }
        let time = state::rfc3339_now();
        match &self.file {
            Some(f) => {
                let mut f: &fs::File = f;
                let line = match self.json {
                    true => {
                        serde_json::json!({"level": level, "msg": msg, "time": time}).to_string()
                    }
                    false => format!("time=\"{time}\" level={level} msg={msg:?}"),
                };
                let _ = writeln!(f, "{line}");
            }
            None => eprintln!("vmlab-runtime: {level}: {msg}"),
        }
    }

    fn warn(&self, msg: &str) {
        self.line("warning", msg)
    }

    fn debug(&self, msg: &str) {
        self.line("debug", msg)
    }
}

/// The runtime's main, for `argv[0]` = `vmlab-runtime`.
pub fn main(args: Vec<OsString>) -> ExitCode {
    // The shim's own sockets leak into `create` and `start` (fd 3 and
    // up): nothing this process starts may keep them.
    cloexec_from(3);
    let cli = match RuntimeCli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    let log = Log::open(&cli);
    let root = cli
        .root
        .clone()
        .unwrap_or_else(|| PathBuf::from(state::DEFAULT_ROOT));
    let result = match cli.command {
        Verb::Monitor { dir, vm } => return ExitCode::from(monitor::main(&dir, &vm)),
        Verb::ExecProcess { file } => return ExitCode::from(process::exec_main(&file)),
        Verb::Create(a) => create(&root, a, &log),
        Verb::Start(a) => start(&root, &a.id, &log),
        Verb::State(a) => print_state(&root, &a.id),
        Verb::Kill(a) => kill(&root, &a, &log),
        Verb::Delete(a) => delete(&root, &a.id, a.force, &log),
        Verb::Exec(a) => return exit(exec(&root, a, &log), &log),
        Verb::Ps(a) => ps(&root, &a),
        Verb::Pause(a) => pause(&root, &a.id, true),
        Verb::Resume(a) => pause(&root, &a.id, false),
        Verb::Update(a) => update(&root, &a, &log),
        Verb::Features => features(),
        Verb::List(a) => list(&root, &a),
    };
    exit(result.map(|()| 0), &log)
}

fn exit(result: Result<u8>, log: &Log) -> ExitCode {
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            // The log for containerd's shim (create, start), stderr for
            // the calls whose output it reads instead (kill, delete) and
            // for Podman: as runc does.
            log.line("error", &e.to_string());
            if log.file.is_some() {
                eprintln!("vmlab-runtime: {e}");
            }
            ExitCode::from(1)
        }
    }
}

/// Marks every fd from `first` up close-on-exec.
fn cloexec_from(first: i32) {
    const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC only sets flags on fds;
    // no memory is touched.
    let r = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first as libc::c_uint,
            libc::c_uint::MAX,
            CLOSE_RANGE_CLOEXEC,
        )
    };
    if r == 0 {
        return;
    }
    // Older kernels: one fcntl per open fd.
    let Ok(dir) = fs::read_dir("/proc/self/fd") else {
        return;
    };
    let fds: Vec<i32> = dir
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|&fd| fd >= first)
        .collect();
    for fd in fds {
        // SAFETY: F_SETFD on an fd number; a closed one just fails.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
}

fn load(root: &Path, id: &str) -> Result<(Container, Record)> {
    let c = Container::new(root, id)?;
    let r = c.load(id)?;
    Ok((c, r))
}

fn host_cpus() -> u32 {
    std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1)
}

// ---------------------------------------------------------------- create

fn create(root: &Path, a: CreateArgs, log: &Log) -> Result<()> {
    let container = Container::new(root, &a.id)?;
    let bundle = match &a.bundle {
        Some(b) => b.clone(),
        None => std::env::current_dir().map_err(Error::io("the current directory"))?,
    };
    let bundle = bundle
        .canonicalize()
        .map_err(Error::io(format!("bundle {}", bundle.display())))?;
    let spec = spec::load(&bundle)?;
    let config = RuntimeConfig::load()?;
    let plan = spec::plan(&spec, &bundle, &config, host_cpus())?;
    spec::prepare_readonly_root(&spec, &bundle)?;
    for s in &plan.skipped {
        log.warn(&format!("not in the VM: {s}"));
    }
    log.debug(&format!("vmlab run {}", plan.run_args.join(" ")));
    let console = match (plan.terminal, &a.console_socket) {
        (true, Some(s)) => Some(s.clone()),
        (true, None) => {
            return Err(Error::msg(
                "process.terminal is set but no --console-socket was given",
            ))
        }
        (false, Some(_)) => {
            return Err(Error::msg(
                "--console-socket was given but process.terminal is not set",
            ))
        }
        (false, None) => None,
    };
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o711)
        .create(root)
        .map_err(Error::io(format!("create {}", root.display())))?;
    match fs::DirBuilder::new().mode(0o711).create(&container.dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(Error::msg(format!("container {} already exists", a.id)))
        }
        Err(e) => return Err(Error::io(format!("create {}", container.dir.display()))(e)),
    }
    // From here on a failure removes what was made.
    let made = create_in(
        &container,
        &a,
        bundle,
        &spec,
        &plan,
        console.as_deref(),
        log,
    );
    if made.is_err() {
        let _ = remove_container(&container, log);
    }
    made
}

#[allow(clippy::too_many_arguments)]
fn create_in(
    container: &Container,
    a: &CreateArgs,
    bundle: PathBuf,
    spec: &oci_spec::runtime::Spec,
    plan: &spec::Plan,
    console: Option<&Path>,
    log: &Log,
) -> Result<()> {
    let root = container
        .dir
        .parent()
        .ok_or_else(|| Error::msg("state directory without a parent"))?;
    let vm = state::vm_name(root, &a.id);
    fs::create_dir_all(container.execs()).map_err(Error::io("create the execs directory"))?;
    let plan_json =
        serde_json::to_string(plan).map_err(|e| Error::msg(format!("encode the plan: {e}")))?;
    state::write_atomic(&container.plan(), &plan_json)?;
    mkfifo(&container.fifo())?;
    let mut record = Record {
        id: a.id.clone(),
        bundle,
        pid: 0,
        start_time: 0,
        created: state::rfc3339_now(),
        started: false,
        paused: false,
        vm: vm.clone(),
        annotations: spec.annotations().clone().unwrap_or_default(),
        netns: match &plan.netns {
            NetNs::Path(p) => Some(p.clone()),
            _ => None,
        },
    };
    container.save(&record)?;

    let pty = process::console(console)?;
    let (sync_r, sync_w) = monitor::sync_pipe()?;
    let mut cmd = Command::new("/proc/self/exe");
    cmd.arg0(RUNTIME_NAME)
        .arg("__monitor")
        .arg(&container.dir)
        .arg(&vm)
        .env(monitor::SYNC_ENV, sync_w.as_raw_fd().to_string());
    let w = sync_w.as_raw_fd();
    let slave = pty.as_ref().map(|p| p.slave.as_raw_fd());
    // SAFETY: the closure runs in the forked child before exec and only
    // makes async-signal-safe calls (fcntl, setsid, ioctl, dup2).
    unsafe {
        cmd.pre_exec(move || {
            if libc::fcntl(w, libc::F_SETFD, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            process::new_session(slave)
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(Error::io("start the container's monitor"))?;
    drop(sync_w);
    drop(pty);
    let said = read_sync(sync_r, Duration::from_secs(30));
    if !matches!(said.as_deref(), Ok(b) if b == monitor::READY) {
        let _ = child.kill();
        let status = child.wait().ok();
        let why = match said {
            Ok(b) if !b.is_empty() => String::from_utf8_lossy(&b).trim().to_string(),
            Ok(_) => format!(
                "it exited ({})",
                status.map_or("?".into(), |s| s.to_string())
            ),
            Err(e) => e.to_string(),
        };
        return Err(Error::msg(format!("the container's monitor failed: {why}")));
    }
    record.pid = child.id();
    record.start_time = state::start_time(record.pid)
        .ok_or_else(|| Error::msg("the container's monitor exited during create"))?;
    container.save(&record)?;
    let after = (|| -> Result<()> {
        if let Some(p) = &a.pid_file {
            state::write_atomic(p, &record.pid.to_string())?;
        }
        let hooks = spec.hooks().clone().unwrap_or_default();
        let st = state::state_json(&record, Status::Created);
        run_hooks("prestart", hooks.prestart(), &st, log)?;
        run_hooks("createRuntime", hooks.create_runtime(), &st, log)?;
        for (name, h) in [
            ("createContainer", hooks.create_container()),
            ("startContainer", hooks.start_container()),
        ] {
            if h.as_ref().is_some_and(|h| !h.is_empty()) {
                log.warn(&format!(
                    "{name} hooks are not run: they belong in the container's namespaces, \
                     which are inside the VM"
                ));
            }
        }
        Ok(())
    })();
    if let Err(e) = after {
        let _ = child.kill();
        let _ = child.wait();
        return Err(e);
    }
    // The child is reparented to the engine's shim (a subreaper) when this
    // process exits; it is not waited for here.
    std::mem::forget(child);
    Ok(())
}

fn mkfifo(path: &Path) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| Error::msg(format!("{}: NUL in path", path.display())))?;
    // SAFETY: mkfifo on a NUL-terminated path.
    match unsafe { libc::mkfifo(c.as_ptr(), 0o600) } {
        0 => Ok(()),
        _ => Err(Error::io(format!("mkfifo {}", path.display()))(
            std::io::Error::last_os_error(),
        )),
    }
}

/// Reads the sync pipe to its end (the monitor closes it after its line),
/// at most `timeout`.
fn read_sync(fd: OwnedFd, timeout: Duration) -> Result<Vec<u8>> {
    use std::os::fd::AsFd;
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    let mut f = fs::File::from(fd);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ready = super::wait_readable(f.as_fd(), Some(left))
            .map_err(Error::io("poll the monitor's pipe"))?;
        if !ready {
            return Err(Error::msg(format!(
                "no word within {} s",
                timeout.as_secs()
            )));
        }
        let mut buf = [0u8; 512];
        match f.read(&mut buf) {
            Ok(0) => return Ok(out),
            Ok(n) if out.len() < 4096 => out.extend_from_slice(&buf[..n]),
            Ok(_) => return Ok(out),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io("read the monitor's pipe")(e)),
        }
    }
}

/// The longest a hook may run without a timeout of its own.
const HOOK_TIMEOUT: Duration = Duration::from_secs(120);

/// Runs the hooks with the state JSON on their stdin, in order; the first
/// failure is the error.
fn run_hooks(
    kind: &str,
    hooks: &Option<Vec<oci_spec::runtime::Hook>>,
    st: &serde_json::Value,
    log: &Log,
) -> Result<()> {
    for h in hooks.iter().flatten() {
        log.debug(&format!("{kind} hook {}", h.path().display()));
        run_hook(kind, h, st)?;
    }
    Ok(())
}

fn run_hook(kind: &str, h: &oci_spec::runtime::Hook, st: &serde_json::Value) -> Result<()> {
    let what = format!("{kind} hook {}", h.path().display());
    let mut cmd = Command::new(h.path());
    let args = h.args().clone().unwrap_or_default();
    if let Some((first, rest)) = args.split_first() {
        cmd.arg0(first).args(rest);
    }
    if let Some(env) = h.env() {
        cmd.env_clear();
        for kv in env {
            if let Some((k, v)) = kv.split_once('=') {
                cmd.env(k, v);
            }
        }
    }
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(Error::io(format!("start {what}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        // A hook that does not read its stdin is not an error.
        let _ = stdin.write_all(st.to_string().as_bytes());
    }
    let stderr = child.stderr.take().map(|mut e| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = (&mut e).take(8192).read_to_end(&mut buf);
            buf
        })
    });
    let timeout = h
        .timeout()
        .filter(|&t| t > 0)
        .map_or(HOOK_TIMEOUT, |t| Duration::from_secs(t as u64));
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Error::msg(format!(
                    "{what} timed out after {} s",
                    timeout.as_secs()
                )));
            }
            Err(e) => return Err(Error::io(format!("wait for {what}"))(e)),
        }
    };
    let err = stderr.and_then(|t| t.join().ok()).unwrap_or_default();
    match status.success() {
        true => Ok(()),
        false => Err(Error::msg(format!(
            "{what} failed ({status}): {}",
            String::from_utf8_lossy(&err).trim()
        ))),
    }
}

// ---------------------------------------------------------------- start

fn start(root: &Path, id: &str, log: &Log) -> Result<()> {
    let (container, mut record) = load(root, id)?;
    match state::status(&record) {
        Status::Created => {}
        Status::Creating => return Err(Error::msg(format!("container {id} is being created"))),
        s => {
            return Err(Error::msg(format!(
                "cannot start container {id}: it is {} (start runs once)",
                s.as_str()
            )))
        }
    }
    let fifo = container.fifo();
    let mut f = fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ENXIO) | Some(libc::ENOENT) => {
                let why = fs::read_to_string(container.failure())
                    .map(|w| format!(" ({})", w.trim()))
                    .unwrap_or_default();
                Error::msg(format!(
                    "cannot start container {id}: its monitor is gone{why}"
                ))
            }
            _ => Error::io(format!("open {}", fifo.display()))(e),
        })?;
    f.write_all(b"1")
        .map_err(Error::io(format!("write {}", fifo.display())))?;
    drop(f);
    record.started = true;
    container.save(&record)?;
    if let Ok(spec) = spec::load(&record.bundle) {
        let hooks = spec.hooks().clone().unwrap_or_default();
        let st = state::state_json(&record, Status::Running);
        // Poststart failures are logged, not fatal (the spec says so).
        if let Err(e) = run_hooks("poststart", hooks.poststart(), &st, log) {
            log.warn(&e.to_string());
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- state, list, ps

fn print_state(root: &Path, id: &str) -> Result<()> {
    let (_, record) = load(root, id)?;
    let st = state::state_json(&record, state::status(&record));
    let text =
        serde_json::to_string_pretty(&st).map_err(|e| Error::msg(format!("encode state: {e}")))?;
    println!("{text}");
    Ok(())
}

fn list(root: &Path, a: &ListArgs) -> Result<()> {
    let mut states = Vec::new();
    for (id, c) in state::list(root) {
        if let Ok(r) = c.load(&id) {
            let s = state::status(&r);
            states.push((r, s));
        }
    }
    match a.format.as_str() {
        "json" => {
            let v: Vec<serde_json::Value> = states
                .iter()
                .map(|(r, s)| state::state_json(r, *s))
                .collect();
            println!("{}", serde_json::Value::Array(v));
        }
        "table" => {
            if !a.quiet {
                println!("ID\tPID\tSTATUS\tBUNDLE\tCREATED\tOWNER");
            }
            for (r, s) in &states {
                match a.quiet {
                    true => println!("{}", r.id),
                    false => println!(
                        "{}\t{}\t{}\t{}\t{}\troot",
                        r.id,
                        if *s == Status::Stopped { 0 } else { r.pid },
                        s.as_str(),
                        r.bundle.display(),
                        r.created
                    ),
                }
            }
        }
        other => {
            return Err(Error::msg(format!(
                "invalid format '{other}' (table or json)"
            )))
        }
    }
    Ok(())
}

/// The container's host processes: the VM's monitor (the VMM) and exec
/// processes; a guest's own processes are inside the VM.
fn host_pids(container: &Container, record: &Record) -> Vec<u32> {
    let mut pids = Vec::new();
    if state::status(record) != Status::Stopped {
        pids.push(record.pid);
    }
    pids.extend(container.exec_pids());
    pids
}

fn ps(root: &Path, a: &PsArgs) -> Result<()> {
    let (container, record) = load(root, &a.id)?;
    let pids = host_pids(&container, &record);
    match a.format.as_str() {
        "json" => println!("{}", serde_json::json!(pids)),
        "table" => {
            println!("PID\tCMD");
            for p in pids {
                let cmd = fs::read(format!("/proc/{p}/cmdline"))
                    .map(|b| {
                        b.split(|&c| c == 0)
                            .map(|s| String::from_utf8_lossy(s).into_owned())
                            .collect::<Vec<_>>()
                            .join(" ")
                    })
                    .unwrap_or_default();
                println!("{p}\t{}", cmd.trim());
            }
        }
        other => {
            return Err(Error::msg(format!(
                "invalid format '{other}' (table or json)"
            )))
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- kill

/// A signal by number or by name (`KILL`, `SIGKILL`, `kill`): `vmlab
/// kill`'s parser.
pub fn parse_signal(s: &str) -> Result<i32> {
    crate::cli::parse_signal(s)
        .map(i32::from)
        .map_err(Error::Msg)
}

/// How long `kill` waits for a booting guest's agent before it falls back
/// to signalling the VMM.
const KILL_AGENT_WAIT: Duration = Duration::from_secs(20);

fn kill(root: &Path, a: &KillArgs, log: &Log) -> Result<()> {
    let sig = parse_signal(&a.signal)?;
    let (container, record) = load(root, &a.id)?;
    let status = state::status(&record);
    let execs = container.exec_pids();
    if status == Status::Stopped || status == Status::Creating {
        if a.all && !execs.is_empty() {
            execs.iter().for_each(|&p| {
                crate::instances::signal_pid(p, sig);
            });
            return Ok(());
        }
        // containerd's shim treats this message as "already gone".
        return Err(Error::msg("container not running"));
    }
    if a.all {
        execs.iter().for_each(|&p| {
            crate::instances::signal_pid(p, sig);
        });
    }
    if sig == libc::SIGKILL || status == Status::Created {
        // Before start the monitor waits on the fifo; after it, it is the
        // VMM. SIGKILL ends the VM at once (its virtiofsd die with it).
        if record.paused {
            crate::instances::signal_pid(record.pid, libc::SIGCONT);
        }
        crate::instances::signal_pid(record.pid, sig);
        return Ok(());
    }
    if sig == libc::SIGWINCH {
        // The resize itself reaches the guest through the pty.
        return Ok(());
    }
    let vm_root = Path::new(state::VM_ROOT);
    match process::wait_for_agent(vm_root, &record.vm, KILL_AGENT_WAIT)
        .map_err(|e| e.to_string())
        .and_then(|()| {
            crate::instances::kill(vm_root, &record.vm, sig as u8).map_err(|e| e.to_string())
        }) {
        Ok(()) => Ok(()),
        Err(e)
            if matches!(
                sig,
                libc::SIGTERM | libc::SIGINT | libc::SIGHUP | libc::SIGQUIT
            ) =>
        {
            log.warn(&format!(
                "the guest agent did not take signal {sig} ({e}): the VMM gets it and shuts \
                 the VM down"
            ));
            crate::instances::signal_pid(record.pid, sig);
            Ok(())
        }
        Err(e) => Err(Error::msg(format!(
            "signal {sig} to container {}: {e}",
            a.id
        ))),
    }
}

// ---------------------------------------------------------------- delete

fn delete(root: &Path, id: &str, force: bool, log: &Log) -> Result<()> {
    let container = Container::new(root, id)?;
    let record = match container.load(id) {
        Ok(r) => r,
        Err(_) if force && !container.exists() => return Ok(()),
        Err(e) if !container.exists() => return Err(e),
        Err(e) => {
            if force {
                log.warn(&format!("{e}: removing the state anyway"));
                return remove_container(&container, log);
            }
            return Err(e);
        }
    };
    let status = state::status(&record);
    match status {
        Status::Stopped => {}
        Status::Created | Status::Creating => {}
        s if !force => {
            return Err(Error::msg(format!(
                "cannot delete container {id} that is not stopped: {}",
                s.as_str()
            )))
        }
        _ => {}
    }
    if status != Status::Stopped {
        if record.paused {
            crate::instances::signal_pid(record.pid, libc::SIGCONT);
        }
        crate::instances::signal_pid(record.pid, libc::SIGKILL);
    }
    for p in container.exec_pids() {
        crate::instances::signal_pid(p, libc::SIGKILL);
    }
    if record.pid != 0 {
        wait_stopped(&record, Duration::from_secs(10));
    }
    cleanup_vm(&record.vm, log);
    if let Some(ns) = &record.netns {
        if ns.exists() {
            if let Err(e) = net::in_netns(ns, net::unwire_all) {
                log.warn(&format!("unwire {}: {e}", ns.display()));
            }
        }
    }
    if let Ok(spec) = spec::load(&record.bundle) {
        let hooks = spec.hooks().clone().unwrap_or_default();
        let st = state::state_json(&record, Status::Stopped);
        if let Err(e) = run_hooks("poststop", hooks.poststop(), &st, log) {
            log.warn(&e.to_string());
        }
    }
    remove_container(&container, log)
}

/// Waits until the monitor is gone or a zombie, at most `timeout`.
fn wait_stopped(record: &Record, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while state::status(record) != Status::Stopped && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Removes what is left of the container's VM under [`state::VM_ROOT`]
/// (a VMM killed with SIGKILL cannot clean up after itself).
fn cleanup_vm(vm: &str, log: &Log) {
    let vm_root = Path::new(state::VM_ROOT);
    match crate::named::probe(vm_root, vm) {
        Ok(crate::named::Probe::Missing) => {}
        Ok(crate::named::Probe::Stale(s)) => {
            if let Err(e) = s.remove() {
                log.warn(&format!("remove VM {vm}'s state: {e}"));
            }
        }
        Ok(crate::named::Probe::Running(_)) => {
            if let Err(e) = crate::instances::rm(vm_root, vm, true) {
                log.warn(&format!("remove VM {vm}: {e}"));
            }
        }
        Err(e) => log.warn(&format!("VM {vm}: {e}")),
    }
}

fn remove_container(container: &Container, log: &Log) -> Result<()> {
    match fs::remove_dir_all(&container.dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => {
            log.warn(&format!("remove {}: {e}", container.dir.display()));
            Err(Error::io(format!("remove {}", container.dir.display()))(e))
        }
    }
}

// ---------------------------------------------------------------- exec

fn read_json_arg(path: &Path) -> Result<Vec<u8>> {
    match path.as_os_str() == "-" {
        true => {
            let mut b = Vec::new();
            std::io::stdin()
                .take(1 << 20)
                .read_to_end(&mut b)
                .map_err(Error::io("read stdin"))?;
            Ok(b)
        }
        false => fs::read(path).map_err(Error::io(format!("read {}", path.display()))),
    }
}

fn exec(root: &Path, a: ExecArgs, log: &Log) -> Result<u8> {
    let (container, record) = load(root, &a.id)?;
    match state::status(&record) {
        Status::Running | Status::Created => {}
        s => {
            return Err(Error::msg(format!(
                "cannot exec in container {}: it is {}",
                a.id,
                s.as_str()
            )))
        }
    }
    let p: oci_spec::runtime::Process = match &a.process {
        Some(file) => {
            let bytes = read_json_arg(file)?;
            serde_json::from_slice(&bytes)
                .map_err(|e| Error::msg(format!("--process {}: {e}", file.display())))?
        }
        None => process_from_args(&a)?,
    };
    let opts = process::exec_options(&record.vm, &p)?;
    let console = match (opts.tty, &a.console_socket) {
        (true, Some(s)) => Some(s.clone()),
        (true, None) => return Err(Error::msg("a terminal needs --console-socket")),
        (false, _) => None,
    };
    let nonce = format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0)
    );
    let file = container.execs().join(format!("{nonce}.json"));
    let json =
        serde_json::to_string(&opts).map_err(|e| Error::msg(format!("encode the exec: {e}")))?;
    state::write_atomic(&file, &json)?;
    let pty = process::console(console.as_deref())?;
    let mut cmd = Command::new("/proc/self/exe");
    cmd.arg0(RUNTIME_NAME).arg("__exec").arg(&file);
    let slave = pty.as_ref().map(|p| p.slave.as_raw_fd());
    let detach = a.detach;
    // SAFETY: async-signal-safe calls only (setsid, ioctl, dup2).
    unsafe {
        cmd.pre_exec(move || match slave.is_some() || detach {
            true => process::new_session(slave),
            false => Ok(()),
        });
    }
    let mut child = cmd.spawn().map_err(|e| {
        let _ = fs::remove_file(&file);
        Error::io("start the exec process")(e)
    })?;
    drop(pty);
    let pid = child.id();
    if let Some(start) = state::start_time(pid) {
        let _ = state::write_atomic(
            &container.execs().join(format!("{nonce}.pid")),
            &format!("{pid} {start}"),
        );
    }
    if let Some(pf) = &a.pid_file {
        state::write_atomic(pf, &pid.to_string())?;
    }
    log.debug(&format!("exec {nonce}: pid {pid}"));
    if a.detach {
        std::mem::forget(child);
        return Ok(0);
    }
    let status = child.wait().map_err(Error::io("wait for the exec"))?;
    let _ = fs::remove_file(container.execs().join(format!("{nonce}.pid")));
    use std::os::unix::process::ExitStatusExt;
    Ok(match (status.code(), status.signal()) {
        (Some(c), _) => c as u8,
        (None, Some(s)) => (128 + s) as u8,
        _ => 1,
    })
}

/// The process for `exec ID CMD...` without `--process`.
fn process_from_args(a: &ExecArgs) -> Result<oci_spec::runtime::Process> {
    if a.command.is_empty() {
        return Err(Error::msg("exec needs --process FILE or a command"));
    }
    let (uid, gid) = match &a.user {
        None => (0, 0),
        Some(u) => {
            let (u, g) = u.split_once(':').unwrap_or((u, "0"));
            let p = |s: &str| {
                s.parse::<u32>()
                    .map_err(|_| Error::msg(format!("--user {s}: a number is needed")))
            };
            (p(u)?, p(g)?)
        }
    };
    let v = serde_json::json!({
        "terminal": a.tty,
        "user": {"uid": uid, "gid": gid},
        "args": a.command,
        "env": a.env,
        "cwd": a.cwd.clone().unwrap_or_else(|| "/".into()),
    });
    serde_json::from_value(v).map_err(|e| Error::msg(format!("exec: {e}")))
}

// ---------------------------------------------------------------- pause, update, features

fn pause(root: &Path, id: &str, pause: bool) -> Result<()> {
    let (container, mut record) = load(root, id)?;
    let status = state::status(&record);
    match (pause, status) {
        (true, Status::Running) | (false, Status::Paused) => {}
        (_, s) => {
            return Err(Error::msg(format!(
                "cannot {} container {id}: it is {}",
                if pause { "pause" } else { "resume" },
                s.as_str()
            )))
        }
    }
    // SIGSTOP stops every thread of the VMM: the vCPUs and the devices.
    let sig = if pause { libc::SIGSTOP } else { libc::SIGCONT };
    if !crate::instances::signal_pid(record.pid, sig) {
        return Err(Error::io(format!("signal the VMM (pid {})", record.pid))(
            std::io::Error::last_os_error(),
        ));
    }
    record.paused = pause;
    container.save(&record)
}

fn update(root: &Path, a: &UpdateArgs, log: &Log) -> Result<()> {
    let (_, record) = load(root, &a.id)?;
    if let Some(r) = &a.resources {
        let bytes = read_json_arg(r)?;
        let _: oci_spec::runtime::LinuxResources =
            serde_json::from_slice(&bytes).map_err(|e| Error::msg(format!("--resources: {e}")))?;
    }
    log.warn(&format!(
        "update of container {}: accepted, not applied (a VM's RAM and vCPUs are set at boot)",
        record.id
    ));
    Ok(())
}

fn features() -> Result<()> {
    let v = serde_json::json!({
        "ociVersionMin": "1.0.0",
        "ociVersionMax": "1.1.0",
        "hooks": ["prestart", "createRuntime", "poststart", "poststop"],
        "mountOptions": ["bind", "rbind", "ro", "rw", "rprivate", "private", "nosuid",
                         "nodev", "noexec", "size", "mode"],
        "linux": {
            "namespaces": ["network", "mount", "pid", "ipc", "uts"],
            "capabilities": [],
            "cgroup": {"v1": false, "v2": false, "systemd": false, "systemdUser": false},
            "seccomp": {"enabled": false},
            "apparmor": {"enabled": false},
            "selinux": {"enabled": false}
        },
        "annotations": {
            "org.vmlab.runtime": "micro-VM per container (virtio-fs root, vsock agent)"
        }
    });
    println!(
        "{}",
        serde_json::to_string_pretty(&v).map_err(|e| Error::msg(e.to_string()))?
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals() {
        assert_eq!(parse_signal("9").ok(), Some(9));
        assert_eq!(parse_signal("KILL").ok(), Some(9));
        assert_eq!(parse_signal("sigterm").ok(), Some(15));
        assert_eq!(parse_signal("SIGUSR1").ok(), Some(libc::SIGUSR1));
        assert!(parse_signal("0").is_err());
        assert!(parse_signal("65").is_err());
        assert!(parse_signal("NOPE").is_err());
    }

    #[test]
    fn runc_command_lines_parse() {
        let p = |s: &str| RuntimeCli::try_parse_from(s.split_whitespace());
        let c = p("vmlab-runtime --root /r --log /b/log.json --log-format json create --bundle /b --pid-file /b/init.pid abc");
        assert!(matches!(c.map(|c| c.command), Ok(Verb::Create(_))));
        assert!(p("vmlab-runtime kill --all abc 9").is_ok());
        assert!(p("vmlab-runtime delete --force abc").is_ok());
        assert!(p("vmlab-runtime exec --process /p.json --detach --pid-file /x abc").is_ok());
        assert!(p("vmlab-runtime ps --format json abc").is_ok());
        assert!(p("vmlab-runtime --systemd-cgroup state abc").is_ok());
        assert!(p("vmlab-runtime update --resources - abc").is_ok());
        assert!(p("vmlab-runtime create").is_err());
    }

    #[test]
    fn exec_without_process_file() {
        let a = ExecArgs {
            process: None,
            detach: false,
            pid_file: None,
            console_socket: None,
            tty: false,
            cwd: Some("/tmp".into()),
            env: vec!["A=1".into()],
            user: Some("1000:1000".into()),
            preserve_fds: None,
            no_new_privs: false,
            caps: vec![],
            id: "x".into(),
            command: vec!["ls".into(), "-l".into()],
        };
        let p = process_from_args(&a).map_err(|e| e.to_string());
        let p = p.as_ref();
        assert_eq!(p.map(|p| p.user().uid()), Ok(1000));
        assert_eq!(
            p.map(|p| p.args().clone().unwrap_or_default()),
            Ok(vec!["ls".to_string(), "-l".to_string()])
        );
    }
}
