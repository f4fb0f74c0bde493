//! The boot GDT and the KVM segment descriptors that match it.
//!
//! Linux's 64-bit boot protocol (Documentation/x86/boot.rst) asks for
//! `__BOOT_CS` = 0x10 and `__BOOT_DS` = 0x18, so the table has two null
//! entries first; the TSS entry only exists because KVM wants a usable TR.

use kvm_bindings::kvm_segment;

/// Selector of the 64-bit code segment.
pub const BOOT_CS: u16 = 0x10;
/// Selector of the data segment.
pub const BOOT_DS: u16 = 0x18;
/// Selector of the TSS.
pub const BOOT_TSS: u16 = 0x20;

/// Builds a descriptor from flags (access byte and the flag nibble in
/// bits 12..16), a base and a 20-bit limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let base = base as u64;
    let limit = limit as u64;
    let flags = flags as u64;
    ((base & 0xff00_0000) << (56 - 24))
        | ((flags & 0x0000_f0ff) << 40)
        | ((limit & 0x000f_0000) << (48 - 16))
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

/// The boot GDT: null, null, code64, data, TSS.
pub fn boot_gdt() -> [u64; 5] {
    [
        0,
        0,
        gdt_entry(0xa09b, 0, 0xfffff), // code: present, DPL0, exec/read, L=1, G=1
        gdt_entry(0xc093, 0, 0xfffff), // data: present, DPL0, read/write, D=1, G=1
        gdt_entry(0x808b, 0, 0xfffff), // TSS: present, busy 64-bit TSS
    ]
}

/// Decodes a descriptor into the `kvm_segment` KVM wants for `selector`.
pub fn kvm_segment_from_gdt(entry: u64, selector: u16) -> kvm_segment {
    let present = ((entry >> 47) & 1) as u8;
    let granularity = ((entry >> 55) & 1) as u8;
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: if granularity == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: granularity,
        avl: ((entry >> 52) & 1) as u8,
        unusable: if present == 1 { 0 } else { 1 },
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_segment_is_64_bit_ring0() {
        let gdt = boot_gdt();
        let cs = kvm_segment_from_gdt(gdt[(BOOT_CS / 8) as usize], BOOT_CS);
        assert_eq!(cs.l, 1);
        assert_eq!(cs.db, 0);
        assert_eq!(cs.dpl, 0);
        assert_eq!(cs.present, 1);
        assert_eq!(cs.s, 1);
        assert_eq!(cs.type_, 0xb);
        assert_eq!(cs.limit, 0xffff_ffff);
        assert_eq!(cs.base, 0);
    }

    #[test]
    fn data_and_tss_segments() {
        let gdt = boot_gdt();
        let ds = kvm_segment_from_gdt(gdt[(BOOT_DS / 8) as usize], BOOT_DS);
        assert_eq!((ds.type_, ds.db, ds.l, ds.s), (3, 1, 0, 1));
        let tss = kvm_segment_from_gdt(gdt[(BOOT_TSS / 8) as usize], BOOT_TSS);
        assert_eq!((tss.type_, tss.s, tss.present), (0xb, 0, 1));
    }

    #[test]
    fn entry_encoding_round_trips_base_and_limit() {
        let e = gdt_entry(0x4092, 0x1234_5678, 0xabcde);
        let s = kvm_segment_from_gdt(e, 8);
        assert_eq!(s.base, 0x1234_5678);
        assert_eq!(s.limit, 0xabcde);
        assert_eq!(s.g, 0);
        let null = kvm_segment_from_gdt(0, 0);
        assert_eq!(null.unusable, 1);
    }
}
