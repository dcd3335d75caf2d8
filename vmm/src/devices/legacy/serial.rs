//! The 16550 UART on COM1 (vm-superio), with its output going to the
//! embedder's sink, into a bounded in-memory [`ConsoleLog`] that the
//! library's users can read and wait on, and past a line watcher that feeds
//! the boot timeline (first kernel byte, "Run /init as init process").

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

use super::boot_timer::{BootEvent, BootTimeline};
use crate::devices::bus::BusDevice;
use log_limit::log_limited;

/// I/O port base of COM1.
pub const SERIAL_PORT_COM1: u16 = 0x3f8;
/// Ports of one UART.
pub const SERIAL_PORT_COUNT: u64 = 8;
/// IRQ of COM1.
pub const SERIAL_IRQ: u32 = 4;
const CONSOLE_LOG_CAPACITY: usize = 1 << 20;
const LINE_CAPACITY: usize = 256;

/// The UART's interrupt line: an `EventFd` registered as a KVM irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// The last MiB of console output, shared with the embedder.
#[derive(Default)]
pub struct ConsoleLog {
    buf: Mutex<VecDeque<u8>>,
    grew: Condvar,
}

impl ConsoleLog {
    /// An empty log.
    pub fn new() -> Self {
        Self::default()
    }

    fn append(&self, bytes: &[u8]) {
        let mut buf = self.buf.lock().unwrap_or_else(|e| e.into_inner());
        buf.extend(bytes);
        let excess = buf.len().saturating_sub(CONSOLE_LOG_CAPACITY);
        buf.drain(..excess);
        self.grew.notify_all();
    }

    /// Everything kept so far, lossily decoded.
    pub fn contents(&self) -> String {
        let buf = self.buf.lock().unwrap_or_else(|e| e.into_inner());
        let (a, b) = buf.as_slices();
        let mut bytes = a.to_vec();
        bytes.extend_from_slice(b);
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Waits until the log contains `needle`, or `timeout` passes.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut buf = self.buf.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let (a, b) = buf.as_slices();
            let mut hay = a.to_vec();
            hay.extend_from_slice(b);
            if String::from_utf8_lossy(&hay).contains(needle) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            buf = self
                .grew
                .wait_timeout(buf, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// Where the UART's bytes go: the embedder's sink, the log, the watcher.
pub struct ConsoleSink {
    out: Box<dyn Write + Send>,
    log: Arc<ConsoleLog>,
    timeline: Arc<BootTimeline>,
    line: Vec<u8>,
}

impl ConsoleSink {
    /// A sink writing to `out` and `log`, reporting to `timeline`.
    pub fn new(
        out: Box<dyn Write + Send>,
        log: Arc<ConsoleLog>,
        timeline: Arc<BootTimeline>,
    ) -> Self {
        Self {
            out,
            log,
            timeline,
            line: Vec::with_capacity(LINE_CAPACITY),
        }
    }

    fn watch(&mut self, bytes: &[u8]) {
        if !bytes.is_empty() {
            self.timeline.record(BootEvent::KernelStart);
        }
        for &b in bytes {
            if b == b'\n' {
                if is_init_exec_line(&self.line) {
                    self.timeline.record(BootEvent::InitExec);
                }
                self.line.clear();
            } else if self.line.len() < LINE_CAPACITY {
                self.line.push(b);
            }
        }
    }
}

/// The kernel's "Run /init as init process" (any init path).
fn is_init_exec_line(line: &[u8]) -> bool {
    let text = String::from_utf8_lossy(line);
    text.contains("Run /") && text.contains(" as init process")
}

impl Write for ConsoleSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.watch(buf);
        self.log.append(buf);
        // A closed or failing sink must not stop the guest's console.
        let _ = self.out.write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        let _ = self.out.flush();
        Ok(())
    }
}

/// COM1 as a bus device.
pub struct Serial {
    uart: vm_superio::Serial<IrqTrigger, vm_superio::serial::NoEvents, ConsoleSink>,
}

impl Serial {
    /// A UART raising `irq` and writing to `sink`.
    pub fn new(irq: EventFd, sink: ConsoleSink) -> Self {
        Self {
            uart: vm_superio::Serial::new(IrqTrigger(irq), sink),
        }
    }

    /// Queues host input for the guest; returns how many bytes fitted.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let room = self.uart.fifo_capacity().min(bytes.len());
        match self.uart.enqueue_raw_bytes(&bytes[..room]) {
            Ok(n) => n,
            Err(e) => {
                log_limited!(log::Level::Warn, "serial input dropped: {e:?}");
                0
            }
        }
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data.len()) {
            (Ok(off), 1) if offset < SERIAL_PORT_COUNT => data[0] = self.uart.read(off),
            _ => data.fill(0),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(off), [value]) = (u8::try_from(offset), data) {
            if offset < SERIAL_PORT_COUNT {
                if let Err(e) = self.uart.write(off, *value) {
                    log_limited!(log::Level::Warn, "serial write failed: {e:?}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn serial() -> (Serial, Shared, Arc<ConsoleLog>, Arc<BootTimeline>, EventFd) {
        let out = Shared::default();
        let log = Arc::new(ConsoleLog::new());
        let timeline = Arc::new(BootTimeline::new());
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let sink = ConsoleSink::new(Box::new(out.clone()), log.clone(), timeline.clone());
        (
            Serial::new(irq.try_clone().unwrap(), sink),
            out,
            log,
            timeline,
            irq,
        )
    }

    #[test]
    fn guest_output_reaches_sink_log_and_timeline() {
        let (mut s, out, log, timeline, _irq) = serial();
        assert!(timeline.get(BootEvent::KernelStart).is_none());
        for b in b"[    0.1] Linux version 6.12\n[    9.0] Run /init as init process\nhi" {
            s.write(0, &[*b]);
        }
        assert!(out.0.lock().unwrap().ends_with(b"process\nhi"));
        assert!(log.contents().contains("Linux version 6.12"));
        assert!(log.wait_for("hi", Duration::from_millis(1)));
        assert!(!log.wait_for("absent", Duration::from_millis(1)));
        let k = timeline.get(BootEvent::KernelStart).unwrap();
        let i = timeline.get(BootEvent::InitExec).unwrap();
        assert!(i >= k);
    }

    #[test]
    fn host_input_is_readable_by_the_guest() {
        let (mut s, _out, _log, _t, irq) = serial();
        // Enable the "received data available" interrupt (IER bit 0).
        s.write(1, &[1]);
        assert_eq!(s.enqueue_input(b"ok"), 2);
        assert_eq!(irq.read().unwrap(), 1);
        let mut lsr = [0u8];
        s.read(5, &mut lsr);
        assert_eq!(lsr[0] & 1, 1, "data ready");
        let mut b = [0u8];
        s.read(0, &mut b);
        assert_eq!(b[0], b'o');
    }

    #[test]
    fn odd_accesses_are_ignored() {
        let (mut s, out, _log, _t, _irq) = serial();
        s.write(0, b"ab");
        s.write(0x1_0000_0000, b"c");
        let mut wide = [0xffu8; 4];
        s.read(0, &mut wide);
        assert_eq!(wide, [0; 4]);
        assert!(out.0.lock().unwrap().is_empty());
    }
}
