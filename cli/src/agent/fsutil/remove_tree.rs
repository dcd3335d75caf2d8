//! [`remove_tree`]: removes a directory tree the guest wrote, whatever it
//! holds, with a bounded number of descriptors and bounded memory.
//!
//! `std::fs::remove_dir_all` keeps one descriptor per level, so a tree a
//! few thousand levels deep (which any guest user can make) fails with
//! `EMFILE`, and its paths pass `PATH_MAX`. Here the walk works one name at
//! a time relative to open directory descriptors (`openat`, `unlinkat`,
//! `renameat2`), so paths are never built, and it never goes deeper than
//! [`WINDOW`] levels below the top: a directory found at that depth is
//! first renamed to a fresh name in the top directory (no copy, one
//! `rename` within the tree) and removed when the walk of the top reaches
//! it. At most `WINDOW + 3` descriptors are open and `WINDOW` names kept,
//! for any depth; every entry is handled a bounded number of times.
//!
//! What keeps the walk inside the tree: every name is one component read
//! from the directory itself (`.` and `..` are skipped), every directory is
//! opened with `O_NOFOLLOW | O_DIRECTORY` (a symlink is removed, never
//! followed), and a directory on another file system (a mount point) is not
//! entered: its removal fails with `EBUSY` instead. Directories the guest
//! made unreadable or unwritable (mode 000) get `u+rwx` before they are
//! entered, through their own descriptor; nothing outside the tree is
//! chmodded.
//!
//! A directory is removed after one pass over it from its start finds it
//! empty: file systems whose directory offsets shift when entries go
//! (older tmpfs) may skip names after a resume, and the last pass finds
//! them. An entry that cannot be removed stops the walk with its error.

use std::ffi::{CStr, CString};
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use rustix::fs::{
    chmod, fchmod, openat, renameat_with, seek, statat, unlinkat, AtFlags, FileType, Mode, OFlags,
    RawDir, RenameFlags, SeekFrom, Stat, CWD,
};
use rustix::io::Errno;

/// The deepest level entered below the top directory.
const WINDOW: usize = 16;
/// Bytes of directory entries read per `getdents64` call.
const DIRENT_BUF: usize = 32 * 1024;
/// How many fresh names are tried for one moved directory.
const FRESH_NAME_TRIES: u32 = 1000;

/// One directory being emptied.
struct Level {
    fd: OwnedFd,
    /// Its name in the level above (empty for the top).
    name: CString,
    /// Where listing continues (a `getdents64` offset).
    resume: u64,
    /// Whether the current pass began at offset 0 and found nothing yet.
    clean_pass: bool,
}

/// Removes `path` and everything beneath it; `path` itself may also be a
/// file or a symlink (removed, not followed). Fails with `NotFound` when
/// `path` does not exist, like `std::fs::remove_dir_all`.
pub fn remove_tree(path: &Path) -> io::Result<()> {
    let meta = std::fs::symlink_metadata(path)?;
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path holds a NUL byte"))?;
    if !meta.is_dir() {
        return std::fs::remove_file(path);
    }
    let top = open_dir(CWD, &c_path, None)?;
    let dev = stat_fd(top.as_fd())?.st_dev;
    empty_tree(top, dev)?;
    Ok(unlinkat(CWD, c_path.as_c_str(), AtFlags::REMOVEDIR)?)
}

/// Empties the directory `top` (on device `dev`) completely.
fn empty_tree(top: OwnedFd, dev: u64) -> io::Result<()> {
    let mut stack = vec![Level {
        fd: top,
        name: CString::default(),
        resume: 0,
        clean_pass: true,
    }];
    let mut buf = vec![MaybeUninit::<u8>::uninit(); DIRENT_BUF];
    let mut moved = 0u32;
    while let Some(level) = stack.last_mut() {
        let Some(name) = next_subdir(level, &mut buf)? else {
            if !level.clean_pass {
                // Entries went during this pass: look once more from the start.
                level.resume = 0;
                level.clean_pass = true;
                continue;
            }
            let done = stack.pop().map(|l| l.name);
            if let (Some(name), Some(parent)) = (done, stack.last()) {
                unlinkat(&parent.fd, name.as_c_str(), AtFlags::REMOVEDIR)
                    .map_err(|e| context(e, "cannot remove directory", &name))?;
            }
            continue;
        };
        // The level just listed is still the last one.
        let (top, dir) = (stack[0].fd.as_fd(), stack[stack.len() - 1].fd.as_fd());
        if stack.len() > WINDOW {
            move_to_top(dir, &name, top, dev, &mut moved)?;
        } else {
            let fd = open_dir(dir, &name, Some(dev))?;
            stack.push(Level {
                fd,
                name,
                resume: 0,
                clean_pass: true,
            });
        }
    }
    Ok(())
}

/// Lists `level` from its resume point, removing every entry that is not a
/// directory; returns the first directory found (remembering where to
/// continue after it), or `None` at the end of the listing.
fn next_subdir(level: &mut Level, buf: &mut [MaybeUninit<u8>]) -> io::Result<Option<CString>> {
    let fd = level.fd.as_fd();
    seek(fd, SeekFrom::Start(level.resume))?;
    // Each `next` past the entries read so far is one `getdents64` call.
    let mut entries = RawDir::new(fd, buf);
    while let Some(entry) = entries.next() {
        let entry = entry?;
        let name = entry.file_name();
        if name.is_empty() || name == c"." || name == c".." {
            continue;
        }
        level.clean_pass = false;
        if is_dir(fd, name, entry.file_type())? || !unlink_entry(fd, name)? {
            level.resume = entry.next_entry_cookie();
            return Ok(Some(name.to_owned()));
        }
    }
    Ok(None)
}

/// Whether `name` in `dir` is a directory, from `d_type` or `lstat`.
fn is_dir(dir: BorrowedFd<'_>, name: &CStr, d_type: FileType) -> io::Result<bool> {
    match d_type {
        FileType::Directory => Ok(true),
        FileType::Unknown => match statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(FileType::from_raw_mode(st.st_mode) == FileType::Directory),
            Err(Errno::NOENT) => Ok(false),
            Err(e) => Err(context(e, "cannot inspect", name)),
        },
        _ => Ok(false),
    }
}

/// Unlinks a non-directory; `Ok(false)` when it turned out to be one.
fn unlink_entry(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<bool> {
    match unlinkat(dir, name, AtFlags::empty()) {
        Ok(()) | Err(Errno::NOENT) => Ok(true),
        Err(Errno::ISDIR) => Ok(false),
        Err(e) => Err(context(e, "cannot remove", name)),
    }
}

/// Moves the directory `name` of `dir` to a fresh name in `top`, where the
/// walk of the top finds it later.
fn move_to_top(
    dir: BorrowedFd<'_>,
    name: &CStr,
    top: BorrowedFd<'_>,
    dev: u64,
    moved: &mut u32,
) -> io::Result<()> {
    // Opening fixes its permissions (moving a directory writes its `..`)
    // and checks that it is no mount point.
    drop(open_dir(dir, name, Some(dev))?);
    for _ in 0..FRESH_NAME_TRIES {
        *moved = moved.wrapping_add(1);
        let fresh = CString::new(format!(".keystone-removing-{}", *moved))
            .map_err(|_| io::Error::other("fresh name holds a NUL byte"))?;
        // NOREPLACE never overwrites an entry that already has the fresh
        // name.
        match renameat_with(dir, name, top, fresh.as_c_str(), RenameFlags::NOREPLACE) {
            Err(Errno::EXIST) => continue,
            r => return r.map_err(|e| context(e, "cannot move up", name)),
        }
    }
    Err(io::Error::other(
        "no fresh name left for a deep directory: remove the `.keystone-removing-*` entries",
    ))
}

/// Opens the directory `name` of `dir` for listing and removing, without
/// following a symlink, giving it `u+rwx` where it lacks them. With `dev`,
/// a directory on another file system is refused (`EBUSY`).
fn open_dir(dir: BorrowedFd<'_>, name: &CStr, dev: Option<u64>) -> io::Result<OwnedFd> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let fd = match openat(dir, name, flags, Mode::empty()) {
        Err(Errno::ACCESS) => {
            // Unreadable: fix the mode through a descriptor of the
            // directory itself (O_PATH needs no permission on it).
            let path_flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
            let path_fd = openat(dir, name, path_flags, Mode::empty())?;
            let st = stat_fd(path_fd.as_fd())?;
            let proc = CString::new(format!("/proc/self/fd/{}", path_fd.as_raw_fd()))
                .map_err(|_| io::Error::other("descriptor path holds a NUL byte"))?;
            chmod(proc.as_c_str(), with_rwx(&st))
                .map_err(|e| context(e, "cannot make readable", name))?;
            openat(&path_fd, c".", flags, Mode::empty())
        }
        r => r,
    }
    .map_err(|e| context(e, "cannot open directory", name))?;
    let st = stat_fd(fd.as_fd())?;
    if dev.is_some_and(|d| d != st.st_dev) {
        return Err(context(
            Errno::BUSY,
            "another file system is mounted at",
            name,
        ));
    }
    if st.st_mode & 0o700 != 0o700 {
        fchmod(&fd, with_rwx(&st)).map_err(|e| context(e, "cannot make writable", name))?;
    }
    Ok(fd)
}

/// The permission bits of `st` (set-id and sticky bits included) plus
/// `u+rwx`.
fn with_rwx(st: &Stat) -> Mode {
    Mode::from_raw_mode((st.st_mode & 0o7777) | 0o700)
}

/// `fstatat(fd, "", AT_EMPTY_PATH)`: works on an `O_PATH` descriptor too.
fn stat_fd(fd: BorrowedFd<'_>) -> io::Result<Stat> {
    Ok(statat(fd, c"", AtFlags::EMPTY_PATH)?)
}

/// `e` with what failed and on which name (escaped, cut to 64 bytes: the
/// names are the guest's), keeping its kind.
fn context(e: impl Into<io::Error>, what: &str, name: &CStr) -> io::Error {
    let e = e.into();
    let bytes = name.to_bytes();
    let shown = bytes[..bytes.len().min(64)].escape_ascii();
    io::Error::new(e.kind(), format!("{what} \"{shown}\": {e}"))
}

#[cfg(test)]
#[path = "remove_tree_tests.rs"]
mod tests;
