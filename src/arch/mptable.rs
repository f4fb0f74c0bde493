//! Intel MultiProcessor Specification 1.4 tables.
//!
//! Without ACPI, this is how Linux learns how many CPUs there are, where
//! the IOAPIC is and how ISA interrupts reach it. vmlab writes the floating
//! pointer and the configuration table into the last KiB of base memory,
//! one of the places Linux scans. The structures are typed
//! (`#[repr(C, packed)]`, [`ByteValued`]) after Linux's `mpspec_def.h`:
//! linux-loader 0.14 generates bindings for boot_params but not for these.

use vm_memory::ByteValued;

use super::layout::{IOAPIC_START, IRQ_MAX, LAPIC_START};

/// The most vCPUs vmlab describes: the table must fit in the KiB between
/// the MP table's start and the end of base memory (284 + 20 bytes a vCPU).
pub const MAX_CPUS: u8 = 32;

const MPF_SIGNATURE: &[u8; 4] = b"_MP_";
const MPC_SIGNATURE: &[u8; 4] = b"PCMP";
const MPC_SPEC: u8 = 4; // version 1.4
const APIC_VERSION: u8 = 0x14;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const CPU_STEPPING: u32 = 0x600;
const CPU_FEATURE_APIC: u32 = 0x200;
const CPU_FEATURE_FPU: u32 = 0x001;
const MP_IOAPIC_USABLE: u8 = 1;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_INTSRC: u8 = 3;
const ENTRY_LINTSRC: u8 = 4;

const MP_INT: u8 = 0;
const MP_NMI: u8 = 1;
const MP_EXTINT: u8 = 3;
const MP_IRQPOL_DEFAULT: u16 = 0;

/// The floating pointer structure (MP spec 4.1).
#[repr(C, packed)]
#[derive(Debug, Clone, Copy, Default)]
struct MpfIntel {
    signature: [u8; 4],
    physptr: u32,
    length: u8,
    specification: u8,
    checksum: u8,
    feature: [u8; 5],
}

/// The configuration table header (MP spec 4.2).
#[repr(C, packed)]
#[derive(Debug, Clone, Copy, Default)]
struct MpcTable {
    signature: [u8; 4],
    length: u16,
    spec: u8,
    checksum: u8,
    oem: [u8; 8],
    productid: [u8; 12],
    oemptr: u32,
    oemsize: u16,
    oemcount: u16,
    lapic: u32,
    /// Extended table length, its checksum, and a reserved byte.
    reserved: u32,
}

/// A processor entry.
#[repr(C, packed)]
#[derive(Debug, Clone, Copy, Default)]
struct MpcCpu {
    kind: u8,
    apicid: u8,
    apicver: u8,
    cpuflag: u8,
    cpufeature: u32,
    featureflag: u32,
    reserved: [u32; 2],
}

/// A bus entry.
#[repr(C, packed)]
#[derive(Debug, Clone, Copy, Default)]
struct MpcBus {
    kind: u8,
    busid: u8,
    bustype: [u8; 6],
}

/// An I/O APIC entry.
#[repr(C, packed)]
#[derive(Debug, Clone, Copy, Default)]
struct MpcIoapic {
    kind: u8,
    apicid: u8,
    apicver: u8,
    flags: u8,
    apicaddr: u32,
}

/// An I/O interrupt or local interrupt assignment entry (same layout).
#[repr(C, packed)]
#[derive(Debug, Clone, Copy, Default)]
struct MpcIntsrc {
    kind: u8,
    irqtype: u8,
    irqflag: u16,
    srcbus: u8,
    srcbusirq: u8,
    dstapic: u8,
    dstirq: u8,
}

// SAFETY: each is `repr(C, packed)` of integers and byte arrays only: no
// padding, and every bit pattern is a valid value.
unsafe impl ByteValued for MpfIntel {}
// SAFETY: as above.
unsafe impl ByteValued for MpcTable {}
// SAFETY: as above.
unsafe impl ByteValued for MpcCpu {}
// SAFETY: as above.
unsafe impl ByteValued for MpcBus {}
// SAFETY: as above.
unsafe impl ByteValued for MpcIoapic {}
// SAFETY: as above.
unsafe impl ByteValued for MpcIntsrc {}

const MPF_LEN: usize = std::mem::size_of::<MpfIntel>();
const MPC_LEN: usize = std::mem::size_of::<MpcTable>();

/// Size in bytes of the tables for `cpus` vCPUs.
pub fn size(cpus: u8) -> usize {
    MPF_LEN
        + MPC_LEN
        + std::mem::size_of::<MpcCpu>() * usize::from(cpus)
        + std::mem::size_of::<MpcBus>()
        + std::mem::size_of::<MpcIoapic>()
        + std::mem::size_of::<MpcIntsrc>() * (IRQ_MAX as usize + 1 + 2)
}

/// Errors building the table.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// Zero or too many vCPUs.
    #[error("an MP table describes 1 to {MAX_CPUS} vCPUs, not {0}")]
    CpuCount(u8),
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |acc, b| acc.wrapping_add(*b))
        .wrapping_neg()
}

/// Builds the floating pointer followed by the configuration table, to be
/// written at guest-physical `base`.
pub fn build(base: u64, cpus: u8) -> Result<Vec<u8>, Error> {
    if cpus == 0 || cpus > MAX_CPUS {
        return Err(Error::CpuCount(cpus));
    }
    let ioapic_id = cpus; // the first APIC ID after the CPUs'
                          // Below 1 MiB (the table's place, layout::MPTABLE_START): fits in 32 bits.
    let table_addr = (base + MPF_LEN as u64) as u32;

    // Entries after the header.
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    let mut push = |entry: &[u8]| {
        entries.extend_from_slice(entry);
        count += 1;
    };
    for id in 0..cpus {
        let cpu = MpcCpu {
            kind: ENTRY_PROCESSOR,
            apicid: id,
            apicver: APIC_VERSION,
            cpuflag: CPU_ENABLED | if id == 0 { CPU_BOOTPROCESSOR } else { 0 },
            cpufeature: CPU_STEPPING,
            featureflag: CPU_FEATURE_APIC | CPU_FEATURE_FPU,
            reserved: [0; 2],
        };
        push(cpu.as_slice());
    }
    let bus = MpcBus {
        kind: ENTRY_BUS,
        busid: 0,
        bustype: *b"ISA   ",
    };
    push(bus.as_slice());
    let ioapic = MpcIoapic {
        kind: ENTRY_IOAPIC,
        apicid: ioapic_id,
        apicver: APIC_VERSION,
        flags: MP_IOAPIC_USABLE,
        apicaddr: IOAPIC_START as u32,
    };
    push(ioapic.as_slice());
    for irq in 0..=IRQ_MAX as u8 {
        // ISA IRQ n is wired to IOAPIC pin n, matching KVM's default GSI
        // routing.
        let src = MpcIntsrc {
            kind: ENTRY_INTSRC,
            irqtype: MP_INT,
            irqflag: MP_IRQPOL_DEFAULT,
            srcbus: 0,
            srcbusirq: irq,
            dstapic: ioapic_id,
            dstirq: irq,
        };
        push(src.as_slice());
    }
    for (kind, lint) in [(MP_EXTINT, 0u8), (MP_NMI, 1u8)] {
        let src = MpcIntsrc {
            kind: ENTRY_LINTSRC,
            irqtype: kind,
            irqflag: MP_IRQPOL_DEFAULT,
            srcbus: 0,
            srcbusirq: 0,
            dstapic: 0xff, // all local APICs
            dstirq: lint,
        };
        push(src.as_slice());
    }

    let mut mpc = MpcTable {
        signature: *MPC_SIGNATURE,
        length: (MPC_LEN + entries.len()) as u16,
        spec: MPC_SPEC,
        checksum: 0,
        oem: *b"VMLAB   ",
        productid: *b"MICROVM     ",
        oemptr: 0,
        oemsize: 0,
        oemcount: count,
        lapic: LAPIC_START as u32,
        reserved: 0,
    };
    let mut table = mpc.as_slice().to_vec();
    table.extend_from_slice(&entries);
    mpc.checksum = checksum(&table);

    let mut mpf = MpfIntel {
        signature: *MPF_SIGNATURE,
        physptr: table_addr,
        length: 1, // in 16-byte units
        specification: MPC_SPEC,
        checksum: 0,
        feature: [0; 5], // 0: a configuration table is present
    };
    mpf.checksum = checksum(mpf.as_slice());

    let mut out = mpf.as_slice().to_vec();
    out.extend_from_slice(mpc.as_slice());
    out.extend_from_slice(&entries);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    #[test]
    fn checksums_are_zero_and_lengths_match() {
        for cpus in [1u8, 2, 8, MAX_CPUS] {
            let t = build(0x9fc00, cpus).unwrap();
            assert_eq!(t.len(), size(cpus));
            assert_eq!(&t[0..4], b"_MP_");
            assert_eq!(sum(&t[0..16]), 0);
            assert_eq!(&t[16..20], b"PCMP");
            let len = u16::from_le_bytes([t[20], t[21]]) as usize;
            assert_eq!(len, t.len() - 16);
            assert_eq!(sum(&t[16..]), 0);
            let pointer = u32::from_le_bytes([t[4], t[5], t[6], t[7]]);
            assert_eq!(pointer, 0x9fc00 + 16);
        }
    }

    #[test]
    fn processors_listed_with_one_bsp() {
        let t = build(0, 4).unwrap();
        let entries = &t[16 + 44..];
        let cpus: Vec<&[u8]> = entries.chunks(20).take(4).collect();
        for (i, c) in cpus.iter().enumerate() {
            assert_eq!(c[0], ENTRY_PROCESSOR);
            assert_eq!(c[1] as usize, i);
            assert_eq!(c[3] & CPU_BOOTPROCESSOR != 0, i == 0);
        }
        let count = u16::from_le_bytes([t[16 + 34], t[16 + 35]]);
        assert_eq!(count as usize, 4 + 1 + 1 + 24 + 2);
    }

    #[test]
    fn fits_in_base_memory_for_max_cpus() {
        use crate::arch::layout::MPTABLE_START;
        assert!(MPTABLE_START + size(MAX_CPUS) as u64 <= 0xa0000);
    }

    #[test]
    fn structure_sizes_are_the_specs() {
        assert_eq!(MPF_LEN, 16);
        assert_eq!(MPC_LEN, 44);
        assert_eq!(std::mem::size_of::<MpcCpu>(), 20);
        assert_eq!(std::mem::size_of::<MpcBus>(), 8);
        assert_eq!(std::mem::size_of::<MpcIoapic>(), 8);
        assert_eq!(std::mem::size_of::<MpcIntsrc>(), 8);
    }

    #[test]
    fn rejects_bad_counts() {
        assert_eq!(build(0, 0), Err(Error::CpuCount(0)));
        assert_eq!(build(0, MAX_CPUS + 1), Err(Error::CpuCount(MAX_CPUS + 1)));
    }
}
