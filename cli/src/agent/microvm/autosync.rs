//! Automatic sync (`--sync-mode auto-commit` and `auto-idle`), run by the
//! supervisor.
//!
//! Security invariant 2 holds: the guest never connects to the host. The
//! supervisor opens one long-lived connection to the guest agent and asks
//! it to `Watch` `/workspace` (protocol 1.1, see
//! `keystone_guest_agent::protocol`); the agent streams events back on that
//! host-initiated connection:
//! - `auto-commit`: a `Commit { branch, head }` event (a branch ref in the
//!   sandbox moved) syncs that branch;
//! - `auto-idle`: an `Idle` event, sent once no file in `/workspace`
//!   changed for [`IDLE_SECONDS`] (30 s) after the last change, syncs the
//!   branch checked out on the host (as `keystone agent sync` does).
//!
//! A sync here is the fetch of `keystone agent sync` (git's `ext::`
//! transport through `keystone agent __git-upload-pack NAME` into
//! `refs/remotes/sandbox-<NAME>/*`), followed by a fast-forward only:
//! `git merge --ff-only` when the branch is checked out on the host,
//! `git update-ref NEW OLD` (compare-and-swap) otherwise. Auto modes never
//! create a merge commit, and never a branch: only branches the host has
//! move (the one checked out counts even before its first commit), under
//! the names `sync::branches` accepts (no `origin/main` that would hide
//! the remote-tracking branch, no tag's name). A sandbox branch that the
//! host lacks, or whose name is refused, or that has diverged from the
//! host's, stays fetched at `refs/remotes/sandbox-<NAME>/<branch>` and the
//! log says how to take it (`keystone agent sync --branch B`, `git branch`
//! under another name, or `keystone agent sync` to merge), once per
//! sandbox tip. Nothing is paused: the next event tries again.
//! `sync::sync` is not called because its integration merges diverged
//! branches; it shares the fetch, the git helpers and the host git rules
//! of `sync` (`sync::content::ContentGit` for the checkout). Branch names
//! from the guest are logged escaped.
//!
//! Every outcome goes to the supervisor log; a failed sync never stops the
//! supervisor. The watch reconnects while the guest runs (boot, reboot); an
//! agent older than protocol 1.1 is reported once and auto-sync stays off.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keystone_guest_agent::client::{WatchCloser, WatchEvent};
use keystone_guest_agent::protocol::printable;

use super::super::backend::SandboxSpec;
use super::super::config::SyncMode;
use super::engine::GUEST_WORKSPACE;
use super::guest;
use super::readiness::{Readiness, Service};
use super::sync::{fetch_into, remote_ns};

mod round;

/// `auto-idle`: seconds without a file change in `/workspace` before a
/// sync.
pub const IDLE_SECONDS: u64 = 30;
/// Pause between attempts to (re)open the watch.
const RETRY: Duration = Duration::from_secs(1);
/// Targets queued between the watch and the worker (the watch waits when
/// the worker is this far behind: the guest's events wait in its socket).
const QUEUE: usize = 64;
/// Distinct targets merged into one round; past it the round syncs every
/// branch instead ([`Target::CatchUp`]), so a guest that names endless
/// branches costs the host a bounded set.
const MAX_ROUND: usize = 256;

/// What one event asks the worker to sync.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Target {
    /// Whatever the sandbox has ahead of the host: every branch the host
    /// has too in `auto-commit`, the checked-out one in `auto-idle`. Queued
    /// each time the watch opens, for what happened before it.
    CatchUp,
    /// A branch that moved in the sandbox.
    Branch(String),
    /// The branch checked out on the host.
    HostHead,
}

/// The running auto-sync: its watch thread and sync worker.
pub struct AutoSync {
    stop: Arc<AtomicBool>,
    closer: Arc<Mutex<Option<WatchCloser>>>,
}

impl AutoSync {
    /// Stops watching (the guest is shutting down).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(c) = self.closer.lock().unwrap_or_else(|e| e.into_inner()).take() {
            c.close();
        }
    }
}

/// The target an event means in `mode`, if any.
fn target(mode: SyncMode, event: &WatchEvent) -> Option<Target> {
    match (mode, event) {
        (SyncMode::AutoCommit, WatchEvent::Commit { branch, .. }) => {
            Some(Target::Branch(branch.clone()))
        }
        (SyncMode::AutoIdle, WatchEvent::Idle) => Some(Target::HostHead),
        _ => None,
    }
}

/// The idle time to ask the agent for.
fn idle_ms(mode: SyncMode) -> u64 {
    match mode {
        SyncMode::AutoIdle => IDLE_SECONDS * 1000,
        _ => 0,
    }
}

/// Starts auto-sync for `spec` when its sync mode asks for it; `log`
/// writes a line to the supervisor log.
pub fn start(spec: &SandboxSpec, vsock: &Path, ready: &Arc<Readiness>) -> Option<AutoSync> {
    let mode = spec.settings.sync_mode;
    if mode == SyncMode::Manual {
        return None;
    }
    let auto = AutoSync {
        stop: Arc::new(AtomicBool::new(false)),
        closer: Arc::new(Mutex::new(None)),
    };
    let (tx, rx) = sync_channel::<Target>(QUEUE);
    let worker_spec = spec.clone();
    let spawned = std::thread::Builder::new()
        .name("autosync".into())
        .spawn(move || worker(&worker_spec, mode, &rx));
    if let Err(e) = spawned {
        log::warn!("auto-sync: cannot start its thread: {e}");
        return None;
    }
    let stop = Arc::clone(&auto.stop);
    let closer = Arc::clone(&auto.closer);
    let (uds, ready) = (vsock.to_path_buf(), Arc::clone(ready));
    let spawned = std::thread::Builder::new()
        .name("autosync-watch".into())
        .spawn(move || {
            let held = guest::Held {
                service: Service::AutoSync,
                stop: &stop,
                closer: &closer,
                ready: &ready,
            };
            watch_loop(mode, &uds, &held, &tx)
        });
    if let Err(e) = spawned {
        log::warn!("auto-sync: cannot start its watch thread: {e}");
        return None;
    }
    log::info!(
        "auto-sync: mode {mode}{}",
        if mode == SyncMode::AutoIdle {
            format!(" (after {IDLE_SECONDS} s without changes)")
        } else {
            String::new()
        }
    );
    Some(auto)
}

/// Keeps a watch open while the supervisor runs, forwarding targets.
/// Each time the watch opens, what the guest did before it (a commit made
/// while the guest booted, or while the watch was down) is caught up on.
fn watch_loop(mode: SyncMode, uds: &Path, held: &guest::Held<'_>, tx: &SyncSender<Target>) {
    let stop = held.stop;
    // One try per round (a guest that reboots pays for each refused try).
    let client = guest::single_try_client(uds);
    let paths = vec![GUEST_WORKSPACE.to_string()];
    while !stop.load(Ordering::SeqCst) {
        let Some(events) = held.open(
            |_| RETRY,
            || client.watch(&paths, idle_ms(mode)),
            |w| w.closer(),
        ) else {
            return;
        };
        log::info!(
            "auto-sync: watching {GUEST_WORKSPACE} ({} directories)",
            events.directories()
        );
        if tx.send(Target::CatchUp).is_err() {
            return;
        }
        for event in events {
            match event {
                Ok(ev) => {
                    if let Some(t) = target(mode, &ev) {
                        if tx.send(t).is_err() {
                            return;
                        }
                    }
                }
                Err(e) => {
                    log::info!("auto-sync: the watch ended: {e}");
                    break;
                }
            }
        }
        if !stop.load(Ordering::SeqCst) {
            std::thread::sleep(RETRY);
        }
    }
}

/// Adds `t` to a round, collapsing the round into one catch-up past
/// [`MAX_ROUND`] targets.
fn add_to_round(round: &mut BTreeSet<Target>, t: Target) {
    if round.len() >= MAX_ROUND && !round.contains(&t) {
        round.clear();
        round.insert(Target::CatchUp);
        return;
    }
    round.insert(t);
}

/// Runs syncs one at a time, merging the targets that queued up meanwhile.
fn worker(spec: &SandboxSpec, mode: SyncMode, rx: &Receiver<Target>) {
    let mut reported = round::Reported::default();
    while let Ok(first) = rx.recv() {
        let mut targets = BTreeSet::from([first]);
        // A burst of commits (a rebase, a script) becomes one fetch.
        loop {
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(t) => add_to_round(&mut targets, t),
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
        if let Err(e) = fetch_into(spec, &remote_ns(&spec.name)) {
            let e = printable(e.to_string().as_bytes());
            log::warn!("auto-sync: fetching from the sandbox failed: {e}");
            continue;
        }
        round::sync_round(&spec.project, &spec.name, mode, targets, &mut reported);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_map_to_targets_by_mode() {
        let commit = WatchEvent::Commit {
            branch: "main".into(),
            head: "a".repeat(40),
        };
        assert_eq!(
            target(SyncMode::AutoCommit, &commit),
            Some(Target::Branch("main".into()))
        );
        assert_eq!(target(SyncMode::AutoCommit, &WatchEvent::Idle), None);
        assert_eq!(
            target(SyncMode::AutoIdle, &WatchEvent::Idle),
            Some(Target::HostHead)
        );
        assert_eq!(target(SyncMode::AutoIdle, &commit), None);
        assert_eq!(target(SyncMode::Manual, &commit), None);
        assert_eq!(idle_ms(SyncMode::AutoIdle), 30_000);
        assert_eq!(idle_ms(SyncMode::AutoCommit), 0);
    }
}
