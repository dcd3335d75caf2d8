//! `PassthroughFs`: serves one host directory, confined to it.
//!
//! The root node is an `O_PATH` descriptor of the shared directory. Every
//! other node is reached by LOOKUP of one name relative to its parent's
//! descriptor with `openat2(O_PATH | O_NOFOLLOW, RESOLVE_BENEATH |
//! RESOLVE_NO_MAGICLINKS)`; names with '/' are refused and ".." is answered
//! without touching the host, so no path leaves the tree. Operations then use
//! `*at` calls on those descriptors (`AT_EMPTY_PATH`) or re-open them through
//! `/proc/self/fd/N`, which is safe because the descriptor already names a
//! confined inode and symlinks are never re-opened that way.
//!
//! A directory node the host moves out of the shared directory keeps its
//! descriptor, and `RESOLVE_BENEATH` is relative to that descriptor, so
//! requests relative to directory nodes first check that the node is still
//! beneath the root (`confine.rs`).
//!
//! Files: `inode.rs` (node table), `handle.rs` (open files), `sys.rs`
//! (syscall wrappers), `ops.rs` (the [`FileSystem`](crate::FileSystem) impl),
//! `xattr.rs` (`user.*` extended attributes), `confine.rs` (the
//! still-beneath-the-root check and the read-only policy).

mod confine;
mod handle;
mod inode;
mod ops;
pub(crate) mod sys;
mod xattr;

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

pub use handle::HandleStore;
pub use inode::{InodeData, InodeStore, Node};

use crate::config::{CacheMode, FsConfig};
use crate::error::Error;
use crate::filesystem::Entry;
use crate::fuse::ROOT_ID;

/// A [`FileSystem`](crate::FileSystem) that passes requests through to one
/// host directory.
pub struct PassthroughFs {
    inodes: InodeStore,
    handles: HandleStore,
    /// `O_PATH` descriptor of `/proc/self/fd`, for re-opening nodes.
    proc_self_fd: OwnedFd,
    /// The shared directory's canonical path (for statistics only).
    root_path: PathBuf,
    cache: CacheMode,
    writeback_offered: bool,
    writeback: AtomicBool,
    allow_setuid: bool,
    readonly: bool,
    /// `(st_dev, st_ino)` of the shared directory.
    root_key: inode::InodeKey,
}

impl PassthroughFs {
    /// Opens `cfg.shared_dir` and `/proc/self/fd`.
    pub fn new(cfg: &FsConfig) -> Result<Self, Error> {
        let path = cfg.shared_dir.clone();
        let shared_err = |source: io::Error| Error::SharedDir {
            path: path.clone(),
            source,
        };
        let root_path = std::fs::canonicalize(&cfg.shared_dir).map_err(shared_err)?;
        let c_root = std::ffi::CString::new(root_path.as_os_str().as_encoded_bytes())
            .map_err(|_| shared_err(io::Error::from_raw_os_error(libc::EINVAL)))?;
        let root_fd = sys::openat(libc::AT_FDCWD, &c_root, libc::O_PATH | libc::O_DIRECTORY, 0)
            .map_err(shared_err)?;
        let st = sys::stat_fd(root_fd.as_raw_fd()).map_err(shared_err)?;
        let proc_self_fd = sys::openat(
            libc::AT_FDCWD,
            c"/proc/self/fd",
            libc::O_PATH | libc::O_DIRECTORY,
            0,
        )
        .map_err(Error::ProcFd)?;
        Ok(PassthroughFs {
            root_key: (st.st_dev, st.st_ino),
            inodes: InodeStore::new(root_fd, &st, cfg.file_handles).map_err(|e| {
                Error::FileHandles {
                    path: path.clone(),
                    source: e,
                }
            })?,
            handles: HandleStore::default(),
            proc_self_fd,
            root_path,
            cache: cfg.cache,
            writeback_offered: cfg.writeback,
            writeback: AtomicBool::new(false),
            allow_setuid: cfg.allow_setuid,
            readonly: cfg.readonly,
        })
    }

    /// The node table (for tests and diagnostics).
    pub fn inodes(&self) -> &InodeStore {
        &self.inodes
    }

    fn timeout(&self) -> Duration {
        self.cache.timeout()
    }

    /// The node `inode` with an `O_PATH` descriptor open while it lives.
    fn inode(&self, inode: u64) -> io::Result<Node> {
        self.inodes.node(inode)
    }

    /// Re-opens a node for I/O through `/proc/self/fd/N`. Symlinks are
    /// refused (`ELOOP`): re-opening them would follow their target. So are
    /// FIFOs, sockets and device nodes (`ENXIO`): opening a FIFO would block
    /// the worker, and the guest kernel serves special files itself.
    fn reopen(&self, data: &Node, flags: i32) -> io::Result<OwnedFd> {
        if data.is_symlink() {
            return Err(io::Error::from_raw_os_error(libc::ELOOP));
        }
        if data.file_type != libc::S_IFREG && !data.is_dir() {
            return Err(io::Error::from_raw_os_error(libc::ENXIO));
        }
        let flags = flags & !(libc::O_CREAT | libc::O_EXCL | libc::O_NOCTTY | libc::O_NOFOLLOW);
        sys::openat(self.proc_self_fd.as_raw_fd(), &sys::fd_name(data), flags, 0)
    }

    /// Looks `name` up beneath `parent` and takes one lookup reference.
    fn do_lookup(&self, parent: &Node, name: &CStr) -> io::Result<Entry> {
        let bytes = name.to_bytes();
        if bytes == b"." || (bytes == b".." && parent.inode == ROOT_ID) {
            // "." is the parent itself; ".." of the root stays at the root.
            let st = sys::stat_fd(parent.raw_fd())?;
            self.inodes.add_ref(parent);
            return Ok(self.entry(parent.inode, st));
        }
        check_name(name)?;
        let fd = sys::openat2(
            parent.raw_fd(),
            name,
            libc::O_PATH | libc::O_NOFOLLOW,
            libc::RESOLVE_BENEATH | libc::RESOLVE_NO_MAGICLINKS,
        )?;
        // Checked after the open: a parent moved out before it fails here,
        // one moved out later no longer leads anywhere new (see confine.rs).
        self.check_beneath_root(parent)?;
        let st = sys::stat_fd(fd.as_raw_fd())?;
        let data = self.inodes.add_lookup(fd, &st, Some((parent.data(), name)));
        Ok(self.entry(data.inode, st))
    }

    /// Registers an inode from an already open (confined) descriptor, as
    /// CREATE does with `name` in `parent`, and takes one lookup reference.
    fn lookup_fd(&self, fd: &OwnedFd, parent: &Node, name: &CStr) -> io::Result<Entry> {
        let path_fd = sys::openat(
            self.proc_self_fd.as_raw_fd(),
            &sys::fd_name(fd),
            libc::O_PATH,
            0,
        )?;
        let st = sys::stat_fd(path_fd.as_raw_fd())?;
        let data = self
            .inodes
            .add_lookup(path_fd, &st, Some((parent.data(), name)));
        Ok(self.entry(data.inode, st))
    }

    fn entry(&self, inode: u64, attr: libc::stat64) -> Entry {
        Entry {
            inode,
            generation: 0,
            attr,
            attr_timeout: self.timeout(),
            entry_timeout: self.timeout(),
        }
    }

    /// Permission bits the guest may set: setuid/setgid stripped unless allowed.
    fn sanitize_mode(&self, mode: u32) -> u32 {
        let perms = mode & 0o7777;
        if self.allow_setuid {
            perms
        } else {
            perms & !(libc::S_ISUID | libc::S_ISGID)
        }
    }

    /// The node's path relative to the shared directory.
    fn relative_path(&self, data: &Node) -> Option<PathBuf> {
        let target = sys::readlinkat(self.proc_self_fd.as_raw_fd(), &sys::fd_name(data)).ok()?;
        use std::os::unix::ffi::OsStrExt;
        let abs = PathBuf::from(std::ffi::OsStr::from_bytes(&target));
        abs.strip_prefix(&self.root_path)
            .ok()
            .map(|p| p.to_path_buf())
    }
}

/// Refuses names that are not a single path component.
fn check_name(name: &CStr) -> io::Result<()> {
    let b = name.to_bytes();
    if b.is_empty() || b.contains(&b'/') || b == b"." || b == b".." {
        return Err(io::Error::from_raw_os_error(if b == b".." {
            libc::EPERM
        } else {
            libc::EINVAL
        }));
    }
    Ok(())
}
