//! The OCI runtime bundle's config.json, from an image's process
//! configuration and its /etc/passwd and /etc/group (the User lookup).
//!
//! The input is fields separated by 0xFF: Entrypoint, Cmd, Env (each a list
//! separated by NUL), WorkingDir, User, the image's /etc/passwd, its
//! /etc/group, the command given after `--` (NUL-separated). Checked: no
//! crash; a spec that is built serializes to JSON with a non-empty argument
//! vector, an absolute working directory, and the uid the User asked for
//! when it was numeric.

#![no_main]

use std::fs;
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use vmlab::container::bundle::{build_spec, SpecInput};
use vmlab::container::Network;
use vmlab::image::ImageConfig;

#[path = "common.rs"]
mod common;

fn root() -> &'static Path {
    let r = common::scratch("bundle");
    let _ = fs::create_dir_all(r.join("etc"));
    r
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn list(b: &[u8]) -> Vec<String> {
    if b.is_empty() {
        return Vec::new();
    }
    b.split(|&c| c == 0).map(text).collect()
}

fuzz_target!(|data: &[u8]| {
    let f: Vec<&[u8]> = data.splitn(8, |&b| b == 0xff).collect();
    let field = |i: usize| f.get(i).copied().unwrap_or(&[]);
    let opt = |i: usize| f.get(i).map(|b| text(b));
    let image = ImageConfig {
        entrypoint: list(field(0)),
        cmd: list(field(1)),
        env: list(field(2)),
        working_dir: opt(3),
        user: opt(4),
    };
    let r = root();
    for (i, name) in [(5, "etc/passwd"), (6, "etc/group")] {
        let p = r.join(name);
        match f.get(i) {
            Some(b) => fs::write(&p, b).unwrap(),
            None => {
                let _ = fs::remove_file(&p);
            }
        }
    }
    let command = list(field(7));
    let input = SpecInput {
        image: &image,
        command: &command,
        image_rootfs: r,
        root_path: Path::new("rootfs"),
        hostname: "fuzz",
        terminal: field(2).len() % 2 == 1,
        memory_limit: Some(64 << 20),
        network: Network::None,
        netns: None,
        cgroup_namespace: true,
    };
    let Ok(spec) = build_spec(&input) else {
        return;
    };
    let json: serde_json::Value = serde_json::to_value(&spec).unwrap();
    let p = &json["process"];
    assert!(p["args"].as_array().is_some_and(|a| !a.is_empty()));
    assert!(p["cwd"].as_str().is_some_and(|c| c.starts_with('/')));
    if let Some(user) = image.user.as_deref().map(str::trim) {
        let uid = user.split(':').next().unwrap_or("");
        if let Ok(n) = uid.parse::<u32>() {
            assert_eq!(p["user"]["uid"], n, "User {user:?}");
        }
    }
});
