//! GETXATTR and LISTXATTR with the sizes a hostile guest may send: a
//! request for 4 GiB allocates no more than Linux's own limit (64 KiB)
//! and answers what the `getxattr`/`listxattr` system calls would. Its own
//! test binary, so the memory peak it measures is its own.

mod common;

use common::{cstr, Fuse, ScratchDir};
use keystone_test_kit::skip;
use virtiofsd_lite::fuse::{self, opcode};
use vm_memory::ByteValued;

/// A size no xattr request of the Linux kernel ever carries.
const HUGE: u32 = 0xFFFF_FFFF;

/// A `/proc/self/status` field, in KiB.
fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with(field))
        .unwrap_or_else(|| panic!("no {field} in /proc/self/status"));
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn getxattr(fs: &mut Fuse, ino: u64, name: &str, size: u32) -> Result<Vec<u8>, i32> {
    let g = fuse::GetxattrIn { size, padding: 0 };
    let r = fs.call(opcode::GETXATTR, ino, &[g.as_slice(), &cstr(name)]);
    if r.error != 0 {
        return Err(-r.error);
    }
    Ok(r.body)
}

fn listxattr(fs: &mut Fuse, ino: u64, size: u32) -> Result<Vec<u8>, i32> {
    let g = fuse::GetxattrIn { size, padding: 0 };
    let r = fs.call(opcode::LISTXATTR, ino, &[g.as_slice()]);
    if r.error != 0 {
        return Err(-r.error);
    }
    Ok(r.body)
}

fn setxattr(fs: &mut Fuse, ino: u64, name: &str, value: &[u8]) -> i32 {
    let s = fuse::SetxattrIn {
        size: value.len() as u32,
        flags: 0,
    };
    fs.errno(opcode::SETXATTR, ino, &[s.as_slice(), &cstr(name), value])
}

#[test]
fn a_four_gib_xattr_request_allocates_nothing_big() {
    let mut fs = Fuse::new("xattr-huge", |_| {});
    std::fs::write(fs.path().join("file"), b"data").unwrap();
    let ino = fs.lookup(1, "file").unwrap().nodeid;
    if setxattr(&mut fs, ino, "user.key", b"value") == libc::EOPNOTSUPP {
        skip!("the temporary folder has no user xattrs");
    }
    assert_eq!(setxattr(&mut fs, ino, "user.other", b"2"), 0);
    let peak = status_kib("VmPeak:");
    let resident = status_kib("VmHWM:");

    assert_eq!(getxattr(&mut fs, ino, "user.key", HUGE).unwrap(), b"value");
    assert_eq!(
        listxattr(&mut fs, ino, HUGE).unwrap(),
        b"user.key\0user.other\0"
    );
    assert_eq!(
        getxattr(&mut fs, ino, "user.none", HUGE),
        Err(libc::ENODATA)
    );
    // The usual answers around the edges are unchanged.
    assert_eq!(getxattr(&mut fs, ino, "user.key", 5).unwrap(), b"value");
    assert_eq!(getxattr(&mut fs, ino, "user.key", 4), Err(libc::ERANGE));
    assert_eq!(listxattr(&mut fs, ino, 5), Err(libc::ERANGE));
    let count = listxattr(&mut fs, ino, 0).unwrap();
    assert_eq!(
        fuse::read_struct::<fuse::GetxattrOut>(&count).unwrap().size,
        20
    );

    // Neither the address space nor the resident set grew by anything
    // like the size asked for. (The bound leaves room for what the other
    // test's thread may map meanwhile: a stack, a malloc arena.)
    let grown = status_kib("VmPeak:") - peak;
    assert!(grown < 1 << 20, "the address space grew by {grown} KiB");
    let grown = status_kib("VmHWM:") - resident;
    assert!(grown < 64 << 10, "the resident set grew by {grown} KiB");
}

#[test]
fn a_list_longer_than_linux_allows_is_e2big() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        skip!("mounting a tmpfs needs root");
    }
    // tmpfs keeps any number of user xattrs; the temporary folder's file
    // system may keep only a block's worth.
    let dir = ScratchDir::new("xattr-list");
    let target = std::ffi::CString::new(dir.path().as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: NUL-terminated strings that outlive the call.
    let mounted = unsafe {
        libc::mount(
            c"tmpfs".as_ptr(),
            target.as_ptr(),
            c"tmpfs".as_ptr(),
            0,
            c"size=1m".as_ptr().cast(),
        )
    };
    if mounted != 0 {
        let e = std::io::Error::last_os_error();
        skip!("cannot mount tmpfs: {e}");
    }
    let mut fs = Fuse::serve(dir, |_| {});
    std::fs::write(fs.path().join("file"), b"").unwrap();
    let ino = fs.lookup(1, "file").unwrap().nodeid;
    // 300 names of 250 bytes: a 75 000-byte list.
    for i in 0..300 {
        let name = format!("user.{i:0>245}");
        assert_eq!(setxattr(&mut fs, ino, &name, b"v"), 0, "{name}");
    }
    // What listxattr(2) answers for it, with any buffer.
    assert_eq!(listxattr(&mut fs, ino, HUGE), Err(libc::E2BIG));
    assert_eq!(listxattr(&mut fs, ino, 65536), Err(libc::E2BIG));
    // (No GETXATTR of a huge size here: the other test measures those.)
    let name = format!("user.{:0>245}", 7);
    assert_eq!(getxattr(&mut fs, ino, &name, 65536).unwrap(), b"v");
    let path = fs.path().to_path_buf();
    drop(fs);
    // SAFETY: NUL-terminated path of our own mount.
    unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    let _ = std::fs::remove_dir(path);
}
