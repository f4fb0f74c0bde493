//! User-space fallback for instructions that the host's KVM instruction emulator rejects.
//!
//! # Why this exists
//!
//! On a host with hardware virtualization (VMX/SVM) the guest executes almost every
//! instruction natively and KVM's instruction emulator only sees a handful of MMIO and
//! special cases. On a host whose `/dev/kvm` is a software or nested implementation (for
//! example the `kvm_pvm` module, see docs/HOST.md), long stretches of guest
//! code (early boot, anything run with interrupts disabled) go through KVM's x86 emulator,
//! which does not implement every instruction. When it meets one it does not know, the vCPU
//! exits with `KVM_EXIT_INTERNAL_ERROR` / `KVM_INTERNAL_ERROR_EMULATION`. Linux guests hit a
//! small, stable set of such instructions (`fwait`, `popcnt`, `clac`, `ldmxcsr`, `int3`,
//! `lock cmpxchg16b`, `pshufb`, ...), so the VMM can emulate exactly those in user space and
//! resume the vCPU instead of killing the guest.
//!
//! # Structure
//!
//! * A pure, KVM-free core: the [`GuestCpu`] trait (the few operations emulation needs) and
//!   [`emulate`], which decodes one instruction with `iced-x86` and carries it out. It is
//!   unit-tested against a fake CPU and a random-bytes fuzz test: instruction bytes come from
//!   an untrusted guest, so nothing here may panic.
//! * A thin KVM adapter: [`handle_emulation_failure`] reads the instruction bytes that KVM put
//!   into `kvm_run`, runs [`emulate`] on the stopped vCPU and writes the state back;
//!   [`enable_exit_on_emulation_failure`] turns on the capability that makes KVM report the
//!   bytes (and stops it from queueing a `#UD` of its own).
//!
//! On a host with hardware virtualization none of this runs: the exits never happen.
//!
//! # Limitations
//!
//! * Memory operands are translated with `KVM_TRANSLATE`, a supervisor page walk that
//!   reports neither write protection nor user/supervisor rights. So no `#PF` is ever
//!   injected (an unmapped operand is an [`EmulateError::Memory`] and the VMM stops the
//!   guest), write protection, SMAP and protection keys are not enforced, and memory
//!   operands at CPL 3 are refused outright so that guest user space cannot use the
//!   emulator to reach kernel memory. Segment bases are honoured (FS/GS in 64-bit mode,
//!   all segments otherwise); segment limits and access rights are not checked.
//! * `cmpxchg16b` and aligned `cmpxchg8b` are atomic on host memory (`lock cmpxchg16b` /
//!   `AtomicU64`), so other vCPUs see them atomically; a `cmpxchg8b` that is misaligned or
//!   crosses a page is a plain read-compare-write (atomic only with respect to this vCPU).
//! * `int3` is delivered as an injected `#BP` (`KVM_SET_VCPU_EVENTS`) with RIP already past
//!   it. On `kvm_pvm` the guest's handler sees the return address after the `int3` (tested);
//!   VMX/SVM KVM would add its own idea of the instruction length to soft exceptions, but
//!   there `int3` never fails emulation, so this code does not run.
//! * `fwait` with an unmasked x87 exception pending and CR0.NE = 0 (legacy FERR# reporting)
//!   is not emulated. Single-step (`RFLAGS.TF`) traps, debug-register breakpoints and `#AC`
//!   alignment checks are not raised for emulated instructions.
//! * MXCSR_MASK comes from the vCPU's XSAVE image (0xFFBF if it reads 0). MXCSR and XMM
//!   registers go through `KVM_GET/SET_XSAVE`: `KVM_SET_FPU` ignores MXCSR.
//! * Of the instructions in the host notes, `xrstor`/`xrstors` are not emulated (boot the
//!   guest with `noxsave`).

use std::fmt;
use std::sync::atomic::Ordering;

use iced_x86::{Code, Decoder, DecoderError, DecoderOptions, Instruction, OpKind, Register};
use kvm_bindings::{
    kvm_enable_cap, kvm_regs, kvm_run, kvm_sregs, kvm_xsave, KVM_CAP_EXIT_ON_EMULATION_FAILURE,
    KVM_EXIT_INTERNAL_ERROR, KVM_INTERNAL_ERROR_EMULATION,
    KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES, KVM_VCPUEVENT_VALID_SHADOW,
};
use kvm_ioctls::{VcpuFd, VmFd};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Longest legal x86 instruction, in bytes.
pub const MAX_INSN_LEN: usize = 15;

// RFLAGS bits.
const RFLAGS_CF: u64 = 1 << 0;
const RFLAGS_PF: u64 = 1 << 2;
const RFLAGS_AF: u64 = 1 << 4;
const RFLAGS_ZF: u64 = 1 << 6;
const RFLAGS_SF: u64 = 1 << 7;
const RFLAGS_OF: u64 = 1 << 11;
const RFLAGS_RF: u64 = 1 << 16;
const RFLAGS_VM: u64 = 1 << 17;
const RFLAGS_AC: u64 = 1 << 18;
/// The six arithmetic status flags.
const RFLAGS_STATUS: u64 = RFLAGS_CF | RFLAGS_PF | RFLAGS_AF | RFLAGS_ZF | RFLAGS_SF | RFLAGS_OF;

// Control-register bits.
const CR0_PE: u64 = 1 << 0;
const CR0_MP: u64 = 1 << 1;
const CR0_EM: u64 = 1 << 2;
const CR0_TS: u64 = 1 << 3;
const CR0_NE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_LA57: u64 = 1 << 12;
const EFER_LMA: u64 = 1 << 10;

/// MXCSR "misaligned exception mask" (AMD misaligned SSE mode): when set, legacy SSE
/// instructions do not fault on unaligned 16-byte memory operands.
const MXCSR_MM: u32 = 1 << 17;
/// MXCSR_MASK to assume when the CPU reports 0 there (SDM vol. 1, 11.6.6: no DAZ support).
const MXCSR_MASK_DEFAULT: u32 = 0xffbf;

// Exception vectors.
const VEC_BP: u8 = 3;
const VEC_UD: u8 = 6;
const VEC_NM: u8 = 7;
const VEC_SS: u8 = 12;
const VEC_GP: u8 = 13;
const VEC_MF: u8 = 16;

/// Default operand/address size of the code being executed, as the decoder needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Bitness {
    /// Real mode, virtual-8086 mode, or a 16-bit protected-mode code segment.
    Bits16,
    /// 32-bit protected mode or compatibility mode.
    Bits32,
    /// 64-bit mode (IA-32e with CS.L = 1).
    Bits64,
}

impl Bitness {
    /// Number of bits, as `iced_x86::Decoder` wants it.
    pub const fn bits(self) -> u32 {
        match self {
            Bitness::Bits16 => 16,
            Bitness::Bits32 => 32,
            Bitness::Bits64 => 64,
        }
    }

    /// Mask applied to the instruction pointer after advancing it (IP wraps at the
    /// operand size: 64 KiB in 16-bit code, 4 GiB in 32-bit code).
    const fn ip_mask(self) -> u64 {
        match self {
            Bitness::Bits16 => 0xffff,
            Bitness::Bits32 => 0xffff_ffff,
            Bitness::Bits64 => u64::MAX,
        }
    }
}

/// The parts of the processor mode that decide how an instruction decodes and which
/// exceptions it raises. Built from `KVM_GET_SREGS` by [`CpuMode::from_sregs`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuMode {
    /// Code size (decoder bitness).
    pub bitness: Bitness,
    /// CR0.PE: protected mode. Exceptions only push error codes in protected mode.
    pub protected: bool,
    /// RFLAGS.VM: virtual-8086 mode (CPL 3, 16-bit).
    pub vm86: bool,
    /// Current privilege level (0..=3).
    pub cpl: u8,
    /// CR0 (EM/TS/MP/NE decide SSE and x87 exceptions).
    pub cr0: u64,
    /// CR4 (OSFXSR enables SSE, LA57 widens canonical addresses).
    pub cr4: u64,
}

impl CpuMode {
    /// Real-address mode right after reset, but with SSE enabled (CR4.OSFXSR) so that the
    /// SSE instructions can be exercised; handy for tests.
    pub const fn real_mode() -> Self {
        CpuMode {
            bitness: Bitness::Bits16,
            protected: false,
            vm86: false,
            cpl: 0,
            cr0: 0x10, // ET
            cr4: CR4_OSFXSR,
        }
    }

    /// 64-bit mode at CPL 0 with the CR0/CR4 bits a Linux kernel sets
    /// (PE MP ET NE WP PG; PAE OSFXSR OSXMMEXCPT).
    pub const fn long_mode_kernel() -> Self {
        CpuMode {
            bitness: Bitness::Bits64,
            protected: true,
            vm86: false,
            cpl: 0,
            cr0: 0x8005_0033,
            cr4: 0x620,
        }
    }

    /// 32-bit protected mode at CPL 0, paging off, SSE enabled.
    pub const fn protected32_kernel() -> Self {
        CpuMode {
            bitness: Bitness::Bits32,
            protected: true,
            vm86: false,
            cpl: 0,
            cr0: 0x33,
            cr4: CR4_OSFXSR,
        }
    }

    /// Derives the mode from the vCPU's special registers and RFLAGS.
    ///
    /// Bitness follows the SDM: no CR0.PE or RFLAGS.VM means 16-bit; EFER.LMA with CS.L
    /// means 64-bit; otherwise CS.D/B picks 32 or 16. The CPL is taken from SS.DPL, which is
    /// what KVM keeps in sync with the CPL on both VMX and SVM.
    pub fn from_sregs(sregs: &kvm_sregs, rflags: u64) -> Self {
        let protected = sregs.cr0 & CR0_PE != 0;
        let vm86 = protected && rflags & RFLAGS_VM != 0;
        let bitness = if !protected || vm86 {
            Bitness::Bits16
        } else if sregs.efer & EFER_LMA != 0 && sregs.cs.l != 0 {
            Bitness::Bits64
        } else if sregs.cs.db != 0 {
            Bitness::Bits32
        } else {
            Bitness::Bits16
        };
        let cpl = if !protected {
            0
        } else if vm86 {
            3
        } else {
            sregs.ss.dpl & 3
        };
        CpuMode {
            bitness,
            protected,
            vm86,
            cpl,
            cr0: sregs.cr0,
            cr4: sregs.cr4,
        }
    }
}

/// A segment register, for [`GuestCpu::segment_base`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Segment {
    /// ES
    Es,
    /// CS
    Cs,
    /// SS
    Ss,
    /// DS
    Ds,
    /// FS
    Fs,
    /// GS
    Gs,
}

impl Segment {
    fn from_iced(reg: Register) -> Option<Segment> {
        Some(match reg {
            Register::ES => Segment::Es,
            Register::CS => Segment::Cs,
            Register::SS => Segment::Ss,
            Register::DS => Segment::Ds,
            Register::FS => Segment::Fs,
            Register::GS => Segment::Gs,
            _ => return None,
        })
    }
}

/// An exception to deliver to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Exception {
    /// Vector number (3 = #BP, 6 = #UD, 13 = #GP, ...).
    pub vector: u8,
    /// Error code pushed by the CPU, for the vectors that have one (and only in protected
    /// mode: real-mode delivery never pushes one).
    pub error_code: Option<u32>,
}

impl Exception {
    const fn new(vector: u8) -> Self {
        Exception {
            vector,
            error_code: None,
        }
    }

    const fn with_code(vector: u8, code: u32) -> Self {
        Exception {
            vector,
            error_code: Some(code),
        }
    }
}

impl fmt::Display for Exception {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self.vector {
            0 => "#DE",
            1 => "#DB",
            3 => "#BP",
            6 => "#UD",
            7 => "#NM",
            8 => "#DF",
            12 => "#SS",
            13 => "#GP",
            14 => "#PF",
            16 => "#MF",
            17 => "#AC",
            19 => "#XM",
            _ => return write!(f, "vector {}", self.vector),
        };
        match self.error_code {
            Some(code) => write!(f, "{name}({code:#x})"),
            None => f.write_str(name),
        }
    }
}

/// The instructions this module emulates; used as a key for exit statistics
/// ("emulation fallbacks by instruction").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EmulatedInsn {
    /// `fwait` / `wait` (9B).
    Fwait,
    /// `popcnt r, r/m` (F3 0F B8), 16/32/64-bit.
    Popcnt,
    /// `clac` (0F 01 CA).
    Clac,
    /// `stac` (0F 01 CB).
    Stac,
    /// `ldmxcsr m32` (0F AE /2).
    Ldmxcsr,
    /// `stmxcsr m32` (0F AE /3).
    Stmxcsr,
    /// `int3` (CC).
    Int3,
    /// `cmpxchg8b m64` (0F C7 /1).
    Cmpxchg8b,
    /// `cmpxchg16b m128` (REX.W 0F C7 /1).
    Cmpxchg16b,
    /// `pshufb xmm, xmm/m128` (66 0F 38 00).
    Pshufb,
    /// Not an instruction this module emulated: one it could not, met in guest user space
    /// (CPL 3), for which `#UD` was delivered to the guest process instead of stopping the
    /// VM (see [`handle_emulation_failure`]).
    UserUd,
}

impl EmulatedInsn {
    /// Every variant, e.g. to pre-populate a statistics table.
    pub const ALL: [EmulatedInsn; 11] = [
        EmulatedInsn::Fwait,
        EmulatedInsn::Popcnt,
        EmulatedInsn::Clac,
        EmulatedInsn::Stac,
        EmulatedInsn::Ldmxcsr,
        EmulatedInsn::Stmxcsr,
        EmulatedInsn::Int3,
        EmulatedInsn::Cmpxchg8b,
        EmulatedInsn::Cmpxchg16b,
        EmulatedInsn::Pshufb,
        EmulatedInsn::UserUd,
    ];

    /// Lower-case mnemonic.
    pub const fn mnemonic(self) -> &'static str {
        match self {
            EmulatedInsn::Fwait => "fwait",
            EmulatedInsn::Popcnt => "popcnt",
            EmulatedInsn::Clac => "clac",
            EmulatedInsn::Stac => "stac",
            EmulatedInsn::Ldmxcsr => "ldmxcsr",
            EmulatedInsn::Stmxcsr => "stmxcsr",
            EmulatedInsn::Int3 => "int3",
            EmulatedInsn::Cmpxchg8b => "cmpxchg8b",
            EmulatedInsn::Cmpxchg16b => "cmpxchg16b",
            EmulatedInsn::Pshufb => "pshufb",
            EmulatedInsn::UserUd => "#UD to user space",
        }
    }
}

impl fmt::Display for EmulatedInsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.mnemonic())
    }
}

/// What [`emulate`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Emulated {
    /// Which instruction it was.
    pub insn: EmulatedInsn,
    /// Its length in bytes.
    pub len: usize,
    /// The exception delivered to the guest, if any. For a fault (`#UD`, `#NM`, `#GP`,
    /// `#MF`, ...) RIP still points at the instruction and nothing else changed; for the
    /// `int3` trap RIP points past it.
    pub exception: Option<Exception>,
}

impl Emulated {
    /// Lower-case mnemonic of the emulated instruction (the statistics key).
    pub const fn mnemonic(&self) -> &'static str {
        self.insn.mnemonic()
    }
}

/// Displays the mnemonic only (`popcnt`), so that it can serve as a statistics key.
impl fmt::Display for Emulated {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.mnemonic())
    }
}

/// Instruction bytes, displayed as space-separated hex (`f3 48 0f b8 c3`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InsnBytes(pub Vec<u8>);

impl InsnBytes {
    fn of(bytes: &[u8]) -> Self {
        InsnBytes(bytes.to_vec())
    }
}

impl fmt::Display for InsnBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("(none)");
        }
        for (i, b) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// Direction of a guest-memory access, for error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Load.
    Read,
    /// Store.
    Write,
}

impl fmt::Display for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Access::Read => "read",
            Access::Write => "write",
        })
    }
}

/// Why an instruction could not be emulated. The vCPU state is left untouched when one of
/// these is returned (except where noted), so the VMM can report it and stop the guest.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum EmulateError {
    /// The vCPU's last exit was not an instruction-emulation failure.
    #[error("last KVM exit is not an instruction-emulation failure (exit reason {exit_reason}, suberror {suberror})")]
    NotEmulationFailure {
        /// `kvm_run.exit_reason`.
        exit_reason: u32,
        /// `kvm_run.internal.suberror` (only meaningful for `KVM_EXIT_INTERNAL_ERROR`).
        suberror: u32,
    },
    /// KVM did not include the instruction bytes.
    #[error("emulation-failure exit carries no instruction bytes (flags {flags:#x}, ndata {ndata}); is KVM_CAP_EXIT_ON_EMULATION_FAILURE enabled and the kernel >= 5.14?")]
    NoInstructionBytes {
        /// `kvm_run.emulation_failure.flags` (0 if `ndata` is 0).
        flags: u64,
        /// `kvm_run.internal.ndata`.
        ndata: u32,
    },
    /// KVM reported an instruction length outside 1..=15.
    #[error("emulation-failure exit reports {0} instruction bytes (must be 1..=15)")]
    BadInstructionLength(u8),
    /// The bytes end before the instruction does.
    #[error("instruction bytes end in the middle of an instruction: {bytes}")]
    Truncated {
        /// The bytes that were available.
        bytes: InsnBytes,
    },
    /// The bytes are not a valid instruction in this mode.
    #[error("undecodable instruction bytes in {bitness}-bit mode: {bytes}")]
    Undecodable {
        /// The bytes that were available.
        bytes: InsnBytes,
        /// Decoder bitness.
        bitness: u32,
    },
    /// A valid instruction this module does not emulate.
    #[error("instruction `{mnemonic}` is not emulated (bytes {bytes})")]
    Unsupported {
        /// Lower-case mnemonic as decoded.
        mnemonic: String,
        /// The instruction's bytes.
        bytes: InsnBytes,
    },
    /// An emulated instruction in a situation this module does not handle.
    #[error("`{mnemonic}` cannot be emulated here: {reason} (bytes {bytes})")]
    UnsupportedCase {
        /// Lower-case mnemonic.
        mnemonic: &'static str,
        /// What is missing.
        reason: &'static str,
        /// The instruction's bytes.
        bytes: InsnBytes,
    },
    /// The memory operand's address could not be computed.
    #[error("cannot compute the memory operand's address (bytes {bytes})")]
    Address {
        /// The instruction's bytes.
        bytes: InsnBytes,
    },
    /// A guest-memory access failed (not mapped in the guest page tables, outside guest
    /// RAM, refused, ...). No `#PF` is injected: the VMM should stop the guest.
    #[error("guest memory {access} of {len} bytes at linear address {addr:#x} failed: {reason}")]
    Memory {
        /// Guest linear (virtual) address.
        addr: u64,
        /// Access size in bytes.
        len: usize,
        /// Load or store.
        access: Access,
        /// Why it failed.
        reason: String,
    },
    /// The guest already has an exception queued, and emulation wants to add another.
    #[error("cannot deliver {new}: {existing} is already queued")]
    ExceptionPending {
        /// The queued one.
        existing: Exception,
        /// The one emulation wanted to deliver.
        new: Exception,
    },
    /// A KVM ioctl failed. If this happens while writing state back, part of the state may
    /// already have been written.
    #[error("{op} failed: {source}")]
    Kvm {
        /// The ioctl.
        op: &'static str,
        /// The errno.
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// Read, compare, write back if equal: not atomic against other vCPUs. The
/// default for [`GuestCpu`] implementors that cannot do better, and the KVM
/// adapter's fallback when the operand has no single host mapping.
fn compare_exchange_bytes<C: GuestCpu + ?Sized, const N: usize>(
    cpu: &mut C,
    addr: u64,
    current: [u8; N],
    new: [u8; N],
) -> Result<[u8; N], EmulateError> {
    let mut old = [0u8; N];
    cpu.read_memory(addr, &mut old)?;
    if old == current {
        cpu.write_memory(addr, &new)?;
    }
    Ok(old)
}

/// The operations emulation needs from a stopped vCPU and its memory.
///
/// General registers are numbered in instruction-encoding order: 0 RAX, 1 RCX, 2 RDX,
/// 3 RBX, 4 RSP, 5 RBP, 6 RSI, 7 RDI, 8..=15 R8..R15; [`emulate`] only passes 0..=15.
/// Memory is addressed by guest *linear* address (segment base already added by
/// [`emulate`]); the implementor translates through the guest page tables and must refuse,
/// with an error, anything that is not guest memory.
pub trait GuestCpu {
    /// Reads a 64-bit general register (`index` in 0..=15).
    fn gpr(&self, index: usize) -> u64;
    /// Writes a 64-bit general register (`index` in 0..=15).
    fn set_gpr(&mut self, index: usize, value: u64);
    /// RIP.
    fn rip(&self) -> u64;
    /// Sets RIP.
    fn set_rip(&mut self, rip: u64);
    /// RFLAGS.
    fn rflags(&self) -> u64;
    /// Sets RFLAGS.
    fn set_rflags(&mut self, rflags: u64);
    /// Base address of a segment (in 64-bit mode only FS and GS are asked for).
    fn segment_base(&self, segment: Segment) -> u64;

    /// Reads `buf.len()` bytes at guest linear address `addr`.
    fn read_memory(&mut self, addr: u64, buf: &mut [u8]) -> Result<(), EmulateError>;
    /// Writes `data` at guest linear address `addr`.
    fn write_memory(&mut self, addr: u64, data: &[u8]) -> Result<(), EmulateError>;

    /// Atomically replaces the 8 bytes at `addr` with `new` if they equal `current`;
    /// returns the previous contents either way.
    ///
    /// The default is a plain read-compare-write, which is only atomic with respect to this
    /// vCPU (it is stopped); implementors with access to host memory should override it.
    fn compare_exchange_u64(
        &mut self,
        addr: u64,
        current: u64,
        new: u64,
    ) -> Result<u64, EmulateError> {
        compare_exchange_bytes(self, addr, current.to_le_bytes(), new.to_le_bytes())
            .map(u64::from_le_bytes)
    }

    /// 16-byte version of [`GuestCpu::compare_exchange_u64`] (`addr` is 16-byte aligned).
    fn compare_exchange_u128(
        &mut self,
        addr: u64,
        current: u128,
        new: u128,
    ) -> Result<u128, EmulateError> {
        compare_exchange_bytes(self, addr, current.to_le_bytes(), new.to_le_bytes())
            .map(u128::from_le_bytes)
    }

    /// x87 control word and status word (FCW, FSW).
    fn x87_control_status(&mut self) -> Result<(u16, u16), EmulateError>;
    /// MXCSR.
    fn mxcsr(&mut self) -> Result<u32, EmulateError>;
    /// MXCSR_MASK: the MXCSR bits the CPU supports; writing any other bit is a `#GP`.
    /// The default (0xFFFF) is what every CPU with DAZ reports, minus AMD's MM bit.
    fn mxcsr_mask(&mut self) -> Result<u32, EmulateError> {
        Ok(0xffff)
    }
    /// Sets MXCSR (only called with bits inside [`GuestCpu::mxcsr_mask`]).
    fn set_mxcsr(&mut self, value: u32) -> Result<(), EmulateError>;
    /// Reads XMM register `index` (0..=15), little-endian bytes.
    fn xmm(&mut self, index: usize) -> Result<[u8; 16], EmulateError>;
    /// Writes XMM register `index` (0..=15).
    fn set_xmm(&mut self, index: usize, value: [u8; 16]) -> Result<(), EmulateError>;

    /// Delivers an exception to the guest when it resumes, with the registers as set by
    /// emulation: RIP unchanged for a fault, past the instruction for a trap (`int3`).
    fn inject_exception(&mut self, exception: Exception) -> Result<(), EmulateError>;
}

/// How an instruction handler ended, apart from errors.
enum Completion {
    /// Done: advance RIP past the instruction.
    Advance,
    /// Done, and a trap-type exception follows (RIP past the instruction, like `int3`).
    Trap(Exception),
}

/// Non-success outcomes of a handler: a fault to deliver (nothing else changes) or an error.
enum Flow {
    Fault(Exception),
    Error(EmulateError),
}

impl From<EmulateError> for Flow {
    fn from(e: EmulateError) -> Self {
        Flow::Error(e)
    }
}

type Step<T> = Result<T, Flow>;

/// The decoded instruction with what the handlers need to know about it.
struct Ctx<'a> {
    insn: &'a Instruction,
    bytes: &'a [u8],
    mode: CpuMode,
}

impl Ctx<'_> {
    fn bytes(&self) -> InsnBytes {
        InsnBytes::of(self.bytes)
    }
}

/// Decodes the first instruction in `bytes` (as fetched at the vCPU's RIP) and emulates it
/// on `cpu`, advancing RIP, or delivers the exception the instruction raises.
///
/// `bytes` may be longer than the instruction (KVM reports up to 15 fetched bytes, not the
/// instruction length); extra bytes are ignored. Nothing is changed when an error is
/// returned. Never panics, whatever the bytes.
pub fn emulate(
    cpu: &mut impl GuestCpu,
    bytes: &[u8],
    mode: CpuMode,
) -> Result<Emulated, EmulateError> {
    let bytes = &bytes[..bytes.len().min(MAX_INSN_LEN)];
    let bitness = mode.bitness.bits();
    let ip = cpu.rip() & mode.bitness.ip_mask();
    let undecodable = || EmulateError::Undecodable {
        bytes: InsnBytes::of(bytes),
        bitness,
    };
    if bytes.is_empty() {
        return Err(EmulateError::Truncated {
            bytes: InsnBytes::default(),
        });
    }
    let mut decoder = Decoder::try_with_ip(bitness, bytes, ip, DecoderOptions::NONE)
        .map_err(|_| undecodable())?;
    let insn = decoder.decode();
    if insn.is_invalid() {
        return Err(match decoder.last_error() {
            // With 15 bytes available, running out means the instruction would be too long.
            DecoderError::NoMoreBytes if bytes.len() < MAX_INSN_LEN => EmulateError::Truncated {
                bytes: InsnBytes::of(bytes),
            },
            _ => undecodable(),
        });
    }
    let len = insn.len();
    let ctx = Ctx {
        insn: &insn,
        bytes: bytes.get(..len).unwrap_or(bytes),
        mode,
    };
    let (kind, step) = match insn.code() {
        Code::Wait => (EmulatedInsn::Fwait, fwait(cpu, &ctx)),
        Code::Popcnt_r16_rm16 | Code::Popcnt_r32_rm32 | Code::Popcnt_r64_rm64 => {
            (EmulatedInsn::Popcnt, popcnt(cpu, &ctx))
        }
        Code::Clac => (EmulatedInsn::Clac, set_ac(cpu, &ctx, false)),
        Code::Stac => (EmulatedInsn::Stac, set_ac(cpu, &ctx, true)),
        Code::Ldmxcsr_m32 => (EmulatedInsn::Ldmxcsr, ldmxcsr(cpu, &ctx)),
        Code::Stmxcsr_m32 => (EmulatedInsn::Stmxcsr, stmxcsr(cpu, &ctx)),
        Code::Int3 => (
            EmulatedInsn::Int3,
            Ok(Completion::Trap(Exception::new(VEC_BP))),
        ),
        Code::Cmpxchg8b_m64 => (EmulatedInsn::Cmpxchg8b, cmpxchg8b(cpu, &ctx)),
        Code::Cmpxchg16b_m128 => (EmulatedInsn::Cmpxchg16b, cmpxchg16b(cpu, &ctx)),
        Code::Pshufb_xmm_xmmm128 => (EmulatedInsn::Pshufb, pshufb(cpu, &ctx)),
        _ => {
            return Err(EmulateError::Unsupported {
                mnemonic: format!("{:?}", insn.mnemonic()).to_lowercase(),
                bytes: ctx.bytes(),
            })
        }
    };
    let exception = match step {
        Ok(completion) => {
            let next_ip = ip.wrapping_add(len as u64) & mode.bitness.ip_mask();
            cpu.set_rip(next_ip);
            // The instruction completed: RF is cleared like the CPU does.
            cpu.set_rflags(cpu.rflags() & !RFLAGS_RF);
            match completion {
                Completion::Advance => None,
                Completion::Trap(e) => {
                    let e = exception_for_mode(e, mode);
                    cpu.inject_exception(e)?;
                    Some(e)
                }
            }
        }
        Err(Flow::Fault(e)) => {
            let e = exception_for_mode(e, mode);
            cpu.inject_exception(e)?;
            Some(e)
        }
        Err(Flow::Error(e)) => return Err(e),
    };
    Ok(Emulated {
        insn: kind,
        len,
        exception,
    })
}

/// Real-mode exception delivery never pushes an error code.
fn exception_for_mode(e: Exception, mode: CpuMode) -> Exception {
    if mode.protected {
        e
    } else {
        Exception::new(e.vector)
    }
}

/// Value of a general register as iced names it (any width), or a segment base.
fn register_value(cpu: &impl GuestCpu, mode: CpuMode, reg: Register) -> Option<u64> {
    if reg.is_segment_register() {
        let seg = Segment::from_iced(reg)?;
        // In 64-bit mode only FS and GS have a base; ES/CS/SS/DS are flat.
        if mode.bitness == Bitness::Bits64 && !matches!(seg, Segment::Fs | Segment::Gs) {
            return Some(0);
        }
        return Some(cpu.segment_base(seg));
    }
    if !reg.is_gpr() {
        return None;
    }
    let index = reg.full_register().number();
    if index > 15 {
        return None;
    }
    let full = cpu.gpr(index);
    Some(match reg {
        Register::AH | Register::CH | Register::DH | Register::BH => (full >> 8) & 0xff,
        _ => match reg.size() {
            1 => full & 0xff,
            2 => full & 0xffff,
            4 => full & 0xffff_ffff,
            _ => full,
        },
    })
}

/// Writes a general register with x86 partial-write rules: 8/16-bit writes merge, 32-bit
/// writes zero-extend to 64 bits.
fn write_register(cpu: &mut impl GuestCpu, reg: Register, value: u64) -> Option<()> {
    if !reg.is_gpr() {
        return None;
    }
    let index = reg.full_register().number();
    if index > 15 {
        return None;
    }
    let old = cpu.gpr(index);
    let new = match reg {
        Register::AH | Register::CH | Register::DH | Register::BH => {
            (old & !0xff00) | ((value & 0xff) << 8)
        }
        _ => match reg.size() {
            1 => (old & !0xff) | (value & 0xff),
            2 => (old & !0xffff) | (value & 0xffff),
            4 => value & 0xffff_ffff,
            _ => value,
        },
    };
    cpu.set_gpr(index, new);
    Some(())
}

/// Linear address of memory operand `operand`, with the checks the CPU does before the
/// access itself: canonical form in 64-bit mode (else `#GP(0)`, or `#SS(0)` for
/// stack-segment references) and 4 GiB wrap-around otherwise. Segment limits and access
/// rights are not checked.
fn memory_address(cpu: &impl GuestCpu, ctx: &Ctx<'_>, operand: u32) -> Step<u64> {
    if ctx.insn.op_kind(operand) != OpKind::Memory {
        return Err(Flow::Error(EmulateError::Address { bytes: ctx.bytes() }));
    }
    let mode = ctx.mode;
    let addr = ctx
        .insn
        .virtual_address(operand, 0, |reg, _, _| register_value(cpu, mode, reg))
        .ok_or_else(|| EmulateError::Address { bytes: ctx.bytes() })?;
    if mode.bitness != Bitness::Bits64 {
        return Ok(addr & 0xffff_ffff);
    }
    let bits = if mode.cr4 & CR4_LA57 != 0 { 57 } else { 48 };
    let shift = 64 - bits;
    if ((addr << shift) as i64 >> shift) as u64 != addr {
        let vector = if ctx.insn.memory_segment() == Register::SS {
            VEC_SS
        } else {
            VEC_GP
        };
        return Err(Flow::Fault(Exception::with_code(vector, 0)));
    }
    Ok(addr)
}

/// Reads `N` bytes from memory operand `operand`.
fn read_operand<const N: usize>(
    cpu: &mut impl GuestCpu,
    ctx: &Ctx<'_>,
    operand: u32,
) -> Step<[u8; N]> {
    let addr = memory_address(cpu, ctx, operand)?;
    let mut buf = [0u8; N];
    cpu.read_memory(addr, &mut buf)?;
    Ok(buf)
}

/// `#UD`/`#NM` checks shared by the SSE instructions (SDM "Exceptions Type 4/5").
fn check_sse(mode: CpuMode) -> Step<()> {
    if mode.cr0 & CR0_EM != 0 || mode.cr4 & CR4_OSFXSR == 0 {
        return Err(Flow::Fault(Exception::new(VEC_UD)));
    }
    if mode.cr0 & CR0_TS != 0 {
        return Err(Flow::Fault(Exception::new(VEC_NM)));
    }
    Ok(())
}

/// `fwait`: a no-op unless an unmasked x87 exception is pending, in which case it is
/// reported (`#MF` when CR0.NE = 1). `#NM` if CR0.MP and CR0.TS are both set.
fn fwait(cpu: &mut impl GuestCpu, ctx: &Ctx<'_>) -> Step<Completion> {
    let cr0 = ctx.mode.cr0;
    if cr0 & CR0_MP != 0 && cr0 & CR0_TS != 0 {
        return Err(Flow::Fault(Exception::new(VEC_NM)));
    }
    let (fcw, fsw) = cpu.x87_control_status()?;
    let unmasked = fsw & !fcw & 0x3f;
    if unmasked == 0 {
        return Ok(Completion::Advance);
    }
    if cr0 & CR0_NE != 0 {
        return Err(Flow::Fault(Exception::new(VEC_MF)));
    }
    Err(Flow::Error(EmulateError::UnsupportedCase {
        mnemonic: "fwait",
        reason: "unmasked x87 exception pending with CR0.NE=0 (legacy FERR#/IRQ 13 reporting)",
        bytes: ctx.bytes(),
    }))
}

/// `popcnt r, r/m`: destination = number of set bits; ZF = (source == 0); OF SF AF CF PF
/// cleared.
fn popcnt(cpu: &mut impl GuestCpu, ctx: &Ctx<'_>) -> Step<Completion> {
    let insn = ctx.insn;
    let size = match insn.code() {
        Code::Popcnt_r16_rm16 => 2,
        Code::Popcnt_r32_rm32 => 4,
        _ => 8,
    };
    let source = match insn.op1_kind() {
        OpKind::Register => register_value(cpu, ctx.mode, insn.op1_register())
            .ok_or_else(|| EmulateError::Address { bytes: ctx.bytes() })?,
        _ => {
            let buf: [u8; 8] = match size {
                2 => {
                    let b: [u8; 2] = read_operand(cpu, ctx, 1)?;
                    [b[0], b[1], 0, 0, 0, 0, 0, 0]
                }
                4 => {
                    let b: [u8; 4] = read_operand(cpu, ctx, 1)?;
                    [b[0], b[1], b[2], b[3], 0, 0, 0, 0]
                }
                _ => read_operand(cpu, ctx, 1)?,
            };
            u64::from_le_bytes(buf)
        }
    };
    let count = u64::from(source.count_ones());
    write_register(cpu, insn.op0_register(), count)
        .ok_or_else(|| EmulateError::Address { bytes: ctx.bytes() })?;
    let mut rflags = cpu.rflags() & !RFLAGS_STATUS;
    if source == 0 {
        rflags |= RFLAGS_ZF;
    }
    cpu.set_rflags(rflags);
    Ok(Completion::Advance)
}

/// `clac` / `stac`: clear / set RFLAGS.AC. `#UD` outside protected mode, in
/// virtual-8086 mode and at CPL > 0.
fn set_ac(cpu: &mut impl GuestCpu, ctx: &Ctx<'_>, set: bool) -> Step<Completion> {
    let mode = ctx.mode;
    if !mode.protected || mode.vm86 || mode.cpl > 0 {
        return Err(Flow::Fault(Exception::new(VEC_UD)));
    }
    let rflags = cpu.rflags();
    cpu.set_rflags(if set {
        rflags | RFLAGS_AC
    } else {
        rflags & !RFLAGS_AC
    });
    Ok(Completion::Advance)
}

/// `ldmxcsr m32`: `#GP(0)` if the value sets a bit outside MXCSR_MASK.
fn ldmxcsr(cpu: &mut impl GuestCpu, ctx: &Ctx<'_>) -> Step<Completion> {
    check_sse(ctx.mode)?;
    let value = u32::from_le_bytes(read_operand(cpu, ctx, 0)?);
    let mask = cpu.mxcsr_mask()?;
    if value & !mask != 0 {
        return Err(Flow::Fault(Exception::with_code(VEC_GP, 0)));
    }
    cpu.set_mxcsr(value)?;
    Ok(Completion::Advance)
}

/// `stmxcsr m32`.
fn stmxcsr(cpu: &mut impl GuestCpu, ctx: &Ctx<'_>) -> Step<Completion> {
    check_sse(ctx.mode)?;
    let addr = memory_address(cpu, ctx, 0)?;
    let value = cpu.mxcsr()?;
    cpu.write_memory(addr, &value.to_le_bytes())?;
    Ok(Completion::Advance)
}

/// `cmpxchg8b m64`: compare EDX:EAX with the memory operand; equal: ZF = 1 and store
/// ECX:EBX; different: ZF = 0 and load it into EDX:EAX. Other flags unchanged.
fn cmpxchg8b(cpu: &mut impl GuestCpu, ctx: &Ctx<'_>) -> Step<Completion> {
    let addr = memory_address(cpu, ctx, 0)?;
    let lo32 = |v: u64| v & 0xffff_ffff;
    let current = (lo32(cpu.gpr(2)) << 32) | lo32(cpu.gpr(0));
    let new = (lo32(cpu.gpr(1)) << 32) | lo32(cpu.gpr(3));
    let old = cpu.compare_exchange_u64(addr, current, new)?;
    let mut rflags = cpu.rflags() & !RFLAGS_ZF;
    if old == current {
        rflags |= RFLAGS_ZF;
    } else {
        // 32-bit register writes zero-extend in 64-bit mode.
        cpu.set_gpr(0, lo32(old));
        cpu.set_gpr(2, old >> 32);
    }
    cpu.set_rflags(rflags);
    Ok(Completion::Advance)
}

/// `cmpxchg16b m128`: as `cmpxchg8b` with RDX:RAX / RCX:RBX; `#GP(0)` if the operand is
/// not 16-byte aligned.
fn cmpxchg16b(cpu: &mut impl GuestCpu, ctx: &Ctx<'_>) -> Step<Completion> {
    let addr = memory_address(cpu, ctx, 0)?;
    if !addr.is_multiple_of(16) {
        return Err(Flow::Fault(Exception::with_code(VEC_GP, 0)));
    }
    let current = (u128::from(cpu.gpr(2)) << 64) | u128::from(cpu.gpr(0));
    let new = (u128::from(cpu.gpr(1)) << 64) | u128::from(cpu.gpr(3));
    let old = cpu.compare_exchange_u128(addr, current, new)?;
    let mut rflags = cpu.rflags() & !RFLAGS_ZF;
    if old == current {
        rflags |= RFLAGS_ZF;
    } else {
        cpu.set_gpr(0, old as u64);
        cpu.set_gpr(2, (old >> 64) as u64);
    }
    cpu.set_rflags(rflags);
    Ok(Completion::Advance)
}

/// `pshufb xmm, xmm/m128`: byte shuffle; a selector byte with bit 7 set yields 0. A memory
/// operand must be 16-byte aligned (`#GP(0)`) unless MXCSR.MM allows misaligned SSE.
fn pshufb(cpu: &mut impl GuestCpu, ctx: &Ctx<'_>) -> Step<Completion> {
    check_sse(ctx.mode)?;
    let insn = ctx.insn;
    let xmm_index = |reg: Register| -> Result<usize, EmulateError> {
        let n = reg.number();
        if reg.is_xmm() && n < 16 {
            Ok(n)
        } else {
            Err(EmulateError::Address { bytes: ctx.bytes() })
        }
    };
    let dst = xmm_index(insn.op0_register())?;
    let selector = match insn.op1_kind() {
        OpKind::Register => cpu.xmm(xmm_index(insn.op1_register())?)?,
        _ => {
            let addr = memory_address(cpu, ctx, 1)?;
            if !addr.is_multiple_of(16) && cpu.mxcsr()? & MXCSR_MM == 0 {
                return Err(Flow::Fault(Exception::with_code(VEC_GP, 0)));
            }
            let mut buf = [0u8; 16];
            cpu.read_memory(addr, &mut buf)?;
            buf
        }
    };
    let src = cpu.xmm(dst)?;
    let mut out = [0u8; 16];
    for (o, s) in out.iter_mut().zip(selector) {
        if s & 0x80 == 0 {
            *o = src[usize::from(s & 0x0f)];
        }
    }
    cpu.set_xmm(dst, out)?;
    Ok(Completion::Advance)
}

// ---------------------------------------------------------------------------------------
// KVM adapter
// ---------------------------------------------------------------------------------------

/// Turns on `KVM_CAP_EXIT_ON_EMULATION_FAILURE` if the kernel has it; returns whether it
/// was enabled.
///
/// With it, every emulation failure exits to user space with the instruction bytes, and
/// KVM does not queue a `#UD` of its own (without it, KVM queues `#UD` for the guest and,
/// at CPL 0 only, also exits). Call once per VM, before running vCPUs.
pub fn enable_exit_on_emulation_failure(vm: &VmFd) -> Result<bool, EmulateError> {
    if vm.check_extension_raw(u64::from(KVM_CAP_EXIT_ON_EMULATION_FAILURE)) <= 0 {
        return Ok(false);
    }
    let cap = kvm_enable_cap {
        cap: KVM_CAP_EXIT_ON_EMULATION_FAILURE,
        args: [1, 0, 0, 0],
        ..Default::default()
    };
    vm.enable_cap(&cap).map_err(|source| EmulateError::Kvm {
        op: "KVM_ENABLE_CAP(KVM_CAP_EXIT_ON_EMULATION_FAILURE)",
        source,
    })?;
    Ok(true)
}

/// Extracts the instruction bytes from a `KVM_EXIT_INTERNAL_ERROR` /
/// `KVM_INTERNAL_ERROR_EMULATION` exit: returns the bytes and how many are valid (1..=15).
///
/// Layout (`struct kvm_emulation_failure` in the uapi header, overlaying `internal`):
/// `data[0]` = flags, then a 16-byte area whose first byte is `insn_size` and whose next
/// 15 bytes are `insn_bytes`, i.e. the low byte of `data[1]` is the size and the bytes are
/// `data[1]` bytes 1..8 followed by `data[2]` bytes 0..8 (little-endian). `insn_size` is
/// the number of bytes KVM fetched, usually 15, not the instruction's length.
pub fn emulation_failure_bytes(run: &kvm_run) -> Result<([u8; MAX_INSN_LEN], usize), EmulateError> {
    // SAFETY: `internal` is a plain struct of integers inside the `kvm_run` union, so every
    // bit pattern is a valid value; reading it can never be undefined behaviour. Whether
    // KVM filled it in is checked right after, from `exit_reason`.
    let internal = unsafe { run.__bindgen_anon_1.internal };
    if run.exit_reason != KVM_EXIT_INTERNAL_ERROR
        || internal.suberror != KVM_INTERNAL_ERROR_EMULATION
    {
        return Err(EmulateError::NotEmulationFailure {
            exit_reason: run.exit_reason,
            suberror: if run.exit_reason == KVM_EXIT_INTERNAL_ERROR {
                internal.suberror
            } else {
                0
            },
        });
    }
    let flags = if internal.ndata >= 1 {
        internal.data[0]
    } else {
        0
    };
    if internal.ndata < 3
        || flags & u64::from(KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES) == 0
    {
        return Err(EmulateError::NoInstructionBytes {
            flags,
            ndata: internal.ndata,
        });
    }
    let mut area = [0u8; 16];
    area[..8].copy_from_slice(&internal.data[1].to_le_bytes());
    area[8..].copy_from_slice(&internal.data[2].to_le_bytes());
    let size = area[0];
    if size == 0 || usize::from(size) > MAX_INSN_LEN {
        return Err(EmulateError::BadInstructionLength(size));
    }
    let mut bytes = [0u8; MAX_INSN_LEN];
    bytes.copy_from_slice(&area[1..]);
    Ok((bytes, usize::from(size)))
}

/// Emulates the instruction that made the vCPU's last `KVM_RUN` fail with
/// `KVM_EXIT_INTERNAL_ERROR` / `KVM_INTERNAL_ERROR_EMULATION`, and updates the vCPU so
/// that the next `KVM_RUN` continues after it (or delivers the exception it raised).
///
/// Needs [`enable_exit_on_emulation_failure`] to have been called on the VM. `mem` must be
/// the guest memory registered with KVM; every byte accessed is translated with
/// `KVM_TRANSLATE` page by page and must lie inside `mem`.
///
/// An instruction this module cannot emulate, met in guest *user* space (CPL 3), is not an
/// error: `#UD` is delivered to the guest instead, with RIP at the instruction, and the
/// result says [`EmulatedInsn::UserUd`]. That is what KVM itself does without
/// `KVM_CAP_EXIT_ON_EMULATION_FAILURE`: the process gets SIGILL from its kernel, and one
/// program's exotic instruction does not stop the whole VM. In the guest kernel (CPL 0-2)
/// it stays an error.
///
/// On error the vCPU is left as it was (unless writing the state back itself failed, see
/// [`EmulateError::Kvm`]); the VMM should report the error and stop the guest.
pub fn handle_emulation_failure(
    vcpu: &mut VcpuFd,
    mem: &GuestMemoryMmap,
) -> Result<Emulated, EmulateError> {
    let (bytes, len) = emulation_failure_bytes(vcpu.get_kvm_run())?;
    let vcpu: &VcpuFd = vcpu;
    let regs = vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
    let sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
    let mode = CpuMode::from_sregs(&sregs, regs.rflags);
    let cs_dpl = sregs.cs.dpl;
    let mut cpu = KvmCpu {
        vcpu,
        mem,
        regs,
        sregs,
        cpl: mode.cpl,
        xsave: None,
        xsave_dirty: false,
        exception: None,
    };
    let done = match emulate(&mut cpu, &bytes[..len], mode) {
        // KVM reports what its decoder fetched, which can stop short of the instruction
        // (for example at a page boundary); fetch the rest from guest memory and retry.
        Err(EmulateError::Truncated { .. }) if len < MAX_INSN_LEN => {
            let (bytes, len) = cpu.fetch_rest(bytes, len, mode);
            emulate(&mut cpu, &bytes[..len], mode)
        }
        other => other,
    };
    let done = match done {
        Ok(done) => done,
        Err(e) if user_mode_ud(mode, cs_dpl, &e) => {
            log_user_ud(&e);
            // emulate() changed nothing: RIP still at the instruction, a fault.
            let ud = Exception::new(VEC_UD);
            cpu.inject_exception(ud)?;
            Emulated {
                insn: EmulatedInsn::UserUd,
                len: 0,
                exception: Some(ud),
            }
        }
        Err(e) => return Err(e),
    };
    cpu.commit()?;
    Ok(done)
}

/// Whether an emulation failure `e` becomes a `#UD` for guest user space: the vCPU is at
/// CPL 3 (SS.DPL, which [`CpuMode::from_sregs`] reads, and CS.DPL agree on it) and the error
/// is about the instruction (not a failed KVM ioctl, which says nothing about the guest).
pub fn user_mode_ud(mode: CpuMode, cs_dpl: u8, e: &EmulateError) -> bool {
    let user = mode.protected && mode.cpl == 3 && (mode.vm86 || cs_dpl & 3 == 3);
    user && !matches!(e, EmulateError::Kvm { .. })
}

/// The first `#UD` given to guest user space is logged as a warning, the rest at debug
/// level (a guest program can raise them in a loop); `--stats` counts them all.
fn log_user_ud(e: &EmulateError) {
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if !WARNED.swap(true, Ordering::Relaxed) {
        log::warn!(
            "guest user space: {e}; delivered #UD to the process instead (further ones are logged at debug level)"
        );
    } else {
        log::debug!("guest user space: {e}; delivered #UD");
    }
}

fn kvm_err(op: &'static str) -> impl Fn(kvm_ioctls::Error) -> EmulateError {
    move |source| EmulateError::Kvm { op, source }
}

const PAGE_SIZE: u64 = 4096;
/// Offsets in the standard (non-compacted) XSAVE image that `KVM_GET_XSAVE` returns.
const XSAVE_FCW: usize = 0;
const XSAVE_FSW: usize = 2;
const XSAVE_MXCSR: usize = 24;
const XSAVE_MXCSR_MASK: usize = 28;
const XSAVE_XMM0: usize = 160;
const XSAVE_XSTATE_BV: usize = 512;
/// XSTATE_BV bit of the SSE component (XMM registers and MXCSR).
const XFEATURE_SSE: u64 = 1 << 1;

/// [`GuestCpu`] on a stopped KVM vCPU. Registers are read once and written back by
/// [`KvmCpu::commit`]; the XSAVE image is fetched only for the x87/SSE instructions.
struct KvmCpu<'a> {
    vcpu: &'a VcpuFd,
    mem: &'a GuestMemoryMmap,
    regs: kvm_regs,
    sregs: kvm_sregs,
    cpl: u8,
    xsave: Option<Box<kvm_xsave>>,
    xsave_dirty: bool,
    exception: Option<Exception>,
}

/// A general register of `kvm_regs` by encoding-order index.
fn kvm_gpr(regs: &mut kvm_regs, index: usize) -> &mut u64 {
    match index & 15 {
        0 => &mut regs.rax,
        1 => &mut regs.rcx,
        2 => &mut regs.rdx,
        3 => &mut regs.rbx,
        4 => &mut regs.rsp,
        5 => &mut regs.rbp,
        6 => &mut regs.rsi,
        7 => &mut regs.rdi,
        8 => &mut regs.r8,
        9 => &mut regs.r9,
        10 => &mut regs.r10,
        11 => &mut regs.r11,
        12 => &mut regs.r12,
        13 => &mut regs.r13,
        14 => &mut regs.r14,
        _ => &mut regs.r15,
    }
}

impl KvmCpu<'_> {
    fn memory_error(addr: u64, len: usize, access: Access, reason: String) -> EmulateError {
        EmulateError::Memory {
            addr,
            len,
            access,
            reason,
        }
    }

    /// Guest-physical address of linear address `addr`.
    fn translate(&self, addr: u64, len: usize, access: Access) -> Result<u64, EmulateError> {
        let tr = self
            .vcpu
            .translate_gva(addr)
            .map_err(kvm_err("KVM_TRANSLATE"))?;
        if tr.valid == 0 {
            return Err(Self::memory_error(
                addr,
                len,
                access,
                format!("{addr:#x} is not mapped by the guest page tables"),
            ));
        }
        Ok(tr.physical_address)
    }

    /// Splits `[addr, addr + len)` at guest page boundaries, translates each piece and
    /// hands `f(gpa, offset, piece_len)` the pieces in order.
    ///
    /// `KVM_TRANSLATE` walks the page tables with supervisor rights and reports every page
    /// as writable, so page protections cannot be checked; to keep guest user space from
    /// using the emulator to reach kernel memory, accesses at CPL 3 are refused.
    fn for_each_piece(
        &self,
        addr: u64,
        len: usize,
        access: Access,
        mut f: impl FnMut(GuestAddress, usize, usize) -> Result<(), vm_memory::GuestMemoryError>,
    ) -> Result<(), EmulateError> {
        if self.cpl == 3 {
            return Err(Self::memory_error(
                addr,
                len,
                access,
                "memory operands are not emulated at CPL 3 (KVM_TRANSLATE does not check page permissions)".into(),
            ));
        }
        let mut done = 0usize;
        while done < len {
            let la = addr.checked_add(done as u64).ok_or_else(|| {
                Self::memory_error(addr, len, access, "address wraps around".into())
            })?;
            let in_page = (PAGE_SIZE - (la & (PAGE_SIZE - 1))) as usize;
            let n = (len - done).min(in_page);
            let gpa = self.translate(la, len, access)?;
            f(GuestAddress(gpa), done, n).map_err(|e| {
                Self::memory_error(
                    addr,
                    len,
                    access,
                    format!("guest-physical {gpa:#x} (+{n} bytes): {e}"),
                )
            })?;
            done += n;
        }
        Ok(())
    }

    /// Runs `f` on the host address of the `size` bytes at linear address `addr` if they
    /// are in one guest page, inside one guest-memory region and `size`-aligned on the
    /// host; `Ok(None)` otherwise (the caller then falls back to a non-atomic access).
    fn with_host_ptr<R>(
        &self,
        addr: u64,
        size: usize,
        f: impl FnOnce(*mut u8) -> R,
    ) -> Result<Option<R>, EmulateError> {
        if self.cpl == 3 {
            // Let for_each_piece produce the refusal.
            return Ok(None);
        }
        if (addr & (PAGE_SIZE - 1)) + size as u64 > PAGE_SIZE {
            return Ok(None);
        }
        let gpa = self.translate(addr, size, Access::Write)?;
        let slice = self.mem.get_slice(GuestAddress(gpa), size).map_err(|e| {
            Self::memory_error(
                addr,
                size,
                Access::Write,
                format!("guest-physical {gpa:#x}: {e}"),
            )
        })?;
        if slice.len() != size {
            return Ok(None);
        }
        let guard = slice.ptr_guard_mut();
        let ptr = guard.as_ptr();
        if !(ptr as usize).is_multiple_of(size) {
            return Ok(None);
        }
        Ok(Some(f(ptr)))
    }

    /// Completes `bytes[..len]` with the bytes that follow in guest memory at CS:RIP, as
    /// far as they can be read (up to 15 in all); returns the new buffer and length.
    fn fetch_rest(
        &mut self,
        mut bytes: [u8; MAX_INSN_LEN],
        mut len: usize,
        mode: CpuMode,
    ) -> ([u8; MAX_INSN_LEN], usize) {
        let ip = self.regs.rip & mode.bitness.ip_mask();
        let cs_base = if mode.bitness == Bitness::Bits64 {
            0
        } else {
            self.sregs.cs.base
        };
        while len < MAX_INSN_LEN {
            let mut addr = cs_base.wrapping_add(ip.wrapping_add(len as u64));
            if mode.bitness != Bitness::Bits64 {
                addr &= 0xffff_ffff;
            }
            let in_page = (PAGE_SIZE - (addr & (PAGE_SIZE - 1))) as usize;
            let n = (MAX_INSN_LEN - len).min(in_page);
            if self.read_memory(addr, &mut bytes[len..len + n]).is_err() {
                break;
            }
            len += n;
        }
        (bytes, len)
    }

    fn xsave(&mut self) -> Result<&mut kvm_xsave, EmulateError> {
        let xsave = match self.xsave.take() {
            Some(x) => x,
            // KVM_GET_XSAVE fails (EINVAL) if the vCPU's XSAVE state is larger than
            // `kvm_xsave` (dynamically enabled AMX), which is what makes the later
            // KVM_SET_XSAVE sound; see `commit`.
            None => Box::new(self.vcpu.get_xsave().map_err(kvm_err("KVM_GET_XSAVE"))?),
        };
        Ok(self.xsave.insert(xsave))
    }

    fn xsave_bytes(&mut self, offset: usize, out: &mut [u8]) -> Result<(), EmulateError> {
        let xsave = self.xsave()?;
        for (i, o) in out.iter_mut().enumerate() {
            let at = offset + i;
            let word = xsave.region.get(at / 4).copied().unwrap_or(0);
            *o = word.to_le_bytes()[at % 4];
        }
        Ok(())
    }

    fn set_xsave_bytes(&mut self, offset: usize, data: &[u8]) -> Result<(), EmulateError> {
        let xsave = self.xsave()?;
        for (i, &b) in data.iter().enumerate() {
            let at = offset + i;
            if let Some(word) = xsave.region.get_mut(at / 4) {
                let mut bytes = word.to_le_bytes();
                bytes[at % 4] = b;
                *word = u32::from_le_bytes(bytes);
            }
        }
        // Mark the SSE component as in use: KVM (like XRSTOR) ignores the legacy-area SSE
        // state, MXCSR included, when its XSTATE_BV bit is clear.
        let mut bv = [0u8; 8];
        self.xsave_bytes(XSAVE_XSTATE_BV, &mut bv)?;
        let bv = (u64::from_le_bytes(bv) | XFEATURE_SSE).to_le_bytes();
        let xsave = self.xsave()?;
        for (i, &b) in bv.iter().enumerate() {
            let at = XSAVE_XSTATE_BV + i;
            if let Some(word) = xsave.region.get_mut(at / 4) {
                let mut bytes = word.to_le_bytes();
                bytes[at % 4] = b;
                *word = u32::from_le_bytes(bytes);
            }
        }
        self.xsave_dirty = true;
        Ok(())
    }

    /// Writes the emulated state back: XSAVE image, general registers, then the exception
    /// to deliver (KVM_SET_REGS drops pending exceptions, so events go last).
    fn commit(self) -> Result<(), EmulateError> {
        let mut events = self
            .vcpu
            .get_vcpu_events()
            .map_err(kvm_err("KVM_GET_VCPU_EVENTS"))?;
        let mut set_events = false;
        if events.exception.injected != 0 || events.exception.pending != 0 {
            if events.exception.nr == VEC_UD {
                // Without KVM_CAP_EXIT_ON_EMULATION_FAILURE, KVM queues #UD for the
                // instruction it could not emulate; the emulation replaces it.
                events.exception.injected = 0;
                events.exception.pending = 0;
                set_events = true;
            } else if let Some(new) = self.exception {
                let existing = Exception {
                    vector: events.exception.nr,
                    error_code: (events.exception.has_error_code != 0)
                        .then_some(events.exception.error_code),
                };
                return Err(EmulateError::ExceptionPending { existing, new });
            }
        }
        // The emulated instruction executed (or faulted): a STI/MOV SS interrupt shadow
        // covering it is over.
        let mut flags = 0;
        if events.interrupt.shadow != 0 {
            events.interrupt.shadow = 0;
            flags |= KVM_VCPUEVENT_VALID_SHADOW;
            set_events = true;
        }
        if let Some(e) = self.exception {
            events.exception.injected = 1;
            events.exception.pending = 0;
            events.exception.nr = e.vector;
            events.exception.has_error_code = u8::from(e.error_code.is_some());
            events.exception.error_code = e.error_code.unwrap_or(0);
            set_events = true;
        }
        if self.xsave_dirty {
            if let Some(xsave) = &self.xsave {
                // SAFETY: KVM_SET_XSAVE reads `guest_fpu.uabi_size` bytes from the pointer.
                // This image came from KVM_GET_XSAVE on the same vCPU, which fails when
                // uabi_size exceeds size_of::<kvm_xsave>() (4096), so the kernel reads only
                // within `xsave`. KVM validates the contents (reserved MXCSR bits, header).
                unsafe { self.vcpu.set_xsave(xsave) }.map_err(kvm_err("KVM_SET_XSAVE"))?;
            }
        }
        self.vcpu
            .set_regs(&self.regs)
            .map_err(kvm_err("KVM_SET_REGS"))?;
        if set_events {
            // Only the fields without a VALID flag (exception, interrupt, NMI injection
            // state, all read above from the stopped vCPU) and those named in `flags` are
            // written; pending NMIs, SIPI and SMM state are left alone.
            events.flags = flags;
            self.vcpu
                .set_vcpu_events(&events)
                .map_err(kvm_err("KVM_SET_VCPU_EVENTS"))?;
        }
        Ok(())
    }
}

impl GuestCpu for KvmCpu<'_> {
    fn gpr(&self, index: usize) -> u64 {
        let r = &self.regs;
        match index & 15 {
            0 => r.rax,
            1 => r.rcx,
            2 => r.rdx,
            3 => r.rbx,
            4 => r.rsp,
            5 => r.rbp,
            6 => r.rsi,
            7 => r.rdi,
            8 => r.r8,
            9 => r.r9,
            10 => r.r10,
            11 => r.r11,
            12 => r.r12,
            13 => r.r13,
            14 => r.r14,
            _ => r.r15,
        }
    }

    fn set_gpr(&mut self, index: usize, value: u64) {
        *kvm_gpr(&mut self.regs, index) = value;
    }

    fn rip(&self) -> u64 {
        self.regs.rip
    }

    fn set_rip(&mut self, rip: u64) {
        self.regs.rip = rip;
    }

    fn rflags(&self) -> u64 {
        self.regs.rflags
    }

    fn set_rflags(&mut self, rflags: u64) {
        self.regs.rflags = rflags;
    }

    fn segment_base(&self, segment: Segment) -> u64 {
        let s = &self.sregs;
        match segment {
            Segment::Es => s.es.base,
            Segment::Cs => s.cs.base,
            Segment::Ss => s.ss.base,
            Segment::Ds => s.ds.base,
            Segment::Fs => s.fs.base,
            Segment::Gs => s.gs.base,
        }
    }

    fn read_memory(&mut self, addr: u64, buf: &mut [u8]) -> Result<(), EmulateError> {
        let mem = self.mem;
        let len = buf.len();
        self.for_each_piece(addr, len, Access::Read, |gpa, off, n| {
            mem.read_slice(&mut buf[off..off + n], gpa)
        })
    }

    fn write_memory(&mut self, addr: u64, data: &[u8]) -> Result<(), EmulateError> {
        let mem = self.mem;
        // Translate every page before writing anything, so that a fault in the second
        // page does not leave the first one half-written.
        self.for_each_piece(addr, data.len(), Access::Write, |_, _, _| Ok(()))?;
        self.for_each_piece(addr, data.len(), Access::Write, |gpa, off, n| {
            mem.write_slice(&data[off..off + n], gpa)
        })
    }

    fn compare_exchange_u64(
        &mut self,
        addr: u64,
        current: u64,
        new: u64,
    ) -> Result<u64, EmulateError> {
        let atomic = self.with_host_ptr(addr, 8, |ptr| {
            // SAFETY: `ptr` points at 8 bytes inside a guest-memory mapping that `self.mem`
            // keeps alive for this call (checked by `get_slice`), and is 8-byte aligned
            // (checked by `with_host_ptr`). Guest memory is shared with vCPUs and device
            // threads; they access it with hardware accesses or volatile copies, and this
            // is a single hardware-atomic locked operation, as vm-memory's own atomic
            // accessors do.
            let a = unsafe { std::sync::atomic::AtomicU64::from_ptr(ptr.cast::<u64>()) };
            match a.compare_exchange(current, new, Ordering::SeqCst, Ordering::SeqCst) {
                Ok(v) | Err(v) => v,
            }
        })?;
        match atomic {
            Some(old) => Ok(old),
            None => {
                log::debug!("cmpxchg8b at {addr:#x}: unaligned or page-crossing, not atomic");
                compare_exchange_bytes(self, addr, current.to_le_bytes(), new.to_le_bytes())
                    .map(u64::from_le_bytes)
            }
        }
    }

    fn compare_exchange_u128(
        &mut self,
        addr: u64,
        current: u128,
        new: u128,
    ) -> Result<u128, EmulateError> {
        if std::arch::is_x86_feature_detected!("cmpxchg16b") {
            let atomic = self.with_host_ptr(addr, 16, |ptr| {
                // SAFETY: `ptr` is valid for 16 bytes of guest memory kept mapped by
                // `self.mem` and 16-byte aligned (both checked by `with_host_ptr`), and the
                // host CPU has CMPXCHG16B (checked above); see `host_cmpxchg16b`.
                unsafe { host_cmpxchg16b(ptr.cast::<u128>(), current, new) }
            })?;
            if let Some(old) = atomic {
                return Ok(old);
            }
        }
        log::debug!("cmpxchg16b at {addr:#x}: no host CMPXCHG16B or unusable address, not atomic");
        compare_exchange_bytes(self, addr, current.to_le_bytes(), new.to_le_bytes())
            .map(u128::from_le_bytes)
    }

    fn x87_control_status(&mut self) -> Result<(u16, u16), EmulateError> {
        let mut fcw = [0u8; 2];
        let mut fsw = [0u8; 2];
        self.xsave_bytes(XSAVE_FCW, &mut fcw)?;
        self.xsave_bytes(XSAVE_FSW, &mut fsw)?;
        Ok((u16::from_le_bytes(fcw), u16::from_le_bytes(fsw)))
    }

    fn mxcsr(&mut self) -> Result<u32, EmulateError> {
        let mut b = [0u8; 4];
        self.xsave_bytes(XSAVE_MXCSR, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    fn mxcsr_mask(&mut self) -> Result<u32, EmulateError> {
        let mut b = [0u8; 4];
        self.xsave_bytes(XSAVE_MXCSR_MASK, &mut b)?;
        let mask = u32::from_le_bytes(b);
        Ok(if mask == 0 { MXCSR_MASK_DEFAULT } else { mask })
    }

    fn set_mxcsr(&mut self, value: u32) -> Result<(), EmulateError> {
        self.set_xsave_bytes(XSAVE_MXCSR, &value.to_le_bytes())
    }

    fn xmm(&mut self, index: usize) -> Result<[u8; 16], EmulateError> {
        let mut b = [0u8; 16];
        self.xsave_bytes(XSAVE_XMM0 + 16 * (index & 15), &mut b)?;
        Ok(b)
    }

    fn set_xmm(&mut self, index: usize, value: [u8; 16]) -> Result<(), EmulateError> {
        self.set_xsave_bytes(XSAVE_XMM0 + 16 * (index & 15), &value)
    }

    fn inject_exception(&mut self, exception: Exception) -> Result<(), EmulateError> {
        if let Some(existing) = self.exception {
            return Err(EmulateError::ExceptionPending {
                existing,
                new: exception,
            });
        }
        self.exception = Some(exception);
        Ok(())
    }
}

/// `lock cmpxchg16b` on host memory: atomically replaces `*ptr` with `new` if it equals
/// `current`; returns the previous value.
///
/// # Safety
///
/// `ptr` must be valid for reads and writes of 16 bytes and 16-byte aligned, and the CPU
/// must support CMPXCHG16B.
unsafe fn host_cmpxchg16b(ptr: *mut u128, current: u128, new: u128) -> u128 {
    let mut lo = current as u64;
    let mut hi = (current >> 64) as u64;
    // SAFETY: the caller guarantees the pointer and CPU requirements. RBX cannot be named
    // as an asm operand (LLVM reserves it), so the new low half is swapped into RBX around
    // the instruction and RBX is restored afterwards.
    unsafe {
        std::arch::asm!(
            "xchg {tmp}, rbx",
            "lock cmpxchg16b xmmword ptr [{ptr}]",
            "mov rbx, {tmp}",
            ptr = in(reg) ptr,
            tmp = inout(reg) new as u64 => _,
            in("rcx") (new >> 64) as u64,
            inout("rax") lo,
            inout("rdx") hi,
            options(nostack),
        );
    }
    (u128::from(hi) << 64) | u128::from(lo)
}

#[cfg(any(test, feature = "fuzzing"))]
pub mod fake;

#[cfg(test)]
mod tests {
    use super::*;

    use super::fake::FakeCpu;

    const RAX: usize = 0;
    const RCX: usize = 1;
    const RDX: usize = 2;
    const RBX: usize = 3;
    const RBP: usize = 5;
    const RSI: usize = 6;
    const R9: usize = 9;

    fn long() -> CpuMode {
        CpuMode::long_mode_kernel()
    }

    fn run(cpu: &mut FakeCpu, bytes: &[u8], mode: CpuMode) -> Emulated {
        emulate(cpu, bytes, mode).unwrap()
    }

    /// Asserts a fault: exception delivered, RIP unchanged.
    fn assert_fault(cpu: &mut FakeCpu, bytes: &[u8], mode: CpuMode, expected: Exception) {
        let rip = cpu.rip;
        let done = run(cpu, bytes, mode);
        assert_eq!(done.exception, Some(expected), "{bytes:02x?}");
        assert_eq!(cpu.injected.last(), Some(&expected));
        assert_eq!(cpu.rip, rip, "a fault must not advance RIP");
    }

    const GP0: Exception = Exception::with_code(VEC_GP, 0);
    const UD: Exception = Exception::new(VEC_UD);
    const NM: Exception = Exception::new(VEC_NM);

    #[test]
    fn fwait_is_a_noop_without_pending_exception() {
        let mut cpu = FakeCpu::new();
        // Trailing bytes (KVM reports 15 fetched bytes) are ignored.
        let done = run(&mut cpu, &[0x9b, 0xf3, 0x48, 0x0f, 0xb8, 0xc3], long());
        assert_eq!(done.insn, EmulatedInsn::Fwait);
        assert_eq!(done.len, 1);
        assert_eq!(done.exception, None);
        assert_eq!(done.to_string(), "fwait");
        assert_eq!(cpu.rip, 0x1001);
        assert_eq!(cpu.rflags, 0x2);
        assert!(cpu.injected.is_empty());
    }

    #[test]
    fn fwait_with_masked_pending_exception_is_a_noop() {
        let mut cpu = FakeCpu::new();
        cpu.fsw = 0x0001; // IE flag set, but masked by FCW 0x37f.
        run(&mut cpu, &[0x9b], long());
        assert_eq!(cpu.rip, 0x1001);
        assert!(cpu.injected.is_empty());
    }

    #[test]
    fn fwait_with_unmasked_pending_exception_raises_mf() {
        let mut cpu = FakeCpu::new();
        cpu.fcw = 0x37e; // IE unmasked
        cpu.fsw = 0x0081; // IE + ES
        assert_fault(&mut cpu, &[0x9b], long(), Exception::new(VEC_MF));
        // With CR0.NE clear, legacy FERR# reporting is not emulated: error, no change.
        let mut mode = long();
        mode.cr0 &= !CR0_NE;
        let mut cpu2 = FakeCpu::new();
        cpu2.fcw = 0x37e;
        cpu2.fsw = 0x0081;
        let err = emulate(&mut cpu2, &[0x9b], mode).unwrap_err();
        assert!(matches!(err, EmulateError::UnsupportedCase { .. }), "{err}");
        assert_eq!(cpu2.rip, 0x1000);
    }

    #[test]
    fn fwait_with_mp_and_ts_raises_nm() {
        let mut cpu = FakeCpu::new();
        let mut mode = long();
        mode.cr0 |= CR0_TS; // MP is already set
        assert_fault(&mut cpu, &[0x9b], mode, NM);
        // TS without MP: no #NM.
        mode.cr0 &= !CR0_MP;
        let mut cpu = FakeCpu::new();
        assert_eq!(run(&mut cpu, &[0x9b], mode).exception, None);
    }

    #[test]
    fn popcnt_r64_from_register() {
        let mut cpu = FakeCpu::new();
        cpu.gprs[RBX] = 0xff;
        cpu.gprs[RAX] = 0xdead_beef_dead_beef;
        cpu.rflags = 0x2 | RFLAGS_STATUS; // every status flag set
        let done = run(&mut cpu, &[0xf3, 0x48, 0x0f, 0xb8, 0xc3], long()); // popcnt rax, rbx
        assert_eq!(done.insn, EmulatedInsn::Popcnt);
        assert_eq!(done.len, 5);
        assert_eq!(cpu.gprs[RAX], 8);
        assert_eq!(cpu.gprs[RBX], 0xff);
        assert_eq!(cpu.rflags, 0x2, "OF SF ZF AF CF PF all cleared");
        assert_eq!(cpu.rip, 0x1005);
    }

    #[test]
    fn popcnt_of_zero_sets_zf() {
        let mut cpu = FakeCpu::new();
        cpu.gprs[RAX] = 77;
        cpu.rflags = 0x2 | RFLAGS_CF | RFLAGS_SF;
        run(&mut cpu, &[0xf3, 0x48, 0x0f, 0xb8, 0xc3], long());
        assert_eq!(cpu.gprs[RAX], 0);
        assert_eq!(cpu.rflags, 0x2 | RFLAGS_ZF);
    }

    #[test]
    fn popcnt_all_ones_and_other_flags_preserved() {
        let mut cpu = FakeCpu::new();
        cpu.gprs[R9] = u64::MAX;
        cpu.rflags = 0x2 | RFLAGS_AC | (1 << 9); // AC and IF are not status flags
        run(&mut cpu, &[0xf3, 0x49, 0x0f, 0xb8, 0xc1], long()); // popcnt rax, r9
        assert_eq!(cpu.gprs[RAX], 64);
        assert_eq!(cpu.rflags, 0x2 | RFLAGS_AC | (1 << 9));
    }

    #[test]
    fn popcnt_r16_keeps_upper_bits() {
        let mut cpu = FakeCpu::new();
        cpu.gprs[RAX] = 0x1111_2222_3333_4444;
        cpu.gprs[RBX] = 0xffff_ffff_ffff_0f0f; // only BX = 0x0f0f counts
        let done = run(&mut cpu, &[0x66, 0xf3, 0x0f, 0xb8, 0xc3], long()); // popcnt ax, bx
        assert_eq!(done.len, 5);
        assert_eq!(cpu.gprs[RAX], 0x1111_2222_3333_0008);
        assert_eq!(cpu.rflags & RFLAGS_ZF, 0);
        // A zero 16-bit source sets ZF even though upper bits of RBX are set.
        cpu.gprs[RBX] = 0xffff_ffff_ffff_0000;
        run(&mut cpu, &[0x66, 0xf3, 0x0f, 0xb8, 0xc3], long());
        assert_eq!(cpu.gprs[RAX], 0x1111_2222_3333_0000);
        assert_ne!(cpu.rflags & RFLAGS_ZF, 0);
    }

    #[test]
    fn popcnt_r32_zero_extends() {
        let mut cpu = FakeCpu::new();
        cpu.gprs[RAX] = u64::MAX;
        cpu.gprs[RBX] = 0xffff_ffff_0000_0003;
        run(&mut cpu, &[0xf3, 0x0f, 0xb8, 0xc3], long()); // popcnt eax, ebx
        assert_eq!(cpu.gprs[RAX], 2);
    }

    #[test]
    fn popcnt_from_memory() {
        let mut cpu = FakeCpu::new();
        cpu.gprs[RBX] = 0x2000;
        cpu.set_mem(0x2000, &0x8000_0000_0000_0001u64.to_le_bytes());
        run(&mut cpu, &[0xf3, 0x48, 0x0f, 0xb8, 0x03], long()); // popcnt rax, [rbx]
        assert_eq!(cpu.gprs[RAX], 2);
        // 16-bit memory operand reads only 2 bytes.
        cpu.set_mem(0x3000, &[0xff, 0x01, 0xff, 0xff]);
        cpu.gprs[RBX] = 0x2ff0;
        // popcnt cx, [rbx+0x10]
        run(&mut cpu, &[0x66, 0xf3, 0x0f, 0xb8, 0x4b, 0x10], long());
        assert_eq!(cpu.gprs[RCX] & 0xffff, 9);
    }

    #[test]
    fn popcnt_rip_relative() {
        let mut cpu = FakeCpu::new();
        // popcnt eax, [rip+0x100]; instruction is 8 bytes at 0x1000 -> operand at 0x1108.
        cpu.set_mem(0x1108, &0x7u32.to_le_bytes());
        run(
            &mut cpu,
            &[0xf3, 0x0f, 0xb8, 0x05, 0x00, 0x01, 0x00, 0x00],
            long(),
        );
        assert_eq!(cpu.gprs[RAX], 3);
        assert_eq!(cpu.rip, 0x1008);
    }

    #[test]
    fn popcnt_honours_fs_base_in_long_mode_but_not_ds() {
        let mut cpu = FakeCpu::new();
        cpu.seg[Segment::Fs as usize] = 0x8000;
        cpu.seg[Segment::Ds as usize] = 0x4000; // ignored in 64-bit mode
        cpu.set_mem(0x8010, &0xffu64.to_le_bytes());
        cpu.set_mem(0x0010, &0x1u64.to_le_bytes());
        // popcnt rax, fs:[0x10]
        run(
            &mut cpu,
            &[0x64, 0xf3, 0x48, 0x0f, 0xb8, 0x04, 0x25, 0x10, 0, 0, 0],
            long(),
        );
        assert_eq!(cpu.gprs[RAX], 8);
        // popcnt rax, ds:[0x10] -> flat
        run(
            &mut cpu,
            &[0xf3, 0x48, 0x0f, 0xb8, 0x04, 0x25, 0x10, 0, 0, 0],
            long(),
        );
        assert_eq!(cpu.gprs[RAX], 1);
    }

    #[test]
    fn popcnt_in_real_mode_uses_segment_base_and_16_bit_addressing() {
        let mut cpu = FakeCpu::new();
        cpu.rip = 0x7c00;
        cpu.seg[Segment::Ds as usize] = 0x1000; // DS = 0x100
        cpu.gprs[RBX] = 0xffff_0020; // only BX counts for [bx+si]
        cpu.gprs[RSI] = 0x0010;
        cpu.set_mem(0x1030, &[0xff, 0x00]);
        // 16-bit code: f3 0f b8 00 = popcnt ax, [bx+si]
        let done = run(&mut cpu, &[0xf3, 0x0f, 0xb8, 0x00], CpuMode::real_mode());
        assert_eq!(done.len, 4);
        assert_eq!(cpu.gprs[RAX], 8);
        assert_eq!(cpu.rip, 0x7c04);
        // 66 prefix in 16-bit code selects the 32-bit form.
        cpu.gprs[RBX] = 0xffff_ffff_0000_0001;
        cpu.gprs[RAX] = 0xaaaa_aaaa_aaaa_aaaa;
        run(
            &mut cpu,
            &[0x66, 0xf3, 0x0f, 0xb8, 0xc3],
            CpuMode::real_mode(),
        );
        assert_eq!(cpu.gprs[RAX], 1);
    }

    #[test]
    fn ip_wraps_in_16_bit_code() {
        let mut cpu = FakeCpu::new();
        cpu.rip = 0xffff;
        run(&mut cpu, &[0x9b], CpuMode::real_mode());
        assert_eq!(cpu.rip, 0);
    }

    #[test]
    fn protected32_wraps_linear_addresses() {
        let mut cpu = FakeCpu::new();
        cpu.seg[Segment::Ds as usize] = 0xffff_f000;
        cpu.gprs[RBX] = 0x1100; // 0xffff_f000 + 0x1100 wraps to 0x100
        cpu.set_mem(0x100, &[0x0f, 0, 0, 0]);
        run(
            &mut cpu,
            &[0xf3, 0x0f, 0xb8, 0x03],
            CpuMode::protected32_kernel(),
        );
        assert_eq!(cpu.gprs[RAX], 4);
    }

    #[test]
    fn non_canonical_address_raises_gp_or_ss() {
        let mut cpu = FakeCpu::new();
        cpu.gprs[RBX] = 0x0000_8000_0000_0000;
        assert_fault(&mut cpu, &[0xf3, 0x48, 0x0f, 0xb8, 0x03], long(), GP0);
        cpu.gprs[RBP] = 0x0000_8000_0000_0000;
        // popcnt rax, [rbp+0] is SS-relative
        assert_fault(
            &mut cpu,
            &[0xf3, 0x48, 0x0f, 0xb8, 0x45, 0x00],
            long(),
            Exception::with_code(VEC_SS, 0),
        );
        // With LA57 the same address is canonical (and then simply outside fake memory).
        let mut mode = long();
        mode.cr4 |= CR4_LA57;
        let err = emulate(&mut cpu, &[0xf3, 0x48, 0x0f, 0xb8, 0x03], mode).unwrap_err();
        assert!(matches!(err, EmulateError::Memory { .. }), "{err}");
    }

    #[test]
    fn memory_failure_is_an_error_and_changes_nothing() {
        let mut cpu = FakeCpu::new();
        cpu.gprs[RBX] = 0x1234_5678;
        cpu.gprs[RAX] = 5;
        let err = emulate(&mut cpu, &[0xf3, 0x48, 0x0f, 0xb8, 0x03], long()).unwrap_err();
        match &err {
            EmulateError::Memory {
                addr, len, access, ..
            } => {
                assert_eq!((*addr, *len, *access), (0x1234_5678, 8, Access::Read));
            }
            other => panic!("unexpected {other}"),
        }
        assert!(err.to_string().contains("0x12345678"), "{err}");
        assert_eq!(cpu.gprs[RAX], 5);
        assert_eq!(cpu.rip, 0x1000);
    }

    #[test]
    fn clac_and_stac() {
        let mut cpu = FakeCpu::new();
        let done = run(&mut cpu, &[0x0f, 0x01, 0xcb], long()); // stac
        assert_eq!(done.insn, EmulatedInsn::Stac);
        assert_eq!(cpu.rflags, 0x2 | RFLAGS_AC);
        assert_eq!(cpu.rip, 0x1003);
        let done = run(&mut cpu, &[0x0f, 0x01, 0xca], long()); // clac
        assert_eq!(done.insn, EmulatedInsn::Clac);
        assert_eq!(cpu.rflags, 0x2);
        assert_eq!(cpu.rip, 0x1006);
    }

    #[test]
    fn clac_faults_in_user_mode_and_real_mode() {
        let mut cpu = FakeCpu::new();
        let mut user = long();
        user.cpl = 3;
        assert_fault(&mut cpu, &[0x0f, 0x01, 0xca], user, UD);
        assert_fault(&mut cpu, &[0x0f, 0x01, 0xcb], CpuMode::real_mode(), UD);
        assert_eq!(cpu.rflags, 0x2);
    }

    #[test]
    fn ldmxcsr_and_stmxcsr() {
        let mut cpu = FakeCpu::new();
        cpu.gprs[RBP] = 0x2010;
        cpu.set_mem(0x2004, &0x7f80u32.to_le_bytes());
        // Linux's kernel_fpu_begin_mask(): 0f ae 55 f4 = ldmxcsr [rbp-0xc]
        let done = run(&mut cpu, &[0x0f, 0xae, 0x55, 0xf4], long());
        assert_eq!(done.insn, EmulatedInsn::Ldmxcsr);
        assert_eq!(cpu.mxcsr, 0x7f80);
        assert_eq!(cpu.rip, 0x1004);
        // 0f ae 5d f0 = stmxcsr [rbp-0x10]
        cpu.mxcsr = 0x1fa5;
        let done = run(&mut cpu, &[0x0f, 0xae, 0x5d, 0xf0], long());
        assert_eq!(done.insn, EmulatedInsn::Stmxcsr);
        assert_eq!(cpu.mem[0x2000..0x2004], 0x1fa5u32.to_le_bytes());
    }

    #[test]
    fn ldmxcsr_reserved_bits_raise_gp() {
        let mut cpu = FakeCpu::new();
        cpu.gprs[RAX] = 0x2000;
        cpu.set_mem(0x2000, &0x0001_1f80u32.to_le_bytes()); // bit 16 is reserved
        assert_fault(&mut cpu, &[0x0f, 0xae, 0x10], long(), GP0);
        assert_eq!(cpu.mxcsr, 0x1f80, "MXCSR unchanged");
        // DAZ (bit 6) is reserved when MXCSR_MASK says so.
        cpu.mxcsr_mask = MXCSR_MASK_DEFAULT;
        cpu.set_mem(0x2000, &0x1fc0u32.to_le_bytes());
        assert_fault(&mut cpu, &[0x0f, 0xae, 0x10], long(), GP0);
        // In real mode the #GP has no error code. 0f ae 17 = ldmxcsr [bx]
        cpu.set_mem(0x2000, &0xffff_ffffu32.to_le_bytes());
        cpu.gprs[RBX] = 0x2000;
        assert_fault(
            &mut cpu,
            &[0x0f, 0xae, 0x17],
            CpuMode::real_mode(),
            Exception::new(VEC_GP),
        );
    }

    #[test]
    fn ldmxcsr_checks_cr0_and_cr4() {
        let mut cpu = FakeCpu::new();
        cpu.gprs[RAX] = 0x2000;
        cpu.set_mem(0x2000, &0x1f80u32.to_le_bytes());
        let mut mode = long();
        mode.cr4 &= !CR4_OSFXSR;
        assert_fault(&mut cpu, &[0x0f, 0xae, 0x10], mode, UD);
        let mut mode = long();
        mode.cr0 |= CR0_EM;
        assert_fault(&mut cpu, &[0x0f, 0xae, 0x10], mode, UD);
        let mut mode = long();
        mode.cr0 |= CR0_TS;
        assert_fault(&mut cpu, &[0x0f, 0xae, 0x10], mode, NM);
        assert_fault(&mut cpu, &[0x0f, 0xae, 0x18], mode, NM); // stmxcsr too
    }

    #[test]
    fn int3_traps_with_rip_past_it() {
        let mut cpu = FakeCpu::new();
        let done = run(&mut cpu, &[0xcc, 0x90], long());
        assert_eq!(done.insn, EmulatedInsn::Int3);
        assert_eq!(done.exception, Some(Exception::new(VEC_BP)));
        assert_eq!(cpu.injected, vec![Exception::new(VEC_BP)]);
        assert_eq!(cpu.rip, 0x1001);
    }

    #[test]
    fn cmpxchg16b_success_and_failure() {
        let mut cpu = FakeCpu::new();
        let old = 0x1111_2222_3333_4444_5555_6666_7777_8888u128;
        cpu.set_mem(0x2000, &old.to_le_bytes());
        cpu.gprs[RSI] = 0x2000;
        cpu.gprs[RAX] = 0x5555_6666_7777_8888;
        cpu.gprs[RDX] = 0x1111_2222_3333_4444;
        cpu.gprs[RBX] = 0xaaaa;
        cpu.gprs[RCX] = 0xbbbb;
        let insn = [0xf0, 0x48, 0x0f, 0xc7, 0x0e]; // lock cmpxchg16b [rsi]
        let done = run(&mut cpu, &insn, long());
        assert_eq!(done.insn, EmulatedInsn::Cmpxchg16b);
        assert_ne!(cpu.rflags & RFLAGS_ZF, 0);
        assert_eq!(
            cpu.mem[0x2000..0x2010],
            ((0xbbbbu128 << 64) | 0xaaaa).to_le_bytes()
        );
        assert_eq!(cpu.gprs[RAX], 0x5555_6666_7777_8888, "RDX:RAX unchanged");
        // Now memory differs from RDX:RAX: load it, ZF = 0, memory unchanged.
        cpu.rflags |= RFLAGS_CF;
        run(&mut cpu, &insn, long());
        assert_eq!(cpu.rflags & RFLAGS_ZF, 0);
        assert_ne!(cpu.rflags & RFLAGS_CF, 0, "other flags untouched");
        assert_eq!((cpu.gprs[RDX], cpu.gprs[RAX]), (0xbbbb, 0xaaaa));
        assert_eq!(
            cpu.mem[0x2000..0x2010],
            ((0xbbbbu128 << 64) | 0xaaaa).to_le_bytes()
        );
        assert_eq!(cpu.rip, 0x100a);
    }

    #[test]
    fn cmpxchg16b_misaligned_raises_gp() {
        let mut cpu = FakeCpu::new();
        cpu.gprs[RSI] = 0x2008;
        assert_fault(&mut cpu, &[0xf0, 0x48, 0x0f, 0xc7, 0x0e], long(), GP0);
    }

    #[test]
    fn cmpxchg8b_success_and_failure() {
        let mut cpu = FakeCpu::new();
        cpu.set_mem(0x2004, &0x0000_0001_0000_0002u64.to_le_bytes()); // unaligned is fine
        cpu.gprs[RSI] = 0x2004;
        cpu.gprs[RAX] = 0xffff_ffff_0000_0002; // upper halves are ignored
        cpu.gprs[RDX] = 0xffff_ffff_0000_0001;
        cpu.gprs[RBX] = 0x3;
        cpu.gprs[RCX] = 0x4;
        let insn = [0xf0, 0x0f, 0xc7, 0x0e]; // lock cmpxchg8b [rsi]
        let done = run(&mut cpu, &insn, long());
        assert_eq!(done.insn, EmulatedInsn::Cmpxchg8b);
        assert_ne!(cpu.rflags & RFLAGS_ZF, 0);
        assert_eq!(
            cpu.mem[0x2004..0x200c],
            0x0000_0004_0000_0003u64.to_le_bytes()
        );
        run(&mut cpu, &insn, long());
        assert_eq!(cpu.rflags & RFLAGS_ZF, 0);
        assert_eq!(
            (cpu.gprs[RDX], cpu.gprs[RAX]),
            (4, 3),
            "loaded, zero-extended"
        );
        // 32-bit mode works the same.
        let mut cpu = FakeCpu::new();
        cpu.gprs[RSI] = 0x2000;
        run(&mut cpu, &insn[1..], CpuMode::protected32_kernel());
        assert_ne!(cpu.rflags & RFLAGS_ZF, 0, "0 == 0");
    }

    #[test]
    fn pshufb_register_and_memory() {
        let mut cpu = FakeCpu::new();
        cpu.xmm[0] = *b"ABCDEFGHIJKLMNOP";
        let mut sel = [0u8; 16];
        for (i, s) in sel.iter_mut().enumerate() {
            *s = 15 - i as u8;
        }
        sel[3] = 0x80; // zeroes that byte
        sel[4] = 0x31; // only the low 4 bits select: 1
        cpu.xmm[1] = sel;
        let done = run(&mut cpu, &[0x66, 0x0f, 0x38, 0x00, 0xc1], long()); // pshufb xmm0, xmm1
        assert_eq!(done.insn, EmulatedInsn::Pshufb);
        assert_eq!(&cpu.xmm[0], b"PON\0BKJIHGFEDCBA");
        assert_eq!(cpu.rip, 0x1005);
        // pshufb xmm9, [r8] (REX.RB as in Linux's crc_t10dif code): 66 45 0f 38 00 08
        cpu.xmm[9] = *b"0123456789abcdef";
        cpu.gprs[8] = 0x2000;
        cpu.set_mem(0x2000, &[0; 16]);
        run(&mut cpu, &[0x66, 0x45, 0x0f, 0x38, 0x00, 0x08], long());
        assert_eq!(&cpu.xmm[9], b"0000000000000000");
    }

    #[test]
    fn pshufb_misaligned_memory() {
        let mut cpu = FakeCpu::new();
        cpu.gprs[RAX] = 0x2004;
        let insn = [0x66, 0x0f, 0x38, 0x00, 0x00]; // pshufb xmm0, [rax]
        assert_fault(&mut cpu, &insn, long(), GP0);
        cpu.mxcsr |= MXCSR_MM; // AMD misaligned SSE mode
        assert_eq!(run(&mut cpu, &insn, long()).exception, None);
        let mut mode = long();
        mode.cr0 |= CR0_TS;
        assert_fault(&mut cpu, &insn, mode, NM);
    }

    #[test]
    fn truncated_and_empty_bytes() {
        let mut cpu = FakeCpu::new();
        for bytes in [&[][..], &[0xf3], &[0xf3, 0x48, 0x0f], &[0x66, 0x0f, 0x38]] {
            let err = emulate(&mut cpu, bytes, long()).unwrap_err();
            assert!(
                matches!(err, EmulateError::Truncated { .. }),
                "{bytes:02x?}: {err}"
            );
        }
        let err = emulate(&mut cpu, &[0xf3, 0x48, 0x0f], long()).unwrap_err();
        assert!(err.to_string().contains("f3 48 0f"), "{err}");
        assert_eq!(cpu.rip, 0x1000);
    }

    #[test]
    fn undecodable_bytes() {
        let mut cpu = FakeCpu::new();
        // 06 (push es) does not exist in 64-bit mode; f0 9b is an invalid LOCK use.
        for bytes in [
            &[0x06, 0x90][..],
            &[0xf0, 0x9b],
            &[0xf0, 0xf3, 0x48, 0x0f, 0xb8, 0xc3],
        ] {
            let err = emulate(&mut cpu, bytes, long()).unwrap_err();
            assert!(
                matches!(err, EmulateError::Undecodable { .. }),
                "{bytes:02x?}: {err}"
            );
        }
        // cmpxchg8b with a register operand is invalid.
        let err = emulate(&mut cpu, &[0x0f, 0xc7, 0xc8], long()).unwrap_err();
        assert!(matches!(err, EmulateError::Undecodable { .. }), "{err}");
    }

    #[test]
    fn unsupported_instruction_names_mnemonic_and_bytes() {
        let mut cpu = FakeCpu::new();
        // xrstor [rdi] (from the table of rejected instructions, docs/HOST.md)
        let err = emulate(&mut cpu, &[0x48, 0x0f, 0xae, 0x2f, 0x90], long()).unwrap_err();
        match &err {
            EmulateError::Unsupported { mnemonic, bytes } => {
                assert_eq!(mnemonic, "xrstor64");
                assert_eq!(bytes.to_string(), "48 0f ae 2f");
            }
            other => panic!("unexpected {other}"),
        }
        let err = emulate(&mut cpu, &[0x0f, 0x0b], long()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "instruction `ud2` is not emulated (bytes 0f 0b)"
        );
        assert_eq!(cpu.rip, 0x1000);
    }

    #[test]
    fn cpu_mode_from_sregs() {
        let mut sregs = kvm_sregs::default();
        assert_eq!(CpuMode::from_sregs(&sregs, 2).bitness, Bitness::Bits16);
        sregs.cr0 = 0x8000_0011;
        sregs.cs.db = 1;
        sregs.ss.dpl = 3;
        let m = CpuMode::from_sregs(&sregs, 2);
        assert_eq!((m.bitness, m.cpl, m.protected), (Bitness::Bits32, 3, true));
        sregs.efer = EFER_LMA | (1 << 8);
        sregs.cs.db = 0;
        sregs.cs.l = 1;
        sregs.ss.dpl = 0;
        let m = CpuMode::from_sregs(&sregs, 2);
        assert_eq!((m.bitness, m.cpl), (Bitness::Bits64, 0));
        sregs.cs.l = 0;
        assert_eq!(CpuMode::from_sregs(&sregs, 2).bitness, Bitness::Bits16);
        let m = CpuMode::from_sregs(&sregs, 2 | RFLAGS_VM);
        assert!(m.vm86);
        assert_eq!((m.bitness, m.cpl), (Bitness::Bits16, 3));
    }

    fn internal_error_run(suberror: u32, ndata: u32, data: &[u64]) -> Box<kvm_run> {
        let mut run = Box::<kvm_run>::default();
        run.exit_reason = KVM_EXIT_INTERNAL_ERROR;
        // SAFETY: (test) writing plain integers into the union's `internal` member.
        let internal = unsafe { &mut run.__bindgen_anon_1.internal };
        internal.suberror = suberror;
        internal.ndata = ndata;
        internal.data[..data.len()].copy_from_slice(data);
        run
    }

    #[test]
    fn emulation_failure_bytes_layout() {
        // What the host notes show: flag 1, 15 bytes "9b f3 48 0f b8 c3 ...".
        let mut area = [0x90u8; 16];
        area[0] = 15;
        area[1..7].copy_from_slice(&[0x9b, 0xf3, 0x48, 0x0f, 0xb8, 0xc3]);
        let d1 = u64::from_le_bytes(area[..8].try_into().unwrap());
        let d2 = u64::from_le_bytes(area[8..].try_into().unwrap());
        let run = internal_error_run(1, 8, &[1, d1, d2]);
        let (bytes, len) = emulation_failure_bytes(&run).unwrap();
        assert_eq!(len, 15);
        assert_eq!(bytes[..6], [0x9b, 0xf3, 0x48, 0x0f, 0xb8, 0xc3]);
        let mut cpu = FakeCpu::new();
        assert_eq!(
            emulate(&mut cpu, &bytes[..len], long()).unwrap().insn,
            EmulatedInsn::Fwait
        );
    }

    #[test]
    fn emulation_failure_bytes_rejects_bad_exits() {
        let err = |run: &kvm_run| emulation_failure_bytes(run).unwrap_err();
        let mut other = Box::<kvm_run>::default();
        other.exit_reason = kvm_bindings::KVM_EXIT_HLT;
        assert!(matches!(
            err(&other),
            EmulateError::NotEmulationFailure { .. }
        ));
        let run = internal_error_run(2, 8, &[1, 0x0f, 0]);
        assert!(matches!(
            err(&run),
            EmulateError::NotEmulationFailure { suberror: 2, .. }
        ));
        let run = internal_error_run(1, 8, &[0, 0x0f, 0]); // flag missing
        assert!(matches!(err(&run), EmulateError::NoInstructionBytes { .. }));
        let run = internal_error_run(1, 2, &[1, 0x0f, 0]); // ndata too small
        assert!(matches!(err(&run), EmulateError::NoInstructionBytes { .. }));
        let run = internal_error_run(1, 0, &[]);
        assert!(matches!(err(&run), EmulateError::NoInstructionBytes { .. }));
        let run = internal_error_run(1, 8, &[1, 0, 0]); // length 0
        assert!(matches!(err(&run), EmulateError::BadInstructionLength(0)));
        let run = internal_error_run(1, 8, &[1, 16, 0]); // length 16
        assert!(matches!(err(&run), EmulateError::BadInstructionLength(16)));
    }

    #[test]
    fn host_cmpxchg16b_compares_and_swaps() {
        if !std::arch::is_x86_feature_detected!("cmpxchg16b") {
            return;
        }
        #[repr(align(16))]
        struct Aligned(u128);
        let mut cell = Aligned(0x1234);
        let ptr: *mut u128 = &mut cell.0;
        let new = (0xdead_u128 << 64) | 0xbeef;
        // SAFETY: `ptr` points at a live, 16-byte aligned u128; the CPU has CMPXCHG16B.
        let old = unsafe { host_cmpxchg16b(ptr, 0x1234, new) };
        assert_eq!((old, cell.0), (0x1234, new));
        // SAFETY: as above.
        let old = unsafe { host_cmpxchg16b(ptr, 0x1234, 7) };
        assert_eq!((old, cell.0), (new, new), "mismatch: memory unchanged");
    }

    #[test]
    fn only_user_space_failures_become_ud() {
        let user = CpuMode { cpl: 3, ..long() };
        let unsupported = EmulateError::Unsupported {
            mnemonic: "phaddw".into(),
            bytes: InsnBytes::of(&[0x66, 0x0f, 0x38, 0x01, 0xc1]),
        };
        assert!(user_mode_ud(user, 3, &unsupported));
        // CPL 0: the guest kernel: stays an error.
        assert!(!user_mode_ud(long(), 0, &unsupported));
        // SS and CS disagree: not taken for user space.
        assert!(!user_mode_ud(user, 0, &unsupported));
        // Real mode has no user space.
        assert!(!user_mode_ud(CpuMode::real_mode(), 3, &unsupported));
        let memory = EmulateError::Memory {
            addr: 0xffff_8000_0000_0000,
            len: 4,
            access: Access::Read,
            reason: "memory operands at CPL 3".into(),
        };
        assert!(user_mode_ud(user, 3, &memory));
        let undecodable = EmulateError::Undecodable {
            bytes: InsnBytes::of(&[0x0f, 0xff]),
            bitness: 64,
        };
        assert!(user_mode_ud(user, 3, &undecodable));
        // A failed ioctl says nothing about the guest's instruction.
        let kvm = EmulateError::Kvm {
            op: "KVM_GET_SREGS",
            source: kvm_ioctls::Error::new(libc::EIO),
        };
        assert!(!user_mode_ud(user, 3, &kvm));
        assert_eq!(EmulatedInsn::UserUd.mnemonic(), "#UD to user space");
        assert!(EmulatedInsn::ALL.contains(&EmulatedInsn::UserUd));
    }

    /// xorshift64*: deterministic pseudo-random numbers without a crate.
    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            self.0 = x;
            x.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        let modes = [
            CpuMode::long_mode_kernel(),
            CpuMode::protected32_kernel(),
            CpuMode::real_mode(),
            CpuMode {
                cpl: 3,
                ..CpuMode::long_mode_kernel()
            },
        ];
        // Prefixes that steer the random tail into the emulated opcodes.
        let stems: [&[u8]; 9] = [
            &[],
            &[0xf3, 0x0f, 0xb8],
            &[0xf3, 0x48, 0x0f, 0xb8],
            &[0x0f, 0xae],
            &[0x0f, 0xc7],
            &[0xf0, 0x48, 0x0f, 0xc7],
            &[0x66, 0x0f, 0x38, 0x00],
            &[0x66, 0x45, 0x0f, 0x38, 0x00],
            &[0x64, 0x67, 0xf3, 0x0f, 0xb8],
        ];
        let mut outcomes = [0usize; 2];
        // One CPU for all iterations (its memory keeps whatever earlier runs stored there).
        let mut cpu = FakeCpu::new();
        for i in 0..100_000u64 {
            cpu.injected.clear();
            for r in cpu.gprs.iter_mut() {
                // Mostly small addresses (inside fake memory), sometimes anything.
                let v = rng.next();
                *r = if v & 3 == 0 { v } else { v & 0x1ffff };
            }
            cpu.rip = rng.next();
            cpu.seg[Segment::Fs as usize] = rng.next() & 0xffff;
            cpu.fcw = rng.next() as u16;
            cpu.fsw = rng.next() as u16;
            cpu.mxcsr = rng.next() as u32;
            cpu.rflags = rng.next();
            let mut mode = modes[(i % modes.len() as u64) as usize];
            mode.cr0 ^= rng.next() & (CR0_MP | CR0_EM | CR0_TS | CR0_NE);
            mode.cr4 ^= rng.next() & (CR4_OSFXSR | CR4_LA57);
            let stem = stems[(rng.next() % stems.len() as u64) as usize];
            let len = (rng.next() % 20) as usize;
            let mut bytes = stem.to_vec();
            bytes.extend((0..len).map(|_| rng.next() as u8));
            let r = emulate(&mut cpu, &bytes, mode);
            outcomes[usize::from(r.is_ok())] += 1;
            if let Err(e) = r {
                let _ = e.to_string();
            }
        }
        assert!(
            outcomes[1] > 1000,
            "the stems should hit emulated instructions: {outcomes:?}"
        );
    }
}
