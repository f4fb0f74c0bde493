//! Emulated devices and the buses that route guest accesses to them.
//!
//! A vCPU thread that exits on a port or MMIO access looks the address up
//! on a [`Bus`] and calls the device's `read`/`write` with the offset into
//! its range. Devices that need work beyond answering the access (virtio
//! queues, console input) do it on their own threads, not on the vCPU thread.

pub mod bus;
pub mod console;
pub mod i8042;
pub mod serial;
pub mod status;
pub mod tap;
pub mod virtio;

pub use bus::{Bus, BusDevice};
