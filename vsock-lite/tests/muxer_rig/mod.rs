//! A vsock connection table ([`Muxer`]) with the test as both its guest
//! driver and its host programs, for the vsock fuzz and flood tests: guest
//! bytes go through the real decoder, host programs are real Unix streams,
//! and every packet the device hands the guest is checked on the way.

// Each test binary uses a part of the rig.
#![allow(dead_code)]

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;

use crate::fuzz_support::Rng;
use keystone_test_kit::ScratchDir;
use vsock_lite::connection::CONN_BUF_SIZE;
use vsock_lite::muxer::{Muxer, MAX_CONNECTIONS};
use vsock_lite::packet::{op, parse_packet, VsockHeader, HOST_CID, MAX_PAYLOAD, TYPE_STREAM};

pub const CID: u64 = 3;
/// The longest `OK <port>\n` line the device writes to a host program.
pub const OK_LINE_MAX: usize = "OK 4294967295\n".len();

/// A connection the device offered the guest: (guest port, host port) and
/// the bytes the guest took on it (its `fwd_cnt`).
#[derive(Clone, Copy, Debug)]
pub struct Link {
    pub guest_port: u32,
    pub host_port: u32,
    pub received: u32,
}

pub struct Rig {
    pub muxer: Muxer,
    dir: ScratchDir,
    pub path: PathBuf,
    pub hosts: Vec<UnixStream>,
    /// Every connection the device offered, in order.
    pub links: Vec<Link>,
    /// Host programs that ever connected.
    pub accepted: usize,
    pub rx_buf: Vec<u8>,
    /// Packets the guest took, by op.
    pub rx_ops: [usize; 8],
}

impl Rig {
    pub fn new(name: &str) -> Self {
        let dir = ScratchDir::new(name);
        let path = dir.join("vsock.sock");
        let listener = UnixListener::bind(&path).unwrap();
        Self {
            muxer: Muxer::new(CID, listener).unwrap(),
            dir,
            path,
            hosts: Vec::new(),
            links: Vec::new(),
            accepted: 0,
            rx_buf: vec![0; MAX_PAYLOAD],
            rx_ops: [0; 8],
        }
    }

    /// Feeds guest bytes through the real decoder, as the backend does.
    pub fn feed(&mut self, bytes: &[u8]) {
        let before = self.muxer.connection_count();
        match parse_packet(bytes) {
            Ok((hdr, payload)) => {
                assert_eq!(payload.len(), hdr.len as usize);
                self.muxer.handle_guest_packet(&hdr, payload);
            }
            Err(_) => {
                if let Ok(hdr) = VsockHeader::decode(bytes) {
                    self.muxer.reject(&hdr);
                }
            }
        }
        let after = self.muxer.connection_count();
        assert!(after <= before, "a guest packet opened a connection");
    }

    /// A well-formed guest packet on `link`.
    pub fn send(&mut self, op: u16, link: Link, payload: &[u8]) {
        self.send_flags(op, link, 0, payload);
    }

    /// Like [`Rig::send`], with `flags` (say, of a SHUTDOWN).
    pub fn send_flags(&mut self, op: u16, link: Link, flags: u32, payload: &[u8]) {
        let hdr = VsockHeader {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port: link.guest_port,
            dst_port: link.host_port,
            len: payload.len() as u32,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: CONN_BUF_SIZE,
            fwd_cnt: link.received,
        };
        self.feed(&[&hdr.encode()[..], payload].concat());
    }

    /// A host program that connects and writes `line` (non-blocking).
    pub fn connect_host(&mut self, line: &[u8]) -> UnixStream {
        let stream = UnixStream::connect(&self.path).unwrap();
        stream.set_nonblocking(true).unwrap();
        let _ = (&stream).write_all(line);
        self.accepted += 1;
        self.muxer.handle_host_events();
        stream
    }

    /// The next packet for the guest with an RX buffer of `cap` payload
    /// bytes, checked; REQUESTs are recorded in [`Rig::links`].
    pub fn take(&mut self, cap: usize) -> Option<(VsockHeader, usize)> {
        let (hdr, n) = self.muxer.pop_rx(&mut self.rx_buf[..cap])?;
        check_rx(&hdr, n, cap);
        self.rx_ops[usize::from(hdr.op)] += 1;
        match hdr.op {
            op::REQUEST => self.links.push(Link {
                guest_port: hdr.dst_port,
                host_port: hdr.src_port,
                received: 0,
            }),
            op::RW => {
                let found = self
                    .links
                    .iter_mut()
                    .rev()
                    .find(|l| l.guest_port == hdr.dst_port && l.host_port == hdr.src_port);
                if let Some(l) = found {
                    l.received = l.received.wrapping_add(n as u32);
                }
            }
            _ => {}
        }
        Some((hdr, n))
    }

    /// Takes up to `max` packets with RX buffers of random size, accepting
    /// three REQUESTs in four like a guest with a listener.
    pub fn drain(&mut self, rng: &mut Rng, max: usize) -> usize {
        let mut taken = 0;
        while taken < max {
            let cap = rng.pick(&[0, 1, 100, 4096, MAX_PAYLOAD, MAX_PAYLOAD]);
            let Some((hdr, _)) = self.take(cap) else {
                break;
            };
            taken += 1;
            if hdr.op == op::REQUEST && !rng.one_in(4) {
                let link = *self.links.last().unwrap();
                self.send(op::RESPONSE, link, &[]);
            }
        }
        taken
    }

    /// Connections and the bytes held for host programs stay bounded.
    pub fn check_bounds(&self) {
        let count = self.muxer.connection_count();
        assert!(count <= MAX_CONNECTIONS, "{count} connections");
        assert!(
            count <= self.accepted,
            "more connections than host programs"
        );
        let held = self.muxer.host_backlog_bytes();
        assert!(
            held <= count * (CONN_BUF_SIZE as usize + OK_LINE_MAX),
            "{held} bytes held for the host by {count} connections"
        );
    }
}

/// What every packet for the guest must look like. The device never sends
/// RESPONSE: it never accepts a connection from the guest.
pub fn check_rx(hdr: &VsockHeader, n: usize, cap: usize) {
    assert_eq!(
        (hdr.src_cid, hdr.dst_cid, hdr.type_),
        (HOST_CID, CID, TYPE_STREAM)
    );
    assert_eq!(hdr.len as usize, n, "header length vs payload");
    assert!(n <= cap, "{n} payload bytes in a {cap}-byte buffer");
    let ops = [
        op::REQUEST,
        op::RST,
        op::SHUTDOWN,
        op::RW,
        op::CREDIT_UPDATE,
        op::CREDIT_REQUEST,
    ];
    assert!(ops.contains(&hdr.op), "op {} to the guest", hdr.op);
    assert!(n == 0 || hdr.op == op::RW, "payload on op {}", hdr.op);
}
