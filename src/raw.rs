//! `vmlab run --raw IMAGE`: a flat binary as the whole guest, for labs
//! (docs/LABS.md, guest/teach/). No firmware, no boot protocol: the
//! image's bytes are copied into guest RAM and the boot vCPU starts at
//! its entry point, in real mode (like a boot sector) or in 64-bit long
//! mode (with vmlab's identity page tables and GDT, as a Linux kernel is
//! entered, minus boot_params).

use std::path::{Path, PathBuf};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Where a real-mode image is loaded: low memory, reachable with CS = 0
/// (the "Using the KVM API" convention).
pub const REAL_MODE_LOAD: u64 = 0x1000;
/// The end of what a real-mode image may occupy: the MP table / EBDA
/// area. Real mode addresses 1 MiB, but only this much is plain RAM here.
pub const REAL_MODE_END: u64 = crate::arch::layout::EBDA_START;
/// Where a long-mode image is loaded: 1 MiB, where a kernel would be,
/// clear of the boot GDT and page tables below it.
pub const LONG_MODE_LOAD: u64 = crate::arch::layout::HIMEM_START;

/// The mode the boot vCPU starts in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CpuMode {
    /// 16-bit real mode, CS:IP = 0:entry, interrupts off.
    Real,
    /// 64-bit long mode, paging on (first GiB identity-mapped), flat
    /// segments, interrupts off.
    Long,
}

/// A flat binary to boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawImage {
    /// The file.
    pub path: PathBuf,
    /// Start mode.
    pub mode: CpuMode,
    /// Entry point (guest-physical); the load address if `None`.
    pub entry: Option<u64>,
}

/// Errors loading a raw image.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file cannot be read.
    #[error("--raw {path}: {source}")]
    Read {
        /// The image.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Empty file.
    #[error("--raw {0}: the image is empty")]
    Empty(String),
    /// Does not fit where it goes.
    #[error(
        "--raw {path}: {size} bytes do not fit in guest memory at {load:#x} \
         (room for {room} bytes in {mode:?} mode)"
    )]
    TooLarge {
        /// The image.
        path: String,
        /// Its size.
        size: u64,
        /// Where it goes.
        load: u64,
        /// How much fits.
        room: u64,
        /// The mode.
        mode: CpuMode,
    },
    /// The entry point is not in the image.
    #[error(
        "--entry {entry:#x} is outside the image, which is loaded at \
         {load:#x}..{end:#x}"
    )]
    EntryOutside {
        /// The entry asked for.
        entry: u64,
        /// Load address.
        load: u64,
        /// End of the image.
        end: u64,
    },
    /// Writing guest memory failed.
    #[error("--raw {path}: cannot write guest memory: {source}")]
    Memory {
        /// The image.
        path: String,
        /// Why.
        source: vm_memory::GuestMemoryError,
    },
}

/// A raw image in guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Loaded {
    /// Load address.
    pub load: u64,
    /// Image size.
    pub size: u64,
    /// Where the vCPU starts.
    pub entry: u64,
}

impl RawImage {
    /// Where the image goes, and how much room there is in `mem_size`
    /// bytes of guest RAM.
    fn placement(&self, mem_size: u64) -> (u64, u64) {
        match self.mode {
            CpuMode::Real => (REAL_MODE_LOAD, REAL_MODE_END.min(mem_size) - REAL_MODE_LOAD),
            CpuMode::Long => {
                let ram_end = mem_size.min(crate::arch::layout::MMIO_GAP_START);
                (LONG_MODE_LOAD, ram_end.saturating_sub(LONG_MODE_LOAD))
            }
        }
    }

    /// Checks the image against `mem_size` and copies it into `mem`.
    pub fn load(&self, mem: &GuestMemoryMmap, mem_size: u64) -> Result<Loaded, Error> {
        let shown = self.path.display().to_string();
        let bytes = read_bounded(&self.path, mem_size).map_err(|source| Error::Read {
            path: shown.clone(),
            source,
        })?;
        let loaded = self.check(bytes.len() as u64, mem_size)?;
        mem.write_slice(&bytes, GuestAddress(loaded.load))
            .map_err(|source| Error::Memory {
                path: shown,
                source,
            })?;
        Ok(loaded)
    }

    /// Where an image of `size` bytes goes and starts, or why it cannot.
    pub fn check(&self, size: u64, mem_size: u64) -> Result<Loaded, Error> {
        let shown = self.path.display().to_string();
        if size == 0 {
            return Err(Error::Empty(shown));
        }
        let (load, room) = self.placement(mem_size);
        if size > room {
            return Err(Error::TooLarge {
                path: shown,
                size,
                load,
                room,
                mode: self.mode,
            });
        }
        let end = load + size;
        let entry = self.entry.unwrap_or(load);
        if !(load..end).contains(&entry) {
            return Err(Error::EntryOutside { entry, load, end });
        }
        Ok(Loaded { load, size, entry })
    }
}

/// Reads at most `limit` + 1 bytes (enough to tell "too large" without
/// reading a huge file whole); refuses what is not a regular file.
fn read_bounded(path: &Path, limit: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let file = std::fs::File::open(path)?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    let mut bytes = Vec::new();
    file.take(limit.saturating_add(1)).read_to_end(&mut bytes)?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(mode: CpuMode, entry: Option<u64>) -> RawImage {
        RawImage {
            path: PathBuf::from("t.bin"),
            mode,
            entry,
        }
    }

    #[test]
    fn placement_and_entry() {
        let l = image(CpuMode::Real, None).check(284, 128 << 20).unwrap();
        assert_eq!(
            l,
            Loaded {
                load: 0x1000,
                size: 284,
                entry: 0x1000
            }
        );
        let l = image(CpuMode::Long, Some(0x10_0010))
            .check(64, 128 << 20)
            .unwrap();
        assert_eq!((l.load, l.entry), (0x10_0000, 0x10_0010));
    }

    #[test]
    fn bad_images_are_refused_with_a_reason() {
        let e = image(CpuMode::Real, None).check(0, 128 << 20).unwrap_err();
        assert_eq!(e.to_string(), "--raw t.bin: the image is empty");
        let e = image(CpuMode::Real, Some(0x2000))
            .check(16, 128 << 20)
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("--entry 0x2000 is outside the image"),
            "{e}"
        );
        let e = image(CpuMode::Real, Some(0xfff))
            .check(16, 128 << 20)
            .unwrap_err();
        assert!(e.to_string().contains("outside"), "{e}");
        let e = image(CpuMode::Real, None)
            .check(1 << 20, 128 << 20)
            .unwrap_err();
        assert!(e.to_string().contains("do not fit"), "{e}");
        let e = image(CpuMode::Long, None)
            .check(64 << 20, 32 << 20)
            .unwrap_err();
        assert!(e.to_string().contains("do not fit in guest memory"), "{e}");
    }

    #[test]
    fn loads_into_guest_memory() {
        let dir = std::env::temp_dir().join(format!("vmlab-raw-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("g.bin");
        std::fs::write(&path, [0xf4u8, 0x90]).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 32 << 20)]).unwrap();
        let raw = RawImage {
            path: path.clone(),
            mode: CpuMode::Real,
            entry: None,
        };
        let l = raw.load(&mem, 32 << 20).unwrap();
        assert_eq!(l.size, 2);
        let mut b = [0u8; 2];
        mem.read_slice(&mut b, GuestAddress(0x1000)).unwrap();
        assert_eq!(b, [0xf4, 0x90]);
        let missing = RawImage {
            path: dir.join("missing.bin"),
            ..raw
        };
        assert!(missing
            .load(&mem, 32 << 20)
            .unwrap_err()
            .to_string()
            .contains("missing.bin"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
