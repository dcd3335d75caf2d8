//! A FUSE-request harness shared by the protocol-level tests: a
//! [`Server`] over a scratch directory, driven with byte buffers.
#![allow(dead_code)]

use std::ffi::CString;
use std::path::Path;

pub use keystone_test_kit::ScratchDir;
use virtiofsd_lite::descriptor::{Reader, Writer};
use virtiofsd_lite::fuse::{self, opcode};
use virtiofsd_lite::{FsConfig, PassthroughFs, Server};
use vm_memory::ByteValued;

/// One reply: the (negative) error and the body.
pub struct Reply {
    pub error: i32,
    pub body: Vec<u8>,
}

/// A NUL-terminated name argument.
pub fn cstr(s: &str) -> Vec<u8> {
    CString::new(s).unwrap().into_bytes_with_nul()
}

/// A server over a scratch directory, after INIT.
pub struct Fuse {
    pub server: Server<PassthroughFs>,
    unique: u64,
    pub dir: ScratchDir,
    /// The guest uid and gid sent in each request header.
    pub caller: (u32, u32),
}

impl Fuse {
    /// Serves a fresh scratch directory; `tweak` adjusts the config.
    pub fn new(name: &str, tweak: impl FnOnce(&mut FsConfig)) -> Self {
        let dir = ScratchDir::new(name);
        Self::serve(dir, tweak)
    }

    /// Serves `dir` (filled by the caller first).
    pub fn serve(dir: ScratchDir, tweak: impl FnOnce(&mut FsConfig)) -> Self {
        let mut cfg = FsConfig::new(dir.path(), "test");
        tweak(&mut cfg);
        let fs = PassthroughFs::new(&cfg).unwrap();
        let mut f = Fuse {
            server: Server::new(fs).with_id_maps(cfg.ids.clone()),
            unique: 0,
            dir,
            caller: (0, 0),
        };
        let init = fuse::InitIn {
            major: 7,
            minor: 41,
            max_readahead: 1 << 20,
            flags: u32::MAX,
        };
        assert_eq!(f.call(opcode::INIT, 0, &[init.as_slice()]).error, 0);
        f
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn call(&mut self, op: u32, nodeid: u64, args: &[&[u8]]) -> Reply {
        let (n, out) = self.send(op, nodeid, args);
        assert!(n >= 16, "no reply to opcode {op}");
        let oh: fuse::OutHeader = fuse::read_struct(&out).unwrap();
        assert_eq!(oh.unique, self.unique);
        Reply {
            error: oh.error,
            body: out[16..n].to_vec(),
        }
    }

    /// FORGET `nlookup` lookups of `nodeid` (a request without reply).
    pub fn forget(&mut self, nodeid: u64, nlookup: u64) {
        let f = fuse::ForgetIn { nlookup };
        let (n, _) = self.send(opcode::FORGET, nodeid, &[f.as_slice()]);
        assert_eq!(n, 0, "FORGET takes no reply");
    }

    /// One request; the reply's length and buffer.
    fn send(&mut self, op: u32, nodeid: u64, args: &[&[u8]]) -> (usize, Vec<u8>) {
        self.unique += 1;
        let body: Vec<u8> = args.concat();
        let h = fuse::InHeader {
            len: (40 + body.len()) as u32,
            opcode: op,
            unique: self.unique,
            nodeid,
            uid: self.caller.0,
            gid: self.caller.1,
            ..Default::default()
        };
        let mut req = [h.as_slice(), &body].concat();
        let mut out = vec![0u8; 1 << 17];
        let n = self.server.handle_message(
            Reader::from_slices(vec![(&mut req[..]).into()]),
            Writer::from_slices(vec![(&mut out[..]).into()]),
        );
        (n, out)
    }

    /// The errno of a reply (0 on success).
    pub fn errno(&mut self, op: u32, nodeid: u64, args: &[&[u8]]) -> i32 {
        -self.call(op, nodeid, args).error
    }

    pub fn entry(&mut self, op: u32, nodeid: u64, args: &[&[u8]]) -> Result<fuse::EntryOut, i32> {
        let r = self.call(op, nodeid, args);
        if r.error != 0 {
            return Err(-r.error);
        }
        Ok(fuse::read_struct(&r.body).unwrap())
    }

    /// LOOKUP as the guest kernel sees it: a negative entry (node id 0,
    /// which the kernel caches) is `ENOENT` to the caller.
    pub fn lookup(&mut self, parent: u64, name: &str) -> Result<fuse::EntryOut, i32> {
        match self.lookup_raw(parent, name)? {
            e if e.nodeid == 0 => Err(libc::ENOENT),
            e => Ok(e),
        }
    }

    /// LOOKUP's reply as it is on the wire.
    pub fn lookup_raw(&mut self, parent: u64, name: &str) -> Result<fuse::EntryOut, i32> {
        self.entry(opcode::LOOKUP, parent, &[&cstr(name)])
    }

    pub fn open(&mut self, ino: u64, flags: i32) -> Result<u64, i32> {
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

    pub fn read(&mut self, ino: u64, fh: u64, size: u32) -> Result<Vec<u8>, i32> {
        let ri = fuse::ReadIn {
            fh,
            size,
            ..Default::default()
        };
        let r = self.call(opcode::READ, ino, &[ri.as_slice()]);
        if r.error != 0 {
            return Err(-r.error);
        }
        Ok(r.body)
    }

    pub fn mkdir(&mut self, parent: u64, name: &str) -> Result<fuse::EntryOut, i32> {
        let m = fuse::MkdirIn {
            mode: 0o755,
            umask: 0,
        };
        self.entry(opcode::MKDIR, parent, &[m.as_slice(), &cstr(name)])
    }

    pub fn mknod(
        &mut self,
        parent: u64,
        name: &str,
        mode: u32,
        rdev: u32,
    ) -> Result<fuse::EntryOut, i32> {
        let m = fuse::MknodIn {
            mode,
            rdev,
            umask: 0,
            padding: 0,
        };
        self.entry(opcode::MKNOD, parent, &[m.as_slice(), &cstr(name)])
    }

    pub fn create(&mut self, parent: u64, name: &str, flags: i32) -> Result<fuse::EntryOut, i32> {
        let c = fuse::CreateIn {
            flags: (flags | libc::O_CREAT) as u32,
            mode: 0o644,
            umask: 0,
            open_flags: 0,
        };
        self.entry(opcode::CREATE, parent, &[c.as_slice(), &cstr(name)])
    }

    pub fn symlink(
        &mut self,
        parent: u64,
        name: &str,
        target: &str,
    ) -> Result<fuse::EntryOut, i32> {
        self.entry(opcode::SYMLINK, parent, &[&cstr(name), &cstr(target)])
    }

    pub fn link(&mut self, old: u64, newparent: u64, name: &str) -> Result<fuse::EntryOut, i32> {
        let l = fuse::LinkIn { oldnodeid: old };
        self.entry(opcode::LINK, newparent, &[l.as_slice(), &cstr(name)])
    }

    pub fn rename(&mut self, olddir: u64, old: &str, newdir: u64, new: &str) -> i32 {
        let rn = fuse::RenameIn { newdir };
        self.errno(
            opcode::RENAME,
            olddir,
            &[rn.as_slice(), &cstr(old), &cstr(new)],
        )
    }

    pub fn opendir(&mut self, ino: u64) -> Result<u64, i32> {
        let o = fuse::OpenIn::default();
        let r = self.call(opcode::OPENDIR, ino, &[o.as_slice()]);
        if r.error != 0 {
            return Err(-r.error);
        }
        Ok(fuse::read_struct::<fuse::OpenOut>(&r.body).unwrap().fh)
    }

    /// Ends the server (forgetting every node) and keeps the directory.
    pub fn into_dir(self) -> ScratchDir {
        self.dir
    }

    /// The host `(st_dev, st_ino)` behind a node id.
    pub fn host_key(&self, nodeid: u64) -> (u64, u64) {
        self.server.fs().inodes().get(nodeid).unwrap().key
    }
}
