//! The guest driver of the descriptor-chain fuzz test: a vsock backend
//! ([`VsockBackend`]) on memfd guest memory with its RX and TX queues set
//! up as a frontend would, TX chains laid out with the twists a lying
//! driver uses, RX chains offered (some of them lying too), and the checks
//! of what the device returns: used lengths, the packets it wrote, and
//! how many resets each guest port may get.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};

use crate::fuzz_support::Rng;
use keystone_test_kit::virtq::{
    gather, overlapping, walk, Desc, DriverQueue, Segment, F_INDIRECT, F_NEXT, F_WRITE,
};
use keystone_test_kit::ScratchDir;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic};
use vmm::device::{create_memfd_memory, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vsock_lite::backend::{VsockBackend, MUXER_EVENT};
use vsock_lite::packet::{op, VsockHeader, HDR_LEN, HOST_CID, MAX_PAYLOAD, TYPE_STREAM};

pub const CID: u64 = 3;
pub const QSIZE: u16 = 128;
pub const MEM_SIZE: u64 = 0x44000;
pub const TX_DATA: u64 = 0x3000;
pub const TX_DATA_END: u64 = 0x23000;
/// RX buffers: one of `RX_SLOT` bytes per descriptor slot.
pub const RX_DATA: u64 = 0x23000;
pub const RX_SLOT: u64 = 0x400;
/// Guest ports that host programs ask for; resets of their connections
/// are not answers to guest packets.
pub const LINK_PORTS: std::ops::Range<u32> = 7000..8000;
/// RX chains the guest keeps offered.
pub const RX_CHAINS: usize = 16;
/// Addresses a lying descriptor may name outside guest memory.
pub const OUTSIDE: &[u64] = &[MEM_SIZE, MEM_SIZE - 8, 1 << 40, u64::MAX - 15];

struct RxChain {
    slots: Vec<u16>,
    segs: Vec<Segment>,
}

pub struct Guest {
    pub mem: GuestMemoryMmap,
    pub backend: VsockBackend,
    pub vrings: Vec<VringRwLock>,
    pub rx: DriverQueue,
    pub tx: DriverQueue,
    free_rx_slots: Vec<u16>,
    rx_out: HashMap<u16, RxChain>,
    /// (guest port, host port) of connections host programs opened.
    pub links: Vec<(u32, u32)>,
    /// Connections offered since the last round, for the guest to accept.
    pub offered: Vec<(u32, u32)>,
    rst_allowed: HashMap<u32, u32>,
    rst_seen: HashMap<u32, u32>,
    pub hosts: Vec<UnixStream>,
    pub next_port: u32,
    pub rx_ops: [usize; 8],
    pub unchecked: usize,
    pub dir: ScratchDir,
}

impl Guest {
    pub fn new() -> Self {
        let dir = ScratchDir::new("vsock-chain-fuzz");
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

    pub fn event(&self, event: u16) {
        let vrings = &self.vrings[..];
        let result = self.backend.handle_event(event, EventSet::IN, vrings, 0);
        assert!(result.is_ok(), "handle_event({event}): {result:?}");
    }

    /// Lays `bytes` out as a TX chain from descriptor slot `*slot` on,
    /// twisted as `rng` picks; returns the head to offer.
    pub fn lay_tx_chain(
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
    pub fn expect_answer(&mut self, head: u16) {
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
    pub fn offer_rx(&mut self, rng: &mut Rng, clean: bool) {
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
    pub fn check_rx_used(&mut self, used: &[(u32, u32)]) -> Vec<(u64, u64)> {
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

    pub fn snapshot(&self) -> Vec<u8> {
        let mut v = vec![0u8; MEM_SIZE as usize];
        self.mem.read_slice(&mut v, GuestAddress(0)).unwrap();
        v
    }

    /// A host program's move: connect, write, read or go away.
    pub fn host_step(&mut self, rng: &mut Rng) {
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
