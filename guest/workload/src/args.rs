//! A small command-line parser: `--flag VALUE`, `--flag=VALUE` and switches.
//!
//! Hand-written instead of clap because the binary is copied into every
//! guest image and, on this project's nested-KVM host, every byte of it is
//! unpacked under instruction emulation; the subcommands need nothing more.
//! Every malformed input is an [`ArgError`] (exit status 2), never a panic.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

/// What a subcommand accepts.
pub struct Spec {
    pub command: &'static str,
    /// Flags that take a value.
    pub values: &'static [&'static str],
    /// Flags that take none (`--help` is always accepted).
    pub switches: &'static [&'static str],
}

/// Why the command line cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArgError {
    MissingCommand,
    UnknownCommand(String),
    UnknownFlag {
        command: &'static str,
        flag: String,
    },
    MissingValue(&'static str),
    /// A value that does not parse or is out of range; `why` says which.
    BadValue {
        flag: &'static str,
        value: String,
        why: String,
    },
    /// A required flag is absent.
    Required(&'static str),
    /// A bare word where only flags are accepted.
    Unexpected(String),
    /// The operands of a subcommand that takes operands rather than flags
    /// (`xattr`) are wrong; the text is its usage.
    Operands(&'static str),
}

impl fmt::Display for ArgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ArgError::MissingCommand => write!(f, "missing subcommand (see --help)"),
            ArgError::UnknownCommand(c) => write!(f, "unknown subcommand {c:?} (see --help)"),
            ArgError::UnknownFlag { command, flag } => {
                write!(f, "{command}: unknown option {flag:?}")
            }
            ArgError::MissingValue(flag) => write!(f, "{flag} needs a value"),
            ArgError::BadValue { flag, value, why } => {
                write!(f, "{flag} {value:?}: {why}")
            }
            ArgError::Required(flag) => write!(f, "{flag} is required"),
            ArgError::Unexpected(word) => write!(f, "unexpected argument {word:?}"),
            ArgError::Operands(usage) => write!(f, "usage: vmlab-workload {usage}"),
        }
    }
}

/// The flags of one subcommand, as given.
#[derive(Debug)]
pub struct Parsed {
    values: Vec<(&'static str, OsString)>,
    switches: Vec<&'static str>,
}

/// Parses the arguments after the subcommand name against `spec`. A flag
/// given twice keeps its last value.
pub fn parse(spec: &Spec, args: &[OsString]) -> Result<Parsed, ArgError> {
    let mut parsed = Parsed {
        values: Vec::new(),
        switches: Vec::new(),
    };
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        let bytes = arg.as_bytes();
        if !bytes.starts_with(b"--") {
            return Err(ArgError::Unexpected(arg.to_string_lossy().into_owned()));
        }
        // `--flag=value`: split at the first '='. Flag names are ASCII, so
        // a name that is not UTF-8 simply matches nothing below.
        let (name, inline) = match bytes.iter().position(|&b| b == b'=') {
            Some(i) => (&bytes[..i], Some(&bytes[i + 1..])),
            None => (bytes, None),
        };
        let unknown = || ArgError::UnknownFlag {
            command: spec.command,
            flag: String::from_utf8_lossy(name).into_owned(),
        };
        if let Some(&flag) = spec.values.iter().find(|f| f.as_bytes() == name) {
            let value = match inline {
                Some(v) => OsStr::from_bytes(v).to_owned(),
                // A following flag is not taken as a value, so that
                // `--path --direct` reports the missing path.
                None => match iter.next() {
                    Some(v) if !v.as_bytes().starts_with(b"--") => v.clone(),
                    _ => return Err(ArgError::MissingValue(flag)),
                },
            };
            parsed.values.retain(|(f, _)| *f != flag);
            parsed.values.push((flag, value));
        } else if let Some(&flag) = spec
            .switches
            .iter()
            .chain(&["--help"])
            .find(|f| f.as_bytes() == name)
        {
            if inline.is_some() {
                return Err(ArgError::BadValue {
                    flag,
                    value: arg.to_string_lossy().into_owned(),
                    why: "takes no value".into(),
                });
            }
            parsed.switches.push(flag);
        } else {
            return Err(unknown());
        }
    }
    Ok(parsed)
}

impl Parsed {
    pub fn switch(&self, flag: &str) -> bool {
        self.switches.contains(&flag)
    }

    pub fn os(&self, flag: &str) -> Option<&OsStr> {
        self.values
            .iter()
            .find(|(f, _)| *f == flag)
            .map(|(_, v)| v.as_os_str())
    }

    pub fn path(&self, flag: &'static str) -> Result<PathBuf, ArgError> {
        match self.os(flag) {
            Some(v) if !v.is_empty() => Ok(PathBuf::from(v)),
            Some(_) => Err(bad(flag, "", "must not be empty")),
            None => Err(ArgError::Required(flag)),
        }
    }

    /// A UTF-8 value, if given.
    pub fn text(&self, flag: &'static str) -> Result<Option<&str>, ArgError> {
        self.os(flag)
            .map(|v| {
                v.to_str()
                    .ok_or_else(|| bad(flag, &v.to_string_lossy(), "not valid UTF-8"))
            })
            .transpose()
    }

    /// An integer in `min..=max`, `default` when absent.
    pub fn u64_in(
        &self,
        flag: &'static str,
        default: u64,
        min: u64,
        max: u64,
    ) -> Result<u64, ArgError> {
        let Some(text) = self.text(flag)? else {
            return Ok(default);
        };
        let n: u64 = text
            .parse()
            .map_err(|_| bad(flag, text, "not a non-negative integer"))?;
        check_range(flag, text, n, min, max)
    }

    /// A byte count with an optional binary suffix (`4096`, `64K`, `1M`,
    /// `1MiB`), in `min..=max`, `default` when absent.
    pub fn size_in(
        &self,
        flag: &'static str,
        default: u64,
        min: u64,
        max: u64,
    ) -> Result<u64, ArgError> {
        let Some(text) = self.text(flag)? else {
            return Ok(default);
        };
        let n =
            parse_size(text).ok_or_else(|| bad(flag, text, "not a size (e.g. 4096, 64K, 1M)"))?;
        check_range(flag, text, n, min, max)
    }

    /// A positive decimal number of seconds in `min..=max`, `default` when
    /// absent (fractions allowed, so tests can run for 0.2 s).
    pub fn seconds_in(
        &self,
        flag: &'static str,
        default: f64,
        min: f64,
        max: f64,
    ) -> Result<f64, ArgError> {
        let Some(text) = self.text(flag)? else {
            return Ok(default);
        };
        let s: f64 = text
            .parse()
            .map_err(|_| bad(flag, text, "not a number of seconds"))?;
        // `contains` is false for NaN too.
        if !(min..=max).contains(&s) {
            return Err(bad(flag, text, &format!("must be between {min} and {max}")));
        }
        Ok(s)
    }
}

fn bad(flag: &'static str, value: &str, why: &str) -> ArgError {
    ArgError::BadValue {
        flag,
        value: value.to_string(),
        why: why.to_string(),
    }
}

fn check_range(
    flag: &'static str,
    text: &str,
    n: u64,
    min: u64,
    max: u64,
) -> Result<u64, ArgError> {
    if (min..=max).contains(&n) {
        Ok(n)
    } else {
        Err(bad(flag, text, &format!("must be between {min} and {max}")))
    }
}

fn parse_size(text: &str) -> Option<u64> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, suffix) = text.split_at(split);
    let n: u64 = digits.parse().ok()?;
    let shift = match suffix {
        "" | "B" => 0,
        "K" | "k" | "KiB" => 10,
        "M" | "MiB" => 20,
        "G" | "GiB" => 30,
        _ => return None,
    };
    n.checked_mul(1 << shift)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC: Spec = Spec {
        command: "test",
        values: &["--mib", "--path", "--size", "--seconds", "--name"],
        switches: &["--direct"],
    };

    fn args(list: &[&str]) -> Vec<OsString> {
        list.iter().map(OsString::from).collect()
    }

    fn p(list: &[&str]) -> Result<Parsed, ArgError> {
        parse(&SPEC, &args(list))
    }

    #[test]
    fn values_switches_and_defaults() {
        let a = p(&["--mib", "8", "--direct", "--path=/tmp/x=y", "--mib=9"]).unwrap();
        assert_eq!(a.u64_in("--mib", 64, 1, 100), Ok(9));
        assert!(a.switch("--direct"));
        assert!(!a.switch("--help"));
        assert_eq!(a.path("--path"), Ok(PathBuf::from("/tmp/x=y")));
        assert_eq!(a.u64_in("--size", 5, 1, 10), Ok(5));
        assert_eq!(a.text("--name"), Ok(None));
        assert!(p(&["--help"]).unwrap().switch("--help"));
        assert!(p(&[]).is_ok());
    }

    #[test]
    fn errors_not_panics() {
        assert_eq!(
            p(&["--bogus"]).unwrap_err(),
            ArgError::UnknownFlag {
                command: "test",
                flag: "--bogus".into()
            }
        );
        assert_eq!(
            p(&["--bogus=1"]).unwrap_err(),
            ArgError::UnknownFlag {
                command: "test",
                flag: "--bogus".into()
            }
        );
        assert_eq!(p(&["--mib"]).unwrap_err(), ArgError::MissingValue("--mib"));
        assert_eq!(
            p(&["--path", "--direct"]).unwrap_err(),
            ArgError::MissingValue("--path")
        );
        assert_eq!(p(&["8"]).unwrap_err(), ArgError::Unexpected("8".into()));
        assert_eq!(p(&["-m"]).unwrap_err(), ArgError::Unexpected("-m".into()));
        assert!(matches!(
            p(&["--direct=yes"]).unwrap_err(),
            ArgError::BadValue {
                flag: "--direct",
                ..
            }
        ));

        let bad_number = |list: &[&str]| {
            let a = p(list).unwrap();
            a.u64_in("--mib", 64, 1, 1024).unwrap_err()
        };
        for value in [
            "abc",
            "-1",
            "1.5",
            "",
            "99999999999999999999999",
            "0",
            "1025",
        ] {
            assert!(
                matches!(
                    bad_number(&["--mib", value]),
                    ArgError::BadValue { flag: "--mib", .. }
                ),
                "{value:?}"
            );
        }
        assert_eq!(
            p(&[]).unwrap().path("--path"),
            Err(ArgError::Required("--path"))
        );
        assert!(p(&["--path="]).unwrap().path("--path").is_err());
    }

    #[test]
    fn sizes_and_seconds() {
        let size = |v: &str| p(&["--size", v]).unwrap().size_in("--size", 1, 1, 1 << 30);
        assert_eq!(size("4096"), Ok(4096));
        assert_eq!(size("64K"), Ok(65536));
        assert_eq!(size("1M"), Ok(1 << 20));
        assert_eq!(size("1MiB"), Ok(1 << 20));
        assert!(size("2G").is_err()); // above max
        assert!(size("1X").is_err());
        assert!(size("K").is_err());
        assert!(size("99999999999999999999G").is_err());

        let secs = |v: &str| {
            p(&["--seconds", v])
                .unwrap()
                .seconds_in("--seconds", 5.0, 0.01, 60.0)
        };
        assert_eq!(secs("0.5"), Ok(0.5));
        assert!(secs("NaN").is_err());
        assert!(secs("inf").is_err());
        assert!(secs("0").is_err());
        assert!(secs("61").is_err());
        assert_eq!(
            p(&[]).unwrap().seconds_in("--seconds", 5.0, 0.01, 60.0),
            Ok(5.0)
        );
    }

    #[test]
    fn non_utf8_values() {
        use std::os::unix::ffi::OsStringExt;
        let raw = vec![
            OsString::from("--path"),
            OsString::from_vec(b"/tmp/\xff".to_vec()),
            OsString::from("--mib"),
            OsString::from_vec(b"\xff".to_vec()),
        ];
        let a = parse(&SPEC, &raw).unwrap();
        assert!(a.path("--path").is_ok());
        assert!(a.u64_in("--mib", 1, 1, 2).is_err());
        let raw = vec![OsString::from_vec(b"--mib=\xff".to_vec())];
        assert!(parse(&SPEC, &raw)
            .unwrap()
            .u64_in("--mib", 1, 1, 2)
            .is_err());
    }
}
