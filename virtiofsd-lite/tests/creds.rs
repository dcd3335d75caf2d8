//! New files belong to the guest user who made them: a daemon running as
//! root creates them with the caller's uid and gid from the FUSE header,
//! translated by `--translate-uid`/`--translate-gid` where those are given.

mod common;

use std::os::unix::fs::MetadataExt;

use common::Fuse;
use keystone_test_kit::skip;
use virtiofsd_lite::fuse::{self, fattr, opcode};
use virtiofsd_lite::{IdMap, IdMaps, IdRule};
use vm_memory::ByteValued;

fn id_map(rules: &[&str]) -> IdMap {
    IdMap::new(rules.iter().map(|r| r.parse::<IdRule>().unwrap()).collect()).unwrap()
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn files_are_created_as_the_calling_guest_user() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        skip!("creating files as another user needs a root daemon");
    }
    let mut fs = Fuse::new("creds", |_| {});
    // The guest user may create in a directory it owns.
    std::fs::create_dir(fs.path().join("home")).unwrap();
    std::os::unix::fs::chown(fs.path().join("home"), Some(1000), Some(1000)).unwrap();
    let home = fs.lookup(1, "home").unwrap().nodeid;

    fs.caller = (1000, 1000);
    fs.mkdir(home, "dir").unwrap();
    fs.create(home, "file", libc::O_WRONLY).unwrap();
    fs.symlink(home, "link", "file").unwrap();
    // ... and may not in root's directory.
    assert_eq!(fs.mkdir(1, "nope").map(|_| ()), Err(libc::EACCES));

    fs.caller = (0, 0);
    fs.mkdir(home, "rootdir").unwrap();

    let owner = |name: &str| {
        let m = std::fs::symlink_metadata(fs.path().join("home").join(name)).unwrap();
        (m.uid(), m.gid())
    };
    assert_eq!(owner("dir"), (1000, 1000));
    assert_eq!(owner("file"), (1000, 1000));
    assert_eq!(owner("link"), (1000, 1000));
    // The worker's own credentials came back after each request.
    assert_eq!(owner("rootdir"), (0, 0));
}

#[test]
fn owners_are_translated_both_ways() {
    if !is_root() {
        skip!("creating files as another user needs a root daemon");
    }
    let mut fs = Fuse::new("idmap", |cfg| {
        cfg.ids = IdMaps {
            uid: id_map(&[
                "map:1000:5000:10",
                "forbid-guest:0:1",
                "squash-host:7000:65534:2",
            ]),
            gid: id_map(&["map:1000:6000:10"]),
        };
    });
    let owner = |fs: &Fuse, name: &str| {
        let m = std::fs::symlink_metadata(fs.path().join(name)).unwrap();
        (m.uid(), m.gid())
    };
    std::os::unix::fs::chown(fs.path(), Some(5000), Some(6000)).unwrap();

    // Guest user 1000 creates: the host sees 5000:6000, the guest 1000:1000.
    fs.caller = (1000, 1000);
    let e = fs.create(1, "file", libc::O_WRONLY).unwrap();
    assert_eq!(owner(&fs, "file"), (5000, 6000));
    assert_eq!((e.attr.uid, e.attr.gid), (1000, 1000));
    let d = fs.mkdir(1, "dir").unwrap();
    assert_eq!(owner(&fs, "dir"), (5000, 6000));
    assert_eq!((d.attr.uid, d.attr.gid), (1000, 1000));

    // GETATTR and LOOKUP show the guest's numbers.
    let r = fs.call(
        opcode::GETATTR,
        e.nodeid,
        &[fuse::GetattrIn::default().as_slice()],
    );
    assert_eq!(r.error, 0);
    let a: fuse::AttrOut = fuse::read_struct(&r.body).unwrap();
    assert_eq!((a.attr.uid, a.attr.gid), (1000, 1000));

    // A chown in the guest to 1003 gives the file to host user 5003.
    let s = fuse::SetattrIn {
        valid: fattr::UID | fattr::GID,
        uid: 1003,
        gid: 1004,
        ..Default::default()
    };
    let r = fs.call(opcode::SETATTR, e.nodeid, &[s.as_slice()]);
    assert_eq!(r.error, 0);
    let a: fuse::AttrOut = fuse::read_struct(&r.body).unwrap();
    assert_eq!((a.attr.uid, a.attr.gid), (1003, 1004));
    assert_eq!(owner(&fs, "file"), (5003, 6004));

    // Guest root may neither create files nor be given one.
    fs.caller = (0, 0);
    assert_eq!(
        fs.create(1, "root-file", libc::O_WRONLY).map(|_| ()),
        Err(libc::EPERM)
    );
    assert_eq!(fs.mkdir(1, "root-dir").map(|_| ()), Err(libc::EPERM));
    let s = fuse::SetattrIn {
        valid: fattr::UID,
        uid: 0,
        ..Default::default()
    };
    assert_eq!(
        fs.errno(opcode::SETATTR, e.nodeid, &[s.as_slice()]),
        libc::EPERM
    );
    assert_eq!(owner(&fs, "file"), (5003, 6004));

    // Host users 7000 and 7001 both show as 65534; others pass unchanged.
    for (name, uid) in [("h7000", 7000), ("h7001", 7001), ("h42", 42)] {
        std::fs::write(fs.path().join(name), b"").unwrap();
        std::os::unix::fs::chown(fs.path().join(name), Some(uid), Some(42)).unwrap();
    }
    assert_eq!(fs.lookup(1, "h7000").unwrap().attr.uid, 65534);
    assert_eq!(fs.lookup(1, "h7001").unwrap().attr.uid, 65534);
    let e = fs.lookup(1, "h42").unwrap();
    assert_eq!((e.attr.uid, e.attr.gid), (42, 42));

    // READDIRPLUS entries are translated too.
    let fh = fs.opendir(1).unwrap();
    let ri = fuse::ReadIn {
        fh,
        size: 1 << 16,
        ..Default::default()
    };
    let r = fs.call(opcode::READDIRPLUS, 1, &[ri.as_slice()]);
    assert_eq!(r.error, 0);
    let mut seen = Vec::new();
    let mut b = &r.body[..];
    while b.len() >= std::mem::size_of::<fuse::Direntplus>() {
        let dp: fuse::Direntplus = fuse::read_struct(b).unwrap();
        let start = std::mem::size_of::<fuse::Direntplus>();
        let name = String::from_utf8_lossy(&b[start..start + dp.dirent.namelen as usize]);
        seen.push((name.into_owned(), dp.entry_out.attr.uid));
        let rec =
            std::mem::size_of::<fuse::EntryOut>() + fuse::dirent_size(dp.dirent.namelen as usize);
        b = &b[rec..];
    }
    for want in [("file", 1003), ("dir", 1000), ("h7000", 65534), ("h42", 42)] {
        assert!(
            seen.contains(&(want.0.to_string(), want.1)),
            "{want:?} not in {seen:?}"
        );
    }
}

#[test]
fn an_unprivileged_daemon_shows_its_files_as_the_guest_users() {
    // The keystone supervisor's maps when it does not run as root: every
    // guest owner becomes the daemon user, whose files the guest user owns.
    // SAFETY: getuid/getgid have no preconditions.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let mut fs = Fuse::new("idmap-user", |cfg| {
        cfg.ids = IdMaps::unprivileged(uid, gid, 1000, 1000);
    });
    fs.caller = (1000, 1000);
    let e = fs.create(1, "mine", libc::O_WRONLY).unwrap();
    assert_eq!(owner_of(&fs.path().join("mine")), (uid, gid));
    assert_eq!((e.attr.uid, e.attr.gid), (1000, 1000));
    // `chown agent:agent file` and `chown root file` in the guest succeed:
    // both name the daemon user on the host.
    for guest_uid in [1000, 0] {
        let s = fuse::SetattrIn {
            valid: fattr::UID | fattr::GID,
            uid: guest_uid,
            gid: guest_uid,
            ..Default::default()
        };
        assert_eq!(fs.errno(opcode::SETATTR, e.nodeid, &[s.as_slice()]), 0);
    }
    assert_eq!(owner_of(&fs.path().join("mine")), (uid, gid));
    // The shared directory itself is the guest user's.
    let r = fs.call(opcode::GETATTR, 1, &[fuse::GetattrIn::default().as_slice()]);
    let a: fuse::AttrOut = fuse::read_struct(&r.body).unwrap();
    assert_eq!((a.attr.uid, a.attr.gid), (1000, 1000));
}

fn owner_of(p: &std::path::Path) -> (u32, u32) {
    let m = std::fs::symlink_metadata(p).unwrap();
    (m.uid(), m.gid())
}
