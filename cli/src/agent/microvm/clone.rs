//! The sandbox-private clone of the host project, made on the host before
//! the first boot (and after `start --fresh`) and shared into the guest at
//! `/workspace`.
//!
//! Security invariant 3: no host credential or unreachable git object
//! enters the VM. The clone is a pack transfer (`git clone --no-local`),
//! so it holds only the objects reachable from the refs the sandbox is
//! meant to see:
//! - every local branch (as `refs/remotes/origin/<branch>`, the one checked
//!   out on the host also as a local branch), every tag, and the commit
//!   checked out on the host (`HEAD`, detached or not);
//! - not `refs/stash` (a stash holds what the user chose not to commit,
//!   `.env.local` and the like), not `refs/notes/*`, not the host's
//!   remote-tracking branches (`refs/remotes/*`: other people's work, and
//!   what the user fetched but never took), not the reflogs, and no object
//!   that no shared ref reaches (a commit reset away, a dangling blob).
//!
//! A local clone (`git clone <path>`, even with `--no-hardlinks`) copies
//! `objects/` whole, which is why it is not used.
//!
//! Nothing of the host's `.git/config` is copied (`git clone` never copies
//! the source's config, and no `--template` is used, so no hook or
//! `info/` file of the user's template directory either). The clone's
//! `origin` points at [`SANDBOX_ORIGIN`], a path that exists nowhere (not
//! even a root guest can create a directory under `/dev/null`): the guest
//! cannot fetch from or push to the host anyway (commits leave through
//! `keystone agent sync`, run on the host), so `origin` is kept only for its
//! remote-tracking branches (`git diff origin/main`, `git switch feature`).
//! The clone's reflogs, which would name the host path, are removed. The
//! clone's own hooks are off while it is made (`core.hooksPath=/dev/null`):
//! nothing runs on the host for it.

use std::ffi::OsStr;
use std::path::Path;
use std::process::Command;

use super::super::backend::{BackendError, BackendResult, SandboxSpec};
use super::engine::{Layout, GUEST_UID};

/// The `origin` URL of every sandbox clone.
pub const SANDBOX_ORIGIN: &str = "/dev/null/keystone-host";

/// Why the private clone could not be made.
#[derive(Debug, thiserror::Error)]
pub enum CloneError {
    #[error("cannot run git ({0}); is git installed and on PATH?")]
    Spawn(std::io::Error),
    #[error("git {step} failed: {stderr}")]
    Git { step: &'static str, stderr: String },
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
}

fn io_failed(what: &str, e: std::io::Error) -> BackendError {
    BackendError::io(what, e)
}

/// Makes the sandbox-private clone at the layout's workspace (first start,
/// or after `--fresh`); a workspace that already has `.git` is kept.
pub fn ensure_clone(
    spec: &SandboxSpec,
    layout: &Layout,
    progress: &mut dyn FnMut(&str),
) -> BackendResult<()> {
    if layout.workspace.join(".git").exists() {
        return Ok(());
    }
    if layout.workspace.exists() {
        // What the guest left there: any depth, names and modes.
        crate::agent::fsutil::remove_tree(&layout.workspace)
            .map_err(|e| io_failed(&layout.workspace.display().to_string(), e))?;
    }
    progress(&format!(
        "cloning {} into the sandbox (a private clone of its branches and tags; the host \
         checkout is never shared)",
        spec.project.display()
    ));
    private_clone(&spec.project, &layout.workspace).map_err(|e| {
        BackendError::Failed(format!(
            "the sandbox's clone of {} failed: {e}",
            spec.project.display()
        ))
    })?;
    // The guest user (uid 1000) must own its workspace. Root gives it
    // the files; otherwise the workspace daemon's ID map shows this
    // user's files as the guest user's (`share_config`).
    if rustix::process::geteuid().is_root() {
        let owner = format!("{GUEST_UID}:{GUEST_UID}");
        let ok = Command::new("chown")
            .args(["-R", &owner])
            .arg(&layout.workspace)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            return Err(BackendError::Failed(format!(
                "cannot give {} to the guest user ({owner})",
                layout.workspace.display()
            )));
        }
    }
    Ok(())
}

/// Runs git for the clone: no prompt, no hook.
fn run_git<S: AsRef<OsStr>>(
    dir: Option<&Path>,
    step: &'static str,
    args: &[S],
) -> Result<(), CloneError> {
    let mut cmd = crate::host_git::command();
    cmd.args(["-c", "core.hooksPath=/dev/null"])
        .args(args)
        .env("GIT_TERMINAL_PROMPT", "0");
    if let Some(dir) = dir {
        cmd.current_dir(dir);
    }
    let out = cmd.output().map_err(CloneError::Spawn)?;
    if out.status.success() {
        return Ok(());
    }
    Err(CloneError::Git {
        step,
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
    })
}

/// Clones `project` into `workspace` (which must not exist, or be empty)
/// holding only what the shared refs reach (see the module overview).
pub fn private_clone(project: &Path, workspace: &Path) -> Result<(), CloneError> {
    let clone = [
        OsStr::new("-c"),
        OsStr::new("init.defaultBranch=main"),
        OsStr::new("clone"),
        OsStr::new("--quiet"),
        OsStr::new("--no-local"),
        OsStr::new("--template="),
        OsStr::new("--origin"),
        OsStr::new("origin"),
        OsStr::new("--"),
        project.as_os_str(),
        workspace.as_os_str(),
    ];
    run_git(None, "clone", &clone)?;
    run_git(
        Some(workspace),
        "remote set-url",
        &["remote", "set-url", "origin", SANDBOX_ORIGIN],
    )?;
    let logs = workspace.join(".git/logs");
    if logs.exists() {
        std::fs::remove_dir_all(&logs).map_err(|source| CloneError::Write {
            path: logs.display().to_string(),
            source,
        })?;
    }
    let info = workspace.join(".git/info");
    let exclude = info.join("exclude");
    std::fs::create_dir_all(&info)
        .and_then(|()| {
            std::fs::write(
                &exclude,
                "# keystone: worktrees of the sandbox\n/.worktrees/\n",
            )
        })
        .map_err(|source| CloneError::Write {
            path: exclude.display().to_string(),
            source,
        })
}

#[cfg(test)]
#[path = "clone_tests.rs"]
mod tests;
