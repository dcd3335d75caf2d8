//! Which artifact paths `sync --artifacts` takes, and where they land.
//!
//! Judged on the path relative to the project (the sandbox's
//! `/workspace`), already checked to be plain components:
//! - inside `.git` (any component, any case), inside `.husky/` (any
//!   component) or inside the host's hooks folder (`core.hooksPath` as the
//!   host repository's own config says, read on the host): refused;
//! - a `.env*` file or folder: the top-level ones go host -> sandbox only
//!   and are skipped quietly; a nested one is refused;
//! - `/.worktrees/` (the sandbox's worktrees) and paths git tracks on the
//!   host or in the sandbox (they move as commits): skipped quietly;
//! - under a path listed in `[sync] artifacts`: in place in the project;
//! - anything else: the staging folder.

use std::collections::HashSet;
use std::path::{Component, Path};

/// Where a taken path lands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dest {
    /// The sandbox's staging folder.
    Staging,
    /// The project, under a listed path.
    InPlace,
}

/// The judgement on one path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Take(Dest),
    /// Not copied, and not worth a line (it moves some other way).
    Quiet(&'static str),
    /// Not copied, and reported.
    Refuse(String),
}

/// The rule for one sync.
#[derive(Debug, Default)]
pub struct Policy {
    tracked: HashSet<String>,
    /// Hooks folders relative to the project (`.husky` always).
    hooks: Vec<String>,
    /// `[sync] artifacts`.
    listed: Vec<String>,
}

/// True when `path` is `dir` or below it.
pub fn under(path: &str, dir: &str) -> bool {
    path.strip_prefix(dir)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

impl Policy {
    /// A rule with `listed` paths in place and `hooks` folders refused
    /// (besides `.git` and `.husky`).
    pub fn new(listed: Vec<String>, hooks: Vec<String>) -> Policy {
        Policy {
            tracked: HashSet::new(),
            hooks,
            listed,
        }
    }

    /// Adds paths git tracks (NUL-separated `git ls-files -z` output);
    /// names that are not UTF-8 can never be taken, so they are dropped.
    pub fn add_tracked(&mut self, ls_files_z: &[u8]) {
        for path in ls_files_z.split(|b| *b == 0).filter(|p| !p.is_empty()) {
            if let Ok(path) = std::str::from_utf8(path) {
                self.tracked.insert(path.to_string());
            }
        }
    }

    /// The paths listed in `[sync] artifacts`.
    pub fn listed(&self) -> &[String] {
        &self.listed
    }

    /// Judges `path` (plain components, see `tarcheck::check_name`).
    pub fn judge(&self, path: &str) -> Verdict {
        let parts: Vec<&str> = path.split('/').collect();
        if parts.iter().any(|p| p.eq_ignore_ascii_case(".git")) {
            return Verdict::Refuse("inside .git".into());
        }
        if parts.first() == Some(&".worktrees") {
            return Verdict::Quiet("the sandbox's worktrees");
        }
        if self.tracked.contains(path) {
            return Verdict::Quiet("tracked by git: it moves as a commit");
        }
        if parts.contains(&".husky") {
            return Verdict::Refuse("inside .husky, a git hooks folder".into());
        }
        if let Some(hooks) = self.hooks.iter().find(|h| h.is_empty() || under(path, h)) {
            let hooks = if hooks.is_empty() { "." } else { hooks };
            return Verdict::Refuse(format!(
                "inside {hooks}, the host's git hooks folder (core.hooksPath)"
            ));
        }
        if parts.iter().any(|p| p.starts_with(".env")) {
            return if parts.len() == 1 {
                Verdict::Quiet(".env files go host -> sandbox only")
            } else {
                Verdict::Refuse("a .env file: these never come to the host".into())
            };
        }
        if self.listed.iter().any(|l| under(path, l)) {
            Verdict::Take(Dest::InPlace)
        } else {
            Verdict::Take(Dest::Staging)
        }
    }
}

/// `path` relative to `project`, with `.` and `..` resolved lexically;
/// `None` when it is outside the project.
fn project_relative(project: &Path, path: &Path) -> Option<String> {
    let full = if path.is_absolute() {
        let canonical = |p: &Path| p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
        match path.strip_prefix(project) {
            Ok(rel) => rel.to_path_buf(),
            Err(_) => canonical(path)
                .strip_prefix(canonical(project))
                .ok()?
                .to_path_buf(),
        }
    } else {
        path.to_path_buf()
    };
    let mut parts: Vec<String> = Vec::new();
    for c in full.components() {
        match c {
            Component::Normal(p) => parts.push(p.to_str()?.to_string()),
            Component::CurDir => {}
            Component::ParentDir => {
                parts.pop()?;
            }
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(parts.join("/"))
}

/// The hooks folders of the host repository at `project`: `.husky` and
/// `core.hooksPath` from the host's own git config, when it lies inside
/// the project (an empty value, the project itself, refuses everything).
pub fn host_hooks(project: &Path) -> Vec<String> {
    let mut hooks = vec![".husky".to_string()];
    let out = crate::host_git::command()
        .args(["config", "--path", "--get", "core.hooksPath"])
        .current_dir(project)
        .env("GIT_TERMINAL_PROMPT", "0")
        .output();
    if let Ok(out) = out {
        let text = String::from_utf8_lossy(&out.stdout);
        let value = text.trim_end_matches('\n');
        if out.status.success() && !value.is_empty() {
            if let Some(rel) = project_relative(project, Path::new(value)) {
                hooks.push(rel);
            }
        }
    }
    hooks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rule_refuses_git_hooks_and_env_and_places_listed_paths() {
        let mut p = Policy::new(
            vec!["build/out".into()],
            vec![".husky".into(), "tools/hooks".into()],
        );
        p.add_tracked(b"README\0src/lib.rs\0");
        let refused = |path| matches!(p.judge(path), Verdict::Refuse(_));
        for path in [
            ".git/config",
            ".GIT/HEAD",
            "sub/.git/hooks/x",
            ".husky/_/pre-commit",
            "web/.husky/pre-push",
            "tools/hooks/pre-commit",
            "sub/.env",
            "sub/.envrc/x",
        ] {
            assert!(refused(path), "{path}");
        }
        for path in [
            ".env",
            ".env.local",
            ".envrc",
            "README",
            ".worktrees/main/x",
        ] {
            assert!(matches!(p.judge(path), Verdict::Quiet(_)), "{path}");
        }
        assert_eq!(p.judge("build/out"), Verdict::Take(Dest::InPlace));
        assert_eq!(p.judge("build/out/app"), Verdict::Take(Dest::InPlace));
        assert_eq!(p.judge("build/outer/app"), Verdict::Take(Dest::Staging));
        assert_eq!(p.judge("tools/hooksx"), Verdict::Take(Dest::Staging));
        assert_eq!(p.judge("src/lib.rs.bak"), Verdict::Take(Dest::Staging));
    }

    #[test]
    fn the_hooks_folder_comes_from_the_host_repository() {
        let dir = std::env::temp_dir().join(format!("ks-hooks-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let git = |args: &[&str]| {
            let ok = crate::host_git::command()
                .args(args)
                .current_dir(&dir)
                .env("GIT_CONFIG_NOSYSTEM", "1")
                .output()
                .is_ok_and(|o| o.status.success());
            assert!(ok, "git {args:?}");
        };
        if crate::host_git::command()
            .arg("--version")
            .output()
            .is_err()
        {
            eprintln!("SKIP: no git on this host");
            return;
        }
        git(&["init", "-q"]);
        git(&["config", "core.hooksPath", "./ci/../.husky/_"]);
        assert_eq!(host_hooks(&dir), [".husky", ".husky/_"]);
        let inside = dir.join("tools/hooks");
        git(&["config", "core.hooksPath", inside.to_str().unwrap()]);
        assert_eq!(host_hooks(&dir), [".husky", "tools/hooks"]);
        git(&["config", "core.hooksPath", "/usr/share/hooks"]);
        assert_eq!(host_hooks(&dir), [".husky"]);
        git(&["config", "core.hooksPath", "."]);
        let p = Policy::new(Vec::new(), host_hooks(&dir));
        assert!(matches!(p.judge("anything"), Verdict::Refuse(_)));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
