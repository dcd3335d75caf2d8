//! Warnings a guest can cause at will (a bad descriptor chain, a register
//! written out of turn, a packet to the wrong CID, a FUSE request that
//! cannot be read) are rate-limited per call site, so that a guest cannot
//! fill the host's log with them: each
//! site logs its first [`BURST`] lines in a [`WINDOW`], counts the rest,
//! and says how many it left out in the next line it logs.
//!
//! Use [`log_limited!`] instead of
//! `log::warn!` wherever the guest decides how often the line comes.

#[doc(hidden)]
pub use log;

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Lines a call site logs per window.
pub const BURST: u32 = 10;
/// The window.
pub const WINDOW: Duration = Duration::from_secs(60);

/// Milliseconds since the first call in this process.
fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// The budget of one call site (a `static`; lock-free).
#[derive(Debug)]
pub struct LogLimit {
    window_start_ms: AtomicU64,
    in_window: AtomicU32,
    left_out: AtomicU64,
}

impl LogLimit {
    /// A budget with nothing spent.
    pub const fn new() -> Self {
        Self {
            window_start_ms: AtomicU64::new(0),
            in_window: AtomicU32::new(0),
            left_out: AtomicU64::new(0),
        }
    }

    /// `Some(n)` when this line is logged, `n` being how many were left
    /// out since the last one that was; `None` when it is left out.
    pub fn admit(&self) -> Option<u64> {
        self.admit_at(now_ms())
    }

    fn admit_at(&self, now: u64) -> Option<u64> {
        let start = self.window_start_ms.load(Ordering::Relaxed);
        if now.saturating_sub(start) >= WINDOW.as_millis() as u64
            && self
                .window_start_ms
                .compare_exchange(start, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.in_window.store(0, Ordering::Relaxed);
        }
        if self.in_window.fetch_add(1, Ordering::Relaxed) < BURST {
            Some(self.left_out.swap(0, Ordering::Relaxed))
        } else {
            // Saturates instead of wrapping back into the burst.
            self.in_window.store(BURST, Ordering::Relaxed);
            self.left_out.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

impl Default for LogLimit {
    fn default() -> Self {
        Self::new()
    }
}

/// `log::log!` at `$level`, rate-limited for this call site (see the
/// crate documentation).
#[macro_export]
macro_rules! log_limited {
    ($level:expr, $($arg:tt)+) => {{
        static LIMIT: $crate::LogLimit = $crate::LogLimit::new();
        if let Some(left_out) = LIMIT.admit() {
            if left_out == 0 {
                $crate::log::log!($level, $($arg)+);
            } else {
                $crate::log::log!(
                    $level,
                    "{} ({left_out} more like it left out)",
                    format_args!($($arg)+)
                );
            }
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_site_logs_its_burst_then_counts() {
        let limit = LogLimit::new();
        let logged: Vec<Option<u64>> = (0..1000).map(|i| limit.admit_at(i)).collect();
        assert_eq!(logged.iter().flatten().count(), BURST as usize);
        assert!(logged[..BURST as usize].iter().all(|l| *l == Some(0)));
        // A window later the next line tells what was left out.
        let later = WINDOW.as_millis() as u64 + 1000;
        assert_eq!(limit.admit_at(later), Some(1000 - u64::from(BURST)));
        assert_eq!(limit.admit_at(later + 1), Some(0));
        let flood = (0..50_000)
            .filter_map(|i| limit.admit_at(later + i))
            .count();
        assert_eq!(flood, BURST as usize - 2);
    }
}
