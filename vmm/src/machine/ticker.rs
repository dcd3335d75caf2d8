//! The VM's ticker: a thread that, every few milliseconds, applies the
//! guest writes KVM coalesced (a vCPU that wrote THR and then halted made
//! no exit that would have drained them; see `vstate::coalesced`) and
//! passes on console output the serial sink holds (a prompt without a
//! newline; see `devices::legacy::console`).
//!
//! It ticks every [`TICK_BUSY`] while there is work, and slows down to
//! [`TICK_IDLE_MAX`] while there is none, so an idle VM costs little. When
//! the VM stops, [`Ticker::stop`] ends the thread and does both once more,
//! so nothing the guest wrote is left behind.

use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::devices::legacy::Serial;
use crate::vstate::coalesced::CoalescedIo;

/// The tick while the guest writes.
pub const TICK_BUSY: Duration = Duration::from_millis(4);
/// The slowest tick, reached by doubling while nothing is to be done.
pub const TICK_IDLE_MAX: Duration = Duration::from_millis(16);

/// What the ticker looks after.
#[derive(Clone)]
pub struct Duties {
    /// The coalesced ring, where KVM has one for this VM.
    pub coalesced: Option<Arc<CoalescedIo>>,
    /// The UART, whose console sink holds output.
    pub serial: Arc<Mutex<Serial>>,
}

impl Duties {
    /// One round; true if there was anything to do.
    pub fn run_once(&self) -> bool {
        let drained = self.coalesced.as_ref().map_or(0, |c| c.drain());
        let flushed = self
            .serial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .flush_console();
        drained > 0 || flushed
    }
}

/// The next tick after one that found work (`busy`) or not.
pub fn next_tick(current: Duration, busy: bool) -> Duration {
    if busy {
        TICK_BUSY
    } else {
        (current * 2).min(TICK_IDLE_MAX)
    }
}

/// The running ticker thread.
pub struct Ticker {
    stop: mpsc::Sender<()>,
    thread: JoinHandle<()>,
    duties: Duties,
}

impl Ticker {
    /// Starts the thread.
    pub fn start(duties: Duties) -> std::io::Result<Self> {
        let (stop, stopped) = mpsc::channel::<()>();
        let mine = duties.clone();
        let thread = std::thread::Builder::new()
            .name("vm-ticker".into())
            .spawn(move || {
                let mut tick = TICK_BUSY;
                // A stop request, or a handle dropped without one, ends it.
                while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(tick) {
                    tick = next_tick(tick, mine.run_once());
                }
            })?;
        Ok(Self {
            stop,
            thread,
            duties,
        })
    }

    /// Ends the thread, then drains and flushes one last time (call once
    /// the vCPUs stopped).
    pub fn stop(self) {
        let _ = self.stop.send(());
        if self.thread.join().is_err() {
            log::error!("the VM's ticker thread panicked");
        }
        self.duties.run_once();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::bus::BusDevice;
    use crate::devices::legacy::serial::ConsoleSink;
    use crate::devices::legacy::{BootTimeline, ConsoleLog};
    use std::time::Instant;
    use vmm_sys_util::eventfd::EventFd;

    fn serial() -> (Arc<Mutex<Serial>>, Arc<ConsoleLog>) {
        let log = Arc::new(ConsoleLog::new());
        let sink = ConsoleSink::new(
            Box::new(std::io::sink()),
            log.clone(),
            Arc::new(BootTimeline::new()),
        );
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        (Arc::new(Mutex::new(Serial::new(irq, sink))), log)
    }

    #[test]
    fn the_tick_speeds_up_on_work_and_slows_down_when_idle() {
        assert_eq!(next_tick(TICK_IDLE_MAX, true), TICK_BUSY);
        let mut t = TICK_BUSY;
        let mut seen = vec![t];
        for _ in 0..5 {
            t = next_tick(t, false);
            seen.push(t);
        }
        assert_eq!(seen.last(), Some(&TICK_IDLE_MAX));
        assert!(seen.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn a_held_prompt_reaches_the_log_within_a_few_ticks() {
        let (serial, log) = serial();
        let ticker = Ticker::start(Duties {
            coalesced: None,
            serial: serial.clone(),
        })
        .unwrap();
        let t0 = Instant::now();
        for b in b"line\n# " {
            serial.lock().unwrap().write(0, &[*b]);
        }
        assert!(log.wait_for("line\n", Duration::from_millis(1)));
        assert!(
            log.wait_for("# ", Duration::from_secs(5)),
            "the ticker flushed the prompt"
        );
        assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
        ticker.stop();
    }

    fn ring_on(serial: &Arc<Mutex<Serial>>) -> Arc<CoalescedIo> {
        use crate::devices::bus::Bus;
        use crate::vstate::coalesced::{ring::RingPage, Zone};
        let mut io = Bus::new();
        io.insert(serial.clone(), 0x3f8, 8, "serial").unwrap();
        Arc::new(CoalescedIo::new(
            RingPage::anonymous().unwrap(),
            vec![Zone::pio(0x3f8, 1, "io serial")],
            Arc::new(io),
            Arc::new(Bus::new()),
        ))
    }

    #[test]
    fn a_write_a_halted_vcpu_left_in_the_ring_is_applied_in_a_few_ticks() {
        let (serial, log) = serial();
        let coalesced = ring_on(&serial);
        let ticker = Ticker::start(Duties {
            coalesced: Some(coalesced.clone()),
            serial,
        })
        .unwrap();
        // The guest wrote "ok\n" to THR, then halted: no exit follows.
        for b in b"ok\n" {
            assert!(coalesced.ring().push(0x3f8, true, &[*b]));
        }
        assert!(
            log.wait_for("ok\n", Duration::from_secs(5)),
            "the ticker drained the ring"
        );
        ticker.stop();
    }

    #[test]
    fn stopping_drains_the_ring() {
        let (serial, log) = serial();
        let coalesced = ring_on(&serial);
        let ticker = Ticker::start(Duties {
            coalesced: Some(coalesced.clone()),
            serial,
        })
        .unwrap();
        assert!(coalesced.ring().push(0x3f8, true, b"z"));
        ticker.stop();
        assert!(coalesced.ring().is_empty());
        assert_eq!(log.contents(), "z");
    }

    #[test]
    fn stopping_passes_on_what_is_held() {
        let (serial, log) = serial();
        let ticker = Ticker::start(Duties {
            coalesced: None,
            serial: serial.clone(),
        })
        .unwrap();
        for b in b"a\nlast words" {
            serial.lock().unwrap().write(0, &[*b]);
        }
        ticker.stop();
        assert!(
            log.contents().ends_with("a\nlast words"),
            "{}",
            log.contents()
        );
    }
}
