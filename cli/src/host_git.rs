//! Host git as keystone runs it.
//!
//! A git that runs keystone (from a hook, or `git rebase --exec` in a
//! worktree) exports variables that point its children at its own
//! repository: `GIT_DIR`, `GIT_WORK_TREE`, `GIT_INDEX_FILE` and the rest.
//! Keystone always names the repository it means (by the folder it runs
//! git in), so none of them may redirect it: with `GIT_DIR` left in place,
//! a clone would read the caller's repository and a scratch `git init`
//! would rewrite the caller's config. The list is git's own
//! (`git rev-parse --local-env-vars`, the variables git itself drops when
//! it moves to another repository), read once per process.

use std::process::Command;
use std::sync::OnceLock;

/// `git`, with none of the caller's repository variables.
pub fn command() -> Command {
    let mut cmd = Command::new("git");
    for var in local_env_vars() {
        cmd.env_remove(var);
    }
    cmd
}

/// The non-empty lines `cmd` printed, when it ran and exited 0.
pub fn stdout_lines(cmd: &mut Command) -> Option<Vec<String>> {
    let out = cmd.output().ok().filter(|out| out.status.success())?;
    Some(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_string)
            .collect(),
    )
}

/// The variables git names as its repository's own.
fn local_env_vars() -> &'static [String] {
    static VARS: OnceLock<Vec<String>> = OnceLock::new();
    VARS.get_or_init(|| {
        // Without git there is nothing to protect: every git command fails.
        let mut cmd = Command::new("git");
        cmd.args(["rev-parse", "--local-env-vars"]);
        let lines = stdout_lines(&mut cmd).unwrap_or_default();
        lines
            .iter()
            .map(|l| l.trim())
            .filter(|v| v.starts_with("GIT_"))
            .map(str::to_string)
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    #[test]
    fn the_callers_repository_variables_are_dropped() {
        let cmd = command();
        let removed: Vec<&OsStr> = cmd
            .get_envs()
            .filter(|(_, value)| value.is_none())
            .map(|(key, _)| key)
            .collect();
        for var in [
            "GIT_DIR",
            "GIT_WORK_TREE",
            "GIT_INDEX_FILE",
            "GIT_COMMON_DIR",
        ] {
            assert!(
                removed.contains(&OsStr::new(var)),
                "{var} kept: {removed:?}"
            );
        }
    }
}
