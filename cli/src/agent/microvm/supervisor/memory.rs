//! The guest's memory beyond what it booted with (see
//! `engine::boot_memory`): the guest agent adds it once the sandbox is
//! ready, or earlier when the devcontainer's first-start commands are
//! about to run before ready and may need it. The agent adds only what is
//! missing, and one addition at a time runs, so the second finds nothing
//! left to do.

use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use keystone_guest_agent::client::ClientError;

use super::super::guest;

/// The longest the guest may take to add its memory (well under a second
/// for 7 GiB under emulation).
const TIMEOUT: Duration = Duration::from_secs(120);

/// One addition at a time.
static ADDING: Mutex<()> = Mutex::new(());

/// Has the guest add what memory it lacks; `when` says at which point of
/// the start, for the log. Returns the bytes added.
pub fn add(vsock: &Path, when: &str) -> u64 {
    let _one = ADDING.lock().unwrap_or_else(|e| e.into_inner());
    let t0 = Instant::now();
    match guest::quick_client(vsock, TIMEOUT).add_memory() {
        Ok(0) => 0,
        Ok(bytes) => {
            log::info!(
                "memory: {} MiB added {when} in {:.2} s",
                bytes >> 20,
                t0.elapsed().as_secs_f64()
            );
            bytes
        }
        // The agent ships in the initramfs with this binary, so only a
        // guest started by an older one (which booted with all of its
        // memory) has an agent before protocol 1.6.
        Err(ClientError::Unsupported { .. }) => 0,
        Err(e) => {
            log::warn!("memory: the guest keeps the memory it booted with: {e}");
            0
        }
    }
}
