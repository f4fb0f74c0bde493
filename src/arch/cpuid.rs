//! Per-vCPU CPUID: KVM's supported set, adjusted so each vCPU reports its
//! own APIC ID and a topology that matches the vCPU count (one socket, one
//! thread per core), and says it runs under a hypervisor.

use kvm_bindings::kvm_cpuid_entry2;

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_PERFMON: u32 = 0xa;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_V2_EXT_TOPOLOGY: u32 = 0x1f;
const LEAF_EXT_POWER_MGMT: u32 = 0x8000_0007;

const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
/// CPUID.80000007H:EDX[8], invariant TSC.
const EDX_INVARIANT_TSC: u32 = 1 << 8;

/// x2APIC topology level types (CPUID.0BH:ECX[15:8]).
const LEVEL_TYPE_INVALID: u32 = 0;
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

/// Number of APIC-ID bits needed for `count` cores.
fn core_id_bits(count: u32) -> u32 {
    if count <= 1 {
        0
    } else {
        32 - (count - 1).leading_zeros()
    }
}

/// Adjusts `entries` (from KVM_GET_SUPPORTED_CPUID) for vCPU `cpu_id` of
/// `cpu_count`.
pub fn adjust_for_vcpu(entries: &mut [kvm_cpuid_entry2], cpu_id: u8, cpu_count: u8) {
    let apic_id = u32::from(cpu_id);
    let count = u32::from(cpu_count.max(1));
    for entry in entries.iter_mut() {
        match entry.function {
            LEAF_FEATURES => {
                // EBX[31:24] initial APIC ID, EBX[23:16] logical processors
                // per package, EBX[15:8] CLFLUSH line size in 8-byte units.
                entry.ebx = (apic_id << 24) | (count << 16) | (8 << 8);
                entry.ecx |= ECX_HYPERVISOR;
                if count > 1 {
                    entry.edx |= EDX_HTT;
                } else {
                    entry.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE_PARAMS => {
                // EAX[31:26]: cores per package - 1; EAX[25:14]: threads
                // sharing this cache - 1 (private to one core here, except
                // the last level, which the package shares).
                let level = (entry.eax >> 5) & 0x7;
                let sharing = if level >= 3 { count - 1 } else { 0 };
                entry.eax &= !(0x3f << 26 | 0xfff << 14);
                entry.eax |= ((count - 1) & 0x3f) << 26 | (sharing & 0xfff) << 14;
            }
            LEAF_PERFMON => {
                // No virtual PMU is set up; say so instead of advertising
                // counters the guest would probe.
                entry.eax = 0;
                entry.ebx = 0;
                entry.ecx = 0;
                entry.edx = 0;
            }
            LEAF_EXT_TOPOLOGY | LEAF_V2_EXT_TOPOLOGY => {
                entry.edx = apic_id;
                match entry.index {
                    0 => {
                        entry.eax = 0; // one thread per core: no SMT bits
                        entry.ebx = 1;
                        entry.ecx = (LEVEL_TYPE_SMT << 8) | entry.index;
                    }
                    1 => {
                        entry.eax = core_id_bits(count);
                        entry.ebx = count;
                        entry.ecx = (LEVEL_TYPE_CORE << 8) | entry.index;
                    }
                    _ => {
                        entry.eax = 0;
                        entry.ebx = 0;
                        entry.ecx = (LEVEL_TYPE_INVALID << 8) | entry.index;
                    }
                }
            }
            LEAF_EXT_POWER_MGMT => {
                // Without "invariant TSC" Linux keeps kvm-clock as its
                // clocksource, which KVM keeps correct across vCPUs, host
                // frequency changes and migration (QEMU also hides it by
                // default). With it, Linux switches to the raw TSC, which on
                // a nested KVM drifts from kvm-clock and stalls timers.
                entry.edx &= !EDX_INVARIANT_TSC;
            }
            _ => {}
        }
    }
}

/// KVM's paravirtual feature leaf.
const LEAF_KVM_FEATURES: u32 = 0x4000_0001;
/// KVM_FEATURE_PV_TLB_FLUSH, KVM_FEATURE_PV_SEND_IPI, KVM_FEATURE_PV_SCHED_YIELD.
const KVM_PV_TLB_IPI_YIELD: u32 = (1 << 9) | (1 << 11) | (1 << 13);

/// Hides KVM's paravirtual TLB flush, IPI and sched-yield features. On a
/// nested `kvm_pvm` host a 2-vCPU Linux guest using them stalled (an RCU
/// stall on CPU 1, then a hang after the NMI backtrace), under QEMU as under
/// vmlab; with them hidden it boots. Applied on such hosts only.
pub fn hide_pv_ipi_features(entries: &mut [kvm_cpuid_entry2]) {
    for entry in entries
        .iter_mut()
        .filter(|e| e.function == LEAF_KVM_FEATURES)
    {
        entry.eax &= !KVM_PV_TLB_IPI_YIELD;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    fn sample() -> Vec<kvm_cpuid_entry2> {
        let mut l4 = entry(LEAF_CACHE_PARAMS, 3);
        l4.eax = (3 << 5) | (0x3f << 26);
        let mut pm = entry(LEAF_PERFMON, 0);
        pm.eax = 0x0803_0404;
        vec![
            entry(0, 0),
            entry(LEAF_FEATURES, 0),
            l4,
            pm,
            entry(LEAF_EXT_TOPOLOGY, 0),
            entry(LEAF_EXT_TOPOLOGY, 1),
            entry(LEAF_EXT_TOPOLOGY, 2),
        ]
    }

    #[test]
    fn apic_id_and_hypervisor_bit() {
        let mut e = sample();
        adjust_for_vcpu(&mut e, 3, 4);
        assert_eq!(e[1].ebx >> 24, 3);
        assert_eq!((e[1].ebx >> 16) & 0xff, 4);
        assert_ne!(e[1].ecx & ECX_HYPERVISOR, 0);
        assert_ne!(e[1].edx & EDX_HTT, 0);
        for t in &e[4..7] {
            assert_eq!(t.edx, 3, "x2APIC id in every topology subleaf");
        }
    }

    #[test]
    fn topology_levels() {
        let mut e = sample();
        adjust_for_vcpu(&mut e, 0, 3);
        assert_eq!((e[4].ecx >> 8) & 0xff, LEVEL_TYPE_SMT);
        assert_eq!(e[4].ebx, 1);
        assert_eq!((e[5].ecx >> 8) & 0xff, LEVEL_TYPE_CORE);
        assert_eq!(e[5].ebx, 3);
        assert_eq!(e[5].eax, 2, "3 cores need 2 APIC-ID bits");
        assert_eq!((e[6].ecx >> 8) & 0xff, LEVEL_TYPE_INVALID);
        assert_eq!(e[6].ecx & 0xff, 2);
    }

    #[test]
    fn single_cpu_has_no_htt_and_cache_leaf_is_consistent() {
        let mut e = sample();
        e[1].edx = EDX_HTT;
        adjust_for_vcpu(&mut e, 0, 1);
        assert_eq!(e[1].edx & EDX_HTT, 0);
        assert_eq!(e[2].eax >> 26, 0);
        assert_eq!(e[3].eax, 0, "perfmon leaf cleared");
    }

    #[test]
    fn invariant_tsc_is_hidden() {
        let mut e = vec![entry(LEAF_EXT_POWER_MGMT, 0)];
        e[0].edx = EDX_INVARIANT_TSC | 1;
        adjust_for_vcpu(&mut e, 0, 1);
        assert_eq!(e[0].edx, 1);
    }

    #[test]
    fn pv_ipi_features_hidden() {
        let mut e = vec![entry(LEAF_KVM_FEATURES, 0), entry(LEAF_FEATURES, 0)];
        e[0].eax = 0xffff_ffff;
        e[1].eax = 0xffff_ffff;
        hide_pv_ipi_features(&mut e);
        assert_eq!(e[0].eax & KVM_PV_TLB_IPI_YIELD, 0);
        assert_eq!(e[0].eax | KVM_PV_TLB_IPI_YIELD, 0xffff_ffff);
        assert_eq!(e[1].eax, 0xffff_ffff, "other leaves untouched");
    }

    #[test]
    fn core_bits() {
        assert_eq!(core_id_bits(1), 0);
        assert_eq!(core_id_bits(2), 1);
        assert_eq!(core_id_bits(4), 2);
        assert_eq!(core_id_bits(5), 3);
        assert_eq!(core_id_bits(254), 8);
    }
}
