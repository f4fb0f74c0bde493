//! Whole-image tests: OCI layouts, `docker save` archives, the cache, and
//! every way an image can be broken.

use std::fs;
use std::path::Path;

use super::testutil::*;
use super::*;

fn two_layers() -> Vec<Vec<u8>> {
    vec![
        Layer::new()
            .dir("bin", 0o755)
            .file("bin/app", b"#!/bin/sh\n", 0o755)
            .file("etc/motd", b"welcome", 0o644)
            .file("opt/data/old", b"old", 0o644)
            .bytes(),
        Layer::new()
            .whiteout("etc/.wh.motd")
            .whiteout("opt/data/.wh..wh..opq")
            .file("opt/data/new", b"new", 0o644)
            .dir("work", 0o775)
            .bytes(),
    ]
}

fn expected_config() -> ImageConfig {
    ImageConfig {
        entrypoint: vec![],
        cmd: vec!["/bin/app".into(), "--default".into()],
        env: vec!["PATH=/bin".into(), "GREETING=hello".into()],
        working_dir: Some("/work".into()),
        user: Some("1000:1000".into()),
    }
}

fn check_tree(root: &Path) {
    assert_eq!(fs::read(root.join("bin/app")).unwrap(), b"#!/bin/sh\n");
    assert!(!root.join("etc/motd").exists(), "whited out");
    assert!(root.join("etc").is_dir());
    assert!(!root.join("opt/data/old").exists(), "opaque directory");
    assert_eq!(fs::read(root.join("opt/data/new")).unwrap(), b"new");
    assert!(root.join("work").is_dir());
}

/// Names of the entries of `dir` (empty if it does not exist).
fn ls(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .map(|r| {
            r.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn oci_layout_docker_archive_and_oci_tar_share_one_cached_rootfs() {
    let t = TempDir::new("image-formats");
    let cache = t.path().join("cache");
    let layout = t.path().join("layout");
    fs::create_dir(&layout).unwrap();
    let w = oci_layout(&layout, &two_layers(), &[true, false], &process_config());

    let (root, config) = prepare_rootfs_dir_in(&layout, &cache).unwrap();
    assert_eq!(config, expected_config());
    check_tree(&root);
    assert_eq!(
        root,
        cache.join(w.config_digest.replace(':', "-")).join("rootfs"),
        "keyed by image ID"
    );
    assert_eq!(ls(root.parent().unwrap()), vec!["rootfs"], "no temporaries");

    // Second use: the cache, not a new extraction (a marker survives).
    fs::write(root.join("marker"), b"").unwrap();
    let (again, _) = prepare_rootfs_dir_in(&layout, &cache).unwrap();
    assert_eq!(again, root);
    assert!(again.join("marker").exists());

    // The same image as a `docker save` archive and as a tar of the
    // layout: same image ID, same directory.
    let archive = t.path().join("image.tar");
    docker_archive(&archive, &two_layers(), &process_config());
    let (from_archive, config) = prepare_rootfs_dir_in(&archive, &cache).unwrap();
    assert_eq!(from_archive, root);
    assert_eq!(config, expected_config());
    let oci_tar = t.path().join("layout.tar");
    tar_dir(&layout, &oci_tar);
    let (from_tar, _) = prepare_rootfs_dir_in(&oci_tar, &cache).unwrap();
    assert_eq!(from_tar, root);

    // Fresh extraction from the archive alone.
    let cache2 = t.path().join("cache2");
    let (fresh, _) = prepare_rootfs_dir_in(&archive, &cache2).unwrap();
    check_tree(&fresh);
}

#[test]
fn plain_directory_is_used_as_is() {
    let t = TempDir::new("image-plain");
    let dir = t.path().join("rootfs");
    fs::create_dir_all(dir.join("bin")).unwrap();
    let (root, config) = prepare_rootfs_dir_in(&dir, &t.path().join("cache")).unwrap();
    assert_eq!(root, dir);
    assert_eq!(config, ImageConfig::default());
    assert!(!t.path().join("cache").exists(), "nothing cached");
}

#[test]
fn index_picks_linux_amd64() {
    let t = TempDir::new("image-multiarch");
    let layout = t.path().join("layout");
    fs::create_dir(&layout).unwrap();
    multi_arch_layout(&layout, &["arm64", "amd64", "s390x"]);
    let (root, _) = prepare_rootfs_dir_in(&layout, &t.path().join("cache")).unwrap();
    assert_eq!(fs::read(root.join("arch")).unwrap(), b"amd64");

    let other = t.path().join("other");
    fs::create_dir(&other).unwrap();
    multi_arch_layout(&other, &["arm64", "riscv64"]);
    let e = prepare_rootfs_dir_in(&other, &t.path().join("cache")).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, Error::NoPlatform { .. }), "{msg}");
    assert!(
        msg.contains("linux/arm64") && msg.contains("no linux/amd64"),
        "{msg}"
    );
}

/// Corruption of any blob is a digest error; nothing lands in the cache.
#[test]
fn digest_mismatches_are_refused() {
    let t = TempDir::new("image-digest");
    let cache = t.path().join("cache");
    type Corruption = fn(&Written);
    let cases: &[(&str, Corruption)] = &[
        ("gzip layer", |w| flip_last_byte(&w.layer_blobs[0])),
        ("plain layer", |w| flip_byte(&w.layer_blobs[1], 600)),
        ("config", |w| flip_byte(&w.config_blob, 3)),
        ("manifest", |w| flip_byte(&w.manifest_blob, 3)),
        ("truncated layer", |w| {
            let p = &w.layer_blobs[1];
            let len = fs::metadata(p).unwrap().len();
            fs::OpenOptions::new()
                .write(true)
                .open(p)
                .unwrap()
                .set_len(len - 512)
                .unwrap();
        }),
    ];
    for (name, corrupt) in cases {
        let layout = t.path().join(name.replace(' ', "-"));
        fs::create_dir(&layout).unwrap();
        let w = oci_layout(&layout, &two_layers(), &[true, false], &process_config());
        corrupt(&w);
        let e = prepare_rootfs_dir_in(&layout, &cache).unwrap_err();
        let msg = e.to_string();
        assert!(
            matches!(e, Error::DigestMismatch { .. } | Error::SizeMismatch { .. }),
            "{name}: {msg}"
        );
        assert!(msg.contains(&layout.display().to_string()), "{name}: {msg}");
        let key = cache.join(w.config_digest.replace(':', "-"));
        assert_eq!(ls(&key), Vec::<String>::new(), "{name}: nothing cached");
    }
}

fn flip_byte(p: &Path, at: usize) {
    let mut b = fs::read(p).unwrap();
    let i = at.min(b.len() - 1);
    b[i] ^= 0x20;
    fs::write(p, b).unwrap();
}

fn flip_last_byte(p: &Path) {
    let len = fs::metadata(p).unwrap().len() as usize;
    flip_byte(p, len - 5);
}

/// The uncompressed content is checked against the config's diff IDs too:
/// a layout whose blobs match their (rewritten) descriptors but not the
/// config is refused.
#[test]
fn diff_id_mismatch_is_refused() {
    let t = TempDir::new("image-diffid");
    let layout = t.path().join("layout");
    fs::create_dir(&layout).unwrap();
    let good = two_layers();
    // Write the layout with the good layers' diff IDs in the config, then
    // swap in a different layer blob under a correct descriptor.
    let evil = vec![
        good[0].clone(),
        Layer::new().file("bin/app", b"evil", 0o755).bytes(),
    ];
    let w = oci_layout(&layout, &evil, &[false, false], &process_config());
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&fs::read(&w.config_blob).unwrap()).unwrap();
    cfg["rootfs"]["diff_ids"][1] = serde_json::Value::String(digest::sha256_of(&good[1]));
    // Rewrite config and manifest so every stored digest is consistent.
    let cfg_bytes = serde_json::to_vec(&cfg).unwrap();
    let cfg_digest = digest::sha256_of(&cfg_bytes);
    fs::write(
        layout.join("blobs/sha256").join(&cfg_digest[7..]),
        &cfg_bytes,
    )
    .unwrap();
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(&w.manifest_blob).unwrap()).unwrap();
    manifest["config"]["digest"] = cfg_digest.clone().into();
    manifest["config"]["size"] = cfg_bytes.len().into();
    let m_bytes = serde_json::to_vec(&manifest).unwrap();
    let m_digest = digest::sha256_of(&m_bytes);
    fs::write(layout.join("blobs/sha256").join(&m_digest[7..]), &m_bytes).unwrap();
    write_index(
        &layout,
        &[serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": m_digest,
            "size": m_bytes.len()
        })],
    );
    let e = prepare_rootfs_dir_in(&layout, &t.path().join("cache")).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, Error::DigestMismatch { .. }), "{msg}");
    assert!(
        msg.contains("uncompressed") && msg.contains("layer 2/2"),
        "{msg}"
    );
}

#[test]
fn missing_blobs_are_refused() {
    let t = TempDir::new("image-missing");
    let cache = t.path().join("cache");
    for which in ["layer", "config", "manifest"] {
        let layout = t.path().join(which);
        fs::create_dir(&layout).unwrap();
        let w = oci_layout(&layout, &two_layers(), &[true, false], &process_config());
        let victim = match which {
            "layer" => &w.layer_blobs[1],
            "config" => &w.config_blob,
            _ => &w.manifest_blob,
        };
        fs::remove_file(victim).unwrap();
        let e = prepare_rootfs_dir_in(&layout, &cache).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, Error::MissingBlob { .. }), "{which}: {msg}");
        assert!(msg.contains("missing"), "{which}: {msg}");
    }
    // A blob removed after the image was cached is noticed too.
    let layout = t.path().join("later");
    fs::create_dir(&layout).unwrap();
    let w = oci_layout(&layout, &two_layers(), &[true, false], &process_config());
    prepare_rootfs_dir_in(&layout, &cache).unwrap();
    fs::remove_file(&w.layer_blobs[0]).unwrap();
    let e = prepare_rootfs_dir_in(&layout, &cache).unwrap_err();
    assert!(matches!(e, Error::MissingBlob { .. }), "{e}");

    // A docker save archive whose manifest names a layer it lacks.
    let archive = t.path().join("short.tar");
    docker_archive(&archive, &two_layers(), &process_config());
    let mut bytes = fs::read(&archive).unwrap();
    // Rename the first layer's member so the name in manifest.json
    // matches nothing ("layer.tar" -> "layer.taz", checksum fixed).
    let pos = bytes.windows(9).position(|w| w == b"layer.tar").unwrap();
    bytes[pos + 8] = b'z';
    let header = pos - pos % 512;
    let mut h = tar::Header::new_old();
    h.as_mut_bytes()
        .copy_from_slice(&bytes[header..header + 512]);
    h.set_cksum();
    bytes[header..header + 512].copy_from_slice(h.as_bytes());
    fs::write(&archive, &bytes).unwrap();
    let e = prepare_rootfs_dir_in(&archive, &cache).unwrap_err();
    assert!(matches!(e, Error::MissingBlob { .. }), "{e}");
}

#[test]
fn files_that_are_not_images() {
    let t = TempDir::new("image-notimage");
    let cache = t.path().join("cache");
    let text = t.path().join("notes.txt");
    fs::write(
        &text,
        "just some text, long enough to fill a tar header? no.\n".repeat(20),
    )
    .unwrap();
    let gz = t.path().join("image.tar.gz");
    fs::write(&gz, gzip(b"whatever")).unwrap();
    let plain_tar = t.path().join("plain.tar");
    fs::write(&plain_tar, Layer::new().file("etc/x", b"x", 0o644).bytes()).unwrap();
    let empty = t.path().join("empty");
    fs::write(&empty, b"").unwrap();
    for (p, want) in [
        (&text, "expected an OCI image layout"),
        (&gz, "gzip"),
        (&plain_tar, "without manifest.json or index.json"),
        (&empty, "without manifest.json"),
    ] {
        let e = prepare_rootfs_dir_in(p, &cache).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, Error::NotAnImage { .. }), "{msg}");
        assert!(msg.contains("not an image") && msg.contains(want), "{msg}");
    }
    let e = prepare_rootfs_dir_in(&t.path().join("nope"), &cache).unwrap_err();
    assert!(matches!(e, Error::Access { .. }), "{e}");
    assert!(e.to_string().contains("No such file"), "{e}");

    // A layout whose index.json is not JSON.
    let bad = t.path().join("bad-layout");
    fs::create_dir(&bad).unwrap();
    fs::write(bad.join("index.json"), b"{not json").unwrap();
    let e = prepare_rootfs_dir_in(&bad, &cache).unwrap_err();
    assert!(matches!(e, Error::Format(_)), "{e}");
    assert!(e.to_string().contains("index.json"), "{e}");
}

/// Prepares an image of `layers` (the first gzipped) that must be refused:
/// its error, and what the image's cache directory holds afterwards.
fn refused_image(name: &str, layers: &[Vec<u8>]) -> (Error, Vec<String>) {
    let t = TempDir::new(name);
    let cache = t.path().join("cache");
    let layout = t.path().join("layout");
    fs::create_dir(&layout).unwrap();
    let w = oci_layout(&layout, layers, &[true, true], &process_config());
    let e = prepare_rootfs_dir_in(&layout, &cache).unwrap_err();
    let key = cache.join(w.config_digest.replace(':', "-"));
    (e, ls(&key))
}

/// An image whose layer tries to escape: refused with the layer named,
/// nothing written outside, nothing cached.
#[test]
fn escaping_layer_fails_the_image() {
    let layers = vec![
        Layer::new().file("bin/app", b"x", 0o755).bytes(),
        Layer::new()
            .symlink("up", "../../../../../../..")
            .file("up/tmp/vmlab-escaped", b"x", 0o644)
            .bytes(),
    ];
    let (e, cached) = refused_image("image-escape", &layers);
    let msg = e.to_string();
    assert!(
        matches!(
            e,
            Error::Layer {
                source: layers::Error::Unsafe { .. },
                ..
            }
        ),
        "{msg}"
    );
    assert!(
        msg.contains("layer 2/2") && msg.contains("leads out of the root"),
        "{msg}"
    );
    assert!(!Path::new("/tmp/vmlab-escaped").exists());
    assert_eq!(cached, Vec::<String>::new());
}

/// A GNU sparse entry (its hole would be written out as zeros) fails the
/// image, naming the layer; nothing is cached.
#[test]
fn sparse_layer_fails_the_image() {
    let layers = vec![
        Layer::new().file("bin/app", b"x", 0o755).bytes(),
        Layer::new()
            .gnu_sparse("var/disk.img", 4 << 20, &[1u8; 512])
            .bytes(),
    ];
    let (e, cached) = refused_image("image-sparse", &layers);
    let msg = e.to_string();
    assert!(
        msg.contains("layer 2/2") && msg.contains("var/disk.img") && msg.contains("sparse"),
        "{msg}"
    );
    assert_eq!(cached, Vec::<String>::new());
}

#[test]
fn non_amd64_config_is_refused() {
    let t = TempDir::new("image-arch");
    let layout = t.path().join("layout");
    fs::create_dir(&layout).unwrap();
    multi_arch_layout(&layout, &["arm64"]);
    // Point index.json straight at the arm64 manifest, without platform.
    let idx: serde_json::Value =
        serde_json::from_slice(&fs::read(layout.join("index.json")).unwrap()).unwrap();
    let nested_digest = idx["manifests"][0]["digest"].as_str().unwrap().to_string();
    let nested: serde_json::Value = serde_json::from_slice(
        &fs::read(layout.join("blobs/sha256").join(&nested_digest[7..])).unwrap(),
    )
    .unwrap();
    let mut m = nested["manifests"][0].clone();
    m.as_object_mut().unwrap().remove("platform");
    write_index(&layout, &[m]);
    let e = prepare_rootfs_dir_in(&layout, &t.path().join("cache")).unwrap_err();
    assert!(e.to_string().contains("linux/arm64"), "{e}");
}

#[test]
fn ext4_is_cached_per_image_and_init() {
    if !Path::new("/usr/sbin/mkfs.ext4").exists() && !Path::new("/sbin/mkfs.ext4").exists() {
        eprintln!("skipped: mkfs.ext4 not installed");
        return;
    }
    let t = TempDir::new("image-ext4");
    let cache = t.path().join("cache");
    let layout = t.path().join("layout");
    fs::create_dir(&layout).unwrap();
    oci_layout(&layout, &two_layers(), &[true, false], &process_config());
    let init = t.path().join("init");
    fs::write(&init, b"init v1").unwrap();
    let (disk, config) = prepare_ext4_in(&layout, &init, &cache).unwrap();
    assert_eq!(config, expected_config());
    let built = fs::metadata(&disk).unwrap().modified().unwrap();
    let (again, _) = prepare_ext4_in(&layout, &init, &cache).unwrap();
    assert_eq!(again, disk);
    assert_eq!(fs::metadata(&again).unwrap().modified().unwrap(), built);
    fs::write(&init, b"init v2").unwrap();
    let (other, _) = prepare_ext4_in(&layout, &init, &cache).unwrap();
    assert_ne!(other, disk, "a new init gets its own disk");
    assert!(!disk.exists(), "and the old one is removed");
    let disk = other;

    let run = RunDisk::copy_of(&disk).unwrap();
    let copy = run.path().to_path_buf();
    assert_eq!(fs::read(&copy).unwrap(), fs::read(&disk).unwrap());
    drop(run);
    assert!(!copy.exists(), "the run's copy is removed");
}
