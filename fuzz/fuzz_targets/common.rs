//! Shared by the fuzz targets (each includes it with `#[path]`).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// A scratch directory for this fuzzing process, `<tmp>/vmlab-fuzz-TAG-PID`,
/// made empty the first time.
pub fn scratch(tag: &str) -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("vmlab-fuzz-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    })
}
