//! vmlab: a micro-VM monitor on Linux KVM.
//!
//! Where things are:
//! - [`cli`]: the command line.
//! - [`run`]: `vmlab run`, the library entry point of the binary's run.
//! - [`vm`]: building a VM from its configuration and running it (the boot
//!   path, top to bottom, is `Vm::build`).
//! - [`vcpu`]: vCPU threads and VM-exit handling.
//! - [`arch`]: x86_64 memory map, page tables, GDT, CPUID, MP table.
//! - [`boot`]: loading the kernel and initrd, boot_params.
//! - [`cmdline`]: the guest kernel command line.
//! - [`container`]: `vmlab container`, the same image under an OCI runtime.
//! - [`compare`]: `vmlab compare`, the same workload on the host, in a
//!   container and in a micro-VM, measured side by side.
//! - [`devices`]: the emulated devices, one file each.
//! - [`emulate`]: user-space emulation of instructions a nested KVM rejects.
//! - [`host`]: host detection and the workarounds a nested KVM needs.
//! - [`rate_limiter`]: token buckets (bandwidth, operations) for device I/O.
//! - [`untrusted`]: reading files out of images and making private
//!   scratch directories without trusting their contents or `/tmp`.

pub mod agent;
pub mod arch;
pub mod boot;
pub mod cli;
pub mod cmdline;
pub mod compare;
pub mod container;
pub mod control;
pub mod device_manager;
pub mod devices;
pub mod emulate;
pub mod host;
pub mod image;
pub mod instances;
pub mod named;
pub mod oci;
pub mod profile;
pub mod rate_limiter;
pub mod raw;
pub mod run;
pub mod signals;
pub mod snapshot;
pub mod stats;
pub mod terminal;
pub mod trace;
pub mod untrusted;
pub mod vcpu;
pub mod vm;
pub mod volumes;

/// virtio-vsock: the device, and [`vsock::connect`] for host programs.
pub use devices::virtio::vsock;
