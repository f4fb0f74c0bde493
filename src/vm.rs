//! Building a micro-VM from its configuration and running it.
//!
//! [`Vm::build`] reads top to bottom like the boot of a real machine: create
//! the KVM VM with its interrupt controllers and timer, map guest memory,
//! load the kernel and initrd, write the boot structures (command line,
//! boot_params, MP table, page tables, GDT), attach the devices, create
//! the vCPUs. [`Vm::run`] starts one thread per vCPU and runs the control
//! loop on the calling thread: console input, host signals, and guest
//! events, until the guest ends.

use std::os::unix::thread::JoinHandleExt;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::arch::layout::{self, e820_map, ram_regions};
use crate::arch::{self, mptable};
use crate::boot;
use crate::cmdline::{self, InitParams};
pub use crate::control::Outcome;
use crate::control::{Control, ControlLoop, VmEvent};
use crate::device_manager::{self, DeviceManager};
use crate::devices::console::{Console, ConsoleSink, ConsoleStats, ConsoleThread};
use crate::devices::i8042::{I8042, I8042_BASE, I8042_LEN};
use crate::devices::serial::{
    ConsoleTail, ConsoleWriter, SerialDevice, COM1_BASE, COM1_IRQ, COM1_LEN,
};
use crate::devices::status::{StatusDevice, STATUS_PORT_BASE, STATUS_PORT_LEN};
use crate::devices::virtio::fs::FsConfig;
use crate::devices::virtio::{BlockConfig, NetConfig};
use crate::devices::{bus, Bus};
use crate::host::HostKind;
use crate::profile::Sampler;
use crate::raw::{CpuMode, RawImage};
use crate::signals::Signals;
use crate::stats::ExitStats;
use crate::trace::TraceSender;
use crate::vcpu::{self, Vcpu, VcpuContext, STOP_TIMEOUT};
use crate::vsock::VsockConfig;

/// The smallest guest vmlab boots: room for the kernel, its page tables and
/// an initramfs.
pub const MIN_MEMORY: u64 = 32 << 20;
/// The largest guest: 1 TiB.
pub const MAX_MEMORY: u64 = 1 << 40;

/// What the guest boots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    /// A Linux kernel (ELF vmlinux, entered at its 64-bit entry, or a
    /// bzImage) and an optional initial ramdisk.
    Linux {
        /// The kernel image.
        kernel: PathBuf,
        /// Initial ramdisk.
        initrd: Option<PathBuf>,
    },
    /// A flat binary (`--raw`): no boot protocol, no command line, no
    /// init; the image is the whole guest.
    Raw(RawImage),
}

impl Payload {
    /// The initrd, if Linux boots with one.
    fn initrd(&self) -> Option<&PathBuf> {
        match self {
            Payload::Linux { initrd, .. } => initrd.as_ref(),
            Payload::Raw(_) => None,
        }
    }
}

/// A payload on its way into guest memory: a kernel loads on a thread of
/// its own while the machine is set up; a raw image is copied later.
enum Staged<'a> {
    Linux(boot::BackgroundLoad),
    Raw(&'a RawImage),
}

/// Everything that describes a VM to build.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// The kernel and initrd, or a raw image.
    pub payload: Payload,
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
    /// A virtio-vsock device (`--vsock`): the guest's CID and the host
    /// socket.
    pub vsock: Option<VsockConfig>,
    /// virtio-fs devices, each on a running vhost-user backend (`--fs`,
    /// and the virtiofsd vmlab starts for each `--volume`).
    pub fs: Vec<FsConfig>,
    /// Sample the guest's RIP at this interval (`--profile-guest`); the
    /// samples come back in the run report's statistics.
    pub profile_period: Option<Duration>,
    /// `--trace-exits`: where each vCPU records its exits.
    pub trace: Option<TraceSender>,
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
    /// Loading a `--raw` image failed.
    #[error(transparent)]
    Raw(#[from] crate::raw::Error),
    /// Writing the MP table, page tables or GDT failed.
    #[error(transparent)]
    Arch(#[from] arch::Error),
    /// vCPU setup.
    #[error(transparent)]
    Vcpu(#[from] vcpu::Error),
    /// Device bus.
    #[error("device setup: {0}")]
    Bus(#[from] bus::Error),
    /// The control loop failed.
    #[error(transparent)]
    Control(#[from] crate::control::Error),
    /// A virtio device could not be created or attached.
    #[error(transparent)]
    Devices(#[from] device_manager::Error),
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

fn host_err(what: &'static str) -> impl Fn(std::io::Error) -> Error {
    move |source| Error::Host { what, source }
}

fn kvm_err(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { what, source }
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
    /// What the console wrote and dropped.
    pub console: ConsoleStats,
}

/// A built VM, ready to run.
pub struct Vm {
    _kvm: Kvm,
    _vm_fd: VmFd,
    vcpus: Vec<Vcpu>,
    ctx: VcpuContext,
    serial: Arc<Mutex<SerialDevice>>,
    console: Arc<Console>,
    console_sink: Option<ConsoleSink>,
    rx_ready: Arc<EventFd>,
    tail: ConsoleTail,
    events: Receiver<VmEvent>,
    forward_stdin: bool,
    cmdline: String,
    devices: DeviceManager,
    profile_period: Option<Duration>,
}

impl Vm {
    /// Builds the VM described by `config`, sending console output to `out`.
    pub fn build(config: &VmConfig, out: ConsoleSink) -> Result<Vm> {
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
        // Shared (a memfd) when a vhost-user backend must map it too.
        let mem = create_memory(config.mem_size, !config.fs.is_empty())?;
        // The kernel and initrd go into it on a thread of their own while
        // the rest of the machine is set up; joined before the boot
        // structures are written.
        let staged = match &config.payload {
            Payload::Linux { kernel, initrd } => Staged::Linux(boot::BackgroundLoad::start(
                mem.clone(),
                kernel.clone(),
                initrd.clone(),
                config.mem_size,
            )?),
            Payload::Raw(raw) => Staged::Raw(raw),
        };
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

        // virtio devices: the device manager gives each an MMIO window, an
        // interrupt line and a `virtio_mmio.device=` entry, and wires its
        // queue notifications (ioeventfd) and interrupt (irqfd) into KVM.
        // Each device runs on its own thread. Disks first, so that the
        // first disk is /dev/vda whatever else is attached; then network
        // interfaces (eth0, eth1, ... in order).
        let mut devices = DeviceManager::new(mem.clone())?;
        for disk in &config.disks {
            devices.attach_block(&vm_fd, disk)?;
        }
        for (i, net) in config.nets.iter().enumerate() {
            devices.attach_net(&vm_fd, net, i)?;
        }
        // Last, so that adding a vsock device moves no disk or interface.
        if let Some(vsock) = &config.vsock {
            devices.attach_vsock(&vm_fd, vsock)?;
        }
        for fs in &config.fs {
            devices.attach_fs(&vm_fd, fs)?;
        }
        let mut device_cmdline = devices.cmdline_entries().to_vec();
        // Without an initramfs the first disk is the root filesystem.
        if config.payload.initrd().is_none() {
            if let Some(first) = config.disks.first() {
                device_cmdline.push("root=/dev/vda".into());
                // Linux mounts the root read-only unless told `rw`.
                if !first.readonly {
                    device_cmdline.push("rw".into());
                }
            }
        }

        // Kernel, initrd, command line and the structures that describe
        // the machine to the kernel; or a raw image, which gets none of
        // them (in long mode only the page tables and GDT).
        let (entry, mode, cmdline) = match staged {
            Staged::Raw(raw) => {
                let loaded = raw.load(&mem, config.mem_size)?;
                log::debug!(
                    "raw image {}: {} bytes at {:#x}, entry {:#x} in {:?} mode",
                    raw.path.display(),
                    loaded.size,
                    loaded.load,
                    loaded.entry,
                    raw.mode
                );
                if raw.mode == CpuMode::Long {
                    arch::write_long_mode_tables(&mem)?;
                }
                (loaded.entry, raw.mode, String::new())
            }
            Staged::Linux(images) => {
                let (kernel, initrd) = images.wait()?;
                log::debug!(
                    "kernel {:?}: entry {:#x}, ends at {:#x}",
                    kernel.format,
                    kernel.entry,
                    kernel.end
                );
                #[cfg(not(feature = "test-break-hardware"))]
                let quirks = config.host.cmdline_quirks();
                // scripts/test-svm.sh --self-check-broken: a build that
                // applies a PVM-only change on hardware, silently, which its
                // lane must catch.
                #[cfg(feature = "test-break-hardware")]
                let quirks = crate::host::PVM_CMDLINE;
                let cmdline = cmdline::assemble(
                    quirks,
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
                boot::write_boot_params(&mem, &params)?;
                arch::write_boot_tables(&mem, config.cpus)?;
                (kernel.entry, CpuMode::Long, cmdline)
            }
        };

        // Devices.
        let (control, events) = Control::new().map_err(host_err("eventfd"))?;
        let control = Arc::new(control);
        let tail = ConsoleTail::default();
        let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(host_err("eventfd"))?;
        vm_fd
            .register_irqfd(&serial_irq, COM1_IRQ)
            .map_err(kvm_err("KVM_IRQFD for COM1"))?;
        let rx_ready = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(host_err("eventfd"))?);
        // The UART writes into the console buffer; the console thread
        // (started by `run`) writes that to `out`.
        let console = Console::new();
        let serial = Arc::new(Mutex::new(SerialDevice::new(
            serial_irq,
            rx_ready.clone(),
            ConsoleWriter::new(console.clone(), tail.clone()),
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
            Arc::new(Mutex::new(StatusDevice::new(
                control.clone(),
                console.clone(),
            ))),
        )?;

        // vCPUs.
        let stop = control.stop_flag();
        let ctx = VcpuContext {
            pio: Arc::new(pio),
            mmio: Arc::new(devices.mmio_bus().clone()),
            control,
            mem,
            host: config.host,
            stop,
            first_run: Arc::new(OnceLock::new()),
            profile_start: config.profile_period.map(|_| Instant::now()),
            trace: config.trace.clone(),
            started: Instant::now(),
        };
        let mut vcpus = Vec::with_capacity(usize::from(config.cpus));
        for id in 0..config.cpus {
            let fd = vm_fd
                .create_vcpu(u64::from(id))
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            let vcpu = Vcpu::new(id, fd, ctx.clone());
            vcpu.configure(&kvm, config.cpus, entry, mode)?;
            vcpus.push(vcpu);
        }

        Ok(Vm {
            _kvm: kvm,
            _vm_fd: vm_fd,
            vcpus,
            ctx,
            serial,
            console,
            console_sink: Some(out),
            rx_ready,
            tail,
            events,
            forward_stdin: config.forward_stdin,
            cmdline,
            devices,
            profile_period: config.profile_period,
        })
    }

    /// The kernel command line the guest got.
    pub fn cmdline(&self) -> &str {
        &self.cmdline
    }

    /// Runs the guest to its end.
    pub fn run(mut self) -> Result<RunReport> {
        let signals = Signals::stop_signals().map_err(host_err("blocking signals"))?;
        register_signal_handler(SIGRTMIN() + KICK_SIGNAL_OFFSET, vcpu::kick_handler).map_err(
            |e| Error::Host {
                what: "installing the vCPU kick handler",
                source: std::io::Error::from_raw_os_error(e.errno()),
            },
        )?;

        let console_thread = match self.console_sink.take() {
            Some(sink) => {
                // When the guest found the transmitter busy and the thread
                // has made room: the UART's transmitter-empty interrupt.
                let serial = Arc::downgrade(&self.serial);
                let kick = Box::new(move || {
                    if let Some(serial) = serial.upgrade() {
                        serial
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .kick_transmitter();
                    }
                });
                Some(
                    ConsoleThread::start(self.console.clone(), sink, kick)
                        .map_err(host_err("spawning the console thread"))?,
                )
            }
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

        let loop_result = ControlLoop {
            control: &self.ctx.control,
            events: &self.events,
            serial: &self.serial,
            rx_ready: &self.rx_ready,
            tail: &self.tail,
            forward_stdin: self.forward_stdin,
        }
        .run(&signals);
        let ended = Instant::now();
        if let Some(s) = sampler.as_mut() {
            s.stop();
        }
        let stats = self.stop_vcpus(threads);
        // Once no vCPU can queue more work: every device thread stops
        // after its request, then the disks are flushed.
        self.devices.stop();
        // What the guest printed is written out; after a host signal only
        // briefly (stdout may be a pipe nobody reads, and vmlab must stop).
        let limit = match &loop_result {
            Ok((Outcome::Signal(_), _)) | Err(_) => CONSOLE_DRAIN_ON_SIGNAL,
            Ok(_) => CONSOLE_DRAIN,
        };
        let console = match console_thread {
            Some(thread) => thread.finish(limit),
            None => self.console.stats(),
        };
        if console.dropped > 0 {
            log::debug!(
                "console: {} bytes of guest output dropped (stdout did not take them)",
                console.dropped
            );
        }
        drop(signals);
        let (outcome, init_up) = loop_result?;
        Ok(RunReport {
            outcome,
            first_run: self.ctx.first_run.get().copied(),
            init_up,
            ended,
            stats,
            console,
        })
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

/// How long the console may take to write the guest's last output when
/// the guest ended (at most a buffer's worth, 64 KiB)...
const CONSOLE_DRAIN: Duration = Duration::from_secs(5);
/// ...and when a host signal stopped vmlab.
const CONSOLE_DRAIN_ON_SIGNAL: Duration = Duration::from_secs(1);

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
    if matches!(config.payload, Payload::Raw(_)) && config.cpus != 1 {
        return Err(Error::Config(format!(
            "--cpus {}: a --raw image runs on one vCPU (nothing would start the others)",
            config.cpus
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
    if let Some(vsock) = &config.vsock {
        crate::vsock::validate_cid(vsock.cid).map_err(Error::Config)?;
    }
    if !config.mem_size.is_multiple_of(4096) {
        return Err(Error::Config(
            "--memory must be a whole number of 4 KiB pages".into(),
        ));
    }
    Ok(())
}

fn create_memory(mem_size: u64, shared: bool) -> Result<GuestMemoryMmap> {
    let ranges: Vec<(GuestAddress, usize)> = ram_regions(mem_size)
        .into_iter()
        .map(|(start, size)| (GuestAddress(start), size as usize))
        .collect();
    let mem_err = |reason: String| Error::Memory {
        mib: mem_size >> 20,
        reason,
    };
    let mem = if shared {
        // A vhost-user backend (virtiofsd) maps guest RAM itself: every
        // region is a piece of one memfd, mapped MAP_SHARED.
        let file = memfd("vmlab-guest-ram", mem_size).map_err(|e| mem_err(e.to_string()))?;
        let mut offset = 0u64;
        let mut with_files = Vec::with_capacity(ranges.len());
        for &(start, size) in &ranges {
            let dup = file.try_clone().map_err(|e| mem_err(e.to_string()))?;
            with_files.push((start, size, Some(FileOffset::new(dup, offset))));
            offset += size as u64;
        }
        GuestMemoryMmap::from_ranges_with_files(&with_files).map_err(|e| mem_err(e.to_string()))?
    } else {
        GuestMemoryMmap::from_ranges(&ranges).map_err(|e| mem_err(e.to_string()))?
    };
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

/// An anonymous shared-memory file of `size` bytes (close-on-exec).
fn memfd(name: &str, size: u64) -> std::io::Result<std::fs::File> {
    use std::os::fd::FromRawFd;
    let name = std::ffi::CString::new(name).map_err(std::io::Error::other)?;
    // SAFETY: `name` is a NUL-terminated string that outlives the call.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: memfd_create returned a new fd that nothing else owns.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.set_len(size)?;
    Ok(file)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> VmConfig {
        VmConfig {
            payload: Payload::Linux {
                kernel: PathBuf::from("/nonexistent"),
                initrd: None,
            },
            cmdline: None,
            mem_size: 256 << 20,
            cpus: 1,
            init: InitParams::default(),
            host: HostKind::Hardware,
            forward_stdin: false,
            disks: Vec::new(),
            nets: Vec::new(),
            vsock: None,
            fs: Vec::new(),
            profile_period: None,
            trace: None,
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
}
