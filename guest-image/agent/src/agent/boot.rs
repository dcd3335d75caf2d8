//! The guest's boot milestones, for the host's start-up timings
//! ([`BootTimes`] in the `Pong` answer): when PID 1 began, when the
//! sandbox's root was entered and when the agent server began to listen,
//! each read from `CLOCK_BOOTTIME` (milliseconds since the guest kernel
//! started).
//!
//! PID 1 marks the first two before it forks the server, which inherits
//! them with the rest of its memory and marks the third. An agent that is
//! not PID 1 marks nothing and reports no milestones.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::protocol::BootTimes;

static INIT_MS: AtomicU64 = AtomicU64::new(0);
static ROOT_MS: AtomicU64 = AtomicU64::new(0);
static LISTENING_MS: AtomicU64 = AtomicU64::new(0);

/// Milliseconds since the guest kernel started (`CLOCK_BOOTTIME`).
pub fn uptime_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own.
    if unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) } != 0 {
        return 0;
    }
    (ts.tv_sec as u64) * 1000 + (ts.tv_nsec as u64) / 1_000_000
}

/// PID 1 began (the first thing `/init` does). Never 0 once marked: a
/// guest that starts within a millisecond of its kernel still counts.
pub fn mark_init() {
    INIT_MS.store(uptime_ms().max(1), Ordering::Relaxed);
}

/// The sandbox's root is mounted and entered.
pub fn mark_root() {
    ROOT_MS.store(uptime_ms(), Ordering::Relaxed);
}

/// The agent server listens (the first time only: a restarted server
/// keeps the boot's figure).
pub fn mark_listening() {
    let _ = LISTENING_MS.compare_exchange(0, uptime_ms(), Ordering::Relaxed, Ordering::Relaxed);
}

/// The milestones, or `None` when this agent is not the guest's `/init`.
pub fn times() -> Option<BootTimes> {
    let init_ms = INIT_MS.load(Ordering::Relaxed);
    (init_ms != 0).then(|| BootTimes {
        init_ms,
        root_ms: ROOT_MS.load(Ordering::Relaxed),
        listening_ms: LISTENING_MS.load(Ordering::Relaxed),
        now_ms: uptime_ms(),
        wall_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
    })
}

/// Sets the wall clock (`CLOCK_REALTIME`) to `unix_ms` milliseconds
/// since the Unix epoch; needs CAP_SYS_TIME (the agent is PID 1, root).
pub fn set_clock(unix_ms: u64) -> std::io::Result<()> {
    let secs = libc::time_t::try_from(unix_ms / 1000)
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EOVERFLOW))?;
    let ts = libc::timespec {
        tv_sec: secs,
        // Below 1e9: (unix_ms % 1000) * 1e6.
        tv_nsec: ((unix_ms % 1000) * 1_000_000) as libc::c_long,
    };
    // SAFETY: `ts` is a valid, initialised timespec that outlives the
    // call, which only reads it.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn milestones_appear_once_init_is_marked_and_keep_their_order() {
        assert_eq!(times(), None, "nothing is marked in a plain process");
        mark_init();
        mark_root();
        mark_listening();
        let first = times().unwrap();
        assert!(first.init_ms >= 1);
        assert!(first.init_ms <= first.root_ms);
        assert!(first.root_ms <= first.listening_ms);
        assert!(first.listening_ms <= first.now_ms);
        // A restarted server does not move the boot's figure.
        std::thread::sleep(std::time::Duration::from_millis(5));
        mark_listening();
        assert_eq!(times().unwrap().listening_ms, first.listening_ms);
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        assert!(wall.abs_diff(times().unwrap().wall_ms) < 1000);
    }
}
