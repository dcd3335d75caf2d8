//! `PushFile`: writes a file (a `.env`, say) under the workspace.
//!
//! Paths are relative to the workspace root, or absolute under
//! [`GUEST_WORKSPACE`]; any other absolute path, an empty path and any `..`
//! component are refused. The parent directory, once created and
//! canonicalized, must still lie under the root (a symlink pointing out is
//! refused too). The file is written to a temporary name, given its mode
//! and the owner of its parent directory, then renamed into place.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use crate::protocol::PushFileRequest;

/// Where the workspace is mounted in the guest.
pub const GUEST_WORKSPACE: &str = "/workspace";

/// Why a file was not written.
#[derive(Debug, thiserror::Error)]
pub enum PushFileError {
    #[error("refusing to write {0:?}: files can only be pushed under {GUEST_WORKSPACE} (relative paths, no `..`)")]
    OutsideWorkspace(String),
    #[error("writing {path:?}: {source}")]
    Io { path: String, source: io::Error },
}

/// Maps a request path to a path under `root`, lexically.
pub fn confine(root: &Path, requested: &str) -> Result<PathBuf, PushFileError> {
    let refuse = || PushFileError::OutsideWorkspace(requested.to_string());
    let path = Path::new(requested);
    let relative = if path.is_absolute() {
        path.strip_prefix(GUEST_WORKSPACE).map_err(|_| refuse())?
    } else {
        path
    };
    let mut out = root.to_path_buf();
    let mut parts = 0;
    for c in relative.components() {
        match c {
            Component::Normal(p) => {
                out.push(p);
                parts += 1;
            }
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => {
                return Err(refuse())
            }
        }
    }
    if parts == 0 {
        return Err(refuse());
    }
    Ok(out)
}

/// Writes the file described by `req` under `root`.
pub fn push_file(root: &Path, req: &PushFileRequest) -> Result<(), PushFileError> {
    let target = confine(root, &req.path)?;
    let io_err = |source| PushFileError::Io {
        path: req.path.clone(),
        source,
    };
    let parent = target
        .parent()
        .ok_or_else(|| PushFileError::OutsideWorkspace(req.path.clone()))?;
    fs::create_dir_all(parent).map_err(io_err)?;
    let real_root = root.canonicalize().map_err(io_err)?;
    let real_parent = parent.canonicalize().map_err(io_err)?;
    if !real_parent.starts_with(&real_root) {
        return Err(PushFileError::OutsideWorkspace(req.path.clone()));
    }
    let name = target
        .file_name()
        .ok_or_else(|| PushFileError::OutsideWorkspace(req.path.clone()))?;
    let final_path = real_parent.join(name);
    if fs::symlink_metadata(&final_path).is_ok_and(|m| m.file_type().is_symlink()) {
        return Err(PushFileError::OutsideWorkspace(req.path.clone()));
    }
    let tmp = real_parent.join(format!(
        ".{}.keystone-push-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let write = || -> io::Result<()> {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(req.mode & 0o7777)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)?;
        f.write_all(&req.bytes)?;
        f.set_permissions(fs::Permissions::from_mode(req.mode & 0o7777))?;
        let owner = fs::metadata(&real_parent)?;
        std::os::unix::fs::fchown(&f, Some(owner.uid()), Some(owner.gid()))?;
        f.sync_all()?;
        fs::rename(&tmp, &final_path)
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&tmp);
        io_err(e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confinement() {
        let root = Path::new("/ws");
        assert_eq!(confine(root, ".env").unwrap(), Path::new("/ws/.env"));
        assert_eq!(confine(root, "./a/b").unwrap(), Path::new("/ws/a/b"));
        assert_eq!(
            confine(root, "/workspace/app/.env").unwrap(),
            Path::new("/ws/app/.env")
        );
        for bad in [
            "../x",
            "a/../../x",
            "/etc/passwd",
            "",
            ".",
            "/workspace",
            "/workspacex/a",
        ] {
            assert!(confine(root, bad).is_err(), "{bad:?} must be refused");
        }
    }
}
