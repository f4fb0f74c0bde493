//! OCI image metadata: the index (or `docker save` manifest), manifest and
//! config JSON, resolved as `vmlab run --image` / `vmlab container` do.
//!
//! The input is up to three documents separated by a 0xFF byte (which
//! valid JSON never contains): index (or a `docker save` manifest.json if
//! it starts with `[`), manifest, config. So that the fuzzer gets past the
//! digest checks, the harness writes them as blobs and replaces
//! placeholders with the real digests and sizes: `@C@`/`@CS@` (config),
//! `@M@`/`@MS@` (manifest), `@L@`/`@LS@` (a fixed one-entry layer). In a
//! `docker save` image the config is the file `c.json` and the layer
//! `l.tar`. The resolved config then goes through the bundle generation
//! (`config.json` for the OCI runtime), as `vmlab container` would.

#![no_main]

use std::fs;
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};
use vmlab::container::bundle::{build_spec, SpecInput};
use vmlab::container::Network;

#[path = "common.rs"]
mod common;

fn base() -> &'static Path {
    common::scratch("oci")
}

fn sha(data: &[u8]) -> String {
    let d = Sha256::digest(data);
    d.iter().map(|b| format!("{b:02x}")).collect()
}

fn subst(doc: &[u8], pairs: &[(&str, String)]) -> Vec<u8> {
    let mut s = String::from_utf8_lossy(doc).into_owned();
    for (k, v) in pairs {
        s = s.replace(k, v);
    }
    s.into_bytes()
}

/// A tar with one 512-byte header for `x` and no data, plus the end blocks.
fn layer() -> Vec<u8> {
    let mut h = vec![0u8; 512];
    h[0] = b'x';
    h[100..107].copy_from_slice(b"0000644");
    h[124..135].copy_from_slice(b"00000000000");
    h[156] = b'0';
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
    h.extend_from_slice(&[0u8; 1024]);
    h
}

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(3, |&b| b == 0xff);
    let index = parts.next().unwrap_or(&[]);
    let manifest = parts.next().unwrap_or(&[]);
    let config = parts.next().unwrap_or(&[]);

    let dir = base().join("img");
    let _ = fs::remove_dir_all(&dir);
    let blobs = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs).unwrap();
    let l = layer();
    let mut pairs = vec![
        ("@LS@", l.len().to_string()),
        ("@L@", format!("sha256:{}", sha(&l))),
    ];
    fs::write(blobs.join(sha(&l)), &l).unwrap();
    let config = subst(config, &pairs);
    fs::write(blobs.join(sha(&config)), &config).unwrap();
    pairs.push(("@CS@", config.len().to_string()));
    pairs.push(("@C@", format!("sha256:{}", sha(&config))));
    let manifest = subst(manifest, &pairs);
    fs::write(blobs.join(sha(&manifest)), &manifest).unwrap();
    pairs.push(("@MS@", manifest.len().to_string()));
    pairs.push(("@M@", format!("sha256:{}", sha(&manifest))));
    let index = subst(index, &pairs);
    if index.first() == Some(&b'[') {
        fs::write(dir.join("manifest.json"), &index).unwrap();
        fs::write(dir.join("c.json"), &config).unwrap();
        fs::write(dir.join("l.tar"), &l).unwrap();
    } else {
        fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        fs::write(dir.join("index.json"), &index).unwrap();
    }

    let Ok((image, _layers)) = vmlab::image::fuzzing::resolve(&dir) else {
        return;
    };
    let empty_root = base().join("rootfs");
    let _ = fs::create_dir_all(&empty_root);
    let input = SpecInput {
        image: &image,
        command: &[],
        image_rootfs: &empty_root,
        root_path: Path::new("rootfs"),
        hostname: "fuzz",
        terminal: false,
        memory_limit: None,
        network: Network::None,
        netns: None,
        cgroup_namespace: true,
    };
    if let Ok(spec) = build_spec(&input) {
        let json = serde_json::to_vec(&spec).unwrap();
        let back: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert!(back["process"]["args"]
            .as_array()
            .is_some_and(|a| !a.is_empty()));
    }
});
