//! vCPU threads: set up the boot state, then run the guest and handle its
//! exits until the VM stops.
//!
//! Each vCPU runs on its own thread. Port and MMIO exits go to the buses,
//! whose devices answer at once; anything slow belongs on the event loop.
//! The control loop stops vCPUs by setting `stop` and sending each thread a
//! "kick" signal whose handler sets `kvm_run.immediate_exit`, so a thread
//! about to enter KVM_RUN returns at once instead of missing the kick.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_run, Msrs, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::arch::{cpuid, regs};
use crate::control::{Control, VmEvent};
use crate::devices::Bus;
use crate::host::HostKind;
use crate::profile::{self, Sample};
use crate::raw::CpuMode;
use crate::stats::{port_region, ExitKind, ExitStats, MmioRegion};
use crate::trace::{ExitRecord, Reason, TraceSender};

/// KVM_INTERNAL_ERROR_EMULATION.
const INTERNAL_ERROR_EMULATION: u32 = 1;
/// KVM_SYSTEM_EVENT_* types.
const SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const SYSTEM_EVENT_RESET: u32 = 2;
const SYSTEM_EVENT_CRASH: u32 = 3;

/// Errors setting a vCPU up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A KVM ioctl failed.
    #[error("vCPU {vcpu}: {what}: {source}")]
    Kvm {
        /// Which vCPU.
        vcpu: u8,
        /// The operation.
        what: &'static str,
        /// The error.
        source: kvm_ioctls::Error,
    },
    /// MSR list construction failed.
    #[error("vCPU {vcpu}: cannot build the MSR list")]
    Msrs {
        /// Which vCPU.
        vcpu: u8,
    },
    /// Not every MSR was accepted.
    #[error("vCPU {vcpu}: KVM accepted {set} of {wanted} boot MSRs")]
    MsrsPartial {
        /// Which vCPU.
        vcpu: u8,
        /// Accepted.
        set: usize,
        /// Requested.
        wanted: usize,
    },
}

thread_local! {
    /// This thread's `kvm_run`, for the kick signal handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The kick signal's handler: makes the next or current KVM_RUN of this
/// thread return at once.
pub extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    KVM_RUN.with(|run| {
        let run = run.get();
        if !run.is_null() {
            // SAFETY: the pointer is this thread's own mapped kvm_run, set
            // by `Vcpu::run` before any KVM_RUN and valid while the VcpuFd
            // lives on this thread; a byte store is async-signal-safe.
            unsafe { (*run).immediate_exit = 1 };
        }
    });
}

/// What every vCPU thread shares.
#[derive(Clone)]
pub struct VcpuContext {
    /// Port I/O devices.
    pub pio: Arc<Bus>,
    /// MMIO devices.
    pub mmio: Arc<Bus>,
    /// Where to report.
    pub control: Arc<Control>,
    /// Guest memory (for the emulation fallback).
    pub mem: GuestMemoryMmap,
    /// The host kind: its workarounds (emulation fallback, CPUID) apply
    /// on a nested PVM host only.
    pub host: HostKind,
    /// Set when the VM is stopping.
    pub stop: Arc<AtomicBool>,
    /// When the first KVM_RUN of any vCPU began.
    pub first_run: Arc<OnceLock<Instant>>,
    /// With `--profile-guest`: the profile's time origin. A kicked vCPU
    /// then records where the guest was.
    pub profile_start: Option<Instant>,
    /// With `--trace-exits`: where every exit is recorded.
    pub trace: Option<TraceSender>,
    /// The trace's time origin.
    pub started: Instant,
}

/// What an exit accessed, for the exit trace. Plain data: no allocation on
/// the vCPU path.
#[derive(Debug, Clone, Copy)]
struct Access {
    reason: Reason,
    addr: u64,
    size: u8,
    data: u64,
    region: &'static str,
}

impl Access {
    fn none(reason: Reason) -> Access {
        Access {
            reason,
            addr: 0,
            size: 0,
            data: 0,
            region: "",
        }
    }

    fn of(reason: Reason, addr: u64, data: &[u8], region: &'static str) -> Access {
        let mut bytes = [0u8; 8];
        let n = data.len().min(8);
        bytes[..n].copy_from_slice(&data[..n]);
        Access {
            reason,
            addr,
            size: u8::try_from(data.len()).unwrap_or(u8::MAX),
            data: u64::from_le_bytes(bytes),
            region,
        }
    }
}

/// One vCPU.
pub struct Vcpu {
    id: u8,
    fd: VcpuFd,
    ctx: VcpuContext,
    stats: ExitStats,
}

impl Vcpu {
    /// Wraps a created vCPU.
    pub fn new(id: u8, fd: VcpuFd, ctx: VcpuContext) -> Self {
        Vcpu {
            id,
            fd,
            ctx,
            stats: ExitStats::default(),
        }
    }

    fn kvm_err(&self, what: &'static str) -> impl Fn(kvm_ioctls::Error) -> Error + '_ {
        move |source| Error::Kvm {
            vcpu: self.id,
            what,
            source,
        }
    }

    /// Puts the vCPU in the state Linux's 64-bit boot protocol expects
    /// (`CpuMode::Long`), or, for a `--raw` image, in real mode at `entry`.
    /// Only the boot vCPU gets registers; the others wait for INIT/SIPI.
    pub fn configure(
        &self,
        kvm: &Kvm,
        cpu_count: u8,
        entry: u64,
        mode: CpuMode,
    ) -> Result<(), Error> {
        let mut cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(self.kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        cpuid::adjust_for_vcpu(cpuid.as_mut_slice(), self.id, cpu_count);
        if self.ctx.host.hide_pv_ipi() {
            cpuid::hide_pv_ipi_features(cpuid.as_mut_slice());
        }
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(self.kvm_err("KVM_SET_CPUID2"))?;

        let entries = regs::boot_msrs();
        let msrs = Msrs::from_entries(&entries).map_err(|_| Error::Msrs { vcpu: self.id })?;
        let set = self
            .fd
            .set_msrs(&msrs)
            .map_err(self.kvm_err("KVM_SET_MSRS"))?;
        if set != entries.len() {
            return Err(Error::MsrsPartial {
                vcpu: self.id,
                set,
                wanted: entries.len(),
            });
        }

        let mut lapic = self.fd.get_lapic().map_err(self.kvm_err("KVM_GET_LAPIC"))?;
        regs::set_lint(&mut lapic);
        self.fd
            .set_lapic(&lapic)
            .map_err(self.kvm_err("KVM_SET_LAPIC"))?;

        if self.id == 0 {
            self.fd
                .set_fpu(&regs::boot_fpu())
                .map_err(self.kvm_err("KVM_SET_FPU"))?;
            let mut sregs = self.fd.get_sregs().map_err(self.kvm_err("KVM_GET_SREGS"))?;
            let regs = match mode {
                CpuMode::Long => {
                    regs::set_long_mode_sregs(&mut sregs);
                    regs::boot_regs(entry)
                }
                CpuMode::Real => {
                    regs::set_real_mode_sregs(&mut sregs);
                    regs::real_mode_regs(entry)
                }
            };
            self.fd
                .set_sregs(&sregs)
                .map_err(self.kvm_err("KVM_SET_SREGS"))?;
            self.fd
                .set_regs(&regs)
                .map_err(self.kvm_err("KVM_SET_REGS"))?;
        }
        Ok(())
    }

    /// Registers at debug level, for post-mortems.
    fn log_registers(&self) {
        if !log::log_enabled!(log::Level::Debug) {
            return;
        }
        if let Ok(r) = self.fd.get_regs() {
            log::debug!(
                "vCPU {}: rip={:#x} rsp={:#x} rflags={:#x} rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} rsi={:#x} rdi={:#x}",
                self.id, r.rip, r.rsp, r.rflags, r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi
            );
        }
        if let Ok(s) = self.fd.get_sregs() {
            log::debug!(
                "vCPU {}: cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x} cs={:#x}",
                self.id,
                s.cr0,
                s.cr2,
                s.cr3,
                s.cr4,
                s.efer,
                s.cs.selector
            );
        }
    }

    fn fatal(&self, message: String) {
        self.log_registers();
        self.ctx.control.send(VmEvent::Fatal {
            vcpu: self.id,
            message,
        });
    }

    /// Runs the guest until the VM stops; returns this vCPU's statistics.
    pub fn run(mut self) -> ExitStats {
        let run_ptr: *mut kvm_run = self.fd.get_kvm_run();
        KVM_RUN.with(|r| r.set(run_ptr));
        while !self.ctx.stop.load(Ordering::Acquire) {
            self.ctx.first_run.get_or_init(Instant::now);
            let entered = Instant::now();
            let result = self.fd.run();
            let exited = Instant::now();
            self.stats.in_guest += exited - entered;
            let (kind, keep_going, access) = match result {
                Ok(exit) => Self::handle_exit(self.id, exit, &self.ctx),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => (
                    ExitKind::Interrupted,
                    Outcome::Continue,
                    Access::none(Reason::Interrupted),
                ),
                Err(e) => (
                    ExitKind::RunError,
                    Outcome::Fatal(format!("KVM_RUN failed: {e}")),
                    Access::none(Reason::Other),
                ),
            };
            let access = match keep_going {
                Outcome::Emulate => Access::none(Reason::Emulation),
                _ => access,
            };
            let kind = match keep_going {
                Outcome::Continue => kind,
                Outcome::Emulate => self.emulate(),
                Outcome::InternalError(suberror) => {
                    self.fatal(format!(
                        "KVM internal error (suberror {suberror}): KVM could not run the guest's \
                         instruction"
                    ));
                    self.trace_exit(access, exited);
                    self.stats.record(kind, exited.elapsed());
                    break;
                }
                Outcome::Fatal(message) => {
                    self.fatal(message);
                    self.trace_exit(access, exited);
                    self.stats.record(kind, exited.elapsed());
                    break;
                }
                Outcome::Stop(event) => {
                    if matches!(event, VmEvent::TripleFault { .. }) {
                        self.log_registers();
                    }
                    self.ctx.control.send(event);
                    self.trace_exit(access, exited);
                    self.stats.record(kind, exited.elapsed());
                    break;
                }
            };
            if kind == ExitKind::Interrupted {
                self.fd.set_kvm_immediate_exit(0);
                if let Some(start) = self.ctx.profile_start {
                    if let Ok(r) = self.fd.get_regs() {
                        let mut sample = Sample::new(start, self.id, r.rip, r.rflags);
                        sample.stack = self.stack_return_candidates(r.rsp);
                        self.stats.samples.push(sample);
                    }
                }
            }
            self.trace_exit(access, exited);
            self.stats.record(kind, exited.elapsed());
        }
        KVM_RUN.with(|r| r.set(std::ptr::null_mut()));
        self.stats
    }

    /// Records one exit in the `--trace-exits` file, if there is one.
    /// KVM_RUN returning for vmlab's own signal (a kick) is not the
    /// guest's doing and is left out.
    fn trace_exit(&self, access: Access, exited: Instant) {
        let Some(trace) = &self.ctx.trace else { return };
        if access.reason == Reason::Interrupted {
            return;
        }
        let ns = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        trace.record(ExitRecord {
            t_ns: ns(exited.saturating_duration_since(self.ctx.started)),
            vcpu: self.id,
            reason: access.reason,
            addr: access.addr,
            size: access.size,
            data: access.data,
            region: access.region,
            handle_ns: ns(exited.elapsed()),
        });
    }

    /// For the guest profiler: the words on the guest's stack at `rsp`
    /// that look like kernel-text addresses (the "guess" way of
    /// unwinding: some are stale, most are return addresses). Reads at
    /// most [`profile::STACK_SCAN_BYTES`] through KVM's page walk; a stack
    /// that is not mapped gives nothing.
    fn stack_return_candidates(&self, rsp: u64) -> Vec<u64> {
        let mut found = Vec::new();
        let mut addr = rsp & !7;
        let end = addr.saturating_add(profile::STACK_SCAN_BYTES);
        while addr < end && found.len() < profile::STACK_MAX_FRAMES {
            let page_end = (addr | 0xfff).saturating_add(1).min(end);
            let Ok(t) = self.fd.translate_gva(addr) else {
                break;
            };
            if t.valid == 0 {
                break;
            }
            let mut buf = vec![0u8; (page_end - addr) as usize];
            if self
                .ctx
                .mem
                .read_slice(&mut buf, GuestAddress(t.physical_address))
                .is_err()
            {
                break;
            }
            for w in buf.chunks_exact(8) {
                let mut b = [0u8; 8];
                b.copy_from_slice(w);
                let v = u64::from_le_bytes(b);
                if profile::looks_like_kernel_text(v) {
                    found.push(v);
                    if found.len() == profile::STACK_MAX_FRAMES {
                        break;
                    }
                }
            }
            addr = page_end;
        }
        found
    }

    /// Handles an instruction KVM's emulator rejected. Returns the exit
    /// kind, or stops the VM when it cannot be emulated.
    fn emulate(&mut self) -> ExitKind {
        match crate::emulate::handle_emulation_failure(&mut self.fd, &self.ctx.mem) {
            Ok(done) => ExitKind::Emulated(done.insn),
            Err(e) => {
                self.fatal(format!(
                    "KVM rejected an instruction and vmlab cannot emulate it: {e}"
                ));
                self.ctx.stop.store(true, Ordering::Release);
                ExitKind::EmulationFailed
            }
        }
    }

    fn handle_exit(id: u8, exit: VcpuExit<'_>, ctx: &VcpuContext) -> (ExitKind, Outcome, Access) {
        let (kind, outcome) = match exit {
            VcpuExit::IoIn(port, data) => {
                if !ctx.pio.read(u64::from(port), data) {
                    // Nothing there: a floating ISA bus reads all ones.
                    data.fill(0xff);
                }
                let access = Access::of(Reason::IoIn, port.into(), data, port_region(port));
                return (ExitKind::IoIn(port), Outcome::Continue, access);
            }
            VcpuExit::IoOut(port, data) => {
                ctx.pio.write(u64::from(port), data);
                let access = Access::of(Reason::IoOut, port.into(), data, port_region(port));
                return (ExitKind::IoOut(port), Outcome::Continue, access);
            }
            VcpuExit::MmioRead(addr, data) => {
                if !ctx.mmio.read(addr, data) {
                    data.fill(0xff);
                }
                let region = mmio_region(addr);
                let access = Access::of(Reason::MmioRead, addr, data, region.name());
                return (ExitKind::MmioRead(region), Outcome::Continue, access);
            }
            VcpuExit::MmioWrite(addr, data) => {
                ctx.mmio.write(addr, data);
                let region = mmio_region(addr);
                let access = Access::of(Reason::MmioWrite, addr, data, region.name());
                return (ExitKind::MmioWrite(region), Outcome::Continue, access);
            }
            VcpuExit::Hlt => (ExitKind::Hlt, Outcome::Stop(VmEvent::Halt)),
            VcpuExit::Shutdown => (
                ExitKind::Shutdown,
                Outcome::Stop(VmEvent::TripleFault { vcpu: id }),
            ),
            VcpuExit::SystemEvent(kind, _) => {
                let event = match kind {
                    SYSTEM_EVENT_RESET | SYSTEM_EVENT_SHUTDOWN => VmEvent::Reset,
                    SYSTEM_EVENT_CRASH => VmEvent::Fatal {
                        vcpu: id,
                        message: "KVM reported a guest crash".into(),
                    },
                    other => VmEvent::Fatal {
                        vcpu: id,
                        message: format!("unknown KVM system event {other}"),
                    },
                };
                (ExitKind::SystemEvent, Outcome::Stop(event))
            }
            VcpuExit::InternalError => {
                // The suberror says whether this is an emulation failure.
                let suberror = internal_suberror();
                if suberror == INTERNAL_ERROR_EMULATION && ctx.host.emulation_fallback() {
                    (ExitKind::InternalError, Outcome::Emulate)
                } else {
                    (ExitKind::InternalError, Outcome::InternalError(suberror))
                }
            }
            VcpuExit::FailEntry(reason, cpu) => (
                ExitKind::FailEntry,
                Outcome::Fatal(format!(
                    "KVM could not enter the guest (hardware reason {reason:#x}, host CPU {cpu})"
                )),
            ),
            VcpuExit::Intr => (ExitKind::Interrupted, Outcome::Continue),
            other => (
                ExitKind::Unexpected,
                Outcome::Fatal(format!("unexpected VM exit {other:?}")),
            ),
        };
        let reason = match kind {
            ExitKind::Hlt => Reason::Hlt,
            ExitKind::Shutdown => Reason::Shutdown,
            ExitKind::SystemEvent => Reason::SystemEvent,
            ExitKind::Interrupted => Reason::Interrupted,
            _ => Reason::Other,
        };
        (kind, outcome, Access::none(reason))
    }
}

/// What the run loop does after an exit.
enum Outcome {
    Continue,
    Emulate,
    InternalError(u32),
    Fatal(String),
    Stop(VmEvent),
}

/// Reads `kvm_run.internal.suberror` of this thread's vCPU.
fn internal_suberror() -> u32 {
    KVM_RUN.with(|run| {
        let run = run.get();
        if run.is_null() {
            return 0;
        }
        // SAFETY: `run` is this thread's mapped kvm_run (see `Vcpu::run`),
        // and after a KVM_EXIT_INTERNAL_ERROR exit the `internal` member of
        // the union is the one KVM filled.
        unsafe { (*run).__bindgen_anon_1.internal.suberror }
    })
}

/// The MMIO region an address falls in, for statistics.
fn mmio_region(addr: u64) -> MmioRegion {
    use crate::arch::layout::{IOAPIC_START, LAPIC_START, VIRTIO_MMIO_START};
    if (VIRTIO_MMIO_START..IOAPIC_START).contains(&addr) {
        MmioRegion::VirtioMmio
    } else if (IOAPIC_START..IOAPIC_START + 0x1000).contains(&addr) {
        MmioRegion::Ioapic
    } else if (LAPIC_START..LAPIC_START + 0x1000).contains(&addr) {
        MmioRegion::Lapic
    } else {
        MmioRegion::Unassigned
    }
}

/// How long to keep kicking a vCPU thread before giving up on it.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(2);
