//! Which sandbox branches may move or become host branches.
//!
//! The sandbox names its branches, and a name is not harmless on the host:
//! a host branch `origin/main` (`refs/heads/origin/main`) is what `git
//! rebase origin/main` then reads, in place of the remote-tracking branch;
//! a branch named like a tag, like `HEAD` or `FETCH_HEAD`, or like a folder
//! of refs (`tags/v1`) changes what other names mean. So a branch moves
//! only when its name passes [`HostRefs::check`] (on every sync, manual or
//! automatic):
//! - `git check-ref-format --branch` accepts it and gives it back unchanged
//!   (`@{-1}` and the like are refused), and it is not `@`, nor `HEAD` or
//!   another all-capitals name ending in `HEAD`;
//! - its first component is not `refs`, `heads`, `tags`, `remotes` or
//!   `notes`;
//! - no tag has its name, no ref `refs/<name>` exists;
//! - it neither is nor starts with (`<remote>/...`) the first component of
//!   a configured remote's name or of a folder under `refs/remotes/` (the
//!   sandbox namespaces `sandbox-<NAME>` among them).
//!
//! And a branch the host lacks is created only by `keystone agent sync`
//! (the user's act: `--branch B`, or the branch checked out on the host);
//! auto-sync never creates one. A sandbox branch that does not move stays
//! fetched at `refs/remotes/sandbox-<NAME>/<branch>`; the messages say how
//! to take it.

use std::collections::BTreeSet;
use std::path::Path;

use keystone_guest_agent::protocol::printable;

use super::{git, GitError};

/// Ref folders a branch name may not start with.
const REF_FOLDERS: [&str; 5] = ["refs", "heads", "tags", "remotes", "notes"];
/// The longest branch name taken from the sandbox, in bytes.
const MAX_BRANCH_NAME: usize = 255;

/// Why a branch name may not be a host branch.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("git does not accept it as a branch name")]
    NotABranchName,
    #[error("it reads as git's own {0}")]
    Reserved(String),
    #[error("it starts with `{0}/`, a folder of git's ref names")]
    RefFolder(String),
    #[error("a tag has that name")]
    Tag,
    #[error("`{0}/...` names the remote-tracking branches of {0}, which it would hide")]
    Remote(String),
    #[error("the ref refs/{0} exists, and git reads it first")]
    Shadowed(String),
}

/// The host refs and remotes a branch name is checked against.
#[derive(Debug, Default)]
pub struct HostRefs {
    refs: BTreeSet<String>,
    remote_roots: BTreeSet<String>,
}

impl HostRefs {
    /// Reads the host project's refs and remotes.
    pub fn read(project: &Path) -> Result<Self, GitError> {
        let refs: BTreeSet<String> = git(project, &["for-each-ref", "--format=%(refname)"])?
            .lines()
            .map(str::to_string)
            .collect();
        let remotes = git(project, &["remote"])?;
        let first = |s: &str| s.split('/').next().unwrap_or(s).to_string();
        let mut remote_roots: BTreeSet<String> = remotes.lines().map(first).collect();
        remote_roots.extend(
            refs.iter()
                .filter_map(|r| r.strip_prefix("refs/remotes/"))
                .map(first),
        );
        remote_roots.remove("");
        Ok(HostRefs { refs, remote_roots })
    }

    /// Whether the host has `refs/heads/<branch>`.
    pub fn has_branch(&self, branch: &str) -> bool {
        self.refs.contains(&format!("refs/heads/{branch}"))
    }

    /// Whether `branch` may be a host branch (see the module overview).
    pub fn check(&self, project: &Path, branch: &str) -> Result<(), Refused> {
        let plain = !branch.is_empty()
            && branch.len() <= MAX_BRANCH_NAME
            && !branch.starts_with('-')
            && !branch.chars().any(char::is_control);
        if !plain {
            return Err(Refused::NotABranchName);
        }
        match git(project, &["check-ref-format", "--branch", branch]) {
            Ok(out) if out == branch => {}
            _ => return Err(Refused::NotABranchName),
        }
        let pseudo =
            branch.bytes().all(|b| b.is_ascii_uppercase() || b == b'_') && branch.ends_with("HEAD");
        if branch == "@" || pseudo {
            return Err(Refused::Reserved(format!("{branch} ref")));
        }
        let root = branch.split('/').next().unwrap_or(branch);
        if REF_FOLDERS.contains(&root) {
            return Err(Refused::RefFolder(root.to_string()));
        }
        if self.refs.contains(&format!("refs/tags/{branch}")) {
            return Err(Refused::Tag);
        }
        if self.remote_roots.contains(root) {
            return Err(Refused::Remote(root.to_string()));
        }
        if self.refs.contains(&format!("refs/{branch}")) {
            return Err(Refused::Shadowed(branch.to_string()));
        }
        Ok(())
    }
}

/// The fetched sandbox branches (under `ns`) that the host lacks, at most
/// `max`, sorted.
pub fn sandbox_only(project: &Path, ns: &str, refs: &HostRefs, max: usize) -> Vec<String> {
    let listed = git(
        project,
        &["for-each-ref", "--format=%(refname)", &format!("{ns}/")],
    )
    .unwrap_or_default();
    listed
        .lines()
        .filter_map(|r| r.strip_prefix(&format!("{ns}/")).map(str::to_string))
        .filter(|b| !refs.has_branch(b))
        .take(max)
        .collect()
}

/// A name from the sandbox as it may be printed: escaped as
/// [`printable`] does, and quoted for a POSIX shell when it holds anything
/// but letters, digits and `._/@+-` (a branch may be named `a;rm -rf ~`,
/// and users paste the commands the messages suggest).
pub fn shown(name: &str) -> String {
    let safe = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._/@+-".contains(&b));
    let quoted = if safe {
        name.to_string()
    } else {
        format!("'{}'", name.replace('\'', r"'\''"))
    };
    printable(quoted.as_bytes())
}
