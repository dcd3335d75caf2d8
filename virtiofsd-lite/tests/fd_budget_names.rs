//! The descriptor budget without file handles (`--inode-file-handles
//! never`, or a file system or process that cannot use them): files past
//! the budget are re-opened by parent and name on each request, checked to
//! be the same inode, and follow renames made through the daemon. Its own
//! test binary, so the descriptor count is not disturbed by other tests.

mod common;

use common::{Fuse, ScratchDir};
use virtiofsd_lite::fuse::{self, opcode};
use virtiofsd_lite::{FileHandles, FsConfig, PassthroughFs};
use vm_memory::ByteValued;

const FILES: usize = 2000;
const DIRS: usize = 40;
const BUDGET: usize = 64;
/// Descriptors besides node descriptors: std, /proc/self/fd, the test
/// harness, one re-opened node in flight.
const SLACK: usize = 32;

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn getattr(fs: &mut Fuse, ino: u64) -> Result<fuse::Attr, i32> {
    let r = fs.call(
        opcode::GETATTR,
        ino,
        &[fuse::GetattrIn::default().as_slice()],
    );
    if r.error != 0 {
        return Err(-r.error);
    }
    Ok(fuse::read_struct::<fuse::AttrOut>(&r.body).unwrap().attr)
}

fn read_all(fs: &mut Fuse, ino: u64) -> Result<Vec<u8>, i32> {
    let fh = fs.open(ino, libc::O_RDONLY)?;
    let data = fs.read(ino, fh, 4096);
    let rel = fuse::ReleaseIn {
        fh,
        ..Default::default()
    };
    assert_eq!(fs.errno(opcode::RELEASE, ino, &[rel.as_slice()]), 0);
    data
}

#[test]
fn past_the_budget_files_are_reopened_by_name() {
    let dir = ScratchDir::new("fd-names");
    let root = dir.path().to_path_buf();
    for i in 0..FILES {
        std::fs::write(root.join(format!("f{i}")), format!("file {i}\n")).unwrap();
    }
    for i in 0..DIRS {
        std::fs::create_dir(root.join(format!("d{i}"))).unwrap();
        std::fs::write(root.join(format!("d{i}/inner")), format!("inner {i}\n")).unwrap();
    }
    let mut fs = Fuse::serve(dir, |cfg| cfg.file_handles = FileHandles::Never);
    fs.server.fs().inodes().set_fd_budget(BUDGET);
    let base = open_fds();

    let files: Vec<u64> = (0..FILES)
        .map(|i| fs.lookup(1, &format!("f{i}")).unwrap().nodeid)
        .collect();
    let inodes = fs.server.fs().inodes();
    assert!(!inodes.handles_supported());
    assert_eq!(inodes.open_fds(), BUDGET);
    assert_eq!(inodes.named(), FILES + 1 - BUDGET);
    assert!(open_fds() <= base + BUDGET + SLACK, "{} fds", open_fds());

    // Every file, named or not, answers GETATTR and reads its own content.
    for (i, &ino) in files.iter().enumerate() {
        let want = format!("file {i}\n");
        assert_eq!(getattr(&mut fs, ino).unwrap().size as usize, want.len());
        assert_eq!(read_all(&mut fs, ino).unwrap(), want.as_bytes(), "f{i}");
    }
    // The same name again is the same node.
    assert_eq!(fs.lookup(1, "f1999").unwrap().nodeid, files[FILES - 1]);

    // Directories past the budget keep a descriptor; their files are named.
    let dirs: Vec<u64> = (0..DIRS)
        .map(|i| fs.lookup(1, &format!("d{i}")).unwrap().nodeid)
        .collect();
    let inodes = fs.server.fs().inodes();
    assert_eq!(inodes.open_fds(), BUDGET + DIRS);
    for (i, &d) in dirs.iter().enumerate() {
        let inner = fs.lookup(d, "inner").unwrap().nodeid;
        assert_eq!(
            read_all(&mut fs, inner).unwrap(),
            format!("inner {i}\n").as_bytes()
        );
    }

    // A rename through the daemon moves the recorded name with the file,
    // also into another directory.
    let (i10, i11) = (10 + BUDGET, 11 + BUDGET);
    let (f10, f11) = (files[i10], files[i11]);
    let content = |i: usize| format!("file {i}\n").into_bytes();
    assert_eq!(fs.rename(1, &format!("f{i10}"), dirs[0], "moved"), 0);
    assert_eq!(read_all(&mut fs, f10).unwrap(), content(i10));
    assert!(root.join("d0/moved").exists());
    let ex = fuse::Rename2In {
        newdir: dirs[0],
        flags: libc::RENAME_EXCHANGE,
        padding: 0,
    };
    let r = fs.call(
        opcode::RENAME2,
        1,
        &[
            ex.as_slice(),
            &common::cstr(&format!("f{i11}")),
            &common::cstr("moved"),
        ],
    );
    assert_eq!(r.error, 0);
    // Each node still reads its own file, wherever it now is.
    assert_eq!(read_all(&mut fs, f10).unwrap(), content(i10));
    assert_eq!(read_all(&mut fs, f11).unwrap(), content(i11));
    assert_eq!(
        std::fs::read(root.join(format!("f{i11}"))).unwrap(),
        content(i10)
    );
    assert_eq!(std::fs::read(root.join("d0/moved")).unwrap(), content(i11));

    // The host replacing or moving a named file makes its node stale, never
    // another file's.
    let (i20, i30) = (20 + BUDGET, 30 + BUDGET);
    std::fs::remove_file(root.join(format!("f{i20}"))).unwrap();
    std::fs::write(root.join(format!("f{i20}")), b"impostor\n").unwrap();
    assert_eq!(getattr(&mut fs, files[i20]).err(), Some(libc::ESTALE));
    assert_eq!(read_all(&mut fs, files[i20]).err(), Some(libc::ESTALE));
    std::fs::rename(root.join(format!("f{i30}")), root.join("elsewhere")).unwrap();
    assert_eq!(getattr(&mut fs, files[i30]).err(), Some(libc::ESTALE));
    // A new lookup finds the new file as a new node.
    let fresh = fs.lookup(1, &format!("f{i20}")).unwrap().nodeid;
    assert_ne!(fresh, files[i20]);
    assert_eq!(read_all(&mut fs, fresh).unwrap(), b"impostor\n");

    // FORGET releases names exactly.
    let mut all = files.clone();
    all.push(fresh);
    for ino in all {
        fs.forget(ino, 1);
    }
    fs.forget(files[FILES - 1], 1); // its second lookup
    let inodes = fs.server.fs().inodes();
    // Left: the directories and their `inner` files, and the root.
    assert_eq!(inodes.len(), 1 + 2 * DIRS);
    assert!(inodes.open_fds() <= BUDGET + DIRS);
    assert!(
        open_fds() <= base + BUDGET + DIRS + SLACK,
        "{} fds",
        open_fds()
    );
}

#[test]
fn mandatory_file_handles_refuse_a_file_system_without_them() {
    // procfs cannot export file handles.
    let mut cfg = FsConfig::new("/proc/self", "t");
    cfg.file_handles = FileHandles::Mandatory;
    let err = PassthroughFs::new(&cfg)
        .err()
        .expect("procfs has no handles");
    let text = err.to_string();
    assert!(text.contains("file handles do not work"), "{text}");
    assert!(text.contains("--inode-file-handles prefer"), "{text}");
    cfg.file_handles = FileHandles::Prefer;
    let fs = PassthroughFs::new(&cfg).unwrap();
    assert!(!fs.inodes().handles_supported());
}
