//! Initial vCPU state for Linux's 64-bit boot protocol: long mode with
//! paging on, flat segments, boot_params in RSI.

use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_sregs};

use super::gdt::{boot_gdt, kvm_segment_from_gdt, BOOT_CS, BOOT_DS, BOOT_TSS};
use super::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PML4_START, ZERO_PAGE_START,
};

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// General registers at the kernel's 64-bit entry point.
pub fn boot_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rflags: 0x2, // bit 1 is reserved and always set
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START, // the boot protocol passes boot_params here
        ..Default::default()
    }
}

/// Adjusts the special registers KVM gave us for long mode with the boot
/// GDT and identity page tables. Only the fields long mode needs change, so
/// KVM's defaults (APIC base, etc.) survive.
pub fn set_long_mode_sregs(sregs: &mut kvm_sregs) {
    let gdt = boot_gdt();
    let code = kvm_segment_from_gdt(gdt[(BOOT_CS / 8) as usize], BOOT_CS);
    let data = kvm_segment_from_gdt(gdt[(BOOT_DS / 8) as usize], BOOT_DS);
    let tss = kvm_segment_from_gdt(gdt[(BOOT_TSS / 8) as usize], BOOT_TSS);

    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;

    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;

    sregs.cr3 = PML4_START;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.cr0 |= X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
}

/// General registers for a flat binary entered in real mode at `entry`
/// (`vmlab run --raw`): interrupts off, everything else zero.
pub fn real_mode_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: entry,
        ..Default::default()
    }
}

/// Real mode at CS:IP = 0:entry: KVM's reset state, with CS moved from
/// the reset vector's segment (selector 0xf000, base 0xffff0000) to 0, so
/// that IP is the guest-physical address.
pub fn set_real_mode_sregs(sregs: &mut kvm_sregs) {
    sregs.cs.selector = 0;
    sregs.cs.base = 0;
}

/// x87 and SSE control words as after FNINIT / reset.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// MSR numbers used at boot.
pub mod msr_index {
    pub const IA32_SYSENTER_CS: u32 = 0x174;
    pub const IA32_SYSENTER_ESP: u32 = 0x175;
    pub const IA32_SYSENTER_EIP: u32 = 0x176;
    pub const STAR: u32 = 0xc000_0081;
    pub const LSTAR: u32 = 0xc000_0082;
    pub const CSTAR: u32 = 0xc000_0083;
    pub const SYSCALL_MASK: u32 = 0xc000_0084;
    pub const KERNEL_GS_BASE: u32 = 0xc000_0102;
    pub const IA32_TSC: u32 = 0x10;
    pub const IA32_MISC_ENABLE: u32 = 0x1a0;
    pub const MTRR_DEF_TYPE: u32 = 0x2ff;
}

/// MSR values at boot: system-call MSRs cleared, fast strings on, and the
/// MTRRs enabled with write-back as the default type (without that Linux
/// would map all RAM uncached).
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    use msr_index::*;
    const MISC_ENABLE_FAST_STRING: u64 = 1;
    const MTRR_ENABLE: u64 = 1 << 11;
    const MTRR_MEM_TYPE_WB: u64 = 6;
    let entry = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        entry(IA32_SYSENTER_CS, 0),
        entry(IA32_SYSENTER_ESP, 0),
        entry(IA32_SYSENTER_EIP, 0),
        entry(STAR, 0),
        entry(CSTAR, 0),
        entry(KERNEL_GS_BASE, 0),
        entry(SYSCALL_MASK, 0),
        entry(LSTAR, 0),
        entry(IA32_TSC, 0),
        entry(IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        entry(MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_MEM_TYPE_WB),
    ]
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn lapic_reg(state: &kvm_lapic_state, offset: usize) -> u32 {
    let bytes: [u8; 4] = std::array::from_fn(|i| state.regs[offset + i] as u8);
    u32::from_le_bytes(bytes)
}

fn set_lapic_reg(state: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, b) in value.to_le_bytes().iter().enumerate() {
        state.regs[offset + i] = *b as _;
    }
}

fn with_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// Wires LINT0 to ExtINT (the 8259 PIC) and LINT1 to NMI, as firmware
/// does for the "virtual wire" mode Linux expects at boot.
pub fn set_lint(state: &mut kvm_lapic_state) {
    let lvt0 = lapic_reg(state, APIC_LVT0);
    set_lapic_reg(state, APIC_LVT0, with_delivery_mode(lvt0, APIC_MODE_EXTINT));
    let lvt1 = lapic_reg(state, APIC_LVT1);
    set_lapic_reg(state, APIC_LVT1, with_delivery_mode(lvt1, APIC_MODE_NMI));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regs_point_at_entry_and_zero_page() {
        let r = boot_regs(0x100_0000);
        assert_eq!(r.rip, 0x100_0000);
        assert_eq!(r.rsi, ZERO_PAGE_START);
        assert_eq!(r.rflags & 2, 2);
    }

    #[test]
    fn sregs_enable_long_mode() {
        let mut s = kvm_sregs::default();
        set_long_mode_sregs(&mut s);
        assert_eq!(s.cr0 & (X86_CR0_PE | X86_CR0_PG), X86_CR0_PE | X86_CR0_PG);
        assert_ne!(s.cr4 & X86_CR4_PAE, 0);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(s.cr3, PML4_START);
        assert_eq!(s.cs.selector, BOOT_CS);
        assert_eq!(s.cs.l, 1);
        assert_eq!(s.ss.selector, BOOT_DS);
        assert_eq!(s.gdt.limit, 5 * 8 - 1);
    }

    #[test]
    fn lint_pins_are_extint_and_nmi() {
        let mut state = kvm_lapic_state::default();
        set_lapic_reg(&mut state, APIC_LVT0, 0x0001_0000); // masked, fixed
        set_lint(&mut state);
        assert_eq!(lapic_reg(&state, APIC_LVT0), 0x0001_0700);
        assert_eq!((lapic_reg(&state, APIC_LVT1) >> 8) & 7, APIC_MODE_NMI);
    }

    #[test]
    fn msrs_enable_write_back_mtrrs() {
        let msrs = boot_msrs();
        let mtrr = msrs
            .iter()
            .find(|m| m.index == msr_index::MTRR_DEF_TYPE)
            .map(|m| m.data);
        assert_eq!(mtrr, Some((1 << 11) | 6));
    }
}
