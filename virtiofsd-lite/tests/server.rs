//! Server-level tests: FUSE requests as byte buffers against a scratch
//! directory, including malformed requests and confinement.

use std::ffi::CString;
use std::mem::size_of;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};

use keystone_test_kit::ScratchDir;
use virtiofsd_lite::descriptor::{Reader, Writer};
use virtiofsd_lite::fuse::{self, opcode};
use virtiofsd_lite::{FsConfig, PassthroughFs, Server};
use vm_memory::ByteValued;

struct Reply {
    error: i32,
    unique: u64,
    body: Vec<u8>,
}

struct T {
    server: Server<PassthroughFs>,
    unique: u64,
    _dir: ScratchDir,
}

fn raw(server: &Server<PassthroughFs>, mut req: Vec<u8>, out_size: usize) -> (usize, Vec<u8>) {
    let mut out = vec![0u8; out_size];
    let n = server.handle_message(
        Reader::from_slices(vec![(&mut req[..]).into()]),
        Writer::from_slices(vec![(&mut out[..]).into()]),
    );
    (n, out)
}

fn parse(n: usize, out: &[u8]) -> Reply {
    assert!(n >= 16, "no reply written");
    let h: fuse::OutHeader = fuse::read_struct(out).unwrap();
    assert_eq!(h.len as usize, n);
    Reply {
        error: h.error,
        unique: h.unique,
        body: out[16..n].to_vec(),
    }
}

fn request(op: u32, nodeid: u64, unique: u64, args: &[&[u8]]) -> Vec<u8> {
    let body: Vec<u8> = args.concat();
    let h = fuse::InHeader {
        len: (40 + body.len()) as u32,
        opcode: op,
        unique,
        nodeid,
        ..Default::default()
    };
    [h.as_slice(), &body].concat()
}

fn cstr(s: &str) -> Vec<u8> {
    CString::new(s).unwrap().into_bytes_with_nul()
}

impl T {
    fn new(name: &str) -> Self {
        Self::with(name, |_| {})
    }

    fn with(name: &str, tweak: impl FnOnce(&mut FsConfig)) -> Self {
        let dir = ScratchDir::new(name);
        let mut cfg = FsConfig::new(dir.path(), "test");
        tweak(&mut cfg);
        let never = cfg.cache == virtiofsd_lite::CacheMode::Never;
        let fs = PassthroughFs::new(&cfg).unwrap();
        let mut t = T {
            server: Server::new(fs),
            unique: 0,
            _dir: dir,
        };
        let init = fuse::InitIn {
            major: 7,
            minor: 41,
            max_readahead: 1 << 20,
            flags: u32::MAX,
        };
        let r = t.call(opcode::INIT, 0, &[init.as_slice()]);
        assert_eq!(r.error, 0);
        let out: fuse::InitOut = fuse::read_struct(&r.body).unwrap();
        assert_eq!(out.major, 7);
        assert_eq!(out.max_write, 1 << 20);
        // Offered unless nothing may be cached (`--cache never`).
        assert_eq!(out.flags & fuse::init_flags::DO_READDIRPLUS == 0, never);
        assert_eq!(out.flags & fuse::init_flags::WRITEBACK_CACHE, 0);
        t
    }

    fn dir(&self) -> &Path {
        self._dir.path()
    }

    fn call(&mut self, op: u32, nodeid: u64, args: &[&[u8]]) -> Reply {
        self.unique += 1;
        let (n, out) = raw(
            &self.server,
            request(op, nodeid, self.unique, args),
            1 << 21,
        );
        let r = parse(n, &out);
        assert_eq!(r.unique, self.unique);
        r
    }

    /// LOOKUP as the guest kernel reads it: a negative entry (node id 0)
    /// is `ENOENT` to the caller.
    fn lookup(&mut self, parent: u64, name: &str) -> Result<fuse::EntryOut, i32> {
        match self.lookup_raw(parent, name)? {
            e if e.nodeid == 0 => Err(libc::ENOENT),
            e => Ok(e),
        }
    }

    fn lookup_raw(&mut self, parent: u64, name: &str) -> Result<fuse::EntryOut, i32> {
        let r = self.call(opcode::LOOKUP, parent, &[&cstr(name)]);
        if r.error != 0 {
            return Err(-r.error);
        }
        Ok(fuse::read_struct(&r.body).unwrap())
    }

    fn open(&mut self, ino: u64, flags: i32) -> Result<u64, i32> {
        let o = fuse::OpenIn {
            flags: flags as u32,
            open_flags: 0,
        };
        let r = self.call(opcode::OPEN, ino, &[o.as_slice()]);
        if r.error != 0 {
            return Err(-r.error);
        }
        Ok(fuse::read_struct::<fuse::OpenOut>(&r.body).unwrap().fh)
    }

    fn read(&mut self, ino: u64, fh: u64, off: u64, size: u32) -> Vec<u8> {
        let ri = fuse::ReadIn {
            fh,
            offset: off,
            size,
            ..Default::default()
        };
        let r = self.call(opcode::READ, ino, &[ri.as_slice()]);
        assert_eq!(r.error, 0);
        r.body
    }
}

#[test]
fn malformed_requests_get_error_replies() {
    let mut t = T::new("malformed");
    // Short header: EIO with unique 0.
    let (n, out) = raw(&t.server, vec![1u8; 10], 64);
    let r = parse(n, &out);
    assert_eq!((r.error, r.unique), (-libc::EIO, 0));
    // Header len larger than the buffers.
    let mut req = request(opcode::GETATTR, 1, 7, &[&[0u8; 16]]);
    req[0..4].copy_from_slice(&1000u32.to_ne_bytes());
    let (n, out) = raw(&t.server, req, 64);
    assert_eq!(parse(n, &out).error, -libc::EINVAL);
    // Header len smaller than a header.
    let mut req = request(opcode::GETATTR, 1, 8, &[&[0u8; 16]]);
    req[0..4].copy_from_slice(&8u32.to_ne_bytes());
    let (n, out) = raw(&t.server, req, 64);
    assert_eq!(parse(n, &out).error, -libc::EINVAL);
    // Unknown opcode.
    assert_eq!(t.call(999, 1, &[]).error, -libc::ENOSYS);
    assert_eq!(t.call(opcode::IOCTL, 1, &[&[0u8; 32]]).error, -libc::ENOSYS);
    // Name without NUL.
    assert_eq!(t.call(opcode::LOOKUP, 1, &[b"abc"]).error, -libc::EINVAL);
    // Names with '/' and empty names.
    assert_eq!(t.lookup(1, "a/b"), Err(libc::EINVAL));
    assert_eq!(t.lookup(1, ""), Err(libc::EINVAL));
    // Truncated argument struct.
    assert_eq!(
        t.call(opcode::GETATTR, 1, &[&[0u8; 3]]).error,
        -libc::EINVAL
    );
    assert_eq!(t.call(opcode::READ, 1, &[&[0u8; 39]]).error, -libc::EINVAL);
    // WRITE claiming more data than sent.
    let wi = fuse::WriteIn {
        size: 4096,
        ..Default::default()
    };
    assert_eq!(
        t.call(opcode::WRITE, 1, &[wi.as_slice(), b"abc"]).error,
        -libc::EINVAL
    );
    // RENAME with only one name.
    let rn = fuse::RenameIn { newdir: 1 };
    assert_eq!(
        t.call(opcode::RENAME, 1, &[rn.as_slice(), &cstr("x")])
            .error,
        -libc::EINVAL
    );
    // Unknown node ids and handles.
    assert_eq!(
        t.call(opcode::GETATTR, 12345, &[&[0u8; 16]]).error,
        -libc::EBADF
    );
    let ri = fuse::ReadIn {
        fh: 77,
        size: 10,
        ..Default::default()
    };
    assert_eq!(
        t.call(opcode::READ, 1, &[ri.as_slice()]).error,
        -libc::EBADF
    );
    // No room for any reply: nothing written, no panic.
    let (n, _) = raw(&t.server, request(opcode::GETATTR, 1, 9, &[&[0u8; 16]]), 8);
    assert_eq!(n, 0);
    // Reply larger than the room: an error header instead.
    let (n, out) = raw(
        &t.server,
        request(opcode::GETATTR, 1, 10, &[&[0u8; 16]]),
        40,
    );
    assert_eq!(parse(n, &out).error, -libc::ERANGE);
    // FORGET of unknown nodes: no reply.
    let (n, _) = raw(
        &t.server,
        request(opcode::FORGET, 999, 11, &[&5u64.to_ne_bytes()]),
        64,
    );
    assert_eq!(n, 0);
    let bf = fuse::BatchForgetIn {
        count: 1000,
        dummy: 0,
    };
    let (n, _) = raw(
        &t.server,
        request(opcode::BATCH_FORGET, 0, 12, &[bf.as_slice()]),
        64,
    );
    assert_eq!(n, 0);
    // Still alive.
    assert_eq!(t.call(opcode::GETATTR, 1, &[&[0u8; 16]]).error, 0);
    assert!(t.server.stats().count(opcode::LOOKUP) >= 3);
}

#[test]
fn requests_before_init_fail() {
    let dir = ScratchDir::new("preinit");
    let server = Server::new(PassthroughFs::new(&FsConfig::new(dir.path(), "t")).unwrap());
    let (n, out) = raw(&server, request(opcode::GETATTR, 1, 1, &[&[0u8; 16]]), 256);
    assert_eq!(parse(n, &out).error, -libc::EIO);
}

#[test]
fn lookup_getattr_read() {
    let mut t = T::new("read");
    std::fs::write(t.dir().join("hello.txt"), b"hello, world\n").unwrap();
    let e = t.lookup(1, "hello.txt").unwrap();
    assert!(e.nodeid > 1);
    assert_eq!(e.attr.size, 13);
    assert_eq!(e.attr.mode & libc::S_IFMT, libc::S_IFREG);
    let r = t.call(opcode::GETATTR, e.nodeid, &[&[0u8; 16]]);
    let a: fuse::AttrOut = fuse::read_struct(&r.body).unwrap();
    assert_eq!(a.attr.size, 13);
    let fh = t.open(e.nodeid, libc::O_RDONLY).unwrap();
    assert_eq!(t.read(e.nodeid, fh, 0, 4096), b"hello, world\n");
    assert_eq!(t.read(e.nodeid, fh, 7, 5), b"world");
    assert_eq!(t.read(e.nodeid, fh, 100, 5), b"");
    let rel = fuse::ReleaseIn {
        fh,
        ..Default::default()
    };
    assert_eq!(
        t.call(opcode::RELEASE, e.nodeid, &[rel.as_slice()]).error,
        0
    );
    assert_eq!(
        t.server.stats().paths_read(),
        vec![PathBuf::from("hello.txt")]
    );
    // Two lookups, then FORGET of both drops the node.
    t.lookup(1, "hello.txt").unwrap();
    assert_eq!(t.server.fs().inodes().lookup_count(e.nodeid), 2);
    t.call_noreply(opcode::FORGET, e.nodeid, &2u64.to_ne_bytes());
    assert_eq!(t.server.fs().inodes().lookup_count(e.nodeid), 0);
    assert_eq!(
        t.call(opcode::GETATTR, e.nodeid, &[&[0u8; 16]]).error,
        -libc::EBADF
    );
}

#[test]
fn a_missing_name_is_a_negative_entry_the_guest_may_cache() {
    use virtiofsd_lite::CacheMode;
    // auto: the miss is an entry with node id 0, valid for the cache's
    // lifetime, and it takes no lookup reference.
    let mut t = T::new("negative");
    let e = t.lookup_raw(1, "missing").unwrap();
    assert_eq!(e.nodeid, 0);
    assert_eq!((e.entry_valid, e.entry_valid_nsec), (1, 0));
    assert_eq!(t.server.fs().inodes().lookup_count(0), 0);
    // Other errors stay errors.
    std::fs::write(t.dir().join("file"), b"").unwrap();
    let f = t.lookup(1, "file").unwrap();
    assert_eq!(t.lookup_raw(f.nodeid, "x"), Err(libc::ENOTDIR));
    assert_eq!(t.lookup_raw(1, "a/b"), Err(libc::EINVAL));

    let mut t = T::with("negative-always", |c| c.cache = CacheMode::Always);
    assert_eq!(t.lookup_raw(1, "missing").unwrap().entry_valid, 86400);

    // never: the guest must ask again, so the miss is a plain ENOENT.
    let mut t = T::with("negative-never", |c| c.cache = CacheMode::Never);
    assert_eq!(t.lookup_raw(1, "missing"), Err(libc::ENOENT));
}

/// The INIT reply's flags of a fresh server with `cache`.
fn init_flags_with(name: &str, cache: virtiofsd_lite::CacheMode) -> u32 {
    let dir = ScratchDir::new(name);
    let mut cfg = FsConfig::new(dir.path(), "test");
    cfg.cache = cache;
    let server = Server::new(PassthroughFs::new(&cfg).unwrap());
    let init = fuse::InitIn {
        major: 7,
        minor: 41,
        max_readahead: 1 << 20,
        flags: u32::MAX,
    };
    let (n, out) = raw(
        &server,
        request(opcode::INIT, 0, 1, &[init.as_slice()]),
        4096,
    );
    let r = parse(n, &out);
    assert_eq!(r.error, 0);
    fuse::read_struct::<fuse::InitOut>(&r.body).unwrap().flags
}

#[test]
fn readdirplus_is_offered_only_when_entries_may_be_cached() {
    use virtiofsd_lite::CacheMode;
    let plus = fuse::init_flags::DO_READDIRPLUS | fuse::init_flags::READDIRPLUS_AUTO;
    assert_eq!(init_flags_with("rdp-auto", CacheMode::Auto) & plus, plus);
    assert_eq!(
        init_flags_with("rdp-always", CacheMode::Always) & plus,
        plus
    );
    assert_eq!(init_flags_with("rdp-never", CacheMode::Never) & plus, 0);
}

#[test]
fn async_direct_io_is_offered_as_virtiofsd_does() {
    use virtiofsd_lite::CacheMode;
    for (name, cache) in [
        ("adio-never", CacheMode::Never),
        ("adio-auto", CacheMode::Auto),
    ] {
        let flags = init_flags_with(name, cache);
        assert_ne!(flags & fuse::init_flags::ASYNC_DIO, 0, "{cache:?}");
        assert_ne!(flags & fuse::init_flags::ASYNC_READ, 0, "{cache:?}");
    }
}

impl T {
    fn call_noreply(&mut self, op: u32, nodeid: u64, arg: &[u8]) {
        self.unique += 1;
        let (n, _) = raw(&self.server, request(op, nodeid, self.unique, &[arg]), 256);
        assert_eq!(n, 0);
    }
}

fn parse_direntplus(mut b: &[u8]) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    while b.len() >= size_of::<fuse::Direntplus>() {
        let d: fuse::Direntplus = fuse::read_struct(b).unwrap();
        let name_start = size_of::<fuse::Direntplus>();
        let name = &b[name_start..name_start + d.dirent.namelen as usize];
        out.push((
            String::from_utf8_lossy(name).into_owned(),
            d.entry_out.nodeid,
        ));
        let rec = size_of::<fuse::EntryOut>() + fuse::dirent_size(d.dirent.namelen as usize);
        b = &b[rec..];
    }
    out
}

#[test]
fn readdirplus_lists_and_looks_up() {
    let mut t = T::new("readdir");
    std::fs::create_dir(t.dir().join("d")).unwrap();
    for i in 0..50 {
        std::fs::write(t.dir().join(format!("d/file{i:02}")), b"x").unwrap();
    }
    let d = t.lookup(1, "d").unwrap();
    let o = fuse::OpenIn::default();
    let r = t.call(opcode::OPENDIR, d.nodeid, &[o.as_slice()]);
    assert_eq!(r.error, 0);
    let fh = fuse::read_struct::<fuse::OpenOut>(&r.body).unwrap().fh;
    let mut names = Vec::new();
    let mut offset = 0;
    loop {
        // A small buffer forces several rounds.
        let ri = fuse::ReadIn {
            fh,
            offset,
            size: 1024,
            ..Default::default()
        };
        let r = t.call(opcode::READDIRPLUS, d.nodeid, &[ri.as_slice()]);
        assert_eq!(r.error, 0);
        if r.body.is_empty() {
            break;
        }
        let mut b = &r.body[..];
        while b.len() >= size_of::<fuse::Direntplus>() {
            let dp: fuse::Direntplus = fuse::read_struct(b).unwrap();
            offset = dp.dirent.off;
            b = &b[size_of::<fuse::EntryOut>() + fuse::dirent_size(dp.dirent.namelen as usize)..];
        }
        names.extend(parse_direntplus(&r.body));
    }
    assert_eq!(names.len(), 52);
    for (name, nodeid) in &names {
        if name == "." || name == ".." {
            assert_eq!(*nodeid, 0);
        } else {
            assert!(*nodeid > 1);
            assert_eq!(t.server.fs().inodes().lookup_count(*nodeid), 1, "{name}");
        }
    }
    // Plain READDIR from the start.
    let ri = fuse::ReadIn {
        fh,
        offset: 0,
        size: 4096,
        ..Default::default()
    };
    let r = t.call(opcode::READDIR, d.nodeid, &[ri.as_slice()]);
    let first: fuse::Dirent = fuse::read_struct(&r.body).unwrap();
    assert!(first.namelen >= 1);
    let rel = fuse::ReleaseIn {
        fh,
        ..Default::default()
    };
    assert_eq!(
        t.call(opcode::RELEASEDIR, d.nodeid, &[rel.as_slice()])
            .error,
        0
    );
}

#[test]
fn create_write_mkdir_rename_unlink() {
    let mut t = T::new("write");
    let c = fuse::CreateIn {
        flags: (libc::O_WRONLY | libc::O_CREAT) as u32,
        mode: libc::S_IFREG | 0o4755,
        umask: 0o022,
        open_flags: 0,
    };
    let r = t.call(opcode::CREATE, 1, &[c.as_slice(), &cstr("new.txt")]);
    assert_eq!(r.error, 0);
    let e: fuse::EntryOut = fuse::read_struct(&r.body).unwrap();
    let o: fuse::OpenOut = fuse::read_struct(&r.body[size_of::<fuse::EntryOut>()..]).unwrap();
    let data = b"written through FUSE";
    let wi = fuse::WriteIn {
        fh: o.fh,
        offset: 0,
        size: data.len() as u32,
        ..Default::default()
    };
    let r = t.call(opcode::WRITE, e.nodeid, &[wi.as_slice(), data]);
    assert_eq!(r.error, 0);
    assert_eq!(
        fuse::read_struct::<fuse::WriteOut>(&r.body).unwrap().size as usize,
        data.len()
    );
    assert_eq!(std::fs::read(t.dir().join("new.txt")).unwrap(), data);
    // setuid stripped, exact mode kept (no process umask).
    let mode = std::fs::metadata(t.dir().join("new.txt"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o755);
    // SETATTR truncate.
    let s = fuse::SetattrIn {
        valid: fuse::fattr::SIZE,
        size: 7,
        ..Default::default()
    };
    let r = t.call(opcode::SETATTR, e.nodeid, &[s.as_slice()]);
    assert_eq!(r.error, 0);
    assert_eq!(std::fs::read(t.dir().join("new.txt")).unwrap(), b"written");

    let m = fuse::MkdirIn {
        mode: 0o777,
        umask: 0,
    };
    let r = t.call(opcode::MKDIR, 1, &[m.as_slice(), &cstr("sub")]);
    assert_eq!(r.error, 0);
    let sub: fuse::EntryOut = fuse::read_struct(&r.body).unwrap();
    assert!(t.dir().join("sub").is_dir());
    // Exactly the mode asked for: the daemon's own umask does not apply.
    let mode = std::fs::metadata(t.dir().join("sub"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o777);
    let rn = fuse::RenameIn { newdir: sub.nodeid };
    let r = t.call(
        opcode::RENAME,
        1,
        &[rn.as_slice(), &cstr("new.txt"), &cstr("moved.txt")],
    );
    assert_eq!(r.error, 0);
    assert!(t.dir().join("sub/moved.txt").exists());
    // RENAME2 NOREPLACE onto an existing name fails.
    std::fs::write(t.dir().join("other"), b"").unwrap();
    let rn2 = fuse::Rename2In {
        newdir: 1,
        flags: libc::RENAME_NOREPLACE,
        padding: 0,
    };
    let r = t.call(
        opcode::RENAME2,
        sub.nodeid,
        &[rn2.as_slice(), &cstr("moved.txt"), &cstr("other")],
    );
    assert_eq!(r.error, -libc::EEXIST);
    assert_eq!(
        t.call(opcode::UNLINK, sub.nodeid, &[&cstr("moved.txt")])
            .error,
        0
    );
    assert_eq!(t.call(opcode::RMDIR, 1, &[&cstr("sub")]).error, 0);
    assert!(!t.dir().join("sub").exists());
    // Device nodes are refused.
    let mk = fuse::MknodIn {
        mode: libc::S_IFCHR | 0o600,
        rdev: 0x0103,
        umask: 0,
        padding: 0,
    };
    assert_eq!(
        t.call(opcode::MKNOD, 1, &[mk.as_slice(), &cstr("null")])
            .error,
        -libc::EPERM
    );
    // user.* xattrs work, others do not.
    let sx = fuse::SetxattrIn { size: 3, flags: 0 };
    let r = t.call(
        opcode::SETXATTR,
        1,
        &[sx.as_slice(), &cstr("user.k"), b"val"],
    );
    assert_eq!(r.error, 0);
    let gx = fuse::GetxattrIn {
        size: 64,
        padding: 0,
    };
    let r = t.call(opcode::GETXATTR, 1, &[gx.as_slice(), &cstr("user.k")]);
    assert_eq!((r.error, &r.body[..]), (0, &b"val"[..]));
    let r = t.call(
        opcode::SETXATTR,
        1,
        &[sx.as_slice(), &cstr("trusted.k"), b"val"],
    );
    assert_eq!(r.error, -libc::EOPNOTSUPP);
    // STATFS.
    assert_eq!(t.call(opcode::STATFS, 1, &[]).error, 0);
}

#[test]
fn confinement() {
    let mut t = T::new("confine");
    let outside = ScratchDir::new("confine-outside");
    std::fs::write(outside.path().join("secret"), b"secret").unwrap();
    symlink("/etc", t.dir().join("etc-link")).unwrap();
    symlink(outside.path(), t.dir().join("out-link")).unwrap();
    symlink(outside.path().join("created"), t.dir().join("dangling")).unwrap();
    symlink("../../../../../../etc/passwd", t.dir().join("rel-link")).unwrap();

    // ".." of the root is the root.
    let e = t.lookup(1, "..").unwrap();
    assert_eq!(e.nodeid, 1);
    // A symlink is returned as a symlink, never followed.
    let l = t.lookup(1, "etc-link").unwrap();
    assert_eq!(l.attr.mode & libc::S_IFMT, libc::S_IFLNK);
    let r = t.call(opcode::READLINK, l.nodeid, &[]);
    assert_eq!(r.body, b"/etc");
    assert_eq!(t.open(l.nodeid, libc::O_RDONLY), Err(libc::ELOOP));
    let o = fuse::OpenIn::default();
    assert_ne!(t.call(opcode::OPENDIR, l.nodeid, &[o.as_slice()]).error, 0);
    // Used as a directory component, it leads nowhere.
    assert!(t.lookup(l.nodeid, "passwd").is_err());
    let ol = t.lookup(1, "out-link").unwrap();
    assert!(t.lookup(ol.nodeid, "secret").is_err());
    let rl = t.lookup(1, "rel-link").unwrap();
    assert_eq!(t.open(rl.nodeid, libc::O_RDONLY), Err(libc::ELOOP));
    // CREATE through a dangling symlink does not create outside.
    let c = fuse::CreateIn {
        flags: (libc::O_WRONLY | libc::O_CREAT) as u32,
        mode: 0o644,
        umask: 0,
        open_flags: 0,
    };
    let r = t.call(opcode::CREATE, 1, &[c.as_slice(), &cstr("dangling")]);
    assert_ne!(r.error, 0);
    assert!(!outside.path().join("created").exists());
    // SETATTR / xattrs on the symlink node do not reach its target.
    let s = fuse::SetattrIn {
        valid: fuse::fattr::SIZE,
        size: 0,
        ..Default::default()
    };
    assert_ne!(t.call(opcode::SETATTR, ol.nodeid, &[s.as_slice()]).error, 0);
    assert_eq!(
        std::fs::read(outside.path().join("secret")).unwrap(),
        b"secret"
    );
    // LINK of the symlink inode creates another symlink, not a link to the target.
    let li = fuse::LinkIn {
        oldnodeid: ol.nodeid,
    };
    let r = t.call(opcode::LINK, 1, &[li.as_slice(), &cstr("hard")]);
    if r.error == 0 {
        let h: fuse::EntryOut = fuse::read_struct(&r.body).unwrap();
        assert_eq!(h.attr.mode & libc::S_IFMT, libc::S_IFLNK);
    }
    // Names that try to walk.
    assert_eq!(t.lookup(1, "../etc"), Err(libc::EINVAL));
    assert!(t.lookup(1, "/etc").is_err());
    let m = fuse::MkdirIn {
        mode: 0o755,
        umask: 0,
    };
    assert_ne!(
        t.call(opcode::MKDIR, 1, &[m.as_slice(), &cstr("../escape")])
            .error,
        0
    );
    let rn = fuse::RenameIn { newdir: 1 };
    let r = t.call(
        opcode::RENAME,
        1,
        &[rn.as_slice(), &cstr("etc-link"), &cstr("../x")],
    );
    assert_ne!(r.error, 0);
}

#[test]
fn copy_file_range_copies_between_handles() {
    let mut t = T::new("copyrange");
    std::fs::write(t.dir().join("src"), b"0123456789abcdef").unwrap();
    std::fs::write(t.dir().join("dst"), b"xxxxxxxx").unwrap();
    let src = t.lookup(1, "src").unwrap().nodeid;
    let dst = t.lookup(1, "dst").unwrap().nodeid;
    let fh_in = t.open(src, libc::O_RDONLY).unwrap();
    let fh_out = t.open(dst, libc::O_RDWR).unwrap();
    let c = fuse::CopyFileRangeIn {
        fh_in,
        off_in: 4,
        nodeid_out: dst,
        fh_out,
        off_out: 2,
        len: 6,
        flags: 0,
    };
    let r = t.call(opcode::COPY_FILE_RANGE, src, &[c.as_slice()]);
    assert_eq!(r.error, 0);
    let out: fuse::WriteOut = fuse::read_struct(&r.body).unwrap();
    assert_eq!(out.size, 6);
    assert_eq!(std::fs::read(t.dir().join("dst")).unwrap(), b"xx456789");
    // Past the end of the source: nothing to copy.
    let c = fuse::CopyFileRangeIn { off_in: 100, ..c };
    let r = t.call(opcode::COPY_FILE_RANGE, src, &[c.as_slice()]);
    assert_eq!(r.error, 0);
    assert_eq!(
        fuse::read_struct::<fuse::WriteOut>(&r.body).unwrap().size,
        0
    );
    // A handle that is not the destination node's: EBADF.
    let c = fuse::CopyFileRangeIn {
        fh_out: fh_in,
        off_in: 0,
        ..c
    };
    let r = t.call(opcode::COPY_FILE_RANGE, src, &[c.as_slice()]);
    assert_eq!(r.error, -libc::EBADF);
    // Unknown flags are refused by the host.
    let c = fuse::CopyFileRangeIn {
        fh_out,
        flags: 1,
        ..c
    };
    assert_eq!(
        t.call(opcode::COPY_FILE_RANGE, src, &[c.as_slice()]).error,
        -libc::EINVAL
    );
    // A truncated argument: EINVAL, not a panic.
    let r = t.call(opcode::COPY_FILE_RANGE, src, &[&c.as_slice()[..20]]);
    assert_eq!(r.error, -libc::EINVAL);
}

#[test]
fn locks_get_enosys_and_are_not_offered() {
    let mut t = T::new("locks");
    // T::new sent INIT with every flag set: no lock support is advertised.
    let init = fuse::InitIn {
        major: 7,
        minor: 41,
        max_readahead: 1 << 20,
        flags: u32::MAX,
    };
    let r = t.call(opcode::INIT, 0, &[init.as_slice()]);
    let out: fuse::InitOut = fuse::read_struct(&r.body).unwrap();
    assert_eq!(out.flags & fuse::init_flags::POSIX_LOCKS, 0);
    assert_eq!(out.flags & fuse::init_flags::FLOCK_LOCKS, 0);

    std::fs::write(t.dir().join("f"), b"data").unwrap();
    let ino = t.lookup(1, "f").unwrap().nodeid;
    let fh = t.open(ino, libc::O_RDWR).unwrap();
    // fuse_lk_in: fh, owner, fuse_file_lock {start, end, type, pid}, lk_flags, padding.
    let mut lk = Vec::new();
    lk.extend_from_slice(&fh.to_ne_bytes());
    lk.extend_from_slice(&7u64.to_ne_bytes());
    lk.extend_from_slice(&0u64.to_ne_bytes());
    lk.extend_from_slice(&u64::MAX.to_ne_bytes());
    lk.extend_from_slice(&(libc::F_WRLCK as u32).to_ne_bytes());
    lk.extend_from_slice(&1u32.to_ne_bytes());
    lk.extend_from_slice(&0u32.to_ne_bytes());
    lk.extend_from_slice(&0u32.to_ne_bytes());
    for op in [opcode::GETLK, opcode::SETLK, opcode::SETLKW] {
        let r = t.call(op, ino, &[&lk]);
        assert_eq!(r.error, -libc::ENOSYS, "opcode {op}");
        assert!(r.body.is_empty());
    }
    // The daemon keeps serving.
    assert_eq!(t.lookup(1, "f").unwrap().nodeid, ino);
    assert_eq!(t.read(ino, fh, 0, 16), b"data");
}
