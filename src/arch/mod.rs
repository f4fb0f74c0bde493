//! x86_64 machine definition: where things live in guest memory and how a
//! vCPU is put into 64-bit long mode at the kernel's entry point.
//!
//! Everything here is pure computation on byte buffers and KVM structures,
//! so it is unit-tested without `/dev/kvm`; [`write_boot_tables`] puts the
//! tables into guest memory.

pub mod cpuid;
pub mod gdt;
pub mod layout;
pub mod mptable;
pub mod paging;
pub mod regs;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Errors writing the machine's tables.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The MP table could not be built.
    #[error(transparent)]
    MpTable(#[from] mptable::Error),
    /// Guest memory refused a table.
    #[error("cannot write the {what} into guest memory: {source}")]
    Write {
        /// Which table.
        what: &'static str,
        /// Why.
        source: vm_memory::GuestMemoryError,
    },
}

fn write(mem: &GuestMemoryMmap, addr: u64, bytes: &[u8], what: &'static str) -> Result<(), Error> {
    mem.write_slice(bytes, GuestAddress(addr))
        .map_err(|source| Error::Write { what, source })
}

/// Writes what describes the machine to a 64-bit kernel besides
/// boot_params: the MP table for `cpus` vCPUs, the identity-mapped page
/// tables, the boot GDT and an empty IDT.
pub fn write_boot_tables(mem: &GuestMemoryMmap, cpus: u8) -> Result<(), Error> {
    let table = mptable::build(layout::MPTABLE_START, cpus)?;
    write(mem, layout::MPTABLE_START, &table, "MP table")?;
    write_long_mode_tables(mem)
}

/// Writes what a vCPU started in long mode needs in memory: the
/// identity-mapped page tables, the boot GDT and an empty IDT (a Linux
/// kernel, or a `--raw --mode long` image, which gets no MP table).
pub fn write_long_mode_tables(mem: &GuestMemoryMmap) -> Result<(), Error> {
    for table in paging::identity_map_1g() {
        let bytes: Vec<u8> = table.entries.iter().flat_map(|e| e.to_le_bytes()).collect();
        write(mem, table.addr, &bytes, "page tables")?;
    }
    let gdt_bytes: Vec<u8> = gdt::boot_gdt()
        .iter()
        .flat_map(|e| e.to_le_bytes())
        .collect();
    write(mem, layout::BOOT_GDT_START, &gdt_bytes, "GDT")?;
    write(mem, layout::BOOT_IDT_START, &[0; 8], "IDT")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_land_where_the_layout_says() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        write_boot_tables(&mem, 2).unwrap();
        let mut sig = [0u8; 4];
        mem.read_slice(&mut sig, GuestAddress(layout::MPTABLE_START))
            .unwrap();
        assert_eq!(&sig, b"_MP_");
        let gdt: u64 = mem
            .read_obj(GuestAddress(layout::BOOT_GDT_START + 8))
            .unwrap();
        assert_eq!(gdt, gdt::boot_gdt()[1]);
        // Too little memory for the page tables: an error, not a panic.
        let tiny = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        assert!(write_boot_tables(&tiny, 1).is_err());
    }
}
