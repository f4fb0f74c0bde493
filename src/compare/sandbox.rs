//! The host baseline's sandbox: `vmlab compare` runs the image's
//! `vmlab-workload` on the host (the baseline, and the network client), and
//! that binary comes from an image, so it is untrusted. As root, vmlab
//! runs it:
//!
//! - as an unprivileged user: uid and gid 65534 (`nobody`/`nogroup`) by
//!   default, or `VMLAB_COMPARE_HOST_USER=UID[:GID]`, with no
//!   supplementary groups;
//! - with no capabilities: the bounding set is emptied and the switch from
//!   uid 0 clears the permitted, effective and ambient sets;
//! - with `no_new_privs` (a set-user-ID binary cannot regain root);
//! - in mount, IPC and UTS namespaces of its own (the mount namespace's
//!   propagation is private, so nothing it could mount reaches the host),
//!   besides the network namespace vmlab already gives it;
//! - under a seccomp filter (rust-vmm's `seccompiler`) that fails with
//!   EPERM the calls a benchmark never needs and an attacker would: module
//!   loading, kexec, reboot, mounts, namespaces, ptrace and cross-process
//!   memory access, BPF, perf events, keyrings, clock and swap changes,
//!   raw I/O ports, `open_by_handle_at`, userfaultfd.
//!
//! There is no PID namespace: the script is a `sh` running one workload
//! after another, and in a fresh PID namespace the first of them would be
//! its init, whose exit ends the namespace for the rest. The process can
//! still see the host's other processes in /proc, but as `nobody` it
//! cannot signal or trace them.
//!
//! Not root (`vmlab compare` also runs unprivileged), only `no_new_privs`
//! and the seccomp filter apply: the user's own identity is already
//! unprivileged.

use std::collections::BTreeMap;
use std::io;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

/// The variable naming the baseline's identity.
pub const USER_ENV: &str = "VMLAB_COMPARE_HOST_USER";
/// `nobody` / `nogroup` on Debian and most distributions.
pub const DEFAULT_ID: u32 = 65534;

/// System calls the filter refuses (EPERM).
const DENIED: &[libc::c_long] = &[
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_reboot,
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_chroot,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_unshare,
    libc::SYS_setns,
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_settimeofday,
    libc::SYS_clock_settime,
    libc::SYS_clock_adjtime,
    libc::SYS_adjtimex,
    libc::SYS_iopl,
    libc::SYS_ioperm,
    libc::SYS_open_by_handle_at,
    libc::SYS_name_to_handle_at,
    libc::SYS_userfaultfd,
    libc::SYS_acct,
    libc::SYS_quotactl,
    libc::SYS_syslog,
    libc::SYS_vhangup,
    libc::SYS_fsopen,
    libc::SYS_fsmount,
    libc::SYS_move_mount,
    libc::SYS_open_tree,
];

/// How the baseline is confined (made before the fork; applied in the
/// child by [`Sandbox::enter`]).
#[derive(Debug, Clone)]
pub struct Sandbox {
    /// The identity to switch to (`None`: not root, keep the user's own).
    pub ids: Option<(u32, u32)>,
    /// Whether to unshare the mount, IPC and UTS namespaces (root only).
    pub namespaces: bool,
    /// The compiled seccomp filter.
    filter: BpfProgram,
}

/// Why the sandbox cannot be prepared.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `VMLAB_COMPARE_HOST_USER` is malformed or names root.
    #[error("{USER_ENV}: {0}")]
    User(String),
    /// The seccomp filter did not compile.
    #[error("the host baseline's seccomp filter: {0}")]
    Filter(String),
}

/// Parses `UID[:GID]` (the gid defaults to the uid); 0 is refused.
pub fn parse_ids(s: &str) -> Result<(u32, u32), String> {
    let num = |v: &str| {
        v.trim()
            .parse::<u32>()
            .map_err(|_| format!("'{s}' is not UID[:GID] (numbers, e.g. 65534:65534)"))
    };
    let (uid, gid) = match s.split_once(':') {
        Some((u, g)) => (num(u)?, num(g)?),
        None => {
            let u = num(s)?;
            (u, u)
        }
    };
    if uid == 0 || gid == 0 {
        return Err(format!(
            "'{s}': the host baseline must not run as root (uid or gid 0)"
        ));
    }
    Ok((uid, gid))
}

impl Sandbox {
    /// The sandbox for this process: as root, the identity of
    /// `VMLAB_COMPARE_HOST_USER` (default 65534:65534) and namespaces;
    /// the filter in every case.
    pub fn for_host_baseline() -> Result<Sandbox, Error> {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let ids = match (root, std::env::var(USER_ENV)) {
            (false, _) => None,
            (true, Ok(v)) => Some(parse_ids(&v).map_err(Error::User)?),
            (true, Err(_)) => Some((DEFAULT_ID, DEFAULT_ID)),
        };
        Ok(Sandbox {
            ids,
            namespaces: root,
            filter: filter().map_err(|e| Error::Filter(e.to_string()))?,
        })
    }

    /// Applies the sandbox to the calling process. Meant for the child
    /// between fork and exec: it only makes system calls (no allocation).
    /// Order matters: namespaces and the bounding set need the
    /// capabilities the identity switch then drops; the filter comes last
    /// (it denies `unshare`).
    pub fn enter(&self) -> io::Result<()> {
        let check = |rc: libc::c_int| {
            if rc == 0 {
                Ok(())
            } else {
                Err(io::Error::last_os_error())
            }
        };
        // Plain system calls with constant or valid arguments (a
        // NUL-terminated string literal, null pointers where the kernel
        // accepts them); none touches this process's memory beyond what it
        // is given.
        if self.namespaces {
            // SAFETY: unshare takes only flags.
            check(unsafe {
                libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS)
            })?;
            // SAFETY: "/" is a NUL-terminated literal; the other pointers
            // are null, which mount(2) accepts for a propagation change.
            check(unsafe {
                libc::mount(
                    std::ptr::null(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                )
            })?;
        }
        if let Some((uid, gid)) = self.ids {
            for cap in 0..64 {
                // EINVAL past the last capability this kernel has.
                // SAFETY: prctl with integer arguments only.
                if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } != 0 {
                    let e = io::Error::last_os_error();
                    if e.raw_os_error() != Some(libc::EINVAL) {
                        return Err(e);
                    }
                }
            }
            // SAFETY: an empty group list: the null pointer is not read.
            check(unsafe { libc::setgroups(0, std::ptr::null()) })?;
            // SAFETY: integer arguments only.
            check(unsafe { libc::setresgid(gid, gid, gid) })?;
            // SAFETY: integer arguments only.
            check(unsafe { libc::setresuid(uid, uid, uid) })?;
        }
        // SAFETY: prctl with integer arguments only.
        check(unsafe {
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL,
                0,
                0,
                0,
            )
        })?;
        // Sets no_new_privs, then installs the filter.
        seccompiler::apply_filter(&self.filter).map_err(|e| match e {
            seccompiler::Error::Prctl(e) | seccompiler::Error::Seccomp(e) => e,
            _ => io::Error::from_raw_os_error(libc::EINVAL),
        })
    }

    /// How many system calls the filter denies (for the docs' figures).
    pub fn denied_count() -> usize {
        DENIED.len()
    }
}

fn filter() -> Result<BpfProgram, seccompiler::BackendError> {
    let rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> =
        DENIED.iter().map(|&nr| (nr, Vec::new())).collect();
    SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        TargetArch::x86_64,
    )?
    .try_into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert_eq!(parse_ids("65534"), Ok((65534, 65534)));
        assert_eq!(parse_ids("1000:2000"), Ok((1000, 2000)));
        assert!(parse_ids("0").unwrap_err().contains("root"));
        assert!(parse_ids("5:0").unwrap_err().contains("root"));
        assert!(parse_ids("nobody").unwrap_err().contains("UID[:GID]"));
        assert!(parse_ids("1:2:3").is_err());
    }

    #[test]
    fn the_filter_compiles() {
        assert!(!filter().unwrap().is_empty());
        assert!(Sandbox::denied_count() > 30);
    }
}
