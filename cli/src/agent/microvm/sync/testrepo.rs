//! Throw-away git repositories for the tests of the clone, sync and
//! auto-sync: real git on the host, in a folder removed on drop.

use std::path::{Path, PathBuf};

/// A git repository under the temporary folder, removed on drop.
pub struct TempRepo {
    pub dir: PathBuf,
}

impl TempRepo {
    /// A fresh folder named after `tag` (unique per test process); with
    /// `init`, a repository on `main` in it.
    pub fn new(tag: &str, init: bool) -> Self {
        let dir = std::env::temp_dir().join(format!("ks-git-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let repo = TempRepo { dir };
        if init {
            repo.git(&["init", "-q", "-b", "main"]);
        }
        repo
    }

    /// A path inside the repository.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    /// Runs git with a committer identity; panics with git's stderr on
    /// failure; the trimmed stdout.
    pub fn git(&self, args: &[&str]) -> String {
        let out = self.git_output(args);
        assert!(
            out.status.success(),
            "git {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim_end().to_string()
    }

    pub fn git_output(&self, args: &[&str]) -> std::process::Output {
        git_in(&self.dir, args)
    }

    /// Writes `file` (creating its folder), commits it; the new head.
    pub fn commit(&self, file: &str, content: &str, msg: &str) -> String {
        let path = self.dir.join(file);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(&path, content).unwrap();
        self.git(&["add", "--", file]);
        self.git(&["commit", "-q", "-m", msg]);
        self.git(&["rev-parse", "HEAD"])
    }
}

impl Drop for TempRepo {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Git in `dir` with a committer identity and no signing.
pub fn git_in(dir: &Path, args: &[&str]) -> std::process::Output {
    crate::host_git::command()
        .args(["-c", "user.name=t", "-c", "user.email=t@t"])
        .args(["-c", "commit.gpgSign=false", "-c", "tag.gpgSign=false"])
        .args(args)
        .current_dir(dir)
        .env("GIT_TERMINAL_PROMPT", "0")
        .output()
        .unwrap()
}
