//! Snapshots of a running micro-VM (issue 20): the saved state of every
//! vCPU and of the VM's in-kernel devices, the guest memory the guest
//! touched, and a format that refuses what it cannot restore.
//!
//! A snapshot is a directory:
//!
//! | file | what |
//! |---|---|
//! | `state` | one header line, `vmlab-snapshot <format> sha256:<hex>\n`, then the [`Snapshot`] as JSON; the digest covers the JSON bytes |
//! | `memory` | guest RAM as a sparse file: region after region, each at the sum of the sizes before it; pages the guest never touched (or left all zero) are holes |
//!
//! Restoring checks, before anything is created: the header and the
//! digest (a truncated or corrupted `state` is refused), the format
//! version, the vmlab version that wrote it, the host CPU (vendor,
//! family, model: the saved CPUID and MSRs describe that CPU), and that
//! `memory` has the size of the saved RAM. The memory file is not
//! digested (that would read every page at each restore, the cost a
//! restore exists to avoid); it is mapped privately, so the guest's
//! writes after a restore never reach it and many VMs can be restored
//! from one snapshot, sharing the pages none of them changed.
//!
//! [`state`] saves and restores the KVM state (vCPU registers, FPU and
//! XSAVE, XCRs, MSRs, LAPIC, debug registers, events, MP state, CPUID; the
//! PIC, IOAPIC, PIT and kvm-clock); [`memory`] writes and maps the memory
//! file.

pub mod memory;
pub mod state;

use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use state::{VcpuState, VmState};

/// The format version this vmlab writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// The first word of the state file.
const MAGIC: &str = "vmlab-snapshot";
/// The state file's name in a snapshot directory.
pub const STATE_FILE: &str = "state";
/// The memory file's name in a snapshot directory.
pub const MEMORY_FILE: &str = "memory";
/// The largest state file read back (the JSON of 32 vCPUs is well under
/// this): a bound on what a corrupt snapshot can make vmlab allocate.
const MAX_STATE_BYTES: u64 = 64 << 20;

/// The host CPU a snapshot was taken on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuModel {
    /// CPUID vendor string.
    pub vendor: String,
    /// Family (with the extended family folded in).
    pub family: u32,
    /// Model (with the extended model folded in).
    pub model: u32,
}

impl CpuModel {
    /// This host's CPU.
    pub fn host() -> CpuModel {
        let leaf0 = std::arch::x86_64::__cpuid(0);
        let mut vendor = Vec::with_capacity(12);
        for reg in [leaf0.ebx, leaf0.edx, leaf0.ecx] {
            vendor.extend_from_slice(&reg.to_le_bytes());
        }
        let eax = std::arch::x86_64::__cpuid(1).eax;
        let base_family = (eax >> 8) & 0xf;
        let base_model = (eax >> 4) & 0xf;
        let (family, model) = if base_family == 0xf {
            (
                base_family + ((eax >> 20) & 0xff),
                base_model | (((eax >> 16) & 0xf) << 4),
            )
        } else if base_family == 0x6 {
            (base_family, base_model | (((eax >> 16) & 0xf) << 4))
        } else {
            (base_family, base_model)
        };
        CpuModel {
            vendor: String::from_utf8_lossy(&vendor).into_owned(),
            family,
            model,
        }
    }
}

/// Everything but guest memory.
#[derive(Debug, Serialize, Deserialize)]
pub struct Snapshot {
    /// [`FORMAT_VERSION`].
    pub format: u32,
    /// The vmlab version that wrote it.
    pub vmlab_version: String,
    /// The host CPU it was taken on.
    pub cpu: CpuModel,
    /// Guest RAM size in bytes.
    pub mem_size: u64,
    /// Nanoseconds since the Unix epoch when it was taken (restore tells
    /// the guest its clock jumped by the time since).
    pub taken_unix_ns: u64,
    /// Every vCPU, in id order.
    pub vcpus: Vec<VcpuState>,
    /// The VM's in-kernel devices and clock.
    pub vm: VmState,
    /// Device models' own state, by device, as each device defines it.
    pub devices: serde_json::Map<String, serde_json::Value>,
}

/// Why a snapshot cannot be written or restored.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file of the snapshot.
    #[error("snapshot {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Not a vmlab snapshot, or damaged.
    #[error("snapshot {path}: {why}")]
    Corrupt {
        /// The file.
        path: String,
        /// What is wrong.
        why: String,
    },
    /// A snapshot this vmlab cannot restore here.
    #[error("snapshot {path}: {why}")]
    Incompatible {
        /// The directory.
        path: String,
        /// What differs.
        why: String,
    },
    /// A KVM call failed while saving or restoring.
    #[error("{what}: {source}")]
    Kvm {
        /// The operation.
        what: String,
        /// The error.
        source: kvm_ioctls::Error,
    },
    /// Guest memory could not be read, written or mapped.
    #[error("snapshot memory: {0}")]
    Memory(String),
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.display().to_string(),
        source,
    }
}

impl Snapshot {
    /// Writes the state file into `dir` (which must exist): to a temporary
    /// name first, synced, then renamed, so a crash leaves no half file.
    pub fn write(&self, dir: &Path) -> Result<(), Error> {
        let path = dir.join(STATE_FILE);
        let json = serde_json::to_vec(self).map_err(|e| Error::Corrupt {
            path: path.display().to_string(),
            why: format!("cannot serialise: {e}"),
        })?;
        let digest = Sha256::digest(&json);
        let tmp = dir.join(format!(".{STATE_FILE}.tmp"));
        let mut f = std::fs::File::create(&tmp).map_err(io_err(&tmp))?;
        writeln!(f, "{MAGIC} {FORMAT_VERSION} sha256:{}", hex(&digest)).map_err(io_err(&tmp))?;
        f.write_all(&json).map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io_err(&path))?;
        Ok(())
    }

    /// Reads and checks the state file of `dir` (header, digest, format).
    pub fn read(dir: &Path) -> Result<Snapshot, Error> {
        let path = dir.join(STATE_FILE);
        let shown = path.display().to_string();
        let corrupt = |why: String| Error::Corrupt {
            path: shown.clone(),
            why,
        };
        let file = std::fs::File::open(&path).map_err(io_err(&path))?;
        let len = file.metadata().map_err(io_err(&path))?.len();
        if len > MAX_STATE_BYTES {
            return Err(corrupt(format!(
                "{len} bytes is too large for a state file"
            )));
        }
        let mut bytes = Vec::new();
        use std::io::Read;
        file.take(MAX_STATE_BYTES)
            .read_to_end(&mut bytes)
            .map_err(io_err(&path))?;
        let newline = bytes
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| corrupt("not a vmlab snapshot (no header line)".into()))?;
        let header = std::str::from_utf8(&bytes[..newline])
            .map_err(|_| corrupt("not a vmlab snapshot (header is not text)".into()))?;
        let mut words = header.split(' ');
        if words.next() != Some(MAGIC) {
            return Err(corrupt("not a vmlab snapshot".into()));
        }
        let format: u32 = words
            .next()
            .and_then(|w| w.parse().ok())
            .ok_or_else(|| corrupt("no format version in the header".into()))?;
        if format != FORMAT_VERSION {
            return Err(Error::Incompatible {
                path: dir.display().to_string(),
                why: format!(
                    "format version {format}; this vmlab reads version {FORMAT_VERSION} only"
                ),
            });
        }
        let want = words
            .next()
            .and_then(|w| w.strip_prefix("sha256:"))
            .ok_or_else(|| corrupt("no digest in the header".into()))?;
        let json = &bytes[newline + 1..];
        if hex(&Sha256::digest(json)) != want {
            return Err(corrupt(
                "the state does not match its digest (truncated or corrupted)".into(),
            ));
        }
        let snapshot: Snapshot =
            serde_json::from_slice(json).map_err(|e| corrupt(format!("bad state: {e}")))?;
        if snapshot.format != format {
            return Err(corrupt(
                "the header and the state disagree on the format".into(),
            ));
        }
        Ok(snapshot)
    }

    /// Whether this vmlab can restore the snapshot on this host with
    /// `mem_size` bytes of RAM (None: the snapshot's own size).
    pub fn check_compatible(&self, dir: &Path, mem_size: Option<u64>) -> Result<(), Error> {
        let incompatible = |why: String| Error::Incompatible {
            path: dir.display().to_string(),
            why,
        };
        let ours = env!("CARGO_PKG_VERSION");
        if self.vmlab_version != ours {
            return Err(incompatible(format!(
                "taken by vmlab {}, this is vmlab {ours}",
                self.vmlab_version
            )));
        }
        let host = CpuModel::host();
        if self.cpu != host {
            return Err(incompatible(format!(
                "taken on a {} family {:#x} model {:#x} CPU, this host has a {} family {:#x} model {:#x}",
                self.cpu.vendor, self.cpu.family, self.cpu.model, host.vendor, host.family, host.model
            )));
        }
        if let Some(size) = mem_size {
            if size != self.mem_size {
                return Err(incompatible(format!(
                    "taken with {} MiB of guest memory, asked to restore {} MiB",
                    self.mem_size >> 20,
                    size >> 20
                )));
            }
        }
        if self.vcpus.is_empty() {
            return Err(incompatible("it has no vCPU".into()));
        }
        Ok(())
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("vmlab-snap-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn sample() -> Snapshot {
        Snapshot {
            format: FORMAT_VERSION,
            vmlab_version: env!("CARGO_PKG_VERSION").into(),
            cpu: CpuModel::host(),
            mem_size: 64 << 20,
            taken_unix_ns: 1,
            vcpus: vec![VcpuState::default()],
            vm: VmState::default(),
            devices: serde_json::Map::new(),
        }
    }

    #[test]
    fn state_round_trips() {
        let d = dir("rt");
        let s = sample();
        s.write(&d).unwrap();
        let back = Snapshot::read(&d).unwrap();
        assert_eq!(
            serde_json::to_value(&back).unwrap(),
            serde_json::to_value(&s).unwrap()
        );
        back.check_compatible(&d, Some(64 << 20)).unwrap();
        back.check_compatible(&d, None).unwrap();
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn damaged_and_foreign_snapshots_are_refused() {
        let d = dir("bad");
        sample().write(&d).unwrap();
        let path = d.join(STATE_FILE);
        let good = std::fs::read(&path).unwrap();

        // Truncated.
        std::fs::write(&path, &good[..good.len() - 10]).unwrap();
        let e = Snapshot::read(&d).unwrap_err().to_string();
        assert!(e.contains("truncated or corrupted"), "{e}");
        // One byte flipped in the body.
        let mut flipped = good.clone();
        let last = flipped.len() - 2;
        flipped[last] ^= 1;
        std::fs::write(&path, &flipped).unwrap();
        let e = Snapshot::read(&d).unwrap_err().to_string();
        assert!(e.contains("truncated or corrupted"), "{e}");
        // Another format version.
        let text = String::from_utf8(good.clone()).unwrap();
        std::fs::write(&path, text.replacen(" 1 sha256:", " 2 sha256:", 1)).unwrap();
        let e = Snapshot::read(&d).unwrap_err().to_string();
        assert!(e.contains("format version 2"), "{e}");
        // Not a snapshot at all; empty.
        std::fs::write(&path, b"hello\n{}").unwrap();
        assert!(Snapshot::read(&d)
            .unwrap_err()
            .to_string()
            .contains("not a vmlab snapshot"));
        std::fs::write(&path, b"").unwrap();
        assert!(Snapshot::read(&d)
            .unwrap_err()
            .to_string()
            .contains("no header"));
        std::fs::remove_file(&path).unwrap();
        assert!(Snapshot::read(&d)
            .unwrap_err()
            .to_string()
            .contains("No such file"));

        // Valid but not for this vmlab, this CPU or this memory size.
        let mut s = sample();
        s.vmlab_version = "0.0.1".into();
        let e = s.check_compatible(&d, None).unwrap_err().to_string();
        assert!(e.contains("taken by vmlab 0.0.1"), "{e}");
        let mut s = sample();
        s.cpu.model += 1;
        let e = s.check_compatible(&d, None).unwrap_err().to_string();
        assert!(e.contains("this host has a"), "{e}");
        let e = sample()
            .check_compatible(&d, Some(128 << 20))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("taken with 64 MiB of guest memory, asked to restore 128 MiB"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&d);
    }
}
