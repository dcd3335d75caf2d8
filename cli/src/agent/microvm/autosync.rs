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
//! `git update-ref NEW OLD` (compare-and-swap) otherwise, or a new branch
//! when the host has none. Auto modes never create a merge commit: when
//! the host branch has diverged, the sandbox's commits stay fetched at
//! `refs/remotes/sandbox-<NAME>/<branch>` and the log says to run
//! `keystone agent sync` (exit 3 there on a conflict, as usual). Nothing is
//! paused: the next event tries again (the divergence is logged once per
//! sandbox tip). `sync::sync` is not called because its integration
//! merges diverged branches; it shares the fetch and git helpers of `sync`.
//!
//! Every outcome goes to the supervisor log; a failed sync never stops the
//! supervisor. The watch reconnects while the guest runs (boot, reboot); an
//! agent older than protocol 1.1 is reported once and auto-sync stays off.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keystone_guest_agent::client::{WatchCloser, WatchEvent};

use super::super::backend::SandboxSpec;
use super::super::config::SyncMode;
use super::engine::GUEST_WORKSPACE;
use super::guest;
use super::readiness::{Readiness, Service};
use super::sync::{decide, fetch_into, git, is_ancestor, remote_ns, rev, short, Decision};

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
/// Divergences remembered (each logged once per sandbox tip).
const MAX_REPORTED: usize = 1024;

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
pub fn start(
    spec: &SandboxSpec,
    vsock: &Path,
    ready: &Arc<Readiness>,
    log: fn(&str),
) -> Option<AutoSync> {
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
        .spawn(move || worker(&worker_spec, mode, &rx, log));
    if let Err(e) = spawned {
        log(&format!("auto-sync: cannot start its thread: {e}"));
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
                log,
            };
            watch_loop(mode, &uds, &held, &tx)
        });
    if let Err(e) = spawned {
        log(&format!("auto-sync: cannot start its watch thread: {e}"));
        return None;
    }
    log(&format!(
        "auto-sync: mode {mode}{}",
        if mode == SyncMode::AutoIdle {
            format!(" (after {IDLE_SECONDS} s without changes)")
        } else {
            String::new()
        }
    ));
    Some(auto)
}

/// Keeps a watch open while the supervisor runs, forwarding targets.
/// Each time the watch opens, what the guest did before it (a commit made
/// while the guest booted, or while the watch was down) is caught up on.
fn watch_loop(mode: SyncMode, uds: &Path, held: &guest::Held<'_>, tx: &SyncSender<Target>) {
    let (stop, log) = (held.stop, held.log);
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
        log(&format!(
            "auto-sync: watching {GUEST_WORKSPACE} ({} directories)",
            events.directories()
        ));
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
                    log(&format!("auto-sync: the watch ended: {e}"));
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
fn worker(spec: &SandboxSpec, mode: SyncMode, rx: &Receiver<Target>, log: fn(&str)) {
    let mut reported: HashMap<String, String> = HashMap::new();
    while let Ok(first) = rx.recv() {
        let mut round = BTreeSet::from([first]);
        // A burst of commits (a rebase, a script) becomes one fetch.
        loop {
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(t) => add_to_round(&mut round, t),
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
        if let Err(e) = fetch(spec) {
            log(&format!("auto-sync: fetching from the sandbox failed: {e}"));
            continue;
        }
        let mut branches = BTreeSet::new();
        for t in round {
            match t {
                Target::Branch(b) => {
                    branches.insert(b);
                }
                Target::HostHead => branches.extend(host_head(&spec.project, log)),
                Target::CatchUp if mode == SyncMode::AutoIdle => {
                    branches.extend(host_head(&spec.project, log));
                }
                Target::CatchUp => branches.extend(shared_branches(&spec.project, &spec.name)),
            }
        }
        if reported.len() > MAX_REPORTED {
            reported.clear();
        }
        for branch in branches {
            match fast_forward(&spec.project, &spec.name, &branch) {
                Ok(Some(line)) => log(&format!("auto-sync: {line}")),
                Ok(None) => {}
                Err(Diverged { tip }) => {
                    if reported.get(&branch) != Some(&tip) {
                        log(&format!(
                            "auto-sync: {branch} on the host and in the sandbox have diverged; \
                             no merge was made: the sandbox's commits are at \
                             refs/remotes/sandbox-{name}/{branch}; run `keystone agent sync {name}` \
                             to merge them",
                            name = spec.name
                        ));
                        reported.insert(branch, tip);
                    }
                }
                Err(Failed(e)) => log(&format!("auto-sync: {branch}: {e}")),
            }
        }
    }
}

/// The branch checked out on the host, if any.
fn host_head(project: &Path, log: fn(&str)) -> Option<String> {
    let head = git(project, &["symbolic-ref", "--quiet", "--short", "HEAD"]).ok();
    if head.is_none() {
        log(
            "auto-sync: the host checkout is on a detached HEAD: nothing synced \
             (run `keystone agent sync --branch B`)",
        );
    }
    head
}

/// The fetched sandbox branches that the host has too.
fn shared_branches(project: &Path, name: &str) -> Vec<String> {
    let ns = remote_ns(name);
    let listed = git(
        project,
        &["for-each-ref", "--format=%(refname)", &format!("{ns}/")],
    )
    .unwrap_or_default();
    listed
        .lines()
        .filter_map(|r| r.strip_prefix(&format!("{ns}/")).map(str::to_string))
        .filter(|b| rev(project, &format!("refs/heads/{b}")).is_some())
        .collect()
}

/// Why a fast-forward did not happen.
#[derive(Debug)]
enum NotSynced {
    /// The host branch has commits the sandbox lacks.
    Diverged {
        tip: String,
    },
    Failed(String),
}
use NotSynced::{Diverged, Failed};

/// Runs git in `dir` (the host project; never prompts):
/// `Ok(stdout)` or `Err(stderr)`.
/// The fetch of `keystone agent sync`: every sandbox branch into
/// `refs/remotes/sandbox-<NAME>/`.
fn fetch(spec: &SandboxSpec) -> Result<(), String> {
    fetch_into(spec, &remote_ns(&spec.name))
}

/// Moves the host's `branch` to the fetched sandbox tip when that is a
/// fast-forward (or a new branch); `Ok(None)` when it is up to date.
fn fast_forward(project: &Path, name: &str, branch: &str) -> Result<Option<String>, NotSynced> {
    let sandbox_ref = format!("{}/{branch}", remote_ns(name));
    let Some(tip) = rev(project, &sandbox_ref) else {
        return Err(Failed(format!("the sandbox has no branch {branch}")));
    };
    let host_ref = format!("refs/heads/{branch}");
    let host_tip = rev(project, &host_ref);
    let decision = decide(
        host_tip.as_deref(),
        host_tip
            .as_deref()
            .is_some_and(|h| is_ancestor(project, &tip, h)),
        host_tip
            .as_deref()
            .is_some_and(|h| is_ancestor(project, h, &tip)),
    );
    let current = git(project, &["symbolic-ref", "--quiet", "--short", "HEAD"]).ok();
    let old = host_tip.clone().unwrap_or_default();
    match decision {
        Decision::UpToDate => return Ok(None),
        Decision::Merge => return Err(Diverged { tip }),
        Decision::FastForward if current.as_deref() == Some(branch) => {
            // --ff-only can never make a merge commit.
            git(project, &["merge", "--ff-only", "--quiet", &tip]).map_err(|e| {
                Failed(format!(
                    "fast-forward failed (the host checkout is left as it was): {e}"
                ))
            })?;
        }
        Decision::FastForward | Decision::Create => {
            // Compare-and-swap: a host commit made meanwhile wins.
            git(project, &["update-ref", &host_ref, &tip, &old])
                .map_err(|e| Failed(format!("updating {host_ref}: {e}")))?;
        }
    }
    let how = if decision == Decision::Create {
        "new branch"
    } else {
        "fast-forward"
    };
    let count = git(
        project,
        &[
            "rev-list",
            "--count",
            &if old.is_empty() {
                tip.clone()
            } else {
                format!("{old}..{tip}")
            },
        ],
    )
    .unwrap_or_default();
    Ok(Some(format!(
        "{branch}: {}..{} ({how}; {count} commit(s))",
        if old.is_empty() {
            "(none)"
        } else {
            short(&old)
        },
        short(&tip)
    )))
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

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

    fn g(dir: &Path, args: &[&str]) -> String {
        let mut all = vec!["-c", "user.name=t", "-c", "user.email=t@t"];
        all.extend_from_slice(args);
        git(dir, &all).unwrap()
    }

    fn commit(dir: &Path, file: &str) -> String {
        std::fs::write(dir.join(file), file).unwrap();
        g(dir, &["add", file]);
        g(dir, &["commit", "-qm", file]);
        g(dir, &["rev-parse", "HEAD"])
    }

    /// A host repository on `main` with the "fetched" sandbox ref
    /// `refs/remotes/sandbox-s/<b>` set by hand for each case.
    fn host_repo(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ks-autosync-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        g(&dir, &["init", "-q", "-b", "main"]);
        commit(&dir, "a");
        dir
    }

    fn set_sandbox(dir: &Path, branch: &str, id: &str) {
        g(
            dir,
            &[
                "update-ref",
                &format!("refs/remotes/sandbox-s/{branch}"),
                id,
            ],
        );
    }

    #[test]
    fn only_fast_forwards_and_new_branches_move_the_host() {
        let dir = host_repo("ff");
        let base = g(&dir, &["rev-parse", "HEAD"]);
        // The sandbox is one commit ahead on main (checked out here).
        let ahead = commit(&dir, "b");
        g(&dir, &["reset", "-q", "--hard", &base]);
        set_sandbox(&dir, "main", &ahead);
        let line = fast_forward(&dir, "s", "main").unwrap().unwrap();
        assert!(line.contains("fast-forward; 1 commit(s)"), "{line}");
        assert_eq!(g(&dir, &["rev-parse", "HEAD"]), ahead);
        assert!(dir.join("b").exists(), "the checkout moved along");
        assert!(fast_forward(&dir, "s", "main").unwrap().is_none());

        // A branch the host lacks is created; one not checked out moves.
        set_sandbox(&dir, "feat", &base);
        let line = fast_forward(&dir, "s", "feat").unwrap().unwrap();
        assert!(line.contains("new branch"), "{line}");
        set_sandbox(&dir, "feat", &ahead);
        fast_forward(&dir, "s", "feat").unwrap().unwrap();
        assert_eq!(g(&dir, &["rev-parse", "feat"]), ahead);

        // Diverged: nothing moves, no merge commit.
        let host = commit(&dir, "h");
        g(&dir, &["checkout", "-q", "-b", "side", &ahead]);
        let sandbox = commit(&dir, "s");
        g(&dir, &["checkout", "-q", "main"]);
        set_sandbox(&dir, "main", &sandbox);
        let err = fast_forward(&dir, "s", "main").unwrap_err();
        assert!(
            matches!(err, Diverged { ref tip } if *tip == sandbox),
            "{err:?}"
        );
        assert_eq!(g(&dir, &["rev-parse", "HEAD"]), host);
        assert_eq!(g(&dir, &["log", "--merges", "--oneline"]), "");
        assert!(matches!(fast_forward(&dir, "s", "nope"), Err(Failed(_))));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
