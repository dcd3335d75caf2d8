//! `keystone agent worktree`: git worktrees of the guest's workspace,
//! under `/workspace/.worktrees/<branch>`, made and listed by git in the
//! guest; branch names are checked before they reach a path or a command.

use super::super::backend::{BackendError, BackendResult, SandboxSpec, WorktreeInfo, WorktreeOp};
use super::engine::{Layout, GUEST_WORKSPACE};
use super::guest;
use super::sync::GitError;
use crate::shown;

/// The guest directory of a worktree (or the workspace).
pub(super) fn guest_dir(worktree: Option<&str>) -> BackendResult<String> {
    match worktree {
        None => Ok(GUEST_WORKSPACE.to_string()),
        Some(b) => {
            check_branch(b)?;
            Ok(format!("{GUEST_WORKSPACE}/.worktrees/{b}"))
        }
    }
}

fn check_branch(b: &str) -> BackendResult<()> {
    let bad = b.is_empty()
        || b.starts_with('-')
        || b.starts_with('/')
        || b.split('/').any(|c| c.is_empty() || c == "." || c == "..")
        || b.chars()
            .any(|c| c.is_whitespace() || c.is_control() || "~^:?*[\\'\"".contains(c));
    if bad {
        return Err(BackendError::NotFound(format!("invalid branch name {b:?}")));
    }
    Ok(())
}

/// Parses `git worktree list --porcelain`, keeping the worktrees under
/// `/workspace/.worktrees/`; their names and paths are the guest's, kept
/// escaped (`shown::line`).
fn parse_worktrees(porcelain: &str) -> Vec<WorktreeInfo> {
    let prefix = format!("{GUEST_WORKSPACE}/.worktrees/");
    let mut out = Vec::new();
    for block in porcelain.split("\n\n") {
        let mut path = None;
        let mut branch = None;
        for line in block.lines() {
            if let Some(p) = line.strip_prefix("worktree ") {
                path = Some(p.to_string());
            } else if let Some(b) = line.strip_prefix("branch ") {
                branch = Some(b.trim_start_matches("refs/heads/").to_string());
            }
        }
        if let Some(path) = path.filter(|p| p.starts_with(&prefix)) {
            let branch = branch.unwrap_or_else(|| path[prefix.len()..].to_string());
            out.push(WorktreeInfo {
                branch: shown::line(&branch),
                path: shown::line(&path),
            });
        }
    }
    out
}

/// Runs a git command in the guest's workspace as the agent user;
/// returns stdout (the guest's bytes: escape what is shown of it) or how
/// git failed ([`GitError::InSandbox`]). The outer error is the agent's.
pub(super) fn guest_git(
    spec: &SandboxSpec,
    args: &[&str],
) -> BackendResult<Result<String, GitError>> {
    let mut argv = vec!["git".to_string(), "-C".into(), GUEST_WORKSPACE.into()];
    argv.extend(args.iter().map(|s| s.to_string()));
    let client = guest::client(&Layout::new(&spec.paths).vsock);
    let out = client
        .exec_request_output(guest::request(argv, GUEST_WORKSPACE, None))
        .map_err(|e| guest::agent_err("git in the sandbox", e))?;
    Ok(if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).to_string())
    } else {
        Err(GitError::InSandbox {
            args: args.iter().map(|a| a.to_string()).collect(),
            code: out.status.code_or_signal(),
            stderr: out.stderr,
        })
    })
}

pub(super) fn worktree(spec: &SandboxSpec, op: &WorktreeOp) -> BackendResult<Vec<WorktreeInfo>> {
    match op {
        WorktreeOp::Add { branch, create } => {
            check_branch(branch)?;
            let path = format!("{GUEST_WORKSPACE}/.worktrees/{branch}");
            let args: Vec<&str> = if *create {
                vec!["worktree", "add", "-b", branch, &path]
            } else {
                vec!["worktree", "add", &path, branch]
            };
            if let Err(e) = guest_git(spec, &args)? {
                if !create && e.to_string().contains("invalid reference") {
                    return Err(BackendError::NotFound(format!(
                        "the sandbox has no branch {branch}; pass --create to create it"
                    )));
                }
                return Err(BackendError::git("git worktree add", e));
            }
        }
        WorktreeOp::Remove { branch, force } => {
            check_branch(branch)?;
            let path = format!("{GUEST_WORKSPACE}/.worktrees/{branch}");
            let mut args = vec!["worktree", "remove"];
            if *force {
                args.push("--force");
            }
            args.push(&path);
            if let Err(e) = guest_git(spec, &args)? {
                if e.to_string().contains("is not a working tree") {
                    return Err(BackendError::NotFound(format!("no worktree {branch}")));
                }
                return Err(BackendError::git("git worktree remove", e));
            }
        }
        WorktreeOp::List => {}
    }
    let list = guest_git(spec, &["worktree", "list", "--porcelain"])?
        .map_err(|e| BackendError::git("git worktree list", e))?;
    Ok(parse_worktrees(&list))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worktree_porcelain_keeps_sandbox_worktrees() {
        let p = "worktree /workspace\nHEAD abc\nbranch refs/heads/main\n\n\
                 worktree /workspace/.worktrees/feat/x\nHEAD def\nbranch refs/heads/feat/x\n\n\
                 worktree /workspace/.worktrees/det\nHEAD 123\ndetached\n";
        let w = parse_worktrees(p);
        assert_eq!(w.len(), 2);
        assert_eq!(w[0].branch, "feat/x");
        assert_eq!(w[0].path, "/workspace/.worktrees/feat/x");
        assert_eq!(w[1].branch, "det");
    }

    #[test]
    fn branch_names_cannot_escape_the_worktrees_folder() {
        for bad in ["", "../x", "a/../b", "-x", "/abs", "a b", "a'b"] {
            assert!(check_branch(bad).is_err(), "{bad}");
        }
        check_branch("feat/x-1").unwrap();
        assert_eq!(
            guest_dir(Some("feat/x")).unwrap(),
            "/workspace/.worktrees/feat/x"
        );
        assert_eq!(guest_dir(None).unwrap(), "/workspace");
    }

    #[test]
    fn a_failed_git_in_the_sandbox_reads_as_its_escaped_words() {
        let e = GitError::InSandbox {
            args: vec!["worktree".into(), "add".into()],
            code: 128,
            stderr: b"fatal: no\x1b]52;c;\nmore\n".to_vec(),
        };
        let err = BackendError::git("git worktree add", e);
        let text = err.to_string();
        assert_eq!(text, "git worktree add: fatal: no\\u{1b}]52;c;\\nmore");
        assert_eq!(err.exit_code(), crate::exit_code::OPERATION_FAILED);
    }
}
