//! The instruction-emulator fallback (src/emulate.rs): decode and execute
//! one instruction against a fake vCPU and fake guest memory.
//!
//! Input: 1 byte of mode (bitness, CPL, CR0/CR4 bits), 16 little-endian
//! u64 registers' low 32 bits are taken from the next 64 bytes (values
//! inside the fake memory, mostly, so memory operands resolve), then the
//! instruction bytes. Checked: no crash; an error leaves the CPU exactly as
//! it was (emulate's contract); success advances RIP by the instruction
//! length or delivers an exception.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vmlab::emulate::fake::FakeCpu;
use vmlab::emulate::{emulate, Bitness, CpuMode};

const MEM: usize = 0x4000;

fuzz_target!(|data: &[u8]| {
    let Some((&m, rest)) = data.split_first() else {
        return;
    };
    let (regs, insn) = rest.split_at(rest.len().min(64));
    let mut mode = match m & 3 {
        0 => CpuMode::long_mode_kernel(),
        1 => CpuMode::protected32_kernel(),
        2 => CpuMode::real_mode(),
        _ => CpuMode {
            cpl: 3,
            ..CpuMode::long_mode_kernel()
        },
    };
    // MP EM TS NE, and OSFXSR / LA57.
    let cr0_bits = [1u64 << 1, 1 << 2, 1 << 3, 1 << 5];
    for (i, bit) in cr0_bits.iter().enumerate() {
        if m & (4 << i) != 0 {
            mode.cr0 ^= bit;
        }
    }
    if m & 0x40 != 0 {
        mode.cr4 ^= 1 << 9;
    }
    if m & 0x80 != 0 && mode.bitness == Bitness::Bits64 {
        mode.cr4 ^= 1 << 12;
    }
    // 16 KiB of memory is enough for any operand (and keeps the per-run
    // copy and comparison below cheap).
    let mut cpu = FakeCpu::new();
    cpu.mem.truncate(MEM);
    for (i, c) in regs.chunks(4).enumerate() {
        let mut v = [0u8; 4];
        v[..c.len()].copy_from_slice(c);
        let v = u32::from_le_bytes(v);
        // The top bit sends a register far outside memory.
        cpu.gprs[i] = if v & 0x8000_0000 != 0 {
            u64::from(v) << 32 | u64::from(v)
        } else {
            u64::from(v) % MEM as u64
        };
    }
    cpu.fsw = (cpu.gprs[15] >> 8) as u16;
    cpu.mxcsr = cpu.gprs[14] as u32 & 0xffff;
    let before = cpu.clone();
    match emulate(&mut cpu, insn, mode) {
        Err(e) => {
            let _ = e.to_string();
            assert_eq!(cpu, before, "an error must leave the CPU unchanged: {e}");
        }
        Ok(done) => {
            let _ = done.to_string();
            assert!(done.len >= 1 && done.len <= 15);
            if done.exception.is_none() {
                assert_ne!(cpu.rip, before.rip, "completed without advancing RIP");
            }
        }
    }
});
