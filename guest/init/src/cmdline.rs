//! Parsing of the `vmlab.*` kernel command line parameters.
//!
//! The VMM passes everything init needs on the kernel command line, because
//! that is the one channel that exists before any device is set up. Values
//! that may contain arbitrary bytes (argv, environment, paths, user names,
//! virtio-fs shares) are hex encoded so that spaces, quotes and non-UTF-8
//! bytes survive the kernel's own command line splitting unchanged.
//!
//! Everything here is pure (no system calls) so it is unit tested on the host.

use std::ffi::OsString;
use std::fmt;
use std::os::unix::ffi::OsStringExt;
use std::path::PathBuf;

use crate::user::{self, UserSpec};

/// What the VMM asked for, after decoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// argv of the command; `None` runs an interactive shell.
    pub cmd: Option<Vec<OsString>>,
    /// Whether the host side of the console is a terminal. Defaults to true,
    /// which means "leave the kernel's cooked tty mode alone" (no system call).
    pub tty: bool,
    /// Extra environment (KEY, VALUE), in the order given.
    pub env: Vec<(OsString, OsString)>,
    /// Working directory of the command.
    pub workdir: Option<PathBuf>,
    /// User (and group) to run the command as.
    pub user: Option<UserSpec>,
    /// Lower the kernel console log level so late kernel messages do not
    /// interleave with the command's output.
    pub quiet: bool,
    /// Start the guest agent (vsock port 1024, src/agent.rs). Without a
    /// command, the agent is all the guest runs until it is powered off.
    pub agent: bool,
    /// virtio-fs shares to mount before anything runs, in order.
    pub volumes: Vec<Volume>,
    /// The virtio-fs tag of the share that becomes the root file system
    /// (read-only, with a tmpfs layer over it), before `volumes` are
    /// mounted. `None`: the root stays what the kernel booted.
    pub root_fs: Option<String>,
    /// How `root_fs` becomes the root (`vmlab.rootmode`).
    pub root_mode: RootMode,
    /// The host name to set (`vmlab.hostname`): 1 to 64 bytes, no NUL.
    pub hostname: Option<Vec<u8>>,
    /// Files to bind-mount after `volumes`, in order (`vmlab.bind`).
    pub binds: Vec<Bind>,
    /// tmpfs mounts to make after `binds`, in order (`vmlab.tmpfs`).
    pub tmpfs: Vec<Tmpfs>,
}

/// How the root share becomes the root file system.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum RootMode {
    /// Read-only, with a tmpfs layer over it (overlayfs): `vmlab.root`
    /// alone.
    #[default]
    Overlay,
    /// The share itself, read-write (`rootmode:rw`).
    ReadWrite,
    /// The share itself, read-only (`rootmode:ro`).
    ReadOnly,
}

/// A file bind mount: `mount --bind SOURCE PATH [-o remount,ro]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    /// The file bound: absolute (in a share mounted before).
    pub source: PathBuf,
    /// Where: absolute; an empty file is created there if missing.
    pub path: PathBuf,
    /// Remount the bind read-only.
    pub readonly: bool,
}

/// A tmpfs: `mount -t tmpfs -o DATA tmpfs PATH` with mount flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tmpfs {
    /// The mount point: absolute, created with its parents if missing.
    pub path: PathBuf,
    /// The mount flags (`MS_*`).
    pub flags: libc::c_ulong,
    /// The options for tmpfs itself (`size=64m,mode=755`), comma-separated.
    pub data: Vec<u8>,
}

/// The flags of a `--tmpfs` without options, as Docker's.
pub const TMPFS_DEFAULT_FLAGS: libc::c_ulong = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;

/// A virtio-fs share: `mount -t virtiofs TAG PATH [-o ro]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    /// The virtio-fs device's tag (the mount source); not empty.
    pub tag: OsString,
    /// The mount point: absolute, created with its parents if missing.
    pub path: PathBuf,
    /// Mount read-only (`MS_RDONLY`).
    pub readonly: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            cmd: None,
            tty: true,
            env: Vec::new(),
            workdir: None,
            user: None,
            quiet: false,
            agent: false,
            volumes: Vec::new(),
            root_fs: None,
            root_mode: RootMode::Overlay,
            hostname: None,
            binds: Vec::new(),
            tmpfs: Vec::new(),
        }
    }
}

/// Why a hex string could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HexError {
    /// Hex needs two digits per byte.
    OddLength(usize),
    /// A character that is not a hex digit, and its byte offset.
    BadDigit { offset: usize, byte: u8 },
}

impl fmt::Display for HexError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HexError::OddLength(n) => write!(f, "odd number of hex digits ({n})"),
            HexError::BadDigit { offset, byte } => {
                write!(
                    f,
                    "invalid hex digit {:?} at offset {offset}",
                    *byte as char
                )
            }
        }
    }
}

/// A `vmlab.*` parameter that could not be used. Reported as exit status 127.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CmdlineError {
    /// The value of `param` is not valid hex.
    Hex { param: String, err: HexError },
    /// `vmlab.cmd` decoded to nothing, or its program name is empty.
    EmptyCommand,
    /// A value that is not one of the allowed ones (e.g. `vmlab.tty=2`).
    BadValue { param: String, value: String },
    /// A `vmlab.env` entry without `=` or with an empty key.
    BadEnv(String),
    /// `vmlab.user` is not `uid[:gid]` / `name[:group]`.
    BadUser(String),
    /// `vmlab.fs` is not a list of `TAG, PATH, ro|rw` triples; says why.
    BadVolume(String),
    /// `vmlab.root` is not a usable virtio-fs tag; says why.
    BadRoot(String),
    /// `vmlab.hostname` is empty, too long or has a NUL byte.
    BadHostname(String),
    /// `vmlab.bind` is not a list of `SOURCE, PATH, ro|rw` triples.
    BadBind(String),
    /// `vmlab.tmpfs` is not a list of `PATH, OPTIONS` pairs.
    BadTmpfs(String),
}

impl fmt::Display for CmdlineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CmdlineError::Hex { param, err } => write!(f, "malformed {param}: {err}"),
            CmdlineError::EmptyCommand => write!(f, "malformed vmlab.cmd: empty command"),
            CmdlineError::BadValue { param, value } => {
                write!(f, "malformed {param}: unexpected value {value:?}")
            }
            CmdlineError::BadEnv(entry) => {
                write!(f, "malformed vmlab.env: entry {entry:?} is not KEY=VALUE")
            }
            CmdlineError::BadUser(why) => write!(f, "malformed vmlab.user: {why}"),
            CmdlineError::BadVolume(why) => write!(f, "malformed vmlab.fs: {why}"),
            CmdlineError::BadRoot(why) => write!(f, "malformed vmlab.root: {why}"),
            CmdlineError::BadHostname(why) => write!(f, "malformed vmlab.hostname: {why}"),
            CmdlineError::BadBind(why) => write!(f, "malformed vmlab.bind: {why}"),
            CmdlineError::BadTmpfs(why) => write!(f, "malformed vmlab.tmpfs: {why}"),
        }
    }
}

/// Decodes a hex string (either case) into bytes.
pub fn decode_hex(s: &[u8]) -> Result<Vec<u8>, HexError> {
    if !s.len().is_multiple_of(2) {
        return Err(HexError::OddLength(s.len()));
    }
    let digit = |offset: usize| -> Result<u8, HexError> {
        let byte = s[offset];
        match byte {
            b'0'..=b'9' => Ok(byte - b'0'),
            b'a'..=b'f' => Ok(byte - b'a' + 10),
            b'A'..=b'F' => Ok(byte - b'A' + 10),
            _ => Err(HexError::BadDigit { offset, byte }),
        }
    };
    (0..s.len() / 2)
        .map(|i| Ok(digit(2 * i)? << 4 | digit(2 * i + 1)?))
        .collect()
}

/// Encodes bytes as lowercase hex; the inverse of [`decode_hex`]. Used by
/// the tests (and handy for whoever writes the VMM side).
#[cfg(test)]
pub fn encode_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Splits a kernel command line into parameters the way the kernel's
/// `next_arg()` does: whitespace separates parameters except inside double
/// quotes, and the quotes themselves are dropped.
fn split_params(cmdline: &[u8]) -> Vec<Vec<u8>> {
    let mut params = Vec::new();
    let mut cur = Vec::new();
    let mut in_quote = false;
    let mut in_param = false;
    for &b in cmdline {
        match b {
            b'"' => {
                in_quote = !in_quote;
                in_param = true;
            }
            b' ' | b'\t' | b'\n' | b'\r' | b'\0' if !in_quote => {
                if in_param {
                    params.push(std::mem::take(&mut cur));
                    in_param = false;
                }
            }
            _ => {
                cur.push(b);
                in_param = true;
            }
        }
    }
    if in_param {
        params.push(cur);
    }
    params
}

fn hex_param(param: &str, value: &[u8]) -> Result<Vec<u8>, CmdlineError> {
    decode_hex(value).map_err(|err| CmdlineError::Hex {
        param: param.to_string(),
        err,
    })
}

/// Boolean parameters: `1`/`0`, a bare `vmlab.quiet` counts as 1.
fn bool_param(param: &str, value: Option<&[u8]>) -> Result<bool, CmdlineError> {
    match value {
        None | Some(b"1") => Ok(true),
        Some(b"0") => Ok(false),
        Some(v) => Err(CmdlineError::BadValue {
            param: param.to_string(),
            value: String::from_utf8_lossy(v).into_owned(),
        }),
    }
}

/// Splits `argv` bytes joined by NUL. The join is exact, so `"a\0"` is the
/// two arguments `a` and the empty string.
fn split_argv(bytes: &[u8]) -> Result<Vec<OsString>, CmdlineError> {
    if bytes.is_empty() {
        return Err(CmdlineError::EmptyCommand);
    }
    let argv: Vec<OsString> = bytes
        .split(|&b| b == 0)
        .map(|a| OsString::from_vec(a.to_vec()))
        .collect();
    match argv.first() {
        Some(prog) if !prog.is_empty() => Ok(argv),
        _ => Err(CmdlineError::EmptyCommand),
    }
}

/// Splits NUL-separated `KEY=VALUE` pairs. Empty entries (e.g. from a
/// trailing NUL) are skipped; an entry without `=` or with an empty key is an
/// error rather than being silently dropped.
fn split_env(bytes: &[u8]) -> Result<Vec<(OsString, OsString)>, CmdlineError> {
    bytes
        .split(|&b| b == 0)
        .filter(|e| !e.is_empty())
        .map(|entry| match entry.iter().position(|&b| b == b'=') {
            Some(eq) if eq > 0 => Ok((
                OsString::from_vec(entry[..eq].to_vec()),
                OsString::from_vec(entry[eq + 1..].to_vec()),
            )),
            _ => Err(CmdlineError::BadEnv(
                String::from_utf8_lossy(entry).into_owned(),
            )),
        })
        .collect()
}

/// Splits the NUL-joined `TAG, PATH, MODE` triples of `vmlab.fs` (MODE `ro`
/// or `rw`). Nothing at all is no shares; anything else must be whole
/// triples with a non-empty tag and an absolute path.
fn split_volumes(bytes: &[u8]) -> Result<Vec<Volume>, CmdlineError> {
    if bytes.is_empty() {
        return Ok(Vec::new());
    }
    let fields: Vec<&[u8]> = bytes.split(|&b| b == 0).collect();
    if !fields.len().is_multiple_of(3) {
        return Err(CmdlineError::BadVolume(format!(
            "{} fields, not TAG, PATH, MODE triples",
            fields.len()
        )));
    }
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    fields
        .chunks_exact(3)
        .map(|f| {
            let (tag, path, mode) = (f[0], f[1], f[2]);
            if tag.is_empty() {
                return Err(CmdlineError::BadVolume(format!(
                    "empty tag for path {:?}",
                    text(path)
                )));
            }
            if !path.starts_with(b"/") {
                return Err(CmdlineError::BadVolume(format!(
                    "path {:?} of share {:?} is not absolute",
                    text(path),
                    text(tag)
                )));
            }
            let readonly = match mode {
                b"ro" => true,
                b"rw" => false,
                _ => {
                    return Err(CmdlineError::BadVolume(format!(
                        "mode {:?} of share {:?} is not ro or rw",
                        text(mode),
                        text(tag)
                    )))
                }
            };
            Ok(Volume {
                tag: OsString::from_vec(tag.to_vec()),
                path: PathBuf::from(OsString::from_vec(path.to_vec())),
                readonly,
            })
        })
        .collect()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn os_path(b: &[u8]) -> PathBuf {
    PathBuf::from(OsString::from_vec(b.to_vec()))
}

/// The longest host name Linux takes (`__NEW_UTS_LEN`).
const MAX_HOSTNAME: usize = 64;

fn hostname(bytes: Vec<u8>) -> Result<Vec<u8>, CmdlineError> {
    if bytes.is_empty() {
        return Err(CmdlineError::BadHostname("empty".to_string()));
    }
    if bytes.contains(&0) {
        return Err(CmdlineError::BadHostname(format!(
            "{:?} contains a NUL byte",
            text(&bytes)
        )));
    }
    if bytes.len() > MAX_HOSTNAME {
        return Err(CmdlineError::BadHostname(format!(
            "{} bytes, more than {MAX_HOSTNAME}",
            bytes.len()
        )));
    }
    Ok(bytes)
}

/// Splits the NUL-joined `SOURCE, PATH, MODE` triples of `vmlab.bind`.
fn split_binds(bytes: &[u8]) -> Result<Vec<Bind>, CmdlineError> {
    if bytes.is_empty() {
        return Ok(Vec::new());
    }
    let fields: Vec<&[u8]> = bytes.split(|&b| b == 0).collect();
    if !fields.len().is_multiple_of(3) {
        return Err(CmdlineError::BadBind(format!(
            "{} fields, not SOURCE, PATH, MODE triples",
            fields.len()
        )));
    }
    fields
        .chunks_exact(3)
        .map(|f| {
            let (source, path, mode) = (f[0], f[1], f[2]);
            for p in [source, path] {
                if !p.starts_with(b"/") {
                    return Err(CmdlineError::BadBind(format!(
                        "path {:?} is not absolute",
                        text(p)
                    )));
                }
            }
            let readonly = match mode {
                b"ro" => true,
                b"rw" => false,
                _ => {
                    return Err(CmdlineError::BadBind(format!(
                        "mode {:?} of {:?} is not ro or rw",
                        text(mode),
                        text(path)
                    )))
                }
            };
            Ok(Bind {
                source: os_path(source),
                path: os_path(path),
                readonly,
            })
        })
        .collect()
}

/// Turns Docker's `--tmpfs` options into mount flags (starting from
/// [`TMPFS_DEFAULT_FLAGS`]; a later word wins) and tmpfs's own `KEY=VALUE`
/// options, in order.
pub fn tmpfs_options(options: &[u8]) -> Result<(libc::c_ulong, Vec<u8>), String> {
    let mut flags = TMPFS_DEFAULT_FLAGS;
    let mut data: Vec<u8> = Vec::new();
    for word in options.split(|&b| b == b',').filter(|w| !w.is_empty()) {
        let (set, clear): (libc::c_ulong, libc::c_ulong) = match word {
            b"ro" => (libc::MS_RDONLY, 0),
            b"rw" => (0, libc::MS_RDONLY),
            b"noexec" => (libc::MS_NOEXEC, 0),
            b"exec" => (0, libc::MS_NOEXEC),
            b"nosuid" => (libc::MS_NOSUID, 0),
            b"suid" => (0, libc::MS_NOSUID),
            b"nodev" => (libc::MS_NODEV, 0),
            b"dev" => (0, libc::MS_NODEV),
            b"sync" => (libc::MS_SYNCHRONOUS, 0),
            b"async" => (0, libc::MS_SYNCHRONOUS),
            b"noatime" => (libc::MS_NOATIME, 0),
            b"atime" => (0, libc::MS_NOATIME),
            b"nodiratime" => (libc::MS_NODIRATIME, 0),
            b"diratime" => (0, libc::MS_NODIRATIME),
            b"relatime" => (libc::MS_RELATIME, 0),
            b"norelatime" => (0, libc::MS_RELATIME),
            b"strictatime" => (libc::MS_STRICTATIME, 0),
            b"nostrictatime" => (0, libc::MS_STRICTATIME),
            _ if word
                .iter()
                .position(|&b| b == b'=')
                .is_some_and(|eq| eq > 0) =>
            {
                if !data.is_empty() {
                    data.push(b',');
                }
                data.extend_from_slice(word);
                continue;
            }
            _ => return Err(format!("unknown option {:?}", text(word))),
        };
        flags = (flags | set) & !clear;
    }
    Ok((flags, data))
}

/// Splits the NUL-joined `PATH, OPTIONS` pairs of `vmlab.tmpfs`.
fn split_tmpfs(bytes: &[u8]) -> Result<Vec<Tmpfs>, CmdlineError> {
    if bytes.is_empty() {
        return Ok(Vec::new());
    }
    let fields: Vec<&[u8]> = bytes.split(|&b| b == 0).collect();
    if !fields.len().is_multiple_of(2) {
        return Err(CmdlineError::BadTmpfs(format!(
            "{} fields, not PATH, OPTIONS pairs",
            fields.len()
        )));
    }
    fields
        .chunks_exact(2)
        .map(|f| {
            let (path, options) = (f[0], f[1]);
            if !path.starts_with(b"/") {
                return Err(CmdlineError::BadTmpfs(format!(
                    "path {:?} is not absolute",
                    text(path)
                )));
            }
            let (flags, data) = tmpfs_options(options)
                .map_err(|why| CmdlineError::BadTmpfs(format!("{}: {why}", text(path))))?;
            Ok(Tmpfs {
                path: os_path(path),
                flags,
                data,
            })
        })
        .collect()
}

/// The tag of `vmlab.root`: not empty, and a C string (it is the mount's
/// source). virtio-fs tags are UTF-8 (virtio spec, 5.11.4).
fn root_tag(bytes: Vec<u8>) -> Result<String, CmdlineError> {
    if bytes.is_empty() {
        return Err(CmdlineError::BadRoot("empty tag".to_string()));
    }
    if bytes.contains(&0) {
        return Err(CmdlineError::BadRoot(format!(
            "tag {:?} contains a NUL byte",
            String::from_utf8_lossy(&bytes)
        )));
    }
    String::from_utf8(bytes).map_err(|e| {
        CmdlineError::BadRoot(format!(
            "tag {:?} is not UTF-8",
            String::from_utf8_lossy(e.as_bytes())
        ))
    })
}

/// Parses the full contents of `/proc/cmdline`. Unknown parameters (the
/// kernel's own, other modules') are ignored; when a setting is given twice
/// the last one wins, as for kernel parameters.
///
/// Two spellings are understood: one parameter per setting
/// (`vmlab.cmd=HEX vmlab.tty=0`), and all settings in one parameter
/// (`vmlab=cmd:HEX,tty:0`), which is what the VMM passes. One word costs
/// less: the guest kernel compares every word of its command line with
/// each of its parameter names several times during boot, and on a nested
/// KVM host each word costs about 0.1 s of boot (docs/BOOT.md).
pub fn parse(cmdline: &[u8]) -> Result<Config, CmdlineError> {
    let mut cfg = Config::default();
    for param in split_params(cmdline) {
        let (key, value) = match param.iter().position(|&b| b == b'=') {
            Some(eq) => (&param[..eq], Some(&param[eq + 1..])),
            None => (&param[..], None),
        };
        if key == b"vmlab" {
            for item in value.unwrap_or(b"").split(|&b| b == b',') {
                if item.is_empty() {
                    continue;
                }
                let (name, v) = match item.iter().position(|&b| b == b':') {
                    Some(c) => (&item[..c], Some(&item[c + 1..])),
                    None => (item, None),
                };
                apply(&mut cfg, name, v)?;
            }
            continue;
        }
        let Some(name) = key.strip_prefix(b"vmlab.") else {
            continue;
        };
        apply(&mut cfg, name, value)?;
    }
    Ok(cfg)
}

/// Applies one setting `name` (`cmd`, `tty`, ...) with its raw value.
fn apply(cfg: &mut Config, name: &[u8], value: Option<&[u8]>) -> Result<(), CmdlineError> {
    let pname = format!("vmlab.{}", String::from_utf8_lossy(name));
    let v = value.unwrap_or(b"");
    match name {
        b"cmd" => cfg.cmd = Some(split_argv(&hex_param(&pname, v)?)?),
        b"tty" => cfg.tty = bool_param(&pname, value)?,
        b"quiet" => cfg.quiet = bool_param(&pname, value)?,
        b"agent" => cfg.agent = bool_param(&pname, value)?,
        b"env" => cfg.env = split_env(&hex_param(&pname, v)?)?,
        b"fs" => cfg.volumes = split_volumes(&hex_param(&pname, v)?)?,
        b"root" => cfg.root_fs = Some(root_tag(hex_param(&pname, v)?)?),
        b"rootmode" => {
            cfg.root_mode = match v {
                b"overlay" => RootMode::Overlay,
                b"rw" => RootMode::ReadWrite,
                b"ro" => RootMode::ReadOnly,
                _ => {
                    return Err(CmdlineError::BadValue {
                        param: pname,
                        value: text(v),
                    })
                }
            }
        }
        b"hostname" => cfg.hostname = Some(hostname(hex_param(&pname, v)?)?),
        b"bind" => cfg.binds = split_binds(&hex_param(&pname, v)?)?,
        b"tmpfs" => cfg.tmpfs = split_tmpfs(&hex_param(&pname, v)?)?,
        b"workdir" => {
            let dir = hex_param(&pname, v)?;
            if dir.is_empty() || dir.contains(&0) {
                return Err(CmdlineError::BadValue {
                    param: pname,
                    value: String::from_utf8_lossy(&dir).into_owned(),
                });
            }
            cfg.workdir = Some(PathBuf::from(OsString::from_vec(dir)));
        }
        b"user" => {
            let spec = hex_param(&pname, v)?;
            let spec = std::str::from_utf8(&spec)
                .map_err(|_| CmdlineError::BadUser("not UTF-8".to_string()))?;
            cfg.user = Some(user::parse_spec(spec).map_err(CmdlineError::BadUser)?);
        }
        _ => {} // a future setting: ignore, like the kernel does
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::user::Id;

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn hex_roundtrip_and_case() {
        assert_eq!(decode_hex(b"").unwrap(), b"");
        assert_eq!(decode_hex(b"00ff7f80").unwrap(), vec![0, 255, 127, 128]);
        assert_eq!(decode_hex(b"ABcd").unwrap(), vec![0xab, 0xcd]);
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(decode_hex(encode_hex(&all).as_bytes()).unwrap(), all);
    }

    #[test]
    fn hex_errors() {
        assert_eq!(decode_hex(b"abc"), Err(HexError::OddLength(3)));
        assert_eq!(
            decode_hex(b"0g"),
            Err(HexError::BadDigit {
                offset: 1,
                byte: b'g'
            })
        );
        assert_eq!(
            decode_hex(b"x0"),
            Err(HexError::BadDigit {
                offset: 0,
                byte: b'x'
            })
        );
    }

    #[test]
    fn defaults_without_vmlab_params() {
        let cfg = parse(b"console=ttyS0 reboot=k panic=-1 quiet\n").unwrap();
        assert_eq!(cfg, Config::default());
        assert!(cfg.tty);
        assert!(cfg.cmd.is_none());
    }

    #[test]
    fn full_command_line() {
        let cmd = encode_hex(b"sh\0-c\0exit 3");
        let env = encode_hex(b"A=1\0B=x=y\0EMPTY=\0");
        let wd = encode_hex(b"/srv/my app");
        let user = encode_hex(b"1000:100");
        let line = format!(
            "console=ttyS0 reboot=k vmlab.tty=0 vmlab.quiet=1 vmlab.cmd={cmd} \
             vmlab.env={env} vmlab.workdir={wd} vmlab.user={user} foo.bar=1\n"
        );
        let cfg = parse(line.as_bytes()).unwrap();
        assert_eq!(cfg.cmd, Some(os(&["sh", "-c", "exit 3"])));
        assert!(!cfg.tty);
        assert!(cfg.quiet);
        assert_eq!(
            cfg.env,
            vec![
                ("A".into(), "1".into()),
                ("B".into(), "x=y".into()),
                ("EMPTY".into(), "".into())
            ]
        );
        assert_eq!(cfg.workdir, Some(PathBuf::from("/srv/my app")));
        assert_eq!(
            cfg.user,
            Some(UserSpec {
                user: Id::Num(1000),
                group: Some(Id::Num(100))
            })
        );
    }

    #[test]
    fn argv_keeps_empty_and_non_utf8_arguments() {
        let line = format!("vmlab.cmd={}", encode_hex(b"printf\0%s|\0\0\xff"));
        let cfg = parse(line.as_bytes()).unwrap();
        let argv = cfg.cmd.unwrap();
        assert_eq!(argv.len(), 4);
        assert_eq!(argv[2], OsString::new());
        assert_eq!(argv[3], OsString::from_vec(vec![0xff]));
    }

    #[test]
    fn quoting_and_last_one_wins() {
        let a = encode_hex(b"true");
        let b = encode_hex(b"false");
        let line = format!("vmlab.cmd={a} \"vmlab.tty=0\" vmlab.cmd=\"{b}\"");
        let cfg = parse(line.as_bytes()).unwrap();
        assert_eq!(cfg.cmd, Some(os(&["false"])));
        assert!(!cfg.tty);
        assert_eq!(
            split_params(b"a=\"x y\"  b\t\"c d\"=1"),
            vec![b"a=x y".to_vec(), b"b".to_vec(), b"c d=1".to_vec()]
        );
    }

    #[test]
    fn malformed_values_are_errors() {
        assert!(matches!(
            parse(b"vmlab.cmd=73680"),
            Err(CmdlineError::Hex { ref param, err: HexError::OddLength(5) }) if param == "vmlab.cmd"
        ));
        assert!(matches!(
            parse(b"vmlab.env=zz"),
            Err(CmdlineError::Hex { .. })
        ));
        assert_eq!(parse(b"vmlab.cmd="), Err(CmdlineError::EmptyCommand));
        assert_eq!(parse(b"vmlab.cmd"), Err(CmdlineError::EmptyCommand));
        // Empty program name.
        assert_eq!(parse(b"vmlab.cmd=0061"), Err(CmdlineError::EmptyCommand));
        assert!(matches!(
            parse(b"vmlab.tty=2"),
            Err(CmdlineError::BadValue { .. })
        ));
        let bad_env = format!("vmlab.env={}", encode_hex(b"A=1\0NOEQUALS"));
        assert_eq!(
            parse(bad_env.as_bytes()),
            Err(CmdlineError::BadEnv("NOEQUALS".into()))
        );
        let bad_env = format!("vmlab.env={}", encode_hex(b"=x"));
        assert!(matches!(
            parse(bad_env.as_bytes()),
            Err(CmdlineError::BadEnv(_))
        ));
        let bad_user = format!("vmlab.user={}", encode_hex(b"1000:"));
        assert!(matches!(
            parse(bad_user.as_bytes()),
            Err(CmdlineError::BadUser(_))
        ));
        assert!(matches!(
            parse(b"vmlab.workdir="),
            Err(CmdlineError::BadValue { .. })
        ));
        // The message names the parameter and the problem.
        let msg = parse(b"vmlab.cmd=zz").unwrap_err().to_string();
        assert_eq!(
            msg,
            "malformed vmlab.cmd: invalid hex digit 'z' at offset 0"
        );
    }

    #[test]
    fn virtio_fs_shares() {
        let fs = encode_hex(b"vol0\0/data\0rw\0vol1\0/srv/my app\0ro");
        let cfg = parse(format!("vmlab=tty:0,fs:{fs},agent:1").as_bytes()).unwrap();
        assert_eq!(
            cfg.volumes,
            vec![
                Volume {
                    tag: "vol0".into(),
                    path: PathBuf::from("/data"),
                    readonly: false,
                },
                Volume {
                    tag: "vol1".into(),
                    path: PathBuf::from("/srv/my app"),
                    readonly: true,
                },
            ]
        );
        assert!(cfg.agent);
        // The per-setting spelling, and non-UTF-8 bytes, work too.
        let fs = encode_hex(b"t\0/mnt/\xff\0ro");
        let cfg = parse(format!("vmlab.fs={fs}").as_bytes()).unwrap();
        assert_eq!(
            cfg.volumes[0].path,
            PathBuf::from(OsString::from_vec(b"/mnt/\xff".to_vec()))
        );
        // None by default, and an empty value is none.
        assert!(parse(b"vmlab=tty:0").unwrap().volumes.is_empty());
        assert!(parse(b"vmlab=fs:").unwrap().volumes.is_empty());
    }

    #[test]
    fn malformed_shares_are_errors() {
        let err = |fields: &[u8]| {
            parse(format!("vmlab=fs:{}", encode_hex(fields)).as_bytes())
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            err(b"vol0\0/data"),
            "malformed vmlab.fs: 2 fields, not TAG, PATH, MODE triples"
        );
        // A trailing NUL is a fourth (empty) field.
        assert_eq!(
            err(b"vol0\0/data\0ro\0"),
            "malformed vmlab.fs: 4 fields, not TAG, PATH, MODE triples"
        );
        assert_eq!(
            err(b"\0/data\0ro"),
            "malformed vmlab.fs: empty tag for path \"/data\""
        );
        assert_eq!(
            err(b"vol0\0data\0ro"),
            "malformed vmlab.fs: path \"data\" of share \"vol0\" is not absolute"
        );
        assert_eq!(
            err(b"vol0\0\0ro"),
            "malformed vmlab.fs: path \"\" of share \"vol0\" is not absolute"
        );
        assert_eq!(
            err(b"vol0\0/data\0rw\0vol1\0/x\0RO"),
            "malformed vmlab.fs: mode \"RO\" of share \"vol1\" is not ro or rw"
        );
        assert!(matches!(
            parse(b"vmlab=fs:0"),
            Err(CmdlineError::Hex { ref param, .. }) if param == "vmlab.fs"
        ));
    }

    #[test]
    fn root_share() {
        let root = encode_hex(b"vmlab-root");
        let fs = encode_hex(b"vol0\0/data\0rw");
        let cfg = parse(format!("vmlab=tty:0,fs:{fs},root:{root}").as_bytes()).unwrap();
        assert_eq!(cfg.root_fs.as_deref(), Some("vmlab-root"));
        assert_eq!(cfg.volumes.len(), 1);
        // The per-setting spelling works too; none by default.
        let cfg = parse(format!("vmlab.root={root}").as_bytes()).unwrap();
        assert_eq!(cfg.root_fs.as_deref(), Some("vmlab-root"));
        assert_eq!(parse(b"vmlab=tty:0").unwrap().root_fs, None);
    }

    #[test]
    fn malformed_root_shares_are_errors() {
        let err = |line: &str| parse(line.as_bytes()).unwrap_err().to_string();
        assert_eq!(err("vmlab=root:"), "malformed vmlab.root: empty tag");
        assert_eq!(err("vmlab=root"), "malformed vmlab.root: empty tag");
        assert_eq!(err("vmlab.root="), "malformed vmlab.root: empty tag");
        assert_eq!(
            err(&format!("vmlab=root:{}", encode_hex(b"a\0b"))),
            "malformed vmlab.root: tag \"a\\0b\" contains a NUL byte"
        );
        assert_eq!(
            err(&format!("vmlab=root:{}", encode_hex(b"r\xff"))),
            "malformed vmlab.root: tag \"r\u{fffd}\" is not UTF-8"
        );
        assert!(matches!(
            parse(b"vmlab=root:7"),
            Err(CmdlineError::Hex { ref param, .. }) if param == "vmlab.root"
        ));
    }

    #[test]
    fn root_mode_hostname_binds_and_tmpfs() {
        let bind = encode_hex(
            b"/dev/.vmlab/vmlabf/0\0/etc/hosts\0rw\0/dev/.vmlab/vmlabfro/1\0/etc/resolv.conf\0ro",
        );
        let tmpfs = encode_hex(b"/run\0size=64m,mode=755\0/scratch\0");
        let line = format!(
            "vmlab=tty:0,root:72,rootmode:rw,hostname:{},bind:{bind},tmpfs:{tmpfs}",
            encode_hex(b"web-1")
        );
        let cfg = parse(line.as_bytes()).unwrap();
        assert_eq!(cfg.root_mode, RootMode::ReadWrite);
        assert_eq!(cfg.hostname.as_deref(), Some(&b"web-1"[..]));
        assert_eq!(
            cfg.binds,
            vec![
                Bind {
                    source: PathBuf::from("/dev/.vmlab/vmlabf/0"),
                    path: PathBuf::from("/etc/hosts"),
                    readonly: false,
                },
                Bind {
                    source: PathBuf::from("/dev/.vmlab/vmlabfro/1"),
                    path: PathBuf::from("/etc/resolv.conf"),
                    readonly: true,
                },
            ]
        );
        assert_eq!(
            cfg.tmpfs,
            vec![
                Tmpfs {
                    path: PathBuf::from("/run"),
                    flags: TMPFS_DEFAULT_FLAGS,
                    data: b"size=64m,mode=755".to_vec(),
                },
                Tmpfs {
                    path: PathBuf::from("/scratch"),
                    flags: TMPFS_DEFAULT_FLAGS,
                    data: Vec::new(),
                },
            ]
        );
        assert_eq!(
            parse(b"vmlab=rootmode:ro").unwrap().root_mode,
            RootMode::ReadOnly
        );
        assert_eq!(
            parse(b"vmlab=rootmode:overlay").unwrap().root_mode,
            RootMode::Overlay
        );
        // Defaults: none of it.
        let cfg = parse(b"vmlab=tty:0,root:72").unwrap();
        assert_eq!(cfg.root_mode, RootMode::Overlay);
        assert!(cfg.hostname.is_none() && cfg.binds.is_empty() && cfg.tmpfs.is_empty());
    }

    #[test]
    fn tmpfs_option_words() {
        let (flags, data) = tmpfs_options(b"rw,exec,size=1m,suid,mode=1777,ro,noatime").unwrap();
        assert_eq!(
            flags,
            libc::MS_NODEV | libc::MS_RDONLY | libc::MS_NOATIME,
            "exec and suid clear the defaults; the later ro wins"
        );
        assert_eq!(data, b"size=1m,mode=1777");
        assert_eq!(tmpfs_options(b"").unwrap(), (TMPFS_DEFAULT_FLAGS, vec![]));
        assert_eq!(
            tmpfs_options(b"bogus").unwrap_err(),
            "unknown option \"bogus\""
        );
        assert!(tmpfs_options(b"=1").is_err());
    }

    #[test]
    fn malformed_new_settings_are_errors() {
        let err = |line: String| parse(line.as_bytes()).unwrap_err().to_string();
        assert_eq!(
            err("vmlab=rootmode:rx".into()),
            "malformed vmlab.rootmode: unexpected value \"rx\""
        );
        assert_eq!(
            err("vmlab=hostname:".into()),
            "malformed vmlab.hostname: empty"
        );
        assert_eq!(
            err(format!("vmlab=hostname:{}", encode_hex(&[b'h'; 65]))),
            "malformed vmlab.hostname: 65 bytes, more than 64"
        );
        assert!(err(format!("vmlab=hostname:{}", encode_hex(b"a\0b"))).contains("NUL"));
        assert_eq!(
            err(format!("vmlab=bind:{}", encode_hex(b"/a\0/b"))),
            "malformed vmlab.bind: 2 fields, not SOURCE, PATH, MODE triples"
        );
        assert_eq!(
            err(format!("vmlab=bind:{}", encode_hex(b"a\0/b\0ro"))),
            "malformed vmlab.bind: path \"a\" is not absolute"
        );
        assert_eq!(
            err(format!("vmlab=bind:{}", encode_hex(b"/a\0/b\0RW"))),
            "malformed vmlab.bind: mode \"RW\" of \"/b\" is not ro or rw"
        );
        assert_eq!(
            err(format!("vmlab=tmpfs:{}", encode_hex(b"/run"))),
            "malformed vmlab.tmpfs: 1 fields, not PATH, OPTIONS pairs"
        );
        assert_eq!(
            err(format!("vmlab=tmpfs:{}", encode_hex(b"run\0"))),
            "malformed vmlab.tmpfs: path \"run\" is not absolute"
        );
        assert_eq!(
            err(format!("vmlab=tmpfs:{}", encode_hex(b"/run\0x"))),
            "malformed vmlab.tmpfs: /run: unknown option \"x\""
        );
    }

    #[test]
    fn bare_booleans_and_unknown_vmlab_params() {
        let cfg = parse(b"vmlab.quiet vmlab.tty vmlab.future=xyz").unwrap();
        assert!(cfg.quiet);
        assert!(cfg.tty);
        assert!(!parse(b"vmlab.quiet=0").unwrap().quiet);
    }

    #[test]
    fn one_word_form_matches_the_per_setting_form() {
        let cmd = encode_hex(b"sh\0-c\0exit 3");
        let env = encode_hex(b"A=b c");
        let dir = encode_hex(b"/srv");
        let user = encode_hex(b"1000:1000");
        let one =
            format!("quiet vmlab=tty:0,quiet:1,cmd:{cmd},env:{env},workdir:{dir},user:{user} x=1");
        let many = format!(
            "quiet vmlab.tty=0 vmlab.quiet=1 vmlab.cmd={cmd} vmlab.env={env} vmlab.workdir={dir} vmlab.user={user}"
        );
        let a = parse(one.as_bytes()).unwrap();
        assert_eq!(a, parse(many.as_bytes()).unwrap());
        assert!(!a.tty && a.quiet);
        assert_eq!(a.cmd.unwrap().len(), 3);
        // Errors name the setting as before.
        let err = parse(b"vmlab=cmd:zz").unwrap_err();
        assert_eq!(
            err.to_string(),
            "malformed vmlab.cmd: invalid hex digit 'z' at offset 0"
        );
        // Empty items and a bare flag are fine.
        assert!(parse(b"vmlab=,quiet,").unwrap().quiet);
        // The agent is off unless asked for.
        assert!(!a.agent);
        assert!(parse(b"vmlab=tty:0,agent:1").unwrap().agent);
        assert!(parse(b"vmlab=agent:2").is_err());
    }
}
