//! `FsConfig::readonly` (`--readonly`): every modifying request answers
//! `EROFS` and the host tree is untouched, while reads work; and the one
//! device node the guest may create, the overlayfs whiteout (char 0:0).

mod common;

use std::os::unix::fs::{FileTypeExt, MetadataExt};

use common::{cstr, Fuse};
use virtiofsd_lite::fuse::{self, opcode};
use vm_memory::ByteValued;

fn listing(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn readonly_refuses_every_change_with_erofs() {
    let mut t = Fuse::new("readonly", |c| {
        c.readonly = true;
        c.writeback = true;
    });
    std::fs::write(t.path().join("f"), b"content").unwrap();
    std::fs::create_dir(t.path().join("d")).unwrap();
    std::fs::write(t.path().join("d/inner"), b"x").unwrap();
    xattr_set(&t.path().join("f"), "user.k", b"v");
    let before = listing(t.path());

    // Reads work.
    let f = t.lookup(1, "f").unwrap();
    let d = t.lookup(1, "d").unwrap();
    let fh = t.open(f.nodeid, libc::O_RDONLY).unwrap();
    assert_eq!(t.read(f.nodeid, fh, 100).unwrap(), b"content");
    assert!(t.opendir(d.nodeid).is_ok());
    assert!(t.lookup(d.nodeid, "inner").is_ok());
    let acc = |mask: i32| fuse::AccessIn {
        mask: mask as u32,
        padding: 0,
    };
    assert_eq!(
        t.errno(opcode::ACCESS, f.nodeid, &[acc(libc::R_OK).as_slice()]),
        0
    );
    assert_eq!(
        t.errno(opcode::ACCESS, f.nodeid, &[acc(libc::W_OK).as_slice()]),
        libc::EROFS
    );

    // Opening for writing.
    for flags in [libc::O_WRONLY, libc::O_RDWR, libc::O_RDONLY | libc::O_TRUNC] {
        assert_eq!(
            t.open(f.nodeid, flags),
            Err(libc::EROFS),
            "flags {flags:#x}"
        );
    }
    // Writes through the read-only handle.
    let wi = fuse::WriteIn {
        fh,
        size: 3,
        ..Default::default()
    };
    assert_eq!(
        t.errno(opcode::WRITE, f.nodeid, &[wi.as_slice(), b"abc"]),
        libc::EROFS
    );
    let fa = fuse::FallocateIn {
        fh,
        length: 4096,
        ..Default::default()
    };
    assert_eq!(
        t.errno(opcode::FALLOCATE, f.nodeid, &[fa.as_slice()]),
        libc::EROFS
    );
    let cr = fuse::CopyFileRangeIn {
        fh_in: fh,
        nodeid_out: f.nodeid,
        fh_out: fh,
        len: 3,
        off_out: 100,
        ..Default::default()
    };
    assert_eq!(
        t.errno(opcode::COPY_FILE_RANGE, f.nodeid, &[cr.as_slice()]),
        libc::EROFS
    );
    // Every request that would create, remove, rename or change.
    assert_eq!(t.create(1, "new", libc::O_WRONLY), Err(libc::EROFS));
    assert_eq!(t.mkdir(1, "newdir"), Err(libc::EROFS));
    assert_eq!(
        t.mknod(1, "fifo", libc::S_IFIFO | 0o644, 0),
        Err(libc::EROFS)
    );
    assert_eq!(t.mknod(1, "wh", libc::S_IFCHR, 0), Err(libc::EROFS));
    assert_eq!(t.symlink(1, "sl", "f"), Err(libc::EROFS));
    assert_eq!(t.link(f.nodeid, 1, "hard"), Err(libc::EROFS));
    assert_eq!(t.errno(opcode::UNLINK, 1, &[&cstr("f")]), libc::EROFS);
    assert_eq!(
        t.errno(opcode::UNLINK, d.nodeid, &[&cstr("inner")]),
        libc::EROFS
    );
    assert_eq!(t.errno(opcode::RMDIR, 1, &[&cstr("d")]), libc::EROFS);
    assert_eq!(t.rename(1, "f", 1, "g"), libc::EROFS);
    let r2 = fuse::Rename2In {
        newdir: 1,
        flags: libc::RENAME_EXCHANGE,
        padding: 0,
    };
    assert_eq!(
        t.errno(opcode::RENAME2, 1, &[r2.as_slice(), &cstr("f"), &cstr("d")]),
        libc::EROFS
    );
    for (valid, size, mode) in [
        (fuse::fattr::SIZE, 0, 0),
        (fuse::fattr::MODE, 0, 0o600),
        (fuse::fattr::MTIME_NOW, 0, 0),
    ] {
        let s = fuse::SetattrIn {
            valid,
            size,
            mode,
            ..Default::default()
        };
        assert_eq!(
            t.errno(opcode::SETATTR, f.nodeid, &[s.as_slice()]),
            libc::EROFS
        );
    }
    let sx = fuse::SetxattrIn { size: 1, flags: 0 };
    assert_eq!(
        t.errno(
            opcode::SETXATTR,
            f.nodeid,
            &[sx.as_slice(), &cstr("user.a"), b"1"]
        ),
        libc::EROFS
    );
    assert_eq!(
        t.errno(opcode::REMOVEXATTR, f.nodeid, &[&cstr("user.k")]),
        libc::EROFS
    );
    // GETXATTR still works.
    let gx = fuse::GetxattrIn {
        size: 64,
        padding: 0,
    };
    let r = t.call(
        opcode::GETXATTR,
        f.nodeid,
        &[gx.as_slice(), &cstr("user.k")],
    );
    assert_eq!((r.error, r.body.as_slice()), (0, &b"v"[..]));

    // The host tree is exactly as it was.
    assert_eq!(listing(t.path()), before);
    assert_eq!(listing(&t.path().join("d")), vec!["inner".to_string()]);
    assert_eq!(std::fs::read(t.path().join("f")).unwrap(), b"content");
    let md = std::fs::metadata(t.path().join("f")).unwrap();
    assert_eq!(md.mode() & 0o7777, 0o644);
}

#[test]
fn writable_by_default() {
    let mut t = Fuse::new("readonly-default", |_| {});
    assert!(t.create(1, "new", libc::O_WRONLY).is_ok());
    assert!(t.path().join("new").exists());
}

#[test]
fn overlayfs_whiteout_is_the_only_device_node_allowed() {
    let mut t = Fuse::new("whiteout", |_| {});
    let wh = t.mknod(1, "wh", libc::S_IFCHR | 0o600, 0).unwrap();
    assert_eq!(wh.attr.mode & libc::S_IFMT, libc::S_IFCHR);
    assert_eq!(wh.attr.rdev, 0);
    let md = std::fs::symlink_metadata(t.path().join("wh")).unwrap();
    assert!(md.file_type().is_char_device());
    assert_eq!(md.rdev(), 0);
    // Mode bits 0 too (overlayfs uses S_IFCHR | 0).
    assert!(t.mknod(1, "wh0", libc::S_IFCHR, 0).is_ok());
    // It opens as nothing: special files are not served.
    assert_eq!(t.open(wh.nodeid, libc::O_RDONLY), Err(libc::ENXIO));
    // Every real device stays refused: /dev/null (1:3), 0:1, a block 0:0.
    assert_eq!(
        t.mknod(1, "null", libc::S_IFCHR | 0o666, 0x0103),
        Err(libc::EPERM)
    );
    assert_eq!(
        t.mknod(1, "c01", libc::S_IFCHR | 0o666, 1),
        Err(libc::EPERM)
    );
    assert_eq!(
        t.mknod(1, "blk", libc::S_IFBLK | 0o600, 0),
        Err(libc::EPERM)
    );
    assert_eq!(
        t.mknod(1, "blk2", libc::S_IFBLK | 0o600, 0x0800),
        Err(libc::EPERM)
    );
    for n in ["null", "c01", "blk", "blk2"] {
        assert!(!t.path().join(n).exists(), "{n} was created");
    }
    // Whiteout names follow the usual rules.
    assert_eq!(t.mknod(1, "../wh", libc::S_IFCHR, 0), Err(libc::EINVAL));
    // And can be removed again.
    assert_eq!(t.errno(opcode::UNLINK, 1, &[&cstr("wh")]), 0);
}

fn xattr_set(path: &std::path::Path, name: &str, value: &[u8]) {
    let p = cstr(&path.display().to_string());
    let n = cstr(name);
    // SAFETY: NUL-terminated path and name; `value` is valid for its length.
    let r = unsafe {
        libc::setxattr(
            p.as_ptr().cast(),
            n.as_ptr().cast(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(r, 0, "setxattr: {}", std::io::Error::last_os_error());
}
