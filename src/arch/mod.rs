//! x86_64 machine definition: where things live in guest memory and how a
//! vCPU is put into 64-bit long mode at the kernel's entry point.
//!
//! Everything here is pure computation on byte buffers and KVM structures,
//! so it is unit-tested without `/dev/kvm`.

pub mod cpuid;
pub mod gdt;
pub mod layout;
pub mod mptable;
pub mod paging;
pub mod regs;
