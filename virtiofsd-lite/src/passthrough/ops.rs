//! The [`FileSystem`] operations of [`PassthroughFs`]: each one resolves
//! node ids to confined descriptors and issues one or two `*at` calls.
//!
//! The daemon acts as root (no credential switching yet); what it refuses
//! on the guest's behalf is block/char device nodes (but the overlayfs
//! whiteout, char 0:0), setuid/setgid bits (unless allowed), non-`user.*`
//! extended attributes and re-opening symlinks; and, when read-only, every
//! change (`EROFS`).

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, IntoRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::confine::is_whiteout;
use super::{check_name, sys, PassthroughFs};
use crate::config::CacheMode;
use crate::descriptor::{Reader, Writer};
use crate::filesystem::{
    Context, CopyRange, DirEntry, Entry, FileSystem, Handle, InitOptions, Inode, SetattrRequest,
    StatVfs, XattrReply,
};
use crate::fuse::{fattr, fopen, init_flags};

fn err(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

/// The open flags we pass on from the guest (plus the access mode).
const PASSED_OPEN_FLAGS: i32 = libc::O_APPEND
    | libc::O_TRUNC
    | libc::O_DIRECT
    | libc::O_DSYNC
    | libc::O_SYNC
    | libc::O_NONBLOCK
    | libc::O_NOATIME
    | libc::O_LARGEFILE
    | libc::O_ACCMODE;

impl PassthroughFs {
    fn open_flags(&self, guest_flags: u32) -> i32 {
        let mut flags = guest_flags as i32 & PASSED_OPEN_FLAGS;
        if self.writeback.load(Ordering::Relaxed) {
            // With writeback caching the guest may read pages of files it
            // opened write-only, and handles appends itself.
            if flags & libc::O_ACCMODE == libc::O_WRONLY {
                flags = (flags & !libc::O_ACCMODE) | libc::O_RDWR;
            }
            flags &= !libc::O_APPEND;
        }
        flags
    }

    fn fopen_flags(&self, dir: bool) -> u32 {
        match (self.cache, dir) {
            (CacheMode::Never, false) => fopen::DIRECT_IO,
            (CacheMode::Always, false) => fopen::KEEP_CACHE,
            (CacheMode::Always, true) => fopen::CACHE_DIR,
            _ => 0,
        }
    }

    fn stat_of(&self, inode: Inode) -> io::Result<(libc::stat64, Duration)> {
        let data = self.inode(inode)?;
        Ok((sys::stat_fd(data.raw_fd())?, self.timeout()))
    }

    fn new_entry_at(
        &self,
        parent: Inode,
        name: &CStr,
        make: impl FnOnce(i32) -> i32,
    ) -> io::Result<Entry> {
        check_name(name)?;
        self.check_writable()?;
        sys::clear_thread_umask();
        let p = self.inode(parent)?;
        self.check_beneath_root(&p)?;
        sys::cvt(make(p.raw_fd()))?;
        self.do_lookup(&p, name)
    }
}

impl FileSystem for PassthroughFs {
    fn init(&self, opts: InitOptions) -> io::Result<InitOptions> {
        let mut flags = opts.flags;
        if !self.writeback_offered || self.readonly {
            flags &= !init_flags::WRITEBACK_CACHE;
        }
        if self.cache == CacheMode::Never {
            // The guest keeps no entry with a zero timeout, so READDIRPLUS
            // would pay a host lookup per listed name (and the guest a
            // FORGET for each) for nothing.
            flags &= !(init_flags::DO_READDIRPLUS | init_flags::READDIRPLUS_AUTO);
        }
        self.writeback
            .store(flags & init_flags::WRITEBACK_CACHE != 0, Ordering::Relaxed);
        Ok(InitOptions { flags })
    }

    fn destroy(&self) {
        self.handles.clear();
        self.inodes.clear();
    }

    fn inode_path(&self, inode: Inode) -> Option<std::path::PathBuf> {
        self.relative_path(&self.inodes.node(inode).ok()?)
    }

    fn lookup(&self, _ctx: Context, parent: Inode, name: &CStr) -> io::Result<Entry> {
        let p = self.inode(parent)?;
        self.do_lookup(&p, name)
    }

    fn negative_entry_timeout(&self) -> Option<Duration> {
        // The same lifetime as a positive entry: none with `--cache never`.
        Some(self.timeout()).filter(|t| !t.is_zero())
    }

    fn forget(&self, _ctx: Context, inode: Inode, count: u64) {
        self.inodes.forget(inode, count);
    }

    fn getattr(
        &self,
        _ctx: Context,
        inode: Inode,
        _h: Option<Handle>,
    ) -> io::Result<(libc::stat64, Duration)> {
        self.stat_of(inode)
    }

    fn setattr(
        &self,
        _ctx: Context,
        inode: Inode,
        req: SetattrRequest,
    ) -> io::Result<(libc::stat64, Duration)> {
        self.check_writable()?;
        let data = self.inode(inode)?;
        let handle = match req.handle {
            Some(h) => Some(self.handles.get(h, inode)?),
            None => None,
        };
        let proc_fd = self.proc_self_fd.as_raw_fd();
        let name = sys::fd_name(&data);
        if req.valid & fattr::MODE != 0 {
            let mode = self.sanitize_mode(req.mode);
            let ret = match &handle {
                // SAFETY: fchmod on an open descriptor.
                Some(h) => unsafe { libc::fchmod(h.raw_fd(), mode) },
                None if data.is_symlink() => return Err(err(libc::EOPNOTSUPP)),
                // SAFETY: NUL-terminated name relative to /proc/self/fd.
                None => unsafe { libc::fchmodat(proc_fd, name.as_ptr(), mode, 0) },
            };
            sys::cvt(ret)?;
        }
        if req.valid & (fattr::UID | fattr::GID) != 0 {
            let uid = if req.valid & fattr::UID != 0 {
                req.uid
            } else {
                u32::MAX
            };
            let gid = if req.valid & fattr::GID != 0 {
                req.gid
            } else {
                u32::MAX
            };
            let flags = libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW;
            // SAFETY: fchownat on our O_PATH descriptor with the empty path.
            sys::cvt(unsafe {
                libc::fchownat(data.raw_fd(), sys::EMPTY.as_ptr(), uid, gid, flags)
            })?;
        }
        if req.valid & fattr::SIZE != 0 {
            let size = i64::try_from(req.size).map_err(|_| err(libc::EFBIG))?;
            let opened;
            let fd = match &handle {
                Some(h) => h.raw_fd(),
                None => {
                    opened = self.reopen(&data, libc::O_WRONLY)?;
                    opened.as_raw_fd()
                }
            };
            // SAFETY: ftruncate on an open descriptor.
            sys::cvt(unsafe { libc::ftruncate64(fd, size) })?;
        }
        if req.valid & (fattr::ATIME | fattr::MTIME | fattr::ATIME_NOW | fattr::MTIME_NOW) != 0 {
            let times = [req.atime, req.mtime];
            let (dirfd, path, flags) = if data.is_symlink() {
                (data.raw_fd(), sys::EMPTY, libc::AT_EMPTY_PATH)
            } else {
                (proc_fd, name.as_c_str(), 0)
            };
            // SAFETY: `times` is two valid timespecs; the path is NUL-terminated.
            let ret = unsafe { libc::utimensat(dirfd, path.as_ptr(), times.as_ptr(), flags) };
            sys::cvt(ret)?;
        }
        self.stat_of(inode)
    }

    fn readlink(&self, _ctx: Context, inode: Inode) -> io::Result<Vec<u8>> {
        let data = self.inode(inode)?;
        if !data.is_symlink() {
            return Err(err(libc::EINVAL));
        }
        sys::readlink_fd(data.raw_fd())
    }

    fn symlink(
        &self,
        ctx: Context,
        target: &CStr,
        parent: Inode,
        name: &CStr,
    ) -> io::Result<Entry> {
        let _creds = sys::CallerCreds::switch(ctx.uid, ctx.gid);
        // SAFETY: both strings are NUL-terminated; `dirfd` is our O_PATH dir.
        self.new_entry_at(parent, name, |dirfd| unsafe {
            libc::symlinkat(target.as_ptr(), dirfd, name.as_ptr())
        })
    }

    fn mknod(
        &self,
        ctx: Context,
        parent: Inode,
        name: &CStr,
        mode: u32,
        rdev: u32,
        _umask: u32,
    ) -> io::Result<Entry> {
        let kind = mode & libc::S_IFMT;
        // The overlayfs whiteout (char 0:0) names no device: allowed.
        if (kind == libc::S_IFBLK || kind == libc::S_IFCHR) && !is_whiteout(mode, rdev) {
            return Err(err(libc::EPERM));
        }
        let mode = kind | self.sanitize_mode(mode);
        let _creds = sys::CallerCreds::switch(ctx.uid, ctx.gid);
        // SAFETY: NUL-terminated name; `dirfd` is our O_PATH dir.
        self.new_entry_at(parent, name, |dirfd| unsafe {
            libc::mknodat(dirfd, name.as_ptr(), mode, u64::from(rdev))
        })
    }

    fn mkdir(
        &self,
        ctx: Context,
        parent: Inode,
        name: &CStr,
        mode: u32,
        _umask: u32,
    ) -> io::Result<Entry> {
        let mode = mode & 0o7777 & !(if self.allow_setuid { 0 } else { libc::S_ISUID });
        let _creds = sys::CallerCreds::switch(ctx.uid, ctx.gid);
        // SAFETY: NUL-terminated name; `dirfd` is our O_PATH dir.
        self.new_entry_at(parent, name, |dirfd| unsafe {
            libc::mkdirat(dirfd, name.as_ptr(), mode)
        })
    }

    fn unlink(&self, _ctx: Context, parent: Inode, name: &CStr) -> io::Result<()> {
        check_name(name)?;
        self.check_writable()?;
        let p = self.inode(parent)?;
        self.check_beneath_root(&p)?;
        // SAFETY: NUL-terminated name relative to our O_PATH dir.
        sys::cvt(unsafe { libc::unlinkat(p.raw_fd(), name.as_ptr(), 0) })
    }

    fn rmdir(&self, _ctx: Context, parent: Inode, name: &CStr) -> io::Result<()> {
        check_name(name)?;
        self.check_writable()?;
        let p = self.inode(parent)?;
        self.check_beneath_root(&p)?;
        // SAFETY: NUL-terminated name relative to our O_PATH dir.
        sys::cvt(unsafe { libc::unlinkat(p.raw_fd(), name.as_ptr(), libc::AT_REMOVEDIR) })
    }

    fn rename(
        &self,
        _ctx: Context,
        olddir: Inode,
        oldname: &CStr,
        newdir: Inode,
        newname: &CStr,
        flags: u32,
    ) -> io::Result<()> {
        // RENAME_WHITEOUT leaves an overlayfs whiteout (char 0:0) at the
        // old name; overlayfs needs it from a virtio-fs upper layer.
        if flags & !(libc::RENAME_NOREPLACE | libc::RENAME_EXCHANGE | libc::RENAME_WHITEOUT) != 0 {
            return Err(err(libc::EINVAL));
        }
        check_name(oldname)?;
        check_name(newname)?;
        self.check_writable()?;
        let (o, n) = (self.inode(olddir)?, self.inode(newdir)?);
        self.check_beneath_root(&o)?;
        self.check_beneath_root(&n)?;
        sys::renameat2(o.raw_fd(), oldname, n.raw_fd(), newname, flags)?;
        // Nodes reached by name follow their file (both, for an exchange).
        if self.inodes.named() > 0 {
            let mut moved = vec![(&n, newname)];
            if flags & libc::RENAME_EXCHANGE != 0 {
                moved.push((&o, oldname));
            }
            for (dir, name) in moved {
                if let Ok(st) = sys::stat_at(dir.raw_fd(), name) {
                    self.inodes.moved(dir.data(), name, &st);
                }
            }
        }
        Ok(())
    }

    fn link(
        &self,
        _ctx: Context,
        inode: Inode,
        newparent: Inode,
        newname: &CStr,
    ) -> io::Result<Entry> {
        let data = self.inode(inode)?;
        let empty = sys::EMPTY.as_ptr();
        // SAFETY: linkat of our confined O_PATH descriptor with the empty path.
        self.new_entry_at(newparent, newname, |dirfd| unsafe {
            libc::linkat(
                data.raw_fd(),
                empty,
                dirfd,
                newname.as_ptr(),
                libc::AT_EMPTY_PATH,
            )
        })
    }

    fn open(&self, _ctx: Context, inode: Inode, flags: u32) -> io::Result<(Option<Handle>, u32)> {
        let data = self.inode(inode)?;
        if data.is_dir() {
            return Err(err(libc::EISDIR));
        }
        self.check_open_flags(flags)?;
        let fd = self.reopen(&data, self.open_flags(flags))?;
        Ok((
            Some(self.handles.insert(inode, fd)),
            self.fopen_flags(false),
        ))
    }

    fn create(
        &self,
        ctx: Context,
        parent: Inode,
        name: &CStr,
        mode: u32,
        flags: u32,
        _umask: u32,
    ) -> io::Result<(Entry, Option<Handle>, u32)> {
        check_name(name)?;
        self.check_writable()?;
        sys::clear_thread_umask();
        let p = self.inode(parent)?;
        self.check_beneath_root(&p)?;
        let _creds = sys::CallerCreds::switch(ctx.uid, ctx.gid);
        // O_NOFOLLOW: never create or open through a symlink at `name`.
        let oflags = self.open_flags(flags)
            | libc::O_CREAT
            | libc::O_NOFOLLOW
            | (flags as i32 & libc::O_EXCL);
        // O_NONBLOCK: an existing FIFO at `name` must not block the worker;
        // only regular files are served (as in OPEN).
        let fd = sys::openat(
            p.raw_fd(),
            name,
            oflags | libc::O_NONBLOCK,
            self.sanitize_mode(mode),
        )?;
        if sys::stat_fd(fd.as_raw_fd())?.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(err(libc::ENXIO));
        }
        if oflags & libc::O_NONBLOCK == 0 {
            // SAFETY: F_SETFL on a descriptor we own.
            sys::cvt(unsafe {
                libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, oflags & !libc::O_NONBLOCK)
            })?;
        }
        let entry = self.lookup_fd(&fd, &p, name)?;
        let h = self.handles.insert(entry.inode, fd);
        Ok((entry, Some(h), self.fopen_flags(false)))
    }

    fn read(
        &self,
        _ctx: Context,
        inode: Inode,
        handle: Handle,
        w: &mut Writer<'_>,
        size: u32,
        offset: u64,
    ) -> io::Result<usize> {
        let h = self.handles.get(handle, inode)?;
        let mut done = 0usize;
        while done < size as usize {
            let n = w.write_from_file_at(h.raw_fd(), size as usize - done, offset + done as u64)?;
            if n == 0 {
                break;
            }
            done += n;
        }
        Ok(done)
    }

    fn write(
        &self,
        _ctx: Context,
        inode: Inode,
        handle: Handle,
        r: &mut Reader<'_>,
        size: u32,
        offset: u64,
    ) -> io::Result<usize> {
        self.check_writable()?;
        let h = self.handles.get(handle, inode)?;
        let mut done = 0usize;
        while done < size as usize {
            let n = match r.read_to_file_at(h.raw_fd(), size as usize - done, offset + done as u64)
            {
                Ok(n) => n,
                // As write(2): bytes already written are the answer (a full
                // disk or a size limit reached mid-way); the error comes
                // with the next request, which starts where this one ended.
                // An error answer would hide data that is on the host.
                Err(_) if done > 0 => break,
                Err(e) => return Err(e),
            };
            if n == 0 {
                break;
            }
            done += n;
        }
        Ok(done)
    }

    fn statfs(&self, _ctx: Context, inode: Inode) -> io::Result<StatVfs> {
        sys::statvfs_fd(self.inode(inode)?.raw_fd())
    }

    fn release(&self, _ctx: Context, inode: Inode, handle: Handle) -> io::Result<()> {
        self.handles.remove(handle, inode)
    }

    fn flush(&self, _ctx: Context, inode: Inode, handle: Handle) -> io::Result<()> {
        // Closing a duplicate gives the host file system its close-time
        // semantics (NFS flushes, POSIX lock release) without closing ours.
        // What that close reports (a network file system's deferred
        // ENOSPC or EDQUOT) is what the guest's close(2) reports.
        let h = self.handles.get(handle, inode)?;
        let dup: OwnedFd = h.fd().try_clone()?;
        // SAFETY: closes the duplicate we own; `into_raw_fd` gave up its
        // ownership, so it is closed exactly once.
        match sys::cvt(unsafe { libc::close(dup.into_raw_fd()) }) {
            // Linux closes the descriptor even when close is interrupted.
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => Ok(()),
            r => r,
        }
    }

    fn fsync(&self, _ctx: Context, inode: Inode, datasync: bool, handle: Handle) -> io::Result<()> {
        let h = self.handles.get(handle, inode)?;
        // SAFETY: fsync/fdatasync on an open descriptor.
        sys::cvt(unsafe {
            if datasync {
                libc::fdatasync(h.raw_fd())
            } else {
                libc::fsync(h.raw_fd())
            }
        })
    }

    fn opendir(
        &self,
        _ctx: Context,
        inode: Inode,
        _flags: u32,
    ) -> io::Result<(Option<Handle>, u32)> {
        let data = self.inode(inode)?;
        if !data.is_dir() {
            return Err(err(libc::ENOTDIR));
        }
        self.check_beneath_root(&data)?;
        let fd = sys::openat(data.raw_fd(), c".", libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
        Ok((Some(self.handles.insert(inode, fd)), self.fopen_flags(true)))
    }

    fn readdir(
        &self,
        _ctx: Context,
        inode: Inode,
        handle: Handle,
        offset: u64,
        add: &mut dyn FnMut(DirEntry<'_>) -> io::Result<bool>,
    ) -> io::Result<()> {
        self.check_beneath_root(&self.inode(inode)?)?;
        let h = self.handles.get(handle, inode)?;
        let _pos = h.lock_dir();
        let fd = h.raw_fd();
        // SAFETY: lseek on an open directory descriptor.
        if unsafe { libc::lseek64(fd, offset as i64, libc::SEEK_SET) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            // SAFETY: `buf` is valid for writes of `buf.len()` bytes.
            let n = unsafe { libc::syscall(libc::SYS_getdents64, fd, buf.as_mut_ptr(), buf.len()) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            if n == 0 {
                return Ok(());
            }
            let mut pos = 0usize;
            let end = n as usize;
            // struct linux_dirent64 { u64 d_ino; i64 d_off; u16 d_reclen; u8 d_type; char d_name[]; }
            while pos + 19 <= end {
                let rec = &buf[pos..end];
                let ino = u64::from_ne_bytes(rec[0..8].try_into().map_err(|_| err(libc::EIO))?);
                let off = u64::from_ne_bytes(rec[8..16].try_into().map_err(|_| err(libc::EIO))?);
                let reclen = u16::from_ne_bytes([rec[16], rec[17]]) as usize;
                let typ = rec[18];
                if reclen < 19 || reclen > rec.len() {
                    return Err(err(libc::EIO));
                }
                let name_field = &rec[19..reclen];
                let name_len = name_field
                    .iter()
                    .position(|&b| b == 0)
                    .unwrap_or(name_field.len());
                let entry = DirEntry {
                    ino,
                    offset: off,
                    typ: u32::from(typ),
                    name: &name_field[..name_len],
                };
                if !add(entry)? {
                    return Ok(());
                }
                pos += reclen;
            }
        }
    }

    fn releasedir(&self, _ctx: Context, inode: Inode, handle: Handle) -> io::Result<()> {
        self.handles.remove(handle, inode)
    }

    fn fsyncdir(
        &self,
        ctx: Context,
        inode: Inode,
        datasync: bool,
        handle: Handle,
    ) -> io::Result<()> {
        self.fsync(ctx, inode, datasync, handle)
    }

    fn access(&self, _ctx: Context, inode: Inode, mask: u32) -> io::Result<()> {
        if mask as i32 & libc::W_OK != 0 {
            self.check_writable()?;
        }
        let data = self.inode(inode)?;
        if data.is_symlink() {
            return Ok(());
        }
        let name = sys::fd_name(&data);
        // SAFETY: NUL-terminated name relative to /proc/self/fd.
        sys::cvt(unsafe {
            libc::faccessat(self.proc_self_fd.as_raw_fd(), name.as_ptr(), mask as i32, 0)
        })
    }

    fn fallocate(
        &self,
        _ctx: Context,
        inode: Inode,
        handle: Handle,
        mode: u32,
        offset: u64,
        length: u64,
    ) -> io::Result<()> {
        self.check_writable()?;
        let h = self.handles.get(handle, inode)?;
        let (off, len) = (i64::try_from(offset), i64::try_from(length));
        let (Ok(off), Ok(len)) = (off, len) else {
            return Err(err(libc::EINVAL));
        };
        // SAFETY: fallocate on an open descriptor.
        sys::cvt(unsafe { libc::fallocate64(h.raw_fd(), mode as i32, off, len) })
    }

    fn lseek(
        &self,
        _ctx: Context,
        inode: Inode,
        handle: Handle,
        offset: u64,
        whence: u32,
    ) -> io::Result<u64> {
        let h = self.handles.get(handle, inode)?;
        let whence = whence as i32;
        if ![
            libc::SEEK_SET,
            libc::SEEK_END,
            libc::SEEK_DATA,
            libc::SEEK_HOLE,
        ]
        .contains(&whence)
        {
            return Err(err(libc::EINVAL));
        }
        // SAFETY: lseek on an open descriptor; reads use pread, so the
        // position change is harmless.
        let ret = unsafe { libc::lseek64(h.raw_fd(), offset as i64, whence) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(ret as u64)
    }

    fn setxattr(
        &self,
        _ctx: Context,
        inode: Inode,
        name: &CStr,
        value: &[u8],
        flags: u32,
    ) -> io::Result<()> {
        self.check_writable()?;
        self.set_xattr(inode, name, value, flags)
    }

    fn getxattr(
        &self,
        _ctx: Context,
        inode: Inode,
        name: &CStr,
        size: u32,
    ) -> io::Result<XattrReply> {
        self.get_xattr(inode, name, size)
    }

    fn listxattr(&self, _ctx: Context, inode: Inode, size: u32) -> io::Result<XattrReply> {
        self.list_xattr(inode, size)
    }

    fn removexattr(&self, _ctx: Context, inode: Inode, name: &CStr) -> io::Result<()> {
        self.check_writable()?;
        self.remove_xattr(inode, name)
    }

    fn copy_file_range(&self, _ctx: Context, req: CopyRange) -> io::Result<usize> {
        self.check_writable()?;
        let src = self.handles.get(req.handle_in, req.inode_in)?;
        let dst = self.handles.get(req.handle_out, req.inode_out)?;
        let mut off_in = i64::try_from(req.offset_in).map_err(|_| err(libc::EINVAL))?;
        let mut off_out = i64::try_from(req.offset_out).map_err(|_| err(libc::EINVAL))?;
        let flags = u32::try_from(req.flags).map_err(|_| err(libc::EINVAL))?;
        let len = usize::try_from(req.len).map_err(|_| err(libc::EINVAL))?;
        // SAFETY: both descriptors are open; the offsets are valid for
        // reads and writes of one i64 each, which the kernel updates.
        let n = unsafe {
            libc::copy_file_range(
                src.raw_fd(),
                &mut off_in,
                dst.raw_fd(),
                &mut off_out,
                len,
                flags,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}
