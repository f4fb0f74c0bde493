//! `vmlab-workload`: one workload program for three environments.
//!
//! The same static binary runs on the host, in a container and as the
//! command of a vmlab guest, so that each workload is measured the three
//! ways with nothing else changing. Every workload prints exactly one line
//! of JSON on stdout and exits 0, or prints one `vmlab-workload: ...` line
//! on stderr and exits 1 (the workload failed) or 2 (bad command line).
//! One subcommand is a tool rather than a workload: `xattr` (set, get and
//! list extended attributes, for the virtio-fs tests) prints plain text,
//! with the same errors and exit statuses.
//!
//! It is kept small and free of dependencies but `libc` (hand-written
//! argument parsing, JSON and SHA-256) because on this project's nested-KVM
//! host every byte of a guest image is unpacked under emulation.

mod args;
mod cpu;
mod disk;
mod error;
mod json;
mod mem;
mod net;
mod prng;
mod sha256;
mod start;
#[cfg(test)]
mod testutil;
mod transfer;
mod vsock;
mod xattr;

use std::ffi::OsString;
use std::io::Write;

use args::{ArgError, Spec};
use error::{Error, EXIT_FAILED};

const USAGE: &str = "\
vmlab-workload: one workload, measured on the host, in a container and in a vmlab guest.
Each subcommand prints one line of JSON on stdout.

usage: vmlab-workload SUBCOMMAND [OPTIONS]

  start                         print pid, kernel release and clock values at once
  cpu [--mib N]                 SHA-256 of N MiB of fixed pseudo-random data (default 64)
  mem [--mib N] [--repeat R]    copy an N MiB buffer R times (default 256, 5): best and median MiB/s
  disk --path P [--mib N] [--block-size B] [--random-ops K] [--direct] [--force]
                                sequential write (+fsync) and read of N MiB (default 64) in
                                B-byte blocks (default 1M, multiple of 4096) and K random 4 KiB
                                reads (default 2000); P is a file, a directory (a scratch file
                                inside, removed after) or, with --force, a block device whose
                                first N MiB are overwritten. --direct: O_DIRECT
  net-server [--port P] [--bind ADDR] [--timeout S] [--once]
                                serve one net-client session (port 7430, address 127.0.0.1;
                                --port 0 picks a free port, shown on stderr) and exit; give up
                                after S seconds (default 120)
  net-client --host IP [--port P] [--seconds S] [--rtt-count N] [--timeout T]
                                send for S seconds (default 5), then N 1-byte round trips
                                (default 1000); T: connect window and I/O timeout (default 10)
  net-send --host IP [--port P] [--bytes N] [--timeout T]
                                send N bytes (default 64M) of the fixed data stream over one TCP
                                connection (port 7431) and print their SHA-256
  net-recv [--port P] [--bind ADDR] [--timeout S]
                                receive one net-send connection to its end (port 7431, address
                                127.0.0.1; ready line on stderr) and print the SHA-256 of the bytes
  vsock-send [--cid C] [--port P] [--bytes N] [--timeout T]
                                net-send over AF_VSOCK to CID C (default 2, the host), port P
                                (default 7431); retries a refused connect for T seconds
  vsock-recv [--port P] [--timeout S]
                                net-recv over AF_VSOCK: listen on port P (default 7431) of any
                                CID, read one connection to its end, print its SHA-256

Not a workload, and no JSON (setxattr(2) and friends, following symlinks):

  xattr set PATH NAME VALUE     set attribute NAME of PATH to the bytes of VALUE; prints nothing
  xattr get PATH NAME           print the attribute's value and a newline
  xattr list PATH               print the attribute names of PATH, one per line

  --help, --version

Exit status: 0 success, 1 the workload failed, 2 bad command line.
";

/// What to print on stdout.
#[derive(Debug)]
enum Output {
    /// A workload's JSON line.
    Json(String),
    /// Help or version text.
    Text(String),
    /// A tool's output, printed as it is (`xattr get`'s value bytes).
    Raw(Vec<u8>),
}

/// A subcommand: its accepted flags and the function that runs it.
type Workload = (&'static Spec, fn(&args::Parsed) -> Result<String, Error>);

fn workload(name: &str) -> Option<Workload> {
    Some(match name {
        "start" => (&start::SPEC, |_| start::run()),
        "cpu" => (&cpu::SPEC, cpu::run),
        "mem" => (&mem::SPEC, mem::run),
        "disk" => (&disk::SPEC, disk::run),
        "net-server" => (&net::SERVER_SPEC, net::run_server),
        "net-client" => (&net::CLIENT_SPEC, net::run_client),
        "net-send" => (&transfer::SEND_SPEC, transfer::run_send),
        "net-recv" => (&transfer::RECV_SPEC, transfer::run_recv),
        "vsock-send" => (&vsock::SEND_SPEC, vsock::run_send),
        "vsock-recv" => (&vsock::RECV_SPEC, vsock::run_recv),
        _ => return None,
    })
}

fn dispatch(argv: &[OsString]) -> Result<Output, Error> {
    let Some((name, rest)) = argv.split_first() else {
        return Err(ArgError::MissingCommand.into());
    };
    let name_text = name.to_string_lossy();
    match name_text.as_ref() {
        "--help" | "-h" | "help" => return Ok(Output::Text(USAGE.to_string())),
        "--version" | "-V" => {
            return Ok(Output::Text(format!(
                "vmlab-workload {}\n",
                env!("CARGO_PKG_VERSION")
            )))
        }
        "xattr" if xattr::wants_help(rest) => return Ok(Output::Text(USAGE.to_string())),
        "xattr" => return xattr::run(rest).map(Output::Raw),
        _ => {}
    }
    let (spec, run) =
        workload(&name_text).ok_or_else(|| ArgError::UnknownCommand(name_text.to_string()))?;
    let parsed = args::parse(spec, rest)?;
    if parsed.switch("--help") {
        return Ok(Output::Text(USAGE.to_string()));
    }
    run(&parsed).map(Output::Json)
}

fn main() {
    let argv: Vec<OsString> = std::env::args_os().skip(1).collect();
    let result = dispatch(&argv);
    let mut stdout = std::io::stdout().lock();
    let written = match &result {
        Ok(Output::Json(line)) => writeln!(stdout, "{line}"),
        Ok(Output::Text(text)) => write!(stdout, "{text}"),
        Ok(Output::Raw(bytes)) => stdout.write_all(bytes),
        Err(_) => Ok(()),
    }
    .and_then(|()| stdout.flush());
    let status = match (result, written) {
        (Err(e), _) => {
            eprintln!("vmlab-workload: {e}");
            e.exit_status()
        }
        // A result nobody received (closed pipe, full disk) is a failure.
        (Ok(_), Err(e)) => {
            eprintln!("vmlab-workload: write to stdout: {}", error::errno_text(&e));
            EXIT_FAILED
        }
        (Ok(_), Ok(())) => 0,
    };
    std::process::exit(status);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(list: &[&str]) -> Result<Output, Error> {
        let argv: Vec<OsString> = list.iter().map(OsString::from).collect();
        dispatch(&argv)
    }

    #[test]
    fn help_version_and_usage_errors() {
        assert!(matches!(d(&["--help"]), Ok(Output::Text(t)) if t.contains("usage:")));
        assert!(matches!(d(&["disk", "--help"]), Ok(Output::Text(t)) if t.contains("usage:")));
        assert!(
            matches!(d(&["--version"]), Ok(Output::Text(t)) if t.starts_with("vmlab-workload 0."))
        );
        for bad in [
            &[][..],
            &["frobnicate"],
            &["cpu", "--bogus"],
            &["cpu", "--mib"],
            &["cpu", "--mib", "lots"],
            &["start", "extra"],
            &["xattr"],
            &["xattr", "get", "/"],
        ] {
            let e = d(bad).unwrap_err();
            assert_eq!(e.exit_status(), error::EXIT_USAGE, "{bad:?}: {e}");
        }
    }

    #[test]
    fn every_subcommand_is_dispatched() {
        for name in [
            "start",
            "cpu",
            "mem",
            "disk",
            "net-server",
            "net-client",
            "net-send",
            "net-recv",
            "vsock-send",
            "vsock-recv",
        ] {
            let (spec, _) = workload(name).unwrap();
            assert_eq!(spec.command, name);
        }
        assert!(
            matches!(d(&["start"]), Ok(Output::Json(l)) if l.starts_with(r#"{"workload":"start""#))
        );
        assert!(matches!(d(&["xattr", "--help"]), Ok(Output::Text(t)) if t.contains("xattr get")));
    }
}
