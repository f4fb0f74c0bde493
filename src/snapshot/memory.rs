//! Guest memory in a snapshot: only what the guest touched is written,
//! and a restore maps the file privately, so it reads only what the guest
//! touches and never writes back.
//!
//! The file holds the RAM regions back to back (region `i` at the sum of
//! the sizes of the regions before it). Saving asks the kernel which pages
//! of the mapping are resident (`mincore`): a page the guest never touched
//! is not, and stays a hole in the sparse file; a touched page that is all
//! zero is left a hole too (a hole reads as zeros).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap, MemoryRegionAddress,
};

use super::Error;
use crate::arch::layout::ram_regions;

const PAGE: usize = 4096;

/// What a save wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SaveStats {
    /// Pages of guest RAM.
    pub pages: u64,
    /// Pages the guest had touched.
    pub resident: u64,
    /// Of those, pages written (not all zero).
    pub written: u64,
}

fn mem_err(what: impl std::fmt::Display) -> Error {
    Error::Memory(what.to_string())
}

/// Writes `mem` (laid out as [`ram_regions`] of `mem_size`) to `path`.
pub fn save(mem: &GuestMemoryMmap, mem_size: u64, path: &Path) -> Result<SaveStats, Error> {
    let file = File::create(path).map_err(|e| mem_err(format!("{}: {e}", path.display())))?;
    let mut stats = SaveStats::default();
    let mut offset = 0u64;
    let mut page = vec![0u8; PAGE];
    for (start, size) in ram_regions(mem_size) {
        let region = mem
            .find_region(GuestAddress(start))
            .ok_or_else(|| mem_err(format!("no guest RAM at {start:#x}")))?;
        if region.len() < size {
            return Err(mem_err(format!(
                "guest RAM at {start:#x} is smaller than {size:#x}"
            )));
        }
        let host = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(mem_err)?;
        let pages = usize::try_from(size).map_err(mem_err)? / PAGE;
        let mut resident = vec![0u8; pages];
        // SAFETY: `host` is the start of the region's mapping, page
        // aligned (mmap), and `pages` pages long; `resident` has one byte
        // per page, which is what mincore writes.
        let rc = unsafe { libc::mincore(host.cast(), pages * PAGE, resident.as_mut_ptr()) };
        if rc != 0 {
            return Err(mem_err(format!(
                "mincore: {}",
                std::io::Error::last_os_error()
            )));
        }
        for (i, flag) in resident.iter().enumerate() {
            stats.pages += 1;
            if flag & 1 == 0 {
                continue;
            }
            stats.resident += 1;
            let addr = start + (i * PAGE) as u64;
            mem.read_slice(&mut page, GuestAddress(addr))
                .map_err(mem_err)?;
            if page.iter().all(|&b| b == 0) {
                continue;
            }
            file.write_all_at(&page, offset + (i * PAGE) as u64)
                .map_err(|e| mem_err(format!("{}: {e}", path.display())))?;
            stats.written += 1;
        }
        offset += size;
    }
    file.set_len(offset)
        .and_then(|()| file.sync_all())
        .map_err(|e| mem_err(format!("{}: {e}", path.display())))?;
    Ok(stats)
}

/// Maps the memory file at `path` as the guest RAM of a `mem_size` VM,
/// privately (copy-on-write): the guest's writes stay in this process.
pub fn map(path: &Path, mem_size: u64) -> Result<GuestMemoryMmap, Error> {
    let file = File::open(path).map_err(|e| Error::Io {
        path: path.display().to_string(),
        source: e,
    })?;
    let len = file
        .metadata()
        .map_err(|e| Error::Io {
            path: path.display().to_string(),
            source: e,
        })?
        .len();
    if len != mem_size {
        return Err(Error::Corrupt {
            path: path.display().to_string(),
            why: format!("{len} bytes, but the snapshot's guest has {mem_size}"),
        });
    }
    let file = Arc::new(file);
    let mut regions = Vec::new();
    let mut offset = 0u64;
    for (start, size) in ram_regions(mem_size) {
        let size_usize = usize::try_from(size).map_err(mem_err)?;
        let mapping = MmapRegionBuilder::new(size_usize)
            .with_file_offset(FileOffset::from_arc(file.clone(), offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(mem_err)?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(start))
            .ok_or_else(|| mem_err(format!("guest RAM at {start:#x} overflows")))?;
        regions.push(region);
        offset += size;
    }
    GuestMemoryMmap::from_regions(regions).map_err(mem_err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn only_touched_nonzero_pages_are_written_and_restores_are_private() {
        let size = 32u64 << 20;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size as usize)]).unwrap();
        mem.write_slice(b"hello", GuestAddress(0x1000)).unwrap();
        mem.write_slice(&[0u8; 16], GuestAddress(0x5000)).unwrap(); // touched, zero
        mem.write_slice(b"end", GuestAddress(size - 3)).unwrap();
        let dir = std::env::temp_dir().join(format!("vmlab-snapmem-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("memory");
        let stats = save(&mem, size, &path).unwrap();
        assert_eq!(stats.pages, size / 4096);
        assert_eq!(stats.written, 2, "{stats:?}");
        assert!(stats.resident >= 3, "{stats:?}");
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), size);
        assert!(
            meta.blocks() * 512 <= 64 << 10,
            "sparse: {} blocks",
            meta.blocks()
        );

        let a = map(&path, size).unwrap();
        let b = map(&path, size).unwrap();
        let mut buf = [0u8; 5];
        a.read_slice(&mut buf, GuestAddress(0x1000)).unwrap();
        assert_eq!(&buf, b"hello");
        a.write_slice(b"HELLO", GuestAddress(0x1000)).unwrap();
        b.read_slice(&mut buf, GuestAddress(0x1000)).unwrap();
        assert_eq!(
            &buf, b"hello",
            "a write in one restored VM is not seen by another"
        );
        let mut end = [0u8; 3];
        b.read_slice(&mut end, GuestAddress(size - 3)).unwrap();
        assert_eq!(&end, b"end");
        let on_disk = std::fs::read(&path).unwrap();
        assert_eq!(
            &on_disk[0x1000..0x1005],
            b"hello",
            "the file is never written"
        );

        let e = map(&path, size * 2).unwrap_err().to_string();
        assert!(e.contains("but the snapshot's guest has"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
