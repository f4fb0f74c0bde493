//! The VMM's control loop and the events it waits for.
//!
//! Events come from the guest side (vCPU threads, devices): the init is
//! up, the guest wants to stop, something went wrong. Senders push onto a
//! channel and poke an eventfd so the control loop, sleeping in epoll on
//! the thread that called `Vm::run`, wakes up. The loop also forwards
//! vmlab's stdin to the UART (as fast as the guest drains the receive
//! FIFO) and ends on a host signal.

use std::io::Read;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::devices::serial::{ConsoleTail, SerialDevice};
use crate::signals::Signals;

/// Why and how the guest ended, or a milestone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmEvent {
    /// The guest init reported that it is up (the boot-time mark).
    InitUp(Instant),
    /// The guest's command finished with this status.
    CommandExited(u8),
    /// The guest init powered off on request (`poweroff`).
    PowerOff,
    /// The guest init rebooted on request (`reboot`).
    Reboot,
    /// The guest init halted on request (`halt`).
    Halt,
    /// The guest reset the machine (i8042 reset line or a KVM reset
    /// event): a `reboot -f`, or a kernel panic with `panic=-1`.
    Reset,
    /// A vCPU triple-faulted.
    TripleFault {
        /// Which vCPU.
        vcpu: u8,
    },
    /// A vCPU stopped on an error vmlab cannot recover from.
    Fatal {
        /// Which vCPU.
        vcpu: u8,
        /// What happened.
        message: String,
    },
}

impl VmEvent {
    /// Whether the VM is over after this event.
    pub fn is_terminal(&self) -> bool {
        !matches!(self, VmEvent::InitUp(_))
    }
}

/// The sending side, shared by vCPU threads and devices.
pub struct Control {
    tx: Mutex<Sender<VmEvent>>,
    wake: EventFd,
    /// Set by the first terminal event (and by the control loop when it
    /// stops the VM): every vCPU leaves its run loop at its next exit,
    /// without waiting for the control loop to act.
    stop: Arc<AtomicBool>,
}

impl Control {
    /// A new channel; the receiver goes to the control loop.
    pub fn new() -> std::io::Result<(Control, Receiver<VmEvent>)> {
        let (tx, rx) = channel();
        let wake = EventFd::new(EFD_NONBLOCK)?;
        Ok((
            Control {
                tx: Mutex::new(tx),
                wake,
                stop: Arc::new(AtomicBool::new(false)),
            },
            rx,
        ))
    }

    /// Sends `event`. Never fails: once the control loop is gone the VM is
    /// being torn down and the event no longer matters.
    pub fn send(&self, event: VmEvent) {
        if event.is_terminal() {
            self.stop.store(true, Ordering::Release);
        }
        let tx = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        let _ = tx.send(event);
        let _ = self.wake.write(1);
    }

    /// The flag that tells vCPUs to stop.
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// The eventfd the control loop polls.
    pub fn wake_fd(&self) -> &EventFd {
        &self.wake
    }
}

/// How a VM run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The guest's command exited with this status.
    CommandExited(u8),
    /// The guest powered off.
    PowerOff,
    /// The guest rebooted (vmlab, like Firecracker, ends on reboot).
    Reboot,
    /// The guest halted.
    Halt,
    /// The guest kernel panicked; the panic message.
    Panic(String),
    /// A vCPU triple-faulted.
    TripleFault(u8),
    /// vmlab had to stop the guest.
    Fatal(String),
    /// A host signal stopped vmlab.
    Signal(i32),
}

impl Outcome {
    /// vmlab's exit status for this outcome: the command's own status, 0
    /// for a clean guest shutdown, 128+N for host signal N, and 125 (as
    /// `docker run` does for its own failures) when the guest crashed.
    pub fn exit_code(&self) -> i32 {
        match self {
            Outcome::CommandExited(code) => i32::from(*code),
            Outcome::PowerOff | Outcome::Reboot | Outcome::Halt => 0,
            Outcome::Signal(sig) => 128 + sig,
            Outcome::Panic(_) | Outcome::TripleFault(_) | Outcome::Fatal(_) => 125,
        }
    }

    /// A message for the user when the outcome is a failure.
    pub fn failure_message(&self) -> Option<String> {
        match self {
            Outcome::Panic(msg) => Some(format!("the guest kernel panicked: {msg}")),
            Outcome::TripleFault(cpu) => Some(format!(
                "vCPU {cpu} triple-faulted: the guest reset itself after an unrecoverable fault \
                 (run with -v -v for registers)"
            )),
            Outcome::Fatal(msg) => Some(msg.clone()),
            _ => None,
        }
    }
}

/// The control loop failed on a host facility.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct Error {
    /// What was being done.
    what: &'static str,
    /// Why.
    source: std::io::Error,
}

fn err(what: &'static str) -> impl Fn(std::io::Error) -> Error {
    move |source| Error { what, source }
}

/// What the control loop watches and feeds.
pub struct ControlLoop<'a> {
    /// The guest side's events.
    pub control: &'a Control,
    /// Their channel.
    pub events: &'a Receiver<VmEvent>,
    /// The UART that gets stdin.
    pub serial: &'a Mutex<SerialDevice>,
    /// Signalled when the guest has drained the receive FIFO.
    pub rx_ready: &'a EventFd,
    /// The console's last output, for a panic message.
    pub tail: &'a ConsoleTail,
    /// Forward stdin to the guest.
    pub forward_stdin: bool,
}

impl ControlLoop<'_> {
    /// Runs until the guest ends or a host signal stops vmlab; returns
    /// how it ended and when the guest init was up.
    pub fn run(&self, signals: &Signals) -> Result<(Outcome, Option<Instant>), Error> {
        const TOKEN_CONTROL: u64 = 0;
        const TOKEN_SIGNAL: u64 = 1;
        const TOKEN_STDIN: u64 = 2;
        const TOKEN_RX_READY: u64 = 3;
        let epoll = Epoll::new().map_err(err("epoll"))?;
        let add = |fd: RawFd, token: u64| {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, token),
                )
                .map_err(err("epoll_ctl"))
        };
        add(self.control.wake_fd().as_raw_fd(), TOKEN_CONTROL)?;
        add(signals.as_raw_fd(), TOKEN_SIGNAL)?;
        let stdin_fd = std::io::stdin().as_raw_fd();
        let mut stdin_open = self.forward_stdin;
        if stdin_open {
            add(self.rx_ready.as_raw_fd(), TOKEN_RX_READY)?;
            if add(stdin_fd, TOKEN_STDIN).is_err() {
                // A regular file or /dev/null cannot be polled; input from
                // it is not forwarded.
                stdin_open = false;
            }
        }
        let mut pending: Vec<u8> = Vec::new();
        let mut init_up = None;
        let mut ready = vec![EpollEvent::default(); 8];
        loop {
            let n = match epoll.wait(-1, &mut ready) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(err("epoll_wait")(e)),
            };
            for event in &ready[..n] {
                match event.data() {
                    TOKEN_CONTROL => {
                        let _ = self.control.wake_fd().read();
                        while let Ok(ev) = self.events.try_recv() {
                            if let VmEvent::InitUp(at) = ev {
                                init_up.get_or_insert(at);
                                log::debug!("guest init is up");
                                continue;
                            }
                            return Ok((self.outcome_of(ev), init_up));
                        }
                    }
                    TOKEN_SIGNAL => {
                        if let Some(sig) = signals.read() {
                            log::info!("received signal {}: stopping the guest", sig.signo);
                            return Ok((Outcome::Signal(sig.signo), init_up));
                        }
                    }
                    TOKEN_RX_READY => {
                        let _ = self.rx_ready.read();
                        self.feed_serial(&mut pending);
                        if pending.is_empty() && stdin_open {
                            let _ = epoll.ctl(
                                ControlOperation::Add,
                                stdin_fd,
                                EpollEvent::new(EventSet::IN, TOKEN_STDIN),
                            );
                        }
                    }
                    TOKEN_STDIN => {
                        let mut buf = [0u8; 64];
                        match std::io::stdin().lock().read(&mut buf) {
                            Ok(0) | Err(_) => {
                                stdin_open = false;
                                let _ = epoll.ctl(
                                    ControlOperation::Delete,
                                    stdin_fd,
                                    EpollEvent::default(),
                                );
                            }
                            Ok(n) => {
                                pending.extend_from_slice(&buf[..n]);
                                self.feed_serial(&mut pending);
                                if !pending.is_empty() {
                                    // Wait for the guest to drain the FIFO
                                    // before reading more.
                                    let _ = epoll.ctl(
                                        ControlOperation::Delete,
                                        stdin_fd,
                                        EpollEvent::default(),
                                    );
                                }
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    fn feed_serial(&self, pending: &mut Vec<u8>) {
        if pending.is_empty() {
            return;
        }
        let taken = self
            .serial
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .enqueue_input(pending);
        pending.drain(..taken);
    }

    fn outcome_of(&self, event: VmEvent) -> Outcome {
        match event {
            VmEvent::CommandExited(code) => Outcome::CommandExited(code),
            VmEvent::PowerOff => Outcome::PowerOff,
            VmEvent::Reboot => Outcome::Reboot,
            VmEvent::Halt => Outcome::Halt,
            // A reset nobody announced is a `reboot -f` or, with panic=-1,
            // a kernel panic: the console says which.
            VmEvent::Reset => match self.tail.panic_message() {
                Some(msg) => Outcome::Panic(msg),
                None => Outcome::Reboot,
            },
            VmEvent::TripleFault { vcpu } => Outcome::TripleFault(vcpu),
            VmEvent::Fatal { vcpu, message } => Outcome::Fatal(format!("vCPU {vcpu}: {message}")),
            VmEvent::InitUp(_) => Outcome::Fatal("internal: InitUp is not an outcome".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn send_wakes_and_delivers() {
        let (control, rx) = Control::new().unwrap();
        control.send(VmEvent::InitUp(Instant::now()));
        assert!(!control.stop_flag().load(Ordering::Acquire));
        assert!(matches!(rx.try_recv().unwrap(), VmEvent::InitUp(_)));
        let _ = control.wake_fd().read();
        control.send(VmEvent::CommandExited(3));
        assert!(
            control.stop_flag().load(Ordering::Acquire),
            "a terminal event stops the vCPUs"
        );
        assert_eq!(control.wake_fd().read().unwrap(), 1);
        assert_eq!(rx.try_recv().unwrap(), VmEvent::CommandExited(3));
        assert!(VmEvent::Reset.is_terminal());
        assert!(!VmEvent::InitUp(Instant::now()).is_terminal());
    }

    #[test]
    fn exit_codes() {
        assert_eq!(Outcome::CommandExited(3).exit_code(), 3);
        assert_eq!(Outcome::PowerOff.exit_code(), 0);
        assert_eq!(Outcome::Reboot.exit_code(), 0);
        assert_eq!(Outcome::Signal(15).exit_code(), 143);
        assert_eq!(Outcome::Panic("x".into()).exit_code(), 125);
        assert!(Outcome::TripleFault(0)
            .failure_message()
            .unwrap()
            .contains("triple"));
        assert!(Outcome::CommandExited(1).failure_message().is_none());
    }
}
