//! Identity-mapped page tables for entering the kernel in long mode.
//!
//! The 64-bit boot protocol needs the kernel image, boot_params and the
//! command line identity-mapped; the kernel builds its own tables at once.
//! One PML4 entry, one PDPT entry and a page directory of 2 MiB pages map
//! the first 1 GiB, which covers everything vmlab places for it.

use super::layout::{PDPT_START, PD_START, PML4_START};

const PRESENT: u64 = 1 << 0;
const WRITABLE: u64 = 1 << 1;
const PAGE_SIZE_2M: u64 = 1 << 7;

/// A page table to write at a guest-physical address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageTable {
    /// Guest-physical address of the table.
    pub addr: u64,
    /// Its 512 entries.
    pub entries: Vec<u64>,
}

/// The tables identity-mapping the first 1 GiB with 2 MiB pages.
pub fn identity_map_1g() -> [PageTable; 3] {
    let mut pml4 = vec![0u64; 512];
    pml4[0] = PDPT_START | PRESENT | WRITABLE;
    let mut pdpt = vec![0u64; 512];
    pdpt[0] = PD_START | PRESENT | WRITABLE;
    let pd = (0..512u64)
        .map(|i| (i << 21) | PRESENT | WRITABLE | PAGE_SIZE_2M)
        .collect();
    [
        PageTable {
            addr: PML4_START,
            entries: pml4,
        },
        PageTable {
            addr: PDPT_START,
            entries: pdpt,
        },
        PageTable {
            addr: PD_START,
            entries: pd,
        },
    ]
}

/// Walks `tables` like the MMU would and returns the physical address for
/// `virt`, or `None` when it is not mapped. Used to test the tables.
pub fn translate(tables: &[PageTable], virt: u64) -> Option<u64> {
    let lookup = |table_addr: u64, index: u64| -> Option<u64> {
        let table = tables.iter().find(|t| t.addr == table_addr)?;
        let entry = *table.entries.get(index as usize)?;
        (entry & PRESENT != 0).then_some(entry)
    };
    let pml4e = lookup(PML4_START, (virt >> 39) & 0x1ff)?;
    let pdpte = lookup(pml4e & !0xfff, (virt >> 30) & 0x1ff)?;
    let pde = lookup(pdpte & !0xfff, (virt >> 21) & 0x1ff)?;
    if pde & PAGE_SIZE_2M == 0 {
        return None;
    }
    Some((pde & !0x1f_ffff) | (virt & 0x1f_ffff))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_gigabyte_is_identity_mapped() {
        let tables = identity_map_1g();
        for addr in [0, 0x7000, 0x20000, 0x100_0000, 0x1234_5678, (1 << 30) - 1] {
            assert_eq!(translate(&tables, addr), Some(addr), "{addr:#x}");
        }
    }

    #[test]
    fn nothing_above_one_gigabyte_is_mapped() {
        let tables = identity_map_1g();
        assert_eq!(translate(&tables, 1 << 30), None);
        assert_eq!(translate(&tables, 0xffff_ffff_8100_0000), None);
    }

    #[test]
    fn tables_are_full_size() {
        for t in identity_map_1g() {
            assert_eq!(t.entries.len(), 512);
            assert_eq!(t.addr % 0x1000, 0);
        }
    }
}
