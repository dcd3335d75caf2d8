//! What `RESOLVE_BENEATH` alone does not give [`PassthroughFs`]: the check
//! that a directory node is still beneath the shared directory, the
//! read-only policy and the one device node the guest may create (the
//! overlayfs whiteout).
//!
//! Every node is opened beneath its parent, but `RESOLVE_BENEATH` is
//! relative to the parent's descriptor: if the host moves a directory the
//! guest holds (`shared/sub` to `/elsewhere/sub`), that descriptor now names
//! a directory outside, and names resolved beneath it would be outside too
//! (virtiofsd behaves that way). So requests that resolve or create names
//! in a directory node walk `..` from it until they meet the root's
//! `(st_dev, st_ino)`; reaching the top of the host's tree first answers
//! `ENOENT`. The walk costs two system calls per level of depth.
//!
//! Known limits: the check and the use are two steps, so a directory moved
//! out between them is used once more (the host's own race); and a
//! non-directory node (a file the host moves out, or a host-made hard link
//! to a file outside) has no `..` to walk: the guest keeps reading and
//! writing that same inode through its node, as with virtiofsd. It cannot
//! reach anything new that way, and cannot name anything outside.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use super::{sys, Node, PassthroughFs};
use crate::fuse::ROOT_ID;

/// Deeper than any real tree; a walk that long answers `ELOOP`.
const MAX_DEPTH: usize = 4096;

fn err(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

/// Whether `mode`/`rdev` describe an overlayfs whiteout: a character
/// device with number 0:0 (the only device node the guest may create).
pub(super) fn is_whiteout(mode: u32, rdev: u32) -> bool {
    mode & libc::S_IFMT == libc::S_IFCHR && rdev == 0
}

impl PassthroughFs {
    /// Fails with `ENOENT` unless the directory `dir` still lies beneath
    /// the shared directory (the root and non-directories pass).
    pub(super) fn check_beneath_root(&self, dir: &Node) -> io::Result<()> {
        if dir.inode == ROOT_ID || !dir.is_dir() {
            return Ok(());
        }
        let mut below = dir.key;
        let mut up: Option<OwnedFd> = None;
        for _ in 0..MAX_DEPTH {
            let from = up.as_ref().map_or(dir.raw_fd(), |f| f.as_raw_fd());
            let parent = sys::openat(
                from,
                c"..",
                libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                0,
            )?;
            let st = sys::stat_fd(parent.as_raw_fd())?;
            let key = (st.st_dev, st.st_ino);
            if key == self.root_key {
                return Ok(());
            }
            if key == below {
                // ".." of the host's root is itself: never met ours.
                return Err(err(libc::ENOENT));
            }
            below = key;
            up = Some(parent);
        }
        Err(err(libc::ELOOP))
    }

    /// `EROFS` when serving read-only.
    pub(super) fn check_writable(&self) -> io::Result<()> {
        if self.readonly {
            Err(err(libc::EROFS))
        } else {
            Ok(())
        }
    }

    /// `EROFS` when serving read-only and the guest's open flags would
    /// write (write access or `O_TRUNC`).
    pub(super) fn check_open_flags(&self, guest_flags: u32) -> io::Result<()> {
        let flags = guest_flags as i32;
        if flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0 {
            self.check_writable()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::is_whiteout;

    #[test]
    fn only_char_zero_zero_is_a_whiteout() {
        assert!(is_whiteout(libc::S_IFCHR | 0o600, 0));
        assert!(is_whiteout(libc::S_IFCHR, 0));
        assert!(!is_whiteout(libc::S_IFCHR | 0o600, 0x0103));
        assert!(!is_whiteout(libc::S_IFBLK | 0o600, 0));
        assert!(!is_whiteout(libc::S_IFREG | 0o600, 0));
    }
}
