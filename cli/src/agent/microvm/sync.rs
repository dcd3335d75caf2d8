//! `sync`: a host-initiated `git fetch` from the guest's `git upload-pack
//! /workspace`, carried over the agent's raw stream by git's `ext::`
//! transport (`keystone agent __git-upload-pack NAME` is the command git
//! runs), then a fast-forward or merge of the host branch.
//!
//! The host never runs hooks or reads config from the sandbox repository:
//! `git fetch` only reads the pack the guest sends (checked as it arrives,
//! `fetch.fsckObjects`, and never recursing into submodules). Every git
//! command here runs with hooks off ([`HOST_GIT_CONFIG`]), and those that
//! read the sandbox's trees (merge, checkout, log, diff) run through
//! [`content::ContentGit`], with no filter, merge driver or textconv and
//! the host's own attributes (see there).
//!
//! Which host branch moves is [`branches`]' business: the branch checked
//! out, or the one `--branch` names (created when the host lacks it), and
//! only under a name that cannot pass for a tag, a remote-tracking branch
//! or a git ref. The sandbox's other branches stay fetched at
//! `refs/remotes/sandbox-<NAME>/`, and the report lists those the host
//! lacks with the command that takes each. Names and commit subjects from
//! the sandbox are printed escaped.
//!
//! `--dry-run` fetches into a temporary ref namespace
//! (`refs/keystone-dry-run/<NAME>/`) that is deleted before returning: no
//! branch, remote-tracking ref or working tree changes, though the fetched
//! objects stay in the object store (git's gc removes them).

use std::path::Path;

use keystone_guest_agent::protocol::{printable, RawStreamRequest, UserSpec};

use super::super::backend::{BackendError, BackendResult, SandboxSpec, SyncOptions, SyncReport};
use super::engine::{Layout, GUEST_USER, GUEST_WORKSPACE};
use super::guest;

/// What a fetch takes from the sandbox at the most: the bytes of one
/// fetch, and how long the sandbox's git may stay silent (counting objects
/// in a large repository takes a while before the pack flows).
const FETCH_LIMITS: guest::PipeLimits = guest::PipeLimits {
    max_bytes: 8 << 30,
    idle: std::time::Duration::from_secs(600),
};

pub(super) mod branches;
pub(super) mod content;
mod integrate;
#[cfg(test)]
mod integrate_tests;
#[cfg(test)]
pub(super) mod testrepo;

pub(super) use integrate::integrate;

/// Settings of every git command that sync and auto-sync run in the host
/// project: no hook runs (see [`content`] for why), no fsmonitor starts.
pub(super) const HOST_GIT_CONFIG: [&str; 2] = ["core.hooksPath=/dev/null", "core.fsmonitor=false"];

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

/// A git command that did not succeed: on the host (sync's), or in the
/// sandbox (the worktree commands'). Its text is what the user reads:
/// git's own words, escaped, or on the host the command and its exit
/// status when git said nothing.
#[derive(Debug, thiserror::Error)]
pub enum GitError {
    /// git could not be started.
    #[error("cannot run git: {0}")]
    Spawn(#[source] std::io::Error),
    /// git ran and exited with a failure.
    #[error("{}", exited_text(.args, .status, .stderr))]
    Exited {
        /// The arguments after the settings of [`HOST_GIT_CONFIG`].
        args: Vec<String>,
        status: std::process::ExitStatus,
        /// git's standard error, trimmed, as it wrote it.
        stderr: String,
    },
    /// git in the sandbox ran and exited with a failure; its words are
    /// the guest's, shown as one escaped line.
    #[error("{}", crate::shown::bytes(.stderr))]
    InSandbox {
        args: Vec<String>,
        /// The exit code, or 128 + the signal.
        code: i32,
        stderr: Vec<u8>,
    },
}

/// The text of [`GitError::Exited`].
fn exited_text(args: &[String], status: &std::process::ExitStatus, stderr: &str) -> String {
    if stderr.is_empty() {
        said(&format!("git {} failed ({status})", args.join(" ")))
    } else {
        said(stderr)
    }
}

/// Runs git in `dir` with [`HOST_GIT_CONFIG`]; its trimmed stdout.
pub(super) fn git(dir: &Path, args: &[&str]) -> Result<String, GitError> {
    git_env(dir, args, &[])
}

/// [`git`] with more environment.
fn git_env(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Result<String, GitError> {
    let out = crate::host_git::command()
        .args(HOST_GIT_CONFIG.iter().flat_map(|c| ["-c", c]))
        .args(args)
        .current_dir(dir)
        // Never ask for credentials: nothing here talks to a remote but the sandbox.
        .env("GIT_TERMINAL_PROMPT", "0")
        .envs(env.iter().copied())
        .output()
        .map_err(GitError::Spawn)?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim_end().to_string())
    } else {
        Err(GitError::Exited {
            args: args.iter().map(|a| a.to_string()).collect(),
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Why [`fetch_into`] fetched nothing.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The path of this binary, which git's `ext::` transport runs, is
    /// unknown.
    #[error("cannot find the keystone binary: {0}")]
    Exe(#[source] std::io::Error),
    /// The fetch failed.
    #[error(transparent)]
    Git(#[from] GitError),
}

impl FetchError {
    /// As the error of the command that fetched.
    fn into_backend(self) -> BackendError {
        const WHAT: &str = "fetching from the sandbox failed";
        match self {
            FetchError::Exe(e) => {
                BackendError::io(format!("{WHAT}: cannot find the keystone binary"), e)
            }
            FetchError::Git(e) => BackendError::git(WHAT, e),
        }
    }
}

fn failed(e: String) -> BackendError {
    BackendError::Failed(e)
}

/// Git's words, which may quote the sandbox's paths and subjects, as
/// they may be printed.
fn said(e: &str) -> String {
    e.lines()
        .map(|l| printable(l.as_bytes()))
        .collect::<Vec<_>>()
        .join("\n")
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
/// repository; the objects are checked as they arrive and no submodule is
/// fetched.
pub(super) fn fetch_into(spec: &SandboxSpec, ns: &str) -> Result<(), FetchError> {
    let exe = std::env::current_exe().map_err(FetchError::Exe)?;
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
            "-c",
            "fetch.fsckObjects=true",
            "fetch",
            "--quiet",
            "--no-tags",
            "--no-write-fetch-head",
            "--no-recurse-submodules",
            &url,
            &refspec,
        ],
    )?;
    Ok(())
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
        .map_err(FetchError::into_backend)
        .and_then(|_| integrate(project, name, opts, &ns));
    if opts.dry_run {
        if let Ok(refs) = git(project, &["for-each-ref", "--format=%(refname)", &ns]) {
            for r in refs.lines().filter(|l| !l.is_empty()) {
                let _ = git(project, &["update-ref", "-d", r]);
            }
        }
    }
    result
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
        Some(FETCH_LIMITS),
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

    #[test]
    fn git_failures_read_as_git_said_them_and_keep_their_cause() {
        let repo = testrepo::TempRepo::new("git-error", true);
        let err = git(&repo.dir, &["cat-file", "-t", "nope\u{1b}[31m"]).unwrap_err();
        let text = err.to_string();
        assert!(text.starts_with("fatal: "), "{text}");
        assert!(!text.contains('\u{1b}'), "{text:?}");

        let err = git(&repo.dir, &["rev-parse", "--verify", "--quiet", "nope"]).unwrap_err();
        assert!(
            matches!(&err, GitError::Exited { stderr, .. } if stderr.is_empty()),
            "{err:?}"
        );
        let text = err.to_string();
        assert!(
            text.starts_with("git rev-parse --verify --quiet nope failed ("),
            "{text}"
        );
        let backend = BackendError::git("updating main", err);
        assert_eq!(backend.to_string(), format!("updating main: {text}"));
        assert_eq!(backend.exit_code(), crate::exit_code::OPERATION_FAILED);
        let cause = std::error::Error::source(&backend);
        assert!(cause.is_some_and(|c| c.is::<GitError>()), "{cause:?}");
        assert_eq!(
            BackendError::from(GitError::Spawn(std::io::Error::other("x"))).to_string(),
            "cannot run git: x"
        );
    }
}
