//! Extended attributes inside the namespace sandbox, where the daemon's
//! root is the shared directory and no `/proc` is mounted: the guest's
//! overlay (`userxattr`) sets `user.overlay.*` on the state share's files
//! and directories, and refuses that share as its upper layer when they
//! fail, so the sandbox's root changes would not persist.
//!
//! The test thread enters a mount namespace of its own, builds the file
//! system, pivots into the shared directory as the sandbox does, then
//! sends SETXATTR, GETXATTR, LISTXATTR and REMOVEXATTR through the real
//! [`Server`](virtiofsd_lite::Server). Root only (it prints `SKIP`
//! elsewhere).

mod common;

use common::{cstr, Fuse};
use virtiofsd_lite::fuse::{self, opcode};
use vm_memory::ByteValued;

fn setxattr(fs: &mut Fuse, ino: u64, name: &str, value: &[u8]) -> i32 {
    let s = fuse::SetxattrIn {
        size: value.len() as u32,
        flags: 0,
    };
    fs.errno(opcode::SETXATTR, ino, &[s.as_slice(), &cstr(name), value])
}

fn getxattr(fs: &mut Fuse, ino: u64, name: &str) -> Result<Vec<u8>, i32> {
    let g = fuse::GetxattrIn {
        size: 256,
        padding: 0,
    };
    let r = fs.call(opcode::GETXATTR, ino, &[g.as_slice(), &cstr(name)]);
    if r.error != 0 {
        return Err(-r.error);
    }
    Ok(r.body)
}

fn listxattr(fs: &mut Fuse, ino: u64) -> Result<Vec<u8>, i32> {
    let g = fuse::GetxattrIn {
        size: 4096,
        padding: 0,
    };
    let r = fs.call(opcode::LISTXATTR, ino, &[g.as_slice()]);
    if r.error != 0 {
        return Err(-r.error);
    }
    Ok(r.body)
}

/// What the thread saw, or why it could not run.
enum Outcome {
    Skip(String),
    /// The failures, and the shared folder (removed from outside the
    /// pivoted thread, which no longer sees it).
    Ran(Vec<String>, std::path::PathBuf),
}

/// Runs in a thread of its own mount namespace: the pivot changes nothing
/// for the rest of the test process.
fn xattrs_after_the_pivot() -> Outcome {
    // SAFETY: unshare(CLONE_NEWNS) moves only this thread into a new mount
    // namespace (it implies CLONE_FS, also per thread).
    if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
        return Outcome::Skip(format!(
            "cannot enter a mount namespace: {}",
            std::io::Error::last_os_error()
        ));
    }
    let mut fs = Fuse::new("sandboxed-xattr", |_| {});
    std::fs::write(fs.path().join("file"), b"data").unwrap();
    std::fs::create_dir(fs.path().join("dir")).unwrap();
    let file = fs.lookup(1, "file").unwrap().nodeid;
    let dir = fs.lookup(1, "dir").unwrap().nodeid;
    // Probed on the host side: a request through the daemon now would
    // settle its thread's working directory before the pivot, which the
    // sandbox never does (its workers start after it).
    let probe = std::ffi::CString::new(fs.path().join("dir").into_os_string().into_encoded_bytes())
        .unwrap();
    // SAFETY: NUL-terminated path and name; a one-byte value.
    let set = unsafe {
        libc::setxattr(
            probe.as_ptr(),
            c"user.probe".as_ptr(),
            b"1".as_ptr().cast(),
            1,
            0,
        )
    };
    if set != 0 {
        return Outcome::Skip(format!(
            "the temporary folder has no user xattrs: {}",
            std::io::Error::last_os_error()
        ));
    }
    let shared = fs.path().to_path_buf();
    if let Err(e) = virtiofsd_lite::sandbox::pivot_into(&shared) {
        return Outcome::Skip(format!("cannot pivot into the shared folder: {e}"));
    }
    assert!(
        !std::path::Path::new("/proc/self").exists(),
        "the pivoted root still shows /proc"
    );
    let mut failures = Vec::new();
    for (what, ino) in [("file", file), ("dir", dir)] {
        let set = setxattr(&mut fs, ino, "user.overlay.opaque", b"y");
        if set != 0 {
            failures.push(format!("SETXATTR on the {what}: errno {set}"));
        }
        match getxattr(&mut fs, ino, "user.overlay.opaque") {
            Ok(v) if v == b"y" => {}
            other => failures.push(format!("GETXATTR on the {what}: {other:?}")),
        }
        match listxattr(&mut fs, ino) {
            Ok(names) if names.windows(19).any(|w| w == b"user.overlay.opaque") => {}
            other => failures.push(format!("LISTXATTR on the {what}: {other:?}")),
        }
        let removed = fs.errno(opcode::REMOVEXATTR, ino, &[&cstr("user.overlay.opaque")]);
        if removed != 0 {
            failures.push(format!("REMOVEXATTR on the {what}: errno {removed}"));
        }
    }
    Outcome::Ran(failures, shared)
}

#[test]
fn user_xattrs_work_inside_the_namespace_sandbox() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("SKIP: the namespace sandbox needs root");
        return;
    }
    let outcome = std::thread::spawn(xattrs_after_the_pivot).join().unwrap();
    match outcome {
        Outcome::Skip(why) => println!("SKIP: {why}"),
        Outcome::Ran(failures, shared) => {
            let _ = std::fs::remove_dir_all(&shared);
            assert!(failures.is_empty(), "{failures:#?}");
        }
    }
}
