//! Sandbox names and the git project they belong to.
//!
//! A sandbox name is a DNS label (`[a-z0-9-]`, 1 to 63 characters, no
//! leading or trailing `-`), because it appears in host names such as
//! `<sandbox>.sandbox.local`.
//!
//! The default name of a project's sandbox is derived from the absolute path
//! of the repository's top-level directory:
//! `<basename sanitized>-<hash>`, where the basename is lower-cased, every
//! run of characters outside `[a-z0-9]` becomes one `-`, leading and trailing
//! `-` are dropped, it is cut to 40 characters (or `sandbox` if nothing is
//! left), and `<hash>` is the first 6 hex digits of the 64-bit FNV-1a hash of
//! the path's bytes. So `/home/me/My_App` becomes `my-app-` plus 6 hex
//! digits, and two checkouts called `app` in different folders get
//! different sandboxes. FNV-1a is written out here so the name never changes
//! with the Rust version.

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Longest sanitized basename kept in a derived name.
const BASE_MAX: usize = 40;

/// A name that is not a valid sandbox name (see the module overview).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid sandbox name {0:?}: use 1 to 63 characters from a-z, 0-9 and '-', \
     not starting or ending with '-'"
)]
pub struct InvalidName(pub String);

/// Why a name is not a valid sandbox name, if it is not.
pub fn validate(name: &str) -> Result<(), InvalidName> {
    let ok_chars = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if name.is_empty()
        || name.len() > 63
        || !ok_chars
        || name.starts_with('-')
        || name.ends_with('-')
    {
        return Err(InvalidName(name.to_string()));
    }
    Ok(())
}

/// 64-bit FNV-1a: names things by their content (not a security check).
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The default sandbox name for the repository whose top-level directory is
/// `top` (an absolute path).
pub fn derive(top: &Path) -> String {
    let base = top
        .file_name()
        .map(|n| n.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    let mut clean = String::new();
    for c in base.chars() {
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            clean.push(c);
        } else if !clean.ends_with('-') {
            clean.push('-');
        }
    }
    let mut clean = clean.trim_matches('-').to_string();
    clean.truncate(BASE_MAX);
    let clean = clean.trim_end_matches('-');
    let clean = if clean.is_empty() { "sandbox" } else { clean };
    let hash = fnv1a(top.as_os_str().as_bytes());
    format!("{clean}-{:06x}", hash >> 40)
}

/// What asking git about a directory found.
#[derive(Debug)]
pub enum GitLookup {
    /// The absolute top-level directory of the repository.
    Repo(PathBuf),
    /// The directory is not inside a git work tree.
    NotARepo,
    /// git could not be run at all.
    NoGit(std::io::Error),
}

/// The top-level directory of the git work tree containing `dir`.
pub fn git_toplevel(dir: &Path) -> GitLookup {
    let out = crate::host_git::command()
        .arg("-C")
        .arg(dir)
        .args(["rev-parse", "--show-toplevel"])
        .stdin(std::process::Stdio::null())
        .output();
    match out {
        Err(e) => GitLookup::NoGit(e),
        Ok(out) if !out.status.success() => GitLookup::NotARepo,
        Ok(out) => {
            let text = String::from_utf8_lossy(&out.stdout);
            let top = PathBuf::from(text.trim_end_matches(['\n', '\r']));
            GitLookup::Repo(top.canonicalize().unwrap_or(top))
        }
    }
}

/// `git status --porcelain` lines for uncommitted changes in `top` (empty if
/// clean or if git fails: this only feeds a warning).
pub fn uncommitted_changes(top: &Path) -> Vec<String> {
    let mut cmd = crate::host_git::command();
    cmd.arg("-C")
        .arg(top)
        .args(["status", "--porcelain"])
        .stdin(std::process::Stdio::null());
    crate::host_git::stdout_lines(&mut cmd).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_names_are_sanitized_and_hashed() {
        let name = derive(Path::new("/home/me/My_App.v2"));
        let (base, hash) = name.rsplit_once('-').unwrap();
        assert_eq!(base, "my-app-v2");
        assert_eq!(hash.len(), 6);
        assert!(hash.bytes().all(|b| b.is_ascii_hexdigit()));
        validate(&name).unwrap();
    }

    #[test]
    fn derived_names_are_stable_and_path_specific() {
        let a = derive(Path::new("/src/app"));
        assert_eq!(a, derive(Path::new("/src/app")));
        assert_ne!(a, derive(Path::new("/other/app")));
        // Pinned: FNV-1a must not drift.
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn odd_basenames_still_give_valid_names() {
        for path in [
            "/",
            "/___",
            "/-x-",
            "/ÄÖÜ",
            &format!("/{}", "x".repeat(100)),
        ] {
            let name = derive(Path::new(path));
            validate(&name).unwrap_or_else(|e| panic!("{path}: {e}"));
        }
        assert!(derive(Path::new("/___")).starts_with("sandbox-"));
    }

    #[test]
    fn validation_rejects_bad_names() {
        for bad in ["", "-a", "a-", "A", "a_b", "a.b", &"a".repeat(64)] {
            assert!(validate(bad).is_err(), "{bad:?}");
        }
        validate("my-app-1").unwrap();
        let err = validate("A").unwrap_err();
        assert_eq!(err, InvalidName("A".into()));
        assert!(
            err.to_string().starts_with("invalid sandbox name \"A\": "),
            "{err}"
        );
    }
}
