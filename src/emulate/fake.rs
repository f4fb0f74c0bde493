//! A fake [`GuestCpu`]: registers in fields and flat memory at linear
//! addresses `0..MEM_SIZE`, for the unit tests and the fuzz target
//! (`fuzz/fuzz_targets/emulate.rs`, built with the `fuzzing` feature).

use super::{Access, EmulateError, Exception, GuestCpu, Segment};

/// Size of the fake memory.
pub const MEM_SIZE: usize = 0x20000;

/// A CPU with flat memory at linear addresses `0..MEM_SIZE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeCpu {
    /// General registers, encoding order (RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI, R8..R15).
    pub gprs: [u64; 16],
    /// RIP.
    pub rip: u64,
    /// RFLAGS.
    pub rflags: u64,
    /// Segment bases, by [`Segment`] as index.
    pub seg: [u64; 6],
    /// Memory at linear addresses `0..mem.len()`.
    pub mem: Vec<u8>,
    /// x87 control word.
    pub fcw: u16,
    /// x87 status word.
    pub fsw: u16,
    /// MXCSR.
    pub mxcsr: u32,
    /// MXCSR_MASK.
    pub mxcsr_mask: u32,
    /// XMM0..XMM15.
    pub xmm: [[u8; 16]; 16],
    /// Exceptions injected, in order.
    pub injected: Vec<Exception>,
}

impl FakeCpu {
    /// RIP 0x1000, RFLAGS 2, FCW 0x37f, MXCSR 0x1f80, zeroed memory.
    pub fn new() -> Self {
        FakeCpu {
            gprs: [0; 16],
            rip: 0x1000,
            rflags: 0x2,
            seg: [0; 6],
            mem: vec![0; MEM_SIZE],
            fcw: 0x37f,
            fsw: 0,
            mxcsr: 0x1f80,
            mxcsr_mask: 0xffff,
            xmm: [[0; 16]; 16],
            injected: Vec::new(),
        }
    }

    /// The index of `addr..addr + len` in `mem`, or a memory error.
    pub fn range(&self, addr: u64, len: usize, access: Access) -> Result<usize, EmulateError> {
        let start = usize::try_from(addr)
            .ok()
            .filter(|&a| a.checked_add(len).is_some_and(|end| end <= self.mem.len()));
        start.ok_or(EmulateError::Memory {
            addr,
            len,
            access,
            reason: "outside fake memory".into(),
        })
    }

    /// Stores `data` at `addr` (panics outside memory: for tests).
    pub fn set_mem(&mut self, addr: usize, data: &[u8]) {
        self.mem[addr..addr + data.len()].copy_from_slice(data);
    }
}

impl GuestCpu for FakeCpu {
    fn gpr(&self, index: usize) -> u64 {
        self.gprs[index]
    }
    fn set_gpr(&mut self, index: usize, value: u64) {
        self.gprs[index] = value;
    }
    fn rip(&self) -> u64 {
        self.rip
    }
    fn set_rip(&mut self, rip: u64) {
        self.rip = rip;
    }
    fn rflags(&self) -> u64 {
        self.rflags
    }
    fn set_rflags(&mut self, rflags: u64) {
        self.rflags = rflags;
    }
    fn segment_base(&self, segment: Segment) -> u64 {
        self.seg[segment as usize]
    }
    fn read_memory(&mut self, addr: u64, buf: &mut [u8]) -> Result<(), EmulateError> {
        let a = self.range(addr, buf.len(), Access::Read)?;
        buf.copy_from_slice(&self.mem[a..a + buf.len()]);
        Ok(())
    }
    fn write_memory(&mut self, addr: u64, data: &[u8]) -> Result<(), EmulateError> {
        let a = self.range(addr, data.len(), Access::Write)?;
        self.mem[a..a + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn x87_control_status(&mut self) -> Result<(u16, u16), EmulateError> {
        Ok((self.fcw, self.fsw))
    }
    fn mxcsr(&mut self) -> Result<u32, EmulateError> {
        Ok(self.mxcsr)
    }
    fn mxcsr_mask(&mut self) -> Result<u32, EmulateError> {
        Ok(self.mxcsr_mask)
    }
    fn set_mxcsr(&mut self, value: u32) -> Result<(), EmulateError> {
        self.mxcsr = value;
        Ok(())
    }
    fn xmm(&mut self, index: usize) -> Result<[u8; 16], EmulateError> {
        Ok(self.xmm[index])
    }
    fn set_xmm(&mut self, index: usize, value: [u8; 16]) -> Result<(), EmulateError> {
        self.xmm[index] = value;
        Ok(())
    }
    fn inject_exception(&mut self, exception: Exception) -> Result<(), EmulateError> {
        self.injected.push(exception);
        Ok(())
    }
}

impl Default for FakeCpu {
    fn default() -> Self {
        Self::new()
    }
}
