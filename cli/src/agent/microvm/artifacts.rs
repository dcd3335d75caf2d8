//! `sync --artifacts`: copies the files of the sandbox's `/workspace` that
//! git does not track (build outputs, generated files) into the host
//! project, after the commits (`sync.rs`).
//!
//! The host runs rsync and pulls: the guest's `rsync --server --sender` is
//! reached through rsync's remote-shell contract, with `-e "keystone agent
//! __rsync-shell NAME"` as the shell; that command ignores rsync's host
//! word and pipes its stdin/stdout to the rest of its arguments run in the
//! guest over the agent's raw stream (`guest::pipe_stdio`, as
//! `__git-upload-pack` does). The guest opens no connection to the host.
//!
//! The rule (also in `keystone agent sync --help`):
//! - a path that git tracks on the host (`git ls-files` in the project) or
//!   in the sandbox (`git ls-files` in `/workspace`, run in the guest: the
//!   host never runs git in the sandbox's repository, whose config it does
//!   not trust) is never written; those move as commits;
//! - `.git`, `/.worktrees/` (the sandbox's worktrees) and the top-level
//!   `.env*` files (they go host -> sandbox only) are never copied;
//! - nothing on the host is deleted (no `--delete`);
//! - everything else that differs is copied, as `rsync -rlpt` would: a
//!   host file that git does not track is overwritten by the sandbox's.
//!
//! The sandbox is not trusted: no owners or groups (files belong to whoever
//! runs `sync`), no devices or special files, no set-user/group-ID bits,
//! and `--safe-links` drops symbolic links that point out of the tree.
//! rsync 3.2.5 and newer also check, as the receiver, that the sender sent
//! only what the filter rules allow.

use std::io::Write;
use std::process::{Command, Stdio};

use keystone_guest_agent::protocol::{RawStreamRequest, UserSpec};

use super::super::backend::{BackendError, BackendResult, SandboxSpec, SyncOptions, SyncReport};
use super::super::{Context, RsyncShellArgs};
use super::engine::{Layout, GUEST_USER, GUEST_WORKSPACE};
use super::{guest, sync};

/// The hidden subcommand rsync runs as its remote shell.
pub const RSYNC_SHELL_SUBCOMMAND: &str = "__rsync-shell";

/// Marks our `--out-format` lines in rsync's output.
const LINE_TAG: &str = "KS";

/// Rules that hold whatever git says (see the module documentation).
const FIXED_EXCLUDES: [&str; 3] = [".git", "/.worktrees/", "/.env*"];

/// What rsync moved (or, with `-n`, would move).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Moved {
    /// Paths relative to the project; symbolic links end with ` -> link`.
    pub paths: Vec<String>,
    /// Regular files among `paths`.
    pub files: u64,
    /// Symbolic links among `paths`.
    pub links: u64,
    /// The size of the regular files.
    pub bytes: u64,
}

/// `keystone agent sync --artifacts`: the commits, then the artifacts.
/// "Nothing to sync" (exit 2) only when neither has anything.
pub fn sync(spec: &SandboxSpec, opts: &SyncOptions) -> BackendResult<SyncReport> {
    check_rsync()?;
    let (mut report, up_to_date) = match sync::sync(spec, opts) {
        Ok(report) => (report, None),
        Err(BackendError::InvalidState(msg)) => (SyncReport::default(), Some(msg)),
        Err(e) => return Err(e),
    };
    let mut tracked = host_tracked(spec)?;
    tracked.extend(guest_tracked(spec)?);
    let moved = rsync(spec, opts.dry_run, &tracked)?;
    if moved.paths.is_empty() {
        if let Some(msg) = up_to_date {
            return Err(BackendError::InvalidState(format!(
                "{msg}, and no artifacts differ"
            )));
        }
    }
    report.details.push(summary(&moved, opts.dry_run));
    report.artifacts = moved.paths;
    Ok(report)
}

/// Exit 4 without rsync on the host.
fn check_rsync() -> BackendResult<()> {
    match Command::new("rsync").arg("--version").output() {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => Err(BackendError::Requirements(format!(
            "rsync --version failed ({}); install rsync (apt-get install rsync)",
            out.status
        ))),
        Err(e) => Err(BackendError::Requirements(format!(
            "sync --artifacts needs rsync on the host ({e}); install rsync (apt-get install rsync)"
        ))),
    }
}

/// NUL-separated `git ls-files -z` output as paths.
fn split_z(bytes: &[u8]) -> Vec<Vec<u8>> {
    bytes
        .split(|b| *b == 0)
        .filter(|p| !p.is_empty())
        .map(<[u8]>::to_vec)
        .collect()
}

/// The paths git tracks in the host project.
fn host_tracked(spec: &SandboxSpec) -> BackendResult<Vec<Vec<u8>>> {
    let out = Command::new("git")
        .args(["ls-files", "-z"])
        .current_dir(&spec.project)
        .output()
        .map_err(|e| BackendError::Failed(format!("cannot run git: {e}")))?;
    if !out.status.success() {
        return Err(BackendError::Failed(format!(
            "git ls-files in {} failed: {}",
            spec.project.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(split_z(&out.stdout))
}

/// The paths git tracks in the sandbox's `/workspace` (run in the guest).
fn guest_tracked(spec: &SandboxSpec) -> BackendResult<Vec<Vec<u8>>> {
    let argv = ["git", "-C", GUEST_WORKSPACE, "ls-files", "-z"]
        .map(String::from)
        .to_vec();
    let out = guest::client(&Layout::new(&spec.paths).vsock)
        .exec_request_output(guest::request(argv, GUEST_WORKSPACE, None))
        .map_err(|e| guest::agent_err("git ls-files in the sandbox", e))?;
    if !out.status.success() {
        return Err(BackendError::Failed(format!(
            "git ls-files in the sandbox failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(split_z(&out.stdout))
}

/// An rsync exclude rule matching exactly the path `rel` (relative to the
/// transfer root), whatever its type. rsync reads a backslash as an escape
/// only in patterns that hold a wildcard, so escape only those.
pub fn exclude_rule(rel: &[u8]) -> Vec<u8> {
    let wild = rel.iter().any(|b| matches!(b, b'*' | b'?' | b'['));
    let mut rule = Vec::with_capacity(rel.len() + 2);
    rule.push(b'/');
    for &b in rel {
        if wild && matches!(b, b'*' | b'?' | b'[' | b'\\') {
            rule.push(b'\\');
        }
        rule.push(b);
    }
    rule
}

/// A word for rsync's `-e`, which splits on spaces and honours single and
/// double quotes (not backslashes).
pub fn rsh_quote(word: &str) -> Option<String> {
    if !word.is_empty() && !word.contains([' ', '\'', '"']) {
        Some(word.to_string())
    } else if !word.contains('\'') {
        Some(format!("'{word}'"))
    } else if !word.contains('"') {
        Some(format!("\"{word}\""))
    } else {
        None
    }
}

/// rsync's arguments, up to the source and destination.
pub fn rsync_args(rsh: &str, dry_run: bool) -> Vec<String> {
    let mut args: Vec<String> = [
        "--recursive",
        "--links",
        "--perms",
        "--times",
        "--safe-links",
        "--chmod=ug-s",
        "--from0",
        "--exclude-from=-",
    ]
    .map(String::from)
    .to_vec();
    if dry_run {
        args.push("--dry-run".into());
    }
    args.extend(FIXED_EXCLUDES.iter().map(|p| format!("--exclude={p}")));
    args.push(format!("--out-format={LINE_TAG}\t%i\t%l\t%n%L"));
    args.push("-e".into());
    args.push(rsh.into());
    args.push(format!("keystone:{GUEST_WORKSPACE}/"));
    args.push("./".into());
    args
}

/// Parses our `--out-format` lines: `KS <%i> <%l> <%n%L>`.
pub fn parse_moved(out: &str) -> Moved {
    let mut moved = Moved::default();
    for line in out.lines() {
        let mut fields = line.splitn(4, '\t');
        if fields.next() != Some(LINE_TAG) {
            continue;
        }
        let (Some(item), Some(len), Some(name)) = (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        if item.starts_with(">f") {
            moved.files += 1;
            moved.bytes += len.parse::<u64>().unwrap_or(0);
        } else if item.starts_with("cL") {
            moved.links += 1;
        } else {
            continue;
        }
        moved.paths.push(name.to_string());
    }
    moved
}

/// `N file(s), B bytes`, copied or to copy.
pub fn summary(moved: &Moved, dry_run: bool) -> String {
    let links = match moved.links {
        0 => String::new(),
        n => format!(" and {n} symbolic link(s)"),
    };
    let verb = if dry_run {
        "would be copied (dry run: nothing changed)"
    } else {
        "copied"
    };
    format!(
        "artifacts: {} file(s){links}, {} bytes {verb}",
        moved.files, moved.bytes
    )
}

/// Runs rsync from the guest's `/workspace/` into the project, excluding
/// `tracked`.
fn rsync(spec: &SandboxSpec, dry_run: bool, tracked: &[Vec<u8>]) -> BackendResult<Moved> {
    let exe = std::env::current_exe()
        .map_err(|e| BackendError::Failed(format!("cannot find the keystone binary: {e}")))?;
    let exe = exe.display().to_string();
    let rsh = match (rsh_quote(&exe), rsh_quote(&spec.name)) {
        (Some(exe), Some(name)) => format!("{exe} agent {RSYNC_SHELL_SUBCOMMAND} {name}"),
        _ => {
            return Err(BackendError::Failed(format!(
                "cannot pass {exe:?} to rsync -e (it holds both kinds of quotes)"
            )))
        }
    };
    let mut rules = Vec::new();
    for path in tracked {
        rules.extend(exclude_rule(path));
        rules.push(0);
    }
    let mut child = Command::new("rsync")
        .args(rsync_args(&rsh, dry_run))
        .current_dir(&spec.project)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| BackendError::Failed(format!("cannot run rsync: {e}")))?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    let writer = std::thread::spawn(move || stdin.write_all(&rules));
    let out = child
        .wait_with_output()
        .map_err(|e| BackendError::Failed(format!("rsync: {e}")))?;
    let _ = writer.join();
    if !out.status.success() {
        return Err(BackendError::Failed(format!(
            "rsync from the sandbox failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(parse_moved(&String::from_utf8_lossy(&out.stdout)))
}

/// `keystone agent __rsync-shell NAME HOST CMD...`: rsync's remote shell.
/// Ignores HOST and pipes stdin/stdout to CMD (which must be `rsync
/// --server ...`) run in the guest's `/workspace` as the agent user.
pub fn rsync_shell(ctx: &Context, args: RsyncShellArgs) -> anyhow::Result<i32> {
    let (name, entry) = ctx.resolve(Some(&args.name))?;
    let spec = ctx.spec(&name, &entry)?;
    let argv = guest_command(&args.command).map_err(BackendError::coded)?;
    let request = RawStreamRequest {
        argv,
        cwd: Some(GUEST_WORKSPACE.into()),
        env: Vec::new(),
        user: Some(UserSpec::Name(GUEST_USER.into())),
    };
    guest::pipe_stdio(
        &Layout::new(&spec.paths).vsock,
        request,
        "rsync in the sandbox",
    )
    .map_err(BackendError::coded)
}

/// The guest command from rsync's `HOST CMD...` (`-l USER HOST CMD...`
/// too); only an rsync server may run.
pub fn guest_command(words: &[String]) -> BackendResult<Vec<String>> {
    let rest = match words.first().map(String::as_str) {
        Some("-l") => words.get(3..),
        Some(_) => words.get(1..),
        None => None,
    }
    .unwrap_or_default();
    if rest.first().map(String::as_str) != Some("rsync") || !rest.iter().any(|w| w == "--server") {
        return Err(BackendError::NotFound(format!(
            "{RSYNC_SHELL_SUBCOMMAND} runs only `rsync --server ...` (got {rest:?})"
        )));
    }
    Ok(rest.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_match_exactly_one_path() {
        assert_eq!(exclude_rule(b"README"), b"/README");
        assert_eq!(exclude_rule(b"a b/c\\d"), b"/a b/c\\d");
        assert_eq!(exclude_rule(b"x/*[1]?\\"), b"/x/\\*\\[1]\\?\\\\");
        assert_eq!(split_z(b"a\0b c\0"), vec![b"a".to_vec(), b"b c".to_vec()]);
    }

    #[test]
    fn rsh_words_are_quoted() {
        assert_eq!(rsh_quote("/usr/bin/keystone").unwrap(), "/usr/bin/keystone");
        assert_eq!(rsh_quote("/a b/k").unwrap(), "'/a b/k'");
        assert_eq!(rsh_quote("/a'b").unwrap(), "\"/a'b\"");
        assert!(rsh_quote("/a'\"b").is_none());
    }

    #[test]
    fn args_never_delete_and_dry_run_is_rsync_n() {
        let args = rsync_args("ks agent __rsync-shell s", false);
        assert!(!args.iter().any(|a| a.starts_with("--delete")));
        assert!(!args.iter().any(|a| a == "--dry-run" || a == "-n"));
        assert!(args.contains(&"--exclude=.git".to_string()));
        assert_eq!(args[args.len() - 2], "keystone:/workspace/");
        assert!(rsync_args("x", true).contains(&"--dry-run".to_string()));
    }

    #[test]
    fn out_format_lines_count_files_and_bytes() {
        let out = "KS\tcd+++++++++\t4096\tbuild/\n\
                   KS\t>f+++++++++\t10\tbuild/out.bin\n\
                   KS\t>f.st......\t5\tdist/app.txt\n\
                   KS\tcL+++++++++\t0\tdist/cur -> app.txt\n\
                   KS\t.d..t......\t4096\tdist/\n\
                   noise\n";
        let m = parse_moved(out);
        assert_eq!(
            m.paths,
            ["build/out.bin", "dist/app.txt", "dist/cur -> app.txt"]
        );
        assert_eq!((m.files, m.links, m.bytes), (2, 1, 15));
        assert_eq!(
            summary(&m, false),
            "artifacts: 2 file(s) and 1 symbolic link(s), 15 bytes copied"
        );
    }

    #[test]
    fn the_shell_runs_only_an_rsync_server() {
        let w = |s: &[&str]| s.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            guest_command(&w(&["keystone", "rsync", "--server", "--sender", "."])).unwrap(),
            w(&["rsync", "--server", "--sender", "."])
        );
        assert_eq!(
            guest_command(&w(&["-l", "u", "h", "rsync", "--server"])).unwrap(),
            w(&["rsync", "--server"])
        );
        assert!(guest_command(&w(&["h", "sh", "-c", "x"])).is_err());
        assert!(guest_command(&w(&["h", "rsync", "-a"])).is_err());
        assert!(guest_command(&[]).is_err());
    }
}
