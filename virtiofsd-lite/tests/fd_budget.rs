//! The node descriptor budget: a tree with more files than the budget is
//! looked up, stat'ed and read in full while the process's open descriptor
//! count stays near the budget. Its own test binary, so the descriptor
//! count is not disturbed by other tests.

use std::ffi::CString;

use keystone_test_kit::{skip, ScratchDir};
use virtiofsd_lite::descriptor::{Reader, Writer};
use virtiofsd_lite::fuse::{self, opcode};
use virtiofsd_lite::{FsConfig, PassthroughFs, Server};
use vm_memory::ByteValued;

const FILES: usize = 5000;
const BUDGET: usize = 256;
/// Descriptors besides node descriptors: std, /proc/self/fd, the mount
/// descriptor, the test harness, one reopened node in flight.
const SLACK: usize = 32;

struct Fs {
    server: Server<PassthroughFs>,
    unique: u64,
}

impl Fs {
    fn call(&mut self, op: u32, nodeid: u64, args: &[&[u8]]) -> (i32, Vec<u8>) {
        self.unique += 1;
        let body = args.concat();
        let h = fuse::InHeader {
            len: (40 + body.len()) as u32,
            opcode: op,
            unique: self.unique,
            nodeid,
            ..Default::default()
        };
        let mut req = [h.as_slice(), &body].concat();
        let mut out = vec![0u8; 1 << 16];
        let n = self.server.handle_message(
            Reader::from_slices(vec![(&mut req[..]).into()]),
            Writer::from_slices(vec![(&mut out[..]).into()]),
        );
        if n == 0 {
            return (0, Vec::new());
        }
        let oh: fuse::OutHeader = fuse::read_struct(&out).unwrap();
        assert_eq!(oh.len as usize, n);
        assert_eq!(oh.unique, self.unique);
        (oh.error, out[16..n].to_vec())
    }

    fn forget(&mut self, ino: u64, n: u64) {
        let (e, body) = self.call(opcode::FORGET, ino, &[&n.to_ne_bytes()]);
        assert_eq!((e, body.len()), (0, 0), "FORGET takes no reply");
    }

    fn lookup(&mut self, parent: u64, name: &str) -> fuse::EntryOut {
        let name = CString::new(name).unwrap();
        let (e, body) = self.call(opcode::LOOKUP, parent, &[name.as_bytes_with_nul()]);
        assert_eq!(e, 0, "lookup {name:?}");
        fuse::read_struct(&body).unwrap()
    }
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[test]
fn more_files_than_the_fd_budget() {
    let dir = ScratchDir::new("vfsd-fdbudget");
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    for i in 0..FILES {
        std::fs::write(dir.join(format!("f{i}")), format!("file {i}\n")).unwrap();
    }
    std::fs::write(dir.join("sub/inner"), b"inner\n").unwrap();
    std::os::unix::fs::symlink("f0", dir.join("link")).unwrap();
    run(dir.path());
}

fn run(dir: &std::path::Path) {
    let pfs = PassthroughFs::new(&FsConfig::new(dir, "t")).unwrap();
    if !pfs.inodes().handles_supported() {
        skip!(
            "more_files_than_the_fd_budget: file handles unavailable here \
             (needs CAP_DAC_READ_SEARCH and an exportable file system)"
        );
    }
    pfs.inodes().set_fd_budget(BUDGET);
    let mut fs = Fs {
        server: Server::new(pfs),
        unique: 0,
    };
    let init = fuse::InitIn {
        major: 7,
        minor: 41,
        max_readahead: 1 << 20,
        flags: 0,
    };
    assert_eq!(fs.call(opcode::INIT, 0, &[init.as_slice()]).0, 0);
    let base = open_fds();

    let mut nodes = Vec::new();
    for i in 0..FILES {
        nodes.push(fs.lookup(1, &format!("f{i}")).nodeid);
        if i % 500 == 0 {
            assert!(open_fds() <= BUDGET + SLACK, "{} fds open", open_fds());
        }
    }
    let inodes = fs.server.fs().inodes();
    assert_eq!(inodes.len(), FILES + 1);
    assert!(inodes.open_fds() <= BUDGET);
    assert!(
        open_fds() <= base + BUDGET + SLACK,
        "{} fds open",
        open_fds()
    );
    // The same name again is the same node, whether it holds an fd or not.
    assert_eq!(fs.lookup(1, "f0").nodeid, nodes[0]);
    assert_eq!(
        fs.lookup(1, &format!("f{}", FILES - 1)).nodeid,
        nodes[FILES - 1]
    );

    for (i, &ino) in nodes.iter().enumerate() {
        let (e, body) = fs.call(opcode::GETATTR, ino, &[&[0u8; 16]]);
        assert_eq!(e, 0, "getattr f{i}");
        let a: fuse::AttrOut = fuse::read_struct(&body).unwrap();
        let want = format!("file {i}\n");
        assert_eq!(a.attr.size as usize, want.len());

        let o = fuse::OpenIn {
            flags: libc::O_RDONLY as u32,
            open_flags: 0,
        };
        let (e, body) = fs.call(opcode::OPEN, ino, &[o.as_slice()]);
        assert_eq!(e, 0, "open f{i}");
        let fh = fuse::read_struct::<fuse::OpenOut>(&body).unwrap().fh;
        let ri = fuse::ReadIn {
            fh,
            size: 4096,
            ..Default::default()
        };
        let (e, body) = fs.call(opcode::READ, ino, &[ri.as_slice()]);
        assert_eq!(e, 0, "read f{i}");
        assert_eq!(body, want.as_bytes());
        let rel = fuse::ReleaseIn {
            fh,
            ..Default::default()
        };
        assert_eq!(fs.call(opcode::RELEASE, ino, &[rel.as_slice()]).0, 0);
    }
    assert!(
        open_fds() <= base + BUDGET + SLACK,
        "{} fds open",
        open_fds()
    );

    // A directory and a symlink beyond the budget still work.
    let sub = fs.lookup(1, "sub");
    assert_eq!(sub.attr.mode & libc::S_IFMT, libc::S_IFDIR);
    assert_eq!(fs.lookup(sub.nodeid, "inner").attr.size, 6);
    let link = fs.lookup(1, "link").nodeid;
    assert_eq!(fs.call(opcode::READLINK, link, &[]).1, b"f0");
    // Renamed on the host, a handle-backed node still reaches its file.
    let last = nodes[FILES - 1];
    std::fs::rename(dir.join(format!("f{}", FILES - 1)), dir.join("sub/moved")).unwrap();
    assert_eq!(fs.call(opcode::GETATTR, last, &[&[0u8; 16]]).0, 0);
    // Replaced on the host (the new file may get the old inode number): the
    // old node is stale and a new lookup is a new node with the new file.
    let i = FILES - 2;
    std::fs::remove_file(dir.join(format!("f{i}"))).unwrap();
    std::fs::write(dir.join(format!("f{i}")), b"replaced\n").unwrap();
    assert_eq!(
        fs.call(opcode::GETATTR, nodes[i], &[&[0u8; 16]]).0,
        -libc::ESTALE
    );
    let fresh = fs.lookup(1, &format!("f{i}"));
    assert_ne!(fresh.nodeid, nodes[i]);
    assert_eq!(fresh.attr.size, 9);
    fs.forget(fresh.nodeid, 1);

    // FORGET is exact: each node was looked up once (f0 and the last twice).
    for (i, &ino) in nodes.iter().enumerate() {
        let n = if i == 0 || i == FILES - 1 { 2 } else { 1 };
        fs.forget(ino, n - 1);
        assert_eq!(
            fs.server.fs().inodes().lookup_count(ino),
            1,
            "f{i} forgotten too early"
        );
        fs.forget(ino, 1);
        assert_eq!(fs.server.fs().inodes().lookup_count(ino), 0);
    }
    let inodes = fs.server.fs().inodes();
    // Root, sub, inner and link are left.
    assert_eq!(inodes.len(), 4);
    // They were looked up over budget, so only the root holds a descriptor.
    assert_eq!(inodes.open_fds(), 1);
    assert!(open_fds() <= base + SLACK, "{} fds open", open_fds());
}
