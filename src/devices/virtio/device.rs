//! The part of every virtio device that is the same for all of them,
//! written once: offered and accepted features, a read-only configuration
//! space served from bytes, the queue sizes, and the activation and reset
//! bookkeeping with the device's thread.
//!
//! A device type provides a [`DeviceModel`]: its ID, and how to turn the
//! queues the driver configured into a [`DeviceWorker`] for its thread.
//! [`Device`] wraps it into a [`VirtioDevice`] for the transport.

use std::sync::Arc;

use vm_memory::GuestMemoryMmap;

use super::thread::{self, DeviceThread, DeviceWorker};
use super::{read_config_bytes, ActivateError, DeviceQueue, Interrupt, VirtioDevice};

/// What a device type provides (block, net; next vsock, virtio-fs).
pub trait DeviceModel: Send {
    /// Name for logs and the device's thread (at most 15 bytes).
    const NAME: &'static str;

    /// Virtio device ID.
    fn device_type(&self) -> u32;

    /// The driver set DRIVER_OK: builds the worker the device's thread
    /// runs.
    fn start(&mut self, activation: Activation) -> Result<Box<dyn DeviceWorker>, ActivateError>;

    /// The driver reset the running device (its thread is being told).
    fn stopped(&mut self) {}
}

/// What a started device gets.
pub struct Activation {
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// One queue per queue size, event-idx set as negotiated.
    pub queues: Vec<DeviceQueue>,
    /// How the device interrupts the driver.
    pub interrupt: Arc<Interrupt>,
    /// The features the driver accepted.
    pub features: u64,
}

/// A virtio device: a [`DeviceModel`] plus the common state.
pub struct Device<M: DeviceModel> {
    model: M,
    features: u64,
    acked_features: u64,
    config: Vec<u8>,
    queue_sizes: Vec<u16>,
    thread: DeviceThread,
    /// Whether the thread has (or is being sent) an activated worker.
    active: bool,
}

impl<M: DeviceModel> Device<M> {
    /// A device offering `features` with this configuration space and
    /// these queues; starts its thread.
    pub fn new(
        model: M,
        features: u64,
        config: Vec<u8>,
        queue_sizes: Vec<u16>,
    ) -> Result<Device<M>, thread::Error> {
        Ok(Device {
            model,
            features,
            acked_features: 0,
            config,
            queue_sizes,
            thread: DeviceThread::spawn(M::NAME)?,
            active: false,
        })
    }

    /// The device type's own state.
    pub fn model(&self) -> &M {
        &self.model
    }

    /// The device's thread (the device manager stops it at VM exit).
    pub fn thread(&self) -> &DeviceThread {
        &self.thread
    }

    /// The features the driver accepted.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// Whether the driver started the device (and did not reset it).
    pub fn is_active(&self) -> bool {
        self.active
    }
}

impl<M: DeviceModel> VirtioDevice for Device<M> {
    fn device_type(&self) -> u32 {
        self.model.device_type()
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        // No device offers a writable field (virtio-blk's CONFIG_WCE,
        // virtio-net's control queue are not offered).
        log::debug!("{}: ignoring config write at {offset:#x}", M::NAME);
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<DeviceQueue>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), ActivateError> {
        self.reset();
        let worker = self.model.start(Activation {
            mem,
            queues,
            interrupt,
            features: self.acked_features,
        })?;
        self.thread.activate(worker)?;
        self.active = true;
        Ok(())
    }

    fn reset(&mut self) {
        if std::mem::take(&mut self.active) {
            // Returns at once; the thread finishes the request it serves.
            self.thread.reset();
            self.model.stopped();
        }
    }

    fn reset_complete(&self) -> bool {
        self.thread.reset_complete()
    }
}

impl<M: DeviceModel> Drop for Device<M> {
    fn drop(&mut self) {
        // The thread finishes its request, then stops; the device
        // manager's handle of it may outlive the device.
        self.thread.stop();
    }
}
