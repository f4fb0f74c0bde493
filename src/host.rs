//! What kind of KVM this host has, and what vmlab must do about it.
//!
//! On hardware virtualization (VT-x/AMD-V) vmlab applies nothing special.
//! On a host whose `/dev/kvm` comes from the `kvm_pvm` module (a nested,
//! pagetable-based KVM without VT-x; see docs/HOST.md) an ordinary guest
//! kernel only runs with some CPU features hidden from it, and KVM's
//! instruction emulator rejects a few instructions that vmlab then emulates
//! itself. Both workarounds are applied only when such a host is detected.

use std::path::Path;

/// Kinds of KVM host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostKind {
    /// VT-x or AMD-V: no workarounds.
    Hardware,
    /// The `kvm_pvm` module: nested, shadow-paging KVM.
    NestedPvm,
}

/// How the user asked vmlab to decide.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum QuirksMode {
    /// Detect the host.
    #[default]
    Auto,
    /// Apply the PVM workarounds whatever the host.
    Pvm,
    /// Apply no workarounds.
    None,
}

/// Kernel command-line options without which an ordinary Linux guest does
/// not get through boot on a PVM host: XSAVE and the listed CPU features
/// lead the kernel into instructions that KVM's emulator rejects there.
/// `clearcpuid=` takes at most 128 characters.
///
/// FSGSBASE stays on, unlike in the first recipe in the host notes: with
/// it cleared the kernel switches the user FS base with WRMSR, which this
/// host loses across context switches (busybox pipelines segfaulted on a
/// TLS read through FS, 2 of 2 runs, under QEMU as under vmlab); with
/// WRFSBASE the same pipelines ran 5 of 5.
///
/// The last three only make the boot faster. On this host every
/// instruction a guest kernel runs with interrupts off goes through KVM's
/// emulator, and the guest profiler (`--profile-guest`, docs/BOOT.md)
/// found three such costs that an option removes:
/// - `rodata=off`: no `mark_rodata_ro()`, which changes the attributes of
///   the kernel image page by page (about 2 s here). The kernel text stays
///   writable: a hardening feature traded for boot time, on this host only.
/// - `percpu_alloc=page`: the first per-CPU chunk from 4 KiB pages instead
///   of one 2 MiB block the kernel zeroes (about 1.3 s).
/// - `noreplace-smp`: a one-vCPU guest keeps the LOCK prefixes instead of
///   patching ~3,000 of them out one `text_poke` (a CR3 switch) at a time
///   (about 1.6 s).
pub const PVM_CMDLINE: &[&str] = &[
    "noxsave",
    "mitigations=off",
    "clearcpuid=popcnt,cx16,smap,smep,rdpid,invpcid,pcid,pku,rdtscp,movbe,bmi1,bmi2,abm,rdrand,rdseed,erms,fsrm,avx,avx2,avx512f",
    "rodata=off",
    "percpu_alloc=page",
    "noreplace-smp",
];

impl HostKind {
    /// Looks at the running host.
    pub fn detect() -> HostKind {
        Self::detect_why().0
    }

    /// Looks at the running host; also says what decided it (for the log).
    pub fn detect_why() -> (HostKind, &'static str) {
        Self::detect_why_at(Path::new("/sys/module"), Path::new("/proc/cpuinfo"))
    }

    /// Detection against given sysfs/procfs paths (for tests).
    pub fn detect_at(sys_module: &Path, cpuinfo: &Path) -> HostKind {
        Self::detect_why_at(sys_module, cpuinfo).0
    }

    /// Detection against given paths, with the reason.
    pub fn detect_why_at(sys_module: &Path, cpuinfo: &Path) -> (HostKind, &'static str) {
        if sys_module.join("kvm_pvm").exists() {
            return (HostKind::NestedPvm, "the kvm_pvm module is loaded");
        }
        // KVM without vmx/svm in the CPU flags can only be a software or
        // pagetable-based implementation: treat it like PVM.
        match std::fs::read_to_string(cpuinfo) {
            Ok(info) => {
                let flags = info
                    .lines()
                    .find(|l| l.starts_with("flags"))
                    .unwrap_or_default();
                let has = |flag: &str| flags.split_whitespace().any(|f| f == flag);
                if has("svm") {
                    (HostKind::Hardware, "AMD-V: svm in the CPU flags")
                } else if has("vmx") {
                    (HostKind::Hardware, "Intel VT-x: vmx in the CPU flags")
                } else {
                    (HostKind::NestedPvm, "no vmx or svm in the CPU flags")
                }
            }
            Err(_) => (
                HostKind::Hardware,
                "CPU flags unreadable, assuming hardware virtualization",
            ),
        }
    }

    /// Resolves the user's choice against detection.
    pub fn resolve(mode: QuirksMode) -> HostKind {
        Self::resolve_why(mode).0
    }

    /// Resolves the user's choice, with what decided it (for the log).
    pub fn resolve_why(mode: QuirksMode) -> (HostKind, &'static str) {
        match mode {
            QuirksMode::Auto => Self::detect_why(),
            QuirksMode::Pvm => (HostKind::NestedPvm, "forced by --host-quirks pvm"),
            QuirksMode::None => (HostKind::Hardware, "forced by --host-quirks none"),
        }
    }

    /// Command-line additions this host needs.
    pub fn cmdline_quirks(self) -> &'static [&'static str] {
        match self {
            HostKind::Hardware => &[],
            HostKind::NestedPvm => PVM_CMDLINE,
        }
    }

    /// Whether vmlab emulates instructions KVM rejects.
    pub fn emulation_fallback(self) -> bool {
        self == HostKind::NestedPvm
    }

    /// Whether KVM's paravirtual IPI/TLB-flush/yield features are hidden
    /// from the guest (they stall SMP guests on a PVM host).
    pub fn hide_pv_ipi(self) -> bool {
        self == HostKind::NestedPvm
    }

    /// A short description for logs and reports.
    pub fn describe(self) -> &'static str {
        match self {
            HostKind::Hardware => "hardware-assisted KVM (VT-x/AMD-V)",
            HostKind::NestedPvm => "nested KVM without VT-x (kvm_pvm)",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake(dir: &Path, pvm: bool, flags: &str) -> HostKind {
        let sys = dir.join("sys");
        std::fs::create_dir_all(&sys).unwrap();
        if pvm {
            std::fs::create_dir_all(sys.join("kvm_pvm")).unwrap();
        }
        let cpuinfo = dir.join("cpuinfo");
        std::fs::write(&cpuinfo, format!("processor\t: 0\nflags\t\t: {flags}\n")).unwrap();
        HostKind::detect_at(&sys, &cpuinfo)
    }

    #[test]
    fn detection() {
        let base = std::env::temp_dir().join(format!("vmlab-host-{}", std::process::id()));
        assert_eq!(fake(&base.join("a"), true, "fpu vme"), HostKind::NestedPvm);
        assert_eq!(
            fake(&base.join("b"), false, "fpu vmx sse"),
            HostKind::Hardware
        );
        assert_eq!(fake(&base.join("c"), false, "fpu svm"), HostKind::Hardware);
        // An SVM host (QEMU TCG with -cpu EPYC,+svm,+npt) and a VT-x host
        // both say which extension decided it, for the log.
        let svm = base.join("e");
        std::fs::create_dir_all(svm.join("sys")).unwrap();
        std::fs::write(svm.join("cpuinfo"), "flags\t\t: fpu svm npt\n").unwrap();
        assert_eq!(
            HostKind::detect_why_at(&svm.join("sys"), &svm.join("cpuinfo")),
            (HostKind::Hardware, "AMD-V: svm in the CPU flags")
        );
        std::fs::write(svm.join("cpuinfo"), "flags\t\t: fpu vmx ept\n").unwrap();
        assert_eq!(
            HostKind::detect_why_at(&svm.join("sys"), &svm.join("cpuinfo")),
            (HostKind::Hardware, "Intel VT-x: vmx in the CPU flags")
        );
        // kvm_pvm wins over the flags (a PVM host may show svm).
        std::fs::create_dir_all(svm.join("sys/kvm_pvm")).unwrap();
        assert_eq!(
            HostKind::detect_why_at(&svm.join("sys"), &svm.join("cpuinfo")).0,
            HostKind::NestedPvm
        );
        assert_eq!(
            fake(&base.join("d"), false, "fpu sse2"),
            HostKind::NestedPvm
        );
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn hardware_gets_no_quirks() {
        assert!(HostKind::Hardware.cmdline_quirks().is_empty());
        assert!(!HostKind::Hardware.emulation_fallback());
        assert!(HostKind::NestedPvm.emulation_fallback());
        assert!(!HostKind::Hardware.hide_pv_ipi());
        assert!(HostKind::NestedPvm.hide_pv_ipi());
        assert_eq!(HostKind::resolve(QuirksMode::None), HostKind::Hardware);
        assert_eq!(HostKind::resolve(QuirksMode::Pvm), HostKind::NestedPvm);
    }

    #[test]
    fn clearcpuid_fits_the_kernel_limit() {
        let arg = PVM_CMDLINE
            .iter()
            .find(|a| a.starts_with("clearcpuid="))
            .unwrap();
        let value = arg.trim_start_matches("clearcpuid=");
        assert!(value.len() <= 128, "{} characters", value.len());
        assert!(!value.contains(' '));
    }
}
