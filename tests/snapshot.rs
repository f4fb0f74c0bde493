//! Snapshot state on real KVM (`vmlab::snapshot`): a guest counting in
//! memory is paused mid-way, its vCPU, VM and memory state saved; the
//! same guest and two VMs restored from the snapshot then count on
//! identically, each in memory of its own.
//!
//! The guest, in real mode at 0x1000 (bytes below, GNU as source in the
//! comments): `1: mov ax, [0x2000]; inc ax; mov [0x2000], ax; out 0x10, ax;
//! jmp 1b`. Every `out` is an exit with the new count.

use std::path::PathBuf;

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use vmlab::snapshot::{memory, CpuModel, Snapshot, VcpuState, VmState, FORMAT_VERSION};

const MEM: u64 = 32 << 20;
const CODE: u64 = 0x1000;
const COUNTER: u64 = 0x2000;
const PORT: u16 = 0x10;
const GUEST: &[u8] = &[
    0xa1, 0x00, 0x20, // mov ax, [0x2000]
    0x40, //             inc ax
    0xa3, 0x00, 0x20, // mov [0x2000], ax
    0xe7, 0x10, //       out 0x10, ax
    0xeb, 0xf5, //       jmp back to the start
];

struct Machine {
    _vm: VmFd,
    vcpu: VcpuFd,
    mem: GuestMemoryMmap,
}

fn kvm_or_skip() -> Option<Kvm> {
    match Kvm::new() {
        Ok(k) => Some(k),
        Err(e) => {
            assert!(
                std::env::var_os("VMLAB_SKIP_KVM_TESTS").is_some(),
                "/dev/kvm is needed: {e} (VMLAB_SKIP_KVM_TESTS=1 to skip)"
            );
            eprintln!("skipped: no /dev/kvm ({e})");
            None
        }
    }
}

/// A VM with vmlab's machine (irqchip, PIT) around `mem`; with `state`,
/// restored from it, else started fresh at the guest's first instruction.
fn machine(kvm: &Kvm, mem: GuestMemoryMmap, state: Option<(&VmState, &VcpuState)>) -> Machine {
    let vm = kvm.create_vm().unwrap();
    for (slot, region) in mem.iter().enumerate() {
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
            flags: 0,
        };
        // SAFETY: the region stays mapped for the VM's life (`Machine`
        // owns both, and the VM is dropped first).
        unsafe { vm.set_user_memory_region(r) }.unwrap();
    }
    vm.set_tss_address(0xfffb_d000).unwrap();
    vm.create_irq_chip().unwrap();
    vm.create_pit2(kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    })
    .unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    match state {
        Some((vm_state, vcpu_state)) => {
            vm_state.restore(&vm, 0).unwrap();
            vcpu_state.restore(&vcpu).unwrap();
        }
        None => {
            let cpuid = kvm
                .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
                .unwrap();
            vcpu.set_cpuid2(&cpuid).unwrap();
            let mut sregs = vcpu.get_sregs().unwrap();
            sregs.cs.base = 0;
            sregs.cs.selector = 0;
            vcpu.set_sregs(&sregs).unwrap();
            let mut regs = vcpu.get_regs().unwrap();
            regs.rip = CODE;
            regs.rflags = 2;
            vcpu.set_regs(&regs).unwrap();
        }
    }
    Machine { _vm: vm, vcpu, mem }
}

/// The next `n` counts the guest reports.
fn counts(m: &mut Machine, n: usize) -> Vec<u16> {
    let mut seen = Vec::new();
    let mut exits = 0;
    while seen.len() < n {
        exits += 1;
        assert!(
            exits < 10 * n + 100,
            "the guest stopped reporting: {seen:?}"
        );
        match m.vcpu.run().unwrap() {
            VcpuExit::IoOut(PORT, data) => seen.push(u16::from_le_bytes([data[0], data[1]])),
            VcpuExit::IoOut(..) | VcpuExit::IoIn(..) => {}
            other => panic!("unexpected exit {other:?}"),
        }
    }
    seen
}

fn scratch() -> PathBuf {
    let d = std::env::temp_dir().join(format!("vmlab-snapshot-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn a_paused_guest_restores_and_counts_on_in_two_vms_at_once() {
    let Some(kvm) = kvm_or_skip() else { return };
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap();
    mem.write_slice(GUEST, GuestAddress(CODE)).unwrap();
    let mut a = machine(&kvm, mem, None);
    assert_eq!(counts(&mut a, 20), (1..=20).collect::<Vec<u16>>());

    // Paused (out of KVM_RUN): save everything.
    let dir = scratch();
    let snapshot = Snapshot {
        format: FORMAT_VERSION,
        vmlab_version: env!("CARGO_PKG_VERSION").into(),
        cpu: CpuModel::host(),
        mem_size: MEM,
        taken_unix_ns: 0,
        vcpus: vec![VcpuState::save(&kvm, &a.vcpu).unwrap()],
        vm: VmState::save(&a._vm).unwrap(),
        devices: Default::default(),
    };
    assert!(!snapshot.vcpus[0].msrs.is_empty(), "MSRs are saved");
    let stats = memory::save(&a.mem, MEM, &dir.join(memory_file())).unwrap();
    assert!(stats.written >= 2 && stats.written < 16, "{stats:?}");
    snapshot.write(&dir).unwrap();

    // The original goes on...
    let expected = counts(&mut a, 20);
    assert_eq!(expected, (21..=40).collect::<Vec<u16>>());
    drop(a);

    // ...and so do two VMs restored from the snapshot, independently.
    let back = Snapshot::read(&dir).unwrap();
    back.check_compatible(&dir, Some(MEM)).unwrap();
    let restore = || {
        let mem = memory::map(&dir.join(memory_file()), back.mem_size).unwrap();
        machine(&kvm, mem, Some((&back.vm, &back.vcpus[0])))
    };
    let mut b = restore();
    let mut c = restore();
    assert_eq!(
        counts(&mut b, 20),
        expected,
        "restored guest continues where it was"
    );
    assert_eq!(
        counts(&mut c, 5),
        expected[..5],
        "a second restore starts at the snapshot"
    );
    let mut word = [0u8; 2];
    b.mem.read_slice(&mut word, GuestAddress(COUNTER)).unwrap();
    assert_eq!(u16::from_le_bytes(word), 40);
    c.mem.read_slice(&mut word, GuestAddress(COUNTER)).unwrap();
    assert_eq!(
        u16::from_le_bytes(word),
        25,
        "each restored VM has memory of its own"
    );
    let file = std::fs::read(dir.join(memory_file())).unwrap();
    assert_eq!(
        u16::from_le_bytes([file[COUNTER as usize], file[COUNTER as usize + 1]]),
        20,
        "restored VMs never write the snapshot"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

fn memory_file() -> &'static str {
    vmlab::snapshot::MEMORY_FILE
}
