//! New files belong to the guest user who made them: a daemon running as
//! root creates them with the caller's uid and gid from the FUSE header.

mod common;

use std::os::unix::fs::MetadataExt;

use common::Fuse;

#[test]
fn files_are_created_as_the_calling_guest_user() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("SKIP: creating files as another user needs a root daemon");
        return;
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
