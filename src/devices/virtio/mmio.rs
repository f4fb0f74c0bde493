//! The virtio-mmio transport, version 2 ("modern") only (virtio 1.x 4.2).
//!
//! The guest finds the device through `virtio_mmio.device=` on its kernel
//! command line ([`kernel_cmdline_device`]) and drives it through a 4 KiB
//! register window: 32-bit registers below 0x100, the device's
//! configuration space from 0x100. Every access arrives on a vCPU thread;
//! none of them does I/O. Queue notifications do not even get here: KVM
//! turns a write of the queue index to QueueNotify into a signal on that
//! queue's eventfd (ioeventfd), which the device's thread serves.
//!
//! The status register follows the driver initialization sequence
//! (virtio 1.x 3.1.1): ACKNOWLEDGE, DRIVER, FEATURES_OK (kept only if the
//! driver accepted nothing the device did not offer, and accepted
//! VIRTIO_F_VERSION_1), DRIVER_OK, which starts the device. Writing 0
//! resets everything. Out-of-order or malformed accesses are ignored
//! (logged at debug level): a guest must not be able to disturb the host
//! by writing nonsense.

use std::sync::Arc;

use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::queue::LogLimit;
use super::{
    feature, status, DeviceQueue, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
};
use crate::devices::BusDevice;

/// Size of a device's register window.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;
/// "virt", little-endian.
pub const MAGIC_VALUE: u32 = 0x7472_6976;
/// The modern virtio-mmio layout.
pub const VERSION: u32 = 2;
/// "vmlb", little-endian: any value works, the guest only prints it.
pub const VENDOR_ID: u32 = u32::from_le_bytes(*b"vmlb");

const MAGIC_VALUE_OFFSET: u64 = 0x000;
const VERSION_OFFSET: u64 = 0x004;
const DEVICE_ID_OFFSET: u64 = 0x008;
const VENDOR_ID_OFFSET: u64 = 0x00c;
const DEVICE_FEATURES_OFFSET: u64 = 0x010;
const DEVICE_FEATURES_SEL_OFFSET: u64 = 0x014;
const DRIVER_FEATURES_OFFSET: u64 = 0x020;
const DRIVER_FEATURES_SEL_OFFSET: u64 = 0x024;
const QUEUE_SEL_OFFSET: u64 = 0x030;
const QUEUE_NUM_MAX_OFFSET: u64 = 0x034;
const QUEUE_NUM_OFFSET: u64 = 0x038;
const QUEUE_READY_OFFSET: u64 = 0x044;
/// QueueNotify: where the VMM registers each queue's ioeventfd.
pub const QUEUE_NOTIFY_OFFSET: u64 = 0x050;
const INTERRUPT_STATUS_OFFSET: u64 = 0x060;
const INTERRUPT_ACK_OFFSET: u64 = 0x064;
/// Status: the driver's initialization steps; 0 resets the device.
pub const STATUS_OFFSET: u64 = 0x070;
const QUEUE_DESC_LOW_OFFSET: u64 = 0x080;
const QUEUE_DESC_HIGH_OFFSET: u64 = 0x084;
const QUEUE_DRIVER_LOW_OFFSET: u64 = 0x090;
const QUEUE_DRIVER_HIGH_OFFSET: u64 = 0x094;
const QUEUE_DEVICE_LOW_OFFSET: u64 = 0x0a0;
const QUEUE_DEVICE_HIGH_OFFSET: u64 = 0x0a4;
const SHM_SEL_OFFSET: u64 = 0x0ac;
const SHM_LEN_LOW_OFFSET: u64 = 0x0b0;
const SHM_LEN_HIGH_OFFSET: u64 = 0x0b4;
const SHM_BASE_LOW_OFFSET: u64 = 0x0b8;
const SHM_BASE_HIGH_OFFSET: u64 = 0x0bc;
const CONFIG_GENERATION_OFFSET: u64 = 0x0fc;
/// Start of the device-specific configuration space.
pub const CONFIG_OFFSET: u64 = 0x100;

/// Status bits the driver may write; DEVICE_NEEDS_RESET is the device's.
const DRIVER_STATUS_BITS: u32 =
    status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK | status::FAILED;

/// The kernel command-line parameter that tells Linux about a
/// virtio-mmio device: `virtio_mmio.device=4K@0xd0000000:5`.
pub fn kernel_cmdline_device(base: u64, size: u64, irq: u32) -> String {
    let size = if size != 0 && size.is_multiple_of(1 << 20) {
        format!("{}M", size >> 20)
    } else if size != 0 && size.is_multiple_of(1 << 10) {
        format!("{}K", size >> 10)
    } else {
        size.to_string()
    };
    format!("virtio_mmio.device={size}@{base:#x}:{irq}")
}

/// What the driver wrote for one queue. Kept raw and validated only at
/// DRIVER_OK, so that the order in which the driver writes the halves of
/// an address does not matter.
#[derive(Debug, Clone, Copy)]
struct QueueRegs {
    max_size: u16,
    size: u32,
    ready: bool,
    desc: u64,
    avail: u64,
    used: u64,
}

impl QueueRegs {
    fn new(max_size: u16) -> Self {
        QueueRegs {
            max_size,
            size: u32::from(max_size),
            ready: false,
            desc: 0,
            avail: 0,
            used: 0,
        }
    }

    /// The queue these registers describe, checked against guest memory.
    fn build(
        &self,
        index: usize,
        event_idx: bool,
        mem: &GuestMemoryMmap,
    ) -> Result<Queue, super::ActivateError> {
        use super::ActivateError;
        if !self.ready {
            // An unused queue: the device sees `ready() == false`.
            return Queue::new(self.max_size)
                .map_err(|source| ActivateError::QueueConfig { index, source });
        }
        let size = u16::try_from(self.size).map_err(|_| ActivateError::QueueSize {
            index,
            size: self.size,
        })?;
        if size == 0 || !size.is_power_of_two() || size > self.max_size {
            return Err(ActivateError::QueueSize {
                index,
                size: self.size,
            });
        }
        // virtio-queue treats an available ring at address 0 as "not set
        // up" and would silently never serve the queue.
        if self.avail == 0 {
            return Err(ActivateError::QueueOutsideMemory { index });
        }
        let queue = Queue::try_from(QueueState {
            max_size: self.max_size,
            next_avail: 0,
            next_used: 0,
            event_idx_enabled: event_idx,
            size,
            ready: true,
            desc_table: self.desc,
            avail_ring: self.avail,
            used_ring: self.used,
        })
        .map_err(|source| ActivateError::QueueConfig { index, source })?;
        if !queue.is_valid(mem) {
            return Err(ActivateError::QueueOutsideMemory { index });
        }
        Ok(queue)
    }
}

/// A virtio device behind a virtio-mmio register window.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    notify: Vec<Arc<EventFd>>,
    queues: Vec<QueueRegs>,
    /// Driver-visible status, without DEVICE_NEEDS_RESET (in `interrupt`).
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    /// The driver set a bit in a feature page past the 64 bits that exist.
    driver_features_beyond_64: bool,
    queue_sel: u32,
    config_generation: u32,
    active: bool,
    /// A reset the device's thread has not finished yet: the Status value
    /// the driver reads until then (non-zero, so it waits).
    reset_pending: Option<u32>,
    /// Refused features and activations: a driver that retries in a loop
    /// gets one log line at warn level, the rest are counted.
    problems: LogLimit,
}

impl MmioTransport {
    /// A transport for `device`, raising its interrupt through `irq`.
    /// Creates one notification eventfd per queue.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        irq: EventFd,
    ) -> std::io::Result<MmioTransport> {
        let queues: Vec<QueueRegs> = device
            .queue_max_sizes()
            .iter()
            .map(|&max| QueueRegs::new(max))
            .collect();
        let notify = queues
            .iter()
            .map(|_| EventFd::new(EFD_NONBLOCK).map(Arc::new))
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(MmioTransport {
            device,
            mem,
            interrupt: Arc::new(Interrupt::new(irq)),
            notify,
            queues,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            driver_features_beyond_64: false,
            queue_sel: 0,
            config_generation: 0,
            active: false,
            reset_pending: None,
            problems: LogLimit::default(),
        })
    }

    /// Duplicates of the queue notification eventfds with their queue
    /// index, for KVM ioeventfd registration (datamatch = index, as u32).
    pub fn notify_fds(&self) -> std::io::Result<Vec<(EventFd, u32)>> {
        self.notify
            .iter()
            .zip(0u32..)
            .map(|(fd, index)| Ok((fd.try_clone()?, index)))
            .collect()
    }

    /// The device's interrupt state.
    pub fn interrupt(&self) -> &Arc<Interrupt> {
        &self.interrupt
    }

    /// The Status register as the driver reads it.
    pub fn status(&self) -> u32 {
        if let Some(status) = self.reset_pending {
            return status;
        }
        if self.interrupt.needs_reset() {
            self.status | status::DEVICE_NEEDS_RESET
        } else {
            self.status
        }
    }

    /// Whether the device is running (DRIVER_OK accepted).
    pub fn is_active(&self) -> bool {
        self.active
    }

    /// The device model.
    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    /// Announces a change of the configuration space (e.g. a resized
    /// disk): bumps ConfigGeneration and interrupts the driver.
    pub fn config_changed(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        self.interrupt.signal_config_change();
    }

    fn selected_queue(&mut self) -> Option<&mut QueueRegs> {
        let index = usize::try_from(self.queue_sel).ok()?;
        self.queues.get_mut(index)
    }

    /// Queue registers may change only between FEATURES_OK and DRIVER_OK.
    fn queue_config_allowed(&self) -> bool {
        self.status & (status::FEATURES_OK | status::DRIVER_OK | status::FAILED)
            == status::FEATURES_OK
    }

    fn read_register(&self, offset: u64) -> u32 {
        let queue = usize::try_from(self.queue_sel)
            .ok()
            .and_then(|i| self.queues.get(i));
        match offset {
            MAGIC_VALUE_OFFSET => MAGIC_VALUE,
            VERSION_OFFSET => VERSION,
            DEVICE_ID_OFFSET => self.device.device_type(),
            VENDOR_ID_OFFSET => VENDOR_ID,
            DEVICE_FEATURES_OFFSET => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            // A queue that does not exist has QueueNumMax 0: the driver
            // then knows not to use it.
            QUEUE_NUM_MAX_OFFSET => queue.map_or(0, |q| u32::from(q.max_size)),
            QUEUE_READY_OFFSET => queue.map_or(0, |q| u32::from(q.ready)),
            INTERRUPT_STATUS_OFFSET => self.interrupt.status(),
            STATUS_OFFSET => self.status(),
            // No shared memory regions: their length reads as -1.
            SHM_LEN_LOW_OFFSET | SHM_LEN_HIGH_OFFSET | SHM_BASE_LOW_OFFSET
            | SHM_BASE_HIGH_OFFSET => u32::MAX,
            CONFIG_GENERATION_OFFSET => self.config_generation,
            _ => {
                log::debug!("virtio-mmio: read of write-only or unknown register {offset:#x}");
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            DEVICE_FEATURES_SEL_OFFSET => self.device_features_sel = value,
            DRIVER_FEATURES_SEL_OFFSET => self.driver_features_sel = value,
            DRIVER_FEATURES_OFFSET => self.write_driver_features(value),
            QUEUE_SEL_OFFSET => self.queue_sel = value,
            QUEUE_NUM_OFFSET
            | QUEUE_READY_OFFSET
            | QUEUE_DESC_LOW_OFFSET
            | QUEUE_DESC_HIGH_OFFSET
            | QUEUE_DRIVER_LOW_OFFSET
            | QUEUE_DRIVER_HIGH_OFFSET
            | QUEUE_DEVICE_LOW_OFFSET
            | QUEUE_DEVICE_HIGH_OFFSET => self.write_queue_register(offset, value),
            QUEUE_NOTIFY_OFFSET => self.notify_queue(value),
            INTERRUPT_ACK_OFFSET => self.interrupt.ack(value),
            STATUS_OFFSET => self.write_status(value),
            SHM_SEL_OFFSET => {}
            _ => log::debug!(
                "virtio-mmio: write {value:#x} to read-only or unknown register {offset:#x}"
            ),
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        if self.status & (status::DRIVER | status::FEATURES_OK | status::FAILED) != status::DRIVER {
            log::debug!(
                "virtio-mmio: driver features written in status {:#x}",
                self.status
            );
            return;
        }
        match self.driver_features_sel {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(value),
            1 => {
                self.driver_features =
                    (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
            }
            // Bits no device offers: remember them so FEATURES_OK fails.
            _ => self.driver_features_beyond_64 |= value != 0,
        }
    }

    fn write_queue_register(&mut self, offset: u64, value: u32) {
        if !self.queue_config_allowed() {
            log::debug!(
                "virtio-mmio: queue register {offset:#x} written in status {:#x}",
                self.status
            );
            return;
        }
        let Some(queue) = self.selected_queue() else {
            log::debug!("virtio-mmio: queue register {offset:#x} written for a missing queue");
            return;
        };
        let low = |addr: u64| (addr & !0xffff_ffff) | u64::from(value);
        let high = |addr: u64| (addr & 0xffff_ffff) | (u64::from(value) << 32);
        match offset {
            QUEUE_NUM_OFFSET => queue.size = value,
            QUEUE_READY_OFFSET => queue.ready = value != 0,
            QUEUE_DESC_LOW_OFFSET => queue.desc = low(queue.desc),
            QUEUE_DESC_HIGH_OFFSET => queue.desc = high(queue.desc),
            QUEUE_DRIVER_LOW_OFFSET => queue.avail = low(queue.avail),
            QUEUE_DRIVER_HIGH_OFFSET => queue.avail = high(queue.avail),
            QUEUE_DEVICE_LOW_OFFSET => queue.used = low(queue.used),
            QUEUE_DEVICE_HIGH_OFFSET => queue.used = high(queue.used),
            _ => {}
        }
    }

    /// A QueueNotify write that KVM's ioeventfd did not take (no ioeventfd
    /// registered, or a write it does not match): signal the same eventfd
    /// so the device's thread does the work, never this vCPU.
    fn notify_queue(&mut self, index: u32) {
        let fd = usize::try_from(index).ok().and_then(|i| self.notify.get(i));
        match fd {
            Some(fd) => {
                if let Err(e) = fd.write(1) {
                    log::debug!("virtio-mmio: cannot signal queue {index}: {e}");
                }
            }
            None => log::debug!("virtio-mmio: notify for missing queue {index}"),
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        self.poll_reset();
        if self.reset_pending.is_some() {
            log::debug!(
                "virtio-mmio: status {value:#x} written before the reset completed (Status \
                 still reads non-zero); ignored"
            );
            return;
        }
        let value = value & DRIVER_STATUS_BITS;
        if value & self.status != self.status {
            log::debug!(
                "virtio-mmio: driver cleared status bits ({:#x} -> {value:#x}) without a reset",
                self.status
            );
            return;
        }
        let added = value & !self.status;
        // Each step requires exactly the ones before it, so a driver may
        // set several at once but never skip one.
        const STEPS: [(u32, u32); 4] = [
            (status::ACKNOWLEDGE, 0),
            (status::DRIVER, status::ACKNOWLEDGE),
            (status::FEATURES_OK, status::ACKNOWLEDGE | status::DRIVER),
            (
                status::DRIVER_OK,
                status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
            ),
        ];
        for (bit, required) in STEPS {
            if added & bit == 0 {
                continue;
            }
            if self.status != required {
                log::debug!(
                    "virtio-mmio: status bit {bit:#x} set out of order (status {:#x})",
                    self.status
                );
                break;
            }
            match bit {
                status::FEATURES_OK => {
                    if !self.features_acceptable() {
                        // FEATURES_OK stays clear: the driver reads it back
                        // and gives up on the device.
                        break;
                    }
                    self.status |= bit;
                }
                status::DRIVER_OK => {
                    self.status |= bit;
                    self.activate();
                }
                _ => self.status |= bit,
            }
        }
        if added & status::FAILED != 0 {
            log::debug!("virtio-mmio: the driver marked the device FAILED");
            self.status |= status::FAILED;
        }
    }

    fn features_acceptable(&self) -> bool {
        let offered = self.device.features();
        let unoffered = self.driver_features & !offered;
        if unoffered != 0 || self.driver_features_beyond_64 {
            self.problems.report(format_args!(
                "virtio-mmio: the driver accepted features the device does not offer \
                 ({unoffered:#x}); refusing FEATURES_OK"
            ));
            return false;
        }
        if self.driver_features & feature(VIRTIO_F_VERSION_1) == 0 {
            self.problems.report(format_args!(
                "virtio-mmio: the driver did not accept VIRTIO_F_VERSION_1 (a legacy driver?); \
                 refusing FEATURES_OK"
            ));
            return false;
        }
        true
    }

    fn activate(&mut self) {
        let event_idx = self.driver_features & feature(VIRTIO_RING_F_EVENT_IDX) != 0;
        let queues: Result<Vec<DeviceQueue>, _> = self
            .queues
            .iter()
            .zip(&self.notify)
            .enumerate()
            .map(|(index, (regs, notify))| {
                Ok(DeviceQueue {
                    queue: regs.build(index, event_idx, &self.mem)?,
                    notify: notify.clone(),
                })
            })
            .collect();
        self.device.ack_features(self.driver_features);
        let result = queues.and_then(|queues| {
            self.device
                .activate(self.mem.clone(), queues, self.interrupt.clone())
        });
        match result {
            Ok(()) => self.active = true,
            Err(e) => {
                self.problems.report(format_args!(
                    "virtio device type {}: cannot start: {e}",
                    self.device.device_type()
                ));
                self.interrupt.signal_needs_reset();
            }
        }
    }

    /// The driver wrote 0 to Status. The transport's registers reset at
    /// once; the device's thread finishes (or abandons) the request it
    /// serves and drops the queues on its own time, and Status reads
    /// non-zero until it has (virtio 1.2 2.4: the driver waits for 0), so
    /// the vCPU never waits for device I/O.
    fn reset(&mut self) {
        let before = self.status();
        if self.reset_pending.is_none() {
            self.device.reset();
        }
        self.active = false;
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.driver_features_beyond_64 = false;
        self.queue_sel = 0;
        for q in &mut self.queues {
            *q = QueueRegs::new(q.max_size);
        }
        if self.reset_pending.is_none() && !self.device.reset_complete() {
            self.reset_pending = Some(if before == 0 {
                status::ACKNOWLEDGE
            } else {
                before
            });
        }
        self.reset_pending.get_or_insert(0);
        self.poll_reset();
    }

    /// Finishes a pending reset once the device reports it complete.
    fn poll_reset(&mut self) {
        if self.reset_pending.is_none() || !self.device.reset_complete() {
            return;
        }
        self.reset_pending = None;
        // The old queues' interrupts and notifications, raised while the
        // thread finished its last request, are forgotten.
        self.interrupt.reset();
        for fd in &self.notify {
            let _ = fd.read();
        }
    }

    /// Problems the driver caused (refused features, refused
    /// activations) so far.
    pub fn problems(&self) -> u64 {
        self.problems.count()
    }

    /// Whether a reset is still waiting for the device's thread.
    pub fn reset_pending(&self) -> bool {
        self.reset_pending.is_some()
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if self.reset_pending.is_some() {
            self.poll_reset();
        }
        if offset >= CONFIG_OFFSET {
            if matches!(data.len(), 1 | 2 | 4 | 8) {
                self.device.read_config(offset - CONFIG_OFFSET, data);
            } else {
                data.fill(0);
            }
            return;
        }
        let len = data.len();
        match <&mut [u8; 4]>::try_from(&mut *data) {
            Ok(bytes) => *bytes = self.read_register(offset).to_le_bytes(),
            Err(_) => {
                log::debug!("virtio-mmio: {len}-byte register read at {offset:#x}");
                data.fill(0);
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_OFFSET {
            if matches!(data.len(), 1 | 2 | 4 | 8) {
                self.device.write_config(offset - CONFIG_OFFSET, data);
            }
            return;
        }
        match <[u8; 4]>::try_from(data) {
            Ok(bytes) => self.write_register(offset, u32::from_le_bytes(bytes)),
            Err(_) => log::debug!(
                "virtio-mmio: {}-byte register write at {offset:#x} ignored",
                data.len()
            ),
        }
    }
}

/// The driver side of the register window, for tests: through a
/// transport directly, or through the MMIO bus as a vCPU reaches it.
#[cfg(test)]
pub(crate) mod test_driver {
    use super::*;
    use crate::devices::Bus;

    /// Status with every initialization step done.
    pub(crate) const ALL: u32 =
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;

    /// 32-bit register access and the driver's initialization steps.
    pub(crate) trait Registers {
        fn r32(&mut self, offset: u64) -> u32;
        fn w32(&mut self, offset: u64, value: u32);

        /// ACKNOWLEDGE, DRIVER, the driver features, FEATURES_OK.
        fn negotiate(&mut self, low: u32, high: u32) {
            self.w32(STATUS_OFFSET, status::ACKNOWLEDGE);
            self.w32(STATUS_OFFSET, status::ACKNOWLEDGE | status::DRIVER);
            self.w32(DRIVER_FEATURES_SEL_OFFSET, 0);
            self.w32(DRIVER_FEATURES_OFFSET, low);
            self.w32(DRIVER_FEATURES_SEL_OFFSET, 1);
            self.w32(DRIVER_FEATURES_OFFSET, high);
            self.w32(
                STATUS_OFFSET,
                status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
            );
        }

        /// Accepts every offered feature.
        fn negotiate_offered(&mut self) {
            self.w32(DEVICE_FEATURES_SEL_OFFSET, 1);
            let high = self.r32(DEVICE_FEATURES_OFFSET);
            self.w32(DEVICE_FEATURES_SEL_OFFSET, 0);
            let low = self.r32(DEVICE_FEATURES_OFFSET);
            self.negotiate(low, high);
        }

        /// Configures and enables queue `index` with its rings at these
        /// addresses.
        fn setup_queue_rings(&mut self, index: u32, size: u32, desc: u64, avail: u64, used: u64) {
            self.w32(QUEUE_SEL_OFFSET, index);
            self.w32(QUEUE_NUM_OFFSET, size);
            self.w32(QUEUE_DESC_LOW_OFFSET, desc as u32);
            self.w32(QUEUE_DESC_HIGH_OFFSET, (desc >> 32) as u32);
            self.w32(QUEUE_DRIVER_LOW_OFFSET, avail as u32);
            self.w32(QUEUE_DRIVER_HIGH_OFFSET, (avail >> 32) as u32);
            self.w32(QUEUE_DEVICE_LOW_OFFSET, used as u32);
            self.w32(QUEUE_DEVICE_HIGH_OFFSET, (used >> 32) as u32);
            self.w32(QUEUE_READY_OFFSET, 1);
        }

        /// Queue `index` with its rings at `base`, +4 KiB, +8 KiB.
        fn setup_queue(&mut self, index: u32, size: u32, base: u64) {
            self.setup_queue_rings(index, size, base, base + 0x1000, base + 0x2000);
        }
    }

    impl Registers for MmioTransport {
        fn r32(&mut self, offset: u64) -> u32 {
            let mut b = [0u8; 4];
            self.read(offset, &mut b);
            u32::from_le_bytes(b)
        }

        fn w32(&mut self, offset: u64, value: u32) {
            self.write(offset, &value.to_le_bytes());
        }
    }

    /// A device's window on the MMIO bus.
    pub(crate) struct OnBus<'a> {
        pub(crate) bus: &'a Bus,
        pub(crate) base: u64,
    }

    impl Registers for OnBus<'_> {
        fn r32(&mut self, offset: u64) -> u32 {
            let mut b = [0u8; 4];
            assert!(self.bus.read(self.base + offset, &mut b));
            u32::from_le_bytes(b)
        }

        fn w32(&mut self, offset: u64, value: u32) {
            assert!(self.bus.write(self.base + offset, &value.to_le_bytes()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_driver::{Registers, ALL};
    use super::*;
    use crate::devices::virtio::test_utils::{TempFile, XorShift};
    use crate::devices::virtio::{
        ActivateError, Block, BlockConfig, INTERRUPT_CONFIG_CHANGE, INTERRUPT_USED_BUFFER,
        VIRTIO_ID_BLOCK,
    };
    use std::sync::Mutex;
    use vm_memory::{Bytes, GuestAddress};

    const VERSION_1_HIGH: u32 = 1 << (VIRTIO_F_VERSION_1 - 32);

    #[derive(Default)]
    struct Record {
        activations: Vec<Vec<(bool, u16, bool)>>,
        resets: usize,
        config_writes: Vec<(u64, Vec<u8>)>,
    }

    /// A device that records what the transport does to it.
    struct FakeDevice {
        record: Arc<Mutex<Record>>,
        sizes: Vec<u16>,
        fail_activation: bool,
    }

    impl VirtioDevice for FakeDevice {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &self.sizes
        }
        fn features(&self) -> u64 {
            feature(VIRTIO_F_VERSION_1) | feature(VIRTIO_RING_F_EVENT_IDX) | 0b101
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = (offset as u8).wrapping_add(i as u8);
            }
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            self.record
                .lock()
                .unwrap()
                .config_writes
                .push((offset, data.to_vec()));
        }
        fn activate(
            &mut self,
            _mem: GuestMemoryMmap,
            queues: Vec<DeviceQueue>,
            _interrupt: Arc<Interrupt>,
        ) -> Result<(), ActivateError> {
            if self.fail_activation {
                return Err(ActivateError::QueueNotReady { index: 0 });
            }
            self.record.lock().unwrap().activations.push(
                queues
                    .iter()
                    .map(|q| (q.queue.ready(), q.queue.size(), q.queue.event_idx_enabled()))
                    .collect(),
            );
            Ok(())
        }
        fn reset(&mut self) {
            self.record.lock().unwrap().resets += 1;
        }
    }

    struct Harness {
        t: MmioTransport,
        record: Arc<Mutex<Record>>,
        irq: EventFd,
    }

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn harness_with(fail_activation: bool) -> Harness {
        let record = Arc::new(Mutex::new(Record::default()));
        let device = FakeDevice {
            record: record.clone(),
            sizes: vec![16, 8],
            fail_activation,
        };
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let t = MmioTransport::new(Box::new(device), memory(), irq.try_clone().unwrap()).unwrap();
        Harness { t, record, irq }
    }

    fn harness() -> Harness {
        harness_with(false)
    }

    fn r32(t: &mut MmioTransport, offset: u64) -> u32 {
        Registers::r32(t, offset)
    }

    fn w32(t: &mut MmioTransport, offset: u64, value: u32) {
        Registers::w32(t, offset, value)
    }

    fn negotiate(t: &mut MmioTransport, low: u32, high: u32) {
        Registers::negotiate(t, low, high)
    }

    fn setup_queue(t: &mut MmioTransport, index: u32, size: u32, base: u64) {
        Registers::setup_queue(t, index, size, base)
    }

    #[test]
    fn identification_registers() {
        let Harness { mut t, .. } = harness();
        assert_eq!(r32(&mut t, MAGIC_VALUE_OFFSET), 0x7472_6976);
        assert_eq!(r32(&mut t, VERSION_OFFSET), 2);
        assert_eq!(r32(&mut t, DEVICE_ID_OFFSET), 42);
        assert_eq!(r32(&mut t, VENDOR_ID_OFFSET), VENDOR_ID);
        w32(&mut t, DEVICE_FEATURES_SEL_OFFSET, 0);
        assert_eq!(
            r32(&mut t, DEVICE_FEATURES_OFFSET),
            0b101 | 1 << VIRTIO_RING_F_EVENT_IDX
        );
        w32(&mut t, DEVICE_FEATURES_SEL_OFFSET, 1);
        assert_eq!(r32(&mut t, DEVICE_FEATURES_OFFSET), VERSION_1_HIGH);
        w32(&mut t, DEVICE_FEATURES_SEL_OFFSET, 2);
        assert_eq!(r32(&mut t, DEVICE_FEATURES_OFFSET), 0);
        assert_eq!(r32(&mut t, SHM_LEN_LOW_OFFSET), u32::MAX);
        assert_eq!(r32(&mut t, CONFIG_GENERATION_OFFSET), 0);
        t.config_changed();
        assert_eq!(r32(&mut t, CONFIG_GENERATION_OFFSET), 1);
        assert_eq!(
            r32(&mut t, INTERRUPT_STATUS_OFFSET),
            INTERRUPT_CONFIG_CHANGE
        );
    }

    #[test]
    fn status_fsm_in_order() {
        let Harness { mut t, record, .. } = harness();
        assert_eq!(r32(&mut t, STATUS_OFFSET), 0);
        // DRIVER before ACKNOWLEDGE is refused.
        w32(&mut t, STATUS_OFFSET, status::DRIVER);
        assert_eq!(r32(&mut t, STATUS_OFFSET), 0);
        // DRIVER_OK before FEATURES_OK is refused.
        w32(&mut t, STATUS_OFFSET, status::ACKNOWLEDGE | status::DRIVER);
        w32(
            &mut t,
            STATUS_OFFSET,
            status::ACKNOWLEDGE | status::DRIVER | status::DRIVER_OK,
        );
        assert_eq!(
            r32(&mut t, STATUS_OFFSET),
            status::ACKNOWLEDGE | status::DRIVER
        );
        assert!(record.lock().unwrap().activations.is_empty());
        // Clearing a bit without reset is ignored.
        w32(&mut t, STATUS_OFFSET, status::ACKNOWLEDGE);
        assert_eq!(
            r32(&mut t, STATUS_OFFSET),
            status::ACKNOWLEDGE | status::DRIVER
        );

        w32(&mut t, DRIVER_FEATURES_SEL_OFFSET, 1);
        w32(&mut t, DRIVER_FEATURES_OFFSET, VERSION_1_HIGH);
        w32(&mut t, STATUS_OFFSET, ALL & !status::DRIVER_OK);
        assert_eq!(r32(&mut t, STATUS_OFFSET), ALL & !status::DRIVER_OK);
        setup_queue(&mut t, 0, 16, 0x10000);
        w32(&mut t, STATUS_OFFSET, ALL);
        assert_eq!(r32(&mut t, STATUS_OFFSET), ALL);
        assert!(t.is_active());
        assert_eq!(
            record.lock().unwrap().activations,
            vec![vec![(true, 16, false), (false, 8, false)]]
        );
        // Writing DRIVER_OK again does not activate twice.
        w32(&mut t, STATUS_OFFSET, ALL);
        assert_eq!(record.lock().unwrap().activations.len(), 1);
        // FAILED may be added at any time.
        w32(&mut t, STATUS_OFFSET, ALL | status::FAILED);
        assert_eq!(r32(&mut t, STATUS_OFFSET), ALL | status::FAILED);
    }

    #[test]
    fn feature_negotiation() {
        // Features the device did not offer: FEATURES_OK refused.
        let Harness { mut t, .. } = harness();
        negotiate(&mut t, 0b111, VERSION_1_HIGH);
        assert_eq!(r32(&mut t, STATUS_OFFSET) & status::FEATURES_OK, 0);

        // No VIRTIO_F_VERSION_1: refused.
        let Harness { mut t, .. } = harness();
        negotiate(&mut t, 0b101, 0);
        assert_eq!(r32(&mut t, STATUS_OFFSET) & status::FEATURES_OK, 0);

        // A bit in a feature page past 64 bits: refused.
        let Harness { mut t, .. } = harness();
        w32(&mut t, STATUS_OFFSET, status::ACKNOWLEDGE);
        w32(&mut t, STATUS_OFFSET, status::ACKNOWLEDGE | status::DRIVER);
        w32(&mut t, DRIVER_FEATURES_SEL_OFFSET, 2);
        w32(&mut t, DRIVER_FEATURES_OFFSET, 1);
        w32(&mut t, DRIVER_FEATURES_SEL_OFFSET, 1);
        w32(&mut t, DRIVER_FEATURES_OFFSET, VERSION_1_HIGH);
        w32(&mut t, STATUS_OFFSET, ALL & !status::DRIVER_OK);
        assert_eq!(r32(&mut t, STATUS_OFFSET) & status::FEATURES_OK, 0);

        // A subset of the offer with VERSION_1: accepted, and event-idx
        // reaches the queues.
        let Harness { mut t, record, .. } = harness();
        negotiate(&mut t, 1 << VIRTIO_RING_F_EVENT_IDX, VERSION_1_HIGH);
        assert_ne!(r32(&mut t, STATUS_OFFSET) & status::FEATURES_OK, 0);
        // Features cannot change after FEATURES_OK.
        w32(&mut t, DRIVER_FEATURES_SEL_OFFSET, 0);
        w32(&mut t, DRIVER_FEATURES_OFFSET, 0b10);
        assert_eq!(t.driver_features as u32, 1 << VIRTIO_RING_F_EVENT_IDX);
        setup_queue(&mut t, 0, 8, 0x10000);
        w32(&mut t, STATUS_OFFSET, ALL);
        assert_eq!(record.lock().unwrap().activations[0][0], (true, 8, true));
    }

    #[test]
    fn queue_configuration() {
        let Harness { mut t, record, .. } = harness();
        // Before FEATURES_OK queue registers are ignored.
        setup_queue(&mut t, 0, 8, 0x10000);
        assert_eq!(r32(&mut t, QUEUE_READY_OFFSET), 0);
        negotiate(&mut t, 0, VERSION_1_HIGH);
        w32(&mut t, QUEUE_SEL_OFFSET, 0);
        assert_eq!(r32(&mut t, QUEUE_NUM_MAX_OFFSET), 16);
        w32(&mut t, QUEUE_SEL_OFFSET, 1);
        assert_eq!(r32(&mut t, QUEUE_NUM_MAX_OFFSET), 8);
        w32(&mut t, QUEUE_SEL_OFFSET, 2);
        assert_eq!(r32(&mut t, QUEUE_NUM_MAX_OFFSET), 0, "no third queue");
        assert_eq!(r32(&mut t, QUEUE_READY_OFFSET), 0);
        w32(&mut t, QUEUE_READY_OFFSET, 1); // ignored: no such queue
        w32(&mut t, QUEUE_SEL_OFFSET, u32::MAX);
        w32(&mut t, QUEUE_NUM_OFFSET, 4);

        setup_queue(&mut t, 1, 4, 0x2_0000_0000 - 0x1000);
        setup_queue(&mut t, 0, 8, 0x10000);
        assert_eq!(r32(&mut t, QUEUE_READY_OFFSET), 1);
        assert_eq!(t.queues[0].desc, 0x10000);
        assert_eq!(t.queues[0].avail, 0x11000);
        assert_eq!(t.queues[0].used, 0x12000);
        assert_eq!(t.queues[1].desc, 0x1_ffff_f000);
        // Queue 1's rings are outside guest memory: activation fails and
        // the device asks for a reset.
        w32(&mut t, STATUS_OFFSET, ALL);
        assert!(!t.is_active());
        assert!(record.lock().unwrap().activations.is_empty());
        assert_ne!(r32(&mut t, STATUS_OFFSET) & status::DEVICE_NEEDS_RESET, 0);
        assert_ne!(
            r32(&mut t, INTERRUPT_STATUS_OFFSET) & INTERRUPT_CONFIG_CHANGE,
            0
        );
        // Queue registers are frozen after DRIVER_OK.
        w32(&mut t, QUEUE_SEL_OFFSET, 0);
        w32(&mut t, QUEUE_NUM_OFFSET, 2);
        assert_eq!(t.queues[0].size, 8);
    }

    #[test]
    fn invalid_queue_sizes_fail_activation() {
        for size in [0, 3, 32, 0x1_0000] {
            let Harness { mut t, record, .. } = harness();
            negotiate(&mut t, 0, VERSION_1_HIGH);
            setup_queue(&mut t, 0, size, 0x10000);
            w32(&mut t, STATUS_OFFSET, ALL);
            assert!(!t.is_active(), "size {size}");
            assert!(record.lock().unwrap().activations.is_empty());
            assert_ne!(t.status() & status::DEVICE_NEEDS_RESET, 0);
        }
        // Misaligned descriptor table.
        let Harness { mut t, .. } = harness();
        negotiate(&mut t, 0, VERSION_1_HIGH);
        setup_queue(&mut t, 0, 8, 0x10008);
        w32(&mut t, STATUS_OFFSET, ALL);
        assert!(!t.is_active());
    }

    /// A driver that retries a refused activation in a loop is counted,
    /// not logged each time.
    #[test]
    fn refused_activations_are_counted() {
        let Harness { mut t, .. } = harness_with(true);
        for _ in 0..1000 {
            w32(&mut t, STATUS_OFFSET, 0);
            negotiate(&mut t, 0, VERSION_1_HIGH);
            setup_queue(&mut t, 0, 8, 0x10000);
            w32(&mut t, STATUS_OFFSET, ALL);
            assert!(!t.is_active());
        }
        assert_eq!(t.problems(), 1000);
    }

    #[test]
    fn device_refusing_activation_needs_reset() {
        let Harness { mut t, .. } = harness_with(true);
        negotiate(&mut t, 0, VERSION_1_HIGH);
        setup_queue(&mut t, 0, 8, 0x10000);
        w32(&mut t, STATUS_OFFSET, ALL);
        assert!(!t.is_active());
        assert_eq!(r32(&mut t, STATUS_OFFSET), ALL | status::DEVICE_NEEDS_RESET);
        w32(&mut t, STATUS_OFFSET, 0);
        assert_eq!(r32(&mut t, STATUS_OFFSET), 0);
    }

    #[test]
    fn reset_clears_everything() {
        let Harness {
            mut t, record, irq, ..
        } = harness();
        negotiate(&mut t, 1 << VIRTIO_RING_F_EVENT_IDX, VERSION_1_HIGH);
        setup_queue(&mut t, 0, 8, 0x10000);
        w32(&mut t, STATUS_OFFSET, ALL);
        assert!(t.is_active());
        t.interrupt().signal_used_buffer();
        assert_eq!(irq.read().unwrap(), 1);
        w32(&mut t, QUEUE_NOTIFY_OFFSET, 0);

        w32(&mut t, STATUS_OFFSET, 0);
        assert_eq!(record.lock().unwrap().resets, 1);
        assert!(!t.is_active());
        assert_eq!(r32(&mut t, STATUS_OFFSET), 0);
        assert_eq!(r32(&mut t, INTERRUPT_STATUS_OFFSET), 0);
        assert_eq!(t.driver_features, 0);
        assert_eq!(r32(&mut t, QUEUE_READY_OFFSET), 0);
        assert_eq!(t.queues[0].size, 16);
        assert!(t.notify[0].read().is_err(), "stale notification dropped");

        // The driver can start over.
        negotiate(&mut t, 0, VERSION_1_HIGH);
        setup_queue(&mut t, 0, 4, 0x10000);
        w32(&mut t, STATUS_OFFSET, ALL);
        assert!(t.is_active());
        assert_eq!(record.lock().unwrap().activations.len(), 2);
        assert_eq!(record.lock().unwrap().activations[1][0], (true, 4, false));
    }

    #[test]
    fn interrupt_status_and_ack() {
        let Harness { mut t, irq, .. } = harness();
        t.interrupt().signal_used_buffer();
        t.interrupt().signal_config_change();
        assert_eq!(irq.read().unwrap(), 2);
        assert_eq!(
            r32(&mut t, INTERRUPT_STATUS_OFFSET),
            INTERRUPT_USED_BUFFER | INTERRUPT_CONFIG_CHANGE
        );
        w32(&mut t, INTERRUPT_ACK_OFFSET, INTERRUPT_USED_BUFFER);
        assert_eq!(
            r32(&mut t, INTERRUPT_STATUS_OFFSET),
            INTERRUPT_CONFIG_CHANGE
        );
        w32(&mut t, INTERRUPT_ACK_OFFSET, u32::MAX);
        assert_eq!(r32(&mut t, INTERRUPT_STATUS_OFFSET), 0);
        // The register is read-only.
        w32(&mut t, INTERRUPT_STATUS_OFFSET, 3);
        assert_eq!(r32(&mut t, INTERRUPT_STATUS_OFFSET), 0);
    }

    #[test]
    fn queue_notify_signals_the_queue_eventfd() {
        let Harness { mut t, .. } = harness();
        let fds = t.notify_fds().unwrap();
        assert_eq!(fds.iter().map(|f| f.1).collect::<Vec<_>>(), vec![0, 1]);
        w32(&mut t, QUEUE_NOTIFY_OFFSET, 1);
        w32(&mut t, QUEUE_NOTIFY_OFFSET, 1);
        w32(&mut t, QUEUE_NOTIFY_OFFSET, 9);
        assert_eq!(fds[1].0.read().unwrap(), 2);
        assert!(fds[0].0.read().is_err(), "queue 0 not signalled");
    }

    #[test]
    fn bad_access_sizes_and_offsets_are_harmless() {
        let Harness { mut t, record, .. } = harness();
        for len in [1usize, 2, 3, 8] {
            let mut buf = vec![0xaau8; len];
            t.read(MAGIC_VALUE_OFFSET, &mut buf);
            assert!(buf.iter().all(|&b| b == 0), "{len}-byte register read");
            t.write(STATUS_OFFSET, &vec![1u8; len]);
        }
        assert_eq!(
            r32(&mut t, STATUS_OFFSET),
            0,
            "narrow status writes ignored"
        );
        // Unaligned and unknown registers.
        assert_eq!(r32(&mut t, 0x002), 0);
        assert_eq!(r32(&mut t, 0x0f0), 0);
        w32(&mut t, 0x071, 1);
        w32(&mut t, 0x0c0, 1);
        assert_eq!(r32(&mut t, STATUS_OFFSET), 0);
        // Write-only registers read as 0.
        w32(&mut t, QUEUE_SEL_OFFSET, 1);
        assert_eq!(r32(&mut t, QUEUE_SEL_OFFSET), 0);

        // Configuration space: 1, 2, 4 and 8-byte accesses reach the device.
        let mut b = [0u8; 2];
        t.read(CONFIG_OFFSET + 5, &mut b);
        assert_eq!(b, [5, 6]);
        let mut odd = [0xffu8; 3];
        t.read(CONFIG_OFFSET, &mut odd);
        assert_eq!(odd, [0; 3]);
        t.write(CONFIG_OFFSET + 1, &[9]);
        t.write(CONFIG_OFFSET + 1, &[9, 9, 9]);
        assert_eq!(record.lock().unwrap().config_writes, vec![(1, vec![9])]);
        let mut last = [0u8; 8];
        t.read(MMIO_WINDOW_SIZE - 8, &mut last);
    }

    #[test]
    fn cmdline_parameter() {
        assert_eq!(
            kernel_cmdline_device(0xd000_0000, 0x1000, 5),
            "virtio_mmio.device=4K@0xd0000000:5"
        );
        assert_eq!(
            kernel_cmdline_device(0xd000_1000, 2 << 20, 23),
            "virtio_mmio.device=2M@0xd0001000:23"
        );
        assert_eq!(
            kernel_cmdline_device(0x1000, 0x200, 5),
            "virtio_mmio.device=512@0x1000:5"
        );
    }

    /// Reads Status until the device has finished a reset (at most 10 s).
    fn wait_for_reset(t: &mut MmioTransport) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while r32(t, STATUS_OFFSET) != 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the reset never completed"
            );
            std::thread::yield_now();
        }
    }

    /// The whole path as the VM wires it: driver setup through registers,
    /// a read request, QueueNotify, the request served on the virtio
    /// thread, the interrupt raised, then a reset.
    #[test]
    fn block_device_end_to_end() {
        use crate::devices::virtio::test_utils::MockDriver;
        use virtio_queue::desc::split::Descriptor;

        let contents: Vec<u8> = (0..8192u32).map(|i| (i / 512) as u8).collect();
        let image = TempFile::with_contents(&contents);
        let mem = memory();
        let config = BlockConfig {
            path: image.path().to_path_buf(),
            readonly: false,
            id: None,
        };
        let wiring = crate::device_manager::RecordingWiring::default();
        let mut devices = crate::device_manager::DeviceManager::new(mem.clone()).unwrap();
        let disk = devices.attach_block(&wiring, &config).unwrap().clone();
        let (irq, ioevents) = wiring.take();
        assert_eq!(ioevents.len(), 1);
        assert_eq!(ioevents[0].2, 0, "queue 0's datamatch");
        let irq = irq.into_iter().next().unwrap().0;
        let transport = devices.transports()[0].clone();
        let mut t = transport.lock().unwrap();
        assert_eq!(r32(&mut t, DEVICE_ID_OFFSET), VIRTIO_ID_BLOCK);
        let mut capacity = [0u8; 8];
        t.read(CONFIG_OFFSET, &mut capacity);
        assert_eq!(u64::from_le_bytes(capacity), 16);

        let mut vq = MockDriver::new(&mem, 0x1_0000, 16);
        t.negotiate_offered();
        w32(&mut t, QUEUE_SEL_OFFSET, 0);
        assert_eq!(r32(&mut t, QUEUE_NUM_MAX_OFFSET), 256);
        w32(&mut t, QUEUE_NUM_OFFSET, 16);
        w32(&mut t, QUEUE_DESC_LOW_OFFSET, vq.desc_table_addr() as u32);
        w32(&mut t, QUEUE_DRIVER_LOW_OFFSET, vq.avail_addr() as u32);
        w32(&mut t, QUEUE_DEVICE_LOW_OFFSET, vq.used_addr() as u32);
        w32(&mut t, QUEUE_READY_OFFSET, 1);
        w32(&mut t, STATUS_OFFSET, ALL);
        assert!(t.is_active());

        // IN request for sector 3 into 0x21000, status at 0x22000.
        let mut header = [0u8; 16];
        header[8] = 3;
        mem.write_slice(&header, GuestAddress(0x2_0000)).unwrap();
        let descs = [
            Descriptor::new(0x2_0000, 16, 1, 1),
            Descriptor::new(0x2_1000, 512, 1 | 2, 2),
            Descriptor::new(0x2_2000, 1, 2, 0),
        ];
        for (i, d) in descs.iter().enumerate() {
            mem.write_obj(*d, GuestAddress(0x1_0000 + 16 * i as u64))
                .unwrap();
        }
        mem.write_obj(0xffu8, GuestAddress(0x2_2000)).unwrap();
        vq.publish(0);
        w32(&mut t, QUEUE_NOTIFY_OFFSET, 0);
        drop(t);

        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while vq.used_idx() == 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(vq.used_idx(), 1);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x2_2000)).unwrap(), 0);
        let mut data = [0u8; 512];
        mem.read_slice(&mut data, GuestAddress(0x2_1000)).unwrap();
        assert!(data.iter().all(|&b| b == 3));
        assert_eq!(irq.read().unwrap(), 1);
        let mut t = transport.lock().unwrap();
        assert_eq!(r32(&mut t, INTERRUPT_STATUS_OFFSET), INTERRUPT_USED_BUFFER);
        w32(&mut t, INTERRUPT_ACK_OFFSET, INTERRUPT_USED_BUFFER);
        assert_eq!(disk.stats().bytes_read, 512);

        w32(&mut t, STATUS_OFFSET, 0);
        // Idle: the device thread finishes the reset at once.
        while r32(&mut t, STATUS_OFFSET) != 0 {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        drop(t);
        devices.stop();
    }

    /// Random register traffic against a real block device whose event
    /// loop runs, over guest memory full of garbage: nothing panics, on
    /// this thread or on the virtio thread.
    #[test]
    fn random_register_traffic_never_panics() {
        let image = TempFile::with_contents(&[0u8; 64 * 1024]);
        let mem = memory();
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        let garbage: Vec<u8> = (0..0x10_0000).map(|_| rng.next() as u8).collect();
        mem.write_slice(&garbage, GuestAddress(0)).unwrap();

        let config = BlockConfig {
            path: image.path().to_path_buf(),
            readonly: false,
            id: Some("fuzz".into()),
        };
        let block = Block::open(&config).unwrap();
        let thread = block.thread().clone();
        let offered = block.features();
        let disk = block.handle();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut t = MmioTransport::new(Box::new(block), mem.clone(), irq).unwrap();
        assert_eq!(t.device().device_type(), VIRTIO_ID_BLOCK);

        let offsets: Vec<u64> = (0..0x48).map(|i| i * 4).collect();
        let values = [
            0,
            1,
            2,
            3,
            4,
            7,
            8,
            11,
            15,
            0x40,
            0x80,
            offered as u32,
            (offered >> 32) as u32,
            u32::MAX,
            0x1000,
            0x8000,
            0xf_f000,
            256,
            16,
        ];
        for round in 0..4000u32 {
            if round % 200 == 0 {
                // A well-formed start with random rings, so the worker runs
                // on garbage descriptors.
                w32(&mut t, STATUS_OFFSET, 0);
                // As the driver must: wait for the device thread to finish
                // the reset.
                wait_for_reset(&mut t);
                negotiate(&mut t, offered as u32, (offered >> 32) as u32);
                let base = rng.below(0xf0) << 12;
                let size = rng.pick(&[1, 2, 16, 256]);
                setup_queue(&mut t, 0, size, base);
                // A plausible available index over garbage descriptors.
                let avail_idx = rng.below(u64::from(size) + 1) as u16;
                mem.write_obj(avail_idx, GuestAddress(base + 0x1002))
                    .unwrap();
                w32(&mut t, STATUS_OFFSET, ALL);
                let before = disk.stats().requests;
                w32(&mut t, QUEUE_NOTIFY_OFFSET, 0);
                // Give the virtio thread a moment to take the requests
                // before random traffic (a reset, say) interferes.
                let deadline = std::time::Instant::now() + std::time::Duration::from_millis(20);
                while avail_idx > 0
                    && disk.stats().requests == before
                    && std::time::Instant::now() < deadline
                {
                    std::thread::yield_now();
                }
            }
            let offset = if rng.below(8) == 0 {
                rng.below(MMIO_WINDOW_SIZE)
            } else {
                rng.pick(&offsets)
            };
            let len = rng.pick(&[1usize, 2, 4, 4, 4, 4, 8, 3]);
            if offset + len as u64 > MMIO_WINDOW_SIZE {
                continue;
            }
            if rng.below(3) == 0 {
                let mut buf = vec![0u8; len];
                t.read(offset, &mut buf);
            } else {
                let value = if rng.below(2) == 0 {
                    rng.pick(&values)
                } else {
                    rng.next() as u32
                };
                let mut bytes = [0u8; 8];
                bytes[..4].copy_from_slice(&value.to_le_bytes());
                t.write(offset, &bytes[..len]);
            }
        }
        w32(&mut t, STATUS_OFFSET, 0);
        wait_for_reset(&mut t);
        assert!(t.device().reset_complete(), "the device dropped its queue");
        assert!(thread.stop(), "the device thread did not panic");
        assert!(disk.stats().requests > 0, "the worker served requests");
        assert_eq!(image.contents().len(), 64 * 1024);
    }
}
