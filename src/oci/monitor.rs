//! The monitor: the host process whose pid `create` writes to
//! `--pid-file`. The engine's shim reaps it and takes its exit status as
//! the container's, so it has to live exactly as long as the workload. It
//! is started by `create` as `vmlab-runtime __monitor DIR` and:
//!
//! 1. enters the network namespace the bundle names, or makes a new one
//!    (Docker's prestart hook moves the veth in after that, so `create`
//!    runs the hooks only once the monitor says it is there);
//! 2. tells `create` through the sync pipe, and blocks opening the
//!    container's `start.fifo` until `start` opens it (a `kill` or `delete`
//!    before that just ends it);
//! 3. wires the namespace's interface to a TAP ([`super::net`]);
//! 4. replaces itself (execve, same pid, same stdio) with
//!    `vmlab run --name VM ...`, whose exit status is the guest command's.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;

use super::spec::{NetNs, Plan};
use super::state::{Container, VM_ROOT};
use super::{net, Error, Result};

/// The environment variable that carries the sync pipe's write end.
pub const SYNC_ENV: &str = "_VMLAB_OCI_SYNC";

/// What the monitor writes to the sync pipe when its namespace is ready.
pub const READY: &[u8] = b"ready\n";

/// The monitor's main: never returns on success (it becomes `vmlab run`).
pub fn main(dir: &Path, vm: &str) -> u8 {
    let sync = std::env::var(SYNC_ENV)
        .ok()
        .and_then(|s| s.parse::<i32>().ok())
        // SAFETY: `create` passed this fd, open and ours alone, in the
        // environment; nothing else in this process owns it.
        .map(|fd| unsafe { std::fs::File::from_raw_fd(fd) });
    std::env::remove_var(SYNC_ENV);
    let container = Container {
        dir: dir.to_path_buf(),
    };
    let plan = match read_plan(&container) {
        Ok(p) => p,
        Err(e) => return fail(sync, &e),
    };
    if let Err(e) = enter_netns(&plan.netns) {
        return fail(sync, &e);
    }
    // The fifo is open before `create` hears "ready", so a `start` right
    // after `create` finds its reader (a writer's non-blocking open fails
    // with ENXIO while there is none).
    let fifo = match open_fifo(&container) {
        Ok(f) => f,
        Err(e) => return fail(sync, &e),
    };
    if let Some(mut s) = sync {
        // `create` waits for this line; if it is gone, so is the container.
        if s.write_all(READY).is_err() {
            return 1;
        }
    }
    match wait_for_start(&container, fifo) {
        Ok(true) => {}
        Ok(false) => {
            record_failure(&container, "the start fifo was closed without a start");
            return 0;
        }
        Err(e) => {
            record_failure(&container, &e.to_string());
            return 125;
        }
    }
    let mut argv: Vec<String> = vec![
        "-q".into(),
        "--state-dir".into(),
        VM_ROOT.into(),
        "run".into(),
        "--name".into(),
        vm.to_string(),
    ];
    if plan.netns != NetNs::Host {
        match wire_network(plan.hostname.as_deref()) {
            Ok(Some(mut extra)) => argv.append(&mut extra),
            Ok(None) => {}
            Err(e) => {
                record_failure(&container, &format!("network: {e}"));
                return 125;
            }
        }
    }
    if plan.netns != NetNs::Host && super::dns::wanted(&plan.run_args) {
        // Docker's embedded DNS answers only in this namespace: a
        // forwarder here, reached by the guest over vsock.
        if let Err(e) = super::dns::spawn_forwarder(Path::new(VM_ROOT).join(vm)) {
            eprintln!("vmlab-runtime: DNS forwarder: {e}");
        }
    }
    argv.extend(plan.run_args.iter().cloned());
    let mut cmd = std::process::Command::new("/proc/self/exe");
    cmd.arg0("vmlab").args(&argv);
    if let Some(v) = &plan.virtiofsd {
        cmd.env("VMLAB_VIRTIOFSD", v);
    }
    // The VMM's stderr is the container's: only errors belong there (not,
    // say, that the engine's resolv.conf is a copy in the guest).
    if std::env::var_os("VMLAB_LOG").is_none() {
        cmd.env("VMLAB_LOG", "error");
    }
    // Only returns on failure.
    let e = cmd.exec();
    record_failure(&container, &format!("cannot start vmlab run: {e}"));
    125
}

/// Says why the monitor ended before it became the VMM: on its stderr
/// (the container's) and in the state directory, where `start` and
/// `state` find it.
fn record_failure(container: &Container, why: &str) {
    eprintln!("vmlab-runtime: {why}");
    let _ = std::fs::write(container.failure(), why);
}

fn fail(sync: Option<std::fs::File>, e: &Error) -> u8 {
    let line = format!("error: {e}\n");
    match sync {
        Some(mut s) => {
            let _ = s.write_all(line.as_bytes());
        }
        None => eprint!("vmlab-runtime: {line}"),
    }
    1
}

fn read_plan(container: &Container) -> Result<Plan> {
    let path = container.plan();
    let bytes = std::fs::read(&path).map_err(Error::io(format!("read {}", path.display())))?;
    serde_json::from_slice(&bytes).map_err(|e| Error::msg(format!("{}: {e}", path.display())))
}

/// Joins or makes the network namespace.
fn enter_netns(netns: &NetNs) -> Result<()> {
    match netns {
        NetNs::Host => Ok(()),
        NetNs::New => {
            // SAFETY: unshare has no memory effects; this process is single-threaded.
            match unsafe { libc::unshare(libc::CLONE_NEWNET) } {
                0 => Ok(()),
                _ => Err(Error::io("unshare(CLONE_NEWNET)")(
                    std::io::Error::last_os_error(),
                )),
            }
        }
        NetNs::Path(p) => {
            let f = std::fs::File::open(p)
                .map_err(Error::io(format!("open network namespace {}", p.display())))?;
            // SAFETY: setns on an fd we own; no memory effects.
            match unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } {
                0 => Ok(()),
                _ => Err(Error::io(format!("setns {}", p.display()))(
                    std::io::Error::last_os_error(),
                )),
            }
        }
    }
}

/// Opens the start fifo for reading without waiting for a writer.
fn open_fifo(container: &Container) -> Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let fifo = container.fifo();
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .map_err(Error::io(format!("open {}", fifo.display())))
}

/// Blocks until `start` writes its byte (true) or a writer left without
/// a word (false: the container is being deleted).
fn wait_for_start(container: &Container, mut f: std::fs::File) -> Result<bool> {
    let fifo = container.fifo();
    loop {
        // No timeout: `kill` and `delete` end this process with a signal.
        super::wait_readable(std::os::fd::AsFd::as_fd(&f), None)
            .map_err(Error::io(format!("poll {}", fifo.display())))?;
        let mut byte = [0u8; 1];
        match f.read(&mut byte) {
            Ok(1) => break,
            // POLLHUP: a writer came and went without a byte.
            Ok(_) => return Ok(false),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Error::io(format!("read {}", fifo.display()))(e)),
        }
    }
    drop(f);
    let _ = std::fs::remove_file(&fifo);
    Ok(true)
}

/// The TAP for the namespace's interface, and the `vmlab run` arguments
/// for it; `None` when the namespace has no interface but loopback.
fn wire_network(hostname: Option<&str>) -> Result<Option<Vec<String>>> {
    let Some(iface) = net::discover().map_err(|e| Error::msg(e.to_string()))? else {
        return Ok(None);
    };
    let g = net::wire(iface).map_err(|e| Error::msg(e.to_string()))?;
    Ok(Some(vec![
        "--net".into(),
        g.net_arg(),
        "--cmdline".into(),
        g.kernel_ip_param(hostname),
    ]))
}

/// A pipe for the monitor's readiness line: (read end, write end), the
/// write end without close-on-exec (the monitor inherits it).
pub fn sync_pipe() -> Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 writes two fds into the array we pass.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(Error::io("pipe2")(std::io::Error::last_os_error()));
    }
    // SAFETY: both fds were just created and are owned by nobody else.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    Ok((r, w))
}
