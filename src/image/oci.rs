//! Reading images: an OCI image layout (a directory, or a tar of one) and a
//! `docker save` archive (or its extracted directory), down to the image
//! configuration and the list of layers to apply.
//!
//! What is trusted: only the entry point, `index.json` or `manifest.json`,
//! which names everything else by digest. Every other blob is verified
//! against its digest (and size) while it is read; layers are verified
//! twice, as stored (the manifest's digest, when the format has one) and
//! uncompressed (the config's `rootfs.diff_ids`), so the image ID (the
//! config's digest) pins the whole root filesystem. That is what lets the
//! cache be keyed by it.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Component, Path, PathBuf};

use oci_spec::image::{
    Arch, Descriptor, Digest, ImageConfiguration, ImageIndex, ImageManifest, MediaType, Os,
};
use serde::Deserialize;

use super::digest::{self, Hasher, HashingReader};
use super::{layers, Error, ImageConfig};

/// Largest index, manifest or config vmlab reads into memory (real ones
/// are a few KiB; this bounds what a hostile image can make it allocate).
const MAX_JSON: u64 = 16 << 20;
/// Nested indexes followed at most.
const MAX_INDEX_DEPTH: u32 = 4;
/// Symlinks followed at most inside a `docker save` archive.
const MAX_MEMBER_LINKS: u32 = 8;

const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// What an image path turned out to be.
pub enum Source {
    /// A directory that is neither an OCI layout nor a `docker save`
    /// directory: a root filesystem, used as is.
    RootfsDir(PathBuf),
    /// An image, with its files in `Store`.
    Image(Store),
}

/// Opens `path` and tells what kind of input it is.
pub fn open(path: &Path) -> Result<Source, Error> {
    let meta = fs::metadata(path).map_err(|source| Error::Access {
        path: path.to_path_buf(),
        source,
    })?;
    if meta.is_dir() {
        let is_image = ["manifest.json", "index.json"]
            .iter()
            .any(|f| path.join(f).is_file());
        return Ok(if is_image {
            Source::Image(Store::Dir(path.to_path_buf()))
        } else {
            Source::RootfsDir(path.to_path_buf())
        });
    }
    if !meta.is_file() {
        return Err(not_an_image(path, "neither a file nor a directory"));
    }
    Ok(Source::Image(Store::Tar(TarStore::open(path)?)))
}

fn not_an_image(path: &Path, reason: &str) -> Error {
    Error::NotAnImage {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// An open file of an image and its size.
pub type Opened<'a> = (Box<dyn Read + 'a>, u64);

/// A stored blob's digest and, when the format gives it, its size.
pub type BlobRef = Option<(Digest, Option<u64>)>;

/// The files of an image, by their path inside the image.
pub enum Store {
    /// An OCI layout or extracted `docker save` directory.
    Dir(PathBuf),
    /// A tar archive (`docker save`, or an OCI layout in a tar).
    Tar(TarStore),
}

impl Store {
    /// The image's path, for messages.
    pub fn path(&self) -> &Path {
        match self {
            Store::Dir(p) => p,
            Store::Tar(t) => &t.path,
        }
    }

    /// Opens a file of the image; `Ok(None)` if there is none of that name.
    /// `name` comes from image metadata: it must be a plain relative path.
    pub fn open(&self, name: &str) -> Result<Option<Opened<'_>>, Error> {
        let clean = clean_name(name).ok_or_else(|| {
            Error::Format(format!(
                "{}: invalid file name {name:?} in the image metadata",
                self.path().display()
            ))
        })?;
        match self {
            Store::Dir(root) => {
                let path = root.join(&clean);
                let file = match File::open(&path) {
                    Ok(f) => f,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                    Err(source) => {
                        return Err(Error::Io {
                            what: "open",
                            path,
                            source,
                        })
                    }
                };
                let meta = file.metadata().map_err(|source| Error::Io {
                    what: "stat",
                    path: path.clone(),
                    source,
                })?;
                if !meta.is_file() {
                    return Ok(None);
                }
                Ok(Some((Box::new(file), meta.len())))
            }
            Store::Tar(t) => Ok(t.member(&clean).map(|(offset, size)| {
                let r: Box<dyn Read + '_> = Box::new(MemberReader {
                    file: &t.file,
                    pos: offset,
                    end: offset.saturating_add(size),
                });
                (r, size)
            })),
        }
    }

    /// Whether the image has a file of that name.
    pub fn contains(&self, name: &str) -> bool {
        matches!(self.open(name), Ok(Some(_)))
    }
}

/// `a/./b/` → `a/b`; `None` for absolute paths, `..` and empty names.
fn clean_name(name: &str) -> Option<String> {
    let mut parts = Vec::new();
    for c in Path::new(name).components() {
        match c {
            Component::Normal(s) => parts.push(s.to_str()?),
            Component::CurDir => {}
            _ => return None,
        }
    }
    (!parts.is_empty()).then(|| parts.join("/"))
}

/// A tar archive indexed by member name, read in place (no extraction).
pub struct TarStore {
    path: PathBuf,
    file: File,
    members: HashMap<String, Member>,
}

enum Member {
    Data {
        offset: u64,
        size: u64,
    },
    /// A symlink (target relative to the member's directory) or a hard
    /// link (target relative to the archive root).
    Link {
        target: String,
        hard: bool,
    },
}

impl TarStore {
    fn open(path: &Path) -> Result<TarStore, Error> {
        let file = File::open(path).map_err(|source| Error::Access {
            path: path.to_path_buf(),
            source,
        })?;
        let mut magic = [0u8; 4];
        let n = file.read_at(&mut magic, 0).unwrap_or(0);
        match magic.get(..n) {
            Some([0x1f, 0x8b, ..]) => {
                return Err(not_an_image(
                    path,
                    "a gzip-compressed file; vmlab reads `docker save` archives uncompressed (gunzip it first)",
                ))
            }
            Some([0x28, 0xb5, 0x2f, 0xfd]) => {
                return Err(not_an_image(
                    path,
                    "a zstd-compressed file; decompress it first",
                ))
            }
            _ => {}
        }
        let not_tar = || {
            not_an_image(
                path,
                "expected an OCI image layout directory, a `docker save` archive or a root filesystem directory",
            )
        };
        let mut members = HashMap::new();
        let mut archive = tar::Archive::new(&file);
        let entries = archive.entries_with_seek().map_err(|_| not_tar())?;
        for entry in entries {
            let entry = match entry {
                Ok(e) => e,
                // Garbage from the first header on: not a tar at all.
                Err(_) if members.is_empty() => return Err(not_tar()),
                Err(e) => {
                    return Err(Error::Format(format!(
                        "{}: corrupt tar archive: {e}",
                        path.display()
                    )))
                }
            };
            let Some(name) = entry
                .path()
                .ok()
                .and_then(|p| p.to_str().and_then(clean_name))
            else {
                continue;
            };
            let header = entry.header();
            let member = match header.entry_type() {
                tar::EntryType::Regular | tar::EntryType::Continuous => Member::Data {
                    offset: entry.raw_file_position(),
                    size: entry.size(),
                },
                t @ (tar::EntryType::Symlink | tar::EntryType::Link) => {
                    match entry.link_name().ok().flatten() {
                        Some(target) => Member::Link {
                            target: target.to_string_lossy().into_owned(),
                            hard: t == tar::EntryType::Link,
                        },
                        None => continue,
                    }
                }
                _ => continue,
            };
            members.insert(name, member);
        }
        if !members.contains_key("manifest.json") && !members.contains_key("index.json") {
            return Err(not_an_image(
                path,
                "a tar archive without manifest.json or index.json (not a `docker save` archive)",
            ));
        }
        Ok(TarStore {
            path: path.to_path_buf(),
            file,
            members,
        })
    }

    /// Offset and size of a member's data, following links within the
    /// archive.
    fn member(&self, name: &str) -> Option<(u64, u64)> {
        let mut name = name.to_string();
        for _ in 0..=MAX_MEMBER_LINKS {
            match self.members.get(&name)? {
                Member::Data { offset, size } => return Some((*offset, *size)),
                Member::Link { target, hard } => {
                    let base = if *hard {
                        PathBuf::new()
                    } else {
                        Path::new(&name).parent().map(Path::to_path_buf)?
                    };
                    name = normalize(&base.join(target))?;
                }
            }
        }
        None
    }
}

/// Lexical normalization inside the archive; `None` if it climbs out.
fn normalize(p: &Path) -> Option<String> {
    let mut parts: Vec<&str> = Vec::new();
    for c in p.components() {
        match c {
            Component::Normal(s) => parts.push(s.to_str()?),
            Component::ParentDir => {
                parts.pop()?;
            }
            Component::CurDir | Component::RootDir => {}
            Component::Prefix(_) => return None,
        }
    }
    Some(parts.join("/"))
}

/// Reads one member of a tar archive in place.
struct MemberReader<'a> {
    file: &'a File,
    pos: u64,
    end: u64,
}

impl Read for MemberReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = usize::try_from(self.end - self.pos).unwrap_or(usize::MAX);
        let want = buf.len().min(left);
        if want == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..want], self.pos)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "archive member truncated",
            ));
        }
        self.pos += n as u64;
        Ok(n)
    }
}

/// An image's configuration and layers, resolved and with the metadata
/// verified.
pub struct Resolved {
    /// The image ID: the digest of its config blob.
    pub id: Digest,
    /// The process configuration.
    pub config: ImageConfig,
    /// The layers, bottom first.
    pub layers: Vec<LayerRef>,
}

/// One layer to apply.
pub struct LayerRef {
    /// Its file in the store.
    pub name: String,
    /// Digest and size of the blob as stored, when the format gives them.
    pub blob: BlobRef,
    /// Digest of the uncompressed tar (the config's diff ID).
    pub diff_id: Digest,
    /// "layer 2/3 (sha256:...)", for messages.
    pub label: String,
}

/// Resolves the image in `store` to its config and layers: through
/// `manifest.json` if there is one (`docker save`, which may also carry an
/// OCI layout whose index lists platforms it did not save), else through
/// the OCI `index.json`.
pub fn resolve(store: &Store) -> Result<Resolved, Error> {
    if store.contains("manifest.json") {
        resolve_docker(store)
    } else {
        resolve_oci(store)
    }
}

fn image_label(store: &Store) -> String {
    store.path().display().to_string()
}

/// Reads a whole small file (index.json, manifest.json) that no digest
/// names.
fn read_root_file(store: &Store, name: &str) -> Result<Vec<u8>, Error> {
    let (mut r, size) = store.open(name)?.ok_or_else(|| Error::MissingBlob {
        what: name.to_string(),
        image: store.path().to_path_buf(),
    })?;
    if size > MAX_JSON {
        return Err(Error::Format(format!(
            "{}: {name} is {size} bytes, more than vmlab accepts ({MAX_JSON})",
            image_label(store)
        )));
    }
    let mut buf = Vec::new();
    r.read_to_end(&mut buf).map_err(|source| Error::Io {
        what: "read",
        path: store.path().join(name),
        source,
    })?;
    Ok(buf)
}

/// Reads a small blob named `name` and checks it against `digest` (and
/// `size` when known).
fn read_verified(
    store: &Store,
    name: &str,
    what: &str,
    digest: &Digest,
    size: Option<u64>,
) -> Result<Vec<u8>, Error> {
    let (r, actual_size) = store.open(name)?.ok_or_else(|| Error::MissingBlob {
        what: format!("{what} {digest} ({name})"),
        image: store.path().to_path_buf(),
    })?;
    if actual_size > MAX_JSON {
        return Err(Error::Format(format!(
            "{}: {what} is {actual_size} bytes, more than vmlab accepts ({MAX_JSON})",
            image_label(store)
        )));
    }
    let mut reader = HashingReader::new(r, Hasher::for_digest(digest)?);
    let mut buf = Vec::new();
    reader.read_to_end(&mut buf).map_err(|source| Error::Io {
        what: "read",
        path: store.path().join(name),
        source,
    })?;
    let (actual, n) = reader.finish();
    digest::check(
        &format!("{}: {what}", image_label(store)),
        digest,
        &actual,
        size,
        n,
    )?;
    Ok(buf)
}

/// `blobs/<algorithm>/<hex>`.
fn blob_name(d: &Digest) -> String {
    format!("blobs/{}/{}", d.algorithm(), d.digest())
}

fn read_blob(store: &Store, desc: &Descriptor, what: &str) -> Result<Vec<u8>, Error> {
    if desc.size() > MAX_JSON {
        return Err(Error::Format(format!(
            "{}: {what} {} is {} bytes, more than vmlab accepts ({MAX_JSON})",
            image_label(store),
            desc.digest(),
            desc.size()
        )));
    }
    read_verified(
        store,
        &blob_name(desc.digest()),
        what,
        desc.digest(),
        Some(desc.size()),
    )
}

fn parse_json<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    store: &Store,
    what: &str,
) -> Result<T, Error> {
    serde_json::from_slice(bytes)
        .map_err(|e| Error::Format(format!("{}: {what}: {e}", image_label(store))))
}

fn is_amd64_linux(os: &Os, arch: &Arch) -> bool {
    *os == Os::Linux && *arch == Arch::Amd64
}

fn resolve_oci(store: &Store) -> Result<Resolved, Error> {
    let index: ImageIndex = parse_json(&read_root_file(store, "index.json")?, store, "index.json")?;
    let desc = select_manifest(store, &index, 0)?;
    let manifest: ImageManifest = parse_json(
        &read_blob(store, &desc, "manifest")?,
        store,
        &format!("manifest {}", desc.digest()),
    )?;
    let config_desc = manifest.config();
    let config_bytes = read_blob(store, config_desc, "config")?;
    let blobs = manifest
        .layers()
        .iter()
        .map(|l| {
            if matches!(
                l.media_type(),
                MediaType::ImageLayerZstd | MediaType::ImageLayerNonDistributableZstd
            ) {
                return Err(Error::Unsupported(format!(
                    "{}: layer {} is zstd-compressed; vmlab reads uncompressed and gzip layers",
                    image_label(store),
                    l.digest()
                )));
            }
            Ok((
                blob_name(l.digest()),
                Some((l.digest().clone(), Some(l.size()))),
            ))
        })
        .collect::<Result<Vec<_>, Error>>()?;
    finish(store, config_desc.digest().clone(), &config_bytes, blobs)
}

/// Picks the linux/amd64 image manifest from an index, descending into
/// nested indexes. Entries without a platform are taken when nothing
/// names linux/amd64 (a single-image layout usually has no platform).
fn select_manifest(store: &Store, index: &ImageIndex, depth: u32) -> Result<Descriptor, Error> {
    let mut exact = Vec::new();
    let mut unspecified = Vec::new();
    let mut seen = Vec::new();
    for d in index.manifests() {
        match d.platform() {
            Some(p) if is_amd64_linux(p.os(), p.architecture()) => exact.push(d),
            Some(p) => seen.push(format!("{}/{}", p.os(), p.architecture())),
            None => unspecified.push(d),
        }
    }
    for d in exact.into_iter().chain(unspecified) {
        let mt = d.media_type();
        let is_index = *mt == MediaType::ImageIndex || mt.to_string() == DOCKER_MANIFEST_LIST;
        let is_manifest = *mt == MediaType::ImageManifest || mt.to_string() == DOCKER_MANIFEST;
        if is_manifest {
            return Ok(d.clone());
        }
        if is_index {
            if depth >= MAX_INDEX_DEPTH {
                return Err(Error::Format(format!(
                    "{}: image indexes nested more than {MAX_INDEX_DEPTH} deep",
                    image_label(store)
                )));
            }
            let nested: ImageIndex = parse_json(
                &read_blob(store, d, "index")?,
                store,
                &format!("index {}", d.digest()),
            )?;
            match select_manifest(store, &nested, depth + 1) {
                Ok(m) => return Ok(m),
                Err(Error::NoPlatform { found, .. }) => seen.push(found),
                Err(e) => return Err(e),
            }
        } else {
            seen.push(format!("{mt}"));
        }
    }
    Err(Error::NoPlatform {
        image: store.path().to_path_buf(),
        found: if seen.is_empty() {
            "nothing".into()
        } else {
            seen.join(", ")
        },
    })
}

/// One image of a `docker save` manifest.json.
#[derive(Deserialize)]
struct DockerImage {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "RepoTags", default)]
    repo_tags: Option<Vec<String>>,
    #[serde(rename = "Layers")]
    layers: Vec<String>,
}

/// The digest a `docker save` file name carries: `<hex>.json` (the config
/// of the classic format), `blobs/<alg>/<hex>` (Docker 25+).
fn digest_from_name(name: &str) -> Option<Digest> {
    let p = Path::new(name);
    let file = p.file_name()?.to_str()?;
    let parent = p
        .parent()
        .and_then(Path::file_name)
        .and_then(|s| s.to_str());
    if let Some(hex) = file.strip_suffix(".json") {
        return format!("sha256:{hex}").parse().ok();
    }
    match parent {
        Some(alg) if p.parent().and_then(Path::parent) == Some(Path::new("blobs")) => {
            format!("{alg}:{file}").parse().ok()
        }
        _ => None,
    }
}

fn resolve_docker(store: &Store) -> Result<Resolved, Error> {
    let images: Vec<DockerImage> = parse_json(
        &read_root_file(store, "manifest.json")?,
        store,
        "manifest.json",
    )?;
    let Some(image) = images.first() else {
        return Err(Error::Format(format!(
            "{}: manifest.json lists no image",
            image_label(store)
        )));
    };
    if images.len() > 1 {
        log::warn!(
            "{}: the archive holds {} images; using the first ({})",
            image_label(store),
            images.len(),
            image
                .repo_tags
                .as_ref()
                .and_then(|t| t.first())
                .map_or("untagged", String::as_str)
        );
    }
    // The config's file name is its digest: that is the image ID, and the
    // config pins every layer through its diff IDs.
    let (config_bytes, id) = match digest_from_name(&image.config) {
        Some(d) => (read_verified(store, &image.config, "config", &d, None)?, d),
        None => {
            let bytes = read_root_file(store, &image.config)?;
            let d = digest::parse(&digest::sha256_of(&bytes), "config")?;
            (bytes, d)
        }
    };
    let blobs = image
        .layers
        .iter()
        .map(|name| (name.clone(), digest_from_name(name).map(|d| (d, None))))
        .collect();
    finish(store, id, &config_bytes, blobs)
}

/// Parses the config and pairs each layer with its diff ID.
fn finish(
    store: &Store,
    id: Digest,
    config_bytes: &[u8],
    blobs: Vec<(String, BlobRef)>,
) -> Result<Resolved, Error> {
    let config: ImageConfiguration = parse_json(config_bytes, store, &format!("config {id}"))?;
    if !is_amd64_linux(config.os(), config.architecture()) {
        return Err(Error::Unsupported(format!(
            "{}: the image is for {}/{}; vmlab runs linux/amd64",
            image_label(store),
            config.os(),
            config.architecture()
        )));
    }
    let diff_ids = config.rootfs().diff_ids();
    if diff_ids.len() != blobs.len() {
        return Err(Error::Format(format!(
            "{}: the manifest lists {} layers but the config has {} diff IDs",
            image_label(store),
            blobs.len(),
            diff_ids.len()
        )));
    }
    let total = blobs.len();
    let layers = blobs
        .into_iter()
        .zip(diff_ids)
        .enumerate()
        .map(|(i, ((name, blob), diff_id))| {
            let diff_id = digest::parse(diff_id, "rootfs.diff_ids")?;
            let shown = blob.as_ref().map_or(&diff_id, |(d, _)| d);
            Ok(LayerRef {
                label: format!("layer {}/{total} ({shown})", i + 1),
                name,
                blob,
                diff_id,
            })
        })
        .collect::<Result<Vec<_>, Error>>()?;
    Ok(Resolved {
        id,
        config: ImageConfig::from_oci(config.config().as_ref()),
        layers,
    })
}

/// Checks that every layer blob is still there with its size (cheap: a
/// cached root filesystem is reused without rereading them).
pub fn check_layers_present(store: &Store, r: &Resolved) -> Result<(), Error> {
    for l in &r.layers {
        match store.open(&l.name)? {
            None => {
                return Err(Error::MissingBlob {
                    what: format!("{} ({})", l.label, l.name),
                    image: store.path().to_path_buf(),
                })
            }
            Some((_, size)) => {
                if let Some((_, Some(expected))) = &l.blob {
                    if *expected != size {
                        return Err(Error::SizeMismatch {
                            what: format!("{}: {}", image_label(store), l.label),
                            expected: *expected,
                            actual: size,
                        });
                    }
                }
            }
        }
    }
    Ok(())
}

/// Applies one layer to `root`, verifying the blob digest (as stored) and
/// the diff ID (uncompressed) as it streams. A digest mismatch is reported
/// as such even when the corruption also broke the tar or gzip stream.
/// Its entries are charged to `budget`, the image's [`layers::Limits`].
pub fn apply_layer(
    store: &Store,
    layer: &LayerRef,
    root: &Path,
    budget: &mut layers::Budget,
) -> Result<(), Error> {
    let what = format!("{}: {}", image_label(store), layer.label);
    let (raw, size) = store.open(&layer.name)?.ok_or_else(|| Error::MissingBlob {
        what: format!("{} ({})", layer.label, layer.name),
        image: store.path().to_path_buf(),
    })?;
    let blob_hasher = match &layer.blob {
        Some((d, _)) => Hasher::for_digest(d)?,
        None => Hasher::sha256(),
    };
    let mut stored = HashingReader::new(raw, blob_hasher);
    let applied = apply_stream(&mut stored, layer, root, &what, budget);
    // Whatever happened, hash the rest so the digest check below can say
    // whether the blob itself is damaged.
    let drained = stored.drain();
    let (actual, n) = stored.finish();
    if let Some((d, expected_size)) = &layer.blob {
        digest::check(&what, d, &actual, *expected_size, n)?;
    }
    let diff_actual = applied?;
    drained.map_err(|source| Error::Io {
        what: "read",
        path: store.path().join(&layer.name),
        source,
    })?;
    digest::check(
        &format!("{what}, uncompressed"),
        &layer.diff_id,
        &diff_actual,
        None,
        0,
    )?;
    log::debug!("{what}: {size} bytes applied");
    Ok(())
}

/// Decompresses (by content: gzip magic or plain tar, whatever the media
/// type says) and applies; returns the digest of the uncompressed tar.
fn apply_stream(
    stored: &mut dyn Read,
    layer: &LayerRef,
    root: &Path,
    what: &str,
    budget: &mut layers::Budget,
) -> Result<String, Error> {
    let mut buffered = BufReader::with_capacity(256 * 1024, stored);
    let head = buffered.fill_buf().map_err(|source| Error::Io {
        what: "read",
        path: PathBuf::from(&layer.name),
        source,
    })?;
    let decoded: Box<dyn Read + '_> = match head {
        [0x1f, 0x8b, ..] => Box::new(flate2::bufread::MultiGzDecoder::new(&mut buffered)),
        [0x28, 0xb5, 0x2f, 0xfd, ..] => {
            return Err(Error::Unsupported(format!(
                "{what} is zstd-compressed; vmlab reads uncompressed and gzip layers"
            )))
        }
        _ => Box::new(&mut buffered),
    };
    let mut tar = HashingReader::new(decoded, Hasher::for_digest(&layer.diff_id)?);
    layers::apply_limited(root, &mut tar, budget).map_err(|source| Error::Layer {
        layer: what.to_string(),
        source,
    })?;
    // The end-of-archive blocks and any padding after them are part of
    // the diff ID.
    tar.drain().map_err(|source| Error::Layer {
        layer: what.to_string(),
        source: layers::Error::Tar(source),
    })?;
    Ok(tar.finish().0)
}
