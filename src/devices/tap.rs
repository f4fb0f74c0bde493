//! A host TAP device: the far end of a virtio-net device.
//!
//! vmlab opens `/dev/net/tun` and attaches to the named TAP interface with
//! `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`: every frame read or written is
//! preceded by a 12-byte `virtio_net_hdr_v1` (flags, GSO type and sizes,
//! checksum start and offset, num_buffers), the very header the guest's
//! driver uses, so checksum and segmentation offloads pass through without
//! vmlab touching a packet. Which offloads the kernel may hand over on
//! receive (partial checksums, TSO super-frames) is set with TUNSETOFFLOAD
//! once the guest has said what it accepts.
//!
//! The interface is created when it does not exist (that needs
//! CAP_NET_ADMIN in the network namespace); vmlab then brings it up, and
//! the kernel removes it again when vmlab exits. An existing interface is
//! used as it is, and brought up if it is down and vmlab may.
//!
//! The file descriptor is non-blocking: reads return `WouldBlock` when no
//! frame is queued, which is how the virtio-net worker knows to wait for
//! the next EPOLLIN.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

/// The clone device that hands out TUN/TAP file descriptors.
pub const TUN_DEVICE: &str = "/dev/net/tun";

/// Length of `struct virtio_net_hdr_v1` (virtio 1.x always includes
/// `num_buffers`), which is also the header vmlab asks the TAP for.
pub const VNET_HDR_LEN: usize = 12;

/// Longest interface name (IFNAMSIZ without the NUL).
pub const MAX_NAME_LEN: usize = libc::IFNAMSIZ - 1;

/// Receive offloads the kernel may use on frames it hands to vmlab
/// (TUNSETOFFLOAD bits).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Offloads {
    /// Frames may carry a partial checksum (VIRTIO_NET_HDR_F_NEEDS_CSUM).
    pub csum: bool,
    /// TCP/IPv4 segmentation offload (needs `csum`).
    pub tso4: bool,
    /// TCP/IPv6 segmentation offload (needs `csum`).
    pub tso6: bool,
    /// TSO with ECN (needs a TSO bit).
    pub tso_ecn: bool,
}

impl Offloads {
    /// The TUNSETOFFLOAD argument. The kernel refuses TSO without the
    /// checksum offload, so TSO bits are dropped when `csum` is off.
    pub fn tun_flags(self) -> libc::c_uint {
        if !self.csum {
            return 0;
        }
        let mut flags = libc::TUN_F_CSUM;
        if self.tso4 {
            flags |= libc::TUN_F_TSO4;
        }
        if self.tso6 {
            flags |= libc::TUN_F_TSO6;
        }
        if self.tso_ecn && (self.tso4 || self.tso6) {
            flags |= libc::TUN_F_TSO_ECN;
        }
        flags
    }
}

/// Why a TAP device cannot be used. Each says which interface and what to
/// do about it.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// Empty, too long, or with characters the kernel does not allow.
    #[error("tap {name:?}: not a valid interface name (1 to 15 bytes, no '/', ':' or spaces)")]
    InvalidName {
        /// The name given.
        name: String,
    },
    /// `/dev/net/tun` is missing (no tun module) or cannot be opened.
    #[error("tap {name}: cannot open {TUN_DEVICE}: {source} (is the tun module loaded?)")]
    OpenTun {
        /// The interface.
        name: String,
        /// Why.
        source: io::Error,
    },
    /// The interface does not exist and vmlab may not create it.
    #[error(
        "tap {name}: no such device and no permission to create it (CAP_NET_ADMIN); \
         create it first, e.g. `ip tuntap add dev {name} mode tap user $USER`"
    )]
    CannotCreate {
        /// The interface.
        name: String,
    },
    /// The interface exists but belongs to another user.
    #[error(
        "tap {name}: no permission to attach to it (it is owned by another user; \
         `ip tuntap add ... user $USER` or CAP_NET_ADMIN)"
    )]
    NotPermitted {
        /// The interface.
        name: String,
    },
    /// An interface of that name that is not a TAP (a TUN, a bridge, ...).
    #[error("tap {name}: the interface exists but is not a TAP device")]
    NotATap {
        /// The interface.
        name: String,
    },
    /// Another process is attached (and the TAP is single-queue).
    #[error("tap {name}: in use by another process")]
    Busy {
        /// The interface.
        name: String,
    },
    /// Any other failure of a TUN ioctl.
    #[error("tap {name}: {what}: {source}")]
    Ioctl {
        /// The interface.
        name: String,
        /// Which step.
        what: &'static str,
        /// Why.
        source: io::Error,
    },
}

/// An open TAP interface with a virtio-net header on every frame.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
    created: bool,
}

/// `struct ifreq` with the flags member, the only one TUNSETIFF and
/// SIOC[GS]IFFLAGS use (the rest of the 40-byte union is padding).
#[repr(C)]
struct IfReqFlags {
    name: [libc::c_char; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl IfReqFlags {
    fn new(name: &str, flags: libc::c_short) -> IfReqFlags {
        let mut req = IfReqFlags {
            name: [0; libc::IFNAMSIZ],
            flags,
            _pad: [0; 22],
        };
        // validate_name checked the length: the name and its NUL fit.
        for (dst, &src) in req.name.iter_mut().zip(name.as_bytes()) {
            *dst = src as libc::c_char;
        }
        req
    }
}

/// Checks an interface name the way the kernel's `dev_valid_name` does,
/// so that a bad name is a clear error instead of an EINVAL.
pub fn validate_name(name: &str) -> Result<(), TapError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':');
    if ok {
        Ok(())
    } else {
        Err(TapError::InvalidName {
            name: name.to_string(),
        })
    }
}

/// Whether an interface of that name exists in vmlab's network namespace.
fn interface_exists(name: &str) -> bool {
    let Ok(c_name) = CString::new(name) else {
        return false;
    };
    // SAFETY: if_nametoindex reads the NUL-terminated string, which
    // `c_name` keeps alive for the call.
    unsafe { libc::if_nametoindex(c_name.as_ptr()) != 0 }
}

impl Tap {
    /// Attaches to the TAP interface `name`, creating it if it does not
    /// exist (and vmlab may), and sets it up for virtio-net headers.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        validate_name(name)?;
        let existed = interface_exists(name);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(TUN_DEVICE)
            .map_err(|source| TapError::OpenTun {
                name: name.to_string(),
                source,
            })?;
        let flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
        // IFF_* for TUNSETIFF fit in the short the kernel reads.
        let mut req = IfReqFlags::new(name, flags as libc::c_short);
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq`; `req` has
        // its layout (name, then the flags member of the union, padded to
        // the full 40 bytes) and lives across the call.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
        if rc < 0 {
            let source = io::Error::last_os_error();
            let name = name.to_string();
            return Err(match source.raw_os_error() {
                Some(libc::EPERM | libc::EACCES) if existed => TapError::NotPermitted { name },
                Some(libc::EPERM | libc::EACCES) => TapError::CannotCreate { name },
                Some(libc::EINVAL) if existed => TapError::NotATap { name },
                Some(libc::EBUSY) => TapError::Busy { name },
                _ => TapError::Ioctl {
                    name,
                    what: "TUNSETIFF",
                    source,
                },
            });
        }
        let tap = Tap {
            file,
            name: name.to_string(),
            created: !existed,
        };
        tap.ioctl_int(
            libc::TUNSETVNETHDRSZ,
            VNET_HDR_LEN as libc::c_int,
            "TUNSETVNETHDRSZ",
        )?;
        // Nothing but plain frames until the guest says what it accepts.
        tap.set_offloads(Offloads::default())?;
        tap.bring_up();
        Ok(tap)
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether vmlab created the interface (it then disappears when vmlab
    /// exits).
    pub fn created(&self) -> bool {
        self.created
    }

    /// Tells the kernel which offloads it may use on frames it hands to
    /// vmlab (what the guest driver accepted).
    pub fn set_offloads(&self, offloads: Offloads) -> Result<(), TapError> {
        let flags = offloads.tun_flags();
        // SAFETY: TUNSETOFFLOAD takes its argument by value (an unsigned
        // long in the kernel); no memory is passed.
        let rc = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        };
        if rc < 0 {
            return Err(TapError::Ioctl {
                name: self.name.clone(),
                what: "TUNSETOFFLOAD",
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    fn ioctl_int(
        &self,
        request: libc::Ioctl,
        value: libc::c_int,
        what: &'static str,
    ) -> Result<(), TapError> {
        let mut value = value;
        // SAFETY: the TUNSET* ioctls used here read one int through the
        // pointer, which points to a live local.
        let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), request, &mut value) };
        if rc < 0 {
            return Err(TapError::Ioctl {
                name: self.name.clone(),
                what,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Sets IFF_UP if the interface is down. Without CAP_NET_ADMIN that
    /// fails; the TAP still works once someone else brings it up, so this
    /// is only a warning.
    fn bring_up(&self) {
        if let Err(e) = set_link_up(&self.name) {
            log::warn!(
                "tap {}: cannot bring the interface up ({e}); the guest's network stays down \
                 until it is up (`ip link set {} up`)",
                self.name,
                self.name
            );
        }
    }

    /// Reads one frame (header included) into `buf`; `WouldBlock` when
    /// none is queued.
    pub fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        read_fd(self.file.as_raw_fd(), buf)
    }

    /// Writes one frame (header included).
    pub fn write_frame(&self, buf: &[u8]) -> io::Result<usize> {
        write_fd(self.file.as_raw_fd(), buf)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// `read(2)` retried on EINTR.
pub(crate) fn read_fd(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: `buf` is valid for writes of `buf.len()` bytes and read
        // writes at most that many.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        match usize::try_from(n) {
            Ok(n) => return Ok(n),
            Err(_) => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
}

/// `write(2)` retried on EINTR.
pub(crate) fn write_fd(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    loop {
        // SAFETY: `buf` is valid for reads of `buf.len()` bytes.
        let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
        match usize::try_from(n) {
            Ok(n) => return Ok(n),
            Err(_) => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
}

/// Sets IFF_UP on interface `name` (SIOCSIFFLAGS through a datagram
/// socket of the current network namespace).
fn set_link_up(name: &str) -> io::Result<()> {
    // SAFETY: socket takes no pointers; the result is checked below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req = IfReqFlags::new(name, 0);
    // SAFETY: SIOCGIFFLAGS fills the flags member of the `struct ifreq`
    // that `req` lays out; `req` lives across the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let up = libc::IFF_UP as libc::c_short;
    if req.flags & up != 0 {
        return Ok(());
    }
    req.flags |= up;
    // SAFETY: as above; SIOCSIFFLAGS reads the same structure.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ifreq_has_the_kernel_layout() {
        assert_eq!(std::mem::size_of::<IfReqFlags>(), 40);
        assert_eq!(
            std::mem::size_of::<IfReqFlags>(),
            std::mem::size_of::<libc::ifreq>()
        );
        let req = IfReqFlags::new("tap0", 0x1234);
        assert_eq!(
            req.name[..5],
            [b't' as i8, b'a' as i8, b'p' as i8, b'0' as i8, 0]
        );
    }

    #[test]
    fn names() {
        for good in ["t0", "tap-vmlab.1", "x23456789012345"] {
            assert!(validate_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "x234567890123456",
            "a/b",
            "a:b",
            "a b",
            ".",
            "..",
            "t\u{e9}",
        ] {
            let err = validate_name(bad).unwrap_err();
            assert!(
                err.to_string().contains("not a valid interface name"),
                "{bad}"
            );
        }
        assert!(matches!(
            Tap::open("a/b"),
            Err(TapError::InvalidName { .. })
        ));
    }

    #[test]
    fn offload_flags() {
        assert_eq!(Offloads::default().tun_flags(), 0);
        let all = Offloads {
            csum: true,
            tso4: true,
            tso6: true,
            tso_ecn: true,
        };
        assert_eq!(
            all.tun_flags(),
            libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_TSO_ECN
        );
        // TSO without checksum offload is refused by the kernel: dropped.
        let no_csum = Offloads { csum: false, ..all };
        assert_eq!(no_csum.tun_flags(), 0);
        let ecn_alone = Offloads {
            csum: true,
            tso_ecn: true,
            ..Offloads::default()
        };
        assert_eq!(ecn_alone.tun_flags(), libc::TUN_F_CSUM);
    }

    /// Runs `f` on a thread moved into a new network namespace (a network
    /// namespace belongs to a thread, so the test process is unaffected).
    /// None when this user may not create one.
    fn in_private_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
        std::thread::spawn(move || {
            // SAFETY: unshare takes no pointers; it affects only this
            // thread, which ends with the closure.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return None;
            }
            Some(f())
        })
        .join()
        .unwrap()
    }

    /// Creation, the vnet header, offloads and a frame through the TAP,
    /// in a private network namespace (skipped without CAP_NET_ADMIN or
    /// /dev/net/tun).
    #[test]
    fn create_attach_and_errors_in_a_private_netns() {
        if !std::path::Path::new(TUN_DEVICE).exists() {
            eprintln!("skipped: no {TUN_DEVICE}");
            return;
        }
        let ran = in_private_netns(|| {
            assert!(!interface_exists("vmt0"));
            let tap = Tap::open("vmt0").unwrap();
            assert!(tap.created());
            assert!(interface_exists("vmt0"));
            assert_eq!(tap.name(), "vmt0");
            // Up, as vmlab brought it up.
            let mut req = IfReqFlags::new("vmt0", 0);
            // SAFETY: socket takes no pointers.
            let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
            assert!(sock >= 0);
            // SAFETY: as in set_link_up.
            let rc = unsafe { libc::ioctl(sock, libc::SIOCGIFFLAGS, &mut req) };
            assert_eq!(rc, 0);
            // SAFETY: closes the socket this test opened.
            unsafe { libc::close(sock) };
            assert_ne!(req.flags & libc::IFF_UP as libc::c_short, 0);
            // Every offload the device offers is accepted by the kernel.
            tap.set_offloads(Offloads {
                csum: true,
                tso4: true,
                tso6: true,
                tso_ecn: true,
            })
            .unwrap();
            // Nothing queued: WouldBlock, not a hang.
            let mut buf = [0u8; 2048];
            assert_eq!(
                tap.read_frame(&mut buf).unwrap_err().kind(),
                io::ErrorKind::WouldBlock
            );
            // A frame with an empty header is accepted.
            let mut frame = vec![0u8; VNET_HDR_LEN + 60];
            frame[VNET_HDR_LEN..VNET_HDR_LEN + 6].copy_from_slice(&[0xff; 6]);
            frame[VNET_HDR_LEN + 12..VNET_HDR_LEN + 14].copy_from_slice(&[0x08, 0x06]);
            assert_eq!(tap.write_frame(&frame).unwrap(), frame.len());
            // A second attach to a single-queue TAP: busy.
            assert!(matches!(Tap::open("vmt0"), Err(TapError::Busy { .. })));
            drop(tap);
            // vmlab created it without IFF_PERSIST: gone with the fd.
            assert!(!interface_exists("vmt0"));
            // The loopback exists and is not a TAP.
            assert!(matches!(Tap::open("lo"), Err(TapError::NotATap { .. })));
        });
        if ran.is_none() {
            eprintln!("skipped: cannot create a network namespace");
        }
    }

    #[test]
    fn error_messages_say_what_to_do() {
        let e = TapError::CannotCreate { name: "t0".into() };
        let text = e.to_string();
        assert!(text.contains("tap t0: no such device and no permission to create it"));
        assert!(text.contains("CAP_NET_ADMIN"));
    }
}
