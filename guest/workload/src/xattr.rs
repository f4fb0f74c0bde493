//! `xattr`: set, read and list extended attributes, for the tests of
//! virtio-fs shares (the guest's busybox has no `setfattr`/`getfattr`).
//!
//! Unlike the workloads it prints no JSON: `get` prints the value's bytes
//! and a newline, `list` one name per line, `set` nothing. Errors are the
//! program's usual one line on stderr and exit status 1 (e.g. `getxattr
//! PATH NAME: No data available` for a missing attribute).
//!
//! The calls follow symlinks (setxattr(2), getxattr(2), listxattr(2)).

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::unix::ffi::OsStrExt;

use crate::args::ArgError;
use crate::error::{Context, Error};

/// The operands, for usage errors.
pub const USAGE: &str = "xattr set PATH NAME VALUE | xattr get PATH NAME | xattr list PATH";

/// One `xattr` command.
#[derive(Debug, PartialEq, Eq)]
enum Action<'a> {
    Set {
        path: &'a OsStr,
        name: &'a OsStr,
        value: &'a OsStr,
    },
    Get {
        path: &'a OsStr,
        name: &'a OsStr,
    },
    List {
        path: &'a OsStr,
    },
}

/// Whether `rest` (the arguments after `xattr`) asks for help.
pub fn wants_help(rest: &[OsString]) -> bool {
    matches!(
        rest.first().map(|a| a.as_bytes()),
        Some(b"--help" | b"-h" | b"help")
    )
}

fn parse(rest: &[OsString]) -> Result<Action<'_>, ArgError> {
    let os: Vec<&OsStr> = rest.iter().map(OsString::as_os_str).collect();
    let action = match os.as_slice() {
        [a, path, name, value] if a.as_bytes() == b"set" => Action::Set { path, name, value },
        [a, path, name] if a.as_bytes() == b"get" => Action::Get { path, name },
        [a, path] if a.as_bytes() == b"list" => Action::List { path },
        _ => return Err(ArgError::Operands(USAGE)),
    };
    let (Action::Set { path, .. } | Action::Get { path, .. } | Action::List { path }) = &action;
    if path.is_empty() {
        return Err(ArgError::Operands(USAGE));
    }
    Ok(action)
}

/// Runs `xattr ...` (the arguments after the subcommand name); returns
/// what to print on stdout.
pub fn run(rest: &[OsString]) -> Result<Vec<u8>, Error> {
    match parse(rest)? {
        Action::Set { path, name, value } => {
            set(path, name, value.as_bytes())
                .context(|| format!("setxattr {} {}", show(path), show(name)))?;
            Ok(Vec::new())
        }
        Action::Get { path, name } => {
            let mut value =
                get(path, name).context(|| format!("getxattr {} {}", show(path), show(name)))?;
            value.push(b'\n');
            Ok(value)
        }
        Action::List { path } => {
            let names = list(path).context(|| format!("listxattr {}", show(path)))?;
            Ok(names
                .iter()
                .flat_map(|n| n.iter().copied().chain([b'\n']))
                .collect())
        }
    }
}

fn show(s: &OsStr) -> String {
    s.to_string_lossy().into_owned()
}

/// A C string of an argument; argv strings cannot hold a NUL, but a caller
/// of these functions might.
fn c(s: &OsStr) -> io::Result<CString> {
    CString::new(s.as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn set(path: &OsStr, name: &OsStr, value: &[u8]) -> io::Result<()> {
    let (path, name) = (c(path)?, c(name)?);
    // SAFETY: path and name are C strings; value is a live buffer of the
    // length given.
    let rc = unsafe {
        libc::setxattr(
            path.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn get(path: &OsStr, name: &OsStr) -> io::Result<Vec<u8>> {
    let (path, name) = (c(path)?, c(name)?);
    read_sized(|buf, len| {
        // SAFETY: path and name are C strings; buf is NULL with len 0 (a
        // size query) or a live buffer of len bytes.
        unsafe { libc::getxattr(path.as_ptr(), name.as_ptr(), buf, len) }
    })
}

/// The names of `path`'s attributes, in the file system's order.
fn list(path: &OsStr) -> io::Result<Vec<Vec<u8>>> {
    let path = c(path)?;
    let raw = read_sized(|buf, len| {
        // SAFETY: path is a C string; buf is NULL with len 0 (a size query)
        // or a live buffer of len bytes.
        unsafe { libc::listxattr(path.as_ptr(), buf.cast(), len) }
    })?;
    // Each name ends with a NUL.
    Ok(raw
        .split(|&b| b == 0)
        .filter(|n| !n.is_empty())
        .map(<[u8]>::to_vec)
        .collect())
}

/// Calls `call(NULL, 0)` for the size, then `call(buf, size)`; again if the
/// value grew in between (ERANGE).
fn read_sized(mut call: impl FnMut(*mut libc::c_void, usize) -> isize) -> io::Result<Vec<u8>> {
    loop {
        let size = call(std::ptr::null_mut(), 0);
        if size < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = vec![0u8; size as usize];
        if buf.is_empty() {
            return Ok(buf);
        }
        let n = call(buf.as_mut_ptr().cast(), buf.len());
        if n >= 0 {
            buf.truncate(n as usize);
            return Ok(buf);
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::ERANGE) {
            return Err(err);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TempDir;

    fn args(list: &[&str]) -> Vec<OsString> {
        list.iter().map(OsString::from).collect()
    }

    #[test]
    fn operands() {
        let a = args(&["set", "/f", "user.x", "--v"]);
        assert_eq!(
            parse(&a),
            Ok(Action::Set {
                path: OsStr::new("/f"),
                name: OsStr::new("user.x"),
                value: OsStr::new("--v"),
            })
        );
        let a = args(&["get", "/f", "user.x"]);
        assert!(matches!(parse(&a), Ok(Action::Get { .. })));
        let a = args(&["list", "/f"]);
        assert!(matches!(parse(&a), Ok(Action::List { .. })));
        for bad in [
            &[][..],
            &["set", "/f", "user.x"],
            &["get", "/f"],
            &["get", "/f", "user.x", "extra"],
            &["list"],
            &["list", ""],
            &["remove", "/f", "user.x"],
        ] {
            assert_eq!(parse(&args(bad)), Err(ArgError::Operands(USAGE)), "{bad:?}");
        }
        assert!(wants_help(&args(&["--help"])));
        assert!(!wants_help(&args(&["list", "--help"])));
    }

    #[test]
    fn set_get_list_on_a_file() {
        let dir = TempDir::new("xattr");
        let file = dir.path().join("f");
        std::fs::write(&file, b"").unwrap();
        let f = file.to_str().unwrap();
        match run(&args(&["set", f, "user.vmlab", "a b"])) {
            Ok(out) => assert!(out.is_empty()),
            // A host file system without user xattrs: nothing to test.
            Err(Error::Io { err, .. }) if err.raw_os_error() == Some(libc::EOPNOTSUPP) => return,
            Err(e) => panic!("{e}"),
        }
        run(&args(&["set", f, "user.empty", ""])).unwrap();
        assert_eq!(
            run(&args(&["get", f, "user.vmlab"])).unwrap(),
            b"a b\n".to_vec()
        );
        assert_eq!(
            run(&args(&["get", f, "user.empty"])).unwrap(),
            b"\n".to_vec()
        );
        let listed = String::from_utf8(run(&args(&["list", f])).unwrap()).unwrap();
        let mut names: Vec<&str> = listed.lines().collect();
        names.sort_unstable();
        assert_eq!(names, ["user.empty", "user.vmlab"]);

        let e = run(&args(&["get", f, "user.missing"])).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("getxattr {f} user.missing: No data available")
        );
        assert_eq!(e.exit_status(), crate::error::EXIT_FAILED);
        let e = run(&args(&["list", "/nonexistent-vmlab"])).unwrap_err();
        assert_eq!(
            e.to_string(),
            "listxattr /nonexistent-vmlab: No such file or directory"
        );
    }
}
