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
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

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
    resume: i64,
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
    let top = open_dir(libc::AT_FDCWD, &c_path, None)?;
    let dev = stat_fd(top.as_raw_fd())?.st_dev;
    empty_tree(top, dev)?;
    // SAFETY: NUL-terminated path.
    cvt(unsafe { libc::unlinkat(libc::AT_FDCWD, c_path.as_ptr(), libc::AT_REMOVEDIR) })
}

/// Empties the directory `top` (on device `dev`) completely.
fn empty_tree(top: OwnedFd, dev: u64) -> io::Result<()> {
    let mut stack = vec![Level {
        fd: top,
        name: CString::default(),
        resume: 0,
        clean_pass: true,
    }];
    let mut buf = vec![0u8; DIRENT_BUF];
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
                // SAFETY: `name` is one NUL-terminated component.
                let ret = unsafe {
                    libc::unlinkat(parent.fd.as_raw_fd(), name.as_ptr(), libc::AT_REMOVEDIR)
                };
                cvt(ret).map_err(|e| context(e, "cannot remove directory", &name))?;
            }
            continue;
        };
        let dir = level.fd.as_raw_fd();
        if stack.len() > WINDOW {
            move_to_top(dir, &name, stack[0].fd.as_raw_fd(), dev, &mut moved)?;
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
fn next_subdir(level: &mut Level, buf: &mut [u8]) -> io::Result<Option<CString>> {
    let fd = level.fd.as_raw_fd();
    // SAFETY: lseek on a directory descriptor we own.
    if unsafe { libc::lseek64(fd, level.resume, libc::SEEK_SET) } < 0 {
        return Err(io::Error::last_os_error());
    }
    loop {
        // SAFETY: `buf` is valid for writes of `buf.len()` bytes.
        let n = unsafe { libc::syscall(libc::SYS_getdents64, fd, buf.as_mut_ptr(), buf.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n == 0 {
            return Ok(None);
        }
        let mut pos = 0usize;
        // struct linux_dirent64 { u64 d_ino; i64 d_off; u16 d_reclen; u8 d_type; char d_name[]; }
        while let Some(rec) = buf.get(pos..n as usize).filter(|r| r.len() >= 19) {
            let off = i64::from_ne_bytes(rec[8..16].try_into().unwrap_or_default());
            let reclen = usize::from(u16::from_ne_bytes([rec[16], rec[17]]));
            let Some(field) = rec.get(19..reclen).filter(|_| reclen >= 19) else {
                return Err(io::Error::other(
                    "malformed directory entry from getdents64",
                ));
            };
            pos += reclen;
            let len = field.iter().position(|&b| b == 0).unwrap_or(field.len());
            let name = &field[..len];
            if name.is_empty() || name == b"." || name == b".." {
                continue;
            }
            level.clean_pass = false;
            let Ok(name) = CString::new(name) else {
                continue;
            };
            if is_dir(fd, &name, rec[18])? || !unlink_entry(fd, &name)? {
                level.resume = off;
                return Ok(Some(name));
            }
        }
    }
}

/// Whether `name` in `dir` is a directory, from `d_type` or `lstat`.
fn is_dir(dir: RawFd, name: &CStr, d_type: u8) -> io::Result<bool> {
    match d_type {
        libc::DT_DIR => Ok(true),
        libc::DT_UNKNOWN => match stat_at(dir, name) {
            Ok(st) => Ok(st.st_mode & libc::S_IFMT == libc::S_IFDIR),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(context(e, "cannot inspect", name)),
        },
        _ => Ok(false),
    }
}

/// Unlinks a non-directory; `Ok(false)` when it turned out to be one.
fn unlink_entry(dir: RawFd, name: &CStr) -> io::Result<bool> {
    // SAFETY: `name` is one NUL-terminated component.
    match cvt(unsafe { libc::unlinkat(dir, name.as_ptr(), 0) }) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EISDIR) => Ok(false),
        Err(e) => Err(context(e, "cannot remove", name)),
    }
}

/// Moves the directory `name` of `dir` to a fresh name in `top`, where the
/// walk of the top finds it later.
fn move_to_top(dir: RawFd, name: &CStr, top: RawFd, dev: u64, moved: &mut u32) -> io::Result<()> {
    // Opening fixes its permissions (moving a directory writes its `..`)
    // and checks that it is no mount point.
    drop(open_dir(dir, name, Some(dev))?);
    for _ in 0..FRESH_NAME_TRIES {
        *moved = moved.wrapping_add(1);
        let fresh = CString::new(format!(".keystone-removing-{}", *moved))
            .map_err(|_| io::Error::other("fresh name holds a NUL byte"))?;
        // SAFETY: both names are NUL-terminated components; NOREPLACE
        // never overwrites an entry that already has the fresh name.
        let ret = unsafe {
            libc::renameat2(
                dir,
                name.as_ptr(),
                top,
                fresh.as_ptr(),
                libc::RENAME_NOREPLACE,
            )
        };
        match cvt(ret) {
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => continue,
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
fn open_dir(dir: RawFd, name: &CStr, dev: Option<u64>) -> io::Result<OwnedFd> {
    let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    let fd = match openat(dir, name, flags) {
        Err(e) if e.raw_os_error() == Some(libc::EACCES) => {
            // Unreadable: fix the mode through a descriptor of the
            // directory itself (O_PATH needs no permission on it).
            let path_fd = openat(dir, name, libc::O_PATH | (flags & !libc::O_RDONLY))?;
            let st = stat_fd(path_fd.as_raw_fd())?;
            let proc = CString::new(format!("/proc/self/fd/{}", path_fd.as_raw_fd()))
                .map_err(|_| io::Error::other("descriptor path holds a NUL byte"))?;
            // SAFETY: NUL-terminated path naming the directory we hold.
            cvt(unsafe { libc::chmod(proc.as_ptr(), (st.st_mode & 0o7777) | 0o700) })
                .map_err(|e| context(e, "cannot make readable", name))?;
            openat(path_fd.as_raw_fd(), c".", flags)
        }
        r => r,
    }
    .map_err(|e| context(e, "cannot open directory", name))?;
    let st = stat_fd(fd.as_raw_fd())?;
    if dev.is_some_and(|d| d != st.st_dev) {
        let e = io::Error::from_raw_os_error(libc::EBUSY);
        return Err(context(e, "another file system is mounted at", name));
    }
    if st.st_mode & 0o700 != 0o700 {
        // SAFETY: fchmod on the directory descriptor just opened.
        cvt(unsafe { libc::fchmod(fd.as_raw_fd(), (st.st_mode & 0o7777) | 0o700) })
            .map_err(|e| context(e, "cannot make writable", name))?;
    }
    Ok(fd)
}

fn openat(dir: RawFd, name: &CStr, flags: i32) -> io::Result<OwnedFd> {
    // SAFETY: `name` is NUL-terminated; openat does not retain it.
    let fd = unsafe { libc::openat(dir, name.as_ptr(), flags | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn stat_fd(fd: RawFd) -> io::Result<libc::stat64> {
    fstatat(fd, c"", libc::AT_EMPTY_PATH)
}

fn stat_at(dir: RawFd, name: &CStr) -> io::Result<libc::stat64> {
    fstatat(dir, name, libc::AT_SYMLINK_NOFOLLOW)
}

fn fstatat(dir: RawFd, name: &CStr, flags: i32) -> io::Result<libc::stat64> {
    let mut st = std::mem::MaybeUninit::<libc::stat64>::zeroed();
    // SAFETY: `st` is valid for writes of one stat64; `name` is NUL-terminated.
    cvt(unsafe { libc::fstatat64(dir, name.as_ptr(), st.as_mut_ptr(), flags) })?;
    // SAFETY: fstatat64 succeeded, so it initialised `st`.
    Ok(unsafe { st.assume_init() })
}

fn cvt(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `e` with what failed and on which name (escaped, cut to 64 bytes: the
/// names are the guest's), keeping its kind.
fn context(e: io::Error, what: &str, name: &CStr) -> io::Error {
    let bytes = name.to_bytes();
    let shown = bytes[..bytes.len().min(64)].escape_ascii();
    io::Error::new(e.kind(), format!("{what} \"{shown}\": {e}"))
}

#[cfg(test)]
#[path = "remove_tree_tests.rs"]
mod tests;
