//! `Server<F>`: decodes one FUSE request from a descriptor chain's readable
//! part, calls the matching [`FileSystem`] method and encodes the reply into
//! the writable part.
//!
//! Guest bytes are never trusted: a short header, a length that disagrees
//! with the buffers, a name without its NUL or a size beyond the buffers
//! all get an errno reply (EINVAL/EIO), never a panic. Unknown opcodes get
//! ENOSYS. FORGET and BATCH_FORGET get no reply at all. Every request is
//! counted in the shared [`FsStats`].

use std::ffi::{CStr, CString};
use std::io;
use std::mem::size_of;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use vm_memory::ByteValued;

use crate::descriptor::{Reader, Writer};
use crate::filesystem::{
    attr_to_wire, Context, CopyRange, DirEntry, Entry, FileSystem, InitOptions, XattrReply,
};
use crate::fuse::{self, init_flags, opcode, InHeader, OutHeader};
use crate::idmap::IdMaps;
use crate::stats::FsStats;
use log_limit::log_limited;

/// The largest WRITE payload we advertise (`max_write`).
pub const MAX_WRITE: u32 = 1 << 20;
/// `max_pages` matching [`MAX_WRITE`] with 4 KiB pages.
pub const MAX_PAGES: u16 = 256;
/// The largest request body (names, xattr values) copied into host memory.
const MAX_BODY: usize = 64 * 1024 + 4096;
/// The most bytes one COPY_FILE_RANGE copies (its reply count is 32-bit).
const MAX_COPY: u32 = 1 << 30;

type Res<T> = Result<T, i32>;

fn errno(e: io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

/// The FUSE request decoder and dispatcher for one file system.
pub struct Server<F: FileSystem> {
    fs: F,
    stats: Arc<FsStats>,
    initialized: AtomicBool,
    ids: IdMaps,
}

impl<F: FileSystem> Server<F> {
    /// A server for `fs` with fresh statistics.
    pub fn new(fs: F) -> Self {
        Server {
            fs,
            stats: Arc::new(FsStats::new()),
            initialized: AtomicBool::new(false),
            ids: IdMaps::default(),
        }
    }

    /// Translates owners between guest and host with `ids` (see
    /// [`crate::idmap`]): request credentials and SETATTR owners on the way
    /// in, every attribute on the way out.
    pub fn with_id_maps(mut self, ids: IdMaps) -> Self {
        self.ids = ids;
        self
    }

    /// An attribute record with its owner as the guest sees it.
    fn guest_attr(&self, st: &libc::stat64) -> fuse::Attr {
        let mut a = attr_to_wire(st);
        a.uid = self.ids.uid.to_guest(a.uid);
        a.gid = self.ids.gid.to_guest(a.gid);
        a
    }

    /// The wire form of an entry, its owner as the guest sees it.
    fn entry_out(&self, e: &Entry) -> fuse::EntryOut {
        let mut out = e.to_wire();
        out.attr = self.guest_attr(&e.attr);
        out
    }

    fn attr_out(&self, st: &libc::stat64, t: std::time::Duration) -> fuse::AttrOut {
        fuse::AttrOut {
            attr_valid: t.as_secs(),
            attr_valid_nsec: t.subsec_nanos(),
            dummy: 0,
            attr: self.guest_attr(st),
        }
    }

    /// The file system behind this server.
    pub fn fs(&self) -> &F {
        &self.fs
    }

    /// The shared request counters.
    pub fn stats(&self) -> Arc<FsStats> {
        self.stats.clone()
    }

    /// Handles one request; returns how many reply bytes were written
    /// (0 for requests that take no reply or when there is no room).
    pub fn handle_message(&self, mut r: Reader<'_>, mut w: Writer<'_>) -> usize {
        let hdr: InHeader = match r.read_obj() {
            Ok(h) => h,
            Err(_) => {
                self.stats.record_error();
                return reply_error(&mut w, 0, libc::EIO);
            }
        };
        self.stats.record_request(hdr.opcode);
        let body_len = (hdr.len as usize).checked_sub(size_of::<InHeader>());
        let result = match body_len {
            Some(n) if n <= r.available() && r.truncate(n).is_ok() => {
                self.dispatch(&hdr, &mut r, &mut w)
            }
            _ => Err(libc::EINVAL),
        };
        match result {
            Ok(n) => n,
            Err(e) => {
                self.stats.record_error();
                reply_error(&mut w, hdr.unique, e)
            }
        }
    }

    fn dispatch(&self, h: &InHeader, r: &mut Reader<'_>, w: &mut Writer<'_>) -> Res<usize> {
        let (uid, gid) = (self.ids.uid.to_host(h.uid), self.ids.gid.to_host(h.gid));
        let creates = matches!(
            h.opcode,
            opcode::MKNOD | opcode::MKDIR | opcode::SYMLINK | opcode::CREATE
        );
        if creates && (uid.is_err() || gid.is_err()) {
            return Err(libc::EPERM);
        }
        let ctx = Context {
            uid: uid.unwrap_or(h.uid),
            gid: gid.unwrap_or(h.gid),
            pid: h.pid,
        };
        let (u, ino) = (h.unique, h.nodeid);
        if h.opcode == opcode::INIT {
            return self.init(u, r, w);
        }
        if !self.initialized.load(Ordering::Acquire) {
            return Err(libc::EIO);
        }
        let fs = &self.fs;
        match h.opcode {
            opcode::DESTROY => {
                self.initialized.store(false, Ordering::Release);
                fs.destroy();
                reply(w, u, &[])
            }
            opcode::LOOKUP => {
                let body = body(r)?;
                let e = match fs.lookup(ctx, ino, name_at(&body, 0)?) {
                    Ok(e) => self.entry_out(&e),
                    // A negative entry (node id 0) lets the kernel keep the
                    // miss: the library search paths of every exec probe
                    // many names that do not exist.
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                        match fs.negative_entry_timeout() {
                            Some(t) if !t.is_zero() => fuse::EntryOut {
                                entry_valid: t.as_secs(),
                                entry_valid_nsec: t.subsec_nanos(),
                                ..Default::default()
                            },
                            _ => return Err(libc::ENOENT),
                        }
                    }
                    Err(e) => return Err(errno(e)),
                };
                reply(w, u, &[e.as_slice()])
            }
            opcode::FORGET => {
                let f: fuse::ForgetIn = obj(r)?;
                fs.forget(ctx, ino, f.nlookup);
                Ok(0)
            }
            opcode::BATCH_FORGET => {
                let b: fuse::BatchForgetIn = obj(r)?;
                let mut list = Vec::new();
                for _ in 0..b.count.min(1 << 16) {
                    let Ok(one) = r.read_obj::<fuse::ForgetOne>() else {
                        break;
                    };
                    list.push((one.nodeid, one.nlookup));
                }
                fs.batch_forget(ctx, &list);
                Ok(0)
            }
            opcode::GETATTR => {
                let g: fuse::GetattrIn = obj(r)?;
                let fh = (g.getattr_flags & fuse::GETATTR_FH != 0).then_some(g.fh);
                let (st, t) = fs.getattr(ctx, ino, fh).map_err(errno)?;
                reply(w, u, &[self.attr_out(&st, t).as_slice()])
            }
            opcode::SETATTR => self.setattr(ctx, u, ino, r, w),
            opcode::READLINK => {
                let target = fs.readlink(ctx, ino).map_err(errno)?;
                reply(w, u, &[&target])
            }
            opcode::SYMLINK => {
                let body = body(r)?;
                let name = name_at(&body, 0)?;
                let target = name_at(&body, name.to_bytes_with_nul().len())?;
                let e = fs.symlink(ctx, target, ino, name).map_err(errno)?;
                reply(w, u, &[self.entry_out(&e).as_slice()])
            }
            opcode::MKNOD => {
                let m: fuse::MknodIn = obj(r)?;
                let body = body(r)?;
                let e = fs
                    .mknod(ctx, ino, name_at(&body, 0)?, m.mode, m.rdev, m.umask)
                    .map_err(errno)?;
                reply(w, u, &[self.entry_out(&e).as_slice()])
            }
            opcode::MKDIR => {
                let m: fuse::MkdirIn = obj(r)?;
                let body = body(r)?;
                let e = fs
                    .mkdir(ctx, ino, name_at(&body, 0)?, m.mode, m.umask)
                    .map_err(errno)?;
                reply(w, u, &[self.entry_out(&e).as_slice()])
            }
            opcode::UNLINK | opcode::RMDIR => {
                let body = body(r)?;
                let name = name_at(&body, 0)?;
                if h.opcode == opcode::UNLINK {
                    fs.unlink(ctx, ino, name).map_err(errno)?;
                } else {
                    fs.rmdir(ctx, ino, name).map_err(errno)?;
                }
                reply(w, u, &[])
            }
            opcode::RENAME | opcode::RENAME2 => {
                let (newdir, flags) = if h.opcode == opcode::RENAME {
                    let a: fuse::RenameIn = obj(r)?;
                    (a.newdir, 0)
                } else {
                    let a: fuse::Rename2In = obj(r)?;
                    (a.newdir, a.flags)
                };
                let body = body(r)?;
                let old = name_at(&body, 0)?;
                let new = name_at(&body, old.to_bytes_with_nul().len())?;
                fs.rename(ctx, ino, old, newdir, new, flags)
                    .map_err(errno)?;
                reply(w, u, &[])
            }
            opcode::LINK => {
                let l: fuse::LinkIn = obj(r)?;
                let body = body(r)?;
                let e = fs
                    .link(ctx, l.oldnodeid, ino, name_at(&body, 0)?)
                    .map_err(errno)?;
                reply(w, u, &[self.entry_out(&e).as_slice()])
            }
            opcode::OPEN | opcode::OPENDIR => {
                let o: fuse::OpenIn = obj(r)?;
                let (fh, flags) = if h.opcode == opcode::OPEN {
                    fs.open(ctx, ino, o.flags)
                } else {
                    fs.opendir(ctx, ino, o.flags)
                }
                .map_err(errno)?;
                let out = fuse::OpenOut {
                    fh: fh.unwrap_or(0),
                    open_flags: flags,
                    backing_id: 0,
                };
                reply(w, u, &[out.as_slice()])
            }
            opcode::CREATE => {
                let c: fuse::CreateIn = obj(r)?;
                let body = body(r)?;
                let (e, fh, flags) = fs
                    .create(ctx, ino, name_at(&body, 0)?, c.mode, c.flags, c.umask)
                    .map_err(errno)?;
                let out = fuse::OpenOut {
                    fh: fh.unwrap_or(0),
                    open_flags: flags,
                    backing_id: 0,
                };
                reply(w, u, &[self.entry_out(&e).as_slice(), out.as_slice()])
            }
            opcode::READ => self.read(ctx, u, ino, r, w),
            opcode::WRITE => {
                let wi: fuse::WriteIn = obj(r)?;
                if wi.size as usize > r.available() || wi.size > MAX_WRITE {
                    return Err(libc::EINVAL);
                }
                let n = fs
                    .write(ctx, ino, wi.fh, r, wi.size, wi.offset)
                    .map_err(errno)?;
                let out = fuse::WriteOut {
                    size: n as u32,
                    padding: 0,
                };
                reply(w, u, &[out.as_slice()])
            }
            opcode::STATFS => {
                let s = fs.statfs(ctx, ino).map_err(errno)?;
                let out = fuse::Kstatfs {
                    blocks: s.f_blocks,
                    bfree: s.f_bfree,
                    bavail: s.f_bavail,
                    files: s.f_files,
                    ffree: s.f_ffree,
                    bsize: s.f_bsize as u32,
                    namelen: s.f_namemax as u32,
                    frsize: s.f_frsize as u32,
                    ..Default::default()
                };
                reply(w, u, &[out.as_slice()])
            }
            opcode::RELEASE | opcode::RELEASEDIR => {
                let rel: fuse::ReleaseIn = obj(r)?;
                if h.opcode == opcode::RELEASE {
                    fs.release(ctx, ino, rel.fh).map_err(errno)?;
                } else {
                    fs.releasedir(ctx, ino, rel.fh).map_err(errno)?;
                }
                reply(w, u, &[])
            }
            opcode::FLUSH => {
                let f: fuse::FlushIn = obj(r)?;
                fs.flush(ctx, ino, f.fh).map_err(errno)?;
                reply(w, u, &[])
            }
            opcode::FSYNC | opcode::FSYNCDIR => {
                let f: fuse::FsyncIn = obj(r)?;
                let datasync = f.fsync_flags & 1 != 0;
                if h.opcode == opcode::FSYNC {
                    fs.fsync(ctx, ino, datasync, f.fh).map_err(errno)?;
                } else {
                    fs.fsyncdir(ctx, ino, datasync, f.fh).map_err(errno)?;
                }
                reply(w, u, &[])
            }
            opcode::READDIR | opcode::READDIRPLUS => {
                self.readdir(ctx, u, ino, h.opcode == opcode::READDIRPLUS, r, w)
            }
            opcode::ACCESS => {
                let a: fuse::AccessIn = obj(r)?;
                fs.access(ctx, ino, a.mask).map_err(errno)?;
                reply(w, u, &[])
            }
            opcode::FALLOCATE => {
                let f: fuse::FallocateIn = obj(r)?;
                fs.fallocate(ctx, ino, f.fh, f.mode, f.offset, f.length)
                    .map_err(errno)?;
                reply(w, u, &[])
            }
            opcode::LSEEK => {
                let l: fuse::LseekIn = obj(r)?;
                let off = fs
                    .lseek(ctx, ino, l.fh, l.offset, l.whence)
                    .map_err(errno)?;
                reply(w, u, &[fuse::LseekOut { offset: off }.as_slice()])
            }
            opcode::SETXATTR => {
                let s: fuse::SetxattrIn = obj(r)?;
                let body = body(r)?;
                let name = name_at(&body, 0)?;
                let start = name.to_bytes_with_nul().len();
                let value = body
                    .get(start..start.saturating_add(s.size as usize))
                    .ok_or(libc::EINVAL)?;
                fs.setxattr(ctx, ino, name, value, s.flags).map_err(errno)?;
                reply(w, u, &[])
            }
            opcode::GETXATTR | opcode::LISTXATTR => {
                let g: fuse::GetxattrIn = obj(r)?;
                let res = if h.opcode == opcode::GETXATTR {
                    let body = body(r)?;
                    fs.getxattr(ctx, ino, name_at(&body, 0)?, g.size)
                } else {
                    fs.listxattr(ctx, ino, g.size)
                }
                .map_err(errno)?;
                match res {
                    XattrReply::Count(n) => {
                        let out = fuse::GetxattrOut {
                            size: n,
                            padding: 0,
                        };
                        reply(w, u, &[out.as_slice()])
                    }
                    XattrReply::Value(v) if v.len() > g.size as usize => Err(libc::ERANGE),
                    XattrReply::Value(v) => reply(w, u, &[&v]),
                }
            }
            opcode::REMOVEXATTR => {
                let body = body(r)?;
                fs.removexattr(ctx, ino, name_at(&body, 0)?)
                    .map_err(errno)?;
                reply(w, u, &[])
            }
            opcode::COPY_FILE_RANGE => {
                let c: fuse::CopyFileRangeIn = obj(r)?;
                let req = CopyRange {
                    inode_in: ino,
                    handle_in: c.fh_in,
                    offset_in: c.off_in,
                    inode_out: c.nodeid_out,
                    handle_out: c.fh_out,
                    offset_out: c.off_out,
                    // The reply carries a 32-bit count.
                    len: c.len.min(u64::from(MAX_COPY)),
                    flags: c.flags,
                };
                let n = fs.copy_file_range(ctx, req).map_err(errno)?;
                let out = fuse::WriteOut {
                    size: u32::try_from(n).unwrap_or(MAX_COPY),
                    padding: 0,
                };
                reply(w, u, &[out.as_slice()])
            }
            // No lock support: ENOSYS makes the guest kernel keep POSIX and
            // flock locks local (INIT never offers POSIX_LOCKS/FLOCK_LOCKS).
            opcode::GETLK | opcode::SETLK | opcode::SETLKW => Err(libc::ENOSYS),
            _ => Err(libc::ENOSYS),
        }
    }

    fn init(&self, u: u64, r: &mut Reader<'_>, w: &mut Writer<'_>) -> Res<usize> {
        let i: fuse::InitIn = obj(r)?;
        if i.major < fuse::KERNEL_VERSION {
            return Err(libc::EPROTO);
        }
        let mut out = fuse::InitOut {
            major: fuse::KERNEL_VERSION,
            minor: fuse::KERNEL_MINOR_VERSION,
            ..Default::default()
        };
        if i.major > fuse::KERNEL_VERSION {
            // The kernel will retry INIT with our major version.
            return reply(w, u, &[out.as_slice()]);
        }
        if i.minor < fuse::MIN_KERNEL_MINOR_VERSION {
            log_limited!(
                log::Level::Error,
                "guest FUSE minor version {} is too old (need 7.{})",
                i.minor,
                fuse::MIN_KERNEL_MINOR_VERSION
            );
            return Err(libc::EPROTO);
        }
        // ASYNC_DIO: the guest may keep several requests of one O_DIRECT
        // aio/io_uring operation in flight instead of one at a time.
        let supported = init_flags::ASYNC_READ
            | init_flags::ASYNC_DIO
            | init_flags::PARALLEL_DIROPS
            | init_flags::BIG_WRITES
            | init_flags::DO_READDIRPLUS
            | init_flags::READDIRPLUS_AUTO
            | init_flags::ATOMIC_O_TRUNC
            | init_flags::MAX_PAGES
            | init_flags::AUTO_INVAL_DATA
            | init_flags::WRITEBACK_CACHE;
        let want = self
            .fs
            .init(InitOptions {
                flags: i.flags & supported,
            })
            .map_err(errno)?;
        out.flags = want.flags & i.flags & supported;
        out.max_readahead = i.max_readahead;
        out.max_background = 64;
        out.congestion_threshold = 48;
        out.max_write = MAX_WRITE;
        out.time_gran = 1;
        out.max_pages = MAX_PAGES;
        self.initialized.store(true, Ordering::Release);
        reply(w, u, &[out.as_slice()])
    }

    fn setattr(
        &self,
        ctx: Context,
        u: u64,
        ino: u64,
        r: &mut Reader<'_>,
        w: &mut Writer<'_>,
    ) -> Res<usize> {
        use crate::fuse::fattr;
        let s: fuse::SetattrIn = obj(r)?;
        let ts = |valid_bit, now_bit, sec: u64, nsec: u32| libc::timespec {
            tv_sec: sec as libc::time_t,
            tv_nsec: if s.valid & now_bit != 0 {
                libc::UTIME_NOW
            } else if s.valid & valid_bit != 0 {
                i64::from(nsec.min(999_999_999))
            } else {
                libc::UTIME_OMIT
            },
        };
        let req = crate::filesystem::SetattrRequest {
            valid: s.valid,
            handle: (s.valid & fattr::FH != 0).then_some(s.fh),
            mode: s.mode,
            uid: if s.valid & fattr::UID != 0 {
                self.ids.uid.to_host(s.uid).map_err(|_| libc::EPERM)?
            } else {
                s.uid
            },
            gid: if s.valid & fattr::GID != 0 {
                self.ids.gid.to_host(s.gid).map_err(|_| libc::EPERM)?
            } else {
                s.gid
            },
            size: s.size,
            atime: ts(fattr::ATIME, fattr::ATIME_NOW, s.atime, s.atimensec),
            mtime: ts(fattr::MTIME, fattr::MTIME_NOW, s.mtime, s.mtimensec),
        };
        let (st, t) = self.fs.setattr(ctx, ino, req).map_err(errno)?;
        reply(w, u, &[self.attr_out(&st, t).as_slice()])
    }

    fn read(
        &self,
        ctx: Context,
        u: u64,
        ino: u64,
        r: &mut Reader<'_>,
        w: &mut Writer<'_>,
    ) -> Res<usize> {
        let ri: fuse::ReadIn = obj(r)?;
        let hdr_len = size_of::<OutHeader>();
        if w.available() < hdr_len {
            return Err(libc::EINVAL);
        }
        let mut data = w.split_at(hdr_len).map_err(|_| libc::EINVAL)?;
        let size = (ri.size as usize)
            .min(data.available())
            .min(MAX_WRITE as usize) as u32;
        let n = self
            .fs
            .read(ctx, ino, ri.fh, &mut data, size, ri.offset)
            .map_err(errno)?;
        self.stats.record_read(ino, || self.fs.inode_path(ino));
        write_header(w, u, 0, n)
    }

    fn readdir(
        &self,
        ctx: Context,
        u: u64,
        ino: u64,
        plus: bool,
        r: &mut Reader<'_>,
        w: &mut Writer<'_>,
    ) -> Res<usize> {
        let ri: fuse::ReadIn = obj(r)?;
        let room = (ri.size as usize).min(w.available().saturating_sub(size_of::<OutHeader>()));
        let mut buf: Vec<u8> = Vec::with_capacity(room.min(MAX_BODY * 2));
        let fs = &self.fs;
        let mut add = |d: DirEntry<'_>| -> io::Result<bool> {
            let dsize = fuse::dirent_size(d.name.len());
            let need = dsize + if plus { size_of::<fuse::EntryOut>() } else { 0 };
            if buf.len() + need > room {
                return Ok(false);
            }
            let dirent = fuse::Dirent {
                ino: d.ino,
                off: d.offset,
                namelen: d.name.len() as u32,
                typ: d.typ,
            };
            if plus {
                let mut entry = fuse::EntryOut::default();
                if d.name != b"." && d.name != b".." {
                    if let Ok(name) = CString::new(d.name) {
                        if let Ok(e) = fs.lookup(ctx, ino, &name) {
                            entry = self.entry_out(&e);
                        }
                    }
                }
                buf.extend_from_slice(entry.as_slice());
            }
            let start = buf.len();
            buf.extend_from_slice(dirent.as_slice());
            buf.extend_from_slice(d.name);
            buf.resize(start + dsize, 0);
            Ok(true)
        };
        fs.readdir(ctx, ino, ri.fh, ri.offset, &mut add)
            .map_err(errno)?;
        reply(w, u, &[&buf])
    }
}

fn obj<T: ByteValued + Default>(r: &mut Reader<'_>) -> Res<T> {
    r.read_obj().map_err(|_| libc::EINVAL)
}

/// The rest of the request (names, xattr values), bounded.
fn body(r: &mut Reader<'_>) -> Res<Vec<u8>> {
    let n = r.available();
    if n > MAX_BODY {
        return Err(libc::E2BIG);
    }
    r.read_vec(n).map_err(|_| libc::EINVAL)
}

/// The NUL-terminated name starting at `start` in `body`.
fn name_at(body: &[u8], start: usize) -> Res<&CStr> {
    let rest = body.get(start..).ok_or(libc::EINVAL)?;
    let name = CStr::from_bytes_until_nul(rest).map_err(|_| libc::EINVAL)?;
    if name.to_bytes().len() > libc::PATH_MAX as usize {
        return Err(libc::ENAMETOOLONG);
    }
    Ok(name)
}

fn write_header(w: &mut Writer<'_>, unique: u64, error: i32, payload: usize) -> Res<usize> {
    let len = size_of::<OutHeader>() + payload;
    let h = OutHeader {
        len: len as u32,
        error,
        unique,
    };
    w.write_obj(h).map_err(|_| libc::EIO)?;
    Ok(len)
}

fn reply(w: &mut Writer<'_>, unique: u64, parts: &[&[u8]]) -> Res<usize> {
    let payload: usize = parts.iter().map(|p| p.len()).sum();
    if w.available() < size_of::<OutHeader>() + payload {
        return Err(libc::ERANGE);
    }
    let n = write_header(w, unique, 0, payload)?;
    for p in parts {
        w.write_all(p).map_err(|_| libc::EIO)?;
    }
    Ok(n)
}

/// Writes an error reply; returns its length, or 0 when there is no room.
fn reply_error(w: &mut Writer<'_>, unique: u64, err: i32) -> usize {
    write_header(w, unique, -err.abs(), 0).unwrap_or(0)
}
