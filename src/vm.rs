//! Building a micro-VM from its configuration and running it.
//!
//! [`Vm::build`] reads top to bottom like the boot of a real machine: create
//! the KVM VM with its interrupt controllers and timer, map guest memory,
//! load the kernel and initrd, write the boot structures (command line,
//! boot_params, MP table, page tables, GDT), attach the devices, create
//! the vCPUs. [`Vm::run`] starts one thread per vCPU and runs the control
//! loop on the calling thread: console input, host signals, and guest
//! events, until the guest ends.

use std::io::Read;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::thread::JoinHandleExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::arch::layout::{self, e820_map, ram_regions};
use crate::arch::{gdt, mptable, paging};
use crate::boot;
use crate::cmdline::{self, InitParams};
use crate::control::{Control, VmEvent};
use crate::devices::i8042::{I8042, I8042_BASE, I8042_LEN};
use crate::devices::serial::{
    ConsoleOutput, ConsoleTail, SerialDevice, COM1_BASE, COM1_IRQ, COM1_LEN,
};
use crate::devices::status::{StatusDevice, STATUS_PORT_BASE, STATUS_PORT_LEN};
use crate::devices::virtio::{
    self, BlockConfig, BlockHandle, EventLoop, EventLoopThread, MmioDeviceSetup, NetConfig,
    NetHandle, QUEUE_NOTIFY_OFFSET,
};
use crate::devices::{bus, Bus};
use crate::host::HostKind;
use crate::profile::Sampler;
use crate::stats::ExitStats;
use crate::vcpu::{self, Vcpu, VcpuContext, STOP_TIMEOUT};

/// The smallest guest vmlab boots: room for the kernel, its page tables and
/// an initramfs.
pub const MIN_MEMORY: u64 = 32 << 20;
/// The largest guest: 1 TiB.
pub const MAX_MEMORY: u64 = 1 << 40;

/// Everything that describes a VM to build.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Kernel image (ELF vmlinux or bzImage).
    pub kernel: PathBuf,
    /// Initial ramdisk.
    pub initrd: Option<PathBuf>,
    /// User's additions to the kernel command line.
    pub cmdline: Option<String>,
    /// Guest RAM in bytes.
    pub mem_size: u64,
    /// vCPU count.
    pub cpus: u8,
    /// What the guest init runs (`None`: a shell on the console).
    pub init: InitParams,
    /// Host kind, resolved.
    pub host: HostKind,
    /// Forward vmlab's stdin to the guest console.
    pub forward_stdin: bool,
    /// virtio-blk disks, in order: the first is /dev/vda.
    pub disks: Vec<BlockConfig>,
    /// virtio-net interfaces on host TAP devices, in order: eth0, eth1...
    pub nets: Vec<NetConfig>,
    /// Sample the guest's RIP at this interval (`--profile-guest`); the
    /// samples come back in the run report's statistics.
    pub profile_period: Option<Duration>,
}

/// Errors building or running the VM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad configuration.
    #[error("{0}")]
    Config(String),
    /// `/dev/kvm` could not be opened.
    #[error("cannot open /dev/kvm: {0} (is KVM enabled, and may this user use it?)")]
    OpenKvm(kvm_ioctls::Error),
    /// KVM lacks something vmlab needs.
    #[error("this KVM lacks {0}, which vmlab needs")]
    MissingCap(&'static str),
    /// A KVM call failed.
    #[error("{what}: {source}")]
    Kvm {
        /// The operation.
        what: &'static str,
        /// The error.
        source: kvm_ioctls::Error,
    },
    /// Guest memory could not be allocated.
    #[error("cannot allocate {mib} MiB of guest memory: {reason}")]
    Memory {
        /// Size asked for.
        mib: u64,
        /// Why.
        reason: String,
    },
    /// Loading the kernel or initrd failed.
    #[error(transparent)]
    Boot(#[from] boot::Error),
    /// Writing a boot structure failed.
    #[error("cannot write the {what} into guest memory: {source}")]
    BootStructure {
        /// Which one.
        what: &'static str,
        /// Why.
        source: vm_memory::GuestMemoryError,
    },
    /// MP table.
    #[error(transparent)]
    MpTable(#[from] mptable::Error),
    /// vCPU setup.
    #[error(transparent)]
    Vcpu(#[from] vcpu::Error),
    /// Device bus.
    #[error("device setup: {0}")]
    Bus(#[from] bus::Error),
    /// A virtio device could not be created.
    #[error(transparent)]
    Virtio(#[from] virtio::Error),
    /// The virtio event loop failed.
    #[error(transparent)]
    EventLoop(#[from] virtio::event_loop::Error),
    /// A host resource (eventfd, epoll, thread, signal) failed.
    #[error("{what}: {source}")]
    Host {
        /// What was being done.
        what: &'static str,
        /// Why.
        source: std::io::Error,
    },
}

type Result<T> = std::result::Result<T, Error>;

/// Hands out virtio-mmio windows and interrupt lines, one per device, in
/// one sequence for every kind of virtio device.
#[derive(Default)]
struct VirtioSlots {
    next: u32,
}

impl VirtioSlots {
    /// Gives `device` the next MMIO window and GSI: registers its irqfd
    /// and queue ioeventfds with KVM, puts its transport on the MMIO bus,
    /// and returns the `virtio_mmio.device=` entry for the command line.
    fn attach(&mut self, vm_fd: &VmFd, mmio: &mut Bus, device: &MmioDeviceSetup) -> Result<String> {
        let gsi = layout::IRQ_BASE + self.next;
        if gsi > layout::IRQ_MAX {
            return Err(Error::Config(format!(
                "too many devices: vmlab has {} interrupt lines for virtio devices (disks and \
                 network interfaces together)",
                layout::IRQ_MAX - layout::IRQ_BASE + 1
            )));
        }
        let base = layout::VIRTIO_MMIO_START + u64::from(self.next) * layout::VIRTIO_MMIO_SIZE;
        self.next += 1;
        vm_fd
            .register_irqfd(&device.irq_fd, gsi)
            .map_err(kvm_err("KVM_IRQFD for a virtio device"))?;
        for (fd, queue) in &device.notify_fds {
            vm_fd
                .register_ioevent(
                    fd,
                    &IoEventAddress::Mmio(base + QUEUE_NOTIFY_OFFSET),
                    *queue,
                )
                .map_err(kvm_err("KVM_IOEVENTFD for a virtio queue"))?;
        }
        mmio.insert(base, layout::VIRTIO_MMIO_SIZE, device.transport.clone())?;
        Ok(virtio::kernel_cmdline_device(
            base,
            layout::VIRTIO_MMIO_SIZE,
            gsi,
        ))
    }
}

fn host_err(what: &'static str) -> impl Fn(std::io::Error) -> Error {
    move |source| Error::Host { what, source }
}

fn kvm_err(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { what, source }
}

/// How a VM run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The guest's command exited with this status.
    CommandExited(u8),
    /// The guest powered off.
    PowerOff,
    /// The guest rebooted (vmlab, like Firecracker, ends on reboot).
    Reboot,
    /// The guest halted.
    Halt,
    /// The guest kernel panicked; the panic message.
    Panic(String),
    /// A vCPU triple-faulted.
    TripleFault(u8),
    /// vmlab had to stop the guest.
    Fatal(String),
    /// A host signal stopped vmlab.
    Signal(i32),
}

impl Outcome {
    /// vmlab's exit status for this outcome: the command's own status, 0
    /// for a clean guest shutdown, 128+N for host signal N, and 125 (as
    /// `docker run` does for its own failures) when the guest crashed.
    pub fn exit_code(&self) -> i32 {
        match self {
            Outcome::CommandExited(code) => i32::from(*code),
            Outcome::PowerOff | Outcome::Reboot | Outcome::Halt => 0,
            Outcome::Signal(sig) => 128 + sig,
            Outcome::Panic(_) | Outcome::TripleFault(_) | Outcome::Fatal(_) => 125,
        }
    }

    /// A message for the user when the outcome is a failure.
    pub fn failure_message(&self) -> Option<String> {
        match self {
            Outcome::Panic(msg) => Some(format!("the guest kernel panicked: {msg}")),
            Outcome::TripleFault(cpu) => Some(format!(
                "vCPU {cpu} triple-faulted: the guest reset itself after an unrecoverable fault \
                 (run with -v -v for registers)"
            )),
            Outcome::Fatal(msg) => Some(msg.clone()),
            _ => None,
        }
    }
}

/// Timings and statistics of one run.
#[derive(Debug, Clone)]
pub struct RunReport {
    /// How it ended.
    pub outcome: Outcome,
    /// First KVM_RUN.
    pub first_run: Option<Instant>,
    /// The guest init reported it was up.
    pub init_up: Option<Instant>,
    /// When the VM stopped.
    pub ended: Instant,
    /// Exit statistics of all vCPUs.
    pub stats: ExitStats,
}

/// A built VM, ready to run.
pub struct Vm {
    _kvm: Kvm,
    _vm_fd: VmFd,
    vcpus: Vec<Vcpu>,
    ctx: VcpuContext,
    serial: Arc<Mutex<SerialDevice>>,
    rx_ready: Arc<EventFd>,
    tail: ConsoleTail,
    events: Receiver<VmEvent>,
    forward_stdin: bool,
    cmdline: String,
    event_loop: Option<EventLoop>,
    disks: Vec<BlockHandle>,
    nets: Vec<NetHandle>,
    profile_period: Option<Duration>,
}

impl Vm {
    /// Builds the VM described by `config`, sending console output to `out`.
    pub fn build(config: &VmConfig, out: Box<dyn std::io::Write + Send>) -> Result<Vm> {
        validate(config)?;

        // The machine: KVM VM with in-kernel PIC/IOAPIC/LAPIC and PIT.
        let kvm = Kvm::new().map_err(Error::OpenKvm)?;
        for (cap, name) in [
            (Cap::Irqchip, "an in-kernel irqchip"),
            (Cap::Irqfd, "irqfd"),
            (Cap::Ioeventfd, "ioeventfd"),
            (Cap::UserMemory, "user memory"),
            (Cap::Pit2, "an in-kernel PIT"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(Error::MissingCap(name));
            }
        }
        let max_vcpus = kvm.get_max_vcpus();
        if usize::from(config.cpus) > max_vcpus {
            return Err(Error::Config(format!(
                "--cpus {}: this KVM allows at most {max_vcpus} vCPUs",
                config.cpus
            )));
        }
        let vm_fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        // Guest memory, first: KVM_SET_USER_MEMORY_REGION waits for an SRCU
        // grace period, which is quick on a fresh VM but throttled (several
        // ms, most of the time to the first KVM_RUN) once the irqchip and
        // PIT have just registered their devices and waited for their own.
        let mem = create_memory(config.mem_size)?;
        // The kernel and initrd go into it on a thread of their own while
        // the rest of the machine is set up; joined before the boot
        // structures are written.
        let images = boot::BackgroundLoad::start(
            mem.clone(),
            config.kernel.clone(),
            config.initrd.clone(),
            config.mem_size,
        )?;
        register_memory(&vm_fd, &mem)?;
        vm_fd
            .set_tss_address(layout::KVM_TSS_ADDRESS)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        vm_fd
            .create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            // Let KVM answer port 0x61 (PC speaker / PIT gate) itself.
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm_fd.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
        if config.host.emulation_fallback() {
            match crate::emulate::enable_exit_on_emulation_failure(&vm_fd) {
                Ok(true) => log::info!(
                    "emulation fallback on: vmlab emulates instructions this host's KVM rejects"
                ),
                Ok(false) => log::warn!(
                    "KVM_CAP_EXIT_ON_EMULATION_FAILURE is missing: rejected instructions will \
                     stop the guest"
                ),
                Err(e) => log::warn!("cannot enable the emulation fallback: {e}"),
            }
        }

        // virtio devices: each gets a 4 KiB MMIO window, an IOAPIC pin and
        // a `virtio_mmio.device=` entry on the command line. Their queues
        // are served on the virtio event-loop thread; a vCPU's write to
        // QueueNotify never leaves KVM (ioeventfd).
        let event_loop = EventLoop::new()?;
        let mut mmio = Bus::new();
        let mut device_cmdline = Vec::new();
        // Disks first, so that the first disk is /dev/vda whatever else
        // is attached; then network interfaces (eth0, eth1, ... in order).
        let mut slots = VirtioSlots::default();
        let mut disks = Vec::new();
        for disk in &config.disks {
            let irq = EventFd::new(EFD_NONBLOCK).map_err(host_err("eventfd"))?;
            let setup = virtio::create_block_device(disk, mem.clone(), &event_loop.handle(), irq)?;
            let entry = slots.attach(&vm_fd, &mut mmio, &setup.device)?;
            device_cmdline.push(entry);
            disks.push(setup.disk);
        }
        let mut nets = Vec::new();
        for (i, net) in config.nets.iter().enumerate() {
            let irq = EventFd::new(EFD_NONBLOCK).map_err(host_err("eventfd"))?;
            let setup = virtio::create_net_device(net, i, mem.clone(), &event_loop.handle(), irq)?;
            let entry = slots.attach(&vm_fd, &mut mmio, &setup.device)?;
            device_cmdline.push(entry);
            log::debug!(
                "virtio-net: tap {} as eth{i}, MAC {}",
                setup.net.name(),
                setup.net.mac()
            );
            nets.push(setup.net);
        }
        // Without an initramfs the first disk is the root filesystem.
        if config.initrd.is_none() {
            if let Some(first) = config.disks.first() {
                device_cmdline.push("root=/dev/vda".into());
                // Linux mounts the root read-only unless told `rw`.
                if !first.readonly {
                    device_cmdline.push("rw".into());
                }
            }
        }

        // Kernel, initrd, command line and the structures that describe
        // the machine to the kernel.
        let (kernel, initrd) = images.wait()?;
        log::debug!(
            "kernel {:?}: entry {:#x}, ends at {:#x}",
            kernel.format,
            kernel.entry,
            kernel.end
        );
        let cmdline = cmdline::assemble(
            config.host.cmdline_quirks(),
            &device_cmdline,
            &config.init,
            config.cmdline.as_deref(),
        );
        boot::write_cmdline(&mem, &cmdline, kernel.cmdline_max)?;
        let setup_data = boot::write_rng_seed(&mem)?;
        let params = boot::build_boot_params(
            &kernel,
            &boot::BootInfo {
                cmdline_len: cmdline.len(),
                initrd,
                e820: e820_map(config.mem_size),
                setup_data: Some(setup_data),
            },
        );
        write(&mem, layout::ZERO_PAGE_START, params, "boot_params")?;
        let table = mptable::build(layout::MPTABLE_START, config.cpus)?;
        write_bytes(&mem, layout::MPTABLE_START, &table, "MP table")?;
        for table in paging::identity_map_1g() {
            let bytes: Vec<u8> = table.entries.iter().flat_map(|e| e.to_le_bytes()).collect();
            write_bytes(&mem, table.addr, &bytes, "page tables")?;
        }
        let gdt_bytes: Vec<u8> = gdt::boot_gdt()
            .iter()
            .flat_map(|e| e.to_le_bytes())
            .collect();
        write_bytes(&mem, layout::BOOT_GDT_START, &gdt_bytes, "GDT")?;
        write_bytes(&mem, layout::BOOT_IDT_START, &[0; 8], "IDT")?;

        // Devices.
        let (control, events) = Control::new().map_err(host_err("eventfd"))?;
        let control = Arc::new(control);
        let tail = ConsoleTail::default();
        let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(host_err("eventfd"))?;
        vm_fd
            .register_irqfd(&serial_irq, COM1_IRQ)
            .map_err(kvm_err("KVM_IRQFD for COM1"))?;
        let rx_ready = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(host_err("eventfd"))?);
        // Per-byte flushes only when a person watches a terminal (a shell
        // prompt must appear before its newline); pipes get whole lines.
        let console = ConsoleOutput::new(out, tail.clone(), config.init.tty);
        let serial = Arc::new(Mutex::new(SerialDevice::new(
            serial_irq,
            rx_ready.clone(),
            console,
        )));
        let mut pio = Bus::new();
        pio.insert(COM1_BASE, COM1_LEN, serial.clone())?;
        pio.insert(
            I8042_BASE,
            I8042_LEN,
            Arc::new(Mutex::new(I8042::new(control.clone()))),
        )?;
        pio.insert(
            STATUS_PORT_BASE,
            STATUS_PORT_LEN,
            Arc::new(Mutex::new(StatusDevice::new(control.clone()))),
        )?;

        // vCPUs.
        let ctx = VcpuContext {
            pio: Arc::new(pio),
            mmio: Arc::new(mmio),
            control,
            mem,
            host: config.host,
            stop: Arc::new(AtomicBool::new(false)),
            first_run: Arc::new(OnceLock::new()),
            profile_start: config.profile_period.map(|_| Instant::now()),
        };
        let mut vcpus = Vec::with_capacity(usize::from(config.cpus));
        for id in 0..config.cpus {
            let fd = vm_fd
                .create_vcpu(u64::from(id))
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            let vcpu = Vcpu::new(id, fd, ctx.clone());
            vcpu.configure(&kvm, config.cpus, kernel.entry)?;
            vcpus.push(vcpu);
        }

        Ok(Vm {
            _kvm: kvm,
            _vm_fd: vm_fd,
            vcpus,
            ctx,
            serial,
            rx_ready,
            tail,
            events,
            forward_stdin: config.forward_stdin,
            cmdline,
            event_loop: Some(event_loop),
            disks,
            nets,
            profile_period: config.profile_period,
        })
    }

    /// The kernel command line the guest got.
    pub fn cmdline(&self) -> &str {
        &self.cmdline
    }

    /// Runs the guest to its end.
    pub fn run(mut self) -> Result<RunReport> {
        let signals = HostSignals::new()?;
        register_signal_handler(SIGRTMIN() + KICK_SIGNAL_OFFSET, vcpu::kick_handler).map_err(
            |e| Error::Host {
                what: "installing the vCPU kick handler",
                source: std::io::Error::from_raw_os_error(e.errno()),
            },
        )?;

        let virtio_thread = match self.event_loop.take() {
            Some(event_loop) => Some(event_loop.start()?),
            None => None,
        };
        let mut threads = Vec::new();
        for vcpu in std::mem::take(&mut self.vcpus) {
            let name = format!("vcpu{}", threads.len());
            let handle = std::thread::Builder::new()
                .name(name)
                .spawn(move || vcpu.run())
                .map_err(host_err("spawning a vCPU thread"))?;
            threads.push(handle);
        }
        // The sampler holds the vCPU threads' ids: it is stopped before
        // they are joined.
        let mut sampler = match self.profile_period {
            Some(period) => Some(
                Sampler::start(
                    threads.iter().map(|t| t.as_pthread_t()).collect(),
                    SIGRTMIN() + KICK_SIGNAL_OFFSET,
                    period,
                )
                .map_err(host_err("spawning the profiler thread"))?,
            ),
            None => None,
        };

        let loop_result = self.control_loop(&signals);
        let ended = Instant::now();
        if let Some(s) = sampler.as_mut() {
            s.stop();
        }
        let stats = self.stop_vcpus(threads);
        self.stop_devices(virtio_thread);
        self.serial
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .flush();
        let (outcome, init_up) = loop_result?;
        Ok(RunReport {
            outcome,
            first_run: self.ctx.first_run.get().copied(),
            init_up,
            ended,
            stats,
        })
    }

    fn control_loop(&mut self, signals: &HostSignals) -> Result<(Outcome, Option<Instant>)> {
        const TOKEN_CONTROL: u64 = 0;
        const TOKEN_SIGNAL: u64 = 1;
        const TOKEN_STDIN: u64 = 2;
        const TOKEN_RX_READY: u64 = 3;
        let epoll = Epoll::new().map_err(host_err("epoll"))?;
        let add = |fd: RawFd, token: u64| {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, token),
                )
                .map_err(host_err("epoll_ctl"))
        };
        add(self.ctx.control.wake_fd().as_raw_fd(), TOKEN_CONTROL)?;
        add(signals.fd(), TOKEN_SIGNAL)?;
        let stdin_fd = std::io::stdin().as_raw_fd();
        let mut stdin_open = self.forward_stdin;
        if stdin_open {
            add(self.rx_ready.as_raw_fd(), TOKEN_RX_READY)?;
            if add(stdin_fd, TOKEN_STDIN).is_err() {
                // A regular file or /dev/null cannot be polled; input from
                // it is not forwarded.
                stdin_open = false;
            }
        }
        let mut pending: Vec<u8> = Vec::new();
        let mut init_up = None;
        let mut ready = vec![EpollEvent::default(); 8];
        loop {
            let n = match epoll.wait(-1, &mut ready) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(host_err("epoll_wait")(e)),
            };
            for event in &ready[..n] {
                match event.data() {
                    TOKEN_CONTROL => {
                        let _ = self.ctx.control.wake_fd().read();
                        while let Ok(ev) = self.events.try_recv() {
                            if let VmEvent::InitUp(at) = ev {
                                init_up.get_or_insert(at);
                                log::debug!("guest init is up");
                                continue;
                            }
                            return Ok((self.outcome_of(ev), init_up));
                        }
                    }
                    TOKEN_SIGNAL => {
                        if let Some(sig) = signals.read() {
                            log::info!("received signal {sig}: stopping the guest");
                            return Ok((Outcome::Signal(sig), init_up));
                        }
                    }
                    TOKEN_RX_READY => {
                        let _ = self.rx_ready.read();
                        self.feed_serial(&mut pending);
                        if pending.is_empty() && stdin_open {
                            let _ = epoll.ctl(
                                ControlOperation::Add,
                                stdin_fd,
                                EpollEvent::new(EventSet::IN, TOKEN_STDIN),
                            );
                        }
                    }
                    TOKEN_STDIN => {
                        let mut buf = [0u8; 64];
                        match std::io::stdin().lock().read(&mut buf) {
                            Ok(0) | Err(_) => {
                                stdin_open = false;
                                let _ = epoll.ctl(
                                    ControlOperation::Delete,
                                    stdin_fd,
                                    EpollEvent::default(),
                                );
                            }
                            Ok(n) => {
                                pending.extend_from_slice(&buf[..n]);
                                self.feed_serial(&mut pending);
                                if !pending.is_empty() {
                                    // Wait for the guest to drain the FIFO
                                    // before reading more.
                                    let _ = epoll.ctl(
                                        ControlOperation::Delete,
                                        stdin_fd,
                                        EpollEvent::default(),
                                    );
                                }
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    fn feed_serial(&self, pending: &mut Vec<u8>) {
        if pending.is_empty() {
            return;
        }
        let taken = self
            .serial
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .enqueue_input(pending);
        pending.drain(..taken);
    }

    fn outcome_of(&self, event: VmEvent) -> Outcome {
        match event {
            VmEvent::CommandExited(code) => Outcome::CommandExited(code),
            VmEvent::PowerOff => Outcome::PowerOff,
            VmEvent::Reboot => Outcome::Reboot,
            VmEvent::Halt => Outcome::Halt,
            // A reset nobody announced is a `reboot -f` or, with panic=-1,
            // a kernel panic: the console says which.
            VmEvent::Reset => match self.tail.panic_message() {
                Some(msg) => Outcome::Panic(msg),
                None => Outcome::Reboot,
            },
            VmEvent::TripleFault { vcpu } => Outcome::TripleFault(vcpu),
            VmEvent::Fatal { vcpu, message } => Outcome::Fatal(format!("vCPU {vcpu}: {message}")),
            VmEvent::InitUp(_) => Outcome::Fatal("internal: InitUp is not an outcome".into()),
        }
    }

    /// Stops the device thread once no vCPU can queue more work, then makes
    /// everything the guest wrote durable: on a guest power-off and on a
    /// host signal alike, the disk images hold all the guest's writes.
    fn stop_devices(&self, virtio_thread: Option<EventLoopThread>) {
        if let Some(thread) = virtio_thread {
            if !thread.stop() {
                log::error!("the virtio device thread panicked");
            }
        }
        for disk in &self.disks {
            if let Err(e) = disk.flush() {
                log::error!("cannot flush disk {}: {e}", disk.path().display());
            }
        }
        for net in &self.nets {
            let stats = net.stats();
            if stats.tx_malformed + stats.rx_malformed > 0 {
                log::warn!("virtio-net {}: {stats}", net.name());
            } else {
                log::debug!("virtio-net {}: {stats}", net.name());
            }
        }
    }

    /// Stops every vCPU thread and collects their statistics.
    fn stop_vcpus(&self, threads: Vec<JoinHandle<ExitStats>>) -> ExitStats {
        self.ctx.stop.store(true, Ordering::Release);
        let deadline = Instant::now() + STOP_TIMEOUT;
        let mut stats = ExitStats::default();
        let mut remaining = threads;
        while !remaining.is_empty() {
            let (done, running): (Vec<_>, Vec<_>) =
                remaining.into_iter().partition(|t| t.is_finished());
            for t in done {
                if let Ok(s) = t.join() {
                    stats.merge(&s);
                }
            }
            remaining = running;
            if remaining.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                log::warn!("{} vCPU thread(s) did not stop in time", remaining.len());
                break;
            }
            for t in &remaining {
                let _ = t.kill(SIGRTMIN() + KICK_SIGNAL_OFFSET);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        stats
    }
}

/// The real-time signal (offset from SIGRTMIN) used to kick vCPU threads.
const KICK_SIGNAL_OFFSET: i32 = 0;

fn validate(config: &VmConfig) -> Result<()> {
    if config.cpus == 0 || config.cpus > mptable::MAX_CPUS {
        return Err(Error::Config(format!(
            "--cpus {}: vmlab runs 1 to {} vCPUs",
            config.cpus,
            mptable::MAX_CPUS
        )));
    }
    if config.mem_size < MIN_MEMORY {
        return Err(Error::Config(format!(
            "--memory {} MiB is too small: a guest needs at least {} MiB",
            config.mem_size >> 20,
            MIN_MEMORY >> 20
        )));
    }
    if config.mem_size > MAX_MEMORY {
        return Err(Error::Config(format!(
            "--memory {} GiB is more than vmlab supports ({} GiB)",
            config.mem_size >> 30,
            MAX_MEMORY >> 30
        )));
    }
    if !config.mem_size.is_multiple_of(4096) {
        return Err(Error::Config(
            "--memory must be a whole number of 4 KiB pages".into(),
        ));
    }
    Ok(())
}

fn create_memory(mem_size: u64) -> Result<GuestMemoryMmap> {
    let ranges: Vec<(GuestAddress, usize)> = ram_regions(mem_size)
        .into_iter()
        .map(|(start, size)| (GuestAddress(start), size as usize))
        .collect();
    let mem = GuestMemoryMmap::from_ranges(&ranges).map_err(|e| Error::Memory {
        mib: mem_size >> 20,
        reason: e.to_string(),
    })?;
    for region in mem.iter() {
        // Transparent huge pages for guest RAM, as QEMU asks for: loading
        // the kernel (4 times faster) and running the guest take far fewer
        // host page faults. Only a hint: without THP the memory works the
        // same. Given before anything touches the memory.
        // SAFETY: the range is exactly this region's live mapping; MADV_HUGEPAGE
        // changes no contents.
        let rc = unsafe {
            libc::madvise(
                region.as_ptr().cast(),
                region.len() as usize,
                libc::MADV_HUGEPAGE,
            )
        };
        if rc != 0 {
            log::debug!(
                "madvise(MADV_HUGEPAGE) on guest memory: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(mem)
}

fn register_memory(vm_fd: &VmFd, mem: &GuestMemoryMmap) -> Result<()> {
    for (slot, region) in mem.iter().enumerate() {
        let region_desc = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the region is a live mmap owned by `mem`, which the Vm
        // keeps (through every vCPU context) for as long as the VM exists,
        // and its guest range does not overlap another slot's.
        unsafe { vm_fd.set_user_memory_region(region_desc) }
            .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(())
}

fn write<T: vm_memory::ByteValued>(
    mem: &GuestMemoryMmap,
    addr: u64,
    value: T,
    what: &'static str,
) -> Result<()> {
    mem.write_obj(value, GuestAddress(addr))
        .map_err(|source| Error::BootStructure { what, source })
}

fn write_bytes(mem: &GuestMemoryMmap, addr: u64, bytes: &[u8], what: &'static str) -> Result<()> {
    mem.write_slice(bytes, GuestAddress(addr))
        .map_err(|source| Error::BootStructure { what, source })
}

/// SIGTERM, SIGINT, SIGHUP and SIGQUIT, taken through a signalfd so that
/// the control loop handles them like any other event and the guest's
/// disks are flushed before vmlab exits.
struct HostSignals {
    fd: std::os::fd::OwnedFd,
}

const HANDLED_SIGNALS: [i32; 4] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGQUIT];

impl HostSignals {
    fn new() -> Result<HostSignals> {
        // SAFETY: sigset_t is plain data, initialized by sigemptyset.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid sigset_t; the signal numbers are valid.
        unsafe {
            libc::sigemptyset(&mut set);
            for sig in HANDLED_SIGNALS {
                libc::sigaddset(&mut set, sig);
            }
        }
        // Block them in this thread before any vCPU thread exists, so every
        // thread inherits the mask and only the signalfd sees them.
        // SAFETY: `set` is initialized; the old mask is not needed.
        let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(host_err("blocking signals")(
                std::io::Error::from_raw_os_error(rc),
            ));
        }
        // SAFETY: -1 asks for a new signalfd for the initialized `set`.
        let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) };
        if fd < 0 {
            return Err(host_err("signalfd")(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just returned by signalfd and is owned by no one.
        let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        Ok(HostSignals { fd })
    }

    fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// The next pending signal number.
    fn read(&self) -> Option<i32> {
        // SAFETY: signalfd_siginfo is plain data.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        // SAFETY: reads at most `size` bytes into `info`.
        let n = unsafe {
            libc::read(
                self.fd(),
                (&mut info as *mut libc::signalfd_siginfo).cast(),
                size,
            )
        };
        (n == size as isize).then_some(info.ssi_signo as i32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> VmConfig {
        VmConfig {
            kernel: PathBuf::from("/nonexistent"),
            initrd: None,
            cmdline: None,
            mem_size: 256 << 20,
            cpus: 1,
            init: InitParams::default(),
            host: HostKind::Hardware,
            forward_stdin: false,
            disks: Vec::new(),
            nets: Vec::new(),
            profile_period: None,
        }
    }

    #[test]
    fn validation() {
        assert!(validate(&config()).is_ok());
        let bad = |f: fn(&mut VmConfig)| {
            let mut c = config();
            f(&mut c);
            validate(&c).unwrap_err().to_string()
        };
        assert!(bad(|c| c.cpus = 0).contains("--cpus 0"));
        assert!(bad(|c| c.cpus = 33).contains("1 to 32"));
        assert!(bad(|c| c.mem_size = 1 << 20).contains("too small"));
        assert!(bad(|c| c.mem_size = 2 << 40).contains("more than"));
        assert!(bad(|c| c.mem_size = (64 << 20) + 1).contains("4 KiB pages"));
    }

    #[test]
    fn exit_codes() {
        assert_eq!(Outcome::CommandExited(3).exit_code(), 3);
        assert_eq!(Outcome::PowerOff.exit_code(), 0);
        assert_eq!(Outcome::Reboot.exit_code(), 0);
        assert_eq!(Outcome::Signal(15).exit_code(), 143);
        assert_eq!(Outcome::Panic("x".into()).exit_code(), 125);
        assert!(Outcome::TripleFault(0)
            .failure_message()
            .unwrap()
            .contains("triple"));
        assert!(Outcome::CommandExited(1).failure_message().is_none());
    }
}
