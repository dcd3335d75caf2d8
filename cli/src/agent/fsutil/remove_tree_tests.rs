//! Tests of [`remove_tree`] on trees a hostile guest can make: thousands
//! of levels (paths far past `PATH_MAX`), directories with mode 000,
//! symlinks out of the tree, names that are not UTF-8, a mount inside.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use super::remove_tree;
use crate::agent::fsutil::test_support::TempDir;

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

fn check(ret: libc::c_int, what: &str) {
    assert!(ret >= 0, "{what}: {}", std::io::Error::last_os_error());
}

fn open_dir(dir: RawFd, name: &[u8]) -> OwnedFd {
    let name = c(name);
    // SAFETY: NUL-terminated name; the descriptor is owned below.
    let fd = unsafe { libc::openat(dir, name.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY) };
    check(fd, "openat");
    // SAFETY: openat just returned this descriptor.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn mkdir(dir: RawFd, name: &[u8], mode: u32) {
    let name = c(name);
    // SAFETY: NUL-terminated name.
    check(
        unsafe { libc::mkdirat(dir, name.as_ptr(), mode) },
        "mkdirat",
    );
}

fn file(dir: RawFd, name: &[u8]) {
    let name = c(name);
    let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC;
    // SAFETY: NUL-terminated name; the descriptor is closed at once.
    let fd = unsafe { libc::openat(dir, name.as_ptr(), flags, 0o644) };
    check(fd, "create");
    // SAFETY: closes the descriptor just opened.
    unsafe { libc::close(fd) };
}

fn symlink(dir: RawFd, name: &[u8], target: &Path) {
    let (name, target) = (c(name), c(target.as_os_str().as_bytes()));
    // SAFETY: NUL-terminated strings.
    check(
        unsafe { libc::symlinkat(target.as_ptr(), dir, name.as_ptr()) },
        "symlinkat",
    );
}

fn chmod(dir: RawFd, name: &[u8], mode: u32) {
    let name = c(name);
    // SAFETY: NUL-terminated name.
    check(
        unsafe { libc::fchmodat(dir, name.as_ptr(), mode, 0) },
        "chmod",
    );
}

/// Builds `tree` as the guest might: `DEPTH` nested `d` directories, each
/// tenth level with files, a symlink out of the tree, a non-UTF-8 name, a
/// 255-byte name and a directory with mode 000 holding a file; the top
/// with a symlink to the outside folder and one to itself.
fn build_hostile_tree(tree: &Path, outside: &Path) {
    std::fs::create_dir(tree).unwrap();
    let mut fd = open_dir(libc::AT_FDCWD, tree.as_os_str().as_bytes());
    symlink(fd.as_raw_fd(), b"outside", outside);
    symlink(fd.as_raw_fd(), b"self", tree);
    for level in 0..DEPTH {
        if level % 10 == 0 {
            let dir = fd.as_raw_fd();
            file(dir, b"file");
            file(dir, b"\xff\xfe not utf-8 \x01");
            file(dir, &[b'n'; 255]);
            symlink(dir, b"out-file", &outside.join("keep"));
            symlink(dir, b"out-dir", outside);
            mkdir(dir, b"locked", 0o700);
            file(open_dir(dir, b"locked").as_raw_fd(), b"inside");
            chmod(dir, b"locked", 0);
        }
        mkdir(fd.as_raw_fd(), b"d", 0o755);
        fd = open_dir(fd.as_raw_fd(), b"d");
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
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        // SAFETY: plain id changes of this child process; the folder was
        // given to this user by the parent.
        unsafe {
            check(libc::setgroups(0, std::ptr::null()), "setgroups");
            check(libc::setgid(NOBODY), "setgid");
            check(libc::setuid(NOBODY), "setuid");
        }
    }
    let lim = libc::rlimit {
        rlim_cur: NOFILE,
        rlim_max: NOFILE,
    };
    // SAFETY: setrlimit reads one rlimit; only this child is limited.
    check(
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) },
        "setrlimit",
    );
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
    let tmp = TempDir::new("remove-tree");
    let outside = tmp.path().join("outside");
    std::fs::create_dir_all(outside.join("sub")).unwrap();
    std::fs::write(outside.join("keep"), b"keep me").unwrap();
    std::fs::write(outside.join("sub/also"), b"").unwrap();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let path = c(tmp.path().as_os_str().as_bytes());
        // SAFETY: NUL-terminated path of the folder this test made.
        check(
            unsafe { libc::chown(path.as_ptr(), NOBODY, NOBODY) },
            "chown",
        );
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
    let tmp = TempDir::new("remove-tree-link");
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
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("SKIP: mounting a tmpfs needs root");
        return;
    }
    let tmp = TempDir::new("remove-tree-mount");
    let tree = tmp.path().join("tree");
    let mnt = tree.join("sub/mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    std::fs::write(tree.join("sub/file"), b"").unwrap();
    let target = c(mnt.as_os_str().as_bytes());
    // SAFETY: NUL-terminated strings that outlive the call.
    let ret = unsafe {
        libc::mount(
            c"tmpfs".as_ptr(),
            target.as_ptr(),
            c"tmpfs".as_ptr(),
            0,
            c"size=64k".as_ptr().cast(),
        )
    };
    if ret != 0 {
        println!(
            "SKIP: cannot mount tmpfs: {}",
            std::io::Error::last_os_error()
        );
        return;
    }
    std::fs::write(mnt.join("other-fs"), b"not ours").unwrap();
    let e = remove_tree(&tree).unwrap_err();
    let survived = std::fs::read(mnt.join("other-fs"));
    // SAFETY: NUL-terminated path of the mount made above.
    unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    assert_eq!(e.raw_os_error(), None, "context is added: {e}");
    assert!(e.to_string().contains("mounted"), "{e}");
    assert_eq!(survived.unwrap(), b"not ours");
    remove_tree(&tree).unwrap();
    assert!(!tree.exists());
}
