//! Test helpers: temporary directories, layer tarballs built entry by
//! entry (including malformed ones no tar tool would write), and OCI
//! layouts and `docker save` archives made from them.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::json;

use super::digest::sha256_of;

/// A directory removed (recursively) on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "vmlab-test-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The mtime of every test entry.
pub const MTIME: u64 = 1_000_000;

/// A layer tarball under construction.
pub struct Layer(tar::Builder<Vec<u8>>);

impl Default for Layer {
    fn default() -> Self {
        Self::new()
    }
}

impl Layer {
    pub fn new() -> Layer {
        Layer(tar::Builder::new(Vec::new()))
    }

    /// An entry with the given raw path and link name (no checks: tests
    /// need `..` and absolute paths).
    fn raw(mut self, path: &str, link: &str, ty: tar::EntryType, mode: u32, data: &[u8]) -> Self {
        let mut h = tar::Header::new_gnu();
        {
            let old = h.as_old_mut();
            old.name[..path.len()].copy_from_slice(path.as_bytes());
            old.linkname[..link.len()].copy_from_slice(link.as_bytes());
        }
        h.set_entry_type(ty);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(MTIME);
        h.set_size(data.len() as u64);
        h.set_cksum();
        self.0.append(&h, data).unwrap();
        self
    }

    pub fn dir(self, path: &str, mode: u32) -> Self {
        self.raw(path, "", tar::EntryType::Directory, mode, b"")
    }
    pub fn file(self, path: &str, data: &[u8], mode: u32) -> Self {
        self.raw(path, "", tar::EntryType::Regular, mode, data)
    }
    pub fn raw_file(self, path: &str, data: &[u8]) -> Self {
        self.raw(path, "", tar::EntryType::Regular, 0o644, data)
    }
    pub fn symlink(self, path: &str, target: &str) -> Self {
        self.raw(path, target, tar::EntryType::Symlink, 0o777, b"")
    }
    pub fn hardlink(self, path: &str, target: &str) -> Self {
        self.raw(path, target, tar::EntryType::Link, 0o644, b"")
    }
    pub fn raw_hardlink(self, path: &str, target: &str) -> Self {
        self.hardlink(path, target)
    }
    pub fn fifo(self, path: &str) -> Self {
        self.raw(path, "", tar::EntryType::Fifo, 0o644, b"")
    }
    /// A GNU sparse entry of `real_size` bytes: a hole, then `data` (a
    /// multiple of 512 bytes) at its end.
    pub fn gnu_sparse(mut self, path: &str, real_size: u64, data: &[u8]) -> Self {
        let mut h = tar::Header::new_gnu();
        h.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
        h.set_entry_type(tar::EntryType::GNUSparse);
        h.set_mode(0o644);
        h.set_mtime(MTIME);
        h.set_size(data.len() as u64);
        {
            let gnu = h.as_gnu_mut().unwrap();
            gnu.set_real_size(real_size);
            gnu.sparse[0].set_offset(real_size - data.len() as u64);
            gnu.sparse[0].set_length(data.len() as u64);
        }
        h.set_cksum();
        self.0.append(&h, data).unwrap();
        self
    }
    pub fn whiteout(self, path: &str) -> Self {
        self.raw(path, "", tar::EntryType::Regular, 0o000, b"")
    }

    /// The finished archive: the entries so far and the two zero blocks
    /// that end a tar archive.
    pub fn bytes(&self) -> Vec<u8> {
        let mut v = self.0.get_ref().clone();
        v.extend_from_slice(&[0u8; 1024]);
        v
    }
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// The `config` object tests give their images.
pub fn process_config() -> serde_json::Value {
    json!({
        "Env": ["PATH=/bin", "GREETING=hello"],
        "Cmd": ["/bin/app", "--default"],
        "WorkingDir": "/work",
        "User": "1000:1000"
    })
}

fn image_config(layers: &[Vec<u8>], config: &serde_json::Value, arch: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "architecture": arch,
        "os": "linux",
        "config": config,
        "rootfs": {
            "type": "layers",
            "diff_ids": layers.iter().map(|l| sha256_of(l)).collect::<Vec<_>>()
        }
    }))
    .unwrap()
}

/// What [`oci_layout`] wrote.
pub struct Written {
    /// Path of each layer blob, bottom first.
    pub layer_blobs: Vec<PathBuf>,
    pub config_blob: PathBuf,
    pub manifest_blob: PathBuf,
    /// The image ID.
    pub config_digest: String,
}

fn put_blob(dir: &Path, data: &[u8]) -> (String, PathBuf) {
    let d = sha256_of(data);
    let p = dir.join("blobs/sha256").join(&d[7..]);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(&p, data).unwrap();
    (d, p)
}

fn manifest_for(
    dir: &Path,
    layers: &[Vec<u8>],
    gzipped: &[bool],
    config: &serde_json::Value,
    arch: &str,
) -> (serde_json::Value, Written) {
    let config_bytes = image_config(layers, config, arch);
    let (config_digest, config_blob) = put_blob(dir, &config_bytes);
    let mut descs = Vec::new();
    let mut layer_blobs = Vec::new();
    for (l, gz) in layers.iter().zip(gzipped) {
        let (blob, mt) = if *gz {
            (gzip(l), "application/vnd.oci.image.layer.v1.tar+gzip")
        } else {
            (l.clone(), "application/vnd.oci.image.layer.v1.tar")
        };
        let (d, p) = put_blob(dir, &blob);
        descs.push(json!({"mediaType": mt, "digest": d, "size": blob.len()}));
        layer_blobs.push(p);
    }
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config_bytes.len()
        },
        "layers": descs
    }))
    .unwrap();
    let (md, manifest_blob) = put_blob(dir, &manifest);
    let desc = json!({
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": md,
        "size": manifest.len(),
        "platform": {"architecture": arch, "os": "linux"}
    });
    (
        desc,
        Written {
            layer_blobs,
            config_blob,
            manifest_blob,
            config_digest,
        },
    )
}

/// Writes an OCI image layout of `layers` (uncompressed tars; those marked
/// in `gzipped` are stored gzip-compressed) into `dir`.
pub fn oci_layout(
    dir: &Path,
    layers: &[Vec<u8>],
    gzipped: &[bool],
    config: &serde_json::Value,
) -> Written {
    let (mut desc, w) = manifest_for(dir, layers, gzipped, config, "amd64");
    // Single-image layouts usually have no platform in index.json.
    desc.as_object_mut().unwrap().remove("platform");
    write_index(dir, &[desc]);
    w
}

/// Writes `index.json` (and `oci-layout`) listing `manifests`.
pub fn write_index(dir: &Path, manifests: &[serde_json::Value]) {
    std::fs::write(
        dir.join("index.json"),
        serde_json::to_vec(&json!({"schemaVersion": 2, "manifests": manifests})).unwrap(),
    )
    .unwrap();
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
}

/// A multi-platform layout: index.json → nested index → one manifest per
/// architecture in `arches`, each with its own one-file layer naming it.
pub fn multi_arch_layout(dir: &Path, arches: &[&str]) {
    let mut descs = Vec::new();
    for arch in arches {
        let l = Layer::new().file("arch", arch.as_bytes(), 0o644).bytes();
        let (desc, _) = manifest_for(dir, &[l], &[false], &process_config(), arch);
        descs.push(desc);
    }
    let nested = serde_json::to_vec(&json!({"schemaVersion": 2, "manifests": descs})).unwrap();
    let (d, _) = put_blob(dir, &nested);
    write_index(
        dir,
        &[json!({
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "digest": d,
            "size": nested.len()
        })],
    );
}

/// Writes a classic `docker save` archive (manifest.json, `<id>.json`,
/// `<dir>/layer.tar`) of `layers` to `out`.
pub fn docker_archive(out: &Path, layers: &[Vec<u8>], config: &serde_json::Value) {
    let config_bytes = image_config(layers, config, "amd64");
    let config_name = format!("{}.json", &sha256_of(&config_bytes)[7..]);
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |name: &str, data: &[u8]| {
        let mut h = tar::Header::new_ustar();
        h.set_path(name).unwrap();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append(&h, data).unwrap();
    };
    let mut names = Vec::new();
    for l in layers {
        let name = format!("{}/layer.tar", &sha256_of(l)[7..]);
        add(&name, l);
        names.push(name);
    }
    add(&config_name, &config_bytes);
    let manifest = serde_json::to_vec(&json!([{
        "Config": config_name,
        "RepoTags": ["vmlab-test:latest"],
        "Layers": names
    }]))
    .unwrap();
    add("manifest.json", &manifest);
    std::fs::write(out, b.into_inner().unwrap()).unwrap();
}

/// Tars the directory `dir` (an OCI layout) into `out`.
pub fn tar_dir(dir: &Path, out: &Path) {
    let mut b = tar::Builder::new(std::fs::File::create(out).unwrap());
    b.append_dir_all(".", dir).unwrap();
    b.into_inner().unwrap().flush().unwrap();
}
