//! Extended attributes of [`PassthroughFs`] nodes: only the `user.*`
//! namespace is passed through (GETXATTR of other names answers ENODATA,
//! SET/REMOVE answer ENOTSUP, LISTXATTR filters), and never on symlinks.
//! The calls go through `/proc/self/fd/N` of the node's confined `O_PATH`
//! descriptor, since the `f*xattr` calls do not accept `O_PATH`; each
//! worker thread names it relative to its own working directory, made
//! `/proc/self/fd`, so they work in the namespace sandbox too.
//!
//! The size the guest asks for is clamped to Linux's own limits
//! ([`XATTR_SIZE_MAX`], [`XATTR_LIST_MAX`]) before anything is allocated,
//! as the `getxattr`/`listxattr` system calls clamp theirs: a request for
//! 4 GiB costs 64 KiB. What does not fit answers `ERANGE`, or `E2BIG` when
//! even the largest buffer would not do, as those calls answer.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::AsRawFd;

use super::{sys, Node, PassthroughFs};
use crate::filesystem::{Inode, XattrReply};

fn err(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

/// The largest extended attribute value Linux reads or writes.
const XATTR_SIZE_MAX: u32 = 65536;
/// The largest list of names `listxattr` returns.
const XATTR_LIST_MAX: u32 = 65536;

/// The errno for a value or list longer than the buffer: `E2BIG` when the
/// buffer already had the largest size allowed, `ERANGE` otherwise.
fn too_long(asked: u32, max: u32) -> io::Error {
    err(if asked >= max {
        libc::E2BIG
    } else {
        libc::ERANGE
    })
}

fn is_user_xattr(name: &CStr) -> bool {
    name.to_bytes().starts_with(b"user.")
}

impl PassthroughFs {
    /// A path naming a node's descriptor, for the path-based calls
    /// (xattrs): `N`, relative to this thread's working directory made
    /// `/proc/self/fd` (which works inside the namespace sandbox, where no
    /// `/proc` is mounted), or `/proc/self/fd/N` when the thread cannot
    /// have a working directory of its own. The node is returned too: its
    /// descriptor must stay open while the path is used.
    fn proc_path(&self, inode: Inode) -> io::Result<(Node, CString)> {
        let data = self.inode(inode)?;
        let path = if sys::cwd_in_proc_fd(self.proc_self_fd.as_raw_fd()) {
            sys::fd_name(&data)
        } else {
            CString::new(format!("/proc/self/fd/{}", data.raw_fd()))
                .map_err(|_| err(libc::EINVAL))?
        };
        Ok((data, path))
    }

    pub(super) fn set_xattr(
        &self,
        inode: Inode,
        name: &CStr,
        value: &[u8],
        flags: u32,
    ) -> io::Result<()> {
        if !is_user_xattr(name) {
            return Err(err(libc::ENOTSUP));
        }
        let (node, path) = self.proc_path(inode)?;
        let symlink = node.is_symlink();
        if symlink {
            return Err(err(libc::EPERM));
        }
        // SAFETY: NUL-terminated path and name; `value` is valid for its length.
        sys::cvt(unsafe {
            libc::setxattr(
                path.as_ptr(),
                name.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                flags as i32,
            )
        })
    }

    pub(super) fn get_xattr(&self, inode: Inode, name: &CStr, size: u32) -> io::Result<XattrReply> {
        let (node, path) = self.proc_path(inode)?;
        let symlink = node.is_symlink();
        if !is_user_xattr(name) || symlink {
            return Err(err(libc::ENODATA));
        }
        let mut buf = vec![0u8; size.min(XATTR_SIZE_MAX) as usize];
        // SAFETY: `buf` is valid for writes of `buf.len()` bytes (a null-sized query when 0).
        let n = unsafe {
            libc::getxattr(
                path.as_ptr(),
                name.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::ERANGE) => too_long(size, XATTR_SIZE_MAX),
                _ => e,
            });
        }
        if size == 0 {
            return Ok(XattrReply::Count(n as u32));
        }
        buf.truncate(n as usize);
        Ok(XattrReply::Value(buf))
    }

    pub(super) fn list_xattr(&self, inode: Inode, size: u32) -> io::Result<XattrReply> {
        let (node, path) = self.proc_path(inode)?;
        let symlink = node.is_symlink();
        let mut names = Vec::new();
        if !symlink {
            // SAFETY: a null-sized query returns the needed length.
            let need = unsafe { libc::listxattr(path.as_ptr(), std::ptr::null_mut(), 0) };
            if need < 0 {
                return Err(io::Error::last_os_error());
            }
            // No list is longer than XATTR_LIST_MAX: for a longer one the
            // host's listxattr answers E2BIG, which is passed on.
            let mut buf = vec![0u8; (need as usize).min(XATTR_LIST_MAX as usize)];
            // SAFETY: `buf` is valid for writes of `buf.len()` bytes.
            let n = unsafe { libc::listxattr(path.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            buf.truncate(n as usize);
            for name in buf.split(|&b| b == 0).filter(|n| n.starts_with(b"user.")) {
                names.extend_from_slice(name);
                names.push(0);
            }
        }
        if size == 0 {
            return Ok(XattrReply::Count(names.len() as u32));
        }
        if names.len() > size.min(XATTR_LIST_MAX) as usize {
            return Err(too_long(size, XATTR_LIST_MAX));
        }
        Ok(XattrReply::Value(names))
    }

    pub(super) fn remove_xattr(&self, inode: Inode, name: &CStr) -> io::Result<()> {
        if !is_user_xattr(name) {
            return Err(err(libc::ENOTSUP));
        }
        let (node, path) = self.proc_path(inode)?;
        let symlink = node.is_symlink();
        if symlink {
            return Err(err(libc::EPERM));
        }
        // SAFETY: NUL-terminated path and name.
        sys::cvt(unsafe { libc::removexattr(path.as_ptr(), name.as_ptr()) })
    }
}
