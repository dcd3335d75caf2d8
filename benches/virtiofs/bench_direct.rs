//! Benchmark: virtiofsd-lite against virtiofsd 1.14 with the daemon as the
//! bottleneck.
//!
//! `bench_vs_virtiofsd` puts a whole guest kernel in front of the daemons;
//! under TCG (all this project's hosts have) the emulated guest takes most
//! of each request's time and figures move 10 to 15 % between runs. Here
//! the frontend is this process: it speaks vhost-user to each daemon (its
//! own process, the same options), shares a memfd as guest memory, and
//! drives a split virtqueue itself, one FUSE request in flight at a time,
//! kicking the daemon's eventfd and sleeping on the call eventfd as a vCPU
//! would. Each request then costs what the daemon (and the two wake-ups
//! every virtio device pays) costs, so the lines compare the daemons.
//!
//! Lines (the guest benchmark's, as FUSE requests): sequential WRITE and
//! READ of 1 MiB blocks (then FSYNC), random 4 KiB READ and WRITE, CREATE
//! (with RELEASE), LOOKUP+GETATTR and UNLINK of 10 000 files, and a tree
//! walk as `git status` makes it (per directory LOOKUP, OPENDIR, READDIR,
//! RELEASEDIR; per file LOOKUP and GETATTR) over 10 000 files in 100
//! directories; daemon RSS (max) and CPU time per line. Every line
//! alternates between the daemons in ABBA segments; a daemon's median
//! segment is its figure for the run; `--runs N` repeats with fresh
//! daemons and reports median, min and max over runs. JSON on stdout, a
//! table on stderr. The shared directories live on `--dir` (default
//! `/dev/shm`, so no disk sits in the measurement).
//!
//! ```text
//! cargo build -p virtiofsd-lite -p keystone-benches --release --bins
//! cargo run -p keystone-benches --release --bin bench-virtiofs-direct -- --runs 3
//! ```
//! `--only rand_read_4KiB,...` runs some lines (for profiling one).

mod support;

use std::collections::BTreeMap;
use std::mem::size_of;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keystone_test_kit::vhost_frontend::SharedMemory;
use support::{cpu_ns, json_str, lower_is_better, summary, Samples, LITE, VFSD};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::VhostBackend;
use virtiofsd_lite::fuse::{self, opcode};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const MEM_BASE: u64 = 0x10_0000;
const MEM_SIZE: usize = 8 << 20;
const QSIZE: u16 = 256;
const DESC: u64 = MEM_BASE;
const AVAIL: u64 = MEM_BASE + 0x1000;
const USED: u64 = MEM_BASE + 0x2000;
/// Request headers and arguments.
const REQ: u64 = MEM_BASE + 0x10000;
/// Reply headers and bodies (READ replies up to 1 MiB).
const REPLY: u64 = MEM_BASE + 0x20000;
/// WRITE payloads, filled once.
const DATA: u64 = MEM_BASE + 0x20_0000;
const BLOCK: usize = 1 << 20;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

const SEQ_MIB: u64 = 1024;
const RAND_OPS: usize = 20_000;
const FILES: usize = 10_000;
const TREE_DIRS: usize = 100;
const TREE_FILES: usize = 100;
const SEGMENTS: usize = 5;

/// Every line with its unit, in the order they run.
const LINES: [(&str, &str); 8] = [
    ("seq_write_1MiB", "MiB/s"),
    ("seq_read_1MiB", "MiB/s"),
    ("rand_read_4KiB", "IOPS"),
    ("rand_write_4KiB", "IOPS"),
    ("create_files", "files/s"),
    ("stat_files", "files/s"),
    ("unlink_files", "files/s"),
    ("tree_walk_10k", "ms"),
];

/// A vhost-user-fs daemon process and this process as its frontend.
struct Daemon {
    label: &'static str,
    child: Child,
    fe: Frontend,
    mem: GuestMemoryMmap,
    kick: EventFd,
    call: EventFd,
    avail_idx: u16,
    used_seen: u16,
    unique: u64,
    samples: Arc<Samples>,
    stop: Arc<AtomicBool>,
    sampler: Option<std::thread::JoinHandle<()>>,
}

fn vu<T, E: std::fmt::Display>(what: &str, r: Result<T, E>) -> Result<T, String> {
    r.map_err(|e| format!("{what}: {e}"))
}

impl Daemon {
    /// Starts `cmd` on `sock` serving `shared`, connects and negotiates,
    /// sets up guest memory and request queue 1, and sends INIT.
    fn start(
        label: &'static str,
        cmd: &[String],
        sock: &Path,
        shared: &Path,
    ) -> Result<Self, String> {
        let child = support::spawn_daemon(cmd, sock, shared, Stdio::null())?;
        let mut fe = vu("connect", Frontend::connect(sock, 2))?;
        let offered = vu("get_features", fe.get_features())?;
        let want = (1u64 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1)
            | (1u64 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        vu("set_owner", fe.set_owner())?;
        vu("set_features", fe.set_features(offered & want))?;
        let proto = vu("get_protocol_features", fe.get_protocol_features())?;
        vu(
            "set_protocol_features",
            fe.set_protocol_features(proto & VhostUserProtocolFeatures::MQ),
        )?;

        let shared = SharedMemory::new(MEM_BASE, MEM_SIZE)?;
        shared.share(&mut fe)?;
        // A blocking call eventfd: the frontend sleeps on it as a vCPU
        // halts until its interrupt.
        let call = vu("eventfd", EventFd::new(0))?;
        let kick = vu("eventfd", EventFd::new(libc::EFD_NONBLOCK))?;
        shared.enable_queue(&mut fe, 1, QSIZE, (DESC, AVAIL, USED), &call, &kick)?;
        let mem = shared.into_memory();
        let payload: Vec<u8> = (0..BLOCK).map(|i| (i * 7 % 251) as u8).collect();
        vu("payload", mem.write_slice(&payload, GuestAddress(DATA)))?;

        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Samples::default());
        let sampler = support::sampler(child.id(), stop.clone(), samples.clone());
        let mut d = Daemon {
            label,
            child,
            fe,
            mem,
            kick,
            call,
            avail_idx: 0,
            used_seen: 0,
            unique: 0,
            samples,
            stop,
            sampler: Some(sampler),
        };
        let init = fuse::InitIn {
            major: 7,
            minor: 31,
            max_readahead: 1 << 17,
            flags: fuse::init_flags::ASYNC_READ
                | fuse::init_flags::BIG_WRITES
                | fuse::init_flags::MAX_PAGES
                | fuse::init_flags::PARALLEL_DIROPS,
        };
        d.call_ok(opcode::INIT, 0, &[init.as_slice(), &[0u8; 48]], None, 256)?;
        Ok(d)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends one request (`args` after the header, then `data` bytes of
    /// the payload area) with `room` bytes of reply body and waits for it.
    /// Returns the reply's errno (0 on success) and its length.
    fn call(
        &mut self,
        op: u32,
        nodeid: u64,
        args: &[&[u8]],
        data: Option<usize>,
        room: usize,
    ) -> Result<(i32, u32), String> {
        self.unique += 1;
        let body: usize = args.iter().map(|a| a.len()).sum();
        let h = fuse::InHeader {
            len: (size_of::<fuse::InHeader>() + body + data.unwrap_or(0)) as u32,
            opcode: op,
            unique: self.unique,
            nodeid,
            ..Default::default()
        };
        let mut at = REQ;
        for part in std::iter::once(h.as_slice()).chain(args.iter().copied()) {
            vu("request", self.mem.write_slice(part, GuestAddress(at)))?;
            at += part.len() as u64;
        }
        let mut chain = vec![(REQ, (at - REQ) as u32, 0u16)];
        if let Some(n) = data {
            chain.push((DATA, n as u32, 0));
        }
        chain.push((REPLY, (size_of::<fuse::OutHeader>() + room) as u32, F_WRITE));
        for (i, &(addr, len, flags)) in chain.iter().enumerate() {
            let d = DESC + i as u64 * 16;
            let next = if i + 1 < chain.len() { F_NEXT } else { 0 };
            let m = &self.mem;
            vu("desc", m.write_obj(addr, GuestAddress(d)))?;
            vu("desc", m.write_obj(len, GuestAddress(d + 8)))?;
            vu("desc", m.write_obj(flags | next, GuestAddress(d + 12)))?;
            vu("desc", m.write_obj(i as u16 + 1, GuestAddress(d + 14)))?;
        }
        let slot = u64::from(self.avail_idx % QSIZE);
        vu(
            "avail",
            self.mem.write_obj(0u16, GuestAddress(AVAIL + 4 + slot * 2)),
        )?;
        // used_event: be told about the next used entry.
        let used_event = GuestAddress(AVAIL + 4 + 2 * u64::from(QSIZE));
        vu("avail", self.mem.write_obj(self.used_seen, used_event))?;
        self.avail_idx = self.avail_idx.wrapping_add(1);
        std::sync::atomic::fence(Ordering::SeqCst);
        vu(
            "avail",
            self.mem.write_obj(self.avail_idx, GuestAddress(AVAIL + 2)),
        )?;
        vu("kick", self.kick.write(1))?;
        loop {
            std::sync::atomic::fence(Ordering::SeqCst);
            let idx: u16 = vu("used", self.mem.read_obj(GuestAddress(USED + 2)))?;
            if idx != self.used_seen {
                break;
            }
            vu("call", self.call.read())?;
        }
        let slot = u64::from(self.used_seen % QSIZE);
        let len: u32 = vu(
            "used",
            self.mem.read_obj(GuestAddress(USED + 4 + slot * 8 + 4)),
        )?;
        self.used_seen = self.used_seen.wrapping_add(1);
        if len == 0 {
            return Ok((0, 0));
        }
        let out: fuse::OutHeader = vu("reply", self.mem.read_obj(GuestAddress(REPLY)))?;
        if out.unique != self.unique {
            return Err(format!("reply {} to request {}", out.unique, self.unique));
        }
        Ok((-out.error, len))
    }

    /// [`Daemon::call`] that must succeed; returns the reply body length.
    fn call_ok(
        &mut self,
        op: u32,
        nodeid: u64,
        args: &[&[u8]],
        data: Option<usize>,
        room: usize,
    ) -> Result<usize, String> {
        match self.call(op, nodeid, args, data, room)? {
            (0, len) => Ok((len as usize).saturating_sub(size_of::<fuse::OutHeader>())),
            (e, _) => Err(format!("{}: opcode {op} failed: errno {e}", self.label)),
        }
    }

    /// A reply body object.
    fn reply<T: ByteValued>(&self) -> Result<T, String> {
        vu(
            "reply",
            self.mem
                .read_obj(GuestAddress(REPLY + size_of::<fuse::OutHeader>() as u64)),
        )
    }

    fn lookup(&mut self, parent: u64, name: &str) -> Result<u64, String> {
        self.call_ok(opcode::LOOKUP, parent, &[&cstr(name)], None, 256)?;
        Ok(self.reply::<fuse::EntryOut>()?.nodeid)
    }

    fn getattr(&mut self, node: u64) -> Result<(), String> {
        let g = fuse::GetattrIn::default();
        self.call_ok(opcode::GETATTR, node, &[g.as_slice()], None, 256)
            .map(|_| ())
    }

    fn open(&mut self, node: u64, flags: i32) -> Result<u64, String> {
        let o = fuse::OpenIn {
            flags: flags as u32,
            open_flags: 0,
        };
        self.call_ok(opcode::OPEN, node, &[o.as_slice()], None, 64)?;
        Ok(self.reply::<fuse::OpenOut>()?.fh)
    }

    fn create(&mut self, parent: u64, name: &str) -> Result<(u64, u64), String> {
        let c = fuse::CreateIn {
            flags: (libc::O_RDWR | libc::O_CREAT) as u32,
            mode: 0o644 | libc::S_IFREG,
            umask: 0,
            open_flags: 0,
        };
        self.call_ok(
            opcode::CREATE,
            parent,
            &[c.as_slice(), &cstr(name)],
            None,
            512,
        )?;
        let e: fuse::EntryOut = self.reply()?;
        let o: fuse::OpenOut = vu(
            "reply",
            self.mem.read_obj(GuestAddress(
                REPLY + (size_of::<fuse::OutHeader>() + size_of::<fuse::EntryOut>()) as u64,
            )),
        )?;
        Ok((e.nodeid, o.fh))
    }

    fn release(&mut self, node: u64, fh: u64, dir: bool) -> Result<(), String> {
        let r = fuse::ReleaseIn {
            fh,
            ..Default::default()
        };
        let op = if dir {
            opcode::RELEASEDIR
        } else {
            opcode::RELEASE
        };
        self.call_ok(op, node, &[r.as_slice()], None, 16)
            .map(|_| ())
    }

    fn read(&mut self, node: u64, fh: u64, offset: u64, size: u32) -> Result<(), String> {
        let r = fuse::ReadIn {
            fh,
            offset,
            size,
            ..Default::default()
        };
        let n = self.call_ok(opcode::READ, node, &[r.as_slice()], None, size as usize)?;
        if n != size as usize {
            return Err(format!("{}: short read {n} of {size}", self.label));
        }
        Ok(())
    }

    fn write(&mut self, node: u64, fh: u64, offset: u64, size: u32) -> Result<(), String> {
        let w = fuse::WriteIn {
            fh,
            offset,
            size,
            ..Default::default()
        };
        self.call_ok(
            opcode::WRITE,
            node,
            &[w.as_slice()],
            Some(size as usize),
            16,
        )?;
        let out: fuse::WriteOut = self.reply()?;
        if out.size != size {
            return Err(format!(
                "{}: short write {} of {size}",
                self.label, out.size
            ));
        }
        Ok(())
    }

    /// Forgets one lookup of each node (not timed).
    fn forget(&mut self, nodes: &[u64]) -> Result<(), String> {
        for chunk in nodes.chunks(4096) {
            let b = fuse::BatchForgetIn {
                count: chunk.len() as u32,
                dummy: 0,
            };
            let list: Vec<u8> = chunk
                .iter()
                .flat_map(|&n| {
                    fuse::ForgetOne {
                        nodeid: n,
                        nlookup: 1,
                    }
                    .as_slice()
                    .to_vec()
                })
                .collect();
            self.call(opcode::BATCH_FORGET, 0, &[b.as_slice(), &list], None, 16)?;
        }
        Ok(())
    }

    fn stop(mut self) -> u64 {
        drop(self.fe);
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.stop.store(true, Ordering::Relaxed);
        if let Some(s) = self.sampler.take() {
            let _ = s.join();
        }
        self.samples.rss_max_kib.load(Ordering::Relaxed)
    }
}

fn cstr(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

/// A small deterministic generator for the random offsets.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// One segment of `line` on `d`; returns its figure in the line's unit.
fn segment(d: &mut Daemon, line: &str, seg: usize) -> Result<f64, String> {
    let blocks = SEQ_MIB;
    match line {
        "seq_write_1MiB" => {
            let (node, fh) = d.create(1, "seq")?;
            let t = Instant::now();
            for b in 0..blocks {
                d.write(node, fh, b * BLOCK as u64, BLOCK as u32)?;
            }
            let f = fuse::FsyncIn {
                fh,
                ..Default::default()
            };
            d.call_ok(opcode::FSYNC, node, &[f.as_slice()], None, 16)?;
            let rate = blocks as f64 / t.elapsed().as_secs_f64();
            d.release(node, fh, false)?;
            d.forget(&[node])?;
            Ok(rate)
        }
        "seq_read_1MiB" => {
            let node = d.lookup(1, "seq")?;
            let fh = d.open(node, libc::O_RDONLY)?;
            let t = Instant::now();
            for b in 0..blocks {
                d.read(node, fh, b * BLOCK as u64, BLOCK as u32)?;
            }
            let rate = blocks as f64 / t.elapsed().as_secs_f64();
            d.release(node, fh, false)?;
            d.forget(&[node])?;
            Ok(rate)
        }
        "rand_read_4KiB" | "rand_write_4KiB" => {
            let writing = line == "rand_write_4KiB";
            let node = d.lookup(1, "seq")?;
            let fh = d.open(
                node,
                if writing {
                    libc::O_RDWR
                } else {
                    libc::O_RDONLY
                },
            )?;
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ seg as u64);
            let pages = blocks * (BLOCK as u64 / 4096);
            let t = Instant::now();
            for _ in 0..RAND_OPS {
                let off = (rng.next() % pages) * 4096;
                if writing {
                    d.write(node, fh, off, 4096)?;
                } else {
                    d.read(node, fh, off, 4096)?;
                }
            }
            let rate = RAND_OPS as f64 / t.elapsed().as_secs_f64();
            d.release(node, fh, false)?;
            d.forget(&[node])?;
            Ok(rate)
        }
        "tree_walk_10k" => {
            let t = Instant::now();
            let mut looked = Vec::with_capacity(TREE_DIRS * (TREE_FILES + 1) + 1);
            let tree = d.lookup(1, "tree")?;
            looked.push(tree);
            for dir in 0..TREE_DIRS {
                let dnode = d.lookup(tree, &format!("d{dir:03}"))?;
                looked.push(dnode);
                let o = fuse::OpenIn::default();
                d.call_ok(opcode::OPENDIR, dnode, &[o.as_slice()], None, 64)?;
                let fh = d.reply::<fuse::OpenOut>()?.fh;
                let mut offset = 0u64;
                let mut names = 0usize;
                loop {
                    let r = fuse::ReadIn {
                        fh,
                        offset,
                        size: 32 * 1024,
                        ..Default::default()
                    };
                    let n = d.call_ok(opcode::READDIR, dnode, &[r.as_slice()], None, 32 * 1024)?;
                    if n == 0 {
                        break;
                    }
                    let mut buf = vec![0u8; n];
                    let body = GuestAddress(REPLY + size_of::<fuse::OutHeader>() as u64);
                    vu("readdir", d.mem.read_slice(&mut buf, body))?;
                    let mut b = &buf[..];
                    while b.len() >= size_of::<fuse::Dirent>() {
                        let de: fuse::Dirent =
                            fuse::read_struct(b).ok_or("short directory entry")?;
                        offset = de.off;
                        names += 1;
                        b = &b[fuse::dirent_size(de.namelen as usize).min(b.len())..];
                    }
                }
                d.release(dnode, fh, true)?;
                if names < TREE_FILES {
                    return Err(format!("{}: READDIR listed {names} names", d.label));
                }
                for f in 0..TREE_FILES {
                    let node = d.lookup(dnode, &format!("f{f:03}"))?;
                    d.getattr(node)?;
                    looked.push(node);
                }
            }
            let ms = t.elapsed().as_secs_f64() * 1000.0;
            d.forget(&looked)?;
            Ok(ms)
        }
        other => Err(format!("unknown line {other}")),
    }
}

/// Creates, stats and unlinks `FILES` files in a fresh directory; returns
/// the three rates.
fn files_segment(d: &mut Daemon, seg: usize) -> Result<[f64; 3], String> {
    let m = fuse::MkdirIn {
        mode: 0o755,
        umask: 0,
    };
    let name = format!("files{seg}");
    d.call_ok(opcode::MKDIR, 1, &[m.as_slice(), &cstr(&name)], None, 256)?;
    let dir = d.reply::<fuse::EntryOut>()?.nodeid;
    let mut nodes = Vec::with_capacity(2 * FILES);
    let t = Instant::now();
    for i in 0..FILES {
        let (node, fh) = d.create(dir, &format!("f{i:05}"))?;
        d.release(node, fh, false)?;
        nodes.push(node);
    }
    let create = FILES as f64 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    for i in 0..FILES {
        let node = d.lookup(dir, &format!("f{i:05}"))?;
        d.getattr(node)?;
        nodes.push(node);
    }
    let stat = FILES as f64 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    for i in 0..FILES {
        d.call_ok(opcode::UNLINK, dir, &[&cstr(&format!("f{i:05}"))], None, 16)?;
    }
    let unlink = FILES as f64 / t.elapsed().as_secs_f64();
    d.call_ok(opcode::RMDIR, 1, &[&cstr(&name)], None, 16)?;
    nodes.push(dir);
    d.forget(&nodes)?;
    Ok([create, stat, unlink])
}

/// Fills a shared directory: the 10 000-file tree for the walk.
fn prepare(shared: &Path) -> Result<(), String> {
    for dir in 0..TREE_DIRS {
        let sub = shared.join(format!("tree/d{dir:03}"));
        std::fs::create_dir_all(&sub).map_err(|e| e.to_string())?;
        for f in 0..TREE_FILES {
            std::fs::write(sub.join(format!("f{f:03}")), format!("{dir}/{f}\n"))
                .map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}

/// A line and a daemon.
type Key = (String, &'static str);

/// One run: both daemons, every line in ABBA segments. Returns per line
/// and daemon the median segment value and the median CPU ms per segment,
/// and each daemon's RSS max in KiB.
type RunOut = (BTreeMap<Key, (f64, f64)>, BTreeMap<&'static str, u64>);

fn run(
    run_no: usize,
    base: &Path,
    daemons: &[(&'static str, Vec<String>); 2],
    only: &[String],
) -> Result<RunOut, String> {
    let dir = base.join(format!("run{run_no}"));
    let _ = std::fs::remove_dir_all(&dir);
    let mut ds = Vec::new();
    for (label, cmd) in daemons {
        let shared = dir.join(label).join("shared");
        std::fs::create_dir_all(&shared).map_err(|e| e.to_string())?;
        prepare(&shared)?;
        let sock = dir.join(label).join("vhost.sock");
        ds.push(Daemon::start(label, cmd, &sock, &shared)?);
    }
    // values[(line, daemon)] = (figures, cpu ms) per segment
    let mut values: BTreeMap<Key, (Vec<f64>, Vec<f64>)> = BTreeMap::new();
    let mut record = |line: &str, label: &'static str, v: f64, cpu_ms: f64| {
        let e = values.entry((line.to_string(), label)).or_default();
        e.0.push(v);
        e.1.push(cpu_ms);
    };
    for &(line, _) in &LINES {
        let wanted = only.is_empty() || only.iter().any(|o| o == line);
        // Every line but the file-set ones needs the sequential file.
        if matches!(line, "stat_files" | "unlink_files") || (!wanted && line != "seq_write_1MiB") {
            continue;
        }
        for seg in 0..SEGMENTS {
            // ABBA: lite first on even segments, virtiofsd first on odd.
            for k in 0..2 {
                let d = &mut ds[(k + seg) % 2];
                let before = cpu_ns(d.pid());
                if line == "create_files" {
                    // create, stat and unlink run as one sequence; its CPU
                    // time is charged a third to each of the three lines.
                    let rates = files_segment(d, seg)?;
                    let cpu = cpu_ns(d.pid()).saturating_sub(before) as f64 / 3e6;
                    for (name, r) in ["create_files", "stat_files", "unlink_files"]
                        .iter()
                        .zip(rates)
                    {
                        record(name, d.label, r, cpu);
                    }
                    continue;
                }
                let v = segment(d, line, seg)?;
                let cpu = cpu_ns(d.pid()).saturating_sub(before) as f64 / 1e6;
                record(line, d.label, v, cpu);
            }
        }
        eprintln!("[run {run_no}] {line} done");
    }
    let mut rss = BTreeMap::new();
    for d in ds {
        let label = d.label;
        rss.insert(label, d.stop());
    }
    let _ = std::fs::remove_dir_all(&dir);
    let out = values
        .into_iter()
        .map(|(k, (v, c))| (k, (summary(&v).0, summary(&c).0)))
        .collect();
    Ok((out, rss))
}

fn main() {
    let mut runs = 3usize;
    let mut only: Vec<String> = Vec::new();
    let mut base = PathBuf::from(if Path::new("/dev/shm").is_dir() {
        "/dev/shm"
    } else {
        "/tmp"
    });
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match (a.as_str(), args.next()) {
            ("--runs", Some(n)) => runs = n.parse().unwrap_or(0).max(1),
            ("--dir", Some(p)) => base = PathBuf::from(p),
            ("--only", Some(l)) => only = l.split(',').map(str::to_string).collect(),
            _ => {
                eprintln!("bench_direct: use --runs N, --dir PATH and --only LINE,...");
                std::process::exit(2);
            }
        }
    }
    let (lite, vfsd) = match support::daemon_binaries() {
        Ok(x) => x,
        Err(e) => {
            eprintln!("bench_direct: {e}");
            std::process::exit(1);
        }
    };
    let daemons = support::daemon_commands(&lite, &vfsd);
    let base = base.join(format!("vfsd-bench-direct-{}", std::process::id()));
    let mut per_run: Vec<RunOut> = Vec::new();
    for r in 0..runs {
        match run(r, &base, &daemons, &only) {
            Ok(out) => per_run.push(out),
            Err(e) => {
                eprintln!("bench_direct: run {r}: {e}");
                let _ = std::fs::remove_dir_all(&base);
                std::process::exit(1);
            }
        }
    }
    let _ = std::fs::remove_dir_all(&base);

    let mut rows = Vec::new();
    let mut json = Vec::new();
    let mut all_lines: Vec<(String, String)> = LINES
        .iter()
        .map(|(l, u)| (l.to_string(), u.to_string()))
        .collect();
    all_lines.extend(
        LINES
            .iter()
            .map(|(l, _)| (format!("cpu_{l}"), "ms".to_string())),
    );
    all_lines.push(("daemon_rss_max".into(), "MiB".into()));
    for (line, unit) in &all_lines {
        let per = |label: &'static str| -> Vec<f64> {
            per_run
                .iter()
                .filter_map(|(m, rss)| {
                    if line == "daemon_rss_max" {
                        return rss.get(label).map(|k| *k as f64 / 1024.0);
                    }
                    let (base, cpu) = match line.strip_prefix("cpu_") {
                        Some(b) => (b, true),
                        None => (line.as_str(), false),
                    };
                    m.get(&(base.to_string(), label))
                        .map(|&(v, c)| if cpu { c } else { v })
                })
                .collect()
        };
        let (a, b) = (per(LITE), per(VFSD));
        if a.is_empty() || b.is_empty() {
            continue;
        }
        let ((am, alo, ahi), (bm, blo, bhi)) = (summary(&a), summary(&b));
        let ratio = am / bm;
        let ok = if lower_is_better(unit) {
            ratio <= 1.0
        } else {
            ratio >= 1.0
        };
        rows.push(format!(
            "{line:<22} {unit:>8} {:>26} {:>26} {ratio:>7.3}  {}",
            format!("{am:.1} [{alo:.1}-{ahi:.1}]"),
            format!("{bm:.1} [{blo:.1}-{bhi:.1}]"),
            if ok { "yes" } else { "NO" }
        ));
        let vals = |v: &[f64]| {
            v.iter()
                .map(|x| format!("{x:.2}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        json.push(format!(
            "    {}: {{\"unit\": {}, \"better\": {}, {}: {{\"median\": {am:.2}, \"values\": [{}]}}, {}: {{\"median\": {bm:.2}, \"values\": [{}]}}, \"ratio_of_medians\": {ratio:.3}, \"at_least_virtiofsd\": {ok}}}",
            json_str(line),
            json_str(unit),
            json_str(if lower_is_better(unit) { "lower" } else { "higher" }),
            json_str(LITE),
            vals(&a),
            json_str(VFSD),
            vals(&b)
        ));
    }
    eprintln!(
        "\n{:<22} {:>8} {:>26} {:>26} {:>7}  ok",
        "line", "unit", "virtiofsd-lite med [min-max]", "virtiofsd 1.14 med [min-max]", "ratio"
    );
    for r in &rows {
        eprintln!("{r}");
    }
    println!(
        "{{\n  \"frontend\": \"this process: vhost-user frontend with a memfd as guest memory and a split virtqueue, one request in flight, kick eventfd and a blocking call eventfd\",\n  \"daemon_options\": {},\n  \"runs\": {runs},\n  \"segments\": {SEGMENTS},\n  \"order\": \"every line alternates between the daemons in ABBA segments; a daemon's median segment is its figure for the run; median/min/max are over runs\",\n  \"lines\": {{\n{}\n  }}\n}}",
        json_str(&support::DAEMON_OPTS.join(" ")),
        json.join(",\n")
    );
}
