//! The `vmlab.user` spec (`user[:group]`) and its resolution against the
//! image's `/etc/passwd` and `/etc/group`.
//!
//! The rules follow what docker/runc do, so that container images behave the
//! same when run in a vmlab guest:
//! - a numeric user that is not in `/etc/passwd` is used as is, with group 0
//!   and home `/`;
//! - a user name must exist in `/etc/passwd`;
//! - the primary group comes from the spec if given, else from the passwd
//!   entry; supplementary groups are the `/etc/group` entries that list the
//!   user's name.
//!
//! Parsing and resolution are pure functions of the file contents, so they
//! are unit tested on the host; only the caller reads the files (and only when
//! `vmlab.user` is given, since every read costs system calls in the guest).

use std::path::PathBuf;

/// A user or group, by number or by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Id {
    Num(u32),
    Name(String),
}

/// The parsed `user[:group]` spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserSpec {
    pub user: Id,
    pub group: Option<Id>,
}

/// Credentials to switch to before exec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Creds {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups, given to `setgroups` (primary group first).
    pub groups: Vec<u32>,
    /// Home directory, for `$HOME`.
    pub home: PathBuf,
}

fn parse_id(s: &str, what: &str) -> Result<Id, String> {
    if s.is_empty() {
        return Err(format!("empty {what}"));
    }
    if s.bytes().all(|b| b.is_ascii_digit()) {
        return s
            .parse::<u32>()
            .map(Id::Num)
            .map_err(|_| format!("{what} {s:?} out of range"));
    }
    if s.bytes().any(|b| b == b':' || b == b'\n' || b == 0) {
        return Err(format!("invalid {what} name {s:?}"));
    }
    Ok(Id::Name(s.to_string()))
}

/// Parses `uid[:gid]`, where either part may also be a name.
pub fn parse_spec(spec: &str) -> Result<UserSpec, String> {
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    Ok(UserSpec {
        user: parse_id(user, "user")?,
        group: group.map(|g| parse_id(g, "group")).transpose()?,
    })
}

/// One `/etc/passwd` line: name, uid, gid, home.
struct PasswdEntry<'a> {
    name: &'a str,
    uid: u32,
    gid: u32,
    home: &'a str,
}

fn passwd_entries(passwd: &str) -> impl Iterator<Item = PasswdEntry<'_>> {
    passwd.lines().filter_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 7 || f[0].starts_with('#') {
            return None;
        }
        Some(PasswdEntry {
            name: f[0],
            uid: f[2].parse().ok()?,
            gid: f[3].parse().ok()?,
            home: f[5],
        })
    })
}

/// One `/etc/group` line: name, gid, member names.
fn group_entries(group: &str) -> impl Iterator<Item = (&str, u32, Vec<&str>)> {
    group.lines().filter_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 4 || f[0].starts_with('#') {
            return None;
        }
        let members = f[3].split(',').filter(|m| !m.is_empty()).collect();
        Some((f[0], f[2].parse().ok()?, members))
    })
}

/// Resolves a spec into numeric credentials. `passwd` and `group` are the
/// contents of `/etc/passwd` and `/etc/group`, `None` when the file does not
/// exist.
pub fn resolve(
    spec: &UserSpec,
    passwd: Option<&str>,
    group: Option<&str>,
) -> Result<Creds, String> {
    let entry = passwd.and_then(|p| {
        passwd_entries(p).find(|e| match &spec.user {
            Id::Num(uid) => e.uid == *uid,
            Id::Name(name) => e.name == name,
        })
    });
    let (uid, mut gid, name, home) = match (&spec.user, entry) {
        (_, Some(e)) => (e.uid, e.gid, Some(e.name), Some(e.home)),
        (Id::Num(uid), None) => (*uid, 0, None, None),
        (Id::Name(name), None) => {
            return Err(format!(
                "unable to find user {name}: no matching entries in passwd file"
            ))
        }
    };
    match &spec.group {
        None => {}
        Some(Id::Num(g)) => gid = *g,
        Some(Id::Name(gname)) => {
            gid = group
                .and_then(|g| group_entries(g).find(|(n, _, _)| n == gname))
                .map(|(_, g, _)| g)
                .ok_or_else(|| {
                    format!("unable to find group {gname}: no matching entries in group file")
                })?;
        }
    }
    let mut groups = vec![gid];
    if let (Some(name), Some(group)) = (name, group) {
        for (_, g, members) in group_entries(group) {
            if members.contains(&name) && !groups.contains(&g) {
                groups.push(g);
            }
        }
    }
    let home = match home {
        Some(h) if !h.is_empty() => PathBuf::from(h),
        _ if uid == 0 => PathBuf::from("/root"),
        _ => PathBuf::from("/"),
    };
    Ok(Creds {
        uid,
        gid,
        groups,
        home,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "\
root:x:0:0:root:/root:/bin/sh
# a comment
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
app:x:1000:1000:App:/home/app:/bin/sh
broken line
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
";
    const GROUP: &str = "\
root:x:0:
tty:x:5:app
wheel:x:10:root,app
app:x:1000:
nogroup:x:65534:
";

    fn spec(s: &str) -> UserSpec {
        parse_spec(s).unwrap()
    }

    #[test]
    fn parse_specs() {
        assert_eq!(
            spec("0"),
            UserSpec {
                user: Id::Num(0),
                group: None
            }
        );
        assert_eq!(
            spec("1000:100"),
            UserSpec {
                user: Id::Num(1000),
                group: Some(Id::Num(100))
            }
        );
        assert_eq!(
            spec("app:wheel"),
            UserSpec {
                user: Id::Name("app".into()),
                group: Some(Id::Name("wheel".into()))
            }
        );
        assert!(parse_spec("").is_err());
        assert!(parse_spec(":0").is_err());
        assert!(parse_spec("0:").is_err());
        assert!(parse_spec("0:1:2").is_err());
        assert!(parse_spec("99999999999").is_err());
    }

    #[test]
    fn numeric_user_in_passwd() {
        let c = resolve(&spec("1000"), Some(PASSWD), Some(GROUP)).unwrap();
        assert_eq!(
            c,
            Creds {
                uid: 1000,
                gid: 1000,
                groups: vec![1000, 5, 10],
                home: "/home/app".into()
            }
        );
    }

    #[test]
    fn numeric_user_not_in_passwd_or_no_files() {
        let c = resolve(&spec("4242"), Some(PASSWD), Some(GROUP)).unwrap();
        assert_eq!(
            (c.uid, c.gid, c.groups, c.home),
            (4242, 0, vec![0], "/".into())
        );
        let c = resolve(&spec("4242:77"), None, None).unwrap();
        assert_eq!((c.uid, c.gid, c.groups), (4242, 77, vec![77]));
        let c = resolve(&spec("0"), None, None).unwrap();
        assert_eq!(c.home, PathBuf::from("/root"));
    }

    #[test]
    fn names() {
        let c = resolve(&spec("app:tty"), Some(PASSWD), Some(GROUP)).unwrap();
        assert_eq!((c.uid, c.gid, c.groups), (1000, 5, vec![5, 10]));
        let c = resolve(&spec("root"), Some(PASSWD), Some(GROUP)).unwrap();
        assert_eq!((c.uid, c.gid, c.groups), (0, 0, vec![0, 10]));
        let c = resolve(&spec("nobody:nogroup"), Some(PASSWD), Some(GROUP)).unwrap();
        assert_eq!((c.uid, c.gid), (65534, 65534));
    }

    #[test]
    fn unknown_names_are_errors() {
        let e = resolve(&spec("ghost"), Some(PASSWD), Some(GROUP)).unwrap_err();
        assert!(e.contains("unable to find user ghost"), "{e}");
        assert!(resolve(&spec("ghost"), None, None).is_err());
        let e = resolve(&spec("0:ghosts"), Some(PASSWD), Some(GROUP)).unwrap_err();
        assert!(e.contains("unable to find group ghosts"), "{e}");
        assert!(resolve(&spec("0:wheel"), Some(PASSWD), None).is_err());
    }
}
