//! Finding vmlab's guest init (`vmlab-init`, built from guest/init), which
//! is injected into every image's disk so that any image boots the same
//! way: vmlab's PID 1 runs the image's process with its environment,
//! working directory and user, and reports its exit status.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use super::Error;

/// Where the init is placed in an image's disk: a hidden directory of its
/// own, so no file of the image is replaced (an image's `/sbin/init` stays
/// what it is).
pub const GUEST_INIT_PATH: &str = "/.vmlab/init";

/// The environment variable that names the init binary explicitly.
pub const INIT_ENV: &str = "VMLAB_INIT";

/// The build's target triple and profile for the guest binaries
/// (scripts/build-initramfs.sh builds the init there, static).
const GUEST_BUILD_DIR: &str = "x86_64-unknown-linux-gnu/release";

/// Finds the vmlab-init binary: `$VMLAB_INIT`; else `vmlab-init` next to
/// the vmlab executable (an installation); else, for a development tree
/// where vmlab is `target/{debug,release}/vmlab`, the static build at
/// `target/x86_64-unknown-linux-gnu/release/vmlab-init`. Checks that it is
/// a static x86_64 executable (a dynamic one would not start in an image
/// without its libc).
pub fn find_init() -> Result<PathBuf, Error> {
    if let Some(p) = std::env::var_os(INIT_ENV).filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        if !p.is_file() {
            return Err(Error::Init(format!(
                "{INIT_ENV}={}: no such file (it must name the static vmlab-init binary)",
                p.display()
            )));
        }
        check_static(&p).map_err(|e| {
            Error::Init(format!(
                "{INIT_ENV}: {e}; it must name the static vmlab-init \
                 (scripts/build-initramfs.sh builds it)"
            ))
        })?;
        return Ok(p);
    }
    let exe = std::env::current_exe().map_err(|e| {
        Error::Init(format!(
            "cannot find the vmlab executable to locate vmlab-init ({e}); set {INIT_ENV}"
        ))
    })?;
    let candidates = candidates(&exe);
    let mut tried = Vec::new();
    for c in &candidates {
        if !c.is_file() {
            tried.push(format!("{}: missing", c.display()));
            continue;
        }
        // In a development tree `cargo build --workspace` also leaves a
        // dynamic debug vmlab-init next to vmlab: skip it for the static
        // one further down the list.
        match check_static(c) {
            Ok(()) => return Ok(c.clone()),
            Err(e) => tried.push(e.to_string()),
        }
    }
    Err(Error::Init(format!(
        "no usable guest init (the static vmlab-init): {}; build it with \
         scripts/build-initramfs.sh or set {INIT_ENV}",
        tried.join("; ")
    )))
}

fn candidates(exe: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(dir) = exe.parent() {
        out.push(dir.join("vmlab-init"));
        // target/debug/vmlab -> target/x86_64-unknown-linux-gnu/release;
        // target/debug/deps/<test> -> the same, one level up.
        for up in dir.ancestors().skip(1).take(2) {
            out.push(up.join(GUEST_BUILD_DIR).join("vmlab-init"));
        }
    }
    out
}

/// Checks the ELF header: 64-bit x86_64 executable without a program
/// interpreter (static, or static-pie as Rust's `+crt-static` makes it).
fn check_static(path: &Path) -> Result<(), Error> {
    let bad = |why: &str| Error::Init(format!("{}: {why}", path.display()));
    let mut head = Vec::new();
    File::open(path)
        .and_then(|f| f.take(64 * 1024).read_to_end(&mut head))
        .map_err(|e| bad(&format!("cannot read it: {e}")))?;
    let u16_at = |o: usize| head.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| {
        head.get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u64_at = |o: usize| {
        head.get(o..o + 8).map(|b| {
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            u64::from_le_bytes(a)
        })
    };
    if head.get(..4) != Some(b"\x7fELF") || head.get(4) != Some(&2) {
        return Err(bad("not a 64-bit ELF executable"));
    }
    const EM_X86_64: u16 = 62;
    const PT_INTERP: u32 = 3;
    if u16_at(18) != Some(EM_X86_64) {
        return Err(bad("not an x86_64 executable"));
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(32), u16_at(54), u16_at(56)) else {
        return Err(bad("truncated ELF header"));
    };
    for i in 0..u64::from(phnum) {
        let off = phoff
            .checked_add(i * u64::from(phentsize))
            .and_then(|o| usize::try_from(o).ok());
        match off.and_then(u32_at) {
            Some(PT_INTERP) => {
                return Err(bad("dynamically linked (it has a program interpreter)"))
            }
            Some(_) => {}
            None => return Err(bad("program headers out of reach")),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_tree_candidates() {
        let c = candidates(Path::new("/r/target/debug/vmlab"));
        assert!(c.contains(&PathBuf::from("/r/target/debug/vmlab-init")));
        assert!(c.contains(&PathBuf::from(
            "/r/target/x86_64-unknown-linux-gnu/release/vmlab-init"
        )));
    }

    #[test]
    fn dynamic_and_non_elf_files_are_refused() {
        // The test binary itself is dynamically linked.
        let exe = std::env::current_exe().unwrap();
        let e = check_static(&exe).unwrap_err().to_string();
        assert!(e.contains("dynamically linked"), "{e}");
        let toml = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
        let e = check_static(&toml).unwrap_err().to_string();
        assert!(e.contains("not a 64-bit ELF"), "{e}");
    }
}
