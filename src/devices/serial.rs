//! COM1: a 16550A-compatible UART (vm-superio's 8250 model) at port
//! 0x3f8, IRQ 4, connected to vmlab's stdout and stdin.
//!
//! Output bytes go to the host through [`ConsoleOutput`], which also keeps
//! the last few KiB so that vmlab can quote the guest's last words (a
//! kernel panic message) when it ends abnormally. Input is queued by the
//! control loop; when the guest has drained the receive FIFO the device
//! signals `rx_ready` so the loop can push more.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::{Arc, Mutex};

use vm_superio::serial::SerialEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::BusDevice;

/// COM1 base port.
pub const COM1_BASE: u64 = 0x3f8;
/// Number of ports of an 8250.
pub const COM1_LEN: u64 = 8;
/// COM1's ISA IRQ (also its GSI).
pub const COM1_IRQ: u32 = 4;
/// How much console output is remembered for error reports.
const TAIL_CAPACITY: usize = 8192;

/// Raises the UART's interrupt through a KVM irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Signals the control loop when the guest has emptied the receive FIFO.
pub struct RxReady(pub Arc<EventFd>);

impl SerialEvents for RxReady {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        let _ = self.0.write(1);
    }
}

/// The last bytes the guest printed.
#[derive(Clone, Default)]
pub struct ConsoleTail(Arc<Mutex<VecDeque<u8>>>);

impl ConsoleTail {
    fn push(&self, bytes: &[u8]) {
        let mut tail = self.0.lock().unwrap_or_else(|p| p.into_inner());
        for &b in bytes {
            if tail.len() == TAIL_CAPACITY {
                tail.pop_front();
            }
            tail.push_back(b);
        }
    }

    /// The remembered output as text.
    pub fn text(&self) -> String {
        let tail = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let bytes: Vec<u8> = tail.iter().copied().collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// The kernel's panic line, if the guest printed one.
    pub fn panic_message(&self) -> Option<String> {
        find_panic(&self.text())
    }
}

/// Finds "Kernel panic - not syncing: ..." in console text.
pub fn find_panic(text: &str) -> Option<String> {
    text.lines().rev().find_map(|l| {
        l.find("Kernel panic - not syncing")
            .map(|i| l[i..].trim_end().to_string())
    })
}

/// Where console output goes: a host writer (stdout), flushed per byte when
/// someone watches interactively and per line otherwise, plus the tail.
pub struct ConsoleOutput {
    out: Box<dyn Write + Send>,
    tail: ConsoleTail,
    flush_every_byte: bool,
}

impl ConsoleOutput {
    /// Output to `out`.
    pub fn new(out: Box<dyn Write + Send>, tail: ConsoleTail, flush_every_byte: bool) -> Self {
        ConsoleOutput {
            out,
            tail,
            flush_every_byte,
        }
    }
}

impl Write for ConsoleOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.tail.push(buf);
        // A closed stdout (the reader went away) must not stop the guest:
        // drop the bytes, as a disconnected serial cable would.
        let _ = self.out.write_all(buf);
        if self.flush_every_byte || buf.contains(&b'\n') {
            let _ = self.out.flush();
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = self.out.flush();
        Ok(())
    }
}

/// The UART on the bus.
pub struct SerialDevice {
    uart: Serial<IrqTrigger, RxReady, ConsoleOutput>,
}

impl SerialDevice {
    /// A UART raising `irq` and writing to `out`.
    pub fn new(irq: EventFd, rx_ready: Arc<EventFd>, out: ConsoleOutput) -> Self {
        SerialDevice {
            uart: Serial::with_events(IrqTrigger(irq), RxReady(rx_ready), out),
        }
    }

    /// Queues input for the guest; returns how many bytes fit in the FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        if bytes.is_empty() || self.uart.fifo_capacity() == 0 {
            return 0;
        }
        self.uart.enqueue_raw_bytes(bytes).unwrap_or(0)
    }

    /// Flushes buffered output to the host.
    pub fn flush(&mut self) {
        let _ = self.uart.writer_mut().flush();
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() == 1 && offset < COM1_LEN {
            data[0] = self.uart.read(offset as u8);
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() == 1 && offset < COM1_LEN {
            if let Err(e) = self.uart.write(offset as u8, data[0]) {
                log::debug!("serial: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

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

    fn device() -> (SerialDevice, Sink, ConsoleTail, EventFd, Arc<EventFd>) {
        let sink = Sink::default();
        let tail = ConsoleTail::default();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let rx = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let out = ConsoleOutput::new(Box::new(sink.clone()), tail.clone(), false);
        let dev = SerialDevice::new(irq.try_clone().unwrap(), rx.clone(), out);
        (dev, sink, tail, irq, rx)
    }

    #[test]
    fn transmit_reaches_host_and_tail() {
        let (mut dev, sink, tail, _irq, _rx) = device();
        for b in b"hello\n" {
            dev.write(0, &[*b]);
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"hello\n");
        assert_eq!(tail.text(), "hello\n");
    }

    #[test]
    fn receive_raises_irq_and_drains() {
        let (mut dev, _sink, _tail, irq, rx) = device();
        dev.write(1, &[0x01]); // IER: received-data interrupt on
        assert_eq!(dev.enqueue_input(b"ab"), 2);
        assert_eq!(irq.read().unwrap(), 1);
        let mut lsr = [0u8];
        dev.read(5, &mut lsr);
        assert_eq!(lsr[0] & 1, 1, "data ready");
        let mut b = [0u8];
        dev.read(0, &mut b);
        assert_eq!(b[0], b'a');
        dev.read(0, &mut b);
        assert_eq!(b[0], b'b');
        assert_eq!(rx.read().unwrap(), 1, "rx_ready once the FIFO is empty");
    }

    #[test]
    fn fifo_limits_input() {
        let (mut dev, ..) = device();
        let big = vec![b'x'; 200];
        let n = dev.enqueue_input(&big);
        assert!(n > 0 && n < 200);
        assert_eq!(dev.enqueue_input(&big), 0);
    }

    #[test]
    fn odd_access_sizes_do_not_panic() {
        let (mut dev, ..) = device();
        let mut two = [0u8; 2];
        dev.read(0, &mut two);
        assert_eq!(two, [0xff, 0xff]);
        dev.write(0, &[1, 2]);
        dev.write(99, &[1]);
    }

    #[test]
    fn panic_line_is_found() {
        let text = "[ 1.0] foo\n[ 2.0] Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000000\n[ 2.1] ---[ end";
        assert_eq!(
            find_panic(text).as_deref(),
            Some("Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000000")
        );
        assert_eq!(find_panic("all good\n"), None);
    }

    #[test]
    fn tail_keeps_only_the_end() {
        let tail = ConsoleTail::default();
        tail.push(&vec![b'a'; TAIL_CAPACITY]);
        tail.push(b"zz");
        let t = tail.text();
        assert_eq!(t.len(), TAIL_CAPACITY);
        assert!(t.ends_with("azz"));
    }
}
