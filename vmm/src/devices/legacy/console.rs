//! Where the UART's output goes: the embedder's sink, a bounded in-memory
//! [`ConsoleLog`] that the library's users can read and wait on, and a line
//! watcher that feeds the boot timeline (first kernel byte, "Run /init as
//! init process").
//!
//! The UART model hands over one byte at a time and flushes after each,
//! which would cost a write to the embedder's sink and a wake-up of the
//! log's waiters per byte: the handling time of a console exit. The
//! [`ConsoleSink`] holds bytes instead and passes them on
//! - at once when output starts after a quiet spell (an echoed key, a
//!   prompt, the kernel's first byte),
//! - at the end of each line, or when [`CONSOLE_BATCH_MAX`] bytes are held,
//! - when the oldest byte held is [`CONSOLE_HOLD_MAX`] old (checked on
//!   each byte), and on every tick of the VM's ticker thread
//!   ([`ConsoleSink::flush_pending`]), and when the VM stops.
//!
//! The watcher sees each byte when the guest writes it, so the timeline's
//! console events keep their exact times.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::boot_timer::{BootEvent, BootTimeline};

const CONSOLE_LOG_CAPACITY: usize = 1 << 20;
const LINE_CAPACITY: usize = 256;
/// The most bytes held before they are passed on.
pub const CONSOLE_BATCH_MAX: usize = 4096;
/// The longest a byte is held while more output follows.
pub const CONSOLE_HOLD_MAX: Duration = Duration::from_millis(5);
/// Output after this much silence is passed on at once.
const QUIET: Duration = Duration::from_millis(20);

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
    /// Bytes not yet passed on, and when the oldest of them came.
    held: Vec<u8>,
    held_since: Option<Instant>,
    /// When bytes were last passed on.
    last_flush: Option<Instant>,
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
            held: Vec::with_capacity(CONSOLE_BATCH_MAX),
            held_since: None,
            last_flush: None,
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

    /// Passes on whatever is held (to the log and the embedder's sink).
    pub fn flush_pending(&mut self) {
        self.flush_pending_at(Instant::now());
    }

    /// True while bytes are held.
    pub fn has_pending(&self) -> bool {
        !self.held.is_empty()
    }
}

/// The kernel's "Run /init as init process" (any init path).
fn is_init_exec_line(line: &[u8]) -> bool {
    let text = String::from_utf8_lossy(line);
    text.contains("Run /") && text.contains(" as init process")
}

impl ConsoleSink {
    /// Takes `buf`, written by the guest at `now`, and passes on what is
    /// due (see the module overview).
    fn take(&mut self, buf: &[u8], now: Instant) {
        self.watch(buf);
        let quiet_before = self
            .last_flush
            .is_none_or(|t| now.saturating_duration_since(t) >= QUIET);
        let was_empty = self.held.is_empty();
        self.held.extend_from_slice(buf);
        let since = *self.held_since.get_or_insert(now);
        if (quiet_before && was_empty)
            || buf.contains(&b'\n')
            || self.held.len() >= CONSOLE_BATCH_MAX
            || now.saturating_duration_since(since) >= CONSOLE_HOLD_MAX
        {
            self.flush_pending_at(now);
        }
    }

    fn flush_pending_at(&mut self, now: Instant) {
        if self.held.is_empty() {
            return;
        }
        self.log.append(&self.held);
        // A closed or failing sink must not stop the guest's console.
        let _ = self.out.write_all(&self.held);
        let _ = self.out.flush();
        self.held.clear();
        self.held_since = None;
        self.last_flush = Some(now);
    }
}

impl Write for ConsoleSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.take(buf, Instant::now());
        Ok(buf.len())
    }

    /// The UART model flushes after every byte; the sink keeps to its
    /// own rules (see the module overview) and [`ConsoleSink::flush_pending`]
    /// is the flush that passes bytes on.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Writes(Arc<Mutex<Vec<Vec<u8>>>>);
    impl Write for Writes {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().push(b.to_vec());
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn sink() -> (ConsoleSink, Writes, Arc<ConsoleLog>) {
        let out = Writes::default();
        let log = Arc::new(ConsoleLog::new());
        let timeline = Arc::new(BootTimeline::new());
        let sink = ConsoleSink::new(Box::new(out.clone()), log.clone(), timeline);
        (sink, out, log)
    }

    /// The guest writes `text` byte by byte at `at`, as the UART model
    /// hands it over (a write and a flush per byte).
    fn bytewise(s: &mut ConsoleSink, text: &[u8], at: Instant) {
        for b in text {
            s.take(&[*b], at);
            s.flush().unwrap();
        }
    }

    #[test]
    fn the_first_byte_goes_out_at_once_then_whole_lines() {
        let (mut s, out, log) = sink();
        let t = Instant::now();
        bytewise(&mut s, b"Linux version 6.12\nsecond line\nthird", t);
        let writes = out.0.lock().unwrap().clone();
        assert_eq!(
            writes,
            vec![
                b"L".to_vec(),
                b"inux version 6.12\n".to_vec(),
                b"second line\n".to_vec()
            ]
        );
        assert!(s.has_pending());
        assert_eq!(log.contents(), "Linux version 6.12\nsecond line\n");
        s.flush_pending();
        assert!(!s.has_pending());
        assert_eq!(out.0.lock().unwrap().last().unwrap(), b"third");
        assert!(log.contents().ends_with("line\nthird"));
    }

    #[test]
    fn held_bytes_go_out_once_old_or_many() {
        let (mut s, out, _log) = sink();
        let t = Instant::now();
        bytewise(&mut s, b"$", t);
        bytewise(&mut s, b" ls", t + Duration::from_millis(1));
        assert_eq!(out.0.lock().unwrap().len(), 1, "' ls' is held");
        bytewise(
            &mut s,
            b"!",
            t + Duration::from_millis(1) + CONSOLE_HOLD_MAX,
        );
        assert_eq!(out.0.lock().unwrap().last().unwrap(), b" ls!");
        let later = t + Duration::from_millis(7);
        s.take(&vec![b'x'; CONSOLE_BATCH_MAX - 1], later);
        assert!(s.has_pending());
        s.take(b"x", later);
        assert!(!s.has_pending());
        let writes = out.0.lock().unwrap().clone();
        assert_eq!(writes.last().unwrap().len(), CONSOLE_BATCH_MAX);
    }

    #[test]
    fn output_after_a_quiet_spell_goes_out_at_once() {
        let (mut s, out, _log) = sink();
        let t = Instant::now();
        bytewise(&mut s, b"# ", t);
        s.flush_pending_at(t);
        bytewise(&mut s, b"l", t + QUIET / 2);
        assert_eq!(out.0.lock().unwrap().last().unwrap(), b" ", "'l' is held");
        s.flush_pending_at(t + QUIET / 2);
        bytewise(&mut s, b"s", t + QUIET / 2 + QUIET);
        assert_eq!(out.0.lock().unwrap().last().unwrap(), b"s");
    }
}
