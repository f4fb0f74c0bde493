//! COM1: a 16550A-compatible UART (vm-superio's 8250 model) at port
//! 0x3f8, IRQ 4, connected to vmlab's stdout and stdin.
//!
//! Output bytes go to the [`Console`] buffer, drained to stdout by the
//! console thread (src/devices/console.rs), and to a tail of the last few
//! KiB so that vmlab can quote the guest's last words (a kernel panic
//! message) when it ends abnormally. Input is queued by the
//! control loop; when the guest has drained the receive FIFO the device
//! signals `rx_ready` so the loop can push more.

#![warn(clippy::cast_possible_truncation)]

use std::collections::VecDeque;
use std::io::Write;
use std::sync::{Arc, Mutex};

use vm_superio::serial::SerialEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::console::Console;
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

/// The UART's transmitter side: each byte goes to the [`Console`] buffer
/// (never to the host directly: a vCPU does not wait for stdout) and to
/// the tail.
pub struct ConsoleWriter {
    console: Arc<Console>,
    tail: ConsoleTail,
}

impl ConsoleWriter {
    /// Output into `console`, remembered in `tail`.
    pub fn new(console: Arc<Console>, tail: ConsoleTail) -> Self {
        ConsoleWriter { console, tail }
    }
}

impl Write for ConsoleWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.tail.push(buf);
        self.console.push(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Line status register offset, and its transmitter bits: THR empty and
/// transmitter (shift register) empty.
const LSR_OFFSET: u64 = 5;
const LSR_TX_IDLE: u8 = 0x20 | 0x40;
/// Interrupt enable register offset.
const IER_OFFSET: u8 = 1;

/// The UART on the bus.
pub struct SerialDevice {
    uart: Serial<IrqTrigger, RxReady, ConsoleWriter>,
    console: Arc<Console>,
}

impl SerialDevice {
    /// A UART raising `irq` and writing to `out`.
    pub fn new(irq: EventFd, rx_ready: Arc<EventFd>, out: ConsoleWriter) -> Self {
        let console = out.console.clone();
        SerialDevice {
            uart: Serial::with_events(IrqTrigger(irq), RxReady(rx_ready), out),
            console,
        }
    }

    /// Queues input for the guest; returns how many bytes fit in the FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        if bytes.is_empty() || self.uart.fifo_capacity() == 0 {
            return 0;
        }
        self.uart.enqueue_raw_bytes(bytes).unwrap_or(0)
    }

    /// The console made room after the guest found the transmitter busy:
    /// raise the transmitter-empty interrupt again (if the guest enabled
    /// it), as a real UART does when its FIFO drains. Rewriting IER with
    /// its own value is how vm-superio re-asserts a pending condition.
    pub fn kick_transmitter(&mut self) {
        let ier = self.uart.read(IER_OFFSET);
        if let Err(e) = self.uart.write(IER_OFFSET, ier) {
            log::debug!("serial: {e:?}");
        }
    }
}

/// The UART register at `offset`, if there is one.
fn register(offset: u64) -> Option<u8> {
    u8::try_from(offset)
        .ok()
        .filter(|&r| u64::from(r) < COM1_LEN)
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let (Some(register), [byte]) = (register(offset), &mut *data) {
            *byte = self.uart.read(register);
            // vm-superio's transmitter is always idle; this one is busy
            // while the console buffer is full, so that the guest's driver
            // waits instead of losing its output.
            if offset == LSR_OFFSET && self.console.congested() {
                *byte &= !LSR_TX_IDLE;
            }
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Some(register), [byte]) = (register(offset), data) {
            if let Err(e) = self.uart.write(register, *byte) {
                log::debug!("serial: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::console::testing::{wait_for, Gate};
    use crate::devices::console::{ConsoleSink, ConsoleThread, BUFFER_CAPACITY};
    use std::time::{Duration, Instant};
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    struct Uart {
        dev: Arc<Mutex<SerialDevice>>,
        gate: Gate,
        console: Arc<Console>,
        thread: ConsoleThread,
        tail: ConsoleTail,
        irq: EventFd,
        rx: Arc<EventFd>,
    }

    /// A UART whose console thread writes into a [`Gate`] (closed until
    /// released) and kicks the UART as vm.rs wires it.
    fn device() -> Uart {
        let gate = Gate::default();
        let tail = ConsoleTail::default();
        let console = Console::new();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let rx = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let out = ConsoleWriter::new(console.clone(), tail.clone());
        let dev = Arc::new(Mutex::new(SerialDevice::new(
            irq.try_clone().unwrap(),
            rx.clone(),
            out,
        )));
        let kick = dev.clone();
        let thread = ConsoleThread::start(
            console.clone(),
            ConsoleSink::Writer(Box::new(gate.clone())),
            Box::new(move || kick.lock().unwrap().kick_transmitter()),
        )
        .unwrap();
        Uart {
            dev,
            gate,
            console,
            thread,
            tail,
            irq,
            rx,
        }
    }

    fn lsr(dev: &mut SerialDevice) -> u8 {
        let mut b = [0u8];
        dev.read(5, &mut b);
        b[0]
    }

    #[test]
    fn transmit_reaches_host_and_tail() {
        let u = device();
        u.gate.release();
        for b in b"hello\n" {
            u.dev.lock().unwrap().write(0, &[*b]);
        }
        let stats = u.thread.finish(Duration::from_secs(5));
        assert_eq!(&*u.gate.out.lock().unwrap(), b"hello\n");
        assert_eq!(u.tail.text(), "hello\n");
        assert_eq!(stats.written, 6);
    }

    /// The console sink blocks (stdout nobody reads): every THR write
    /// still returns at once, the transmitter reads busy once the buffer
    /// is full, and when the sink moves again the console drains and the
    /// transmitter-empty interrupt comes back.
    #[test]
    fn writes_return_at_once_when_the_sink_blocks() {
        let u = device();
        let mut d = u.dev.lock().unwrap();
        d.write(1, &[0x02]); // IER: transmitter-empty interrupt on
        assert_eq!(lsr(&mut d) & LSR_TX_IDLE, LSR_TX_IDLE);
        let started = Instant::now();
        let mut sent = 0usize;
        let mut slowest = Duration::ZERO;
        while lsr(&mut d) & LSR_TX_IDLE != 0 {
            let t = Instant::now();
            d.write(0, b"x");
            slowest = slowest.max(t.elapsed());
            sent += 1;
            // The thread holds up to a chunk (4 KiB) it cannot write.
            assert!(
                sent <= 2 * BUFFER_CAPACITY,
                "the transmitter never reads busy"
            );
        }
        // A write that waited for the sink would wait forever (the gate
        // opens below); the bounds only allow for a loaded host.
        assert!(started.elapsed() < Duration::from_secs(20));
        assert!(slowest < Duration::from_secs(2), "{slowest:?}");
        assert!(sent > BUFFER_CAPACITY / 2, "{sent}");
        // The guest's driver acknowledges the interrupt and, seeing the
        // transmitter busy, waits for the next one.
        let mut iir = [0u8];
        d.read(2, &mut iir);
        let _ = u.irq.read();
        drop(d);
        u.gate.release();
        wait_for("the console drains", || u.console.pending() == 0);
        wait_for("the transmitter-empty interrupt", || u.irq.read().is_ok());
        let mut d = u.dev.lock().unwrap();
        assert_eq!(lsr(&mut d) & LSR_TX_IDLE, LSR_TX_IDLE);
        d.read(2, &mut iir);
        assert_eq!(iir[0] & 0x0f, 0x02, "THRE is the pending interrupt");
        drop(d);
        let stats = u.thread.finish(Duration::from_secs(5));
        assert_eq!(stats.written, sent as u64);
        assert_eq!(stats.dropped, 0);
        assert_eq!(u.gate.out.lock().unwrap().len(), sent);
    }

    #[test]
    fn receive_raises_irq_and_drains() {
        let u = device();
        let mut dev = u.dev.lock().unwrap();
        let (irq, rx) = (&u.irq, &u.rx);
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
        let u = device();
        let mut dev = u.dev.lock().unwrap();
        let big = vec![b'x'; 200];
        let n = dev.enqueue_input(&big);
        assert!(n > 0 && n < 200);
        assert_eq!(dev.enqueue_input(&big), 0);
    }

    #[test]
    fn odd_access_sizes_do_not_panic() {
        let u = device();
        let mut dev = u.dev.lock().unwrap();
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
