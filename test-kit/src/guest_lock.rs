//! [`guest_lock`]: the one lock of a test process that a test holds while
//! it runs a guest (QEMU, our VMM, a `keystone agent` sandbox), so the
//! tests of one binary boot their guests one at a time: a guest wants a
//! core or two and a gigabyte, and the hosts the tests run on may have two
//! cores. The tests' fixtures take it (the QEMU launcher, the CLI tests'
//! sandbox setup); a test that boots a guest by other means takes it
//! itself.
//!
//! The lock is taken again freely on the thread that holds it (a test that
//! holds it may start a fixture that takes it too), and a test that
//! panicked while holding it does not stop the others: a poisoned lock is
//! taken as it is.

use std::cell::Cell;
use std::sync::{Mutex, MutexGuard, PoisonError};

/// The lock itself; [`GuestLock`] holds it.
static GUESTS: Mutex<()> = Mutex::new(());

thread_local! {
    /// How many [`GuestLock`]s this thread holds.
    static HELD_HERE: Cell<usize> = const { Cell::new(0) };
}

/// Proof that this thread may run a guest; the lock is released when the
/// last `GuestLock` of the thread is dropped. Not `Send`: it stays on the
/// thread that took it.
#[must_use = "the lock is released as soon as the GuestLock is dropped"]
pub struct GuestLock {
    /// The mutex guard, held by the outermost lock of the thread only.
    guard: Option<MutexGuard<'static, ()>>,
}

/// Waits until no other thread of this process runs a guest, and returns
/// the lock that says this one may. Returns at once on a thread that
/// already holds it.
pub fn guest_lock() -> GuestLock {
    let nested = HELD_HERE.with(|held| held.get() > 0);
    let guard = if nested {
        None
    } else {
        Some(GUESTS.lock().unwrap_or_else(PoisonError::into_inner))
    };
    HELD_HERE.with(|held| held.set(held.get() + 1));
    GuestLock { guard }
}

impl GuestLock {
    /// Whether this is the thread's outermost lock (the one that waited).
    pub fn is_outermost(&self) -> bool {
        self.guard.is_some()
    }
}

impl Drop for GuestLock {
    fn drop(&mut self) {
        HELD_HERE.with(|held| held.set(held.get().saturating_sub(1)));
        // The guard, if this lock holds it, is released after this.
    }
}

impl std::fmt::Debug for GuestLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestLock")
            .field("outermost", &self.is_outermost())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::mpsc::channel;
    use std::sync::Arc;
    use std::time::Duration;

    /// The tests below share the one process-wide lock with each other:
    /// each takes it in its own threads only, so they merely wait in turn.
    #[test]
    fn a_second_thread_waits_until_the_first_lets_go() {
        let first = guest_lock();
        assert!(first.is_outermost());
        let got_it = Arc::new(AtomicBool::new(false));
        let (started, wait_started) = channel();
        let t = {
            let got_it = Arc::clone(&got_it);
            std::thread::spawn(move || {
                started.send(()).unwrap();
                let _second = guest_lock();
                got_it.store(true, Ordering::SeqCst);
            })
        };
        wait_started.recv().unwrap();
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            !got_it.load(Ordering::SeqCst),
            "a second thread ran a guest beside the first"
        );
        drop(first);
        t.join().unwrap();
        assert!(got_it.load(Ordering::SeqCst));
    }

    #[test]
    fn the_holding_thread_takes_it_again_without_waiting() {
        let outer = guest_lock();
        let inner = guest_lock();
        assert!(outer.is_outermost() && !inner.is_outermost());
        drop(inner);
        // Still held: another thread must wait for `outer`.
        let (tx, rx) = channel();
        let t = std::thread::spawn(move || {
            let _lock = guest_lock();
            tx.send(()).unwrap();
        });
        assert!(rx.recv_timeout(Duration::from_millis(200)).is_err());
        drop(outer);
        rx.recv_timeout(Duration::from_secs(10))
            .expect("the lock was released with the outer guard");
        t.join().unwrap();
    }

    #[test]
    fn a_test_that_panicked_holding_it_does_not_stop_the_others() {
        let panicked = std::thread::spawn(|| {
            let _lock = guest_lock();
            panic!("a guest test failed");
        })
        .join();
        assert!(panicked.is_err());
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            let lock = guest_lock();
            tx.send(lock.is_outermost()).unwrap();
        });
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(true));
    }
}
