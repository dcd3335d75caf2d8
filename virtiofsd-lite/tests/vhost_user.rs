//! The whole vhost-user path in one process: `spawn_paired`'s daemon on
//! one end of its private connection, vhost's `Frontend` on the other, a memfd as guest
//! memory and a small guest-side split virtqueue that places FUSE requests
//! in descriptor chains (INIT, LOOKUP, OPEN, READ) and reads the replies.

use std::mem::size_of;
use std::time::{Duration, Instant};

use keystone_test_kit::virtq::{Buf, DriverQueue};
use keystone_test_kit::{skip, ScratchDir};

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::VhostBackend;
use virtiofsd_lite::fuse::{self, opcode};
use virtiofsd_lite::{spawn_paired, FsConfig};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use keystone_test_kit::vhost_frontend::SharedMemory;

const MEM_BASE: u64 = 0x10_0000;
const MEM_SIZE: usize = 0x40_0000;
const QSIZE: u16 = 64;
const BUFS: u64 = MEM_BASE + 0x10000;

/// The guest's side of the request queue: the split virtqueue and the
/// buffers its chains point to.
struct GuestQueue {
    mem: GuestMemoryMmap,
    queue: DriverQueue,
    next_buf: u64,
}

impl GuestQueue {
    fn alloc(&mut self, len: usize) -> GuestAddress {
        let a = self.next_buf;
        self.next_buf += (len as u64 + 63) & !63;
        assert!(self.next_buf < MEM_BASE + MEM_SIZE as u64);
        GuestAddress(a)
    }

    /// Queues a chain: `readable` buffers, then writable ones of `writable` sizes.
    /// Returns the writable buffers' addresses.
    fn add_chain(&mut self, readable: &[&[u8]], writable: &[usize]) -> Vec<(GuestAddress, usize)> {
        let mut chain = Vec::new();
        for bytes in readable {
            let a = self.alloc(bytes.len());
            self.mem.write_slice(bytes, a).unwrap();
            chain.push(Buf::readable(a.0, bytes.len() as u32));
        }
        let mut out = Vec::new();
        for &len in writable {
            let a = self.alloc(len);
            out.push((a, len));
            chain.push(Buf::writable(a.0, len as u32));
        }
        self.queue.add_chain(&self.mem, &chain);
        out
    }

    /// Waits for the next used entry and the call notification that must
    /// follow it; returns the entry's length.
    fn wait_used(&mut self, call: &EventFd) -> u32 {
        let limit = Duration::from_secs(10);
        let deadline = Instant::now() + limit;
        let (_, len) = self.queue.wait_used(&self.mem, limit);
        // The device signals after updating the ring.
        while call.read().is_err() {
            assert!(Instant::now() < deadline, "no call notification");
            std::thread::sleep(Duration::from_millis(2));
        }
        len
    }

    fn read_reply(&self, bufs: &[(GuestAddress, usize)], len: u32) -> Vec<u8> {
        let mut out = Vec::new();
        for &(a, l) in bufs {
            let mut b = vec![0u8; l];
            self.mem.read_slice(&mut b, a).unwrap();
            out.extend_from_slice(&b);
        }
        out.truncate(len as usize);
        out
    }
}

fn fuse_request(op: u32, unique: u64, nodeid: u64, args: &[&[u8]]) -> Vec<u8> {
    let body = args.concat();
    let h = fuse::InHeader {
        len: (size_of::<fuse::InHeader>() + body.len()) as u32,
        opcode: op,
        unique,
        nodeid,
        ..Default::default()
    };
    [h.as_slice(), &body].concat()
}

/// Negotiates, sets up guest memory and request queue 1, and runs INIT,
/// LOOKUP "init", OPEN, READ and an unknown opcode through the queue.
fn exercise(fe: &mut Frontend, content: &[u8]) {
    let features = fe.get_features().unwrap();
    assert_ne!(features & (1 << 32), 0, "VIRTIO_F_VERSION_1");
    assert_ne!(features & (1 << 29), 0, "EVENT_IDX");
    let proto = fe.get_protocol_features().unwrap();
    assert!(proto.contains(VhostUserProtocolFeatures::MQ));
    fe.set_owner().unwrap();
    fe.set_features(features).unwrap();
    fe.set_protocol_features(proto).unwrap();
    assert_eq!(fe.get_queue_num().unwrap(), 2);

    let shared = SharedMemory::new(MEM_BASE, MEM_SIZE).unwrap();
    shared.share(fe).unwrap();
    let call = EventFd::new(EFD_NONBLOCK).unwrap();
    let queue = DriverQueue::paged(MEM_BASE, QSIZE);
    let q = 1; // the first request queue
    let rings = (queue.desc, queue.avail, queue.used);
    shared
        .enable_queue(fe, q, QSIZE, rings, &call, queue.kick_fd())
        .unwrap();
    let mem = shared.into_memory();

    let mut gq = GuestQueue {
        mem,
        queue,
        next_buf: BUFS,
    };
    let roundtrip =
        |gq: &mut GuestQueue, req: Vec<u8>, writable: &[usize]| -> (fuse::OutHeader, Vec<u8>) {
            let bufs = gq.add_chain(&[&req[..40], &req[40..]], writable);
            gq.queue.kick();
            let len = gq.wait_used(&call);
            let reply = gq.read_reply(&bufs, len);
            let h: fuse::OutHeader = fuse::read_struct(&reply).unwrap();
            assert_eq!(h.len, len);
            (h, reply[16..].to_vec())
        };

    let init = fuse::InitIn {
        major: 7,
        minor: 41,
        max_readahead: 1 << 17,
        flags: u32::MAX,
    };
    let (h, body) = roundtrip(
        &mut gq,
        fuse_request(opcode::INIT, 1, 0, &[init.as_slice(), &[0u8; 48]]),
        &[256],
    );
    assert_eq!((h.error, h.unique), (0, 1));
    let out: fuse::InitOut = fuse::read_struct(&body).unwrap();
    assert_eq!(out.major, 7);
    assert!(out.minor >= 31);

    let (h, body) = roundtrip(
        &mut gq,
        fuse_request(opcode::LOOKUP, 2, 1, &[b"init\0"]),
        &[16, 128],
    );
    assert_eq!(h.error, 0);
    let entry: fuse::EntryOut = fuse::read_struct(&body).unwrap();
    assert_eq!(entry.attr.size, content.len() as u64);

    let open = fuse::OpenIn {
        flags: libc::O_RDONLY as u32,
        open_flags: 0,
    };
    let (h, body) = roundtrip(
        &mut gq,
        fuse_request(opcode::OPEN, 3, entry.nodeid, &[open.as_slice()]),
        &[64],
    );
    assert_eq!(h.error, 0);
    let fh = fuse::read_struct::<fuse::OpenOut>(&body).unwrap().fh;

    // The reply is scattered over three writable descriptors.
    let read = fuse::ReadIn {
        fh,
        offset: 0,
        size: 16384,
        ..Default::default()
    };
    let (h, body) = roundtrip(
        &mut gq,
        fuse_request(opcode::READ, 4, entry.nodeid, &[read.as_slice()]),
        &[16, 100, 16384],
    );
    assert_eq!(h.error, 0);
    assert_eq!(body, content);

    // Unknown opcode over the queue: ENOSYS.
    let (h, _) = roundtrip(&mut gq, fuse_request(999, 5, 1, &[]), &[64]);
    assert_eq!(h.error, -libc::ENOSYS);
}

#[test]
fn fuse_over_vhost_user_socketpair() {
    let dir = ScratchDir::new("vfsd-vu");
    let content: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(dir.join("init"), &content).unwrap();

    let (ours, handle) = spawn_paired(FsConfig::new(dir.path(), "root")).unwrap();
    let stats = handle.stats();

    let mut fe = Frontend::from_stream(ours, 2);
    exercise(&mut fe, &content);

    assert_eq!(stats.count(opcode::READ), 1);
    assert_eq!(stats.count(opcode::INIT), 1);
    assert_eq!(stats.paths_read(), vec![std::path::PathBuf::from("init")]);

    // The frontend hanging up ends the daemon cleanly.
    drop(fe);
    handle.join().unwrap();
}

#[test]
fn stop_ends_an_idle_daemon() {
    let dir = ScratchDir::new("vfsd-vu-stop");
    let (_ours, handle) = spawn_paired(FsConfig::new(dir.path(), "t")).unwrap();
    handle.stop().unwrap();
}

#[test]
fn bad_shared_dir_is_a_clear_error() {
    let err = spawn_paired(FsConfig::new("/nonexistent/vfsd-lite", "t"))
        .err()
        .unwrap();
    assert!(err.to_string().contains("/nonexistent/vfsd-lite"), "{err}");
}

#[test]
fn serve_listener_serves_one_connection() {
    let dir = ScratchDir::new("vfsd-vu-listen");
    std::fs::create_dir_all(dir.join("share")).unwrap();
    let content = b"listener path".to_vec();
    std::fs::write(dir.join("share/init"), &content).unwrap();
    let sock = dir.join("vfsd.sock");
    let (share, sock2) = (dir.join("share"), sock.clone());
    let server = std::thread::spawn(move || {
        virtiofsd_lite::serve_listener(&sock2, FsConfig::new(share, "root"))
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut fe = loop {
        match Frontend::connect(&sock, 2) {
            Ok(fe) => break fe,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("cannot connect: {e}"),
        }
    };
    exercise(&mut fe, &content);
    drop(fe);
    server.join().unwrap().unwrap();
}

#[test]
fn the_binary_starts_the_namespace_sandbox() {
    let bin = env!("CARGO_BIN_EXE_virtiofsd-lite");
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        skip!("namespace sandbox start: needs root");
    }
    let base = ScratchDir::new("vfsd-sandbox");
    std::fs::create_dir_all(base.join("shared")).unwrap();
    let sock = base.join("fs.sock");
    let mut child = std::process::Command::new(bin)
        .args(["--sandbox", "namespace", "--socket-path"])
        .arg(&sock)
        .arg("--shared-dir")
        .arg(base.join("shared"))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !sock.exists() && std::time::Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            use std::io::Read;
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            if err.contains("cannot set up the namespace sandbox") {
                skip!("namespace sandbox start: {err}");
            }
            panic!("daemon exited early ({status}): {err}");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(sock.exists(), "no socket after 10 s");
    // The socket is outside the pivoted root and answers a connection.
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert!(child.try_wait().unwrap().is_none(), "daemon exited");
    let conn = std::os::unix::net::UnixStream::connect(&sock);
    assert!(conn.is_ok(), "{conn:?}");
    drop(conn);
    let _ = child.kill();
    let _ = child.wait();
}
