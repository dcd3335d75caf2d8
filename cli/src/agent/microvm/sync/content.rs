//! Host git over content that came from the sandbox: the merge, the
//! fast-forward's checkout, the abort of a failed merge and the log and
//! diff that sync prints.
//!
//! SECURITY (invariant 5: nothing from the sandbox runs on the host). The
//! sandbox writes the trees these commands read, `.gitattributes`
//! included, and `.gitattributes` picks which configured program git runs
//! on a file: a filter's `smudge`, `clean` or `process` (git-lfs's
//! `filter.lfs.*` among them, whose smudge downloads from the URL a
//! `.lfsconfig` names, with the user's credentials), a merge driver, a
//! diff driver's `textconv` or `command`. [`ContentGit`] therefore:
//! - reads attributes from the host's tree as it was before the sync
//!   (`GIT_ATTR_SOURCE=<HEAD's tree>`, git 2.42 or later; with an older git
//!   the merged `.gitattributes` still applies, but only to what is left
//!   below: line endings, encodings, `ident`);
//! - empties `smudge`, `clean` and `process`, and sets `required=false`,
//!   for every filter that the host's config defines (`git config
//!   --get-regexp`, every level and include) or that a `.gitattributes` of
//!   the commits being taken names: a file lands with its committed bytes,
//!   and an LFS file as its pointer (`git lfs checkout` fetches it,
//!   when the user wants);
//! - replaces every such merge driver by git's own text merge (`git
//!   merge-file`; an empty driver would read as a conflict on every file);
//! - passes `--no-textconv --no-ext-diff` to the diff and log commands (an
//!   empty `textconv` makes git fail to run "" rather than skip it);
//! - sets `GIT_LFS_SKIP_SMUDGE=1`, `core.fsmonitor=false`,
//!   `submodule.recurse=false` (a `.gitmodules` from the sandbox names the
//!   URLs a recursive checkout would fetch) and `log.showSignature=false`;
//! - turns hooks off (`core.hooksPath=/dev/null`, as every git command of
//!   sync does, see `sync::git`). The hooks are the user's own, but a
//!   repository that keeps them in the working tree (husky's `.husky/`,
//!   `core.hooksPath` set to a tracked folder) would run, in `post-merge`,
//!   `post-checkout` or `reference-transaction`, the very files the sandbox
//!   just wrote; and a sync is not the user committing or checking out, so
//!   a hook has nothing of the user's to check here.
//!
//! A filter named only in the sandbox's `.gitattributes` and defined in no
//! host config has no program to run; its name is overridden anyway, so
//! that a config file the host includes from the working tree (an
//! `include.path` into the checkout) cannot define it between two of
//! sync's git commands. Names git's `-c` cannot carry (with `=` in them)
//! are refused with a message when the host defines them, and dropped when
//! only the sandbox names them (nothing defines them then).

use std::collections::BTreeSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::Duration;

use super::{git, GitError, HOST_GIT_CONFIG};

/// The merge driver that replaces every configured one: git's own
/// three-way text merge, with the conflict marker size git asks for.
pub const TEXT_MERGE: &str = "git merge-file --marker-size=%L %A %O %B";
/// The most bytes read from the search of the sandbox's `.gitattributes`.
const MAX_ATTRIBUTE_BYTES: u64 = 1 << 20;
/// The most driver names taken from the sandbox's `.gitattributes`.
const MAX_ATTRIBUTE_NAMES: usize = 256;
/// How long that search may take.
const ATTRIBUTE_TIMEOUT: Duration = Duration::from_secs(30);

/// The first git with `GIT_ATTR_SOURCE`.
const ATTR_SOURCE_SINCE: (u32, u32) = (2, 42);

/// Why git could not be readied for the sandbox's content (nothing of
/// the sync has run then).
#[derive(Debug, thiserror::Error)]
pub enum ContentError {
    /// A git command failed.
    #[error(transparent)]
    Git(#[from] GitError),
    /// A driver the host defines has a name `git -c` cannot carry.
    #[error(
        "the host's git config defines the driver {0:?}, whose name `git -c` cannot \
         override: rename it (no `=` in it) before syncing"
    )]
    DriverName(String),
    /// `git grep` gave no pipe to read its output from.
    #[error("git grep gave no output pipe")]
    NoPipe,
    /// The thread that reads `git grep` could not start.
    #[error("cannot start a thread: {0}")]
    Thread(#[source] std::io::Error),
    /// Reading `git grep`'s output failed.
    #[error("reading the sandbox's .gitattributes: {0}")]
    ReadAttributes(#[source] std::io::Error),
    /// `git grep` did not finish within [`ATTRIBUTE_TIMEOUT`].
    #[error(
        "reading the sandbox's .gitattributes took over {} s",
        ATTRIBUTE_TIMEOUT.as_secs()
    )]
    AttributesTimeout,
    /// Waiting for `git grep` to exit failed.
    #[error("git grep: {0}")]
    Wait(#[source] std::io::Error),
    /// `git grep` failed (it exits 0 with matches, 1 without).
    #[error("git grep of the sandbox's .gitattributes failed ({0})")]
    Grep(std::process::ExitStatus),
}

/// The drivers named in config or attributes.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Drivers {
    pub filters: BTreeSet<String>,
    pub merges: BTreeSet<String>,
}

/// Git run in the host project over sandbox content, with the overrides
/// of the module overview.
#[derive(Debug)]
pub struct ContentGit {
    project: PathBuf,
    config: Vec<String>,
    attr_source: Option<String>,
}

impl ContentGit {
    /// Prepares the overrides for taking the sandbox commits `tips` into
    /// `project`.
    pub fn new(project: &Path, tips: &[&str]) -> Result<Self, ContentError> {
        let mut drivers = configured_drivers(project)?;
        for tip in tips {
            let named = attribute_drivers(project, tip)?;
            drivers.filters.extend(named.filters);
            drivers.merges.extend(named.merges);
        }
        let mut config: Vec<String> = [
            "core.fsmonitor=false",
            "submodule.recurse=false",
            "log.showSignature=false",
            "color.ui=false",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        for name in &drivers.filters {
            for var in ["smudge", "clean", "process"] {
                config.push(format!("filter.{name}.{var}="));
            }
            config.push(format!("filter.{name}.required=false"));
        }
        for name in &drivers.merges {
            config.push(format!("merge.{name}.driver={TEXT_MERGE}"));
        }
        let attr_source = if git_version().is_some_and(|v| v >= ATTR_SOURCE_SINCE) {
            Some(head_tree(project)?)
        } else {
            None
        };
        Ok(ContentGit {
            project: project.to_path_buf(),
            config,
            attr_source,
        })
    }

    /// The `-c` settings given to each command.
    #[cfg(test)]
    pub fn config(&self) -> &[String] {
        &self.config
    }

    /// Runs git with the overrides; its trimmed stdout.
    pub fn run(&self, args: &[&str]) -> Result<String, GitError> {
        let mut all: Vec<&str> = Vec::with_capacity(self.config.len() * 2 + args.len());
        for c in &self.config {
            all.extend(["-c", c.as_str()]);
        }
        all.extend_from_slice(args);
        let mut env = vec![("GIT_LFS_SKIP_SMUDGE", "1")];
        if let Some(tree) = &self.attr_source {
            env.push(("GIT_ATTR_SOURCE", tree));
        }
        super::git_env(&self.project, &all, &env)
    }
}

/// The host git's version (major, minor), read once.
pub fn git_version() -> Option<(u32, u32)> {
    static VERSION: OnceLock<Option<(u32, u32)>> = OnceLock::new();
    *VERSION.get_or_init(|| {
        let out = crate::host_git::command().arg("--version").output().ok()?;
        parse_version(&String::from_utf8_lossy(&out.stdout))
    })
}

/// Parses `git version 2.47.3` (or `2.39.5 (Apple Git-154)`,
/// `2.45.1.windows.1`).
pub fn parse_version(text: &str) -> Option<(u32, u32)> {
    let number = text.trim().strip_prefix("git version ")?;
    let mut parts = number.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// The tree attributes are read from: the host's `HEAD` before the sync,
/// or the empty tree on a branch with no commit yet.
fn head_tree(project: &Path) -> Result<String, GitError> {
    if let Ok(tree) = git(
        project,
        &["rev-parse", "--verify", "--quiet", "HEAD^{tree}"],
    ) {
        return Ok(tree);
    }
    git(project, &["hash-object", "-t", "tree", "/dev/null"])
}

/// Splits `filter.<name>.<var>` / `merge.<name>.<var>` keys.
fn add_key(drivers: &mut Drivers, key: &str) -> Result<(), ContentError> {
    let (set, rest) = if let Some(rest) = key.strip_prefix("filter.") {
        (&mut drivers.filters, rest)
    } else if let Some(rest) = key.strip_prefix("merge.") {
        (&mut drivers.merges, rest)
    } else {
        return Ok(());
    };
    let Some((name, _var)) = rest.rsplit_once('.') else {
        return Ok(());
    };
    if name.contains('=') || name.contains('\n') {
        return Err(ContentError::DriverName(name.to_string()));
    }
    set.insert(name.to_string());
    Ok(())
}

/// The filters and merge drivers the host's git config defines (every
/// level, includes followed, as the merge itself reads them).
pub fn configured_drivers(project: &Path) -> Result<Drivers, ContentError> {
    let mut drivers = Drivers::default();
    let listed = git(
        project,
        &[
            "config",
            "-z",
            "--name-only",
            "--get-regexp",
            r"^(filter|merge)\..+\.",
        ],
    )
    // `git config --get-regexp` exits 1 when nothing matches.
    .unwrap_or_default();
    for key in listed.split('\0').filter(|k| !k.is_empty()) {
        add_key(&mut drivers, key)?;
    }
    Ok(drivers)
}

/// The filter and merge driver names that the `.gitattributes` files of
/// the commit `tip` use (bounded: [`MAX_ATTRIBUTE_BYTES`] read, at most
/// [`MAX_ATTRIBUTE_NAMES`] names, [`ATTRIBUTE_TIMEOUT`]).
pub fn attribute_drivers(project: &Path, tip: &str) -> Result<Drivers, ContentError> {
    let mut child = crate::host_git::command()
        .args(HOST_GIT_CONFIG.iter().flat_map(|c| ["-c", c]))
        .args(["-c", "submodule.recurse=false", "grep", "-I", "-h", "-o"])
        .args(["-E", "(filter|merge)=[^[:space:]]+", tip, "--"])
        .args([":(glob)**/.gitattributes"])
        .current_dir(project)
        .env("GIT_TERMINAL_PROMPT", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(GitError::Spawn)?;
    let Some(stdout) = child.stdout.take() else {
        let _ = child.kill();
        let _ = child.wait();
        return Err(ContentError::NoPipe);
    };
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::Builder::new()
        .name("gitattributes".into())
        .spawn(move || {
            let mut bytes = Vec::new();
            let read = stdout.take(MAX_ATTRIBUTE_BYTES).read_to_end(&mut bytes);
            let _ = tx.send(read.map(|_| bytes));
        });
    if let Err(e) = reader {
        let _ = child.kill();
        let _ = child.wait();
        return Err(ContentError::Thread(e));
    }
    let bytes = match rx.recv_timeout(ATTRIBUTE_TIMEOUT) {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(e)) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(ContentError::ReadAttributes(e));
        }
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(ContentError::AttributesTimeout);
        }
    };
    let capped = bytes.len() as u64 >= MAX_ATTRIBUTE_BYTES;
    if capped {
        // The rest is not read: stop git.
        let _ = child.kill();
    }
    let status = child.wait().map_err(ContentError::Wait)?;
    // 0: matches, 1: none.
    if !capped && !matches!(status.code(), Some(0) | Some(1)) {
        return Err(ContentError::Grep(status));
    }
    Ok(parse_attribute_names(&String::from_utf8_lossy(&bytes)))
}

/// `filter=NAME` / `merge=NAME` matches, one a line, as driver names.
/// Names other than plain words are dropped (no config defines them
/// without the host's own config listing them), and so are git's built-in
/// merge drivers (`text`, `binary`, `union`), which run no program unless
/// the host's config redefines them.
pub fn parse_attribute_names(text: &str) -> Drivers {
    let mut drivers = Drivers::default();
    let plain = |n: &str| {
        !n.is_empty()
            && n.len() <= 100
            && n.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    };
    for line in text.lines() {
        if drivers.filters.len() + drivers.merges.len() >= MAX_ATTRIBUTE_NAMES {
            break;
        }
        let (set, name) = if let Some(n) = line.strip_prefix("filter=") {
            (&mut drivers.filters, n)
        } else if let Some(n) = line.strip_prefix("merge=") {
            (&mut drivers.merges, n)
        } else {
            continue;
        };
        let built_in = line.starts_with("merge=") && ["text", "binary", "union"].contains(&name);
        if plain(name) && !built_in {
            set.insert(name.to_string());
        }
    }
    drivers
}
