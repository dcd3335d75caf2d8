//! `sync --artifacts`: after the commits (`sync.rs`), copies the files of
//! the sandbox's `/workspace` that git does not track (build outputs,
//! generated files) to the host, where nothing on the host runs them.
//!
//! The host asks the guest agent for two lists (`git ls-files -z`, tracked,
//! and `git ls-files -z --others`, the candidates, both as the agent user),
//! judges every candidate (`policy.rs`), and sends the paths it wants to
//! `tar --create --format=pax` run in `/workspace` as the agent user over
//! the agent's raw stream. The host parses that stream itself
//! (`tarcheck.rs`): the guest may lie about everything, so every entry is
//! checked again (type, name, size, and that it was asked for). The guest
//! opens no connection to the host; one time limit covers the whole
//! transfer, and every connection is shut down when it passes.
//!
//! Files land (`landing.rs`) in the sandbox's staging folder
//! (`<sandbox folder>/artifacts/`, mirroring the workspace paths), or in
//! place in the project under the paths `[sync] artifacts` lists; always
//! as plain files of mode 0644, never through a symbolic link, never
//! deleting anything. `--dry-run` reads the same stream and writes nothing.

mod landing;
#[cfg(test)]
mod landing_tests;
mod link;
mod policy;
#[cfg(test)]
mod stream_tests;
mod tarcheck;
mod tarheader;
#[cfg(test)]
mod testkit;

use std::collections::HashSet;
use std::io::{self, Read};
use std::path::Path;

use super::super::backend::{BackendError, BackendResult, SandboxSpec, SyncOptions, SyncReport};
use super::super::config;
use super::engine::Layout;
use super::sync::{self, GitError};
use landing::{Landed, Tree};
use link::Link;
use policy::{Dest, Policy, Verdict};
use tarcheck::{check_name, Limits, Refusal, Sink};

/// The staging folder's name in the sandbox's folder.
pub const STAGING: &str = "artifacts";

/// Most refusals reported one by one.
const MAX_REFUSAL_LINES: usize = 100;

/// What moved (or, in a dry run, would move).
#[derive(Debug, Default)]
pub struct Outcome {
    pub staged: Vec<String>,
    pub staged_bytes: u64,
    pub in_place: Vec<String>,
    pub in_place_bytes: u64,
    /// `NAME: why`, at most [`MAX_REFUSAL_LINES`] of them.
    pub refused: Vec<String>,
    pub refused_count: u64,
}

impl Outcome {
    fn changed(&self) -> bool {
        !self.staged.is_empty() || !self.in_place.is_empty()
    }
}

/// The sandbox lists more files to copy than one sync takes.
#[derive(Debug, thiserror::Error)]
#[error("the sandbox has more than {0} files to copy; delete some there first")]
pub struct TooManyFiles(u64);

/// Why an entry of the stream is not taken (the line that refuses it).
#[derive(Debug, thiserror::Error)]
enum NotTaken {
    /// The policy leaves it to move some other way.
    #[error("{0}")]
    Quiet(&'static str),
    /// The policy refuses it.
    #[error("{0}")]
    Refused(String),
    /// The host did not ask for it.
    #[error("not one of the paths asked for")]
    NotAsked,
    /// The stream holds it already.
    #[error("sent twice")]
    SentTwice,
}

/// Takes the checked stream's entries: judges them and lands them.
pub struct Receiver<'a> {
    policy: &'a Policy,
    staging: &'a Tree,
    project: &'a Tree,
    dry_run: bool,
    asked: HashSet<String>,
    seen: HashSet<String>,
    pub outcome: Outcome,
}

impl<'a> Receiver<'a> {
    pub fn new(policy: &'a Policy, staging: &'a Tree, project: &'a Tree, dry_run: bool) -> Self {
        Self {
            policy,
            staging,
            project,
            dry_run,
            asked: HashSet::new(),
            seen: HashSet::new(),
            outcome: Outcome::default(),
        }
    }

    fn refuse(&mut self, name: &[u8], why: impl std::fmt::Display) {
        self.outcome.refused_count += 1;
        if self.outcome.refused.len() < MAX_REFUSAL_LINES {
            self.outcome.refused.push(format!("{}: {why}", shown(name)));
        }
    }

    /// Judges the sandbox's `git ls-files -z --others` output; returns the
    /// paths to ask for (and remembers them: nothing else is taken).
    pub fn ask(&mut self, listing: &[u8], limits: &Limits) -> Result<Vec<String>, TooManyFiles> {
        let mut asked = Vec::new();
        for name in listing.split(|b| *b == 0).filter(|n| !n.is_empty()) {
            // git lists a nested repository as its folder, with a slash.
            let (bare, nested) = match name.strip_suffix(b"/") {
                Some(bare) => (bare, true),
                None => (name, false),
            };
            let path = match check_name(bare, limits.max_path) {
                Ok(path) => path,
                Err(e) => {
                    self.refuse(name, Refusal::Name(e));
                    continue;
                }
            };
            match self.policy.judge(path) {
                Verdict::Take(_) if nested => self.refuse(name, "a nested git repository"),
                Verdict::Take(_) => asked.push(path.to_string()),
                Verdict::Quiet(_) => {}
                Verdict::Refuse(why) => self.refuse(name, why),
            }
            if asked.len() as u64 > limits.max_entries {
                return Err(TooManyFiles(limits.max_entries));
            }
        }
        self.asked = asked.iter().cloned().collect();
        Ok(asked)
    }

    /// Where an entry of the stream goes, or why it does not.
    fn destination(&mut self, path: &str) -> Result<Dest, NotTaken> {
        let dest = match self.policy.judge(path) {
            Verdict::Take(dest) => dest,
            Verdict::Quiet(why) => return Err(NotTaken::Quiet(why)),
            Verdict::Refuse(why) => return Err(NotTaken::Refused(why)),
        };
        if !self.asked.contains(path) {
            return Err(NotTaken::NotAsked);
        }
        if !self.seen.insert(path.to_string()) {
            return Err(NotTaken::SentTwice);
        }
        Ok(dest)
    }

    fn tree(&self, dest: Dest) -> &'a Tree {
        match dest {
            Dest::Staging => self.staging,
            Dest::InPlace => self.project,
        }
    }
}

impl Sink for Receiver<'_> {
    fn file(&mut self, path: &str, size: u64, data: &mut dyn Read) -> io::Result<()> {
        let dest = match self.destination(path) {
            Ok(dest) => dest,
            Err(why) => {
                self.refuse(path.as_bytes(), why);
                return Ok(());
            }
        };
        match self.tree(dest).put_file(path, size, data, self.dry_run)? {
            Landed::Written => {
                let (list, bytes) = match dest {
                    Dest::Staging => (&mut self.outcome.staged, &mut self.outcome.staged_bytes),
                    Dest::InPlace => (&mut self.outcome.in_place, &mut self.outcome.in_place_bytes),
                };
                list.push(path.to_string());
                *bytes += size;
            }
            Landed::Unchanged => {}
            Landed::Refused(why) => self.refuse(path.as_bytes(), why),
        }
        Ok(())
    }

    fn dir(&mut self, path: &str) -> io::Result<()> {
        match self.destination(path) {
            Ok(dest) => {
                if let Landed::Refused(why) = self.tree(dest).put_dir(path, self.dry_run)? {
                    self.refuse(path.as_bytes(), why);
                }
            }
            Err(why) => self.refuse(path.as_bytes(), why),
        }
        Ok(())
    }

    fn refused(&mut self, name: &[u8], why: Refusal) {
        self.refuse(name, why);
    }
}

/// A name from the sandbox as it may be printed: printable ASCII and
/// letters or digits as they are, anything else escaped; at most 300
/// characters.
pub fn shown(name: &[u8]) -> String {
    let mut out = String::new();
    for chunk in name.utf8_chunks() {
        for c in chunk.valid().chars() {
            if c.is_ascii_graphic() || c == ' ' || (!c.is_ascii() && c.is_alphanumeric()) {
                out.push(c);
            } else {
                out.extend(c.escape_unicode());
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    if out.chars().count() > 300 {
        out = out.chars().take(300).collect::<String>() + "...";
    }
    out
}

/// The lines that say what moved and where.
pub fn summary(outcome: &Outcome, staging: &Path, listed: &[String], dry_run: bool) -> Vec<String> {
    let verb = if dry_run { "would be copied" } else { "copied" };
    let mut lines: Vec<String> = outcome
        .refused
        .iter()
        .map(|r| format!("refused artifact {r}"))
        .collect();
    if outcome.refused_count > outcome.refused.len() as u64 {
        lines.push(format!(
            "refused {} more artifact(s)",
            outcome.refused_count - outcome.refused.len() as u64
        ));
    }
    if !outcome.staged.is_empty() || outcome.in_place.is_empty() {
        lines.push(format!(
            "artifacts: {} file(s), {} bytes {verb} to the staging folder {} \
             (nothing on the host runs from there: copy out what you need)",
            outcome.staged.len(),
            outcome.staged_bytes,
            staging.display()
        ));
    }
    if !outcome.in_place.is_empty() {
        lines.push(format!(
            "artifacts: {} file(s), {} bytes {verb} in place under {} ([sync] artifacts)",
            outcome.in_place.len(),
            outcome.in_place_bytes,
            listed.join(", ")
        ));
    }
    if dry_run {
        lines.push("artifacts: dry run, nothing changed".into());
    }
    lines
}

/// The report's per-file lines.
fn moved_paths(outcome: &Outcome) -> Vec<String> {
    let staged = outcome
        .staged
        .iter()
        .map(|p| format!("{} (staged)", shown(p.as_bytes())));
    let in_place = outcome
        .in_place
        .iter()
        .map(|p| format!("{} (in place)", shown(p.as_bytes())));
    staged.chain(in_place).collect()
}

/// `keystone agent sync --artifacts`: the commits, then the artifacts.
/// "Nothing to sync" (exit 2) only when neither has anything.
pub fn sync(spec: &SandboxSpec, opts: &SyncOptions) -> BackendResult<SyncReport> {
    let (mut report, up_to_date) = match sync::sync(spec, opts) {
        Ok(report) => (report, None),
        Err(BackendError::InvalidState(msg)) => (SyncReport::default(), Some(msg)),
        Err(e) => return Err(e),
    };
    let listed = config::load(&config::FlagOverrides::default())
        .map_err(|e| BackendError::NotFound(e.to_string()))?
        .sync_artifacts;
    let mut policy = Policy::new(listed, policy::host_hooks(&spec.project));
    policy.add_tracked(&host_tracked(&spec.project)?);
    let limits = Limits::default();
    let link = Link::open(&Layout::new(&spec.paths).vsock, limits.time);
    policy.add_tracked(&link.git_list(&["ls-files", "-z"])?);
    let listing = link.git_list(&["ls-files", "-z", "--others"])?;

    let host_dir = |path: &Path, e: io::Error| {
        BackendError::Failed(format!("cannot open {}: {e}", path.display()))
    };
    let project = Tree::open(&spec.project).map_err(|e| host_dir(&spec.project, e))?;
    let staging = Tree::open(&spec.paths.dir)
        .and_then(|dir| dir.subtree(STAGING, opts.dry_run))
        .map_err(|e| host_dir(&spec.paths.dir.join(STAGING), e))?;
    let mut receiver = Receiver::new(&policy, &staging, &project, opts.dry_run);
    let asked = receiver
        .ask(&listing, &limits)
        .map_err(|e| BackendError::Failed(e.to_string()))?;
    let copied = match asked.is_empty() {
        true => Ok(Vec::new()),
        false => link.tar(&asked, &limits, &mut receiver),
    };
    link.close();
    let warnings = copied.map_err(|e| {
        let so_far = summary(
            &receiver.outcome,
            staging.path(),
            policy.listed(),
            opts.dry_run,
        );
        BackendError::Failed(format!(
            "copying artifacts from the sandbox: {e}; what was written stays:\n{}",
            so_far.join("\n")
        ))
    })?;
    let outcome = receiver.outcome;
    let lines = summary(&outcome, staging.path(), policy.listed(), opts.dry_run);
    if !outcome.changed() {
        if let Some(msg) = up_to_date {
            let refused: Vec<&String> = lines.iter().filter(|l| l.starts_with("refused")).collect();
            let mut msg = format!("{msg}, and no artifacts differ");
            for line in refused {
                msg.push('\n');
                msg.push_str(line);
            }
            return Err(BackendError::InvalidState(msg));
        }
    }
    report.details.extend(warnings);
    report.details.extend(lines);
    report.artifacts = moved_paths(&outcome);
    Ok(report)
}

/// The paths git tracks in the host project (`git ls-files -z`).
fn host_tracked(project: &Path) -> BackendResult<Vec<u8>> {
    let out = crate::host_git::command()
        .args(["ls-files", "-z"])
        .current_dir(project)
        .output()
        .map_err(|e| BackendError::from(GitError::Spawn(e)))?;
    if !out.status.success() {
        return Err(BackendError::Failed(format!(
            "git ls-files in {} failed: {}",
            project.display(),
            crate::shown::bytes(&out.stderr)
        )));
    }
    Ok(out.stdout)
}
