//! Loading a Linux kernel and initrd into guest memory and describing the
//! machine to it with `boot_params` (Documentation/x86/boot.rst).
//!
//! Two kernel formats are accepted: an ELF `vmlinux` (loaded segment by
//! segment, entered at its ELF entry point, which is `startup_64`), and a
//! `bzImage` (its protected-mode payload loaded at 1 MiB and entered at the
//! 64-bit entry, load address + 0x200). Both are entered in long mode with
//! `boot_params` in RSI.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use vm_memory::{Address, ByteValued, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::arch::layout::{
    E820Entry, CMDLINE_START, DEFAULT_CMDLINE_MAX, DEFAULT_INITRD_ADDR_MAX, HIMEM_START,
    MMIO_GAP_START, SETUP_DATA_START, ZERO_PAGE_START,
};

/// The `HdrS` magic of a bzImage setup header.
const HDRS_MAGIC: u32 = 0x5372_6448;
/// `boot_flag` value of a valid setup header.
const BOOT_FLAG: u16 = 0xaa55;
/// "Undefined" boot loader id: vmlab has no registered one.
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// xloadflags bit: the kernel has the 64-bit entry point at +0x200.
const XLF_KERNEL_64: u16 = 1 << 0;
/// setup_data type of an RNG seed.
const SETUP_RNG_SEED: u32 = 9;
/// Bytes of entropy handed to the guest.
pub const RNG_SEED_LEN: usize = 32;
/// The 64-bit entry's offset in a bzImage's protected-mode payload.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;

/// Errors loading the kernel or initrd.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The kernel file could not be opened or read.
    #[error("cannot read kernel {path}: {source}")]
    KernelFile {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Neither ELF nor bzImage.
    #[error("{path} is not a Linux kernel: expected an ELF vmlinux or a bzImage")]
    NotAKernel {
        /// The file.
        path: PathBuf,
    },
    /// The image was recognized but is unusable.
    #[error("cannot load kernel {path}: {reason}")]
    BadKernel {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The initrd file could not be read.
    #[error("cannot read initrd {path}: {source}")]
    InitrdFile {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The initrd does not fit between the kernel and the top of low memory.
    #[error(
        "initrd {path} ({size_mib} MiB) does not fit in guest memory: {available_mib} MiB are free \
         between the kernel and the initrd limit; give the guest more --memory"
    )]
    InitrdTooBig {
        /// The file.
        path: PathBuf,
        /// Its size.
        size_mib: u64,
        /// The room there is.
        available_mib: u64,
    },
    /// The assembled command line is longer than the kernel accepts.
    #[error("the kernel command line is {len} bytes long; this kernel accepts at most {max}")]
    CmdlineTooLong {
        /// Its length.
        len: usize,
        /// The kernel's limit.
        max: usize,
    },
    /// linux-loader refused the command line.
    #[error("the kernel command line: {0}")]
    Cmdline(linux_loader::cmdline::Error),
    /// linux-loader could not write a boot structure.
    #[error("cannot write the {what} into guest memory: {reason}")]
    Load {
        /// Which one.
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// A command line with a NUL byte cannot be passed.
    #[error("the kernel command line contains a NUL byte")]
    CmdlineNul,
    /// Writing into guest memory failed (it is too small for what goes there).
    #[error("guest memory is too small for the {what}: {source}")]
    GuestMemory {
        /// What was being written.
        what: &'static str,
        /// Why.
        source: vm_memory::GuestMemoryError,
    },
    /// The host RNG failed.
    #[error("cannot get random bytes for the guest's RNG seed: {0}")]
    Entropy(std::io::Error),
    /// The thread that loads the kernel and initrd could not be started.
    #[error("cannot start the kernel loader thread: {0}")]
    LoaderThread(std::io::Error),
    /// The loader thread panicked (a bug; its message is on stderr).
    #[error("the kernel loader thread panicked")]
    LoaderPanicked,
}

type Result<T> = std::result::Result<T, Error>;

/// Kernel image formats vmlab boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    /// Uncompressed ELF `vmlinux`.
    Elf,
    /// Compressed `bzImage`.
    BzImage,
}

/// A kernel in guest memory.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    /// Which format it was.
    pub format: KernelFormat,
    /// Guest-physical 64-bit entry point.
    pub entry: u64,
    /// First byte after everything the kernel occupies while it boots
    /// (for a bzImage: room for decompression, from `init_size`).
    pub end: u64,
    /// The setup header of a bzImage.
    pub setup_header: Option<setup_header>,
    /// Longest command line the kernel accepts, without the NUL.
    pub cmdline_max: usize,
    /// Highest address the initrd may occupy.
    pub initrd_addr_max: u64,
}

/// Tells the format from the first bytes of the file.
pub fn detect_format(head: &[u8]) -> Option<KernelFormat> {
    if head.len() >= 4 && &head[..4] == b"\x7fELF" {
        return Some(KernelFormat::Elf);
    }
    if head.len() >= 0x206 {
        let magic = u32::from_le_bytes([head[0x202], head[0x203], head[0x204], head[0x205]]);
        if magic == HDRS_MAGIC {
            return Some(KernelFormat::BzImage);
        }
    }
    None
}

/// Loads the kernel at `path` into `mem`.
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel> {
    let file_err = |source| Error::KernelFile {
        path: path.to_owned(),
        source,
    };
    let mut file = File::open(path).map_err(file_err)?;
    if file.metadata().map_err(file_err)?.is_dir() {
        return Err(file_err(std::io::Error::other("it is a directory")));
    }
    let mut head = vec![0u8; 0x400];
    let n = read_up_to(&mut file, &mut head).map_err(file_err)?;
    head.truncate(n);
    let format = detect_format(&head).ok_or_else(|| Error::NotAKernel {
        path: path.to_owned(),
    })?;
    file.seek(SeekFrom::Start(0)).map_err(file_err)?;
    let bad = |reason: String| Error::BadKernel {
        path: path.to_owned(),
        reason,
    };

    match format {
        KernelFormat::Elf => {
            let result = Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
                .map_err(|e| bad(format!("{e} (truncated, or larger than guest memory?)")))?;
            Ok(LoadedKernel {
                format,
                entry: result.kernel_load.raw_value(),
                end: result.kernel_end,
                setup_header: None,
                cmdline_max: DEFAULT_CMDLINE_MAX - 1,
                initrd_addr_max: DEFAULT_INITRD_ADDR_MAX,
            })
        }
        KernelFormat::BzImage => {
            let result = BzImage::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
                .map_err(|e| bad(format!("{e} (truncated, or larger than guest memory?)")))?;
            let hdr = result
                .setup_header
                .ok_or_else(|| bad("no setup header".into()))?;
            let version = hdr.version;
            let xloadflags = hdr.xloadflags;
            if version < 0x020c || xloadflags & XLF_KERNEL_64 == 0 {
                return Err(bad(format!(
                    "boot protocol {}.{:02} without a 64-bit entry point; vmlab needs 2.12+ with \
                     XLF_KERNEL_64",
                    version >> 8,
                    version & 0xff
                )));
            }
            let load = result.kernel_load.raw_value();
            let init_size = u64::from(hdr.init_size);
            let pref = hdr.pref_address;
            // The decompressor works in place from the load address or moves
            // to the preferred address; keep the initrd clear of both.
            let end = (load + init_size).max(pref.saturating_add(init_size));
            if end > mem.last_addr().raw_value() {
                return Err(bad(format!(
                    "it needs {} MiB to decompress, more than the guest has",
                    end >> 20
                )));
            }
            let cmdline_size = hdr.cmdline_size as usize;
            Ok(LoadedKernel {
                format,
                entry: load + BZIMAGE_64BIT_ENTRY_OFFSET,
                end,
                setup_header: Some(hdr),
                cmdline_max: if cmdline_size == 0 {
                    DEFAULT_CMDLINE_MAX - 1
                } else {
                    cmdline_size.min(DEFAULT_CMDLINE_MAX - 1)
                },
                initrd_addr_max: u64::from(hdr.initrd_addr_max),
            })
        }
    }
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut total = 0;
    while total < buf.len() {
        match file.read(&mut buf[total..])? {
            0 => break,
            n => total += n,
        }
    }
    Ok(total)
}

/// Chooses where an initrd of `size` bytes goes: as high as possible below
/// both the end of low RAM and the kernel's `initrd_addr_max`, page aligned,
/// and above the kernel. `None` when it does not fit.
pub fn initrd_placement(
    size: u64,
    kernel_end: u64,
    mem_size: u64,
    initrd_addr_max: u64,
) -> Option<u64> {
    let lowmem_end = mem_size.min(MMIO_GAP_START);
    let top = lowmem_end.min(initrd_addr_max.saturating_add(1));
    let addr = top.checked_sub(size)? & !0xfff;
    (addr >= kernel_end).then_some(addr)
}

/// A kernel and an initrd on their way into guest memory, on a thread of
/// their own: copying ~10 MB of kernel into fresh memory (page faults, THP
/// zeroing, the copy) is the largest piece of CPU work before the first
/// KVM_RUN, and it needs nothing from KVM, so it runs while the VM's other
/// parts are created (which mostly wait on the kernel).
pub struct BackgroundLoad {
    thread: std::thread::JoinHandle<Result<LoadedImages>>,
}

/// What [`BackgroundLoad`] produces: the kernel, and the initrd's
/// (address, size).
pub type LoadedImages = (LoadedKernel, Option<(u64, u64)>);

impl BackgroundLoad {
    /// Starts loading `kernel` and `initrd` into `mem`, a handle on the
    /// VM's guest memory (regions are shared between clones, and the clone
    /// keeps them mapped for as long as the thread runs). Nothing else may
    /// write where they go until [`BackgroundLoad::wait`] returns: the VM
    /// writes its boot structures after it, and no vCPU runs before.
    pub fn start(
        mem: GuestMemoryMmap,
        kernel: PathBuf,
        initrd: Option<PathBuf>,
        mem_size: u64,
    ) -> Result<BackgroundLoad> {
        let thread = std::thread::Builder::new()
            .name("vmlab-load".into())
            .spawn(move || {
                let loaded = load_kernel(&mem, &kernel)?;
                let initrd = match &initrd {
                    Some(path) => Some(load_initrd(&mem, path, &loaded, mem_size)?),
                    None => None,
                };
                Ok((loaded, initrd))
            })
            .map_err(Error::LoaderThread)?;
        Ok(BackgroundLoad { thread })
    }

    /// Waits for the load to finish.
    pub fn wait(self) -> Result<LoadedImages> {
        self.thread.join().map_err(|_| Error::LoaderPanicked)?
    }
}

/// Loads the initrd at `path` and returns its (address, size).
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel: &LoadedKernel,
    mem_size: u64,
) -> Result<(u64, u64)> {
    let file_err = |source| Error::InitrdFile {
        path: path.to_owned(),
        source,
    };
    let mut file = File::open(path).map_err(file_err)?;
    let meta = file.metadata().map_err(file_err)?;
    if meta.is_dir() {
        return Err(file_err(std::io::Error::other("it is a directory")));
    }
    let size = meta.len();
    let addr =
        initrd_placement(size, kernel.end, mem_size, kernel.initrd_addr_max).ok_or_else(|| {
            let top = mem_size.min(MMIO_GAP_START).min(kernel.initrd_addr_max + 1);
            Error::InitrdTooBig {
                path: path.to_owned(),
                size_mib: size.div_ceil(1 << 20),
                available_mib: top.saturating_sub(kernel.end) >> 20,
            }
        })?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|source| Error::GuestMemory {
            what: "initrd",
            source,
        })?;
    Ok((addr, size))
}

/// Writes the command line (NUL-terminated) after checking the kernel's
/// limit, as a linux-loader [`Cmdline`] (which also refuses what is not
/// printable ASCII).
pub fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &str, max: usize) -> Result<()> {
    check_cmdline(cmdline, max)?;
    // `max` excludes the NUL; Cmdline's capacity includes it.
    let mut line = Cmdline::new(max + 1).map_err(Error::Cmdline)?;
    line.insert_str(cmdline).map_err(Error::Cmdline)?;
    linux_loader::loader::load_cmdline(mem, GuestAddress(CMDLINE_START), &line).map_err(|e| {
        Error::Load {
            what: "command line",
            reason: e.to_string(),
        }
    })
}

/// Writes `params` into the zero page with linux-loader's boot
/// configurator.
pub fn write_boot_params(mem: &GuestMemoryMmap, params: &boot_params) -> Result<()> {
    let params = BootParams::new(params, GuestAddress(ZERO_PAGE_START));
    LinuxBootConfigurator::write_bootparams(&params, mem).map_err(|e| Error::Load {
        what: "boot_params",
        reason: e.to_string(),
    })
}

/// Checks a command line against the kernel's limit.
pub fn check_cmdline(cmdline: &str, max: usize) -> Result<()> {
    if cmdline.as_bytes().contains(&0) {
        return Err(Error::CmdlineNul);
    }
    if cmdline.len() > max {
        return Err(Error::CmdlineTooLong {
            len: cmdline.len(),
            max,
        });
    }
    Ok(())
}

/// The `setup_data` record carrying an RNG seed (`struct setup_data`
/// followed by the seed), as QEMU passes one, so the guest's RNG is
/// initialized at once instead of waiting for entropy.
#[repr(C, packed)]
#[derive(Debug, Clone, Copy, Default)]
pub struct RngSeedSetupData {
    /// Guest address of the next record; 0 ends the chain.
    pub next: u64,
    /// `SETUP_RNG_SEED`.
    pub kind: u32,
    /// Bytes of data that follow.
    pub len: u32,
    /// The seed.
    pub seed: [u8; RNG_SEED_LEN],
}

// SAFETY: plain integers and bytes, packed: every bit pattern is valid and
// there is no padding.
unsafe impl ByteValued for RngSeedSetupData {}

/// The record for `seed`, last in its chain.
pub fn rng_seed_setup_data(seed: &[u8; RNG_SEED_LEN]) -> RngSeedSetupData {
    RngSeedSetupData {
        next: 0,
        kind: SETUP_RNG_SEED,
        len: RNG_SEED_LEN as u32,
        seed: *seed,
    }
}

/// Fills `buf` from the kernel's RNG.
pub fn host_random(buf: &mut [u8]) -> Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: the pointer and length describe `rest`, a live mutable
        // slice; getrandom writes at most that many bytes.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(Error::Entropy(err));
        }
        filled += n as usize;
    }
    Ok(())
}

/// Writes the RNG seed and returns its guest address for boot_params.
pub fn write_rng_seed(mem: &GuestMemoryMmap) -> Result<u64> {
    let mut seed = [0u8; RNG_SEED_LEN];
    host_random(&mut seed)?;
    mem.write_obj(rng_seed_setup_data(&seed), GuestAddress(SETUP_DATA_START))
        .map_err(|source| Error::GuestMemory {
            what: "RNG seed",
            source,
        })?;
    Ok(SETUP_DATA_START)
}

/// What goes into `boot_params` besides the kernel's own header.
#[derive(Debug, Clone, Default)]
pub struct BootInfo {
    /// Length of the command line (without the NUL).
    pub cmdline_len: usize,
    /// Initrd (address, size).
    pub initrd: Option<(u64, u64)>,
    /// The memory map.
    pub e820: Vec<E820Entry>,
    /// Head of the setup_data chain.
    pub setup_data: Option<u64>,
}

/// Builds the zero page for `kernel`.
pub fn build_boot_params(kernel: &LoadedKernel, info: &BootInfo) -> boot_params {
    let mut params = boot_params::default();
    if let Some(hdr) = kernel.setup_header {
        params.hdr = hdr;
    } else {
        // An ELF vmlinux has no setup header: fill in what the kernel reads.
        params.hdr.boot_flag = BOOT_FLAG;
        params.hdr.header = HDRS_MAGIC;
        params.hdr.kernel_alignment = 0x100_0000;
    }
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = info.cmdline_len as u32 + 1;
    if let Some((addr, size)) = info.initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    params.hdr.setup_data = info.setup_data.unwrap_or(0);
    let n = info.e820.len().min(params.e820_table.len());
    for (slot, entry) in params.e820_table.iter_mut().zip(&info.e820[..n]) {
        *slot = boot_e820_entry {
            addr: entry.addr,
            size: entry.size,
            r#type: entry.kind,
        };
    }
    params.e820_entries = n as u8;
    params
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::layout::{e820_map, ZERO_PAGE_START};

    fn elf_kernel() -> LoadedKernel {
        LoadedKernel {
            format: KernelFormat::Elf,
            entry: 0x100_0000,
            end: 0x300_0000,
            setup_header: None,
            cmdline_max: 2047,
            initrd_addr_max: DEFAULT_INITRD_ADDR_MAX,
        }
    }

    #[test]
    fn detects_formats() {
        assert_eq!(detect_format(b"\x7fELF\x02\x01"), Some(KernelFormat::Elf));
        let mut bz = vec![0u8; 0x400];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert_eq!(detect_format(&bz), Some(KernelFormat::BzImage));
        assert_eq!(detect_format(&[0u8; 0x400]), None);
        assert_eq!(detect_format(b"\x7fEL"), None);
        assert_eq!(detect_format(&[]), None);
    }

    #[test]
    fn boot_params_for_elf() {
        let info = BootInfo {
            cmdline_len: 42,
            initrd: Some((0x0f00_0000, 0x12345)),
            e820: e820_map(256 << 20),
            setup_data: Some(SETUP_DATA_START),
        };
        let p = build_boot_params(&elf_kernel(), &info);
        assert_eq!({ p.hdr.boot_flag }, BOOT_FLAG);
        assert_eq!({ p.hdr.header }, HDRS_MAGIC);
        assert_eq!({ p.hdr.type_of_loader }, 0xff);
        assert_eq!({ p.hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ p.hdr.cmdline_size }, 43);
        assert_eq!({ p.hdr.ramdisk_image }, 0x0f00_0000);
        assert_eq!({ p.hdr.ramdisk_size }, 0x12345);
        assert_eq!({ p.hdr.setup_data }, SETUP_DATA_START);
        assert_eq!(p.e820_entries, 3);
        let last = p.e820_table[2];
        assert_eq!(
            ({ last.addr }, { last.size }, { last.r#type }),
            (HIMEM_START, (256 << 20) - HIMEM_START, 1)
        );
    }

    #[test]
    fn boot_params_keep_bzimage_header() {
        let mut hdr = setup_header {
            version: 0x020f,
            init_size: 0x100_0000,
            ..Default::default()
        };
        hdr.header = HDRS_MAGIC;
        let kernel = LoadedKernel {
            format: KernelFormat::BzImage,
            setup_header: Some(hdr),
            ..elf_kernel()
        };
        let p = build_boot_params(&kernel, &BootInfo::default());
        assert_eq!({ p.hdr.version }, 0x020f);
        assert_eq!({ p.hdr.init_size }, 0x100_0000);
        assert_eq!({ p.hdr.ramdisk_image }, 0);
        assert_eq!({ p.hdr.setup_data }, 0);
    }

    #[test]
    fn initrd_goes_high_and_page_aligned() {
        let addr =
            initrd_placement(0x1234, 0x300_0000, 256 << 20, DEFAULT_INITRD_ADDR_MAX).unwrap();
        assert_eq!(addr % 0x1000, 0);
        assert!(addr + 0x1234 <= 256 << 20);
        assert!(addr >= (256 << 20) - 0x3000);
    }

    #[test]
    fn initrd_respects_addr_max_and_gap() {
        let addr = initrd_placement(0x1000, 0x300_0000, 8 << 30, 0x37ff_ffff).unwrap();
        assert_eq!(addr, 0x3800_0000 - 0x1000);
        let addr = initrd_placement(0x1000, 0, 8 << 30, u32::MAX as u64).unwrap();
        assert!(addr + 0x1000 <= MMIO_GAP_START);
    }

    #[test]
    fn initrd_that_does_not_fit() {
        assert_eq!(
            initrd_placement(300 << 20, 0x300_0000, 256 << 20, DEFAULT_INITRD_ADDR_MAX),
            None
        );
        assert_eq!(
            initrd_placement(250 << 20, 0x300_0000, 256 << 20, DEFAULT_INITRD_ADDR_MAX),
            None
        );
    }

    #[test]
    fn cmdline_limits() {
        assert!(check_cmdline("console=ttyS0", 2047).is_ok());
        let long = "x".repeat(2048);
        assert!(matches!(
            check_cmdline(&long, 2047),
            Err(Error::CmdlineTooLong {
                len: 2048,
                max: 2047
            })
        ));
        assert!(matches!(
            check_cmdline("a\0b", 2047),
            Err(Error::CmdlineNul)
        ));
    }

    #[test]
    fn rng_seed_record_layout() {
        let seed = [7u8; RNG_SEED_LEN];
        let rec = rng_seed_setup_data(&seed);
        let rec = rec.as_slice();
        assert_eq!(rec.len(), 16 + RNG_SEED_LEN);
        assert_eq!(&rec[0..8], &[0; 8]);
        assert_eq!(
            u32::from_le_bytes(rec[8..12].try_into().unwrap()),
            SETUP_RNG_SEED
        );
        assert_eq!(u32::from_le_bytes(rec[12..16].try_into().unwrap()), 32);
        assert_eq!(&rec[16..], &seed);
        let mut a = [0u8; 32];
        host_random(&mut a).unwrap();
        assert_ne!(a, [0u8; 32]);
    }

    #[test]
    fn zero_page_does_not_overlap_the_kernel() {
        assert!(ZERO_PAGE_START + std::mem::size_of::<boot_params>() as u64 <= 0x8000);
    }

    #[test]
    fn background_load_reports_errors() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let load =
            BackgroundLoad::start(mem, PathBuf::from("/nonexistent/vmlinux"), None, 64 << 20)
                .unwrap();
        assert!(matches!(load.wait(), Err(Error::KernelFile { .. })));
    }

    #[test]
    fn loading_rejects_garbage_files() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let dir = std::env::temp_dir().join(format!("vmlab-boot-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();

        let random = dir.join("random");
        let mut bytes = vec![0u8; 8192];
        host_random(&mut bytes).unwrap();
        bytes[0] = 0; // never an ELF magic by chance
        std::fs::write(&random, &bytes).unwrap();
        assert!(matches!(
            load_kernel(&mem, &random),
            Err(Error::NotAKernel { .. })
        ));

        let truncated = dir.join("truncated");
        let mut elf = b"\x7fELF\x02\x01\x01\x00".to_vec();
        elf.resize(40, 0);
        std::fs::write(&truncated, &elf).unwrap();
        assert!(matches!(
            load_kernel(&mem, &truncated),
            Err(Error::BadKernel { .. })
        ));

        let missing = dir.join("missing");
        assert!(matches!(
            load_kernel(&mem, &missing),
            Err(Error::KernelFile { .. })
        ));
        assert!(matches!(
            load_kernel(&mem, &dir),
            Err(Error::KernelFile { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
