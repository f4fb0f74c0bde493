//! `--trace-exits FILE`: every VM exit to user space as one JSON line, for
//! labs and for finding out what a guest makes its VMM do.
//!
//! A line is one [`ExitRecord`]:
//!
//! ```text
//! {"t_ns":1042311,"vcpu":0,"reason":"io_out","port":1016,"size":1,"data":"0x41","region":"COM1","handle_ns":812}
//! {"t_ns":1050007,"vcpu":0,"reason":"mmio_write","addr":"0xd0000050","size":4,"data":"0x0","region":"virtio-mmio","handle_ns":1504}
//! ```
//!
//! `t_ns` is when KVM_RUN returned, counted from the VM's start;
//! `handle_ns` is how long vmlab took before it re-entered KVM_RUN. The
//! file is bounded: once it would pass its size limit the writer appends a
//! `{"note":"stopped", ...}` line and records nothing more; the last line
//! is always `{"note":"end", ...}` with the counts.
//!
//! The vCPU never waits for the file: [`TraceSender::record`] hands the
//! fixed-size record to a bounded queue (no allocation) and a writer
//! thread formats and writes it. When the queue is full the record is
//! dropped and counted, so tracing cannot stall or slow a guest by more
//! than a queue push. `vmlab trace report` ([`report`]) reads the file back.

pub mod report;

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;

/// Default size limit of a trace file.
pub const DEFAULT_LIMIT: u64 = 256 << 20;
/// Records that may wait for the writer thread.
const QUEUE: usize = 1 << 16;

/// Why a vCPU exited to user space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// Port read.
    IoIn,
    /// Port write.
    IoOut,
    /// MMIO read.
    MmioRead,
    /// MMIO write.
    MmioWrite,
    /// HLT reached user space.
    Hlt,
    /// Triple fault.
    Shutdown,
    /// An instruction KVM rejected, emulated by vmlab.
    Emulation,
    /// KVM_RUN returned for a signal (a kick).
    Interrupted,
    /// KVM system event (reset, shutdown, crash).
    SystemEvent,
    /// Anything else.
    Other,
}

impl Reason {
    /// Every reason, in report order.
    pub const ALL: [Reason; 10] = [
        Reason::IoIn,
        Reason::IoOut,
        Reason::MmioRead,
        Reason::MmioWrite,
        Reason::Hlt,
        Reason::Shutdown,
        Reason::Emulation,
        Reason::Interrupted,
        Reason::SystemEvent,
        Reason::Other,
    ];

    /// The name used in the file.
    pub fn name(self) -> &'static str {
        match self {
            Reason::IoIn => "io_in",
            Reason::IoOut => "io_out",
            Reason::MmioRead => "mmio_read",
            Reason::MmioWrite => "mmio_write",
            Reason::Hlt => "hlt",
            Reason::Shutdown => "shutdown",
            Reason::Emulation => "emulation",
            Reason::Interrupted => "interrupted",
            Reason::SystemEvent => "system_event",
            Reason::Other => "other",
        }
    }

    /// The reason named `name` in a file.
    pub fn from_name(name: &str) -> Option<Reason> {
        Reason::ALL.into_iter().find(|r| r.name() == name)
    }

    fn is_port(self) -> bool {
        matches!(self, Reason::IoIn | Reason::IoOut)
    }
}

/// One exit. Plain data, so that recording it allocates nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitRecord {
    /// When KVM_RUN returned, in ns since the VM started.
    pub t_ns: u64,
    /// Which vCPU.
    pub vcpu: u8,
    /// Why.
    pub reason: Reason,
    /// The port (port I/O) or guest-physical address (MMIO).
    pub addr: u64,
    /// Access size in bytes (0 where there is no access).
    pub size: u8,
    /// The value written or returned, little-endian, up to 8 bytes.
    pub data: u64,
    /// The device or region the access went to ("COM1", "virtio-mmio", ...).
    pub region: &'static str,
    /// How long vmlab took to handle it, in ns.
    pub handle_ns: u64,
}

impl ExitRecord {
    /// The record as one JSON line (without the newline).
    pub fn to_json(&self) -> String {
        let mut line = format!(
            r#"{{"t_ns":{},"vcpu":{},"reason":"{}""#,
            self.t_ns,
            self.vcpu,
            self.reason.name()
        );
        if self.reason.is_port() {
            line.push_str(&format!(r#","port":{}"#, self.addr));
        } else if self.size > 0 || self.addr != 0 {
            line.push_str(&format!(r#","addr":"{:#x}""#, self.addr));
        }
        if self.size > 0 {
            line.push_str(&format!(
                r#","size":{},"data":"{:#x}""#,
                self.size, self.data
            ));
        }
        if !self.region.is_empty() {
            // Region names are vmlab's own constants: no escaping needed,
            // but keep the output valid JSON whatever they hold.
            let region = serde_json::Value::from(self.region).to_string();
            line.push_str(&format!(r#","region":{region}"#));
        }
        line.push_str(&format!(r#","handle_ns":{}}}"#, self.handle_ns));
        line
    }
}

/// Counters shared by the senders and the writer.
#[derive(Debug, Default)]
struct Shared {
    /// Set when the size limit was reached: senders stop queueing.
    stopped: AtomicBool,
    /// Records dropped because the queue was full.
    dropped: AtomicU64,
}

/// The handle a vCPU thread records its exits with. Cheap to clone.
#[derive(Debug, Clone)]
pub struct TraceSender {
    queue: SyncSender<ExitRecord>,
    shared: Arc<Shared>,
}

impl TraceSender {
    /// Queues one record for the writer; never blocks, never allocates.
    pub fn record(&self, record: ExitRecord) {
        if self.shared.stopped.load(Ordering::Relaxed) {
            return;
        }
        match self.queue.try_send(record) {
            Ok(()) | Err(TrySendError::Disconnected(_)) => {}
            Err(TrySendError::Full(_)) => {
                self.shared.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// What a finished trace holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceSummary {
    /// Records written.
    pub written: u64,
    /// Records dropped because the writer fell behind.
    pub dropped: u64,
    /// Whether the size limit stopped the trace.
    pub stopped_at_limit: bool,
}

/// A trace being written: the writer thread and the first sender.
#[derive(Debug)]
pub struct Tracer {
    sender: Option<TraceSender>,
    writer: Option<JoinHandle<std::io::Result<(u64, bool)>>>,
    shared: Arc<Shared>,
}

impl Tracer {
    /// Creates (truncates) `path` and starts the writer thread; the file
    /// stops growing at about `limit` bytes.
    pub fn create(path: &Path, limit: u64) -> std::io::Result<Tracer> {
        let file = File::create(path)?;
        Tracer::start(Box::new(file), limit)
    }

    /// Starts a tracer that writes into `out`.
    pub fn start(out: Box<dyn Write + Send>, limit: u64) -> std::io::Result<Tracer> {
        let (queue, records) = sync_channel(QUEUE);
        let shared = Arc::new(Shared::default());
        let writer_shared = shared.clone();
        let writer = std::thread::Builder::new()
            .name("exit-trace".into())
            .spawn(move || write_records(out, limit, records, &writer_shared))?;
        Ok(Tracer {
            sender: Some(TraceSender {
                queue,
                shared: shared.clone(),
            }),
            writer: Some(writer),
            shared,
        })
    }

    /// A sender for one more vCPU thread.
    pub fn sender(&self) -> Option<TraceSender> {
        self.sender.clone()
    }

    /// Waits until every sender is gone and the writer has written the
    /// last line. Call after the vCPU threads have been joined.
    pub fn finish(mut self) -> std::io::Result<TraceSummary> {
        self.sender = None;
        let (written, stopped_at_limit) = match self.writer.take() {
            Some(w) => w
                .join()
                .map_err(|_| std::io::Error::other("the exit-trace writer panicked"))??,
            None => (0, false),
        };
        Ok(TraceSummary {
            written,
            dropped: self.shared.dropped.load(Ordering::Relaxed),
            stopped_at_limit,
        })
    }
}

/// The writer thread: formats records until every sender is gone, stops
/// at `limit`, ends with the `end` note.
fn write_records(
    out: Box<dyn Write + Send>,
    limit: u64,
    records: Receiver<ExitRecord>,
    shared: &Shared,
) -> std::io::Result<(u64, bool)> {
    let mut out = BufWriter::with_capacity(1 << 16, out);
    let mut bytes = 0u64;
    let mut written = 0u64;
    let mut skipped = 0u64;
    let mut stopped = false;
    for record in records {
        if stopped {
            skipped += 1;
            continue;
        }
        let line = record.to_json();
        // Room is kept for the two notes (well under 256 bytes).
        if bytes + line.len() as u64 + 1 + 256 > limit {
            stopped = true;
            shared.stopped.store(true, Ordering::Relaxed);
            skipped += 1;
            let note = format!(
                r#"{{"note":"stopped","reason":"size limit of {limit} bytes reached","records":{written},"t_ns":{}}}"#,
                record.t_ns
            );
            writeln!(out, "{note}")?;
            bytes += note.len() as u64 + 1;
            continue;
        }
        writeln!(out, "{line}")?;
        bytes += line.len() as u64 + 1;
        written += 1;
    }
    writeln!(
        out,
        r#"{{"note":"end","records":{written},"dropped":{},"not_written_after_stop":{skipped},"stopped_at_limit":{stopped}}}"#,
        shared.dropped.load(Ordering::Relaxed)
    )?;
    out.flush()?;
    Ok((written, stopped))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A `Write` the test can read back.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn out_byte(t_ns: u64) -> ExitRecord {
        ExitRecord {
            t_ns,
            vcpu: 0,
            reason: Reason::IoOut,
            addr: 0x3f8,
            size: 1,
            data: 0x41,
            region: "COM1",
            handle_ns: 800,
        }
    }

    #[test]
    fn records_are_json_lines() {
        let line = out_byte(5).to_json();
        assert_eq!(
            line,
            r#"{"t_ns":5,"vcpu":0,"reason":"io_out","port":1016,"size":1,"data":"0x41","region":"COM1","handle_ns":800}"#
        );
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["port"], 1016);
        let mmio = ExitRecord {
            reason: Reason::MmioWrite,
            addr: 0xd000_0050,
            size: 4,
            data: 0,
            region: "virtio-mmio",
            ..out_byte(9)
        };
        let v: serde_json::Value = serde_json::from_str(&mmio.to_json()).unwrap();
        assert_eq!(v["addr"], "0xd0000050");
        assert_eq!(v["reason"], "mmio_write");
        let hlt = ExitRecord {
            reason: Reason::Hlt,
            addr: 0,
            size: 0,
            data: 0,
            region: "",
            ..out_byte(1)
        };
        assert_eq!(
            hlt.to_json(),
            r#"{"t_ns":1,"vcpu":0,"reason":"hlt","handle_ns":800}"#
        );
        for r in Reason::ALL {
            assert_eq!(Reason::from_name(r.name()), Some(r));
        }
    }

    #[test]
    fn writes_every_record_and_an_end_note() {
        let sink = Sink::default();
        let tracer = Tracer::start(Box::new(sink.clone()), DEFAULT_LIMIT).unwrap();
        let tx = tracer.sender().unwrap();
        let threads: Vec<_> = (0..2u8)
            .map(|cpu| {
                let tx = tx.clone();
                std::thread::spawn(move || {
                    for i in 0..1000 {
                        tx.record(ExitRecord {
                            vcpu: cpu,
                            ..out_byte(i)
                        });
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        drop(tx);
        let summary = tracer.finish().unwrap();
        assert_eq!(summary.written + summary.dropped, 2000);
        assert!(!summary.stopped_at_limit);
        let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len() as u64, summary.written + 1);
        assert!(lines.last().unwrap().contains(r#""note":"end""#));
    }

    #[test]
    fn stops_at_the_size_limit_with_a_note() {
        let sink = Sink::default();
        let limit = 4096;
        let tracer = Tracer::start(Box::new(sink.clone()), limit).unwrap();
        let tx = tracer.sender().unwrap();
        for i in 0..10_000 {
            tx.record(out_byte(i));
        }
        drop(tx);
        let summary = tracer.finish().unwrap();
        assert!(summary.stopped_at_limit);
        let bytes = sink.0.lock().unwrap().clone();
        assert!(bytes.len() as u64 <= limit, "{} bytes", bytes.len());
        let text = String::from_utf8(bytes).unwrap();
        assert!(text.contains(r#""note":"stopped""#));
        assert!(text
            .lines()
            .last()
            .unwrap()
            .contains(r#""stopped_at_limit":true"#));
    }
}
