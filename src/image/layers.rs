//! Applying image layers (tar archives) to a root filesystem directory.
//!
//! Each layer is a changeset on top of the ones below it (OCI image spec,
//! "layer.md"): entries add or replace files, `.wh.NAME` deletes NAME from
//! the lower layers, and `.wh..wh..opq` in a directory hides everything the
//! lower layers had in it. A whiteout only hides lower layers' content:
//! what the same layer adds stays, whatever the order of the entries.
//!
//! Layers are untrusted input, and the target is a directory on the host,
//! so no entry may reach outside it:
//! - entry paths (and hard-link targets) that are absolute or contain `..`
//!   are refused;
//! - the directories on an entry's path are resolved here, one component
//!   at a time with `lstat`, never by the host kernel: a symlink met on the
//!   way is followed *inside* the root (an absolute target starts at the
//!   root, as it will when the image is the root filesystem), and one that
//!   climbs above the root with `..` is refused;
//! - the entry's own last component is never followed: an existing symlink
//!   there is replaced, not written through; files are created with
//!   `O_CREAT|O_EXCL|O_NOFOLLOW`.
//!
//!
//! Nor may a layer fill the host's disk: an image's layers together may
//! write at most [`Limits::max_bytes`] of file content (8 GiB by default,
//! `VMLAB_IMAGE_MAX_BYTES`) in at most [`Limits::max_entries`] entries
//! (1,000,000, `VMLAB_IMAGE_MAX_ENTRIES`), checked from each entry's header
//! before any of it is written; and GNU sparse entries (whose holes would
//! be written out as zeros) are refused.
//!
//! The one operation done later than its entry (directory modes and mtimes,
//! at the end of the layer, because adding children changes a directory's
//! mtime) re-checks that no component of the path became a symlink first.
//! Refusing an entry fails the whole layer: a half-applied image is never
//! used (the caller extracts into a temporary directory).

use std::collections::{HashSet, VecDeque};
use std::ffi::{CString, OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, SystemTime};

/// How many symlinks one path may go through (the kernel's limit).
const MAX_SYMLINK_HOPS: u32 = 40;
/// The whiteout prefix and the opaque-directory marker.
const WHITEOUT_PREFIX: &[u8] = b".wh.";
const WHITEOUT_META_PREFIX: &[u8] = b".wh..wh.";
const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";

/// The variable that sets [`Limits::max_bytes`].
pub const LIMIT_BYTES_ENV: &str = "VMLAB_IMAGE_MAX_BYTES";
/// The variable that sets [`Limits::max_entries`].
pub const LIMIT_ENTRIES_ENV: &str = "VMLAB_IMAGE_MAX_ENTRIES";

/// How much one image's layers may write, all layers together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Bytes of file content.
    pub max_bytes: u64,
    /// Entries (files, directories, links, nodes, whiteouts).
    pub max_entries: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bytes: 8 << 30,
            max_entries: 1_000_000,
        }
    }
}

impl Limits {
    /// The defaults, overridden by `VMLAB_IMAGE_MAX_BYTES` (a size as
    /// `--memory` takes it: 512M, 20G; a plain number is MiB) and
    /// `VMLAB_IMAGE_MAX_ENTRIES` (a count).
    pub fn from_env() -> std::result::Result<Limits, String> {
        let var = |name| std::env::var(name).ok();
        Limits::parse(
            var(LIMIT_BYTES_ENV).as_deref(),
            var(LIMIT_ENTRIES_ENV).as_deref(),
        )
    }

    /// [`Limits::from_env`] on the variables' values.
    pub fn parse(
        bytes: Option<&str>,
        entries: Option<&str>,
    ) -> std::result::Result<Limits, String> {
        let mut l = Limits::default();
        if let Some(b) = bytes {
            l.max_bytes =
                crate::cli::parse_size(b).map_err(|e| format!("{LIMIT_BYTES_ENV}: {e}"))?;
        }
        if let Some(n) = entries {
            l.max_entries = n
                .trim()
                .parse::<u64>()
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| format!("{LIMIT_ENTRIES_ENV}: '{n}' is not a positive count"))?;
        }
        Ok(l)
    }
}

/// What is left of an image's [`Limits`] while its layers are applied.
#[derive(Debug, Clone)]
pub struct Budget {
    limits: Limits,
    bytes: u64,
    entries: u64,
}

impl Budget {
    /// A full budget.
    pub fn new(limits: Limits) -> Budget {
        Budget {
            limits,
            bytes: 0,
            entries: 0,
        }
    }

    /// Charges one entry with `size` bytes of content, or says why not.
    fn charge(&mut self, path: &Path, size: u64) -> Result<()> {
        let l = self.limits;
        if self.entries >= l.max_entries {
            return Err(Error::Limit {
                path: show(path),
                reason: format!(
                    "the image has more than {} entries (set {LIMIT_ENTRIES_ENV} to allow more)",
                    l.max_entries
                ),
            });
        }
        match self.bytes.checked_add(size) {
            Some(total) if total <= l.max_bytes => {
                self.bytes = total;
                self.entries += 1;
                Ok(())
            }
            _ => Err(Error::Limit {
                path: show(path),
                reason: format!(
                    "its {size} bytes take the image past its decompressed-size limit of {} bytes (set {LIMIT_BYTES_ENV} to allow more)",
                    l.max_bytes
                ),
            }),
        }
    }
}

/// Why a layer could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An entry that would write outside the root, or is malformed.
    #[error("entry {path}: {reason}")]
    Unsafe {
        /// The entry's path as written in the layer.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A file system operation on the target failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// The operation.
        op: &'static str,
        /// The path inside the root.
        path: String,
        /// Why.
        source: io::Error,
    },
    /// The image is larger than its [`Limits`].
    #[error("entry {path}: {reason}")]
    Limit {
        /// The entry that went past the limit.
        path: String,
        /// Which limit.
        reason: String,
    },
    /// The archive itself is unreadable (corrupt, truncated, not a tar).
    #[error("not a readable tar archive: {0}")]
    Tar(io::Error),
}

type Result<T> = std::result::Result<T, Error>;

fn show(p: &Path) -> String {
    p.display().to_string()
}

fn unsafe_entry(path: &Path, reason: impl Into<String>) -> Error {
    Error::Unsafe {
        path: show(path),
        reason: reason.into(),
    }
}

fn io_err<'a>(op: &'static str, rel: &'a Path) -> impl FnOnce(io::Error) -> Error + 'a {
    move |source| Error::Io {
        op,
        path: format!("/{}", rel.display()),
        source,
    }
}

/// The components of an entry path, which must be relative and free of
/// `..` (`.` components and a leading `./` are dropped).
fn entry_components(path: &Path) -> Result<Vec<OsString>> {
    let mut out = Vec::new();
    for c in path.components() {
        match c {
            Component::Prefix(_) | Component::RootDir => {
                return Err(unsafe_entry(path, "absolute path"))
            }
            Component::ParentDir => return Err(unsafe_entry(path, "`..` component")),
            Component::CurDir => {}
            Component::Normal(s) => out.push(s.to_os_string()),
        }
    }
    Ok(out)
}

/// What to do with an entry, from its type.
enum Kind {
    File,
    Dir,
    Symlink(PathBuf),
    HardLink(PathBuf),
    Device(libc::mode_t, u32, u32),
    Fifo,
    Skip,
}

/// Metadata from the header and its PAX records.
struct Meta {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: u64,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Applies one layer: the state kept while its entries are processed.
struct Applier<'a> {
    root: &'a Path,
    /// Whether to chown (only root can give files away).
    chown: bool,
    /// Real paths (relative to the root, no symlinks) this layer created
    /// or wrote through, with all their ancestors: whiteouts leave them be.
    created: HashSet<PathBuf>,
    /// Directory modes and mtimes to set once the layer is complete.
    dir_fixups: Vec<(PathBuf, u32, u64)>,
    warned_xattr: bool,
    warned_device: bool,
}

/// Applies the layer tar archive read from `layer` to the directory `root`,
/// with the default [`Limits`] for this layer alone.
pub fn apply(root: &Path, layer: impl Read) -> Result<()> {
    apply_limited(root, layer, &mut Budget::new(Limits::default()))
}

/// Applies a layer, charging its entries to `budget` (one budget for all
/// the layers of an image).
pub fn apply_limited(root: &Path, layer: impl Read, budget: &mut Budget) -> Result<()> {
    let mut archive = tar::Archive::new(layer);
    let mut applier = Applier {
        root,
        // SAFETY: geteuid has no preconditions.
        chown: unsafe { libc::geteuid() } == 0,
        created: HashSet::new(),
        dir_fixups: Vec::new(),
        warned_xattr: false,
        warned_device: false,
    };
    for entry in archive.entries().map_err(Error::Tar)? {
        let mut entry = entry.map_err(Error::Tar)?;
        let path = entry.path().map_err(Error::Tar)?.into_owned();
        let size = match entry.header().entry_type() {
            tar::EntryType::Link | tar::EntryType::Symlink => 0,
            _ => entry.size(),
        };
        budget.charge(&path, size)?;
        applier.entry(&mut entry)?;
    }
    applier.finish_dirs()
}

impl Applier<'_> {
    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<R>) -> Result<()> {
        let path = entry.path().map_err(Error::Tar)?.into_owned();
        let comps = entry_components(&path)?;
        let Some((name, parents)) = comps.split_last() else {
            // The root directory itself ("./"): the target's own root keeps
            // its mode, as with docker.
            return Ok(());
        };
        if name.as_bytes().starts_with(WHITEOUT_PREFIX) {
            return self.whiteout(&path, parents, name);
        }
        let kind = self.kind(entry, &path)?;
        if matches!(kind, Kind::Skip) {
            return Ok(());
        }
        let meta = meta(entry, &path)?;
        let parent = self
            .resolve_dir(&path, parents, true)?
            .ok_or_else(|| unsafe_entry(&path, "parent directory missing"))?;
        let rel = parent.join(name);
        self.mark_created(&rel);
        let abs = self.root.join(&rel);

        match kind {
            Kind::Dir => {
                if !self.clear(&rel, true)? {
                    fs::DirBuilder::new()
                        .mode(0o700)
                        .create(&abs)
                        .map_err(io_err("mkdir", &rel))?;
                }
                self.own(&abs, &rel, &meta)?;
                self.set_xattrs(&abs, &rel, &meta);
                self.dir_fixups.push((rel, meta.mode, meta.mtime));
            }
            Kind::File => {
                self.clear(&rel, false)?;
                let mut file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                    .open(&abs)
                    .map_err(io_err("create", &rel))?;
                copy_contents(entry, &mut file, &rel)?;
                if self.chown {
                    std::os::unix::fs::fchown(&file, Some(meta.uid), Some(meta.gid))
                        .map_err(io_err("chown", &rel))?;
                }
                // After chown, which clears set-user-ID bits.
                file.set_permissions(fs::Permissions::from_mode(meta.mode))
                    .map_err(io_err("chmod", &rel))?;
                self.set_xattrs(&abs, &rel, &meta);
                file.set_modified(mtime(meta.mtime))
                    .map_err(io_err("set the mtime of", &rel))?;
            }
            Kind::Symlink(target) => {
                self.clear(&rel, false)?;
                std::os::unix::fs::symlink(&target, &abs).map_err(io_err("symlink", &rel))?;
                self.own(&abs, &rel, &meta)?;
                self.set_xattrs(&abs, &rel, &meta);
                set_mtime_nofollow(&abs, meta.mtime).map_err(io_err("set the mtime of", &rel))?;
            }
            Kind::HardLink(target) => {
                let target_rel = self.resolve_link_target(&path, &target)?;
                if target_rel == rel {
                    return Ok(());
                }
                self.clear(&rel, false)?;
                // link(2) does not follow a symlink at the target: the new
                // name is one more name of the symlink itself, as in tar.
                fs::hard_link(self.root.join(&target_rel), &abs)
                    .map_err(io_err("hard link", &rel))?;
            }
            Kind::Device(fmt, major, minor) => {
                self.clear(&rel, false)?;
                self.mknod(&abs, &rel, fmt, libc::makedev(major, minor), &meta)?;
            }
            Kind::Fifo => {
                self.clear(&rel, false)?;
                self.mknod(&abs, &rel, libc::S_IFIFO, 0, &meta)?;
            }
            Kind::Skip => {}
        }
        Ok(())
    }

    fn kind<R: Read>(&mut self, entry: &tar::Entry<R>, path: &Path) -> Result<Kind> {
        let header = entry.header();
        let link = || -> Result<PathBuf> {
            entry
                .link_name()
                .map_err(Error::Tar)?
                .map(|l| l.into_owned())
                .ok_or_else(|| unsafe_entry(path, "link without a target"))
        };
        let device = |fmt| -> Result<Kind> {
            let major = header.device_major().map_err(Error::Tar)?.unwrap_or(0);
            let minor = header.device_minor().map_err(Error::Tar)?.unwrap_or(0);
            Ok(Kind::Device(fmt, major, minor))
        };
        use tar::EntryType as T;
        Ok(match header.entry_type() {
            // Old tars mark directories as regular files named `dir/`.
            T::Regular | T::Continuous if entry.path_bytes().ends_with(b"/") => Kind::Dir,
            T::Regular | T::Continuous => Kind::File,
            // Its holes would be written out as zeros: a few bytes of
            // archive could fill the host's disk. Docker images do not use
            // them (Go's archive/tar writes none).
            T::GNUSparse => {
                return Err(unsafe_entry(
                    path,
                    "GNU sparse file: refused (vmlab does not write sparse entries out)",
                ))
            }
            T::Directory => Kind::Dir,
            T::Symlink => Kind::Symlink(link()?),
            T::Link => Kind::HardLink(link()?),
            T::Char => device(libc::S_IFCHR)?,
            T::Block => device(libc::S_IFBLK)?,
            T::Fifo => Kind::Fifo,
            other => {
                log::debug!("layer entry {}: type {other:?} skipped", path.display());
                Kind::Skip
            }
        })
    }

    /// Resolves directory components to a real path relative to the root
    /// (no symlinks in it), following symlinks within the root. Missing
    /// directories are created when `create`, else the result is `None`.
    /// `entry` is the entry's path, for errors.
    fn resolve_dir(
        &mut self,
        entry: &Path,
        comps: &[OsString],
        create: bool,
    ) -> Result<Option<PathBuf>> {
        let mut pending: VecDeque<OsString> = comps.iter().cloned().collect();
        let mut real = PathBuf::new();
        let mut hops = 0;
        while let Some(c) = pending.pop_front() {
            if c == "." {
                continue;
            }
            if c == ".." {
                // Only a symlink target brings `..` here (entry paths with
                // one are refused): it must not climb above the root.
                if !real.pop() {
                    return Err(unsafe_entry(
                        entry,
                        "a symlink on its path leads out of the root",
                    ));
                }
                continue;
            }
            let candidate = real.join(&c);
            let abs = self.root.join(&candidate);
            match fs::symlink_metadata(&abs) {
                Ok(m) if m.is_dir() => real = candidate,
                Ok(m) if m.file_type().is_symlink() => {
                    hops += 1;
                    if hops > MAX_SYMLINK_HOPS {
                        return Err(unsafe_entry(entry, "too many levels of symbolic links"));
                    }
                    let target = fs::read_link(&abs).map_err(io_err("readlink", &candidate))?;
                    let mut next = VecDeque::new();
                    for tc in target.components() {
                        match tc {
                            // An absolute target starts again at the root.
                            Component::RootDir | Component::Prefix(_) => {
                                real = PathBuf::new();
                                next.clear();
                            }
                            Component::CurDir => {}
                            Component::ParentDir => next.push_back(OsString::from("..")),
                            Component::Normal(s) => next.push_back(s.to_os_string()),
                        }
                    }
                    next.extend(pending.drain(..));
                    pending = next;
                }
                Ok(_) => {
                    return Err(Error::Io {
                        op: "use as a directory",
                        path: format!("/{}", candidate.display()),
                        source: io::Error::from_raw_os_error(libc::ENOTDIR),
                    })
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    if !create {
                        return Ok(None);
                    }
                    // Parents a layer does not list are created as docker
                    // does: root-owned, 0755.
                    fs::DirBuilder::new()
                        .mode(0o755)
                        .create(&abs)
                        .map_err(io_err("mkdir", &candidate))?;
                    self.mark_created(&candidate);
                    real = candidate;
                }
                Err(e) => return Err(io_err("lstat", &candidate)(e)),
            }
        }
        Ok(Some(real))
    }

    /// The real path of a hard link's target, which must exist and not be
    /// a directory.
    fn resolve_link_target(&mut self, entry: &Path, target: &Path) -> Result<PathBuf> {
        let comps = entry_components(target)
            .map_err(|e| unsafe_entry(entry, format!("hard link target: {e}")))?;
        let Some((name, parents)) = comps.split_last() else {
            return Err(unsafe_entry(entry, "hard link to the root directory"));
        };
        let missing = || {
            unsafe_entry(
                entry,
                format!("hard link target {} does not exist", target.display()),
            )
        };
        let parent = self
            .resolve_dir(entry, parents, false)?
            .ok_or_else(missing)?;
        let rel = parent.join(name);
        match fs::symlink_metadata(self.root.join(&rel)) {
            Ok(m) if m.is_dir() => Err(unsafe_entry(entry, "hard link to a directory")),
            Ok(_) => Ok(rel),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(missing()),
            Err(e) => Err(io_err("lstat", &rel)(e)),
        }
    }

    /// Records `rel` and its ancestors as this layer's.
    fn mark_created(&mut self, rel: &Path) {
        for a in rel.ancestors() {
            if a.as_os_str().is_empty() || !self.created.insert(a.to_path_buf()) {
                // Ancestors of a recorded path are recorded already.
                break;
            }
        }
    }

    /// Makes room for a new entry at `rel`: removes what is there, except
    /// an existing directory when `keep_dir` (a directory entry over a
    /// directory merges into it). Returns whether a directory was kept.
    fn clear(&self, rel: &Path, keep_dir: bool) -> Result<bool> {
        let abs = self.root.join(rel);
        match fs::symlink_metadata(&abs) {
            Ok(m) if m.is_dir() => {
                if keep_dir {
                    return Ok(true);
                }
                fs::remove_dir_all(&abs).map_err(io_err("remove", rel))?;
            }
            Ok(_) => fs::remove_file(&abs).map_err(io_err("remove", rel))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("lstat", rel)(e)),
        }
        Ok(false)
    }

    fn whiteout(&mut self, path: &Path, parents: &[OsString], name: &OsStr) -> Result<()> {
        let Some(dir) = self.resolve_dir(path, parents, false)? else {
            // Nothing below to hide.
            return Ok(());
        };
        let bytes = name.as_bytes();
        if bytes == OPAQUE_MARKER {
            return self.clear_lower(&dir);
        }
        if bytes.starts_with(WHITEOUT_META_PREFIX) {
            // Other `.wh..wh.` names are aufs bookkeeping, not content.
            return Ok(());
        }
        let hidden = OsStr::from_bytes(&bytes[WHITEOUT_PREFIX.len()..]);
        if hidden.is_empty() || hidden == "." || hidden == ".." {
            return Err(unsafe_entry(path, "invalid whiteout name"));
        }
        let rel = dir.join(hidden);
        if self.created.contains(&rel) {
            return Ok(());
        }
        self.clear(&rel, false).map(|_| ())
    }

    /// Removes what lower layers put under `dir` (an opaque directory),
    /// keeping this layer's entries.
    fn clear_lower(&self, dir: &Path) -> Result<()> {
        let entries = fs::read_dir(self.root.join(dir)).map_err(io_err("read directory", dir))?;
        for e in entries {
            let e = e.map_err(io_err("read directory", dir))?;
            let rel = dir.join(e.file_name());
            if self.created.contains(&rel) {
                // file_type() does not follow symlinks.
                if e.file_type().map_err(io_err("lstat", &rel))?.is_dir() {
                    self.clear_lower(&rel)?;
                }
            } else {
                self.clear(&rel, false)?;
            }
        }
        Ok(())
    }

    fn own(&self, abs: &Path, rel: &Path, meta: &Meta) -> Result<()> {
        if self.chown {
            // lchown: never follows a symlink.
            std::os::unix::fs::lchown(abs, Some(meta.uid), Some(meta.gid))
                .map_err(io_err("chown", rel))?;
        }
        Ok(())
    }

    fn mknod(
        &mut self,
        abs: &Path,
        rel: &Path,
        fmt: libc::mode_t,
        dev: libc::dev_t,
        meta: &Meta,
    ) -> Result<()> {
        let c = cstring(abs, rel)?;
        // SAFETY: a valid NUL-terminated path; mknod creates the final
        // component and never follows a symlink there.
        let rc = unsafe { libc::mknod(c.as_ptr(), fmt | (meta.mode & 0o7777), dev) };
        if rc != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EPERM) && fmt != libc::S_IFIFO {
                // Not root (or a user namespace): device nodes cannot be
                // made; the runtime provides /dev anyway.
                if !self.warned_device {
                    log::warn!(
                        "cannot create device nodes (/{} and others skipped): {e}",
                        rel.display()
                    );
                    self.warned_device = true;
                }
                return Ok(());
            }
            return Err(io_err("mknod", rel)(e));
        }
        self.own(abs, rel, meta)?;
        fs::set_permissions(abs, fs::Permissions::from_mode(meta.mode))
            .map_err(io_err("chmod", rel))?;
        set_mtime_nofollow(abs, meta.mtime).map_err(io_err("set the mtime of", rel))
    }

    /// Sets extended attributes: `user.*` and `security.*` (file
    /// capabilities) only; `trusted.*` would need CAP_SYS_ADMIN and could
    /// steer overlayfs, which a container runtime may stack on this tree.
    fn set_xattrs(&mut self, abs: &Path, rel: &Path, meta: &Meta) {
        for (name, value) in &meta.xattrs {
            if !(name.starts_with(b"user.") || name.starts_with(b"security.")) {
                log::debug!(
                    "/{}: xattr {} skipped",
                    rel.display(),
                    String::from_utf8_lossy(name)
                );
                continue;
            }
            let (Ok(p), Ok(n)) = (cstring(abs, rel), CString::new(name.clone())) else {
                continue;
            };
            // SAFETY: valid C strings and a live buffer of the given
            // length; lsetxattr does not follow a symlink.
            let rc = unsafe {
                libc::lsetxattr(
                    p.as_ptr(),
                    n.as_ptr(),
                    value.as_ptr().cast(),
                    value.len(),
                    0,
                )
            };
            if rc != 0 && !self.warned_xattr {
                log::warn!(
                    "cannot set extended attribute {} on /{} (others may be missing too): {}",
                    String::from_utf8_lossy(name),
                    rel.display(),
                    io::Error::last_os_error()
                );
                self.warned_xattr = true;
            }
        }
    }

    /// Sets directory modes and mtimes now that their content is final.
    fn finish_dirs(&mut self) -> Result<()> {
        for (rel, mode, mtime) in std::mem::take(&mut self.dir_fixups) {
            // A later entry may have replaced the directory, or one of its
            // parents, with a symlink: then the path leads elsewhere and is
            // left alone.
            if !self.is_real_dir(&rel) {
                continue;
            }
            let abs = self.root.join(&rel);
            fs::set_permissions(&abs, fs::Permissions::from_mode(mode))
                .map_err(io_err("chmod", &rel))?;
            set_mtime_nofollow(&abs, mtime).map_err(io_err("set the mtime of", &rel))?;
        }
        Ok(())
    }

    /// Whether every component of `rel` is a directory, not a symlink.
    fn is_real_dir(&self, rel: &Path) -> bool {
        let mut p = self.root.to_path_buf();
        rel.components().all(|c| {
            p.push(c);
            fs::symlink_metadata(&p).is_ok_and(|m| m.is_dir())
        })
    }
}

/// Mode, owner, mtime and extended attributes of an entry; PAX records
/// override the header's numeric fields (they carry values too large for
/// it).
fn meta<R: Read>(entry: &mut tar::Entry<R>, path: &Path) -> Result<Meta> {
    let header = entry.header();
    let id = |v: u64, what: &str| {
        u32::try_from(v).map_err(|_| unsafe_entry(path, format!("{what} {v} out of range")))
    };
    let mut m = Meta {
        mode: header.mode().map_err(Error::Tar)? & 0o7777,
        uid: id(header.uid().map_err(Error::Tar)?, "uid")?,
        gid: id(header.gid().map_err(Error::Tar)?, "gid")?,
        mtime: header.mtime().map_err(Error::Tar)?,
        xattrs: Vec::new(),
    };
    if let Some(exts) = entry.pax_extensions().map_err(Error::Tar)? {
        for ext in exts {
            let ext = ext.map_err(Error::Tar)?;
            let key = ext.key_bytes();
            let num = || {
                ext.value()
                    .ok()
                    .and_then(|v| v.split('.').next())
                    .and_then(|v| v.parse::<u64>().ok())
            };
            match key {
                b"uid" => {
                    if let Some(v) = num() {
                        m.uid = id(v, "uid")?;
                    }
                }
                b"gid" => {
                    if let Some(v) = num() {
                        m.gid = id(v, "gid")?;
                    }
                }
                b"mtime" => {
                    if let Some(v) = num() {
                        m.mtime = v;
                    }
                }
                _ => {
                    if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                        m.xattrs.push((name.to_vec(), ext.value_bytes().to_vec()));
                    }
                }
            }
        }
    }
    Ok(m)
}

/// Copies a file entry's data, telling a broken archive from a failed
/// write.
fn copy_contents(src: &mut impl Read, dst: &mut File, rel: &Path) -> Result<()> {
    use std::io::Write;
    let mut buf = vec![0u8; 128 * 1024];
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Error::Tar(e)),
        };
        dst.write_all(buf.get(..n).unwrap_or(&[]))
            .map_err(io_err("write", rel))?;
    }
}

fn mtime(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH
        .checked_add(Duration::from_secs(secs))
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

fn cstring(abs: &Path, rel: &Path) -> Result<CString> {
    CString::new(abs.as_os_str().as_bytes()).map_err(|_| Error::Unsafe {
        path: show(rel),
        reason: "NUL byte in path".into(),
    })
}

/// Sets the mtime (and atime) of `path` without following a symlink.
pub(crate) fn set_mtime_nofollow(path: &Path, secs: u64) -> io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let t = libc::timespec {
        tv_sec: libc::time_t::try_from(secs).unwrap_or(libc::time_t::MAX),
        tv_nsec: 0,
    };
    let times = [t, t];
    // SAFETY: valid C string and a two-element timespec array, as
    // utimensat requires.
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::testutil::{Layer, TempDir};

    fn apply_all(root: &Path, layers: &[Layer]) -> Result<()> {
        for l in layers {
            apply(root, &l.bytes()[..])?;
        }
        Ok(())
    }

    #[test]
    fn files_dirs_links_and_metadata() {
        let t = TempDir::new("layers-basic");
        let root = t.path().join("root");
        fs::create_dir(&root).unwrap();
        let l = Layer::new()
            .dir("etc", 0o755)
            .file("etc/hello", b"hi\n", 0o640)
            .file("bin/tool", b"#!x", 0o4755)
            .symlink("usr-bin", "/bin")
            .hardlink("etc/hello2", "etc/hello")
            .fifo("run-fifo");
        apply_all(&root, &[l]).unwrap();
        assert_eq!(fs::read(root.join("etc/hello")).unwrap(), b"hi\n");
        let m = fs::metadata(root.join("etc/hello")).unwrap();
        assert_eq!(m.permissions().mode() & 0o7777, 0o640);
        assert_eq!(
            m.modified().unwrap(),
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000)
        );
        use std::os::unix::fs::MetadataExt;
        assert_eq!(m.nlink(), 2, "hard link");
        let tool = fs::metadata(root.join("bin/tool")).unwrap();
        assert_eq!(tool.permissions().mode() & 0o7777, 0o4755, "setuid kept");
        assert_eq!(
            fs::read_link(root.join("usr-bin")).unwrap(),
            Path::new("/bin")
        );
        assert!(fs::symlink_metadata(root.join("run-fifo"))
            .unwrap()
            .file_type()
            .is_fifo_like());
        let etc = fs::metadata(root.join("etc")).unwrap();
        assert_eq!(
            etc.modified().unwrap(),
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000),
            "directory mtime set after its children"
        );
    }

    trait FifoLike {
        fn is_fifo_like(&self) -> bool;
    }
    impl FifoLike for fs::FileType {
        fn is_fifo_like(&self) -> bool {
            use std::os::unix::fs::FileTypeExt;
            self.is_fifo()
        }
    }

    #[test]
    fn whiteouts_hide_lower_layers_only() {
        let t = TempDir::new("layers-whiteout");
        let root = t.path().join("root");
        fs::create_dir(&root).unwrap();
        let lower = Layer::new()
            .file("etc/motd", b"old", 0o644)
            .file("etc/keep", b"k", 0o644)
            .file("var/cache/a/b", b"x", 0o644)
            .symlink("link", "etc");
        // The same layer re-adds `etc/new` after whiting it out: a whiteout
        // never hides its own layer's files.
        let upper = Layer::new()
            .file("etc/new", b"n", 0o644)
            .whiteout("etc/.wh.motd")
            .whiteout("etc/.wh.new")
            .whiteout("var/.wh.cache")
            .whiteout(".wh.link")
            .whiteout("nonexistent/.wh.x");
        apply_all(&root, &[lower, upper]).unwrap();
        assert!(!root.join("etc/motd").exists());
        assert!(root.join("etc/keep").exists());
        assert!(root.join("etc/new").exists());
        assert!(!root.join("var/cache").exists());
        assert!(root.join("var").is_dir());
        assert!(fs::symlink_metadata(root.join("link")).is_err());
        assert!(
            !root.join("etc/.wh.motd").exists(),
            "markers are not content"
        );
        assert!(!root.join("nonexistent").exists());
    }

    #[test]
    fn opaque_directories_hide_lower_content() {
        let t = TempDir::new("layers-opaque");
        let root = t.path().join("root");
        fs::create_dir(&root).unwrap();
        let lower = Layer::new()
            .file("opt/data/old1", b"1", 0o644)
            .file("opt/data/sub/old2", b"2", 0o644)
            .file("opt/other", b"o", 0o644);
        // Entries of the same layer before and after the marker stay.
        let upper = Layer::new()
            .file("opt/data/sub/new-before", b"b", 0o644)
            .dir("opt/data", 0o755)
            .whiteout("opt/data/.wh..wh..opq")
            .file("opt/data/new-after", b"a", 0o644);
        apply_all(&root, &[lower, upper]).unwrap();
        let mut names: Vec<String> = walk(&root.join("opt"));
        names.sort();
        assert_eq!(
            names,
            vec![
                "data",
                "data/new-after",
                "data/sub",
                "data/sub/new-before",
                "other"
            ]
        );
        assert!(!root.join("opt/data/.wh..wh..opq").exists());
    }

    fn walk(dir: &Path) -> Vec<String> {
        let mut out = Vec::new();
        fn rec(base: &Path, dir: &Path, out: &mut Vec<String>) {
            for e in fs::read_dir(dir).unwrap() {
                let e = e.unwrap();
                let p = e.path();
                out.push(p.strip_prefix(base).unwrap().to_string_lossy().into_owned());
                if e.file_type().unwrap().is_dir() {
                    rec(base, &p, out);
                }
            }
        }
        rec(dir, dir, &mut out);
        out
    }

    #[test]
    fn replacing_types() {
        let t = TempDir::new("layers-replace");
        let root = t.path().join("root");
        fs::create_dir(&root).unwrap();
        let lower = Layer::new()
            .file("a/inner", b"1", 0o644)
            .file("b", b"2", 0o644)
            .symlink("c", "/etc");
        let upper = Layer::new()
            .file("a", b"now a file", 0o644)
            .dir("b", 0o755)
            .file("c", b"no longer a link", 0o644);
        apply_all(&root, &[lower, upper]).unwrap();
        assert_eq!(fs::read(root.join("a")).unwrap(), b"now a file");
        assert!(root.join("b").is_dir());
        assert_eq!(fs::read(root.join("c")).unwrap(), b"no longer a link");
        assert!(!t.path().join("etc").exists());
    }

    /// Every escape attempt fails the layer, and nothing appears outside
    /// the root (`t/outside` stays empty, `t` holds only `root` and it).
    #[test]
    fn escapes_are_refused_and_nothing_is_written_outside() {
        let cases: Vec<(&str, Layer)> = vec![
            ("absolute", Layer::new().raw_file("/abs-file", b"x")),
            ("dotdot", Layer::new().raw_file("a/../../escaped", b"x")),
            ("dotdot-first", Layer::new().raw_file("../escaped", b"x")),
            (
                "symlink-escape",
                Layer::new()
                    .symlink("evil", "../outside")
                    .file("evil/escaped", b"x", 0o644),
            ),
            (
                "deep-symlink-escape",
                Layer::new()
                    .dir("d", 0o755)
                    .symlink("d/up", "../../../../outside")
                    .file("d/up/escaped", b"x", 0o644),
            ),
            (
                "chained-symlinks",
                Layer::new()
                    .symlink("s1", "s2/..")
                    .symlink("s2", "..")
                    .file("s1/outside/escaped", b"x", 0o644),
            ),
            (
                "hardlink-outside",
                Layer::new().raw_hardlink("h", "../outside/secret"),
            ),
            (
                "hardlink-absolute",
                Layer::new().raw_hardlink("h", "/etc/passwd"),
            ),
            (
                "whiteout-through-symlink",
                Layer::new()
                    .symlink("evil", "../outside")
                    .whiteout("evil/.wh.secret"),
            ),
        ];
        for (name, layer) in cases {
            let t = TempDir::new(&format!("layers-escape-{name}"));
            let root = t.path().join("root");
            let outside = t.path().join("outside");
            fs::create_dir(&root).unwrap();
            fs::create_dir(&outside).unwrap();
            fs::write(outside.join("secret"), b"s").unwrap();
            let err = apply(&root, &layer.bytes()[..]).unwrap_err();
            assert!(matches!(err, Error::Unsafe { .. }), "{name}: {err}");
            let mut top: Vec<String> = fs::read_dir(t.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            top.sort();
            assert_eq!(top, vec!["outside", "root"], "{name}");
            assert_eq!(walk(&outside), vec!["secret"], "{name}");
            assert_eq!(fs::read(outside.join("secret")).unwrap(), b"s", "{name}");
        }
    }

    /// Symlinks that stay inside are followed inside: an absolute target
    /// starts at the root, never at the host's `/`.
    #[test]
    fn symlinks_resolve_inside_the_root() {
        let t = TempDir::new("layers-inside");
        let root = t.path().join("root");
        fs::create_dir(&root).unwrap();
        let l = Layer::new()
            .dir("usr/lib", 0o755)
            .symlink("lib", "usr/lib")
            .file("lib/libx.so", b"x", 0o644)
            .symlink("tmpdir", "/vmlab-test-not-on-host")
            .file("tmpdir/f", b"y", 0o644)
            .symlink("usr/lib/up", "../..")
            .file("usr/lib/up/top-file", b"z", 0o644);
        apply_all(&root, &[l]).unwrap();
        assert_eq!(fs::read(root.join("usr/lib/libx.so")).unwrap(), b"x");
        assert_eq!(
            fs::read(root.join("vmlab-test-not-on-host/f")).unwrap(),
            b"y"
        );
        assert!(!Path::new("/vmlab-test-not-on-host").exists());
        assert_eq!(fs::read(root.join("top-file")).unwrap(), b"z");
    }

    /// A directory entry followed by a symlink over it: the deferred mode
    /// and mtime fix-up must not follow the symlink out of the root.
    #[test]
    fn deferred_directory_metadata_does_not_follow_later_symlinks() {
        let t = TempDir::new("layers-deferred");
        let root = t.path().join("root");
        let outside = t.path().join("outside");
        fs::create_dir(&root).unwrap();
        fs::create_dir(&outside).unwrap();
        fs::set_permissions(&outside, fs::Permissions::from_mode(0o700)).unwrap();
        let l = Layer::new().dir("d", 0o777).symlink("d", "../outside");
        apply_all(&root, &[l]).unwrap();
        let m = fs::metadata(&outside).unwrap();
        assert_eq!(m.permissions().mode() & 0o7777, 0o700);
    }

    #[test]
    fn gnu_sparse_entries_are_refused() {
        let t = TempDir::new("layers-sparse");
        // 512 bytes of data after a 1 MiB hole: refused, not written out.
        let l = Layer::new()
            .file("before", b"b", 0o644)
            .gnu_sparse("holes", 1 << 20, &[7u8; 512]);
        let err = apply(t.path(), &l.bytes()[..]).unwrap_err().to_string();
        assert!(err.contains("holes") && err.contains("sparse"), "{err}");
        assert!(!t.path().join("holes").exists());
        // A 1 TiB one is past the size limit before that.
        let l = Layer::new().gnu_sparse("huge", 1 << 40, &[7u8; 512]);
        let err = apply(t.path(), &l.bytes()[..]).unwrap_err().to_string();
        assert!(err.contains("huge") && err.contains("limit"), "{err}");
        assert!(!t.path().join("huge").exists());
    }

    fn small(max_bytes: u64, max_entries: u64) -> Budget {
        Budget::new(Limits {
            max_bytes,
            max_entries,
        })
    }

    #[test]
    fn the_decompressed_size_is_limited_across_layers() {
        let t = TempDir::new("layers-bytes");
        let mut budget = small(1000, 100);
        let l1 = Layer::new().file("a", &[1u8; 600], 0o644);
        apply_limited(t.path(), &l1.bytes()[..], &mut budget).unwrap();
        // 600 + 600 > 1000: the second layer's file is refused before any
        // of it is written.
        let l2 = Layer::new().file("b", &[2u8; 600], 0o644);
        let err = apply_limited(t.path(), &l2.bytes()[..], &mut budget)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("entry b") && err.contains("1000 bytes") && err.contains(LIMIT_BYTES_ENV),
            "{err}"
        );
        assert!(!t.path().join("b").exists());
        // Exactly at the limit is fine.
        let mut budget = small(1200, 100);
        apply_limited(t.path(), &l2.bytes()[..], &mut budget).unwrap();
        let l3 = Layer::new().file("c", &[3u8; 600], 0o644);
        apply_limited(t.path(), &l3.bytes()[..], &mut budget).unwrap();
    }

    #[test]
    fn the_entry_count_is_limited() {
        let t = TempDir::new("layers-entries");
        let mut l = Layer::new();
        for i in 0..11 {
            l = l.fifo(&format!("f{i}"));
        }
        let err = apply_limited(t.path(), &l.bytes()[..], &mut small(1 << 20, 10))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("10 entries") && err.contains(LIMIT_ENTRIES_ENV),
            "{err}"
        );
        assert!(!t.path().join("f10").exists());
    }

    #[test]
    fn limits_from_the_environment() {
        assert_eq!(Limits::parse(None, None).unwrap(), Limits::default());
        assert_eq!(Limits::default().max_bytes, 8 << 30);
        let l = Limits::parse(Some("512M"), Some("20")).unwrap();
        assert_eq!((l.max_bytes, l.max_entries), (512 << 20, 20));
        assert!(Limits::parse(Some("lots"), None)
            .unwrap_err()
            .contains(LIMIT_BYTES_ENV));
        assert!(Limits::parse(None, Some("0")).is_err());
    }

    #[test]
    fn garbage_is_a_tar_error() {
        let t = TempDir::new("layers-garbage");
        let err = apply(t.path(), &[0x55u8; 1024][..]).unwrap_err();
        assert!(matches!(err, Error::Tar(_)), "{err}");
    }
}
