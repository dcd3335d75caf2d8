//! The `FileSystem` trait: one method per FUSE operation, with typed
//! arguments and results, each defaulting to `ENOSYS`.
//!
//! [`crate::server::Server`] decodes wire requests into calls on this trait
//! and encodes the results; [`crate::passthrough::PassthroughFs`] is the
//! implementation that serves a host directory. Errors are plain
//! `io::Error`s whose raw OS error becomes the FUSE reply's errno.

use std::ffi::CStr;
use std::io;
use std::time::Duration;

use crate::descriptor::{Reader, Writer};
use crate::fuse;

/// Who asked: the credentials from the request header.
#[derive(Clone, Copy, Debug, Default)]
pub struct Context {
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
}

/// A node id as the guest kernel knows it.
pub type Inode = u64;
/// An open file or directory handle.
pub type Handle = u64;

/// The result of a LOOKUP-like operation.
#[derive(Clone, Copy, Debug)]
pub struct Entry {
    pub inode: Inode,
    pub generation: u64,
    pub attr: libc::stat64,
    pub attr_timeout: Duration,
    pub entry_timeout: Duration,
}

impl Entry {
    /// The wire form of this entry.
    pub fn to_wire(&self) -> fuse::EntryOut {
        fuse::EntryOut {
            nodeid: self.inode,
            generation: self.generation,
            entry_valid: self.entry_timeout.as_secs(),
            attr_valid: self.attr_timeout.as_secs(),
            entry_valid_nsec: self.entry_timeout.subsec_nanos(),
            attr_valid_nsec: self.attr_timeout.subsec_nanos(),
            attr: attr_to_wire(&self.attr),
        }
    }
}

/// Converts a host `stat` into a FUSE attribute record. The inode number
/// is the host's, as in directory entries, so `st_ino` and `d_ino` agree.
pub fn attr_to_wire(st: &libc::stat64) -> fuse::Attr {
    fuse::Attr {
        ino: st.st_ino,
        size: st.st_size as u64,
        blocks: st.st_blocks as u64,
        atime: st.st_atime as u64,
        mtime: st.st_mtime as u64,
        ctime: st.st_ctime as u64,
        atimensec: st.st_atime_nsec as u32,
        mtimensec: st.st_mtime_nsec as u32,
        ctimensec: st.st_ctime_nsec as u32,
        mode: st.st_mode,
        nlink: st.st_nlink as u32,
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: st.st_rdev as u32,
        blksize: st.st_blksize as u32,
        flags: 0,
    }
}

/// What INIT offered and what the file system accepts.
#[derive(Clone, Copy, Debug, Default)]
pub struct InitOptions {
    /// `FUSE_*` capability flags (low 32 bits).
    pub flags: u32,
}

/// The fields of a SETATTR request.
#[derive(Clone, Copy, Debug)]
pub struct SetattrRequest {
    /// `fuse::fattr` bits saying which fields are valid.
    pub valid: u32,
    pub handle: Option<Handle>,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub atime: libc::timespec,
    pub mtime: libc::timespec,
}

/// One directory entry as the file system reports it.
#[derive(Clone, Copy, Debug)]
pub struct DirEntry<'a> {
    pub ino: u64,
    /// The cookie that resumes listing after this entry.
    pub offset: u64,
    /// `DT_*` type.
    pub typ: u32,
    pub name: &'a [u8],
}

/// Result of STATFS.
pub type StatVfs = libc::statvfs64;

/// One method per FUSE operation; every default answers `ENOSYS`.
#[allow(unused_variables)]
pub trait FileSystem: Send + Sync {
    /// INIT: returns the capability flags the file system wants enabled
    /// (a subset of `opts.flags`).
    fn init(&self, opts: InitOptions) -> io::Result<InitOptions> {
        Ok(InitOptions { flags: 0 })
    }
    /// DESTROY: the guest unmounted; drop all state.
    fn destroy(&self) {}
    /// The path of `inode` relative to the shared directory, for statistics.
    fn inode_path(&self, inode: Inode) -> Option<std::path::PathBuf> {
        None
    }
    fn lookup(&self, ctx: Context, parent: Inode, name: &CStr) -> io::Result<Entry> {
        Err(enosys())
    }
    /// How long the guest may remember that a name does not exist, when a
    /// LOOKUP finds nothing (`None`: not at all, the guest asks again).
    fn negative_entry_timeout(&self) -> Option<std::time::Duration> {
        None
    }
    fn forget(&self, ctx: Context, inode: Inode, count: u64) {}
    fn batch_forget(&self, ctx: Context, requests: &[(Inode, u64)]) {
        for &(inode, count) in requests {
            self.forget(ctx, inode, count);
        }
    }
    fn getattr(
        &self,
        ctx: Context,
        inode: Inode,
        handle: Option<Handle>,
    ) -> io::Result<(libc::stat64, Duration)> {
        Err(enosys())
    }
    fn setattr(
        &self,
        ctx: Context,
        inode: Inode,
        req: SetattrRequest,
    ) -> io::Result<(libc::stat64, Duration)> {
        Err(enosys())
    }
    fn readlink(&self, ctx: Context, inode: Inode) -> io::Result<Vec<u8>> {
        Err(enosys())
    }
    fn symlink(
        &self,
        ctx: Context,
        target: &CStr,
        parent: Inode,
        name: &CStr,
    ) -> io::Result<Entry> {
        Err(enosys())
    }
    fn mknod(
        &self,
        ctx: Context,
        parent: Inode,
        name: &CStr,
        mode: u32,
        rdev: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        Err(enosys())
    }
    fn mkdir(
        &self,
        ctx: Context,
        parent: Inode,
        name: &CStr,
        mode: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        Err(enosys())
    }
    fn unlink(&self, ctx: Context, parent: Inode, name: &CStr) -> io::Result<()> {
        Err(enosys())
    }
    fn rmdir(&self, ctx: Context, parent: Inode, name: &CStr) -> io::Result<()> {
        Err(enosys())
    }
    /// RENAME and RENAME2 (`flags` are `RENAME_NOREPLACE`/`RENAME_EXCHANGE`).
    fn rename(
        &self,
        ctx: Context,
        olddir: Inode,
        oldname: &CStr,
        newdir: Inode,
        newname: &CStr,
        flags: u32,
    ) -> io::Result<()> {
        Err(enosys())
    }
    fn link(
        &self,
        ctx: Context,
        inode: Inode,
        newparent: Inode,
        newname: &CStr,
    ) -> io::Result<Entry> {
        Err(enosys())
    }
    /// OPEN: returns the handle and `fuse::fopen` flags.
    fn open(&self, ctx: Context, inode: Inode, flags: u32) -> io::Result<(Option<Handle>, u32)> {
        Err(enosys())
    }
    /// CREATE: returns the entry, the handle and `fuse::fopen` flags.
    fn create(
        &self,
        ctx: Context,
        parent: Inode,
        name: &CStr,
        mode: u32,
        flags: u32,
        umask: u32,
    ) -> io::Result<(Entry, Option<Handle>, u32)> {
        Err(enosys())
    }
    /// READ: writes at most `size` bytes at `offset` into `w`; returns the count.
    fn read(
        &self,
        ctx: Context,
        inode: Inode,
        handle: Handle,
        w: &mut Writer<'_>,
        size: u32,
        offset: u64,
    ) -> io::Result<usize> {
        Err(enosys())
    }
    /// WRITE: writes `size` bytes from `r` at `offset`; returns the count.
    fn write(
        &self,
        ctx: Context,
        inode: Inode,
        handle: Handle,
        r: &mut Reader<'_>,
        size: u32,
        offset: u64,
    ) -> io::Result<usize> {
        Err(enosys())
    }
    fn statfs(&self, ctx: Context, inode: Inode) -> io::Result<StatVfs> {
        Err(enosys())
    }
    fn release(&self, ctx: Context, inode: Inode, handle: Handle) -> io::Result<()> {
        Err(enosys())
    }
    fn flush(&self, ctx: Context, inode: Inode, handle: Handle) -> io::Result<()> {
        Err(enosys())
    }
    fn fsync(&self, ctx: Context, inode: Inode, datasync: bool, handle: Handle) -> io::Result<()> {
        Err(enosys())
    }
    fn opendir(&self, ctx: Context, inode: Inode, flags: u32) -> io::Result<(Option<Handle>, u32)> {
        Err(enosys())
    }
    /// READDIR/READDIRPLUS: calls `add` for entries from cookie `offset` on,
    /// stopping when it returns `Ok(false)` (no room).
    fn readdir(
        &self,
        ctx: Context,
        inode: Inode,
        handle: Handle,
        offset: u64,
        add: &mut dyn FnMut(DirEntry<'_>) -> io::Result<bool>,
    ) -> io::Result<()> {
        Err(enosys())
    }
    fn releasedir(&self, ctx: Context, inode: Inode, handle: Handle) -> io::Result<()> {
        Err(enosys())
    }
    fn fsyncdir(
        &self,
        ctx: Context,
        inode: Inode,
        datasync: bool,
        handle: Handle,
    ) -> io::Result<()> {
        Err(enosys())
    }
    fn access(&self, ctx: Context, inode: Inode, mask: u32) -> io::Result<()> {
        Err(enosys())
    }
    fn fallocate(
        &self,
        ctx: Context,
        inode: Inode,
        handle: Handle,
        mode: u32,
        offset: u64,
        length: u64,
    ) -> io::Result<()> {
        Err(enosys())
    }
    fn lseek(
        &self,
        ctx: Context,
        inode: Inode,
        handle: Handle,
        offset: u64,
        whence: u32,
    ) -> io::Result<u64> {
        Err(enosys())
    }
    fn setxattr(
        &self,
        ctx: Context,
        inode: Inode,
        name: &CStr,
        value: &[u8],
        flags: u32,
    ) -> io::Result<()> {
        Err(enosys())
    }
    /// GETXATTR with `size == 0` asks for the value's length only.
    fn getxattr(
        &self,
        ctx: Context,
        inode: Inode,
        name: &CStr,
        size: u32,
    ) -> io::Result<XattrReply> {
        Err(enosys())
    }
    fn listxattr(&self, ctx: Context, inode: Inode, size: u32) -> io::Result<XattrReply> {
        Err(enosys())
    }
    fn removexattr(&self, ctx: Context, inode: Inode, name: &CStr) -> io::Result<()> {
        Err(enosys())
    }
    /// COPY_FILE_RANGE: copies up to `req.len` bytes between two open
    /// handles; returns how many were copied.
    fn copy_file_range(&self, ctx: Context, req: CopyRange) -> io::Result<usize> {
        Err(enosys())
    }
}

/// The arguments of COPY_FILE_RANGE, decoded.
#[derive(Clone, Copy, Debug, Default)]
pub struct CopyRange {
    pub inode_in: Inode,
    pub handle_in: Handle,
    pub offset_in: u64,
    pub inode_out: Inode,
    pub handle_out: Handle,
    pub offset_out: u64,
    pub len: u64,
    pub flags: u64,
}

/// The answer to GETXATTR/LISTXATTR.
#[derive(Clone, Debug)]
pub enum XattrReply {
    /// The value (or NUL-separated name list).
    Value(Vec<u8>),
    /// Only the size, when the guest asked with `size == 0`.
    Count(u32),
}

/// `ENOSYS` as an `io::Error`.
pub fn enosys() -> io::Error {
    io::Error::from_raw_os_error(libc::ENOSYS)
}
