//! The host's errno reaches the guest unchanged: on a share whose file
//! system is full, every operation that needs space answers `ENOSPC` (never
//! `EIO`), a WRITE that only partly fits answers the bytes it wrote (as
//! `write(2)` does), and a file-size limit answers `EFBIG`.
//!
//! The share is a small tmpfs mounted for the test (root only; the tests
//! print `SKIP` elsewhere). Requests go through the real [`Server`] as byte
//! buffers, the way the guest kernel sends them.

mod common;

use std::ffi::CString;
use std::mem::size_of;
use std::path::PathBuf;

use common::{cstr, Fuse, ScratchDir};
use keystone_test_kit::skip;
use virtiofsd_lite::fuse::{self, opcode};
use virtiofsd_lite::FileHandles;
use vm_memory::ByteValued;

/// A tmpfs mounted over a scratch directory; unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mounts tmpfs with `options` over `dir`; `None` when that is not
    /// possible here (not root, no mount permission).
    fn mount(dir: &ScratchDir, options: &str) -> Option<Self> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            skip!(None; "mounting a small tmpfs needs root");
        }
        let target = CString::new(dir.path().as_os_str().as_encoded_bytes()).ok()?;
        let opts = CString::new(options).ok()?;
        // SAFETY: every pointer is a NUL-terminated string that outlives the call.
        let ret = unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                target.as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                opts.as_ptr().cast(),
            )
        };
        if ret != 0 {
            let e = std::io::Error::last_os_error();
            skip!(None; "cannot mount tmpfs: {e}");
        }
        Some(Tmpfs(dir.path().to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        if let Ok(target) = CString::new(self.0.as_os_str().as_encoded_bytes()) {
            // SAFETY: NUL-terminated path; a lazy unmount of our own mount.
            unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        }
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// CREATE: the node id and the open handle.
fn create(fs: &mut Fuse, parent: u64, name: &str) -> Result<(u64, u64), i32> {
    let c = fuse::CreateIn {
        flags: (libc::O_RDWR | libc::O_CREAT) as u32,
        mode: 0o644,
        umask: 0,
        open_flags: 0,
    };
    let r = fs.call(opcode::CREATE, parent, &[c.as_slice(), &cstr(name)]);
    if r.error != 0 {
        return Err(-r.error);
    }
    let e: fuse::EntryOut = fuse::read_struct(&r.body).unwrap();
    let o: fuse::OpenOut = fuse::read_struct(&r.body[size_of::<fuse::EntryOut>()..]).unwrap();
    Ok((e.nodeid, o.fh))
}

/// WRITE: the count the reply carries.
fn write(fs: &mut Fuse, ino: u64, fh: u64, offset: u64, data: &[u8]) -> Result<usize, i32> {
    let wi = fuse::WriteIn {
        fh,
        offset,
        size: data.len() as u32,
        ..Default::default()
    };
    let r = fs.call(opcode::WRITE, ino, &[wi.as_slice(), data]);
    if r.error != 0 {
        return Err(-r.error);
    }
    let out: fuse::WriteOut = fuse::read_struct(&r.body).unwrap();
    Ok(out.size as usize)
}

fn fallocate(fs: &mut Fuse, ino: u64, fh: u64, offset: u64, length: u64) -> i32 {
    let f = fuse::FallocateIn {
        fh,
        offset,
        length,
        mode: 0,
        padding: 0,
    };
    fs.errno(opcode::FALLOCATE, ino, &[f.as_slice()])
}

fn setxattr(fs: &mut Fuse, ino: u64, name: &str, value: &[u8]) -> i32 {
    let s = fuse::SetxattrIn {
        size: value.len() as u32,
        flags: 0,
    };
    fs.errno(opcode::SETXATTR, ino, &[s.as_slice(), &cstr(name), value])
}

fn truncate(fs: &mut Fuse, ino: u64, size: u64) -> i32 {
    let s = fuse::SetattrIn {
        valid: fuse::fattr::SIZE,
        size,
        ..Default::default()
    };
    fs.errno(opcode::SETATTR, ino, &[s.as_slice()])
}

/// FLUSH, FSYNC and RELEASE of a handle: what `close` and `fsync` report.
fn flush_fsync_release(fs: &mut Fuse, ino: u64, fh: u64) -> [i32; 3] {
    let f = fuse::FlushIn {
        fh,
        ..Default::default()
    };
    let s = fuse::FsyncIn {
        fh,
        ..Default::default()
    };
    let r = fuse::ReleaseIn {
        fh,
        ..Default::default()
    };
    [
        fs.errno(opcode::FLUSH, ino, &[f.as_slice()]),
        fs.errno(opcode::FSYNC, ino, &[s.as_slice()]),
        fs.errno(opcode::RELEASE, ino, &[r.as_slice()]),
    ]
}

fn host_len(fs: &Fuse, name: &str) -> u64 {
    std::fs::metadata(fs.path().join(name)).unwrap().len()
}

#[test]
fn a_full_share_answers_enospc_and_short_writes() {
    let dir = ScratchDir::new("errno-full");
    // 64 pages of data and 16 inodes (the root is one).
    let Some(_mount) = Tmpfs::mount(&dir, "size=256k,nr_inodes=16,huge=never,mode=0755") else {
        return;
    };
    let mut fs = Fuse::serve(dir, |_| {});

    // Fill the data space. 100000 bytes is not a multiple of the page
    // size, so the WRITE that reaches the end only partly fits: it must
    // answer the bytes written, and the next one ENOSPC.
    let (big, big_fh) = create(&mut fs, 1, "big").unwrap();
    let chunk = vec![b'a'; 100_000];
    let mut offset = 0u64;
    let mut short = None;
    let err = loop {
        match write(&mut fs, big, big_fh, offset, &chunk) {
            Ok(n) => {
                assert!(n > 0, "a WRITE that writes nothing must be an error");
                assert!(n <= chunk.len(), "WRITE answered more than it was sent");
                if n < chunk.len() {
                    short = Some(n);
                }
                offset += n as u64;
            }
            Err(e) => break e,
        }
        assert!(offset < 1 << 20, "a 256 KiB tmpfs took {offset} bytes");
    };
    assert_eq!(err, libc::ENOSPC, "WRITE on a full share");
    assert!(short.is_some(), "the WRITE across the limit lost its count");
    assert_eq!(host_len(&fs, "big"), offset, "the counts match the file");

    // `echo x > file` after `dd` filled the share.
    let (small, small_fh) = create(&mut fs, 1, "small").unwrap();
    assert_eq!(
        write(&mut fs, small, small_fh, 0, b"x\n"),
        Err(libc::ENOSPC)
    );
    assert_eq!(fallocate(&mut fs, small, small_fh, 0, 65536), libc::ENOSPC);
    // A long symlink target takes a page of its own.
    let long_target = "t".repeat(300);
    assert_eq!(fs.symlink(1, "long-link", &long_target), Err(libc::ENOSPC));
    let c = fuse::CopyFileRangeIn {
        fh_in: big_fh,
        off_in: 0,
        nodeid_out: small,
        fh_out: small_fh,
        off_out: 0,
        len: 8192,
        flags: 0,
    };
    assert_eq!(
        fs.errno(opcode::COPY_FILE_RANGE, big, &[c.as_slice()]),
        libc::ENOSPC
    );
    // Growing a tmpfs file by SETATTR needs no pages: it succeeds.
    assert_eq!(truncate(&mut fs, small, 1 << 20), 0);
    assert_eq!(flush_fsync_release(&mut fs, small, small_fh), [0; 3]);
    assert_eq!(flush_fsync_release(&mut fs, big, big_fh), [0; 3]);

    // Fill the inodes: every operation that makes one answers ENOSPC.
    let mut made = 0;
    let err = loop {
        match create(&mut fs, 1, &format!("f{made}")) {
            Ok((ino, fh)) => {
                assert_eq!(flush_fsync_release(&mut fs, ino, fh), [0; 3]);
                made += 1;
            }
            Err(e) => break e,
        }
        assert!(made < 64, "16 inodes took {made} files");
    };
    assert_eq!(err, libc::ENOSPC, "CREATE with no inode left");
    assert_eq!(fs.mkdir(1, "dir").map(|_| ()), Err(libc::ENOSPC));
    assert_eq!(fs.symlink(1, "link", "t").map(|_| ()), Err(libc::ENOSPC));
    let fifo = fs.mknod(1, "fifo", libc::S_IFIFO | 0o644, 0);
    assert_eq!(fifo.map(|_| ()), Err(libc::ENOSPC));
    assert_eq!(fs.link(small, 1, "hard").map(|_| ()), Err(libc::ENOSPC));
    let whiteout = fuse::Rename2In {
        newdir: 1,
        flags: libc::RENAME_WHITEOUT,
        padding: 0,
    };
    let args = [whiteout.as_slice(), &cstr("f0"), &cstr("f0-moved")];
    assert_eq!(fs.errno(opcode::RENAME2, 1, &args), libc::ENOSPC);
    // Extended attributes share the inode space.
    let value = vec![b'v'; 2000];
    let mut set = 0;
    let err = loop {
        match setxattr(&mut fs, small, &format!("user.k{set}"), &value) {
            0 => set += 1,
            e => break e,
        }
        assert!(set < 64, "16 KiB of inode space took {set} xattrs");
    };
    assert_eq!(err, libc::ENOSPC, "SETXATTR with no space left");
    // What was refused left nothing behind.
    for name in ["dir", "link", "fifo", "hard", "long-link"] {
        assert!(!fs.path().join(name).exists(), "{name} was made");
    }
}

/// Names the test a child process runs on its own, under a limit that is
/// per process and must not reach the other tests of this binary.
const CHILD: &str = "HOST_ERRNO_CHILD";
/// The child's `RLIMIT_FSIZE`.
const FSIZE_LIMIT: u64 = 1 << 20;

/// Whether this process is the child running `test`; else runs `test`
/// in a child and checks that it passed.
fn in_child(test: &str) -> bool {
    if std::env::var(CHILD).is_ok_and(|t| t == test) {
        return true;
    }
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new(exe)
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(CHILD, test)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{test} failed in its child:\n{text}");
    assert!(text.contains("child done"), "{text}");
    false
}

#[test]
fn a_file_size_limit_is_efbig_after_a_short_write() {
    if !in_child("a_file_size_limit_is_efbig_after_a_short_write") {
        return;
    }
    let lim = libc::rlimit {
        rlim_cur: FSIZE_LIMIT,
        rlim_max: FSIZE_LIMIT,
    };
    // SAFETY: setrlimit reads one rlimit; ignoring SIGXFSZ makes the
    // limit an EFBIG error instead of a fatal signal, in this child only.
    unsafe {
        assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &lim), 0);
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    let mut fs = Fuse::new("errno-efbig", |_| {});
    let (ino, fh) = create(&mut fs, 1, "file").unwrap();
    // Across the limit: the part below it, as write(2) answers.
    let data = vec![b'z'; 8192];
    let below = FSIZE_LIMIT - 4096;
    assert_eq!(write(&mut fs, ino, fh, below, &data), Ok(4096));
    assert_eq!(host_len(&fs, "file"), FSIZE_LIMIT);
    // At the limit: EFBIG, for every way of growing the file.
    assert_eq!(
        write(&mut fs, ino, fh, FSIZE_LIMIT, &data),
        Err(libc::EFBIG)
    );
    assert_eq!(fallocate(&mut fs, ino, fh, 0, 2 * FSIZE_LIMIT), libc::EFBIG);
    assert_eq!(truncate(&mut fs, ino, 2 * FSIZE_LIMIT), libc::EFBIG);
    assert_eq!(host_len(&fs, "file"), FSIZE_LIMIT);
    assert_eq!(flush_fsync_release(&mut fs, ino, fh), [0; 3]);
    println!("child done");
}

#[test]
fn out_of_descriptors_is_emfile_not_a_stale_file() {
    if !in_child("out_of_descriptors_is_emfile_not_a_stale_file") {
        return;
    }
    let dir = ScratchDir::new("errno-emfile");
    std::fs::write(dir.path().join("file"), b"still here").unwrap();
    let mut fs = Fuse::serve(dir, |c| c.file_handles = FileHandles::Never);
    // Only the root keeps a descriptor: the file is re-opened by name.
    fs.server.fs().inodes().set_fd_budget(1);
    let ino = fs.lookup(1, "file").unwrap().nodeid;
    assert_eq!(fs.server.fs().inodes().named(), 1);
    let getattr = |fs: &mut Fuse| fs.errno(opcode::GETATTR, ino, &[&[0u8; 16]]);
    assert_eq!(getattr(&mut fs), 0);

    // Take every descriptor number below a lowered limit.
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
    let saved = lim;
    lim.rlim_cur = 256;
    // SAFETY: setrlimit reads one rlimit; this child alone is limited.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) }, 0);
    let mut fillers = Vec::new();
    loop {
        // SAFETY: dup of stdin; the copies are closed below.
        let fd = unsafe { libc::dup(0) };
        if fd < 0 {
            break;
        }
        fillers.push(fd);
    }
    assert_eq!(
        getattr(&mut fs),
        libc::EMFILE,
        "the file is still there: out of descriptors is not a stale file"
    );
    for fd in fillers {
        // SAFETY: closes the copies made above.
        unsafe { libc::close(fd) };
    }
    // SAFETY: restores the limit read above.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &saved) }, 0);
    assert_eq!(getattr(&mut fs), 0);
    // A name the host removed is stale.
    std::fs::remove_file(fs.path().join("file")).unwrap();
    assert_eq!(getattr(&mut fs), libc::ESTALE);
    println!("child done");
}
