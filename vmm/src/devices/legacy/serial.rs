//! The 16550 UART on COM1 (vm-superio), with its output going to a
//! [`ConsoleSink`] (the embedder's sink, the bounded in-memory
//! [`ConsoleLog`], the boot timeline's line watcher; see `console.rs`).

use std::io;

use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

pub use super::console::{ConsoleLog, ConsoleSink};
use crate::devices::bus::BusDevice;
use log_limit::log_limited;

/// I/O port base of COM1.
pub const SERIAL_PORT_COM1: u16 = 0x3f8;
/// Ports of one UART.
pub const SERIAL_PORT_COUNT: u64 = 8;
/// IRQ of COM1.
pub const SERIAL_IRQ: u32 = 4;

/// The UART's interrupt line: an `EventFd` registered as a KVM irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
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

    /// Passes on the console output the sink holds (see `console.rs`);
    /// true if there was any.
    pub fn flush_console(&mut self) -> bool {
        let sink = self.uart.writer_mut();
        let had = sink.has_pending();
        sink.flush_pending();
        had
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
    use crate::devices::legacy::{BootEvent, BootTimeline};
    use std::io::Write;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

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
        assert!(
            out.0.lock().unwrap().ends_with(b"process\n"),
            "lines go out whole"
        );
        assert!(log.contents().contains("Linux version 6.12"));
        assert!(s.flush_console(), "'hi' was held");
        assert!(!s.flush_console());
        assert!(out.0.lock().unwrap().ends_with(b"process\nhi"));
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
