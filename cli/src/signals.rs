//! Termination signals (SIGTERM, SIGINT, SIGHUP) as messages on a
//! channel, for a process that must turn them into an orderly stop: the
//! sandbox supervisor.
//!
//! [`termination_channel`] blocks the signals in the calling thread, so
//! that every thread it starts afterwards inherits the mask and none is
//! interrupted, and starts one thread that takes them with `sigwait(3)`
//! and sends each on the channel. The caller waits on the channel with
//! the rest of its work; nothing polls a flag. It must be called before
//! the process starts other threads. Child processes start with an empty
//! mask (the standard library's `Command` resets it).

use std::io;
use std::sync::mpsc::{sync_channel, Receiver};

/// The signals that ask for a stop.
const TERMINATION: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

/// How many signals may wait unread.
const QUEUE: usize = 8;

/// Routes the termination signals of this process to the returned
/// channel (see the module documentation).
pub fn termination_channel() -> io::Result<Receiver<libc::c_int>> {
    // The mask and sigwait are libc's: rustix has them only in its
    // `runtime` API, for programs that run without libc.
    let set = signal_set(&TERMINATION);
    // SAFETY: `set` is an initialised sigset_t; the old mask is not read.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    let (tx, rx) = sync_channel(QUEUE);
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            let mut signal: libc::c_int = 0;
            // SAFETY: `set` holds the blocked signals; sigwait writes the
            // one taken into `signal`.
            if unsafe { libc::sigwait(&set, &mut signal) } != 0 {
                continue;
            }
            // A full queue already says "stop"; more of the same adds nothing.
            if let Err(std::sync::mpsc::TrySendError::Disconnected(_)) = tx.try_send(signal) {
                return;
            }
        })?;
    Ok(rx)
}

fn signal_set(signals: &[libc::c_int]) -> libc::sigset_t {
    let mut set = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigemptyset initialises the whole set (it cannot fail for a
    // valid pointer), so it may be read afterwards; sigaddset adds valid
    // signal numbers to it.
    unsafe {
        libc::sigemptyset(set.as_mut_ptr());
        for s in signals {
            libc::sigaddset(set.as_mut_ptr(), *s);
        }
        set.assume_init()
    }
}
