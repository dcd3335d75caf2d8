//! `--sandbox namespace` for the standalone binary: like virtiofsd, the
//! daemon runs as PID 1 of a new PID namespace, in a new mount namespace
//! whose root is the shared directory (`pivot_root`), so even a bug in the
//! confinement of `PassthroughFs` cannot name a host path outside it.
//!
//! Order matters: [`enter_namespaces`] runs first, while the process has one
//! thread (it forks; the parent only waits and passes on the exit status).
//! The caller then binds its socket and opens the shared directory and
//! `/proc/self/fd` (descriptors survive the pivot), and only then calls
//! [`pivot_into`]. Never used by the in-process front door.

use std::ffi::CString;
use std::io;
use std::path::Path;

use crate::error::Error;

fn check(what: &'static str, ret: libc::c_int) -> Result<(), Error> {
    if ret < 0 {
        Err(Error::Sandbox {
            step: what,
            source: io::Error::last_os_error(),
        })
    } else {
        Ok(())
    }
}

/// What a process is after [`enter_namespaces`].
pub enum Role {
    /// The original process: the daemon ran in a child that exited with
    /// this status; exit with it.
    Parent(i32),
    /// PID 1 of the new namespaces: go on serving.
    Daemon,
}

/// Unshares the mount and PID namespaces and forks. Call it while the
/// process has a single thread.
pub fn enter_namespaces() -> Result<Role, Error> {
    // SAFETY: unshare only changes this process's namespaces.
    check("unshare(CLONE_NEWNS | CLONE_NEWPID)", unsafe {
        libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWPID)
    })?;
    // SAFETY: the process is single-threaded (documented precondition), so
    // the child may run arbitrary code after fork.
    let pid = unsafe { libc::fork() };
    check("fork", pid)?;
    if pid == 0 {
        // SAFETY: prctl(PR_SET_PDEATHSIG) only sets this process's attribute.
        check("prctl(PR_SET_PDEATHSIG)", unsafe {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL)
        })?;
        return Ok(Role::Daemon);
    }
    let mut status = 0;
    loop {
        // SAFETY: waits for our own child; `status` is valid for writes.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            break;
        }
        if r < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return Err(Error::Sandbox {
                step: "waitpid",
                source: io::Error::last_os_error(),
            });
        }
    }
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        128 + libc::WTERMSIG(status)
    };
    Ok(Role::Parent(code))
}

/// Makes `shared_dir` the root of this (already unshared) mount namespace
/// and the working directory. Descriptors opened before stay valid.
pub fn pivot_into(shared_dir: &Path) -> Result<(), Error> {
    let dir =
        CString::new(shared_dir.as_os_str().as_encoded_bytes()).map_err(|_| Error::Sandbox {
            step: "shared directory path",
            source: io::Error::from_raw_os_error(libc::EINVAL),
        })?;
    let none = std::ptr::null();
    // SAFETY: mount/chdir/pivot_root/umount2 get NUL-terminated paths (or
    // null where the kernel ignores them) and only affect this process's
    // mount namespace, which enter_namespaces made private to it.
    unsafe {
        // Nothing we mount propagates back to the host.
        check(
            "mount(/, MS_SLAVE | MS_REC)",
            libc::mount(
                none,
                c"/".as_ptr(),
                none,
                libc::MS_SLAVE | libc::MS_REC,
                none.cast(),
            ),
        )?;
        // pivot_root needs the new root to be a mount point.
        check(
            "bind-mount the shared directory",
            libc::mount(
                dir.as_ptr(),
                dir.as_ptr(),
                none,
                libc::MS_BIND | libc::MS_REC,
                none.cast(),
            ),
        )?;
        check("chdir(shared directory)", libc::chdir(dir.as_ptr()))?;
        check(
            "pivot_root",
            libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) as libc::c_int,
        )?;
        // The old root is stacked under the new one: detach it.
        check(
            "umount2(old root)",
            libc::umount2(c".".as_ptr(), libc::MNT_DETACH),
        )?;
        check("chdir(/)", libc::chdir(c"/".as_ptr()))?;
    }
    Ok(())
}
