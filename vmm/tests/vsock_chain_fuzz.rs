//! A bounded-time robustness run of the vsock backend ([`VsockBackend`])
//! against a guest driver that lies in its descriptor chains.
//!
//! The test is the guest driver: split virtqueues in memfd guest memory,
//! TX chains carrying packets from the real encoder (mutated a third of
//! the time), split over several buffers, and twisted: buffers outside
//! guest memory or crossing its end, write-only and empty buffers in TX
//! chains, loops, next indices outside the table, indirect tables (valid,
//! misaligned, nested), heads outside the table, avail indices that run
//! ahead of the ring; RX chains that are tiny, read-only, outside memory or
//! looping. Host programs connect meanwhile. After every round:
//!
//! - `handle_event` returns `Ok` (a guest never stops the worker) and
//!   every TX chain comes back used, in order, with length 0;
//! - the device wrote guest memory only in the used rings and in the
//!   writable buffers of RX chains it returned, and each RX packet is well
//!   formed and fits the chain (never a RESPONSE: the guest cannot open a
//!   connection);
//! - a guest port gets at most one reset per packet it sent that the
//!   device could decode: a chain the device cannot read gets no answer.
//!
//! At the end a host program still reaches the guest through clean chains.

mod fuzz_support;
mod virtq_driver;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use fuzz_support::{mutate, Budget, Rng, EDGE_U32};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtq_driver::{
    check_writes, gather, overlapping, walk, Desc, DriverQueue, Segment, F_INDIRECT, F_NEXT,
    F_WRITE,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic};
use vmm::devices::virtio::vsock::backend::{VsockBackend, MUXER_EVENT, RX_QUEUE, TX_QUEUE};
use vmm::devices::virtio::vsock::connection::CONN_BUF_SIZE;
use vmm::devices::virtio::vsock::packet::{
    op, VsockHeader, HDR_LEN, HOST_CID, MAX_PAYLOAD, TYPE_STREAM,
};
use vmm::vstate::memory::{create_memfd_memory, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

const CID: u64 = 3;
const QSIZE: u16 = 128;
const MEM_SIZE: u64 = 0x44000;
const TX_DATA: u64 = 0x3000;
const TX_DATA_END: u64 = 0x23000;
/// RX buffers: one of `RX_SLOT` bytes per descriptor slot.
const RX_DATA: u64 = 0x23000;
const RX_SLOT: u64 = 0x400;
/// Guest ports that host programs ask for; resets of their connections
/// are not answers to guest packets.
const LINK_PORTS: std::ops::Range<u32> = 7000..8000;
/// RX chains the guest keeps offered.
const RX_CHAINS: usize = 16;
/// Addresses a lying descriptor may name outside guest memory.
const OUTSIDE: &[u64] = &[MEM_SIZE, MEM_SIZE - 8, 1 << 40, u64::MAX - 15];

struct RxChain {
    slots: Vec<u16>,
    segs: Vec<Segment>,
}

struct Guest {
    mem: GuestMemoryMmap,
    backend: VsockBackend,
    vrings: Vec<VringRwLock>,
    rx: DriverQueue,
    tx: DriverQueue,
    free_rx_slots: Vec<u16>,
    rx_out: HashMap<u16, RxChain>,
    /// (guest port, host port) of connections host programs opened.
    links: Vec<(u32, u32)>,
    /// Connections offered since the last round, for the guest to accept.
    offered: Vec<(u32, u32)>,
    rst_allowed: HashMap<u32, u32>,
    rst_seen: HashMap<u32, u32>,
    hosts: Vec<UnixStream>,
    next_port: u32,
    rx_ops: [usize; 8],
    unchecked: usize,
    dir: std::path::PathBuf,
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Guest {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("vsock-chain-fuzz-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mem = create_memfd_memory(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
        let atomic = GuestMemoryAtomic::new(mem.clone());
        let listener = UnixListener::bind(dir.join("vsock.sock")).unwrap();
        let backend = VsockBackend::new(CID, listener).unwrap();
        backend.update_memory(atomic.clone()).unwrap();
        let rx = DriverQueue::new(0x0000, 0x0800, 0x0c00, QSIZE);
        let tx = DriverQueue::new(0x1400, 0x1c00, 0x2000, QSIZE);
        let vrings: Vec<VringRwLock> = (0..3)
            .map(|_| VringRwLock::new(atomic.clone(), 1024).unwrap())
            .collect();
        for (vring, q) in vrings.iter().zip([&rx, &tx]) {
            vring.set_queue_size(QSIZE);
            vring.set_queue_info(q.desc, q.avail, q.used).unwrap();
            vring.set_queue_ready(true);
            vring.set_enabled(true);
        }
        Self {
            mem,
            backend,
            vrings,
            rx,
            tx,
            free_rx_slots: (0..QSIZE).rev().collect(),
            rx_out: HashMap::new(),
            links: Vec::new(),
            offered: Vec::new(),
            rst_allowed: HashMap::new(),
            rst_seen: HashMap::new(),
            hosts: Vec::new(),
            next_port: 100_000,
            rx_ops: [0; 8],
            unchecked: 0,
            dir,
        }
    }

    fn event(&self, event: u16) {
        let vrings = &self.vrings[..];
        let result = self.backend.handle_event(event, EventSet::IN, vrings, 0);
        assert!(result.is_ok(), "handle_event({event}): {result:?}");
    }

    /// Lays `bytes` out as a TX chain from descriptor slot `*slot` on,
    /// twisted as `rng` picks; returns the head to offer.
    fn lay_tx_chain(
        &self,
        rng: &mut Rng,
        bytes: &[u8],
        clean: bool,
        slot: &mut u16,
        data: &mut u64,
    ) -> u16 {
        let pieces = 1 + rng.below(4);
        let mut cuts: Vec<usize> = (1..pieces).map(|_| rng.below(bytes.len() + 1)).collect();
        cuts.sort_unstable();
        let mut descs = Vec::new();
        let mut from = 0;
        for to in cuts.into_iter().chain([bytes.len()]) {
            let piece = &bytes[from..to];
            self.mem.write_slice(piece, GuestAddress(*data)).unwrap();
            descs.push(Desc {
                addr: *data,
                len: piece.len() as u32,
                ..Desc::default()
            });
            *data += piece.len() as u64 + rng.below(64) as u64;
            from = to;
        }
        let at = rng.below(descs.len());
        let twist = if clean { 99 } else { rng.below(24) };
        match twist {
            0 => descs.insert(
                at,
                Desc {
                    addr: rng.pick(&[0, self.rx.used, self.tx.desc, RX_DATA, TX_DATA]),
                    len: rng.below(4096) as u32,
                    flags: F_WRITE,
                    next: 0,
                },
            ),
            1 => descs.insert(at, Desc::default()),
            2 => descs[at].addr = rng.pick(OUTSIDE),
            3 => descs[at].len = rng.pick(&[u32::MAX, MEM_SIZE as u32 + 1]),
            _ => {}
        }
        let head = *slot;
        let indirect = twist == 6;
        let last = descs.len() - 1;
        for (i, d) in descs[..last].iter_mut().enumerate() {
            d.flags |= F_NEXT;
            d.next = if indirect {
                i + 1
            } else {
                usize::from(head) + i + 1
            } as u16;
        }
        match twist {
            4 => (descs[last].flags, descs[last].next) = (F_NEXT, head),
            5 => (descs[last].flags, descs[last].next) = (F_NEXT, rng.pick(&[QSIZE, u16::MAX])),
            _ => {}
        }
        if indirect {
            // The whole chain in an indirect table (sometimes misaligned
            // or holding a nested indirect descriptor, both refused).
            let table = (*data + 15) & !15;
            for (i, d) in descs.iter().enumerate() {
                let at = GuestAddress(table + 16 * i as u64);
                self.mem.write_slice(&d.encode(), at).unwrap();
            }
            let n = descs.len() as u32;
            *data = table + 16 * u64::from(n);
            let outer = Desc {
                addr: table,
                len: 16 * n + rng.pick(&[0, 0, 0, 8]),
                flags: F_INDIRECT | if rng.one_in(4) { F_NEXT } else { 0 },
                next: head + 1,
            };
            if rng.one_in(4) {
                let nested = Desc {
                    flags: F_INDIRECT,
                    ..outer
                };
                self.mem
                    .write_slice(&nested.encode(), GuestAddress(table))
                    .unwrap();
            }
            descs = vec![outer];
        }
        for (i, d) in descs.iter().enumerate() {
            self.tx.write_desc(&self.mem, head + i as u16, *d);
        }
        *slot += descs.len() as u16;
        if twist == 7 {
            rng.pick(&[QSIZE, QSIZE + 1, u16::MAX])
        } else {
            head
        }
    }

    /// What the device can decode from the chain at `head`: one reset may
    /// answer it when it names our guest and is not itself a reset.
    fn expect_answer(&mut self, head: u16) {
        let mut bytes = Vec::new();
        for s in walk(&self.mem, self.tx.desc, QSIZE, head) {
            if s.writable || s.len == 0 {
                continue;
            }
            if !s.in_memory(MEM_SIZE) {
                return;
            }
            let want = (s.len as usize).min(HDR_LEN + MAX_PAYLOAD - bytes.len());
            let mut buf = vec![0u8; want];
            self.mem.read_slice(&mut buf, GuestAddress(s.addr)).unwrap();
            bytes.extend_from_slice(&buf);
        }
        if let Ok(hdr) = VsockHeader::decode(&bytes) {
            if hdr.src_cid == CID && hdr.dst_cid == HOST_CID && hdr.op != op::RST {
                *self.rst_allowed.entry(hdr.src_port).or_default() += 1;
            }
        }
    }

    /// Keeps `RX_CHAINS` RX chains offered, each of one to three slots,
    /// some of them lying (unless `clean`).
    fn offer_rx(&mut self, rng: &mut Rng, clean: bool) {
        while self.rx_out.len() < RX_CHAINS && self.free_rx_slots.len() >= 3 {
            let n = 1 + rng.below(3);
            let slots: Vec<u16> = (0..n).filter_map(|_| self.free_rx_slots.pop()).collect();
            for (i, &s) in slots.iter().enumerate() {
                let buf = RX_DATA + u64::from(s) * RX_SLOT;
                let mut d = Desc {
                    addr: buf,
                    len: rng.pick(&[RX_SLOT, RX_SLOT, 64, 200]) as u32,
                    flags: F_WRITE,
                    next: 0,
                };
                if i + 1 < n {
                    (d.flags, d.next) = (F_WRITE | F_NEXT, slots[i + 1]);
                }
                match if clean { 99 } else { rng.below(24) } {
                    0 => {
                        (d.flags, d.addr) =
                            (d.flags & !F_WRITE, rng.pick(&[0, self.tx.desc, TX_DATA]))
                    }
                    1 => d.addr = rng.pick(OUTSIDE),
                    2 => d.len = rng.below(HDR_LEN + 1) as u32,
                    3 if i + 1 == n => (d.flags, d.next) = (F_WRITE | F_NEXT, slots[0]),
                    _ => {}
                }
                self.rx.write_desc(&self.mem, s, d);
            }
            let head = slots[0];
            let segs = walk(&self.mem, self.rx.desc, QSIZE, head);
            self.rx.publish(&self.mem, head);
            self.rx_out.insert(head, RxChain { slots, segs });
        }
        if !clean && rng.one_in(40) {
            self.rx.publish(&self.mem, rng.pick(&[QSIZE, u16::MAX]));
        }
    }

    /// Checks RX chains the device returned; returns the guest memory it
    /// was allowed to write for them.
    fn check_rx_used(&mut self, used: &[(u32, u32)]) -> Vec<(u64, u64)> {
        let mut allowed = Vec::new();
        for &(id, len) in used {
            let chain = u16::try_from(id)
                .ok()
                .and_then(|h| self.rx_out.remove(&h))
                .unwrap_or_else(|| panic!("RX chain {id} came back but was not offered"));
            self.free_rx_slots.extend(&chain.slots);
            let writable: Vec<Segment> = chain.segs.into_iter().filter(|s| s.writable).collect();
            let inside = writable.iter().filter(|s| s.in_memory(MEM_SIZE));
            allowed.extend(inside.map(|s| (s.addr, s.addr + u64::from(s.len))));
            if writable.iter().any(|s| s.len > 0 && !s.in_memory(MEM_SIZE)) {
                assert_eq!(
                    len, 0,
                    "RX chain {id} outside guest memory has length {len}"
                );
                continue;
            }
            let room: u64 = writable.iter().map(|s| u64::from(s.len)).sum();
            assert!(
                u64::from(len) <= room,
                "{len} bytes in RX chain {id} of {room}"
            );
            if room < HDR_LEN as u64 || len == 0 {
                assert_eq!(len, 0, "RX chain {id} of {room} bytes without a packet");
                continue;
            }
            if overlapping(&writable) {
                self.unchecked += 1;
                continue;
            }
            let bytes = gather(&self.mem, &writable, len as usize);
            self.check_packet(&bytes);
        }
        allowed
    }

    /// One packet the device gave the guest.
    fn check_packet(&mut self, bytes: &[u8]) {
        let hdr = VsockHeader::decode(bytes).unwrap();
        assert_eq!(
            (hdr.src_cid, hdr.dst_cid, hdr.type_),
            (HOST_CID, CID, TYPE_STREAM)
        );
        assert_eq!(hdr.len as usize, bytes.len() - HDR_LEN, "header length");
        let ops = [
            op::REQUEST,
            op::RST,
            op::SHUTDOWN,
            op::RW,
            op::CREDIT_UPDATE,
            op::CREDIT_REQUEST,
        ];
        assert!(ops.contains(&hdr.op), "op {} to the guest", hdr.op);
        self.rx_ops[usize::from(hdr.op)] += 1;
        match hdr.op {
            op::REQUEST => {
                self.links.push((hdr.dst_port, hdr.src_port));
                self.offered.push((hdr.dst_port, hdr.src_port));
            }
            op::RST if !LINK_PORTS.contains(&hdr.dst_port) => {
                let seen = self.rst_seen.entry(hdr.dst_port).or_default();
                *seen += 1;
                let allowed = self.rst_allowed.get(&hdr.dst_port).copied().unwrap_or(0);
                assert!(
                    *seen <= allowed,
                    "reset {seen} to guest port {} which sent {allowed} packets the device could read",
                    hdr.dst_port
                );
            }
            _ => {}
        }
    }

    fn snapshot(&self) -> Vec<u8> {
        let mut v = vec![0u8; MEM_SIZE as usize];
        self.mem.read_slice(&mut v, GuestAddress(0)).unwrap();
        v
    }

    /// A host program's move: connect, write, read or go away.
    fn host_step(&mut self, rng: &mut Rng) {
        let any = rng.below(self.hosts.len());
        match rng.below(4) {
            0 if self.hosts.len() < 16 => {
                let port = LINK_PORTS.start + rng.below(1000) as u32;
                let s = UnixStream::connect(self.dir.join("vsock.sock")).unwrap();
                s.set_nonblocking(true).unwrap();
                let _ = (&s).write_all(format!("CONNECT {port}\n").as_bytes());
                self.hosts.push(s);
            }
            1 if !self.hosts.is_empty() => {
                let _ = self.hosts[any].write(&vec![b'h'; 1 + rng.below(3000)]);
            }
            2 if !self.hosts.is_empty() => {
                let _ = self.hosts[any].read(&mut [0u8; 4096]);
            }
            3 if !self.hosts.is_empty() => drop(self.hosts.swap_remove(any)),
            _ => {}
        }
        self.event(MUXER_EVENT);
    }
}

/// A plausible guest packet from `port` (or on a host program's
/// connection), mutated a third of the time.
fn tx_packet(rng: &mut Rng, links: &[(u32, u32)], port: u32) -> Vec<u8> {
    let (src_port, dst_port) = match links.len() {
        n if n > 0 && rng.one_in(2) => links[n - 1 - rng.below(n.min(8))],
        _ => (port, rng.pick(&[1024, 1025, 7000, u32::MAX])),
    };
    let ops = [
        op::REQUEST,
        op::RESPONSE,
        op::RW,
        op::RW,
        op::RST,
        op::SHUTDOWN,
        op::CREDIT_UPDATE,
        op::CREDIT_REQUEST,
        0,
        9,
    ];
    let op = rng.pick(&ops);
    let len = if op == op::RW || rng.one_in(8) {
        rng.pick(&[0, 1, 100, 1500, 4096, MAX_PAYLOAD])
    } else {
        0
    };
    let hdr = VsockHeader {
        src_cid: if rng.one_in(16) {
            rng.pick(&[2, 4, u64::MAX])
        } else {
            CID
        },
        dst_cid: if rng.one_in(16) {
            rng.pick(&[3, u64::MAX])
        } else {
            HOST_CID
        },
        src_port,
        dst_port,
        len: len as u32,
        type_: if rng.one_in(16) { 2 } else { TYPE_STREAM },
        op,
        flags: rng.below(4) as u32,
        buf_alloc: if rng.one_in(3) {
            rng.pick(EDGE_U32)
        } else {
            CONN_BUF_SIZE
        },
        fwd_cnt: rng.pick(EDGE_U32),
    };
    let mut bytes = hdr.encode().to_vec();
    bytes.resize(HDR_LEN + len, b'g');
    if rng.one_in(3) {
        mutate(rng, &mut bytes);
    }
    bytes
}

/// A well-formed guest packet from `from` to host port `to`.
fn clean_packet(op: u16, from: u32, to: u32, payload: &[u8]) -> Vec<u8> {
    let hdr = VsockHeader {
        src_cid: CID,
        dst_cid: HOST_CID,
        src_port: from,
        dst_port: to,
        len: payload.len() as u32,
        type_: TYPE_STREAM,
        op,
        buf_alloc: CONN_BUF_SIZE,
        ..VsockHeader::default()
    };
    [&hdr.encode()[..], payload].concat()
}

/// One round: host programs move, the guest offers RX chains and sends
/// `packets` in TX chains (twisted unless `clean`), the device runs, and
/// everything it did is checked.
fn round(g: &mut Guest, rng: &mut Rng, packets: Vec<Vec<u8>>, clean: bool) {
    if !clean && rng.one_in(4) {
        g.host_step(rng);
    }
    let event_idx = rng.one_in(2);
    g.backend.set_event_idx(event_idx);
    for vring in &g.vrings[..2] {
        vring.set_queue_event_idx(event_idx);
    }
    g.offer_rx(rng, clean);
    let lying_idx = !clean && rng.one_in(50);
    let mut expected = Vec::new();
    if lying_idx {
        // Avail indices that run more than a ring ahead: nothing is used.
        let ahead = QSIZE + 1 + rng.below(1000) as u16;
        g.tx.write_avail_idx(&g.mem, g.tx.avail_idx.wrapping_add(ahead));
        g.rx.write_avail_idx(&g.mem, g.rx.avail_idx.wrapping_add(ahead));
    } else {
        let (mut slot, mut data) = (0u16, TX_DATA);
        for mut bytes in packets {
            // Room for the pieces' gaps and an indirect table.
            if data + 1024 > TX_DATA_END {
                break;
            }
            bytes.truncate((TX_DATA_END - data - 512) as usize);
            let head = g.lay_tx_chain(rng, &bytes, clean, &mut slot, &mut data);
            g.tx.publish(&g.mem, head);
            if head < QSIZE {
                g.expect_answer(head);
                expected.push((u32::from(head), 0));
            }
        }
    }
    let before = g.snapshot();
    g.event(TX_QUEUE);
    if rng.one_in(4) {
        g.event(RX_QUEUE);
    }
    let after = g.snapshot();
    assert_eq!(g.tx.take_used(&g.mem), expected, "TX chains used");
    let rx_used = g.rx.take_used(&g.mem);
    let mut allowed = g.check_rx_used(&rx_used);
    allowed.push((g.rx.used, g.rx.used + g.rx.used_len()));
    allowed.push((g.tx.used, g.tx.used + g.tx.used_len()));
    check_writes(&before, &after, &allowed);
    if lying_idx {
        g.tx.write_avail_idx(&g.mem, g.tx.avail_idx);
        g.rx.write_avail_idx(&g.mem, g.rx.avail_idx);
    }
}

/// After the lies, clean chains still carry a host program's connection.
fn still_serves(g: &mut Guest, rng: &mut Rng) {
    g.hosts.clear();
    g.event(MUXER_EVENT);
    // Requests the device resets use up the lying RX chains still offered.
    for r in 0..4 {
        let reqs = (0..16).map(|i| clean_packet(op::REQUEST, 90_000 + 16 * r + i, 1024, &[]));
        round(g, rng, reqs.collect(), true);
    }
    let mut host = UnixStream::connect(g.dir.join("vsock.sock")).unwrap();
    host.write_all(b"CONNECT 4242\n").unwrap();
    g.event(MUXER_EVENT);
    round(g, rng, Vec::new(), true);
    let (_, port) = *g
        .links
        .iter()
        .rev()
        .find(|l| l.0 == 4242)
        .expect("no REQUEST reached the guest for a new host program");
    let answer = vec![
        clean_packet(op::RESPONSE, 4242, port, &[]),
        clean_packet(op::RW, 4242, port, b"ping"),
    ];
    round(g, rng, answer, true);
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let want = format!("OK {port}\nping");
    let mut got = vec![0u8; want.len()];
    host.read_exact(&mut got).unwrap();
    assert_eq!(got, want.as_bytes());
}

#[test]
fn lying_descriptor_chains_never_break_the_backend() {
    let budget = Budget::from_env(
        "vsock_chain_fuzz",
        0xc4a1_25ee,
        20_000,
        Duration::from_secs(20),
    );
    let mut rng = Rng::new(budget.seed);
    let mut g = Guest::new();
    let mut rounds = 0u64;
    while budget.more(rounds) {
        // The guest accepts three connections in four, then sends what
        // it likes.
        let mut packets = Vec::new();
        for (guest, host) in std::mem::take(&mut g.offered) {
            if !rng.one_in(4) {
                packets.push(clean_packet(op::RESPONSE, guest, host, &[]));
            }
        }
        for _ in 0..rng.below(7) {
            packets.push(tx_packet(&mut rng, &g.links, g.next_port));
            g.next_port += 1;
        }
        round(&mut g, &mut rng, packets, false);
        rounds += 1;
    }
    eprintln!(
        "vsock_chain_fuzz: {rounds} rounds in {:?}, {} TX packets, RX packets by op {:?} \
         ({} in overlapping buffers not read back), {} host connections",
        budget.elapsed(),
        g.next_port - 100_000,
        g.rx_ops,
        g.unchecked,
        g.links.len()
    );
    assert!(rounds >= 500, "only {rounds} rounds");
    still_serves(&mut g, &mut rng);
}
