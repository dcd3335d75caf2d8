//! `sync`: a host-initiated `git fetch` from the guest's `git upload-pack
//! /workspace`, carried over the agent's raw stream by git's `ext::`
//! transport (`keystone agent __git-upload-pack NAME` is the command git
//! runs), then a fast-forward or merge of the host branch.
//!
//! The host never runs hooks or reads config from the sandbox repository:
//! `git fetch` only reads the pack the guest sends.
//!
//! `--dry-run` fetches into a temporary ref namespace
//! (`refs/keystone-dry-run/<NAME>/`) that is deleted before returning: no
//! branch, remote-tracking ref or working tree changes, though the fetched
//! objects stay in the object store (git's gc removes them).

use std::path::Path;
use std::process::Command;

use keystone_guest_agent::protocol::{RawStreamRequest, UserSpec};

use super::super::backend::{BackendError, BackendResult, SandboxSpec, SyncOptions, SyncReport};
use super::engine::{Layout, GUEST_USER, GUEST_WORKSPACE};
use super::guest;

#[cfg(test)]
pub(super) mod testrepo;

/// What to do with the host branch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// The host already has the sandbox's tip.
    UpToDate,
    /// The host has no such branch: create it at the sandbox's tip.
    Create,
    FastForward,
    Merge,
}

/// The decision from the ancestry of the two tips.
pub fn decide(host_tip: Option<&str>, sandbox_in_host: bool, host_in_sandbox: bool) -> Decision {
    match host_tip {
        None => Decision::Create,
        Some(_) if sandbox_in_host => Decision::UpToDate,
        Some(_) if host_in_sandbox => Decision::FastForward,
        Some(_) => Decision::Merge,
    }
}

/// Escapes a word for git's `ext::` command syntax.
pub fn ext_escape(word: &str) -> String {
    word.replace('%', "%%").replace(' ', "% ")
}

/// Runs git in `dir`; `Ok(stdout)` on success, `Err(stderr)` otherwise.
pub(super) fn git(dir: &Path, args: &[&str]) -> Result<String, String> {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        // Never ask for credentials: nothing here talks to a remote but the sandbox.
        .env("GIT_TERMINAL_PROMPT", "0")
        .output()
        .map_err(|e| format!("cannot run git: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim_end().to_string())
    } else {
        let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
        Err(if err.is_empty() {
            format!("git {} failed ({})", args.join(" "), out.status)
        } else {
            err
        })
    }
}

fn failed(e: String) -> BackendError {
    BackendError::Failed(e)
}

pub(super) fn rev(dir: &Path, name: &str) -> Option<String> {
    git(
        dir,
        &[
            "rev-parse",
            "--verify",
            "--quiet",
            &format!("{name}^{{commit}}"),
        ],
    )
    .ok()
    .filter(|s| !s.is_empty())
}

pub(super) fn is_ancestor(dir: &Path, a: &str, b: &str) -> bool {
    git(dir, &["merge-base", "--is-ancestor", a, b]).is_ok()
}

pub(super) fn short(s: &str) -> &str {
    &s[..s.len().min(9)]
}

/// Parses `git diff --shortstat` (" 2 files changed, 3 insertions(+), 1
/// deletion(-)") into (files, insertions, deletions).
pub fn parse_shortstat(s: &str) -> (u64, u64, u64) {
    let mut r = (0, 0, 0);
    for part in s.split(',') {
        let mut words = part.split_whitespace();
        let Some(n) = words.next().and_then(|w| w.parse::<u64>().ok()) else {
            continue;
        };
        match words.next() {
            Some(w) if w.starts_with("file") => r.0 = n,
            Some(w) if w.starts_with("insertion") => r.1 = n,
            Some(w) if w.starts_with("deletion") => r.2 = n,
            _ => {}
        }
    }
    r
}

/// The sandbox's namespace of fetched branches on the host.
pub(super) fn remote_ns(name: &str) -> String {
    format!("refs/remotes/sandbox-{name}")
}

/// Host `git fetch` of every sandbox branch into `<ns>/*`, through the
/// guest's `git upload-pack` (git's `ext::` transport runs this binary's
/// `agent __git-upload-pack NAME`). Runs no hook or config of the sandbox
/// repository.
pub(super) fn fetch_into(spec: &SandboxSpec, ns: &str) -> Result<(), String> {
    let exe =
        std::env::current_exe().map_err(|e| format!("cannot find the keystone binary: {e}"))?;
    let url = format!(
        "ext::{} agent __git-upload-pack {}",
        ext_escape(&exe.display().to_string()),
        ext_escape(&spec.name)
    );
    let refspec = format!("+refs/heads/*:{ns}/*");
    git(
        &spec.project,
        &[
            "-c",
            "protocol.ext.allow=always",
            "fetch",
            "--quiet",
            "--no-tags",
            "--no-write-fetch-head",
            &url,
            &refspec,
        ],
    )
    .map(|_| ())
}

/// `keystone agent sync`.
pub fn sync(spec: &SandboxSpec, opts: &SyncOptions) -> BackendResult<SyncReport> {
    let project = &spec.project;
    let name = &spec.name;
    let ns = if opts.dry_run {
        format!("refs/keystone-dry-run/{name}")
    } else {
        remote_ns(name)
    };
    let fetched = fetch_into(spec, &ns);
    let result = fetched
        .map_err(|e| failed(format!("fetching from the sandbox failed: {e}")))
        .and_then(|_| integrate(spec, opts, &ns));
    if opts.dry_run {
        if let Ok(refs) = git(project, &["for-each-ref", "--format=%(refname)", &ns]) {
            for r in refs.lines().filter(|l| !l.is_empty()) {
                let _ = git(project, &["update-ref", "-d", r]);
            }
        }
    }
    result
}

fn integrate(spec: &SandboxSpec, opts: &SyncOptions, ns: &str) -> BackendResult<SyncReport> {
    let project = &spec.project;
    let name = &spec.name;
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
    let sandbox_ref = format!("{ns}/{branch}");
    let Some(tip) = rev(project, &sandbox_ref) else {
        return Err(BackendError::NotFound(format!(
            "the sandbox has no branch {branch} (see `keystone agent exec {name} -- git branch`)"
        )));
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
        return Err(BackendError::InvalidState(format!(
            "nothing to sync: {branch} already has the sandbox's commits"
        )));
    }
    let range = match &host_tip {
        Some(h) => format!("{h}..{tip}"),
        None => tip.clone(),
    };
    let log = git(project, &["log", "--oneline", "--no-decorate", &range]).unwrap_or_default();
    let commits: Vec<String> = log.lines().map(str::to_string).collect();
    let stat = match &host_tip {
        Some(h) => git(project, &["diff", "--shortstat", &format!("{h}...{tip}")]),
        None => git(project, &["show", "--shortstat", "--format=", &tip]),
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
        "{branch}: {old}..{} ({how}; {} commit(s), {files} file(s) changed, {ins} insertion(s), {del} deletion(s))",
        short(&tip),
        commits.len()
    );
    let mut report = SyncReport::default();
    report.refs.push(summary);
    report.details = commits.iter().map(|c| format!("  {c}")).collect();
    if opts.dry_run {
        return Ok(report);
    }
    let remote_name = format!("sandbox-{name}/{branch}");
    if current.as_deref() == Some(branch.as_str()) {
        match decision {
            Decision::FastForward | Decision::Create => {
                git(project, &["merge", "--ff-only", "--quiet", &sandbox_ref])
                    .map_err(|e| failed(format!("fast-forward of {branch} failed: {e}")))?;
            }
            _ => {
                if let Err(e) = git(project, &["merge", "--no-edit", "--quiet", &sandbox_ref]) {
                    let conflicts = git(project, &["diff", "--name-only", "--diff-filter=U"])
                        .unwrap_or_default();
                    if conflicts.trim().is_empty() {
                        return Err(failed(format!("merging {remote_name} failed: {e}")));
                    }
                    let _ = git(project, &["merge", "--abort"]);
                    return Err(BackendError::Conflict(format!(
                        "merging the sandbox's {branch} conflicts in:\n{}\nnothing was changed; \
                         the sandbox's commits are at {remote_name}: resolve by hand with \
                         `git merge {remote_name}`",
                        conflicts
                            .lines()
                            .map(|l| format!("  {l}"))
                            .collect::<Vec<_>>()
                            .join("\n")
                    )));
                }
            }
        }
    } else {
        match decision {
            Decision::Create | Decision::FastForward => {
                let old = host_tip.clone().unwrap_or_default();
                git(project, &["update-ref", &host_ref, &tip, &old])
                    .map_err(|e| failed(format!("updating {branch}: {e}")))?;
            }
            _ => {
                return Err(BackendError::Conflict(format!(
                    "{branch} on the host and in the sandbox have diverged and {branch} is not \
                     checked out: check it out and run `git merge {remote_name}`"
                )))
            }
        }
    }
    Ok(report)
}

/// `keystone agent __git-upload-pack NAME`: git's `ext::` command. Pipes
/// stdin/stdout to `git upload-pack /workspace` in the guest.
pub fn upload_pack(spec: &SandboxSpec) -> BackendResult<i32> {
    let mut env = Vec::new();
    if let Ok(p) = std::env::var("GIT_PROTOCOL") {
        env.push(("GIT_PROTOCOL".to_string(), p));
    }
    let request = RawStreamRequest {
        argv: vec!["git".into(), "upload-pack".into(), GUEST_WORKSPACE.into()],
        cwd: Some(GUEST_WORKSPACE.into()),
        env,
        user: Some(UserSpec::Name(GUEST_USER.into())),
    };
    guest::pipe_stdio(
        &Layout::new(&spec.paths).vsock,
        request,
        "git upload-pack in the sandbox",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions_follow_ancestry() {
        assert_eq!(decide(None, false, false), Decision::Create);
        assert_eq!(decide(Some("h"), true, false), Decision::UpToDate);
        assert_eq!(decide(Some("h"), true, true), Decision::UpToDate);
        assert_eq!(decide(Some("h"), false, true), Decision::FastForward);
        assert_eq!(decide(Some("h"), false, false), Decision::Merge);
    }

    #[test]
    fn shortstat_parses_every_form() {
        assert_eq!(
            parse_shortstat(" 2 files changed, 3 insertions(+), 1 deletion(-)"),
            (2, 3, 1)
        );
        assert_eq!(
            parse_shortstat(" 1 file changed, 1 insertion(+)"),
            (1, 1, 0)
        );
        assert_eq!(
            parse_shortstat(" 1 file changed, 4 deletions(-)"),
            (1, 0, 4)
        );
        assert_eq!(parse_shortstat(""), (0, 0, 0));
    }

    #[test]
    fn ext_words_are_escaped() {
        assert_eq!(ext_escape("/a b/k%s"), "/a% b/k%%s");
    }
}
