//! The KVM state of a paused VM: what a vCPU and the in-kernel devices
//! hold that guest memory does not. Saved and restored through the
//! KVM ioctls (kvm-bindings' serde support gives the byte layout), in the
//! orders Firecracker uses: CPUID before MSRs (KVM checks MSRs against
//! CPUID), registers before events, the LAPIC before MP state.
//!
//! A vCPU must be out of KVM_RUN (paused) while it is saved or restored.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
    CpuId, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

use super::Error;

fn kvm(what: &str) -> impl Fn(kvm_ioctls::Error) -> Error + '_ {
    move |source| Error::Kvm {
        what: what.to_string(),
        source,
    }
}

/// One vCPU's state.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct VcpuState {
    /// The CPUID the vCPU was given.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Every MSR KVM lists that the vCPU lets itself be read.
    pub msrs: Vec<kvm_msr_entry>,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers, EFER, APIC base.
    pub sregs: kvm_sregs,
    /// FPU, SSE and extended state (XSAVE area; holds what KVM_GET_FPU
    /// would).
    pub xsave: kvm_xsave,
    /// Extended control registers (XCR0).
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debug_regs: kvm_debugregs,
    /// The local APIC's registers.
    pub lapic: kvm_lapic_state,
    /// Pending exceptions, interrupts, NMIs, SMM state.
    pub events: kvm_vcpu_events,
    /// Running, halted, waiting for INIT/SIPI.
    pub mp_state: kvm_mp_state,
    /// The TSC frequency, where KVM tells it.
    pub tsc_khz: Option<u32>,
}

impl VcpuState {
    /// Reads the state of a paused vCPU.
    pub fn save(kvm_handle: &Kvm, vcpu: &VcpuFd) -> Result<VcpuState, Error> {
        let cpuid = vcpu
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm("KVM_GET_CPUID2"))?
            .as_slice()
            .to_vec();
        Ok(VcpuState {
            cpuid,
            msrs: save_msrs(kvm_handle, vcpu)?,
            regs: vcpu.get_regs().map_err(kvm("KVM_GET_REGS"))?,
            sregs: vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?,
            xsave: vcpu.get_xsave().map_err(kvm("KVM_GET_XSAVE"))?,
            xcrs: vcpu.get_xcrs().map_err(kvm("KVM_GET_XCRS"))?,
            debug_regs: vcpu.get_debug_regs().map_err(kvm("KVM_GET_DEBUGREGS"))?,
            lapic: vcpu.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?,
            events: vcpu.get_vcpu_events().map_err(kvm("KVM_GET_VCPU_EVENTS"))?,
            mp_state: vcpu.get_mp_state().map_err(kvm("KVM_GET_MP_STATE"))?,
            tsc_khz: vcpu.get_tsc_khz().ok(),
        })
    }

    /// Puts a freshly created vCPU in the saved state.
    pub fn restore(&self, vcpu: &VcpuFd) -> Result<(), Error> {
        let cpuid = CpuId::from_entries(&self.cpuid).map_err(|_| Error::Corrupt {
            path: "state".into(),
            why: format!("{} CPUID entries is more than KVM takes", self.cpuid.len()),
        })?;
        vcpu.set_cpuid2(&cpuid).map_err(kvm("KVM_SET_CPUID2"))?;
        if let Some(khz) = self.tsc_khz {
            // A host whose TSC runs at another frequency: let KVM scale
            // the guest's. Not every KVM can; the guest then sees the
            // host's frequency, as after a live migration without scaling.
            if vcpu.get_tsc_khz().ok() != Some(khz) {
                if let Err(e) = vcpu.set_tsc_khz(khz) {
                    log::warn!("snapshot: cannot set the guest TSC to {khz} kHz: {e}");
                }
            }
        }
        vcpu.set_mp_state(self.mp_state)
            .map_err(kvm("KVM_SET_MP_STATE"))?;
        vcpu.set_regs(&self.regs).map_err(kvm("KVM_SET_REGS"))?;
        vcpu.set_sregs(&self.sregs).map_err(kvm("KVM_SET_SREGS"))?;
        // SAFETY: `self.xsave` is a whole kvm_xsave as KVM_GET_XSAVE gave
        // it (the state file's digest was checked), and KVM checks its
        // contents: a bad area fails the ioctl, it cannot corrupt vmlab.
        unsafe { vcpu.set_xsave(&self.xsave) }.map_err(kvm("KVM_SET_XSAVE"))?;
        vcpu.set_xcrs(&self.xcrs).map_err(kvm("KVM_SET_XCRS"))?;
        vcpu.set_debug_regs(&self.debug_regs)
            .map_err(kvm("KVM_SET_DEBUGREGS"))?;
        vcpu.set_lapic(&self.lapic).map_err(kvm("KVM_SET_LAPIC"))?;
        let msrs = Msrs::from_entries(&self.msrs).map_err(|_| Error::Corrupt {
            path: "state".into(),
            why: format!("{} MSRs is more than KVM takes", self.msrs.len()),
        })?;
        let set = vcpu.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
        if set != self.msrs.len() {
            let index = self.msrs.get(set).map(|m| m.index).unwrap_or_default();
            return Err(Error::Incompatible {
                path: "state".into(),
                why: format!("this host's KVM refuses MSR {index:#x} of the snapshot"),
            });
        }
        vcpu.set_vcpu_events(&self.events)
            .map_err(kvm("KVM_SET_VCPU_EVENTS"))?;
        // Tell the guest's kvm-clock that the vCPU was stopped, so its
        // watchdogs do not report the pause as a lockup. A guest that does
        // not use kvm-clock makes KVM refuse this; nothing to tell it then.
        let _ = vcpu.kvmclock_ctrl();
        Ok(())
    }
}

/// Reads every MSR of KVM's index list that this vCPU returns. KVM stops
/// at the first MSR it cannot read; that one is left out and the rest are
/// read on.
fn save_msrs(kvm_handle: &Kvm, vcpu: &VcpuFd) -> Result<Vec<kvm_msr_entry>, Error> {
    let list = kvm_handle
        .get_msr_index_list()
        .map_err(kvm("KVM_GET_MSR_INDEX_LIST"))?;
    let mut pending: Vec<kvm_msr_entry> = list
        .as_slice()
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    let mut saved = Vec::with_capacity(pending.len());
    while !pending.is_empty() {
        let mut msrs = Msrs::from_entries(&pending)
            .map_err(|_| Error::Memory("too many MSRs for one KVM_GET_MSRS".into()))?;
        let read = vcpu.get_msrs(&mut msrs).map_err(kvm("KVM_GET_MSRS"))?;
        saved.extend_from_slice(&msrs.as_slice()[..read]);
        // Skip the one KVM could not read.
        pending.drain(..(read + 1).min(pending.len()));
    }
    Ok(saved)
}

/// The VM's in-kernel devices and clock.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct VmState {
    /// The master 8259 PIC.
    pub pic_master: kvm_irqchip,
    /// The slave 8259 PIC.
    pub pic_slave: kvm_irqchip,
    /// The IOAPIC.
    pub ioapic: kvm_irqchip,
    /// The 8254 PIT.
    pub pit: kvm_pit_state2,
    /// kvm-clock.
    pub clock: kvm_clock_data,
}

impl VmState {
    /// Reads the state of a VM whose vCPUs are paused.
    pub fn save(vm: &VmFd) -> Result<VmState, Error> {
        let chip = |id: u32, what: &str| -> Result<kvm_irqchip, Error> {
            let mut c = kvm_irqchip {
                chip_id: id,
                ..Default::default()
            };
            vm.get_irqchip(&mut c).map_err(kvm(what))?;
            Ok(c)
        };
        let mut clock = vm.get_clock().map_err(kvm("KVM_GET_CLOCK"))?;
        // Only the time itself is restored.
        clock.flags = 0;
        Ok(VmState {
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER, "KVM_GET_IRQCHIP (PIC master)")?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE, "KVM_GET_IRQCHIP (PIC slave)")?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC, "KVM_GET_IRQCHIP (IOAPIC)")?,
            pit: vm.get_pit2().map_err(kvm("KVM_GET_PIT2"))?,
            clock,
        })
    }

    /// Puts a freshly created VM (irqchip and PIT created, no vCPU run
    /// yet) in the saved state; kvm-clock goes on `elapsed_ns` after the
    /// saved time, so the guest sees the time that passed since.
    pub fn restore(&self, vm: &VmFd, elapsed_ns: u64) -> Result<(), Error> {
        vm.set_pit2(&self.pit).map_err(kvm("KVM_SET_PIT2"))?;
        let mut clock = self.clock;
        clock.clock = clock.clock.saturating_add(elapsed_ns);
        clock.flags = 0;
        vm.set_clock(&clock).map_err(kvm("KVM_SET_CLOCK"))?;
        vm.set_irqchip(&self.pic_master)
            .map_err(kvm("KVM_SET_IRQCHIP (PIC master)"))?;
        vm.set_irqchip(&self.pic_slave)
            .map_err(kvm("KVM_SET_IRQCHIP (PIC slave)"))?;
        vm.set_irqchip(&self.ioapic)
            .map_err(kvm("KVM_SET_IRQCHIP (IOAPIC)"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vcpu_state_serialises_as_bytes_and_back() {
        let mut s = VcpuState::default();
        s.regs.rip = 0x1234;
        s.sregs.cr3 = 0x9000;
        s.msrs.push(kvm_msr_entry {
            index: 0x10,
            data: 99,
            ..Default::default()
        });
        s.tsc_khz = Some(2_000_000);
        let json = serde_json::to_string(&s).unwrap();
        let back: VcpuState = serde_json::from_str(&json).unwrap();
        assert_eq!(serde_json::to_string(&back).unwrap(), json);
        assert_eq!(back.regs.rip, 0x1234);
        assert_eq!(back.msrs[0].data, 99);
        let _: kvm_sregs = back.sregs;
    }
}
