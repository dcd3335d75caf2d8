//! The bounds on what the guest's asks can make the supervisor do.
//!
//! An ask is checked for shape when it arrives (so that a queued ask holds
//! a short name, not whatever the guest sent), then handed to one of at
//! most [`MAX_WORKERS`] threads, which resolve the name, connect and answer
//! (see `serve_ask`). While every worker is busy, asks wait in a queue of
//! [`MAX_QUEUED`]; past that, and once an ask has waited longer than the
//! guest agent waits for its answer, it is dropped (the guest's program
//! then reads its proxy's 504). A relayed connection holds one of
//! `MAX_CONNECTIONS` slots and its relay's two threads until it ends.
//!
//! Lines about asks (refusals, drops, failed answers) go through
//! [`LogLimit`]: a guest that floods asks gets [`LINES_PER_MINUTE`] lines a
//! minute in the supervisor log and then one line counting the rest.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use keystone_guest_agent::protocol::EgressAsk;

use super::super::super::netpolicy::Policy;
use super::{check_target, serve_ask, NotATarget, MAX_CONNECTIONS};

/// Threads resolving, connecting and answering asks at once.
pub const MAX_WORKERS: usize = 16;
/// Asks waiting for a worker; more are dropped.
pub const MAX_QUEUED: usize = 256;
/// An ask that waited this long for a worker is dropped: the guest agent
/// waits 40 s for an answer, and a connection made later is wasted.
const STALE_AFTER: Duration = Duration::from_secs(30);
/// Lines about asks that reach the log in [`LOG_INTERVAL`].
pub const LINES_PER_MINUTE: usize = 20;
const LOG_INTERVAL: Duration = Duration::from_secs(60);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// An ask, checked for shape, waiting for a worker.
pub(super) struct Pending {
    pub id: u64,
    /// The host and port, or why they are not a target.
    pub target: Result<(String, u16), NotATarget>,
    queued: Instant,
}

/// What the workers share.
pub(super) struct Shared {
    /// The VMM's hybrid vsock socket, where answers go.
    pub uds: PathBuf,
    pub policy: Arc<Policy>,
    pub log: LogLimit,
    /// Set when the service ends: queued asks are dropped and answers
    /// being waited for give up.
    pub closed: Arc<AtomicBool>,
    /// Relayed connections.
    live: AtomicUsize,
    work: Mutex<Work>,
}

struct Work {
    running: usize,
    queue: VecDeque<Pending>,
}

/// A relayed connection's place among the [`MAX_CONNECTIONS`]; freed on
/// drop.
pub(super) struct Slot(Arc<Shared>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Shared {
    /// A connection slot, if fewer than [`MAX_CONNECTIONS`] are taken.
    pub fn take_slot(self: &Arc<Self>) -> Option<Slot> {
        self.live
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < MAX_CONNECTIONS).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(Arc::clone(self)))
    }
}

/// The asks of one service; ends its work on drop.
pub(super) struct AskPool {
    shared: Arc<Shared>,
}

impl AskPool {
    pub fn new(uds: &Path, policy: Arc<Policy>) -> Self {
        AskPool {
            shared: Arc::new(Shared {
                uds: uds.to_path_buf(),
                policy,
                log: LogLimit::new(ASKS_TARGET),
                closed: Arc::new(AtomicBool::new(false)),
                live: AtomicUsize::new(0),
                work: Mutex::new(Work {
                    running: 0,
                    queue: VecDeque::new(),
                }),
            }),
        }
    }

    /// A line about asks, within the log's limit.
    pub fn log(&self, line: &str) {
        self.shared.log.line(line);
    }

    /// Hands `ask` to a worker (starting one if fewer than [`MAX_WORKERS`]
    /// run), queues it, or drops it.
    pub fn submit(&self, ask: EgressAsk) {
        let EgressAsk { id, host, port } = ask;
        let pending = Pending {
            id,
            target: check_target(&host, port).map(|()| (host, port)),
            queued: Instant::now(),
        };
        let mut work = lock(&self.shared.work);
        if work.running < MAX_WORKERS {
            work.running += 1;
            drop(work);
            let shared = Arc::clone(&self.shared);
            let spawned = std::thread::Builder::new()
                .name("egress-ask".into())
                .spawn(move || work_on(&shared, pending));
            if let Err(e) = spawned {
                lock(&self.shared.work).running -= 1;
                self.log(&format!(
                    "egress: dropped ask {id}: cannot start a thread: {e}"
                ));
            }
        } else if work.queue.len() < MAX_QUEUED {
            work.queue.push_back(pending);
        } else {
            drop(work);
            self.log(&format!(
                "egress: dropped ask {id}: {MAX_QUEUED} asks wait for an answer already"
            ));
        }
    }
}

impl Drop for AskPool {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::SeqCst);
        lock(&self.shared.work).queue.clear();
    }
}

/// A worker: serves `next`, then the queue until it is empty.
fn work_on(shared: &Arc<Shared>, mut next: Pending) {
    loop {
        if shared.closed.load(Ordering::SeqCst) {
            // The service ended: nothing is answered any more.
        } else if next.queued.elapsed() > STALE_AFTER {
            shared.log.line(&format!(
                "egress: dropped ask {}: it waited {} s for a worker",
                next.id,
                STALE_AFTER.as_secs()
            ));
        } else {
            serve_ask(shared, next);
        }
        let mut work = lock(&shared.work);
        match work.queue.pop_front() {
            Some(pending) => next = pending,
            None => {
                work.running -= 1;
                return;
            }
        }
    }
}

/// The supervisor log, at most [`LINES_PER_MINUTE`] lines an interval;
/// the first line after a full interval (or the end of the service) says
/// how many were left out.
pub(super) struct LogLimit {
    /// The log target its lines go out under.
    target: &'static str,
    state: Mutex<LogWindow>,
}

/// The log target of the lines about asks.
pub(super) const ASKS_TARGET: &str = "keystone::egress::asks";

struct LogWindow {
    since: Instant,
    written: usize,
    left_out: usize,
}

impl LogLimit {
    pub fn new(target: &'static str) -> Self {
        LogLimit {
            target,
            state: Mutex::new(LogWindow {
                since: Instant::now(),
                written: 0,
                left_out: 0,
            }),
        }
    }

    pub fn line(&self, line: &str) {
        let mut w = lock(&self.state);
        if w.since.elapsed() >= LOG_INTERVAL {
            self.summarise(&mut w);
            *w = LogWindow {
                since: Instant::now(),
                written: 0,
                left_out: 0,
            };
        }
        if w.written < LINES_PER_MINUTE {
            w.written += 1;
            log::info!(target: self.target, "{line}");
        } else {
            w.left_out += 1;
        }
    }

    fn summarise(&self, w: &mut LogWindow) {
        if w.left_out > 0 {
            log::info!(
                target: self.target,
                "egress: {} more lines about asks were left out of the log in {} s",
                w.left_out,
                w.since.elapsed().as_secs()
            );
            w.left_out = 0;
        }
    }
}

impl Drop for LogLimit {
    fn drop(&mut self) {
        let mut w = lock(&self.state);
        self.summarise(&mut w);
    }
}

/// `text` (which may come from the guest) fit for one log line: at most
/// 400 characters, anything but printable ASCII escaped.
pub(super) fn printable(text: &str) -> String {
    const MAX: usize = 400;
    let mut out = String::new();
    for (i, c) in text.chars().enumerate() {
        if i == MAX {
            out.push_str("...");
            break;
        }
        if c == ' ' || c.is_ascii_graphic() {
            out.push(c);
        } else {
            out.extend(c.escape_default());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_takes_a_bounded_number_of_lines_then_counts_the_rest() {
        const TARGET: &str = "keystone::egress::test-limit";
        crate::logging::capture::this_thread();
        let limit = LogLimit::new(TARGET);
        for n in 0..LINES_PER_MINUTE + 1000 {
            limit.line(&format!("egress refused: {n}"));
        }
        assert_eq!(crate::logging::capture::count(TARGET), LINES_PER_MINUTE);
        drop(limit);
        assert_eq!(crate::logging::capture::count(TARGET), LINES_PER_MINUTE + 1);
        let lines = crate::logging::capture::take();
        assert!(
            lines.last().unwrap().contains("1000 more lines"),
            "{lines:?}"
        );
    }

    #[test]
    fn guest_text_stays_one_short_line() {
        assert_eq!(printable("a b:c"), "a b:c");
        let hostile = format!("x\ny\r\u{1b}[2J\u{202e}{}", "z".repeat(1000));
        let line = printable(&hostile);
        assert!(
            line.chars().all(|c| c.is_ascii_graphic() || c == ' '),
            "{line}"
        );
        assert!(line.len() < 440, "{}", line.len());
    }
}
