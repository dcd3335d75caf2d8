//! A tree of 200 000 files under an open-file limit of 1024, as a strict
//! host gives: every file is looked up and held (as a guest that walked
//! the tree would hold them) without one `EMFILE`, with file handles and
//! with names (`--inode-file-handles never`), and the process stays under
//! its limit. Its own test binary: it lowers the process's limit.

mod common;

use common::{Fuse, ScratchDir};
use virtiofsd_lite::fuse::{self, opcode};
use virtiofsd_lite::FileHandles;
use vm_memory::ByteValued;

const DIRS: usize = 200;
const PER_DIR: usize = 1000;
const LIMIT: u64 = 1024;

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Looks up every directory and file and keeps them; checks a sample.
fn walk(fs: &mut Fuse) {
    let mut held = 0usize;
    for d in 0..DIRS {
        let dir = fs
            .lookup(1, &format!("d{d:03}"))
            .unwrap_or_else(|e| panic!("lookup d{d:03}: errno {e}"))
            .nodeid;
        for f in 0..PER_DIR {
            let e = fs
                .lookup(dir, &format!("f{f:04}"))
                .unwrap_or_else(|e| panic!("lookup d{d:03}/f{f:04} ({held} held): errno {e}"));
            held += 1;
            if f == PER_DIR - 1 {
                let r = fs.call(
                    opcode::GETATTR,
                    e.nodeid,
                    &[fuse::GetattrIn::default().as_slice()],
                );
                assert_eq!(r.error, 0, "getattr d{d:03}/f{f:04}");
                let fh = fs.open(e.nodeid, libc::O_RDONLY).unwrap();
                assert_eq!(
                    fs.read(e.nodeid, fh, 64).unwrap(),
                    format!("{d}/{f}\n").as_bytes()
                );
                let rel = fuse::ReleaseIn {
                    fh,
                    ..Default::default()
                };
                assert_eq!(fs.errno(opcode::RELEASE, e.nodeid, &[rel.as_slice()]), 0);
            }
        }
        assert!(
            open_fds() < LIMIT as usize,
            "{} descriptors open",
            open_fds()
        );
    }
    assert_eq!(fs.server.fs().inodes().len(), 1 + DIRS + DIRS * PER_DIR);
}

#[test]
fn two_hundred_thousand_files_under_a_limit_of_1024() {
    let limit = libc::rlimit {
        rlim_cur: LIMIT,
        rlim_max: LIMIT,
    };
    // SAFETY: setrlimit reads one valid rlimit.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) }, 0);

    let dir = ScratchDir::new("200k");
    for d in 0..DIRS {
        let sub = dir.path().join(format!("d{d:03}"));
        std::fs::create_dir(&sub).unwrap();
        for f in 0..PER_DIR {
            std::fs::write(sub.join(format!("f{f:04}")), format!("{d}/{f}\n")).unwrap();
        }
    }

    let mut fs = Fuse::serve(dir, |cfg| cfg.file_handles = FileHandles::Never);
    assert_eq!(fs.server.fs().inodes().fd_budget(), 512);
    walk(&mut fs);
    let named = fs.server.fs().inodes().named();
    assert!(named > DIRS * PER_DIR - 512, "{named} named");
    let dir = fs.into_dir();

    let mut fs = Fuse::serve(dir, |_| {});
    if fs.server.fs().inodes().handles_supported() {
        walk(&mut fs);
    } else {
        println!("SKIP: 200 000 files with file handles: handles do not work here (needs CAP_DAC_READ_SEARCH and an exportable file system)");
    }
}
