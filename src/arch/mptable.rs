//! Intel MultiProcessor Specification 1.4 tables.
//!
//! Without ACPI, this is how Linux learns how many CPUs there are, where
//! the IOAPIC is and how ISA interrupts reach it. vmlab writes the floating
//! pointer and the configuration table into the last KiB of base memory,
//! one of the places Linux scans.

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

/// Size in bytes of the tables for `cpus` vCPUs.
pub fn size(cpus: u8) -> usize {
    16 + 44 + 20 * usize::from(cpus) + 8 + 8 + 8 * (IRQ_MAX as usize + 1) + 8 * 2
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
    let table_addr = base + 16;

    // Floating pointer structure: 16 bytes.
    let mut mpf = Vec::with_capacity(16);
    mpf.extend_from_slice(MPF_SIGNATURE);
    mpf.extend_from_slice(&(table_addr as u32).to_le_bytes());
    mpf.push(1); // length in 16-byte units
    mpf.push(MPC_SPEC);
    mpf.push(0); // checksum, below
    mpf.extend_from_slice(&[0; 5]); // feature bytes: 0 = a table is present
    mpf[10] = checksum(&mpf);

    // Entries after the 44-byte header.
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for id in 0..cpus {
        entries.push(ENTRY_PROCESSOR);
        entries.push(id);
        entries.push(APIC_VERSION);
        entries.push(CPU_ENABLED | if id == 0 { CPU_BOOTPROCESSOR } else { 0 });
        entries.extend_from_slice(&CPU_STEPPING.to_le_bytes());
        entries.extend_from_slice(&(CPU_FEATURE_APIC | CPU_FEATURE_FPU).to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, APIC_VERSION, MP_IOAPIC_USABLE]);
    entries.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    count += 1;
    for irq in 0..=IRQ_MAX as u8 {
        // ISA IRQ n is wired to IOAPIC pin n, matching KVM's default GSI
        // routing.
        entries.push(ENTRY_INTSRC);
        entries.push(MP_INT);
        entries.extend_from_slice(&MP_IRQPOL_DEFAULT.to_le_bytes());
        entries.extend_from_slice(&[0, irq, ioapic_id, irq]);
        count += 1;
    }
    for (kind, lint) in [(MP_EXTINT, 0u8), (MP_NMI, 1u8)] {
        entries.push(ENTRY_LINTSRC);
        entries.push(kind);
        entries.extend_from_slice(&MP_IRQPOL_DEFAULT.to_le_bytes());
        entries.extend_from_slice(&[0, 0, 0xff, lint]); // all local APICs
        count += 1;
    }

    let table_len = 44 + entries.len();
    let mut mpc = Vec::with_capacity(table_len);
    mpc.extend_from_slice(MPC_SIGNATURE);
    mpc.extend_from_slice(&(table_len as u16).to_le_bytes());
    mpc.push(MPC_SPEC);
    mpc.push(0); // checksum, below
    mpc.extend_from_slice(b"VMLAB   "); // OEM id, 8 bytes
    mpc.extend_from_slice(b"MICROVM     "); // product id, 12 bytes
    mpc.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    mpc.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    mpc.extend_from_slice(&count.to_le_bytes());
    mpc.extend_from_slice(&(LAPIC_START as u32).to_le_bytes());
    mpc.extend_from_slice(&0u32.to_le_bytes()); // extended table length + checksum + reserved
    mpc.extend_from_slice(&entries);
    mpc[7] = checksum(&mpc);

    let mut out = mpf;
    out.extend_from_slice(&mpc);
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
    fn rejects_bad_counts() {
        assert_eq!(build(0, 0), Err(Error::CpuCount(0)));
        assert_eq!(build(0, MAX_CPUS + 1), Err(Error::CpuCount(MAX_CPUS + 1)));
    }
}
