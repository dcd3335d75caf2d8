//! [`ScratchDir`]: a test's own folder, created empty and removed with
//! everything in it when the value is dropped (at the end of the test,
//! whether it passed or panicked).
//!
//! [`ScratchDir::new`] names the folder after the test, this process and
//! a counter (`$TMPDIR/ks-<name>-<pid>-<n>`), so two tests of one binary,
//! two calls in one test and two test binaries never share one. The name
//! is kept short: Unix sockets made inside must fit in 107 bytes.
//! [`ScratchDir::at`] takes the exact path instead, for a fixture whose
//! folder must be somewhere in particular (one a guest sees at the same
//! path, say).
//!
//! Removal also takes back folders a test made read-only (a test of
//! permission errors), which `remove_dir_all` alone cannot empty.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// A folder removed, with its contents, on drop.
#[derive(Debug)]
pub struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    /// Creates the empty folder `$TMPDIR/ks-<name>-<pid>-<n>`, `n`
    /// counting the calls in this process.
    pub fn new(name: &str) -> Self {
        static CALLS: AtomicUsize = AtomicUsize::new(0);
        let n = CALLS.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        Self::at(std::env::temp_dir().join(format!("ks-{name}-{pid}-{n}")))
    }

    /// Creates the empty folder `path` (and its parents), removing
    /// whatever an earlier run left there.
    pub fn at(path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        remove_all(&path);
        if let Err(e) = std::fs::create_dir_all(&path) {
            panic!("cannot create the scratch folder {}: {e}", path.display());
        }
        Self { path }
    }

    /// The folder.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `rel` inside the folder.
    pub fn join(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.path.join(rel)
    }
}

impl AsRef<Path> for ScratchDir {
    fn as_ref(&self) -> &Path {
        &self.path
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        remove_all(&self.path);
    }
}

/// Removes `path` and everything under it; where a folder inside refused
/// (its owner took the write or search bit away), gives the owner those
/// bits back and tries again.
fn remove_all(path: &Path) {
    if std::fs::remove_dir_all(path).is_ok() || !path.exists() {
        return;
    }
    allow_removal(path);
    let _ = std::fs::remove_dir_all(path);
}

/// Gives the owner read, write and search rights on every folder under
/// `dir` (symbolic links are not followed).
fn allow_removal(dir: &Path) {
    let is_dir = std::fs::symlink_metadata(dir).is_ok_and(|m| m.is_dir());
    if !is_dir {
        return;
    }
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            allow_removal(&entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_folder_and_its_contents_go_away_on_drop() {
        let scratch = ScratchDir::new("kit-drop");
        let inner = scratch.join("a/b");
        std::fs::create_dir_all(&inner).unwrap();
        std::fs::write(inner.join("file"), b"data").unwrap();
        std::os::unix::fs::symlink("/", scratch.join("root-link")).unwrap();
        let path = scratch.path().to_path_buf();
        assert!(path.is_dir());
        drop(scratch);
        assert!(!path.exists(), "{} is still there", path.display());
        assert!(Path::new("/").is_dir(), "the link's target stays");
    }

    #[test]
    fn a_folder_made_read_only_goes_away_too() {
        let scratch = ScratchDir::new("kit-readonly");
        let locked = scratch.join("locked");
        std::fs::create_dir(&locked).unwrap();
        std::fs::write(locked.join("file"), b"data").unwrap();
        std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o500)).unwrap();
        let path = scratch.path().to_path_buf();
        drop(scratch);
        assert!(!path.exists(), "{} is still there", path.display());
    }

    #[test]
    fn each_call_gets_its_own_empty_folder() {
        let a = ScratchDir::new("kit-unique");
        let b = ScratchDir::new("kit-unique");
        assert_ne!(a.path(), b.path());
        let name = a.path().file_name().unwrap().to_str().unwrap().to_string();
        let pid = std::process::id().to_string();
        assert!(
            name.starts_with("ks-kit-unique-") && name.contains(&pid),
            "{name}"
        );
        assert_eq!(std::fs::read_dir(a.path()).unwrap().count(), 0);
        assert_eq!(a.join("x"), a.path().join("x"));
        assert_eq!(AsRef::<Path>::as_ref(&b), b.path());
    }

    #[test]
    fn at_empties_what_an_earlier_run_left() {
        let base = ScratchDir::new("kit-at");
        let path = base.join("exact");
        std::fs::create_dir_all(path.join("old")).unwrap();
        let scratch = ScratchDir::at(&path);
        assert_eq!(scratch.path(), path);
        assert_eq!(std::fs::read_dir(&path).unwrap().count(), 0);
        drop(scratch);
        assert!(!path.exists());
        assert!(base.path().is_dir(), "only the exact folder goes");
    }
}
