//! Thin, checked wrappers around the `*at` system calls the passthrough
//! file system uses. Each turns a `-1` return into `io::Error` and owns the
//! returned descriptors; none of them follows a path on its own.

use std::ffi::CStr;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// `c""`, the empty path used with `AT_EMPTY_PATH`.
pub const EMPTY: &CStr = c"";

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Takes ownership of a descriptor returned by a successful call.
fn own(ret: libc::c_long) -> io::Result<OwnedFd> {
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor to us and nothing else
    // owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(ret as RawFd) })
}

/// `struct open_how` of `openat2(2)` (libc's is non-exhaustive).
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// `openat2(dirfd, name, flags, resolve)`.
pub fn openat2(dirfd: RawFd, name: &CStr, flags: i32, resolve: u64) -> io::Result<OwnedFd> {
    let how = OpenHow {
        flags: (flags | libc::O_CLOEXEC) as u64,
        mode: 0,
        resolve,
    };
    // SAFETY: `name` is NUL-terminated and `how` is a valid `open_how` whose
    // size we pass; the call only reads them.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dirfd,
            name.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    own(ret)
}

/// `openat(dirfd, name, flags | O_CLOEXEC, mode)`.
pub fn openat(dirfd: RawFd, name: &CStr, flags: i32, mode: u32) -> io::Result<OwnedFd> {
    // SAFETY: `name` is NUL-terminated; openat does not retain it.
    let ret = unsafe { libc::openat(dirfd, name.as_ptr(), flags | libc::O_CLOEXEC, mode) };
    own(ret.into())
}

/// `fstatat(fd, "", AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW)`: the inode behind `fd`.
pub fn stat_fd(fd: RawFd) -> io::Result<libc::stat64> {
    fstatat(fd, EMPTY, libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW)
}

/// `fstatat(dirfd, name, AT_SYMLINK_NOFOLLOW)`: the inode `name` in `dirfd`
/// names (a single component, symlinks not followed).
pub fn stat_at(dirfd: RawFd, name: &CStr) -> io::Result<libc::stat64> {
    fstatat(dirfd, name, libc::AT_SYMLINK_NOFOLLOW)
}

/// The identity of the inode behind `fd` that survives the reuse of its
/// inode number: `(st_dev, st_ino, birth time)`, the birth time 0 where the
/// file system does not record one.
pub fn identity_fd(fd: RawFd) -> io::Result<(u64, u64, i64, u32)> {
    let mut stx = MaybeUninit::<libc::statx>::zeroed();
    // SAFETY: `stx` is valid for writes of one statx and the path is "".
    check(unsafe {
        libc::statx(
            fd,
            EMPTY.as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
            libc::STATX_INO | libc::STATX_BTIME,
            stx.as_mut_ptr(),
        )
    })?;
    // SAFETY: statx succeeded, so it initialised `stx`.
    let stx = unsafe { stx.assume_init() };
    let dev = libc::makedev(stx.stx_dev_major, stx.stx_dev_minor);
    let (sec, nsec) = if stx.stx_mask & libc::STATX_BTIME != 0 {
        (stx.stx_btime.tv_sec, stx.stx_btime.tv_nsec)
    } else {
        (0, 0)
    };
    Ok((dev, stx.stx_ino, sec, nsec))
}

fn fstatat(dirfd: RawFd, name: &CStr, flags: i32) -> io::Result<libc::stat64> {
    let mut st = MaybeUninit::<libc::stat64>::zeroed();
    // SAFETY: `st` is valid for writes of one stat64 and `name` is
    // NUL-terminated; fstatat64 retains neither.
    check(unsafe { libc::fstatat64(dirfd, name.as_ptr(), st.as_mut_ptr(), flags) })?;
    // SAFETY: fstatat64 succeeded, so it initialised `st`.
    Ok(unsafe { st.assume_init() })
}

/// `fstatvfs64(fd)`.
pub fn statvfs_fd(fd: RawFd) -> io::Result<libc::statvfs64> {
    let mut st = MaybeUninit::<libc::statvfs64>::zeroed();
    // SAFETY: `st` is valid for writes of one statvfs64.
    check(unsafe { libc::fstatvfs64(fd, st.as_mut_ptr()) })?;
    // SAFETY: the call succeeded, so it initialised `st`.
    Ok(unsafe { st.assume_init() })
}

/// Runs a libc call that returns `-1` on error.
pub fn cvt(ret: libc::c_int) -> io::Result<()> {
    check(ret).map(|_| ())
}

/// `readlinkat(fd, "")`: the target of the symlink `fd` refers to.
pub fn readlink_fd(fd: RawFd) -> io::Result<Vec<u8>> {
    readlinkat(fd, EMPTY)
}

/// `readlinkat(dirfd, name)`.
pub fn readlinkat(dirfd: RawFd, name: &CStr) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes.
    let n = unsafe { libc::readlinkat(dirfd, name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(buf)
}

/// `renameat2(olddir, old, newdir, new, flags)`.
pub fn renameat2(
    olddir: RawFd,
    old: &CStr,
    newdir: RawFd,
    new: &CStr,
    flags: u32,
) -> io::Result<()> {
    // SAFETY: both names are NUL-terminated and only read.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            olddir,
            old.as_ptr(),
            newdir,
            new.as_ptr(),
            flags,
        )
    };
    cvt(ret as libc::c_int)
}

/// Gives the calling thread its own working directory and umask
/// (`unshare(CLONE_FS)`), once per thread. False when it cannot: the
/// thread then shares the process's.
fn own_fs_state() -> bool {
    thread_local! {
        static OWN: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
    }
    OWN.with(|own| {
        if let Some(done) = own.get() {
            return done;
        }
        // SAFETY: unshare(CLONE_FS) only detaches this thread's cwd/root/umask.
        let done = unsafe { libc::unshare(libc::CLONE_FS) } == 0;
        if !done {
            log::warn!(
                "unshare(CLONE_FS) failed ({}); new files get the process umask",
                io::Error::last_os_error()
            );
        }
        own.set(Some(done));
        done
    })
}

/// Clears the umask of the calling thread only, once per thread, so
/// created files get exactly the mode the guest asked for (the guest
/// kernel has already applied the guest's umask).
pub fn clear_thread_umask() {
    thread_local! {
        static DONE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }
    DONE.with(|done| {
        if done.get() || !own_fs_state() {
            return;
        }
        done.set(true);
        // SAFETY: umask cannot fail and now affects only this thread.
        unsafe { libc::umask(0) };
    });
}

/// Makes `/proc/self/fd` (the directory `proc_self_fd` holds open) the
/// calling thread's own working directory, once per thread, so that a
/// path-based call can name a node by its descriptor's number alone. That
/// works where `/proc` is not mounted: inside the namespace sandbox, whose
/// root is the shared directory. False when the thread cannot have a
/// working directory of its own (the process's is left alone).
pub fn cwd_in_proc_fd(proc_self_fd: RawFd) -> bool {
    thread_local! {
        static IN_PROC: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
    }
    IN_PROC.with(|in_proc| {
        if let Some(done) = in_proc.get() {
            return done;
        }
        // SAFETY: fchdir on a directory descriptor we hold; after
        // own_fs_state it changes this thread's working directory only.
        let done = own_fs_state() && unsafe { libc::fchdir(proc_self_fd) } == 0;
        in_proc.set(Some(done));
        done
    })
}

/// `fd` as a decimal name inside `/proc/self/fd`.
pub fn fd_name(fd: &impl AsRawFd) -> std::ffi::CString {
    // A decimal number never contains NUL.
    std::ffi::CString::new(fd.as_raw_fd().to_string()).unwrap_or_default()
}

/// The most bytes of a kernel file handle we keep (`MAX_HANDLE_SZ`).
const MAX_HANDLE_SZ: usize = 128;

/// `struct file_handle` with room for the largest handle.
#[repr(C)]
struct RawFileHandle {
    handle_bytes: u32,
    handle_type: i32,
    f_handle: [u8; MAX_HANDLE_SZ],
}

/// A kernel file handle (`name_to_handle_at(2)`): names an inode of one
/// mount without holding a descriptor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileHandle {
    handle_type: i32,
    bytes: Box<[u8]>,
}

/// `name_to_handle_at(fd, "", AT_EMPTY_PATH)`: the handle of the inode
/// behind `fd` and the id of its mount.
pub fn name_to_handle(fd: RawFd) -> io::Result<(FileHandle, i32)> {
    let mut raw = RawFileHandle {
        handle_bytes: MAX_HANDLE_SZ as u32,
        handle_type: 0,
        f_handle: [0; MAX_HANDLE_SZ],
    };
    let mut mount_id: libc::c_int = 0;
    // SAFETY: `raw` has room for `handle_bytes` bytes of handle, `mount_id`
    // for one int; the path is "".
    let ret = unsafe {
        libc::syscall(
            libc::SYS_name_to_handle_at,
            fd,
            EMPTY.as_ptr(),
            &mut raw as *mut RawFileHandle,
            &mut mount_id as *mut libc::c_int,
            libc::AT_EMPTY_PATH,
        )
    };
    check(ret as libc::c_int)?;
    let len = (raw.handle_bytes as usize).min(MAX_HANDLE_SZ);
    Ok((
        FileHandle {
            handle_type: raw.handle_type,
            bytes: raw.f_handle[..len].into(),
        },
        mount_id,
    ))
}

/// `open_by_handle_at(mount_fd, handle, flags | O_CLOEXEC)`. Needs
/// `CAP_DAC_READ_SEARCH`; `mount_fd` must not be an `O_PATH` descriptor.
pub fn open_by_handle(mount_fd: RawFd, handle: &FileHandle, flags: i32) -> io::Result<OwnedFd> {
    let mut raw = RawFileHandle {
        handle_bytes: handle.bytes.len() as u32,
        handle_type: handle.handle_type,
        f_handle: [0; MAX_HANDLE_SZ],
    };
    raw.f_handle[..handle.bytes.len()].copy_from_slice(&handle.bytes);
    // SAFETY: `raw` is a valid `file_handle` of `handle_bytes` bytes, only read.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_open_by_handle_at,
            mount_fd,
            &raw as *const RawFileHandle,
            flags | libc::O_CLOEXEC,
        )
    };
    own(ret)
}

/// Raises the soft `RLIMIT_NOFILE` to the hard one (as virtiofsd does) and
/// returns the soft limit now in force. The node descriptor budget is half
/// of it: with the usual soft 1024, every node past the 512th would be
/// re-opened from its file handle on each request.
pub fn raise_nofile_limit() -> u64 {
    let Some(lim) = nofile_rlimit() else {
        return 1024;
    };
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit reads one valid rlimit; lowering is not asked.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            return raised.rlim_cur;
        }
    }
    lim.rlim_cur
}

/// The soft `RLIMIT_NOFILE` of this process (1024 when it cannot be read).
pub fn nofile_limit() -> u64 {
    nofile_rlimit().map_or(1024, |l| l.rlim_cur)
}

fn nofile_rlimit() -> Option<libc::rlimit> {
    let mut lim = MaybeUninit::<libc::rlimit>::zeroed();
    // SAFETY: `lim` is valid for writes of one rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, lim.as_mut_ptr()) } != 0 {
        return None;
    }
    // SAFETY: getrlimit succeeded, so it initialised `lim`.
    Some(unsafe { lim.assume_init() })
}

/// While alive, the calling thread creates files as the guest's caller
/// (its file-system uid and gid), so new files and directories are owned
/// by the guest user who made them. Only a daemon running as root can do
/// this; otherwise it is a no-op and files belong to the daemon's user.
/// `setfsuid`/`setfsgid` are per thread: other workers are unaffected.
pub struct CallerCreds {
    previous: Option<(u32, u32)>,
}

impl CallerCreds {
    /// Switches to `uid`/`gid` for file creation.
    pub fn switch(uid: u32, gid: u32) -> Self {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Self { previous: None };
        }
        // SAFETY: the raw syscalls change only this thread's fs ids (the
        // libc wrappers of the set*id family would change every thread);
        // each returns the previous id.
        let (old_gid, old_uid) = unsafe {
            (
                libc::syscall(libc::SYS_setfsgid, gid) as u32,
                libc::syscall(libc::SYS_setfsuid, uid) as u32,
            )
        };
        Self {
            previous: Some((old_uid, old_gid)),
        }
    }
}

impl Drop for CallerCreds {
    fn drop(&mut self) {
        if let Some((uid, gid)) = self.previous {
            // SAFETY: restores this thread's previous fs ids.
            unsafe {
                libc::syscall(libc::SYS_setfsuid, uid);
                libc::syscall(libc::SYS_setfsgid, gid);
            }
        }
    }
}
