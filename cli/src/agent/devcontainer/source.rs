//! Finding and reading a project's devcontainer.json.
//!
//! The places, in order (the first found wins): `.devcontainer/
//! devcontainer.json`, then `.devcontainer.json`, both in the project's
//! top folder.
//!
//! SECURITY: the file is repository content. It is read only as a regular
//! file inside the project: the `.devcontainer` folder is opened with
//! `O_NOFOLLOW | O_DIRECTORY` and the file, relative to it, with
//! `O_NOFOLLOW` (so neither can be a symbolic link, even one swapped in
//! between the look and the open), with `O_NONBLOCK` so a FIFO cannot
//! hang the open, then checked to be a regular file; at most
//! [`MAX_FILE_BYTES`] are read.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rustix::fs::{openat, Mode, OFlags};

use super::DevcontainerError;

/// The largest devcontainer.json read (1 MiB).
pub const MAX_FILE_BYTES: u64 = 1024 * 1024;

/// The folder and file name of each place, in the order they are tried.
const PLACES: [(&str, &str); 2] = [
    (".devcontainer", "devcontainer.json"),
    ("", ".devcontainer.json"),
];

/// The path of the project's devcontainer.json, relative to `project`.
pub fn find_relative(project: &Path) -> Result<Option<PathBuf>, DevcontainerError> {
    for (folder, name) in PLACES {
        let dir = project.join(folder);
        if !folder.is_empty() {
            match std::fs::symlink_metadata(&dir) {
                Ok(meta) if meta.file_type().is_symlink() => {
                    return Err(DevcontainerError::Symlink { path: dir })
                }
                Ok(meta) if meta.is_dir() => {}
                Ok(_) => continue,
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(source) => return Err(DevcontainerError::Io { path: dir, source }),
            }
        }
        let path = dir.join(name);
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.file_type().is_symlink() => {
                return Err(DevcontainerError::Symlink { path })
            }
            Ok(_) => return Ok(Some(Path::new(folder).join(name))),
            Err(e) if e.kind() == ErrorKind::NotFound => continue,
            Err(source) => return Err(DevcontainerError::Io { path, source }),
        }
    }
    Ok(None)
}

/// The bytes of `project/relative` (as [`find_relative`] gave it), read
/// as the module documentation says.
pub fn read(project: &Path, relative: &Path) -> Result<Vec<u8>, DevcontainerError> {
    let path = project.join(relative);
    let io = |source| DevcontainerError::Io {
        path: path.clone(),
        source,
    };
    // An open refused because of `O_NOFOLLOW` fails with ELOOP (or
    // ENOTDIR with `O_DIRECTORY`): name the link rather than the errno.
    let refused = |e: std::io::Error, path: PathBuf| {
        let is_link =
            std::fs::symlink_metadata(&path).is_ok_and(|meta| meta.file_type().is_symlink());
        if is_link || e.raw_os_error() == Some(libc::ELOOP) {
            DevcontainerError::Symlink { path }
        } else {
            DevcontainerError::Io { path, source: e }
        }
    };
    let folder = relative.parent().unwrap_or(Path::new(""));
    let dir_path = project.join(folder);
    let dir = OpenOptions::new()
        .read(true)
        .custom_flags(if folder.as_os_str().is_empty() {
            libc::O_DIRECTORY
        } else {
            libc::O_DIRECTORY | libc::O_NOFOLLOW
        })
        .open(&dir_path)
        .map_err(|e| refused(e, dir_path.clone()))?;
    let name = relative.file_name().unwrap_or_default();
    let name = CString::new(name.as_bytes())
        .map_err(|_| DevcontainerError::NotAFile { path: path.clone() })?;
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
    let file = openat(&dir, name.as_c_str(), flags, Mode::empty())
        .map(File::from)
        .map_err(|e| refused(e.into(), path.clone()))?;
    let meta = file.metadata().map_err(io)?;
    if !meta.is_file() {
        return Err(DevcontainerError::NotAFile { path });
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(DevcontainerError::TooLarge {
            path,
            size: meta.len(),
        });
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(DevcontainerError::TooLarge {
            path,
            size: bytes.len() as u64,
        });
    }
    Ok(bytes)
}
