//! A bounded-time robustness run of `Server` against a scratch directory:
//! valid requests of every opcode, mutated (bytes flipped, truncated,
//! extended, lengths set huge, bogus node ids and handles), fed for about
//! five seconds or 20 000 requests. Every request must get a well-formed
//! reply (FORGET and BATCH_FORGET may get none) and the daemon must still
//! answer a valid LOOKUP afterwards. Deterministic: a fixed-seed PRNG, so a
//! failure names the iteration that reproduces it.
//!
//! Its own test binary because it lowers `RLIMIT_FSIZE` (16 MiB) so that
//! huge FALLOCATE/WRITE/COPY_FILE_RANGE/SETATTR sizes cannot fill the disk.

use std::ffi::CString;
use std::mem::size_of;
use std::time::{Duration, Instant};

use keystone_test_kit::ScratchDir;
use virtiofsd_lite::descriptor::{Reader, Writer};
use virtiofsd_lite::fuse::{self, opcode, OutHeader};
use virtiofsd_lite::{FsConfig, PassthroughFs, Server};
use vm_memory::ByteValued;

const MAX_REQUESTS: usize = 20_000;
const MAX_TIME: Duration = Duration::from_secs(5);
const NAMES: &[&str] = &["a", "b", "dir", "link", "fifo", "new", "x.y", ".", ".."];

/// xorshift64*: small, deterministic, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len())]
    }
}

fn name(rng: &mut Rng) -> Vec<u8> {
    CString::new(*rng.pick(NAMES))
        .unwrap()
        .into_bytes_with_nul()
}

/// A plausible argument block for `op`, using known node ids and handles.
fn args(rng: &mut Rng, op: u32, nodes: &[u64], fhs: &[u64]) -> Vec<u8> {
    let fh = *rng.pick(fhs);
    let node = *rng.pick(nodes);
    let small = rng.below(8192) as u64;
    let size = rng.below(1 << 17) as u32;
    let mut v = Vec::new();
    match op {
        opcode::LOOKUP | opcode::UNLINK | opcode::RMDIR | opcode::REMOVEXATTR => {
            v = name(rng);
        }
        opcode::FORGET => v.extend_from_slice(&(rng.below(3) as u64).to_ne_bytes()),
        opcode::BATCH_FORGET => {
            let n = rng.below(4) as u32;
            v.extend_from_slice(fuse::BatchForgetIn { count: n, dummy: 0 }.as_slice());
            for _ in 0..n {
                let one = fuse::ForgetOne {
                    nodeid: *rng.pick(nodes),
                    nlookup: 1,
                };
                v.extend_from_slice(one.as_slice());
            }
        }
        opcode::GETATTR => {
            let g = fuse::GetattrIn {
                getattr_flags: rng.below(2) as u32,
                dummy: 0,
                fh,
            };
            v.extend_from_slice(g.as_slice());
        }
        opcode::SETATTR => {
            let s = fuse::SetattrIn {
                valid: rng.next() as u32 & 0x1ff,
                fh,
                size: small,
                mode: 0o644,
                uid: 0,
                gid: 0,
                ..Default::default()
            };
            v.extend_from_slice(s.as_slice());
        }
        opcode::SYMLINK => {
            v = name(rng);
            v.extend_from_slice(b"../../etc/passwd\0");
        }
        opcode::MKNOD => {
            let modes = [libc::S_IFREG, libc::S_IFIFO, libc::S_IFSOCK, libc::S_IFCHR];
            let m = fuse::MknodIn {
                mode: *rng.pick(&modes) | 0o644,
                rdev: 0,
                umask: 0o22,
                padding: 0,
            };
            v.extend_from_slice(m.as_slice());
            v.extend_from_slice(&name(rng));
        }
        opcode::MKDIR => {
            let m = fuse::MkdirIn {
                mode: 0o755,
                umask: 0o22,
            };
            v.extend_from_slice(m.as_slice());
            v.extend_from_slice(&name(rng));
        }
        opcode::RENAME | opcode::RENAME2 => {
            if op == opcode::RENAME {
                v.extend_from_slice(fuse::RenameIn { newdir: node }.as_slice());
            } else {
                let r = fuse::Rename2In {
                    newdir: node,
                    flags: rng.below(4) as u32,
                    padding: 0,
                };
                v.extend_from_slice(r.as_slice());
            }
            v.extend_from_slice(&name(rng));
            v.extend_from_slice(&name(rng));
        }
        opcode::LINK => {
            v.extend_from_slice(fuse::LinkIn { oldnodeid: node }.as_slice());
            v.extend_from_slice(&name(rng));
        }
        opcode::OPEN | opcode::OPENDIR => {
            let flags = [libc::O_RDONLY, libc::O_RDWR, libc::O_WRONLY | libc::O_TRUNC];
            let o = fuse::OpenIn {
                flags: *rng.pick(&flags) as u32,
                open_flags: 0,
            };
            v.extend_from_slice(o.as_slice());
        }
        opcode::CREATE => {
            let c = fuse::CreateIn {
                flags: (libc::O_RDWR | libc::O_CREAT) as u32,
                mode: 0o644,
                umask: 0o22,
                open_flags: 0,
            };
            v.extend_from_slice(c.as_slice());
            v.extend_from_slice(&name(rng));
        }
        opcode::READ | opcode::READDIR | opcode::READDIRPLUS => {
            let r = fuse::ReadIn {
                fh,
                offset: small,
                size,
                ..Default::default()
            };
            v.extend_from_slice(r.as_slice());
        }
        opcode::WRITE => {
            let len = rng.below(5000);
            let w = fuse::WriteIn {
                fh,
                offset: small,
                size: len as u32,
                ..Default::default()
            };
            v.extend_from_slice(w.as_slice());
            v.resize(v.len() + len, 0x5a);
        }
        opcode::RELEASE | opcode::RELEASEDIR => {
            let r = fuse::ReleaseIn {
                fh,
                ..Default::default()
            };
            v.extend_from_slice(r.as_slice());
        }
        opcode::FLUSH => v.extend_from_slice(
            fuse::FlushIn {
                fh,
                ..Default::default()
            }
            .as_slice(),
        ),
        opcode::FSYNC | opcode::FSYNCDIR => v.extend_from_slice(
            fuse::FsyncIn {
                fh,
                fsync_flags: rng.below(2) as u32,
                padding: 0,
            }
            .as_slice(),
        ),
        opcode::SETXATTR => {
            let val = b"value";
            let s = fuse::SetxattrIn {
                size: val.len() as u32,
                flags: 0,
            };
            v.extend_from_slice(s.as_slice());
            v.extend_from_slice(if rng.below(2) == 0 {
                b"user.k\0"
            } else {
                b"trusted.k\0"
            });
            v.extend_from_slice(val);
        }
        opcode::GETXATTR | opcode::LISTXATTR => {
            let g = fuse::GetxattrIn {
                size: *rng.pick(&[0, 3, 4096]),
                padding: 0,
            };
            v.extend_from_slice(g.as_slice());
            if op == opcode::GETXATTR {
                v.extend_from_slice(b"user.k\0");
            }
        }
        opcode::INIT => {
            let i = fuse::InitIn {
                major: 7,
                minor: 31 + rng.below(12) as u32,
                max_readahead: 1 << 17,
                flags: rng.next() as u32,
            };
            v.extend_from_slice(i.as_slice());
        }
        opcode::ACCESS => v.extend_from_slice(
            fuse::AccessIn {
                mask: rng.below(8) as u32,
                padding: 0,
            }
            .as_slice(),
        ),
        opcode::FALLOCATE => v.extend_from_slice(
            fuse::FallocateIn {
                fh,
                offset: small,
                length: small,
                mode: rng.below(4) as u32,
                padding: 0,
            }
            .as_slice(),
        ),
        opcode::LSEEK => v.extend_from_slice(
            fuse::LseekIn {
                fh,
                offset: small,
                whence: rng.below(5) as u32,
                padding: 0,
            }
            .as_slice(),
        ),
        opcode::COPY_FILE_RANGE => v.extend_from_slice(
            fuse::CopyFileRangeIn {
                fh_in: fh,
                off_in: small,
                nodeid_out: node,
                fh_out: *rng.pick(fhs),
                off_out: small,
                len: small,
                flags: 0,
            }
            .as_slice(),
        ),
        // GETLK/SETLK/SETLKW (fuse_lk_in), INTERRUPT, BMAP, IOCTL, POLL, ...
        _ => v.resize(rng.below(96), 0),
    }
    v
}

/// Applies zero to three random mutations to a whole request.
fn mutate(rng: &mut Rng, req: &mut Vec<u8>) {
    for _ in 0..rng.below(4) {
        match rng.below(8) {
            0 | 1 if !req.is_empty() => {
                let i = rng.below(req.len());
                req[i] ^= 1 << rng.below(8);
            }
            2 if !req.is_empty() => {
                let i = rng.below(req.len());
                req[i] = rng.next() as u8;
            }
            3 => req.truncate(rng.below(req.len() + 1)),
            4 => {
                let n = rng.below(64);
                req.extend((0..n).map(|_| rng.next() as u8));
            }
            5 if req.len() >= 4 => {
                // A huge or wrong length somewhere (header or argument).
                let i = rng.below(req.len() - 3) & !3;
                let val = *rng.pick(&[u32::MAX, u32::MAX / 2, 1 << 31, 0, 41]);
                req[i..i + 4].copy_from_slice(&val.to_ne_bytes());
            }
            6 if req.len() >= 24 => {
                // A bogus node id.
                let any = rng.next();
                let val = *rng.pick(&[0u64, 2, u64::MAX, 1 << 40, any]);
                req[16..24].copy_from_slice(&val.to_ne_bytes());
            }
            _ => {
                // Remove a NUL (unterminated name) or append one.
                if let Some(p) = req.iter().rposition(|&b| b == 0) {
                    req[p] = b'z';
                } else {
                    req.push(0);
                }
            }
        }
    }
}

/// Sends `req` with a reply buffer of `out_len` bytes (both possibly split
/// in two descriptors); returns (bytes written, reply buffer).
fn send(
    server: &Server<PassthroughFs>,
    req: &mut [u8],
    out_len: usize,
    split: usize,
) -> (usize, Vec<u8>) {
    let mut out = vec![0u8; out_len];
    let rsplit = split.min(req.len());
    let (r1, r2) = req.split_at_mut(rsplit);
    let wsplit = split.min(out_len);
    let (w1, w2) = out.split_at_mut(wsplit);
    let n = server.handle_message(
        Reader::from_slices(vec![r1.into(), r2.into()]),
        Writer::from_slices(vec![w1.into(), w2.into()]),
    );
    (n, out)
}

fn header(op: u32, unique: u64, nodeid: u64, body: &[u8]) -> Vec<u8> {
    let h = fuse::InHeader {
        len: (size_of::<fuse::InHeader>() + body.len()) as u32,
        opcode: op,
        unique,
        nodeid,
        uid: 0,
        gid: 0,
        pid: 1,
        ..Default::default()
    };
    [h.as_slice(), body].concat()
}

/// Checks one reply: returns its errno (0 for success or no reply).
fn check_reply(i: usize, req: &[u8], n: usize, out: &[u8]) -> i32 {
    let hdr: Option<fuse::InHeader> = fuse::read_struct(req);
    let no_reply_ok = hdr
        .map(|h| h.opcode == opcode::FORGET || h.opcode == opcode::BATCH_FORGET)
        .unwrap_or(false);
    if n == 0 {
        assert!(no_reply_ok, "iteration {i}: no reply to {hdr:?}");
        return 0;
    }
    assert!(
        n >= size_of::<OutHeader>() && n <= out.len(),
        "iteration {i}: {n} bytes"
    );
    let oh: OutHeader = fuse::read_struct(out).unwrap();
    assert_eq!(oh.len as usize, n, "iteration {i}: OutHeader.len");
    assert!(
        (-4095..=0).contains(&oh.error),
        "iteration {i}: error {}",
        oh.error
    );
    if oh.error != 0 {
        assert_eq!(
            n,
            size_of::<OutHeader>(),
            "iteration {i}: error with a body"
        );
    }
    let unique = hdr.map_or(0, |h| h.unique);
    assert_eq!(oh.unique, unique, "iteration {i}: unique");
    oh.error
}

fn init_and_lookup(server: &Server<PassthroughFs>, unique: u64, name: &str) -> fuse::EntryOut {
    let init = fuse::InitIn {
        major: 7,
        minor: 41,
        max_readahead: 1 << 17,
        flags: u32::MAX,
    };
    let mut req = header(opcode::INIT, unique, 0, init.as_slice());
    let (n, out) = send(server, &mut req, 4096, 4096);
    assert_eq!(check_reply(0, &req, n, &out), 0, "INIT");
    let body = CString::new(name).unwrap().into_bytes_with_nul();
    let mut req = header(opcode::LOOKUP, unique + 1, 1, &body);
    let (n, out) = send(server, &mut req, 4096, 4096);
    assert_eq!(check_reply(0, &req, n, &out), 0, "LOOKUP {name}");
    fuse::read_struct(&out[16..]).unwrap()
}

/// Caps file sizes in this process and ignores SIGXFSZ so that the cap is
/// an EFBIG reply instead of a signal.
fn cap_file_size() {
    let lim = libc::rlimit {
        rlim_cur: 16 << 20,
        rlim_max: 16 << 20,
    };
    // SAFETY: setrlimit reads one rlimit; SIG_IGN for SIGXFSZ only changes
    // how this test process reacts to oversize writes.
    unsafe {
        assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &lim), 0);
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
}

#[test]
fn mutated_requests_never_break_the_server() {
    cap_file_size();
    let dir = ScratchDir::new("vfsd-fuzz");
    std::fs::create_dir_all(dir.join("dir")).unwrap();
    std::fs::write(dir.join("a"), vec![7u8; 10_000]).unwrap();
    std::fs::write(dir.join("keep-out-of-reach"), b"still here").unwrap();
    std::os::unix::fs::symlink("a", dir.join("link")).unwrap();
    let fifo = CString::new(dir.join("fifo").into_os_string().into_encoded_bytes()).unwrap();
    // SAFETY: NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);

    let server = Server::new(PassthroughFs::new(&FsConfig::new(dir.path(), "fuzz")).unwrap());
    let mut unique = 1u64;
    init_and_lookup(&server, unique, "a");
    unique += 2;
    // Known node ids and handles for plausible requests: look up every
    // name and open what opens, so most requests reach the file system.
    let mut nodes = vec![1u64];
    let mut fhs = vec![0u64, u64::MAX];
    for n in NAMES {
        let body = CString::new(*n).unwrap().into_bytes_with_nul();
        let mut req = header(opcode::LOOKUP, unique, 1, &body);
        unique += 1;
        let (len, out) = send(&server, &mut req, 4096, 4096);
        if check_reply(0, &req, len, &out) == 0 {
            let e: fuse::EntryOut = fuse::read_struct(&out[16..]).unwrap();
            nodes.push(e.nodeid);
            let op = if e.attr.mode & libc::S_IFMT == libc::S_IFDIR {
                opcode::OPENDIR
            } else {
                opcode::OPEN
            };
            let o = fuse::OpenIn {
                flags: libc::O_RDWR as u32,
                open_flags: 0,
            };
            let mut req = header(op, unique, e.nodeid, o.as_slice());
            unique += 1;
            let (len, out) = send(&server, &mut req, 4096, 4096);
            if check_reply(0, &req, len, &out) == 0 {
                fhs.push(fuse::read_struct::<fuse::OpenOut>(&out[16..]).unwrap().fh);
            }
        }
    }
    nodes.extend([0, 999_999, u64::MAX]);

    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let start = Instant::now();
    let mut sent = 0usize;
    let mut ok = 0usize;
    let mut errors = std::collections::BTreeMap::<i32, usize>::new();
    while sent < MAX_REQUESTS && start.elapsed() < MAX_TIME {
        let op = if rng.below(10) == 0 {
            rng.below(64) as u32
        } else {
            1 + rng.below(opcode::STATX as usize) as u32
        };
        // DESTROY forgets every node and handle: sent once, at the end.
        if op == opcode::DESTROY {
            continue;
        }
        let body = args(&mut rng, op, &nodes, &fhs);
        let node = *rng.pick(&nodes);
        let mut req = header(op, unique, node, &body);
        unique += 1;
        mutate(&mut rng, &mut req);
        let out_len = *rng.pick(&[16usize, 100, 4096, 1 << 17, 1 << 17, 1 << 17]);
        let split = rng.below(out_len.max(req.len()) + 1);
        let (n, out) = send(&server, &mut req, out_len, split);
        match check_reply(sent, &req, n, &out) {
            0 => ok += 1,
            e => *errors.entry(-e).or_default() += 1,
        }
        sent += 1;
    }
    eprintln!(
        "fuzz: {sent} requests ({ok} without error, errno counts {errors:?}) in {:?}",
        start.elapsed()
    );
    assert!(sent >= 1000, "only {sent} requests in {MAX_TIME:?}");

    let mut req = header(opcode::DESTROY, unique, 0, &[]);
    unique += 1;
    let (n, out) = send(&server, &mut req, 4096, 4096);
    check_reply(sent, &req, n, &out);
    // Still serving: a valid LOOKUP of a name the requests never use.
    let e = init_and_lookup(&server, unique, "keep-out-of-reach");
    assert_eq!(e.attr.size, 10);
}
