//! Image layer application: arbitrary bytes as a layer tarball, applied to
//! an empty directory. Besides not crashing, nothing may be written outside
//! that directory: a sibling directory with a sentinel file must stay as it
//! was, and the parent must hold nothing new.

#![no_main]

use std::fs;
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use vmlab::image::layers::{apply_limited, Budget, Limits};

#[path = "common.rs"]
mod common;

/// The scratch directory, with `outside/secret` next to where `root` goes.
fn base() -> &'static Path {
    let b = common::scratch("layer");
    if !b.join("outside/secret").exists() {
        fs::create_dir_all(b.join("outside")).unwrap();
        fs::write(b.join("outside/secret"), b"s").unwrap();
    }
    b
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fuzz_target!(|data: &[u8]| {
    let b = base();
    let root = b.join("root");
    let _ = fs::remove_dir_all(&root);
    fs::create_dir(&root).unwrap();
    // Small limits: a fuzz input must not fill the disk either.
    let mut budget = Budget::new(Limits {
        max_bytes: 16 << 20,
        max_entries: 4096,
    });
    let _ = apply_limited(&root, data, &mut budget);
    assert_eq!(
        names(b),
        ["outside", "root"],
        "a layer wrote next to its root"
    );
    assert_eq!(
        names(&b.join("outside")),
        ["secret"],
        "a layer wrote outside its root"
    );
    let m = fs::symlink_metadata(b.join("outside/secret")).unwrap();
    assert!(
        m.is_file() && m.len() == 1,
        "the sentinel outside the root changed"
    );
    assert_eq!(fs::read(b.join("outside/secret")).unwrap(), b"s");
});
