//! The one error type of the program, and the exit status each kind maps to.

use std::fmt;
use std::io;

use crate::args::ArgError;

/// Exit status for command-line usage errors (as vmlab itself).
pub const EXIT_USAGE: i32 = 2;
/// Exit status when a workload could not run to the end.
pub const EXIT_FAILED: i32 = 1;

#[derive(Debug)]
pub enum Error {
    /// The command line is malformed.
    Usage(ArgError),
    /// A system call failed while doing `what` (e.g. "write /tmp/x").
    Io { what: String, err: io::Error },
    /// Anything else that stops a workload: a refused target, a peer that
    /// does not speak the protocol, a file shorter than expected.
    Failed(String),
}

impl Error {
    pub fn exit_status(&self) -> i32 {
        match self {
            Error::Usage(_) => EXIT_USAGE,
            Error::Io { .. } | Error::Failed(_) => EXIT_FAILED,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Usage(e) => write!(f, "{e}"),
            Error::Io { what, err } => write!(f, "{what}: {}", errno_text(err)),
            Error::Failed(msg) => f.write_str(msg),
        }
    }
}

impl From<ArgError> for Error {
    fn from(e: ArgError) -> Self {
        Error::Usage(e)
    }
}

/// Attaches what was being done to an `io::Error`.
pub trait Context<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T, Error>;
}

impl<T> Context<T> for io::Result<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T, Error> {
        self.map_err(|err| Error::Io { what: what(), err })
    }
}

/// An OS error as its bare errno text ("No such file or directory"),
/// without std's " (os error 2)" suffix, as vmlab-init prints them.
pub fn errno_text(err: &io::Error) -> String {
    let text = err.to_string();
    match text.rfind(" (os error ") {
        Some(i) => text[..i].to_string(),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_and_statuses() {
        let e: Result<(), Error> =
            Err(io::Error::from_raw_os_error(libc::ENOSPC)).context(|| "write /tmp/f".to_string());
        let e = e.unwrap_err();
        assert_eq!(e.to_string(), "write /tmp/f: No space left on device");
        assert_eq!(e.exit_status(), EXIT_FAILED);
        let e = Error::from(ArgError::MissingValue("--mib"));
        assert_eq!(e.to_string(), "--mib needs a value");
        assert_eq!(e.exit_status(), EXIT_USAGE);
    }
}
