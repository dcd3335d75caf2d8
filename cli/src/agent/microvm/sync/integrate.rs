//! The step of `keystone agent sync` after the fetch: the fetched
//! `<ns>/<branch>` becomes the host branch's new tip, by fast-forward,
//! merge or (for a branch the user names) creation, under the rules of
//! [`super::branches`] and through [`ContentGit`]. It reads only the host
//! project, so the tests run it on refs set by hand.

use std::path::Path;

use keystone_guest_agent::protocol::printable;

use super::super::super::backend::{BackendError, BackendResult, SyncOptions, SyncReport};
use super::branches::{sandbox_only, shown, HostRefs};
use super::content::ContentGit;
use super::{decide, failed, git, is_ancestor, parse_shortstat, rev, short, Decision};

/// The most sandbox-only branches a report lists.
const MAX_LISTED: usize = 20;
/// The most commits, and conflicting files, a report shows.
const MAX_SHOWN: usize = 200;

/// Git's lines (paths from the sandbox), indented and escaped, at most
/// [`MAX_SHOWN`] of them.
fn listed(lines: &str) -> String {
    let total = lines.lines().count();
    let mut shown: Vec<String> = lines
        .lines()
        .take(MAX_SHOWN)
        .map(|l| format!("  {}", printable(l.as_bytes())))
        .collect();
    if total > MAX_SHOWN {
        shown.push(format!("  ... and {} more", total - MAX_SHOWN));
    }
    shown.join("\n")
}

/// Lines naming the sandbox branches the host lacks, and how to take each
/// (or why it cannot be a host branch under its name).
fn sandbox_only_lines(
    project: &Path,
    name: &str,
    refs: &HostRefs,
    others: &[String],
    dry_run: bool,
) -> Vec<String> {
    others
        .iter()
        .map(|b| {
            let at = if dry_run {
                String::new()
            } else {
                format!(
                    " (fetched at refs/remotes/sandbox-{name}/{})",
                    printable(b.as_bytes())
                )
            };
            match refs.check(project, b) {
                Ok(()) => format!(
                    "the sandbox's branch {} is not on the host{at}: `keystone agent sync \
                     {name} --branch {}` takes it",
                    shown(b),
                    shown(b)
                ),
                Err(why) => format!(
                    "the sandbox's branch {} is not on the host{at}, and cannot be under that \
                     name: {why}",
                    shown(b)
                ),
            }
        })
        .collect()
}

/// The step after the fetch: takes the fetched `<ns>/<branch>` into the
/// host branch (the one checked out, or `opts.branch`). It reads only the
/// host project, so it runs on refs set by hand as well.
pub(in super::super) fn integrate(
    project: &Path,
    name: &str,
    opts: &SyncOptions,
    ns: &str,
) -> BackendResult<SyncReport> {
    let current = git(project, &["symbolic-ref", "--quiet", "--short", "HEAD"]).ok();
    let branch = match (&opts.branch, &current) {
        (Some(b), _) => b.clone(),
        (None, Some(c)) => c.clone(),
        (None, None) => {
            return Err(failed(
                "the host checkout is on a detached HEAD: pass --branch B".into(),
            ))
        }
    };
    let refs = HostRefs::read(project)?;
    let mut others = sandbox_only(project, ns, &refs, MAX_LISTED + 1);
    others.retain(|b| *b != branch);
    others.truncate(MAX_LISTED);
    let notes = sandbox_only_lines(project, name, &refs, &others, opts.dry_run);
    let with_notes = |msg: String| {
        std::iter::once(msg)
            .chain(notes.iter().cloned())
            .collect::<Vec<_>>()
            .join("\n")
    };
    if let Err(why) = refs.check(project, &branch) {
        let fetched = shown(&format!("refs/remotes/sandbox-{name}/{branch}"));
        let kept = if opts.dry_run {
            String::new()
        } else {
            format!(
                "; the sandbox's commits stay at {fetched}: take them under another name \
                 with `git branch NEW {fetched}`"
            )
        };
        return Err(failed(with_notes(format!(
            "the branch {} is not synced: {why}{kept}",
            shown(&branch)
        ))));
    }
    let sandbox_ref = format!("{ns}/{branch}");
    let Some(tip) = rev(project, &sandbox_ref) else {
        return Err(BackendError::NotFound(with_notes(format!(
            "the sandbox has no branch {} (see `keystone agent exec {name} -- git branch`)",
            shown(&branch)
        ))));
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
    if decision == Decision::UpToDate {
        // One line: `sync --artifacts` goes on from it.
        let takeable: Vec<String> = others
            .iter()
            .filter(|b| refs.check(project, b).is_ok())
            .map(|b| shown(b))
            .collect();
        let also = if takeable.is_empty() {
            String::new()
        } else {
            format!(
                " (the sandbox also has {}, which the host lacks: `keystone agent sync {name} \
                 --branch B` takes one)",
                takeable.join(", ")
            )
        };
        return Err(BackendError::InvalidState(format!(
            "nothing to sync: {} already has the sandbox's commits{also}",
            shown(&branch)
        )));
    }
    let content = ContentGit::new(project, &[&tip])?;
    let range = match &host_tip {
        Some(h) => format!("{h}..{tip}"),
        None => tip.clone(),
    };
    let shown_commits = format!("--max-count={MAX_SHOWN}");
    let log = content
        .run(&[
            "log",
            "--oneline",
            "--no-decorate",
            "--no-color",
            &shown_commits,
            &range,
        ])
        .unwrap_or_default();
    let mut commits: Vec<String> = log
        .lines()
        .map(|l| format!("  {}", printable(l.as_bytes())))
        .collect();
    let count: usize = git(project, &["rev-list", "--count", &range])
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(commits.len());
    if count > commits.len() {
        commits.push(format!("  ... and {} more", count - commits.len()));
    }
    let stat = match &host_tip {
        Some(h) => content.run(&[
            "diff",
            "--no-textconv",
            "--no-ext-diff",
            "--shortstat",
            &format!("{h}...{tip}"),
        ]),
        None => content.run(&[
            "show",
            "--no-textconv",
            "--no-ext-diff",
            "--shortstat",
            "--format=",
            &tip,
        ]),
    }
    .unwrap_or_default();
    let (files, ins, del) = parse_shortstat(&stat);
    let how = match decision {
        Decision::Create => "new branch",
        Decision::FastForward => "fast-forward",
        _ => "merge",
    };
    let old = host_tip.as_deref().map(short).unwrap_or("(none)");
    let summary = format!(
        "{}: {old}..{} ({how}; {} commit(s), {files} file(s) changed, {ins} insertion(s), {del} deletion(s))",
        printable(branch.as_bytes()),
        short(&tip),
        count
    );
    let mut report = SyncReport::default();
    report.refs.push(summary);
    report.details = commits;
    report.details.extend(notes.iter().cloned());
    if opts.dry_run {
        return Ok(report);
    }
    let checked_out = current.as_deref() == Some(branch.as_str());
    apply(
        project,
        name,
        &branch,
        &tip,
        host_tip.as_deref(),
        decision,
        checked_out,
        &content,
    )?;
    Ok(report)
}

/// Moves the host branch: through the checkout when it is checked out,
/// by compare-and-swap of the ref otherwise.
#[allow(clippy::too_many_arguments)]
fn apply(
    project: &Path,
    name: &str,
    branch: &str,
    tip: &str,
    host_tip: Option<&str>,
    decision: Decision,
    checked_out: bool,
    content: &ContentGit,
) -> BackendResult<()> {
    let remote_name = shown(&format!("sandbox-{name}/{branch}"));
    let shown_branch = shown(branch);
    match decision {
        Decision::FastForward | Decision::Create if checked_out => {
            content
                .run(&["merge", "--ff-only", "--quiet", tip])
                .map_err(|e| {
                    BackendError::git(format!("fast-forward of {shown_branch} failed"), e)
                })?;
        }
        Decision::Merge if checked_out => {
            let merged = content.run(&["merge", "--no-edit", "--quiet", tip]);
            if let Err(e) = merged {
                let conflicts = content
                    .run(&["diff", "--name-only", "--diff-filter=U"])
                    .unwrap_or_default();
                if conflicts.trim().is_empty() {
                    return Err(BackendError::git(
                        format!("merging {remote_name} failed"),
                        e,
                    ));
                }
                let _ = content.run(&["merge", "--abort"]);
                return Err(BackendError::Conflict(format!(
                    "merging the sandbox's {shown_branch} conflicts in:\n{}\nnothing was changed; \
                     the sandbox's commits are at {remote_name}: resolve by hand with \
                     `git merge {remote_name}`",
                    listed(&conflicts)
                )));
            }
        }
        Decision::Create | Decision::FastForward => {
            let host_ref = format!("refs/heads/{branch}");
            git(
                project,
                &["update-ref", &host_ref, tip, host_tip.unwrap_or_default()],
            )
            .map_err(|e| BackendError::git(format!("updating {shown_branch}"), e))?;
        }
        _ => {
            return Err(BackendError::Conflict(format!(
                "{shown_branch} on the host and in the sandbox have diverged and it is not \
                 checked out: check it out and run `git merge {remote_name}`"
            )))
        }
    }
    Ok(())
}
