//! Tests of [`remove_tree`] on trees a hostile guest can make: thousands
//! of levels (paths far past `PATH_MAX`), directories with mode 000,
//! symlinks out of the tree, names that are not UTF-8, a mount inside.

use std::ffi::CString;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use rustix::fs::{chmodat, mkdirat, openat, symlinkat, AtFlags, Mode, OFlags, CWD};
use rustix::mount::{mount, unmount, MountFlags, UnmountFlags};
use rustix::process::{geteuid, setrlimit, Resource, Rlimit};

use super::remove_tree;
use keystone_test_kit::ScratchDir;

/// Levels of the deep tree: far more than `remove_dir_all` has descriptors
/// for under the limit below, and paths of 10 000 bytes.
const DEPTH: usize = 5000;
/// `RLIMIT_NOFILE` of the child that builds and removes the deep tree.
const NOFILE: u64 = 64;
/// The child's environment variable: the folder to work in.
const CHILD: &str = "KEYSTONE_REMOVE_TREE_CHILD";
/// Who the child becomes when the test runs as root: a user for whom
/// mode 000 really means no access.
const NOBODY: u32 = 65534;

fn c(bytes: &[u8]) -> CString {
    CString::new(bytes).unwrap()
}

fn check<T>(ret: rustix::io::Result<T>, what: &str) -> T {
    ret.unwrap_or_else(|e| panic!("{what}: {}", std::io::Error::from(e)))
}

fn check_libc(ret: libc::c_int, what: &str) {
    assert!(ret >= 0, "{what}: {}", std::io::Error::last_os_error());
}

fn open_dir(dir: BorrowedFd<'_>, name: &[u8]) -> OwnedFd {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY;
    check(
        openat(dir, c(name).as_c_str(), flags, Mode::empty()),
        "openat",
    )
}

fn mkdir(dir: BorrowedFd<'_>, name: &[u8], mode: u32) {
    let mode = Mode::from_raw_mode(mode);
    check(mkdirat(dir, c(name).as_c_str(), mode), "mkdirat");
}

fn file(dir: BorrowedFd<'_>, name: &[u8]) {
    let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::CLOEXEC;
    let mode = Mode::from_raw_mode(0o644);
    // The descriptor is closed at once.
    drop(check(
        openat(dir, c(name).as_c_str(), flags, mode),
        "create",
    ));
}

fn symlink(dir: BorrowedFd<'_>, name: &[u8], target: &Path) {
    let (name, target) = (c(name), c(target.as_os_str().as_bytes()));
    check(
        symlinkat(target.as_c_str(), dir, name.as_c_str()),
        "symlinkat",
    );
}

fn chmod(dir: BorrowedFd<'_>, name: &[u8], mode: u32) {
    let mode = Mode::from_raw_mode(mode);
    check(
        chmodat(dir, c(name).as_c_str(), mode, AtFlags::empty()),
        "chmod",
    );
}

/// Builds `tree` as the guest might: `DEPTH` nested `d` directories, each
/// tenth level with files, a symlink out of the tree, a non-UTF-8 name, a
/// 255-byte name and a directory with mode 000 holding a file; the top
/// with a symlink to the outside folder and one to itself.
fn build_hostile_tree(tree: &Path, outside: &Path) {
    std::fs::create_dir(tree).unwrap();
    let mut fd = open_dir(CWD, tree.as_os_str().as_bytes());
    symlink(fd.as_fd(), b"outside", outside);
    symlink(fd.as_fd(), b"self", tree);
    for level in 0..DEPTH {
        if level % 10 == 0 {
            let dir = fd.as_fd();
            file(dir, b"file");
            file(dir, b"\xff\xfe not utf-8 \x01");
            file(dir, &[b'n'; 255]);
            symlink(dir, b"out-file", &outside.join("keep"));
            symlink(dir, b"out-dir", outside);
            mkdir(dir, b"locked", 0o700);
            file(open_dir(dir, b"locked").as_fd(), b"inside");
            chmod(dir, b"locked", 0);
        }
        mkdir(fd.as_fd(), b"d", 0o755);
        fd = open_dir(fd.as_fd(), b"d");
    }
    // The deepest directory: unwritable and unreadable too.
    drop(fd);
}

fn assert_gone_and_outside_intact(tree: &Path, outside: &Path) {
    assert!(
        std::fs::symlink_metadata(tree).is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound),
        "{} is still there",
        tree.display()
    );
    assert_eq!(std::fs::read(outside.join("keep")).unwrap(), b"keep me");
    assert!(outside.join("sub/also").exists());
}

/// The child: drops root (when it is root) and descriptors, then builds
/// and removes the tree in `dir`.
fn hostile_tree_child(dir: &Path) {
    if geteuid().is_root() {
        // The ids stay libc's: the test harness runs this test on a thread
        // of its own, and only libc's setgroups/setgid/setuid change every
        // thread of the process (rustix's `set_thread_*` change one).
        // SAFETY: plain id changes of this child process; no memory is
        // passed (an empty group list). The folder was given to this user
        // by the parent.
        unsafe {
            check_libc(libc::setgroups(0, std::ptr::null()), "setgroups");
            check_libc(libc::setgid(NOBODY), "setgid");
            check_libc(libc::setuid(NOBODY), "setuid");
        }
    }
    // Only this child is limited.
    let lim = Rlimit {
        current: Some(NOFILE),
        maximum: Some(NOFILE),
    };
    check(setrlimit(Resource::Nofile, lim), "setrlimit");
    let (tree, outside) = (dir.join("tree"), dir.join("outside"));
    build_hostile_tree(&tree, &outside);
    remove_tree(&tree).unwrap();
    assert_gone_and_outside_intact(&tree, &outside);
    println!("remove_tree child done");
}

#[test]
fn a_deep_hostile_tree_goes_with_few_descriptors() {
    if let Some(dir) = std::env::var_os(CHILD) {
        return hostile_tree_child(Path::new(&dir));
    }
    let tmp = ScratchDir::new("remove-tree");
    let outside = tmp.path().join("outside");
    std::fs::create_dir_all(outside.join("sub")).unwrap();
    std::fs::write(outside.join("keep"), b"keep me").unwrap();
    std::fs::write(outside.join("sub/also"), b"").unwrap();
    if geteuid().is_root() {
        std::os::unix::fs::chown(tmp.path(), Some(NOBODY), Some(NOBODY)).expect("chown");
    }
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new(exe)
        .args([
            "--exact",
            "agent::fsutil::remove_tree::tests::a_deep_hostile_tree_goes_with_few_descriptors",
        ])
        .args(["--nocapture", "--test-threads=1"])
        .env(CHILD, tmp.path())
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "child failed:\n{text}");
    assert!(text.contains("remove_tree child done"), "{text}");
    assert_gone_and_outside_intact(&tmp.path().join("tree"), &outside);
}

#[test]
fn a_symlink_or_file_is_removed_itself_and_a_missing_path_is_not_found() {
    let tmp = ScratchDir::new("remove-tree-link");
    let target = tmp.path().join("target");
    std::fs::create_dir(&target).unwrap();
    std::fs::write(target.join("keep"), b"x").unwrap();
    let link = tmp.path().join("link");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    remove_tree(&link).unwrap();
    assert!(std::fs::symlink_metadata(&link).is_err());
    assert!(target.join("keep").exists());
    remove_tree(&target.join("keep")).unwrap();
    assert!(target.exists() && !target.join("keep").exists());
    let e = remove_tree(&tmp.path().join("missing")).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
}

#[test]
fn a_mount_inside_the_tree_is_not_entered() {
    if !geteuid().is_root() {
        println!("SKIP: mounting a tmpfs needs root");
        return;
    }
    let tmp = ScratchDir::new("remove-tree-mount");
    let tree = tmp.path().join("tree");
    let mnt = tree.join("sub/mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    std::fs::write(tree.join("sub/file"), b"").unwrap();
    let target = c(mnt.as_os_str().as_bytes());
    let mounted = mount(
        c"tmpfs",
        target.as_c_str(),
        c"tmpfs",
        MountFlags::empty(),
        c"size=64k",
    );
    if let Err(e) = mounted {
        println!("SKIP: cannot mount tmpfs: {}", std::io::Error::from(e));
        return;
    }
    std::fs::write(mnt.join("other-fs"), b"not ours").unwrap();
    let e = remove_tree(&tree).unwrap_err();
    let survived = std::fs::read(mnt.join("other-fs"));
    let _ = unmount(target.as_c_str(), UnmountFlags::DETACH);
    assert_eq!(e.raw_os_error(), None, "context is added: {e}");
    assert!(e.to_string().contains("mounted"), "{e}");
    assert_eq!(survived.unwrap(), b"not ours");
    remove_tree(&tree).unwrap();
    assert!(!tree.exists());
}
