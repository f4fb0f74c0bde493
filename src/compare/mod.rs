//! `vmlab compare`: the same workload program run on the host, as a
//! container and as a micro-VM, measured side by side, and the claims of
//! the user's course notes about containers and VMs checked against the
//! numbers.
//!
//! Per repetition each environment is launched once, in a rotating order,
//! and runs every workload in sequence (a guest boot costs tens of seconds
//! on a nested-KVM host, so it is not repeated per workload):
//!
//! - host: `/bin/sh -c SCRIPT` with the image's `vmlab-workload` binary;
//! - container: `vmlab container --image IMAGE -- sh -c SCRIPT` (this very
//!   executable, so the real path is measured);
//! - micro-VM: `vmlab run --image IMAGE -- sh -c SCRIPT`.
//!
//! The script prints one JSON line per workload ([`script`]); the time from
//! spawning the launcher to its first line is the start cost, and the
//! network workload's server is reached from the host side through the
//! namespaces of [`netns`]. [`rows`] turns the runs into the table,
//! [`report`] renders it, [`chart`] draws it.

mod chart;
mod launch;
mod memory;
mod netns;
pub mod report;
pub mod rows;
pub mod sandbox;

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::host::HostKind;
use crate::image::ImageConfig;
use launch::{LaunchSpec, Launched, Next};
use memory::{MemCgroup, RssSampler};
use netns::TestNet;
use report::{Context, Env, HostInfo, Report, Unit};
use rows::{Footprint, MemoryUse, RunRecord, Sizes};

/// The TCP port of the network workload (inside the private namespaces).
const NET_PORT: u16 = 7430;
/// The client's connect window and I/O timeout, in seconds: generous,
/// since a nested-KVM guest on a busy 2-CPU host answers each round trip
/// in tens to hundreds of milliseconds.
const CLIENT_TIMEOUT: u64 = 60;
/// This very executable, as the kernel knows it: a comparison takes many
/// minutes, and a `cargo build` that replaces the file meanwhile must not
/// break the launches still to come (the path would then name the new
/// file, or nothing).
const SELF_EXE: &str = "/proc/self/exe";
/// How long a launch may take to exit once its output has ended.
const EXIT_GRACE: Duration = Duration::from_secs(30);

/// What `vmlab compare` was asked to do.
#[derive(Debug, Clone)]
pub struct CompareOptions {
    /// The image (OCI layout, `docker save` archive or root directory); it
    /// must contain `vmlab-workload` in its PATH.
    pub image: PathBuf,
    /// The guest kernel; `None`: `target/guest/vmlinux` of the tree this
    /// executable was built in.
    pub kernel: Option<PathBuf>,
    /// Launches per environment.
    pub repeat: u32,
    /// Guest RAM in bytes.
    pub vm_memory: u64,
    /// `vmlab container --runtime`.
    pub runtime: String,
    /// Workload sizes.
    pub sizes: Sizes,
    /// Longest a single launch may take.
    pub timeout: Duration,
    /// Whether to measure the network (needs root, `ip`, TUN/TAP).
    pub network: bool,
    /// Progress lines on stderr.
    pub progress: bool,
    /// The command line, for the report.
    pub command_line: String,
}

/// What stops `vmlab compare` before it has a report (a single
/// environment that fails only leaves reasons in its cells).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The image cannot be opened or unpacked.
    #[error("image: {0}")]
    Image(#[from] crate::image::Error),
    /// The host baseline's sandbox cannot be set up.
    #[error("{0}")]
    Sandbox(sandbox::Error),
    /// The image lacks the workload program.
    #[error("{}: the image has no executable vmlab-workload in {searched}; use an image that has it (scripts/build-sample-image.sh builds one)", image.display())]
    NoWorkload {
        /// The image.
        image: PathBuf,
        /// Where it was looked for.
        searched: String,
    },
    /// No `--kernel` and none in the build tree.
    #[error("no guest kernel: give --kernel PATH (target/guest/vmlinux was not found above {})", exe.display())]
    NoKernel {
        /// The running executable.
        exe: PathBuf,
    },
    /// A file operation failed.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The running executable cannot be found (it launches itself).
    #[error("cannot find the vmlab executable: {0}")]
    Exe(io::Error),
    /// The stop signals cannot be caught.
    #[error("installing signal handlers: {0}")]
    Signals(io::Error),
    /// SIGINT, SIGTERM or SIGHUP.
    #[error("stopped by signal {0}; every child, namespace and cgroup was removed")]
    Stopped(i32),
}

impl Error {
    /// vmlab's exit status: 128+N after signal N, else 125.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Stopped(sig) => u8::try_from(128 + sig).unwrap_or(125),
            _ => 125,
        }
    }
}

/// Progress lines on stderr.
struct Progress {
    on: bool,
    since: Instant,
}

impl Progress {
    fn say(&self, msg: &str) {
        if self.on {
            eprintln!(
                "compare [{:>6.1} s] {msg}",
                self.since.elapsed().as_secs_f64()
            );
        }
    }
}

/// Everything a launch needs.
struct RunCtx<'a> {
    opts: &'a CompareOptions,
    exe: PathBuf,
    /// The guest kernel: the copy every VM launch boots.
    kernel: PathBuf,
    /// The copy of vmlab-init every VM launch uses, if there is one.
    init: Option<PathBuf>,
    /// A private copy of the image's vmlab-workload, which the host
    /// baseline and the network client run (in `sandbox`).
    workload: PathBuf,
    /// How the image's binary is confined on the host.
    sandbox: sandbox::Sandbox,
    /// The host's working directory (its disk workload writes there).
    host_cwd: PathBuf,
    net: Option<&'a TestNet>,
    progress: &'a Progress,
}

/// Runs the comparison and returns its report.
pub fn run(opts: &CompareOptions) -> Result<Report, Error> {
    launch::install_stop_handlers().map_err(Error::Signals)?;
    let progress = Progress {
        on: opts.progress,
        since: Instant::now(),
    };
    let exe = std::env::current_exe().map_err(Error::Exe)?;
    let kernel = match &opts.kernel {
        Some(k) => k.clone(),
        None => default_kernel(&exe).ok_or_else(|| Error::NoKernel { exe: exe.clone() })?,
    };
    fs::metadata(&kernel).map_err(|source| Error::Io {
        what: "guest kernel",
        path: kernel.clone(),
        source,
    })?;

    progress.say("preparing the image: unpacked and its VM disk built once (cached), before any timing, as `docker pull` would be");
    let (rootfs, config) = crate::image::prepare_rootfs_dir(&opts.image)?;
    let workload = find_workload(&rootfs, &config).ok_or_else(|| Error::NoWorkload {
        image: opts.image.clone(),
        searched: path_dirs(&config).join(", "),
    })?;
    // A comparison takes many minutes, and the build tree may be rebuilt
    // meanwhile: every VM launch boots private copies of the kernel and
    // the init taken now (the disk is cached by the init's digest, so the
    // copy finds the disk built here).
    let scratch = ScratchDir::create()?;
    let pinned_kernel = scratch.pin(&kernel, "vmlinux")?;
    // The image's binary runs on the host as an unprivileged user, which
    // can reach neither the image cache under root's home nor a 0700
    // directory: it runs a copy, from the scratch directory.
    let sandbox = sandbox::Sandbox::for_host_baseline().map_err(Error::Sandbox)?;
    let pinned_workload = scratch.pin(&workload, "vmlab-workload")?;
    scratch.open_to(sandbox.ids)?;
    let init = crate::image::find_init();
    let pinned_init = match &init {
        Ok(p) => Some(scratch.pin(p, "vmlab-init")?),
        Err(_) => None,
    };
    let ext4 = init
        .and_then(|init| crate::image::prepare_ext4(&opts.image, &init))
        .map(|(disk, _)| disk)
        .map_err(|e| e.to_string());
    let footprint = measure_footprint(&opts.image, &rootfs, &ext4, &kernel);
    let host = host_info();
    progress.say(&format!(
        "host: {}, {} CPUs, Linux {}, {}",
        host.cpu, host.cores, host.kernel, host.kvm
    ));

    let net = match opts.network {
        true => TestNet::create().map_err(|e| e.to_string()),
        false => Err("disabled with --no-net".into()),
    };
    match &net {
        Ok(n) => progress.say(&format!(
            "network: namespaces {} and {} with a veth pair and the TAP {}",
            n.peer,
            n.srv,
            netns::TAP_NAME
        )),
        Err(why) => progress.say(&format!("network rows will not be measured: {why}")),
    }
    let ctx = RunCtx {
        opts,
        exe,
        kernel: pinned_kernel,
        init: pinned_init,
        workload: pinned_workload,
        sandbox,
        host_cwd: scratch.work(),
        net: net.as_ref().ok(),
        progress: &progress,
    };

    let mut runs = Vec::new();
    for rep in 1..=opts.repeat {
        for env in order(rep) {
            if let Some(sig) = launch::stop_requested() {
                return Err(Error::Stopped(sig));
            }
            progress.say(&format!(
                "repetition {rep}/{}: {} ...",
                opts.repeat,
                env.label()
            ));
            let rec = run_env(&ctx, env, rep)?;
            progress.say(&format!(
                "repetition {rep}/{}: {} done: {}",
                opts.repeat,
                env.label(),
                summary(&rec)
            ));
            runs.push(rec);
        }
    }
    let net_unavailable = net.as_ref().err().cloned();
    let memory_method = memory_method(&runs);
    let rows = rows::build_rows(
        &runs,
        &opts.sizes,
        &footprint,
        &memory_method,
        net_unavailable.as_deref(),
    );
    let context = Context {
        command: opts.command_line.clone(),
        setup: setup_lines(opts, &kernel, &runs),
        notes: notes(&host, &runs, net_unavailable.is_some(), &footprint),
        repeat: opts.repeat,
        runs: runs.iter().map(RunRecord::json).collect(),
        host,
    };
    Ok(Report { context, rows })
}

/// Writes the requested files and returns the Markdown (for stdout).
pub fn write_outputs(
    report: &Report,
    json: Option<&Path>,
    markdown: Option<&Path>,
    chart: Option<&Path>,
) -> Result<String, Error> {
    let write = |path: &Path, text: &str| {
        fs::write(path, text).map_err(|source| Error::Io {
            what: "writing",
            path: path.to_path_buf(),
            source,
        })
    };
    let md = report.markdown();
    if let Some(p) = json {
        // A Value always serializes.
        let text = serde_json::to_string_pretty(&report.json()).unwrap_or_default();
        write(p, &(text + "\n"))?;
    }
    if let Some(p) = markdown {
        write(p, &md)?;
    }
    if let Some(p) = chart {
        let title = format!(
            "vmlab compare on {} ({})",
            report.context.host.cpu, report.context.host.kvm
        );
        write(p, &chart::svg(&chart::groups(report), &title))?;
    }
    Ok(md)
}

/// The environments of repetition `rep` (1-based): each repetition starts
/// one further along, so no environment always runs first (on a cold
/// cache) or last.
fn order(rep: u32) -> [Env; 3] {
    let mut envs = Env::ALL;
    envs.rotate_left((rep.saturating_sub(1) % 3) as usize);
    envs
}

/// The shell script every environment runs: one JSON line per workload.
/// A workload that fails leaves a `{"workload":NAME,"failed":true,...}`
/// line after its error message (stderr is folded into stdout so the two
/// stay in order); `kernel` reports `uname -r` and the kernel's boot id;
/// the network server comes last, since the host side must reach it while
/// it waits.
pub fn script(workload: &str, s: &Sizes, net: bool) -> String {
    let mut lines = vec![
        format!("W={}", shell_quote(workload)),
        r#"r() { "$W" "$@" 2>&1 || echo "{\"workload\":\"$1\",\"failed\":true,\"status\":$?}"; }"#
            .to_string(),
        "r start".to_string(),
        format!("r cpu --mib {}", s.cpu_mib),
        format!("r mem --mib {} --repeat {}", s.mem_mib, s.mem_repeat),
        format!(
            "r disk --path . --mib {} --random-ops {}",
            s.disk_mib, s.random_ops
        ),
        r#"echo "{\"workload\":\"kernel\",\"release\":\"$(uname -r)\",\"boot_id\":\"$(cat /proc/sys/kernel/random/boot_id)\"}""#.to_string(),
    ];
    if net {
        lines.push(format!(
            "r net-server --bind 0.0.0.0 --port {NET_PORT} --timeout {}",
            server_timeout(s)
        ));
    }
    lines.join("\n")
}

/// The server gives up on its own if the client never comes.
fn server_timeout(s: &Sizes) -> u64 {
    s.net_seconds.ceil() as u64 + 3 * CLIENT_TIMEOUT + 30
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The workload's JSON result in a line, if it has one: the object from
/// its `{"workload"` on (a VM's console may put kernel messages before it).
pub fn parse_result(line: &str) -> Option<(String, Value)> {
    let start = line.find("{\"workload\"")?;
    let v: Value = serde_json::from_str(line[start..].trim()).ok()?;
    let name = v.get("workload")?.as_str()?.to_string();
    Some((name, v))
}

/// One launch of one environment.
fn run_env(ctx: &RunCtx, env: Env, rep: u32) -> Result<RunRecord, Error> {
    let opts = ctx.opts;
    let mut rec = RunRecord::new(env, rep);
    let net = ctx.net;
    let workload_name = match env {
        Env::Host => ctx.workload.to_string_lossy().into_owned(),
        Env::Container | Env::Vm => "vmlab-workload".to_string(),
    };
    let script = script(&workload_name, &opts.sizes, net.is_some());
    let spec = launch_spec(ctx, env, &script);

    let cgroup_name = format!("vmlab-compare-{}-{}-{rep}", std::process::id(), env.key());
    let cgroup = MemCgroup::create(&cgroup_name);
    if let Err(why) = &cgroup {
        log::debug!("no memory cgroup ({why}): sampling RSS instead");
    }
    let mut child = match Launched::spawn(&spec, cgroup.as_ref().ok()) {
        Ok(c) => c,
        Err(e) => {
            rec.outcome = format!("could not start {}: {e}", spec.program.display());
            return Ok(rec);
        }
    };
    let sampler = cgroup.is_err().then(|| RssSampler::start(child.pid()));
    let vmm_peak = (env == Env::Vm).then(|| RssSampler::start_single(child.pid()));
    let deadline = child.started + opts.timeout;
    let mut log: VecDeque<String> = VecDeque::new();
    let mut net_pending = net.is_some();
    let mut ended_early = None;
    loop {
        match child.next_line(deadline) {
            Next::Line(at, text) => {
                let t = (at - child.started).as_secs_f64();
                if let Some((name, v)) = parse_result(&text) {
                    if name == "start" && rec.first_line_s.is_none() {
                        rec.first_line_s = Some(t);
                    }
                    if v.get("failed").and_then(Value::as_bool) == Some(true) {
                        let status = v.get("status").and_then(Value::as_i64).unwrap_or(-1);
                        let msg = log
                            .iter()
                            .rev()
                            .find(|l| l.starts_with("vmlab-workload:"))
                            .cloned()
                            .unwrap_or_else(|| "no message".into());
                        rec.failures
                            .insert(name.clone(), format!("{name}: exit status {status}: {msg}"));
                    } else {
                        rec.results.insert(name.clone(), v);
                    }
                    ctx.progress
                        .say(&format!("  {}: {name} at +{t:.1} s", env.label()));
                } else {
                    if log.len() == 40 {
                        log.pop_front();
                    }
                    log.push_back(text.clone());
                }
                if net_pending && text.contains("net-server listening on") {
                    net_pending = false;
                    if let Some(net) = net {
                        ctx.progress.say(&format!(
                            "  {}: server up at +{t:.1} s; running the client",
                            env.label()
                        ));
                        match run_client(ctx, net, env) {
                            Ok(v) => {
                                rec.results.insert("net-client".into(), v);
                            }
                            Err(why) => {
                                rec.failures.insert("net-client".into(), why);
                                // The server would wait for its timeout.
                                ended_early = Some("stopped after the network client failed");
                                child.stop(Duration::from_secs(10));
                            }
                        }
                    }
                }
            }
            Next::Closed => break,
            Next::TimedOut => {
                ended_early = Some("stopped: it did not finish within --timeout");
                child.stop(Duration::from_secs(10));
                break;
            }
            Next::Stopped(sig) => return Err(Error::Stopped(sig)),
        }
    }
    let status = match child.wait_until(Instant::now() + EXIT_GRACE) {
        Some(st) => Some(st),
        None => {
            if let Some(sig) = launch::stop_requested() {
                return Err(Error::Stopped(sig));
            }
            ended_early = ended_early.or(Some("stopped: it did not exit after its output ended"));
            child.stop(Duration::from_secs(10))
        }
    };
    let status_text = launch::describe_status(status);
    let failed = !status.is_some_and(|s| s.success());
    rec.outcome = match (ended_early, failed) {
        (Some(why), _) => format!("{why} ({status_text})"),
        // The launcher's own last words say why (vmlab's errors are one
        // line on stderr).
        (None, true) => match log.back() {
            Some(last) => format!("{status_text}: {last}"),
            None => status_text,
        },
        (None, false) => status_text,
    };
    if net.is_some()
        && !rec.results.contains_key("net-client")
        && !rec.failures.contains_key("net-client")
    {
        let why = match rec.failures.get("net-server") {
            Some(why) => why.clone(),
            None => format!("the server never said it was listening ({})", rec.outcome),
        };
        rec.failures.insert("net-client".into(), why);
    }
    rec.memory = match (&cgroup, sampler) {
        (Ok(cg), _) => cg.peak().map(|peak_bytes| MemoryUse {
            peak_bytes,
            method: cg.kind.to_string(),
        }),
        (Err(_), Some(s)) => Ok(MemoryUse {
            peak_bytes: s.finish(),
            method: "sampled RSS".into(),
        }),
        (Err(why), None) => Err(why.clone()),
    };
    if let Some(s) = vmm_peak {
        rec.extra
            .insert("vmm_peak_rss_bytes".into(), Value::from(s.finish()));
    }
    rec.log = log.into_iter().collect();
    Ok(rec)
}

/// The command line of each environment.
fn launch_spec(ctx: &RunCtx, env: Env, script: &str) -> LaunchSpec {
    let opts = ctx.opts;
    let os = |s: &str| OsString::from(s);
    match env {
        Env::Host => LaunchSpec {
            program: "/bin/sh".into(),
            arg0: None,
            args: vec![os("-c"), os(script)],
            cwd: Some(ctx.host_cwd.clone()),
            // The host's server listens in the server namespace, where the
            // container's will; the other workloads do not use the network.
            netns: ctx.net.map(TestNet::srv_path),
            env: Vec::new(),
            // The image's binary on the host: unprivileged (sandbox.rs).
            sandbox: Some(ctx.sandbox.clone()),
        },
        Env::Container => {
            let mut args = vec![
                os("container"),
                os("--image"),
                opts.image.clone().into_os_string(),
                os("--runtime"),
                os(&opts.runtime),
            ];
            if let Some(net) = ctx.net {
                args.push(os("--netns"));
                args.push(net.srv_path().into_os_string());
            }
            args.extend([os("--"), os("sh"), os("-c"), os(script)]);
            LaunchSpec {
                program: SELF_EXE.into(),
                arg0: Some(ctx.exe.clone().into_os_string()),
                args,
                cwd: None,
                netns: None,
                env: Vec::new(),
                sandbox: None,
            }
        }
        Env::Vm => {
            let mut args = vec![
                os("run"),
                os("--kernel"),
                ctx.kernel.clone().into_os_string(),
                os("--image"),
                opts.image.clone().into_os_string(),
                os("--memory"),
                os(&format!("{}K", opts.vm_memory >> 10)),
                os("--cpus"),
                os("1"),
            ];
            if ctx.net.is_some() {
                args.extend([
                    os("--net"),
                    os(&format!("tap={}", netns::TAP_NAME)),
                    os("--cmdline"),
                    os(&TestNet::guest_ip_option()),
                ]);
            }
            args.extend([os("--"), os("sh"), os("-c"), os(script)]);
            LaunchSpec {
                program: SELF_EXE.into(),
                arg0: Some(ctx.exe.clone().into_os_string()),
                args,
                cwd: None,
                // vmlab's variable for its guest init (src/image/init.rs).
                env: ctx
                    .init
                    .iter()
                    .map(|p| (OsString::from("VMLAB_INIT"), p.clone().into_os_string()))
                    .collect(),
                // The VMM runs where its TAP is, next to the client.
                netns: ctx.net.map(TestNet::peer_path),
                sandbox: None,
            }
        }
    }
}

/// Runs `net-client` in the peer namespace against `env`'s server and
/// returns its JSON result, or why there is none.
fn run_client(ctx: &RunCtx, net: &TestNet, env: Env) -> Result<Value, String> {
    let s = &ctx.opts.sizes;
    let server = match env {
        Env::Vm => netns::GUEST_ADDR,
        Env::Host | Env::Container => netns::SERVER_ADDR,
    };
    let spec = LaunchSpec {
        program: ctx.workload.clone(),
        args: [
            "net-client".to_string(),
            "--host".into(),
            server.into(),
            "--port".into(),
            NET_PORT.to_string(),
            "--seconds".into(),
            s.net_seconds.to_string(),
            "--rtt-count".into(),
            s.rtt_count.to_string(),
            "--timeout".into(),
            CLIENT_TIMEOUT.to_string(),
        ]
        .into_iter()
        .map(OsString::from)
        .collect(),
        arg0: None,
        cwd: None,
        netns: Some(net.peer_path()),
        env: Vec::new(),
        // The image's binary on the host, like the baseline.
        sandbox: Some(ctx.sandbox.clone()),
    };
    let mut client =
        Launched::spawn(&spec, None).map_err(|e| format!("net-client could not start: {e}"))?;
    // The client's own limit, plus a margin.
    let limit = s.net_seconds + (3 * CLIENT_TIMEOUT) as f64 + 15.0;
    let deadline = client.started + Duration::from_secs_f64(limit);
    let mut result = None;
    let mut last = None;
    loop {
        match client.next_line(deadline) {
            Next::Line(_, text) => match parse_result(&text) {
                Some((name, v)) if name == "net-client" => result = Some(v),
                _ => last = Some(text),
            },
            Next::Closed => break,
            Next::TimedOut => return Err(format!("net-client: no result within {limit:.0} s")),
            Next::Stopped(sig) => return Err(format!("stopped by signal {sig}")),
        }
    }
    let status = client.wait_until(Instant::now() + Duration::from_secs(10));
    result.ok_or_else(|| {
        format!(
            "net-client to {server} ({}): {}",
            launch::describe_status(status),
            last.unwrap_or_else(|| "no message".into())
        )
    })
}

fn summary(rec: &RunRecord) -> String {
    let first = rec
        .first_line_s
        .map(|s| format!("first line after {}", Unit::Seconds.format(s)))
        .unwrap_or_else(|| "no first line".into());
    let mut s = format!("{first}, {} results, {}", rec.results.len(), rec.outcome);
    for why in rec.failures.values() {
        s.push_str(&format!("; {why}"));
    }
    s
}

/// `target/guest/vmlinux` in the tree the executable was built in
/// (`<tree>/target/{debug,release}/vmlab`).
fn default_kernel(exe: &Path) -> Option<PathBuf> {
    exe.ancestors()
        .map(|a| a.join("target/guest/vmlinux"))
        .find(|k| k.is_file())
}

/// The directories of the image's PATH (Docker's default without one).
fn path_dirs(config: &ImageConfig) -> Vec<String> {
    let path = config
        .env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or(crate::container::bundle::DEFAULT_PATH);
    path.split(':')
        .filter(|d| d.starts_with('/'))
        .map(str::to_string)
        .collect()
}

/// The image's `vmlab-workload`, as a host path inside its root (a regular
/// file; a symlink could point anywhere on the host).
fn find_workload(rootfs: &Path, config: &ImageConfig) -> Option<PathBuf> {
    path_dirs(config).iter().find_map(|dir| {
        let p = rootfs
            .join(dir.trim_start_matches('/'))
            .join("vmlab-workload");
        let meta = fs::symlink_metadata(&p).ok()?;
        (meta.is_file() && meta.mode() & 0o111 != 0).then_some(p)
    })
}

/// A scratch directory in the temporary directory (the host file system
/// where container bundles go too): `work/` for the host's disk workload,
/// and the pinned kernel and init; removed when dropped. vmlab compare runs
/// as root and `/tmp` is shared, so the directory is made atomically with
/// an unpredictable name and mode 0700 (`mkdtemp`), and copies into it are
/// created with `O_EXCL|O_NOFOLLOW` ([`crate::untrusted`]): no other user
/// can plant a name or link in it to have root write through.
struct ScratchDir(crate::untrusted::PrivateDir);

impl ScratchDir {
    fn create() -> Result<ScratchDir, Error> {
        let prefix = format!("vmlab-compare-{}-", std::process::id());
        let dir = crate::untrusted::PrivateDir::create(&prefix).map_err(|source| Error::Io {
            what: "creating a private directory in",
            path: std::env::temp_dir(),
            source,
        })?;
        // Made as a guard first, so that a failure below removes it.
        let scratch = ScratchDir(dir);
        let work = scratch.work();
        fs::DirBuilder::new()
            .mode(0o755)
            .create(&work)
            .map_err(|source| Error::Io {
                what: "creating",
                path: work,
                source,
            })?;
        Ok(scratch)
    }

    fn work(&self) -> PathBuf {
        self.0.path().join("work")
    }

    /// Lets the host baseline's identity (`ids`, when vmlab switches to
    /// one) traverse the directory (0711: it can neither list nor create
    /// names in it) and write in `work/`, which it owns.
    fn open_to(&self, ids: Option<(u32, u32)>) -> Result<(), Error> {
        use std::os::unix::fs::PermissionsExt;
        let Some((uid, gid)) = ids else {
            return Ok(());
        };
        let io = |what, path: &Path| {
            let path = path.to_path_buf();
            move |source| Error::Io { what, path, source }
        };
        fs::set_permissions(self.0.path(), fs::Permissions::from_mode(0o711))
            .map_err(io("chmod", self.0.path()))?;
        let work = self.work();
        std::os::unix::fs::lchown(&work, Some(uid), Some(gid)).map_err(io("chown", &work))
    }

    /// A private copy of `file` named `name`.
    fn pin(&self, file: &Path, name: &str) -> Result<PathBuf, Error> {
        crate::untrusted::copy_into(file, self.0.path(), name, 0o755).map_err(|source| Error::Io {
            what: "copying",
            path: file.to_path_buf(),
            source,
        })
    }
}

/// CPU, kernel, RAM and the kind of KVM.
fn host_info() -> HostInfo {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_else(|| "unknown CPU".into());
    let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let memory_kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    let kind = HostKind::detect();
    let has_kvm = Path::new("/dev/kvm").exists();
    HostInfo {
        cpu,
        cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
        kernel: fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".into()),
        memory_bytes: memory_kib * 1024,
        kvm: match has_kvm {
            true => kind.describe().to_string(),
            false => "none (/dev/kvm is missing)".into(),
        },
        nested: has_kvm && kind == HostKind::NestedPvm,
    }
}

/// Allocated bytes (blocks) of everything under `path`, each inode once.
fn allocated_bytes(path: &Path) -> io::Result<u64> {
    let mut seen = HashSet::new();
    let mut total = 0;
    let mut todo = vec![path.to_path_buf()];
    while let Some(p) = todo.pop() {
        let meta = fs::symlink_metadata(&p)?;
        if seen.insert((meta.dev(), meta.ino())) {
            total += meta.blocks() * 512;
        }
        if meta.is_dir() {
            for e in fs::read_dir(&p)? {
                todo.push(e?.path());
            }
        }
    }
    Ok(total)
}

/// Apparent bytes of every regular file under `path` (or of the file).
fn apparent_bytes(path: &Path) -> io::Result<u64> {
    let meta = fs::symlink_metadata(path)?;
    if !meta.is_dir() {
        return Ok(meta.len());
    }
    let mut total = 0;
    for e in fs::read_dir(path)? {
        total += apparent_bytes(&e?.path())?;
    }
    Ok(total)
}

fn measure_footprint(
    image: &Path,
    rootfs: &Path,
    ext4: &Result<PathBuf, String>,
    kernel: &Path,
) -> Footprint {
    let b = |v: u64| Unit::Bytes.format(v as f64);
    let container = allocated_bytes(rootfs).map_err(|e| format!("{}: {e}", rootfs.display()));
    let stored = apparent_bytes(image).map_err(|e| format!("{}: {e}", image.display()));
    let kernel_bytes = fs::metadata(kernel).map(|m| (m.blocks() * 512, m.len()));
    let disk = ext4.as_ref().map_err(Clone::clone).and_then(|p| {
        fs::metadata(p)
            .map(|m| (m.blocks() * 512, m.len()))
            .map_err(|e| format!("{}: {e}", p.display()))
    });
    let vm = match (&disk, &kernel_bytes) {
        (Ok((d, _)), Ok((k, _))) => Ok(d + k),
        (Err(why), _) => Err(format!("no VM disk: {why}")),
        (_, Err(e)) => Err(format!("{}: {e}", kernel.display())),
    };
    let mut detail = String::new();
    match (&container, &stored) {
        (Ok(c), Ok(s)) => detail.push_str(&format!(
            "container: the unpacked root file system, {} (what `docker images` calls the size; the image as stored, compressed layers and metadata: {})",
            b(*c),
            b(*s)
        )),
        (Ok(c), Err(_)) => detail.push_str(&format!("container: the unpacked root file system, {}", b(*c))),
        (Err(why), _) => detail.push_str(&format!("container: {why}")),
    }
    if let (Ok((da, dl)), Ok((ka, _))) = (&disk, &kernel_bytes) {
        detail.push_str(&format!(
            "; micro-VM: its ext4 disk image (the same root file system plus vmlab's init), {} allocated of {} (sparse), plus the guest kernel, {}. Each VM run also makes a throw-away copy of the disk, which is removed when it ends",
            b(*da),
            b(*dl),
            b(*ka)
        ));
    }
    Footprint {
        container_bytes: container,
        vm_bytes: vm,
        detail,
    }
}

/// The memory row's method, from what the runs used.
fn memory_method(runs: &[RunRecord]) -> String {
    let mut methods: Vec<&str> = runs
        .iter()
        .filter_map(|r| r.memory.as_ref().ok().map(|m| m.method.as_str()))
        .collect();
    methods.sort_unstable();
    methods.dedup();
    let explain = |m: &str| {
        match m {
        "cgroup v1" => "the peak usage (memory.max_usage_in_bytes) of a cgroup v1 memory cgroup made for each launch: process memory plus the page cache and kernel memory charged to it. For the container that is `vmlab container`, runc and the container's processes (runc makes the container's own cgroup inside it); for the VM, the VMM process including all guest RAM the guest has touched (kernel, page cache, workloads), plus the host page cache of its disk copy".to_string(),
        "cgroup v2" => "the peak usage (memory.peak) of a cgroup v2 made for each launch: process memory plus page cache and kernel memory; for the VM that includes all guest RAM the guest touched".to_string(),
        "sampled RSS" => "no memory cgroup could be made here, so: the sum of the peak RSS (VmHWM) of the launch's processes alive at once, sampled every 50 ms (page cache not included; short-lived peaks may be missed)".to_string(),
        other => other.to_string(),
    }
    };
    match methods.is_empty() {
        true => "not measured".into(),
        false => methods
            .iter()
            .map(|m| explain(m))
            .collect::<Vec<_>>()
            .join("; "),
    }
}

fn setup_lines(opts: &CompareOptions, kernel: &Path, runs: &[RunRecord]) -> Vec<String> {
    let s = &opts.sizes;
    let guest_release = runs
        .iter()
        .filter(|r| r.env == Env::Vm)
        .find_map(|r| {
            r.results
                .get("start")?
                .get("kernel")?
                .as_str()
                .map(str::to_string)
        })
        .unwrap_or_else(|| "unknown (no VM run printed its start line)".into());
    let runtime = runs
        .iter()
        .filter(|r| r.env == Env::Container)
        .flat_map(|r| r.log.iter())
        .find_map(|l| {
            let rest = &l[l.find("container runtime: ")? + "container runtime: ".len()..];
            Some(rest.to_string())
        })
        .unwrap_or_else(|| format!("{} (version not reported)", opts.runtime));
    vec![
        format!("Image: `{}`; workload program: its `vmlab-workload`.", opts.image.display()),
        format!(
            "Micro-VM: `vmlab run --image`, guest kernel `{}` (Linux {guest_release}; it and vmlab-init are copied at the start, so every launch boots the same bits even if the tree is rebuilt meanwhile), {} RAM, 1 vCPU, root disk virtio-blk, network virtio-net on a TAP.",
            kernel.display(),
            Unit::Bytes.format(opts.vm_memory as f64)
        ),
        format!("Container: `vmlab container` with {runtime}; network: a veth pair."),
        "Host: the same `vmlab-workload` binary (a copy of it) run by `/bin/sh` directly on the host, confined because it comes from the image: as root, as uid/gid 65534 with no capabilities, no_new_privs, its own mount, IPC and UTS namespaces and a seccomp filter (docs/SECURITY.md); unprivileged, no_new_privs and the filter.".into(),
        format!(
            "Workloads, in this order in one launch per environment: start; cpu --mib {}; mem --mib {} --repeat {}; disk --path . --mib {} --random-ops {}; uname -r and boot_id; net-server (client on the host side: --seconds {} --rtt-count {}).",
            s.cpu_mib, s.mem_mib, s.mem_repeat, s.disk_mib, s.random_ops, s.net_seconds, s.rtt_count
        ),
    ]
}

fn notes(host: &HostInfo, runs: &[RunRecord], no_net: bool, fp: &Footprint) -> Vec<String> {
    let mut notes = Vec::new();
    if host.nested {
        notes.push("Every micro-VM number here is inflated by the nested KVM (see the warning at the top): read the VM columns as this host's cost, not as what a micro-VM costs on hardware virtualization.".into());
    }
    if host.cores <= 2 {
        notes.push(format!(
            "The host has {} CPUs, shared with whatever else runs on it: the spread between runs shows how much that moved the numbers.",
            host.cores
        ));
    }
    if no_net {
        notes.push("The network rows were not measured (the reason is in their cells).".into());
    }
    if let Err(why) = &fp.vm_bytes {
        notes.push(format!("VM disk footprint: {why}"));
    }
    // The disk workload says whether it could drop the page cache before
    // reading; where it could not, reads may come from memory.
    for env in Env::ALL {
        let kept = runs.iter().filter(|r| r.env == env).any(|r| {
            r.results.get("disk").and_then(|d| d.get("cache_dropped")) == Some(&Value::Bool(false))
        });
        if kept {
            notes.push(format!(
                "{}: the disk workload could not drop the page cache before reading (posix_fadvise failed there; a guest kernel built without CONFIG_ADVISE_SYSCALLS has no fadvise), so its read rows may partly measure reads from that kernel's page cache.",
                env.label()
            ));
        }
    }
    // Same work everywhere: the CPU job's digest depends only on its size.
    let digests: BTreeMap<&str, Vec<Env>> = runs.iter().fold(BTreeMap::new(), |mut m, r| {
        if let Some(d) = r.results.get("cpu").and_then(|c| c.get("digest")?.as_str()) {
            m.entry(d).or_insert_with(Vec::new).push(r.env);
        }
        m
    });
    if digests.len() > 1 {
        notes.push(format!(
            "The CPU job's SHA-256 differs between runs ({}): some environment computed it wrongly.",
            digests.keys().copied().collect::<Vec<_>>().join(", ")
        ));
    }
    let vmm: Vec<u64> = runs
        .iter()
        .filter_map(|r| r.extra.get("vmm_peak_rss_bytes")?.as_u64())
        .filter(|b| *b > 0)
        .collect();
    if let Some(max) = vmm.iter().max() {
        notes.push(format!(
            "The VMM process's own peak RSS (VmHWM, sampled every 50 ms), for comparison with the memory row: up to {}.",
            Unit::Bytes.format(*max as f64)
        ));
    }
    notes
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Small workload sizes for the tests here and in rows.rs.
    pub(crate) fn sizes() -> Sizes {
        Sizes {
            cpu_mib: 16,
            mem_mib: 16,
            mem_repeat: 3,
            disk_mib: 8,
            random_ops: 500,
            net_seconds: 2.0,
            rtt_count: 200,
        }
    }

    /// The scratch directory cannot be raced into writing a file as root:
    /// the old predictable name (a symlink planted there by another user)
    /// is not used, and a name planted inside it between its creation and
    /// a copy makes the copy fail instead of writing through it.
    #[test]
    fn scratch_dir_is_private_and_copies_do_not_follow_links() {
        use std::os::unix::fs::PermissionsExt;
        let victims =
            std::env::temp_dir().join(format!("vmlab-unit-victim-{}", std::process::id()));
        let _ = fs::remove_dir_all(&victims);
        fs::create_dir_all(&victims).unwrap();
        let victim = victims.join("passwd");
        fs::write(&victim, b"precious").unwrap();
        let src = victims.join("kernel");
        fs::write(&src, b"kernel bytes").unwrap();

        // The old predictable path, planted as a symlink to the victim.
        let old = std::env::temp_dir().join(format!("vmlab-compare-{}", std::process::id()));
        let _ = fs::remove_file(&old);
        let _ = fs::remove_dir_all(&old);
        std::os::unix::fs::symlink(&victim, &old).unwrap();

        let scratch = ScratchDir::create().unwrap();
        let dir = scratch.work().parent().unwrap().to_path_buf();
        assert_ne!(dir, old, "the scratch directory's name is predictable");
        let m = fs::symlink_metadata(&dir).unwrap();
        assert!(m.is_dir());
        assert_eq!(m.permissions().mode() & 0o777, 0o700, "{}", dir.display());
        // The race: a link planted where a pinned copy goes.
        std::os::unix::fs::symlink(&victim, dir.join("vmlinux")).unwrap();
        assert!(scratch.pin(&src, "vmlinux").is_err());
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
        // An unplanted name works.
        let pinned = scratch.pin(&src, "vmlab-init").unwrap();
        assert_eq!(fs::read(pinned).unwrap(), b"kernel bytes");
        drop(scratch);
        assert!(!dir.exists());
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
        assert!(fs::symlink_metadata(&old).unwrap().file_type().is_symlink());
        fs::remove_file(&old).unwrap();
        fs::remove_dir_all(&victims).unwrap();
    }

    #[test]
    fn script_runs_every_workload_once() {
        let s = script("/x/it's/vmlab-workload", &sizes(), true);
        assert!(s.starts_with(r"W='/x/it'\''s/vmlab-workload'"), "{s}");
        for w in [
            "r start\n",
            "r cpu --mib 16\n",
            "r mem --mib 16 --repeat 3\n",
            "r disk --path . --mib 8 --random-ops 500\n",
        ] {
            assert_eq!(s.matches(w).count(), 1, "{w} in {s}");
        }
        assert!(
            s.ends_with("r net-server --bind 0.0.0.0 --port 7430 --timeout 212"),
            "{s}"
        );
        assert!(!script("w", &sizes(), false).contains("net-server"));
    }

    /// The script really runs, with a stand-in for vmlab-workload that
    /// fails `cpu`: every line parses, and the failure carries the message.
    #[test]
    fn script_output_parses() {
        let dir = std::env::temp_dir().join(format!("vmlab-compare-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir(&dir).unwrap();
        let fake = dir.join("fake-workload");
        fs::write(
            &fake,
            "#!/bin/sh\nif [ \"$1\" = cpu ]; then echo 'vmlab-workload: cpu: no luck' >&2; exit 1; fi\necho \"{\\\"workload\\\":\\\"$1\\\",\\\"ok\\\":true}\"\n",
        )
        .unwrap();
        fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let out = std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(script(fake.to_str().unwrap(), &sizes(), false))
            .output()
            .unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 6, "{text}");
        assert_eq!(lines[1], "vmlab-workload: cpu: no luck");
        let (name, v) = parse_result(lines[2]).unwrap();
        assert_eq!(
            (name.as_str(), &v["failed"], &v["status"]),
            ("cpu", &Value::Bool(true), &Value::from(1))
        );
        let (name, v) = parse_result(lines[5]).unwrap();
        assert_eq!(name, "kernel");
        assert!(!v["release"].as_str().unwrap().is_empty());
        assert_eq!(v["boot_id"].as_str().unwrap().len(), 36);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn results_in_console_lines() {
        assert_eq!(
            parse_result(r#"[  3.1] junk {"workload":"cpu","seconds":1.5}"#)
                .map(|(n, v)| (n, v["seconds"].clone())),
            Some(("cpu".into(), Value::from(1.5)))
        );
        assert!(parse_result(r#"{"workload":"cpu","seconds":"#).is_none());
        assert!(parse_result("plain text").is_none());
        assert!(parse_result(r#"{"other":1}"#).is_none());
    }

    #[test]
    fn rotating_order() {
        assert_eq!(order(1), [Env::Host, Env::Container, Env::Vm]);
        assert_eq!(order(2), [Env::Container, Env::Vm, Env::Host]);
        assert_eq!(order(3), [Env::Vm, Env::Host, Env::Container]);
        assert_eq!(order(4), order(1));
    }

    #[test]
    fn workload_is_found_in_the_image_path() {
        let dir = std::env::temp_dir().join(format!("vmlab-compare-wl-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("usr/bin")).unwrap();
        let config = ImageConfig {
            env: vec!["PATH=/usr/local/bin:/usr/bin".into()],
            ..Default::default()
        };
        assert_eq!(find_workload(&dir, &config), None);
        let p = dir.join("usr/bin/vmlab-workload");
        fs::write(&p, "x").unwrap();
        assert_eq!(find_workload(&dir, &config), None, "not executable");
        fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        assert_eq!(find_workload(&dir, &config), Some(p));
        assert!(allocated_bytes(&dir).unwrap() > 0);
        assert_eq!(apparent_bytes(&dir).unwrap(), 1);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn stop_signal_exit_codes() {
        assert_eq!(Error::Stopped(2).exit_code(), 130);
        assert_eq!(Error::Stopped(15).exit_code(), 143);
        assert_eq!(Error::Exe(io::Error::other("x")).exit_code(), 125);
    }
}
