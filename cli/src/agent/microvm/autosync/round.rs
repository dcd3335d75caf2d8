//! One auto-sync round, after the fetch: which branches the round's
//! targets name, and the fast-forward of each that may move (see the
//! parent module's overview for the rules, `sync::branches` for the
//! names). Every line logged here escapes the sandbox's branch names.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use keystone_guest_agent::protocol::printable;

use super::super::super::config::SyncMode;
use super::super::sync::branches::{shown, HostRefs, Refused};
use super::super::sync::content::{ContentError, ContentGit};
use super::super::sync::{decide, git, is_ancestor, remote_ns, rev, short, Decision, GitError};
use super::Target;

/// Outcomes remembered (each logged once per sandbox tip).
const MAX_REPORTED: usize = 1024;

/// What was logged last for each branch that did not move: the sandbox
/// tip it was about.
#[derive(Debug, Default)]
pub struct Reported(HashMap<String, String>);

/// Why a fast-forward did not happen.
#[derive(Debug)]
pub enum NotSynced {
    /// The host branch has commits the sandbox lacks.
    Diverged {
        tip: String,
    },
    /// The host has no such branch, and auto-sync creates none.
    SandboxOnly {
        tip: String,
    },
    /// The name may not be a host branch (the tip, when fetched).
    Refused {
        why: Refused,
        tip: String,
    },
    Failed(FastForwardError),
}

/// Why a fast-forward that may happen failed.
#[derive(Debug, thiserror::Error)]
pub enum FastForwardError {
    /// The fetched sandbox branch is not there.
    #[error("the sandbox has no such branch")]
    NoSuchBranch,
    /// Git could not be readied for the sandbox's content.
    #[error(transparent)]
    Content(#[from] ContentError),
    /// The merge that fast-forwards the host checkout failed.
    #[error("fast-forward failed (the host checkout is left as it was): {0}")]
    Checkout(#[source] GitError),
    /// The compare-and-swap of the branch's ref failed.
    #[error("updating {host_ref}: {source}")]
    Update {
        host_ref: String,
        #[source]
        source: GitError,
    },
}

/// Syncs the branches that `targets` name; `log` writes a line to the
/// supervisor log.
pub fn sync_round(
    project: &Path,
    name: &str,
    mode: SyncMode,
    targets: BTreeSet<Target>,
    reported: &mut Reported,
) {
    let refs = match HostRefs::read(project) {
        Ok(refs) => refs,
        Err(e) => {
            let e = printable(e.to_string().as_bytes());
            log::warn!("auto-sync: cannot read the host's refs: {e}");
            return;
        }
    };
    let current = git(project, &["symbolic-ref", "--quiet", "--short", "HEAD"]).ok();
    let mut branches = BTreeSet::new();
    for t in targets {
        match t {
            Target::Branch(b) => {
                branches.insert(b);
            }
            Target::CatchUp if mode != SyncMode::AutoIdle => {
                branches.extend(shared_branches(project, name, &refs));
            }
            Target::HostHead | Target::CatchUp => match &current {
                Some(head) => {
                    branches.insert(head.clone());
                }
                None => log::info!(
                    "{}",
                    "auto-sync: the host checkout is on a detached HEAD: nothing synced \
                     (run `keystone agent sync --branch B`)",
                ),
            },
        }
    }
    if reported.0.len() > MAX_REPORTED {
        reported.0.clear();
    }
    let at = |b: &str| shown(&format!("{}/{b}", remote_ns(name)));
    for branch in branches {
        let (tip, line) = match fast_forward(project, name, &branch, current.as_deref(), &refs) {
            Ok(Some(line)) => {
                log::info!("auto-sync: {line}");
                continue;
            }
            Ok(None) => continue,
            Err(NotSynced::Failed(e)) => {
                let (b, e) = (shown(&branch), printable(e.to_string().as_bytes()));
                log::info!("auto-sync: {b}: {e}");
                continue;
            }
            Err(NotSynced::Diverged { tip }) => {
                let line = format!(
                    "auto-sync: {} on the host and in the sandbox have diverged; no merge was \
                     made: the sandbox's commits are at {}; run `keystone agent sync {name}` to \
                     merge them",
                    shown(&branch),
                    at(&branch)
                );
                (tip, line)
            }
            Err(NotSynced::SandboxOnly { tip }) => {
                let line = format!(
                    "auto-sync: the sandbox's branch {b} is not on the host, and auto-sync \
                     creates no branch: its commits are at {}; `keystone agent sync {name} \
                     --branch {b}` takes it",
                    at(&branch),
                    b = shown(&branch)
                );
                (tip, line)
            }
            Err(NotSynced::Refused { why, tip }) if tip.is_empty() => {
                let line = format!(
                    "auto-sync: ignored the sandbox's branch {}: {why}",
                    shown(&branch)
                );
                (tip, line)
            }
            Err(NotSynced::Refused { why, tip }) => {
                let line = format!(
                    "auto-sync: the sandbox's branch {} is not synced: {why}; its commits are \
                     at {at}: take them under another name with `git branch NEW {at}`",
                    shown(&branch),
                    at = at(&branch)
                );
                (tip, line)
            }
        };
        if reported.0.get(&branch) != Some(&tip) {
            log::info!("{}", &line);
            reported.0.insert(branch, tip);
        }
    }
}

/// The fetched sandbox branches that the host has too.
fn shared_branches(project: &Path, name: &str, refs: &HostRefs) -> Vec<String> {
    let ns = remote_ns(name);
    let listed = git(
        project,
        &["for-each-ref", "--format=%(refname)", &format!("{ns}/")],
    )
    .unwrap_or_default();
    listed
        .lines()
        .filter_map(|r| r.strip_prefix(&format!("{ns}/")).map(str::to_string))
        .filter(|b| refs.has_branch(b))
        .collect()
}

/// Moves the host's `branch` to the fetched sandbox tip when the name
/// passes the branch rules, the host has the branch (or has it checked
/// out, before its first commit) and it is a fast-forward; `Ok(None)`
/// when it is up to date. `current` is the branch checked out on the
/// host.
pub fn fast_forward(
    project: &Path,
    name: &str,
    branch: &str,
    current: Option<&str>,
    refs: &HostRefs,
) -> Result<Option<String>, NotSynced> {
    let sandbox_ref = format!("{}/{branch}", remote_ns(name));
    if let Err(why) = refs.check(project, branch) {
        let tip = rev(project, &sandbox_ref).unwrap_or_default();
        return Err(NotSynced::Refused { why, tip });
    }
    let Some(tip) = rev(project, &sandbox_ref) else {
        return Err(NotSynced::Failed(FastForwardError::NoSuchBranch));
    };
    let host_ref = format!("refs/heads/{branch}");
    let host_tip = rev(project, &host_ref);
    let checked_out = current == Some(branch);
    if host_tip.is_none() && !checked_out {
        return Err(NotSynced::SandboxOnly { tip });
    }
    let decision = decide(
        host_tip.as_deref(),
        host_tip
            .as_deref()
            .is_some_and(|h| is_ancestor(project, &tip, h)),
        host_tip
            .as_deref()
            .is_some_and(|h| is_ancestor(project, h, &tip)),
    );
    let old = host_tip.clone().unwrap_or_default();
    match decision {
        Decision::UpToDate => return Ok(None),
        Decision::Merge => return Err(NotSynced::Diverged { tip }),
        Decision::FastForward | Decision::Create if checked_out => {
            // --ff-only can never make a merge commit.
            let content =
                ContentGit::new(project, &[&tip]).map_err(|e| NotSynced::Failed(e.into()))?;
            content
                .run(&["merge", "--ff-only", "--quiet", &tip])
                .map_err(|e| NotSynced::Failed(FastForwardError::Checkout(e)))?;
        }
        Decision::FastForward | Decision::Create => {
            // Compare-and-swap: a host commit made meanwhile wins.
            git(project, &["update-ref", &host_ref, &tip, &old]).map_err(|source| {
                NotSynced::Failed(FastForwardError::Update {
                    host_ref: host_ref.clone(),
                    source,
                })
            })?;
        }
    }
    let how = if decision == Decision::Create {
        "first commit"
    } else {
        "fast-forward"
    };
    let range = if old.is_empty() {
        tip.clone()
    } else {
        format!("{old}..{tip}")
    };
    let count = git(project, &["rev-list", "--count", &range]).unwrap_or_default();
    let from = if old.is_empty() {
        "(none)"
    } else {
        short(&old)
    };
    Ok(Some(format!(
        "{}: {from}..{} ({how}; {count} commit(s))",
        shown(branch),
        short(&tip)
    )))
}

#[cfg(test)]
#[path = "round_tests.rs"]
mod tests;
