//! The guest-physical memory map of a vmlab micro-VM.
//!
//! ```text
//! 0x0000_0000  real-mode IVT / BDA (left zero)
//! 0x0000_0500  GDT                         (BOOT_GDT_START)
//! 0x0000_0520  IDT, empty                  (BOOT_IDT_START)
//! 0x0000_7000  boot_params, "zero page"    (ZERO_PAGE_START)
//! 0x0000_8ff0  initial stack, grows down   (BOOT_STACK_POINTER)
//! 0x0000_9000  PML4, PDPT, PD              (identity map of the first 1 GiB)
//! 0x0002_0000  kernel command line         (CMDLINE_START)
//! 0x0002_1000  setup_data: RNG seed        (SETUP_DATA_START)
//! 0x0009_fc00  MP table (in the last KiB of base memory, where Linux scans)
//! 0x000a_0000  legacy VGA / BIOS hole, not RAM
//! 0x0010_0000  kernel (ELF segments or bzImage payload), then initrd at the top
//! 0xc000_0000  32-bit MMIO gap: virtio-mmio devices, IOAPIC, LAPIC
//! 0x1_0000_0000  RAM above 4 GiB for large guests
//! ```

/// GDT location (see [`super::gdt`]).
pub const BOOT_GDT_START: u64 = 0x500;
/// An empty IDT: the kernel installs its own before enabling interrupts.
pub const BOOT_IDT_START: u64 = 0x520;
/// Linux `struct boot_params` ("zero page").
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer for the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Top-level page table.
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPT_START: u64 = 0xa000;
/// Page directory: 512 entries of 2 MiB map the first 1 GiB.
pub const PD_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Linux's x86 `COMMAND_LINE_SIZE`: the longest command line (with its NUL)
/// a kernel that does not say otherwise accepts.
pub const DEFAULT_CMDLINE_MAX: usize = 2048;
/// `setup_data` chain (RNG seed).
pub const SETUP_DATA_START: u64 = 0x21000;
/// Start of the MP floating pointer and table.
pub const MPTABLE_START: u64 = 0x9fc00;
/// End of usable low ("base") memory.
pub const EBDA_START: u64 = 0x9fc00;
/// Where the high kernel image starts (1 MiB).
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO gap; RAM stops here and resumes at 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO gap.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// First address handed out to virtio-mmio devices.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// Each virtio-mmio device gets a 4 KiB window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// IOAPIC registers.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC registers.
pub const LAPIC_START: u64 = 0xfee0_0000;
/// Where KVM puts its three-page TSS (needed on Intel; must not overlap RAM
/// or devices).
pub const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
/// Default `initrd_addr_max` for kernels that do not state one (ELF vmlinux).
pub const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;
/// GSIs usable for device interrupts (IOAPIC pins 5..=23; 4 is COM1).
pub const IRQ_BASE: u32 = 5;
/// Last IOAPIC pin.
pub const IRQ_MAX: u32 = 23;

/// The guest RAM regions for `mem_size` bytes: below the MMIO gap, and the
/// rest above 4 GiB.
pub fn ram_regions(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_GAP_START {
        vec![(0, mem_size)]
    } else {
        vec![
            (0, MMIO_GAP_START),
            (MMIO_GAP_END, mem_size - MMIO_GAP_START),
        ]
    }
}

/// One entry of the e820 map given to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    /// First byte.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// `E820_RAM` or `E820_RESERVED`.
    pub kind: u32,
}

/// Usable RAM.
pub const E820_RAM: u32 = 1;
/// Reserved (not for the kernel's allocator).
pub const E820_RESERVED: u32 = 2;

/// The e820 map for `mem_size` bytes of RAM: base memory up to the EBDA,
/// the MP table reserved, then RAM from 1 MiB with the MMIO gap cut out.
pub fn e820_map(mem_size: u64) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820_RAM,
        },
        E820Entry {
            addr: EBDA_START,
            size: 0xa0000 - EBDA_START,
            kind: E820_RESERVED,
        },
    ];
    for (start, size) in ram_regions(mem_size) {
        let (start, size) = if start == 0 {
            (HIMEM_START, size.saturating_sub(HIMEM_START))
        } else {
            (start, size)
        };
        if size > 0 {
            map.push(E820Entry {
                addr: start,
                size,
                kind: E820_RAM,
            });
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_has_one_region() {
        assert_eq!(ram_regions(256 << 20), vec![(0, 256 << 20)]);
    }

    #[test]
    fn large_guest_skips_the_mmio_gap() {
        let regions = ram_regions(4 << 30);
        assert_eq!(regions, vec![(0, MMIO_GAP_START), (1 << 32, 1 << 30)]);
        let total: u64 = regions.iter().map(|r| r.1).sum();
        assert_eq!(total, 4 << 30);
    }

    #[test]
    fn e820_covers_ram_and_reserves_the_mptable() {
        let map = e820_map(256 << 20);
        assert_eq!(map.len(), 3);
        assert_eq!(
            map[0],
            E820Entry {
                addr: 0,
                size: 0x9fc00,
                kind: E820_RAM
            }
        );
        assert_eq!(map[1].kind, E820_RESERVED);
        assert!(map[1].addr <= MPTABLE_START && MPTABLE_START < map[1].addr + map[1].size);
        assert_eq!(map[2].addr, HIMEM_START);
        assert_eq!(map[2].addr + map[2].size, 256 << 20);
    }

    #[test]
    fn e820_of_large_guest_has_ram_above_4g() {
        let map = e820_map(6 << 30);
        let last = map.last().copied().unwrap();
        assert_eq!(last.addr, MMIO_GAP_END);
        assert_eq!(last.size, (6 << 30) - MMIO_GAP_START);
        assert!(map
            .iter()
            .all(|e| e.addr + e.size <= MMIO_GAP_START || e.addr >= MMIO_GAP_END));
    }

    #[test]
    fn fixed_structures_do_not_overlap() {
        let mut areas = [
            (BOOT_GDT_START, 0x20),
            (BOOT_IDT_START, 8),
            (ZERO_PAGE_START, 0x1000),
            (PML4_START, 0x1000),
            (PDPT_START, 0x1000),
            (PD_START, 0x1000),
            (CMDLINE_START, DEFAULT_CMDLINE_MAX as u64),
            (SETUP_DATA_START, 0x1000),
            (MPTABLE_START, 0x400),
        ];
        areas.sort();
        for pair in areas.windows(2) {
            assert!(pair[0].0 + pair[0].1 <= pair[1].0, "{pair:x?}");
        }
        const {
            assert!(
                BOOT_STACK_POINTER < PML4_START && BOOT_STACK_POINTER > ZERO_PAGE_START + 0x1000
            )
        };
    }
}
