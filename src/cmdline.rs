//! Assembling the guest kernel command line.
//!
//! Order matters: vmlab's defaults first, then host workarounds, then the
//! parameters for the guest init (`vmlab.*`), then the user's `--cmdline`,
//! so that a user's option overrides a default (Linux takes the last
//! occurrence of most parameters).

/// Options every vmlab guest gets.
///
/// - `console=ttyS0`: the kernel console on the emulated 8250.
/// - `reboot=k`: reboot through the i8042 reset line, which vmlab watches.
/// - `panic=-1`: reboot at once on a panic, so vmlab sees it and exits
///   (instead of the guest spinning forever).
/// - `8250.nr_uarts=1`: only COM1 exists; skip probing the others.
/// - `random.trust_bootloader=on`: credit the RNG seed vmlab passes.
pub const DEFAULTS: &[&str] = &[
    "console=ttyS0",
    "reboot=k",
    "panic=-1",
    "8250.nr_uarts=1",
    "random.trust_bootloader=on",
];

/// What the guest init should do, encoded as `vmlab.*` parameters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InitParams {
    /// Command and arguments to run; `None` for an interactive shell.
    pub command: Option<Vec<String>>,
    /// Whether vmlab's stdout is a terminal.
    pub tty: bool,
    /// Extra environment `KEY=VALUE`.
    pub env: Vec<String>,
    /// Working directory.
    pub workdir: Option<String>,
    /// `uid[:gid]`.
    pub user: Option<String>,
    /// Start the guest agent (vsock port 1024; docs/AGENT.md). vmlab sets
    /// it whenever the VM has a vsock device.
    pub agent: bool,
    /// virtio-fs shares the init mounts before the command (or the shell,
    /// or the agent) starts, in this order.
    pub volumes: Vec<GuestVolume>,
    /// The virtio-fs tag of the share that is the guest's root file system
    /// (`--root-device fs`): the init mounts it read-only with a per-run
    /// tmpfs layer over it (overlayfs) and switches root there, before it
    /// mounts `volumes`. `None`: the root is the initramfs or the disk.
    pub root_fs: Option<String>,
    /// How the init uses `root_fs` (`--rootfs-mode`): with a tmpfs layer
    /// (the default, and what `--image --root-device fs` gets), or the
    /// share itself, read-write or read-only.
    pub root_mode: RootMode,
    /// The guest's host name (`--hostname`; the init's default: `vmlab`).
    pub hostname: Option<String>,
    /// Files the init bind-mounts after `volumes` (`--volume` of a host
    /// file): a file of a share mounted under /dev/.vmlab onto a path of
    /// the root, in this order.
    pub binds: Vec<GuestBind>,
    /// tmpfs mounts the init makes after `volumes` and `binds`
    /// (`--tmpfs`), in this order.
    pub tmpfs: Vec<GuestTmpfs>,
}

/// How the guest init mounts the root share.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum RootMode {
    /// The share read-write, no overlay: the guest's writes land in the
    /// host directory.
    Rw,
    /// The share read-only, no overlay.
    Ro,
    /// The share read-only with a per-run tmpfs layer over it (overlayfs).
    #[default]
    Overlay,
}

impl RootMode {
    /// The `rootmode:` value; `None` for the default (no item).
    fn item(self) -> Option<&'static str> {
        match self {
            RootMode::Rw => Some("rw"),
            RootMode::Ro => Some("ro"),
            RootMode::Overlay => None,
        }
    }
}

/// A file bind mount as the guest init makes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestBind {
    /// The file in the guest (in a share the init mounted): absolute.
    pub source: String,
    /// Where it goes: absolute; an empty file is created there (with its
    /// parent directories) if missing.
    pub path: String,
    /// Remount the bind read-only.
    pub readonly: bool,
}

/// A tmpfs as the guest init mounts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestTmpfs {
    /// The mount point: absolute, created with its parents if missing.
    pub path: String,
    /// Docker's `--tmpfs` options, comma-separated (`size=64m,mode=755`,
    /// `ro`, `exec`, ...); may be empty. The init turns the flag words
    /// into mount flags (default `nosuid,nodev,noexec`, as Docker's) and
    /// passes the rest to tmpfs.
    pub options: String,
}

/// A virtio-fs share as the guest init mounts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestVolume {
    /// The device's tag, the mount's source (`mount -t virtiofs TAG PATH`).
    pub tag: String,
    /// Where the guest mounts it: an absolute path, created (with its
    /// parents) if missing.
    pub path: String,
    /// Mount it read-only (`MS_RDONLY`).
    pub readonly: bool,
}

/// Lowercase hex of `bytes`: survives the kernel's command-line parsing
/// whatever the bytes are (spaces, quotes, `--`).
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    s
}

fn nul_joined(items: &[String]) -> Vec<u8> {
    items.join("\0").into_bytes()
}

/// The parameters for the guest init: `quiet` when a command runs, and one
/// word `vmlab=tty:N[,quiet:1][,cmd:HEX][,env:HEX][,workdir:HEX][,user:HEX][,agent:1][,fs:HEX][,root:HEX][,rootmode:rw|ro][,hostname:HEX][,bind:HEX][,tmpfs:HEX]`
/// (guest/init/src/cmdline.rs). `fs` is the NUL-joined list
/// `TAG\0PATH\0MODE` of each volume in turn, MODE `ro` or `rw`; `root` is
/// the tag of the root share, `rootmode` how to use it (absent: with a
/// tmpfs layer); `bind` is the NUL-joined list `SOURCE\0PATH\0MODE` of
/// each file bind; `tmpfs` the NUL-joined list `PATH\0OPTIONS` of each
/// tmpfs. One word rather than one per setting: the
/// guest kernel compares every word of its command line with each of its
/// parameter names several times while it boots, which on a nested-KVM
/// host costs about 0.1 s per word (docs/BOOT.md).
pub fn init_params(init: &InitParams) -> Vec<String> {
    let mut out = Vec::new();
    let mut items = vec![format!("tty:{}", u8::from(init.tty))];
    if let Some(cmd) = &init.command {
        // Keep the console quiet while a command runs: its output is what
        // the user asked for, like `docker run`.
        out.push("quiet".to_string());
        items.push("quiet:1".to_string());
        items.push(format!("cmd:{}", hex(&nul_joined(cmd))));
    }
    if !init.env.is_empty() {
        items.push(format!("env:{}", hex(&nul_joined(&init.env))));
    }
    if let Some(dir) = &init.workdir {
        items.push(format!("workdir:{}", hex(dir.as_bytes())));
    }
    if let Some(user) = &init.user {
        items.push(format!("user:{}", hex(user.as_bytes())));
    }
    if init.agent {
        items.push("agent:1".to_string());
    }
    if !init.volumes.is_empty() {
        let fields: Vec<String> = init
            .volumes
            .iter()
            .flat_map(|v| {
                let mode = if v.readonly { "ro" } else { "rw" };
                [v.tag.clone(), v.path.clone(), mode.to_string()]
            })
            .collect();
        items.push(format!("fs:{}", hex(&nul_joined(&fields))));
    }
    if let Some(tag) = &init.root_fs {
        items.push(format!("root:{}", hex(tag.as_bytes())));
    }
    if let Some(mode) = init.root_mode.item() {
        items.push(format!("rootmode:{mode}"));
    }
    if let Some(name) = &init.hostname {
        items.push(format!("hostname:{}", hex(name.as_bytes())));
    }
    if !init.binds.is_empty() {
        let fields: Vec<String> = init
            .binds
            .iter()
            .flat_map(|b| {
                let mode = if b.readonly { "ro" } else { "rw" };
                [b.source.clone(), b.path.clone(), mode.to_string()]
            })
            .collect();
        items.push(format!("bind:{}", hex(&nul_joined(&fields))));
    }
    if !init.tmpfs.is_empty() {
        let fields: Vec<String> = init
            .tmpfs
            .iter()
            .flat_map(|t| [t.path.clone(), t.options.clone()])
            .collect();
        items.push(format!("tmpfs:{}", hex(&nul_joined(&fields))));
    }
    out.push(format!("vmlab={}", items.join(",")));
    out
}

/// The full command line.
pub fn assemble(
    quirks: &[&str],
    extra: &[String],
    init: &InitParams,
    user: Option<&str>,
) -> String {
    let mut parts: Vec<String> = DEFAULTS.iter().map(|s| s.to_string()).collect();
    parts.extend(quirks.iter().map(|s| s.to_string()));
    parts.extend(extra.iter().cloned());
    parts.extend(init_params(init));
    if let Some(user) = user.map(str::trim).filter(|u| !u.is_empty()) {
        parts.push(user.to_string());
    }
    parts.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_encoding() {
        assert_eq!(hex(b""), "");
        assert_eq!(hex(b"sh\0-c"), "7368002d63");
        assert_eq!(hex(&[0xff, 0x00, 0x7f]), "ff007f");
    }

    #[test]
    fn command_is_hex_of_nul_joined_argv() {
        let init = InitParams {
            command: Some(vec!["sh".into(), "-c".into(), "exit 3".into()]),
            ..Default::default()
        };
        let p = init_params(&init);
        assert_eq!(
            p,
            vec![
                "quiet".to_string(),
                format!("vmlab=tty:0,quiet:1,cmd:{}", hex(b"sh\0-c\0exit 3"))
            ]
        );
    }

    #[test]
    fn agent_flag() {
        let p = init_params(&InitParams {
            agent: true,
            ..Default::default()
        });
        assert_eq!(p, vec!["vmlab=tty:0,agent:1".to_string()]);
    }

    #[test]
    fn volumes_are_hex_of_nul_joined_triples() {
        let p = init_params(&InitParams {
            agent: true,
            volumes: vec![
                GuestVolume {
                    tag: "vol0".into(),
                    path: "/data".into(),
                    readonly: false,
                },
                GuestVolume {
                    tag: "vol1".into(),
                    path: "/srv/my app".into(),
                    readonly: true,
                },
            ],
            ..Default::default()
        });
        assert_eq!(
            p,
            vec![format!(
                "vmlab=tty:0,agent:1,fs:{}",
                hex(b"vol0\0/data\0rw\0vol1\0/srv/my app\0ro")
            )]
        );
        // One volume: no trailing NUL.
        let p = init_params(&InitParams {
            volumes: vec![GuestVolume {
                tag: "t".into(),
                path: "/t".into(),
                readonly: true,
            }],
            ..Default::default()
        });
        assert_eq!(p, vec![format!("vmlab=tty:0,fs:{}", hex(b"t\0/t\0ro"))]);
        // None: no fs item at all.
        assert_eq!(
            init_params(&InitParams::default()),
            vec!["vmlab=tty:0".to_string()]
        );
    }

    #[test]
    fn root_share_is_hex_of_its_tag_after_the_volumes() {
        let p = init_params(&InitParams {
            root_fs: Some("vmlab-root".into()),
            volumes: vec![GuestVolume {
                tag: "t".into(),
                path: "/t".into(),
                readonly: false,
            }],
            ..Default::default()
        });
        assert_eq!(
            p,
            vec![format!(
                "vmlab=tty:0,fs:{},root:{}",
                hex(b"t\0/t\0rw"),
                hex(b"vmlab-root")
            )]
        );
        assert_eq!(
            init_params(&InitParams {
                root_fs: Some("r".into()),
                ..Default::default()
            }),
            vec!["vmlab=tty:0,root:72".to_string()]
        );
        // None: no root item.
        assert!(!init_params(&InitParams::default())[0].contains("root:"));
    }

    #[test]
    fn root_mode_hostname_binds_and_tmpfs() {
        let p = init_params(&InitParams {
            root_fs: Some("r".into()),
            root_mode: RootMode::Rw,
            hostname: Some("web-1".into()),
            binds: vec![
                GuestBind {
                    source: "/dev/.vmlab/vmlabf/0".into(),
                    path: "/etc/hosts".into(),
                    readonly: false,
                },
                GuestBind {
                    source: "/dev/.vmlab/vmlabfro/1".into(),
                    path: "/etc/resolv.conf".into(),
                    readonly: true,
                },
            ],
            tmpfs: vec![
                GuestTmpfs {
                    path: "/run".into(),
                    options: "size=64m,mode=755".into(),
                },
                GuestTmpfs {
                    path: "/scratch".into(),
                    options: String::new(),
                },
            ],
            ..Default::default()
        });
        assert_eq!(
            p,
            vec![format!(
                "vmlab=tty:0,root:72,rootmode:rw,hostname:{},bind:{},tmpfs:{}",
                hex(b"web-1"),
                hex(b"/dev/.vmlab/vmlabf/0\0/etc/hosts\0rw\0/dev/.vmlab/vmlabfro/1\0/etc/resolv.conf\0ro"),
                hex(b"/run\0size=64m,mode=755\0/scratch\0")
            )]
        );
        let ro = init_params(&InitParams {
            root_fs: Some("r".into()),
            root_mode: RootMode::Ro,
            ..Default::default()
        });
        assert_eq!(ro, vec!["vmlab=tty:0,root:72,rootmode:ro".to_string()]);
        // The default (overlay) adds nothing: an image's command line is
        // as before.
        let overlay = init_params(&InitParams {
            root_fs: Some("r".into()),
            ..Default::default()
        });
        assert_eq!(overlay, vec!["vmlab=tty:0,root:72".to_string()]);
    }

    #[test]
    fn interactive_boot_is_not_quiet() {
        let p = init_params(&InitParams {
            tty: true,
            ..Default::default()
        });
        assert_eq!(p, vec!["vmlab=tty:1".to_string()]);
    }

    #[test]
    fn order_defaults_quirks_init_user() {
        let init = InitParams {
            command: Some(vec!["true".into()]),
            env: vec!["A=b c".into()],
            workdir: Some("/srv".into()),
            user: Some("1000:1000".into()),
            ..Default::default()
        };
        let line = assemble(
            &["noxsave"],
            &["root=/dev/vda".into()],
            &init,
            Some(" loglevel=7 "),
        );
        assert!(line.starts_with("console=ttyS0 reboot=k panic=-1"));
        let pos = |s: &str| line.find(s).unwrap();
        assert!(pos("panic=-1") < pos("noxsave"));
        assert!(pos("noxsave") < pos("root=/dev/vda"));
        assert!(pos("root=/dev/vda") < pos("vmlab="));
        assert!(pos("vmlab=") < pos("loglevel=7"));
        assert!(line.ends_with("loglevel=7"));
        assert!(line.contains(&format!(
            "vmlab=tty:0,quiet:1,cmd:{},env:{},workdir:{},user:{}",
            hex(b"true"),
            hex(b"A=b c"),
            hex(b"/srv"),
            hex(b"1000:1000")
        )));
        assert!(!line.contains("  "));
    }
}
