//! Muxer tests: [`SimGuest`] plays the guest driver (feeds packets, takes
//! replies) while the test plays host programs on real Unix streams; no
//! threads, no virtqueues.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::*;
use crate::packet::{parse_packet, HDR_LEN, MAX_PAYLOAD};

const CID: u64 = 3;

/// The guest driver side of one muxer, plus the socket directory.
struct SimGuest {
    muxer: Muxer,
    dir: PathBuf,
    path: PathBuf,
    buf: Vec<u8>,
    buf_alloc: u32,
    fwd_cnt: u32,
}

impl Drop for SimGuest {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        let _ = std::fs::remove_dir(&self.dir);
    }
}

impl SimGuest {
    fn new() -> Self {
        let dir = crate::private_dir().unwrap();
        let path = dir.join("vsock.sock");
        let listener = UnixListener::bind(&path).unwrap();
        Self {
            muxer: Muxer::new(CID, listener).unwrap(),
            dir,
            path,
            buf: vec![0; MAX_PAYLOAD],
            buf_alloc: 1 << 20,
            fwd_cnt: 0,
        }
    }

    fn pump(&mut self) {
        for _ in 0..4 {
            self.muxer.handle_host_events();
        }
    }

    /// The next packet the device hands the guest, if any.
    fn recv(&mut self) -> Option<(VsockHeader, Vec<u8>)> {
        self.pump();
        let (hdr, n) = self.muxer.pop_rx(&mut self.buf)?;
        assert_eq!(hdr.len as usize, n);
        Some((hdr, self.buf[..n].to_vec()))
    }

    fn expect(&mut self, op: u16) -> (VsockHeader, Vec<u8>) {
        let got = self.recv();
        match got {
            Some((h, data)) if h.op == op => (h, data),
            other => panic!("expected op {op}, got {other:?}"),
        }
    }

    fn send(&mut self, op: u16, guest_port: u32, host_port: u32, flags: u32, payload: &[u8]) {
        let hdr = VsockHeader {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port: guest_port,
            dst_port: host_port,
            len: payload.len() as u32,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: self.buf_alloc,
            fwd_cnt: self.fwd_cnt,
        };
        self.muxer.handle_guest_packet(&hdr, payload);
    }

    /// Host connects to guest `port`; returns the host stream and the
    /// REQUEST the guest saw.
    fn host_connect(&mut self, port: u32) -> (UnixStream, VsockHeader) {
        let mut host = UnixStream::connect(&self.path).unwrap();
        host.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        host.write_all(format!("CONNECT {port}\n").as_bytes())
            .unwrap();
        let (req, _) = self.expect(op::REQUEST);
        (host, req)
    }

    /// A connection the guest accepted; returns the host stream and host port.
    fn established(&mut self, port: u32) -> (UnixStream, u32) {
        let (mut host, req) = self.host_connect(port);
        self.send(op::RESPONSE, port, req.src_port, 0, &[]);
        let expected = format!("OK {}\n", req.src_port);
        let mut line = vec![0u8; expected.len()];
        host.read_exact(&mut line).unwrap();
        assert_eq!(line, expected.as_bytes());
        (host, req.src_port)
    }
}

#[test]
fn host_connect_gets_request_then_ok_line() {
    let mut g = SimGuest::new();
    let (mut host, req) = g.host_connect(1234);
    assert_eq!((req.src_cid, req.dst_cid), (HOST_CID, CID));
    assert_eq!(req.dst_port, 1234);
    assert!(req.src_port >= 1024);
    assert_eq!(
        (req.type_, req.len, req.buf_alloc),
        (TYPE_STREAM, 0, CONN_BUF_SIZE)
    );
    assert!(g.recv().is_none());
    g.send(op::RESPONSE, 1234, req.src_port, 0, &[]);
    let mut line = String::new();
    let mut byte = [0u8; 1];
    while byte[0] != b'\n' {
        host.read_exact(&mut byte).unwrap();
        line.push(byte[0] as char);
    }
    assert_eq!(line, format!("OK {}\n", req.src_port));
}

#[test]
fn data_flows_both_ways_within_guest_credit() {
    let mut g = SimGuest::new();
    g.buf_alloc = 8;
    let (mut host, port) = g.established(52);
    host.write_all(b"0123456789abcdefghij").unwrap();

    let (h, data) = g.expect(op::RW);
    assert_eq!(
        (h.src_port, h.dst_port, data.as_slice()),
        (port, 52, &b"01234567"[..])
    );
    // Credit exhausted: the device asks for more and sends nothing else.
    g.expect(op::CREDIT_REQUEST);
    assert!(g.recv().is_none());

    g.fwd_cnt = 8;
    g.send(op::CREDIT_UPDATE, 52, port, 0, &[]);
    assert_eq!(g.expect(op::RW).1, b"89abcdef");
    g.fwd_cnt = 16;
    g.send(op::CREDIT_UPDATE, 52, port, 0, &[]);
    assert_eq!(g.expect(op::RW).1, b"ghij");

    g.send(op::RW, 52, port, 0, b"pong");
    let mut got = [0u8; 4];
    host.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"pong");
    // Guest asks for our credit: fwd_cnt counts only guest bytes, not "OK".
    g.send(op::CREDIT_REQUEST, 52, port, 0, &[]);
    let (h, _) = g.expect(op::CREDIT_UPDATE);
    assert_eq!((h.fwd_cnt, h.buf_alloc), (4, CONN_BUF_SIZE));
}

#[test]
fn device_sends_credit_update_after_forwarding_half_its_buffer() {
    let mut g = SimGuest::new();
    let (mut host, port) = g.established(7);
    host.set_nonblocking(true).unwrap();
    let chunk = vec![0x5a; MAX_PAYLOAD];
    let total = CONN_BUF_SIZE as usize / 2;
    for _ in 0..total / MAX_PAYLOAD {
        g.send(op::RW, 7, port, 0, &chunk);
    }
    let mut read = 0;
    let mut buf = vec![0u8; 65536];
    let deadline = Instant::now() + Duration::from_secs(5);
    while read < total && Instant::now() < deadline {
        match host.read(&mut buf) {
            Ok(n) => read += n,
            Err(_) => g.pump(),
        }
    }
    assert_eq!(read, total);
    g.pump();
    let (h, _) = g.expect(op::CREDIT_UPDATE);
    assert_eq!(h.fwd_cnt as usize, total);
}

#[test]
fn guest_initiated_request_is_refused() {
    let mut g = SimGuest::new();
    g.send(op::REQUEST, 5000, 22, 0, &[]);
    let (h, _) = g.expect(op::RST);
    assert_eq!(
        (h.src_cid, h.dst_cid, h.src_port, h.dst_port),
        (HOST_CID, CID, 22, 5000)
    );
    assert_eq!(g.muxer.connection_count(), 0);
    // Even aimed at a live connection's host port, a REQUEST opens nothing.
    let (_host, port) = g.established(99);
    g.send(op::REQUEST, 6000, port, 0, &[]);
    g.expect(op::RST);
    assert_eq!(g.muxer.connection_count(), 1);
}

#[test]
fn guest_rst_to_connect_closes_host_stream() {
    let mut g = SimGuest::new();
    let (mut host, req) = g.host_connect(4321);
    g.send(op::RST, 4321, req.src_port, 0, &[]);
    let mut buf = [0u8; 8];
    assert_eq!(host.read(&mut buf).unwrap(), 0);
    assert_eq!(g.muxer.connection_count(), 0);
    assert!(g.recv().is_none());
}

#[test]
fn half_close_and_full_shutdown() {
    let mut g = SimGuest::new();
    let (mut host, port) = g.established(80);
    host.shutdown(Shutdown::Write).unwrap();
    let (h, _) = g.expect(op::SHUTDOWN);
    assert_eq!(h.flags, shutdown::SEND);
    // The guest can still send after the host's half-close.
    g.send(op::RW, 80, port, 0, b"reply");
    let mut got = [0u8; 5];
    host.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"reply");
    g.send(op::SHUTDOWN, 80, port, shutdown::SEND | shutdown::RCV, &[]);
    g.expect(op::RST);
    assert_eq!(host.read(&mut got).unwrap(), 0);
    assert_eq!(g.muxer.connection_count(), 0);
}

#[test]
fn guest_half_close_reaches_host_as_eof() {
    let mut g = SimGuest::new();
    let (mut host, port) = g.established(81);
    g.send(op::RW, 81, port, 0, b"last");
    g.send(op::SHUTDOWN, 81, port, shutdown::SEND, &[]);
    let mut all = Vec::new();
    host.read_to_end(&mut all).unwrap();
    assert_eq!(all, b"last");
    host.write_all(b"still here").unwrap();
    assert_eq!(g.expect(op::RW).1, b"still here");
}

#[test]
fn many_concurrent_streams_get_unique_ports() {
    let mut g = SimGuest::new();
    let mut conns = Vec::new();
    for i in 0..40 {
        conns.push(g.established(2000 + i));
    }
    let mut ports: Vec<u32> = conns.iter().map(|c| c.1).collect();
    ports.sort_unstable();
    ports.dedup();
    assert_eq!(ports.len(), 40);
    for (i, (host, _)) in conns.iter_mut().enumerate() {
        host.write_all(format!("msg{i}").as_bytes()).unwrap();
    }
    let mut seen = 0;
    while let Some((h, data)) = g.recv() {
        let i = h.dst_port - 2000;
        assert_eq!(data, format!("msg{i}").as_bytes());
        seen += 1;
    }
    assert_eq!(seen, 40);
}

#[test]
fn malformed_and_misaddressed_packets() {
    let mut g = SimGuest::new();
    let (_host, port) = g.established(10);
    // Wrong source CID or destination CID: dropped silently.
    let mut hdr = VsockHeader {
        src_cid: 4,
        dst_cid: HOST_CID,
        src_port: 10,
        dst_port: port,
        type_: TYPE_STREAM,
        op: op::RW,
        ..VsockHeader::default()
    };
    g.muxer.handle_guest_packet(&hdr, &[]);
    hdr.src_cid = CID;
    hdr.dst_cid = 7;
    g.muxer.handle_guest_packet(&hdr, &[]);
    assert!(g.recv().is_none());
    // Unknown socket type, unknown connection, unknown op: RST.
    hdr.dst_cid = HOST_CID;
    hdr.type_ = 2;
    g.muxer.handle_guest_packet(&hdr, &[]);
    g.expect(op::RST);
    g.send(op::RW, 11, port, 0, b"x");
    g.expect(op::RST);
    // RST for an unknown connection gets no answer.
    g.send(op::RST, 11, port, 0, &[]);
    assert!(g.recv().is_none());
    g.send(99, 10, port, 0, &[]);
    g.expect(op::RST);
    assert_eq!(g.muxer.connection_count(), 0);
    // Short or lying chains never reach the muxer: parse errors.
    assert!(parse_packet(&[0u8; HDR_LEN - 1]).is_err());
}

#[test]
fn bad_connect_line_closes_the_client() {
    let mut g = SimGuest::new();
    let mut host = UnixStream::connect(&g.path).unwrap();
    host.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    host.write_all(b"HELLO there\n").unwrap();
    assert!(g.recv().is_none());
    let mut buf = [0u8; 4];
    assert_eq!(host.read(&mut buf).unwrap(), 0);
    let mut long = UnixStream::connect(&g.path).unwrap();
    long.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    long.write_all(&[b'9'; 100]).unwrap();
    assert!(g.recv().is_none());
    // Closed with unread bytes: EOF or ECONNRESET, never data or a hang.
    assert!(!matches!(long.read(&mut buf), Ok(n) if n > 0));
    assert_eq!(g.muxer.connection_count(), 0);
}

/// xorshift64*: deterministic, no dependencies.
struct Prng(u64);

impl Prng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

#[test]
fn random_tx_bytes_never_panic() {
    let mut g = SimGuest::new();
    let mut hosts: Vec<(UnixStream, u32)> = (0..4).map(|i| g.established(100 + i)).collect();
    let mut rng = Prng(0x9e37_79b9_7f4a_7c15);
    let deadline = Instant::now() + Duration::from_millis(1500);
    let mut iterations = 0u64;
    while Instant::now() < deadline || iterations < 2000 {
        iterations += 1;
        let len = (rng.next() % 160) as usize;
        let mut bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        // Half the time, make the header plausible so it reaches deep paths.
        if len >= HDR_LEN && rng.next() % 2 == 0 {
            let (_, port) = &hosts[(rng.next() % hosts.len() as u64) as usize];
            bytes[0..8].copy_from_slice(&CID.to_le_bytes());
            bytes[8..16].copy_from_slice(&HOST_CID.to_le_bytes());
            bytes[16..20].copy_from_slice(&(100 + (rng.next() % 4) as u32).to_le_bytes());
            bytes[20..24].copy_from_slice(&port.to_le_bytes());
            let plen = (rng.next() % (len - HDR_LEN + 8) as u64) as u32;
            bytes[24..28].copy_from_slice(&plen.to_le_bytes());
            bytes[28..30].copy_from_slice(&TYPE_STREAM.to_le_bytes());
            bytes[30..32].copy_from_slice(&((rng.next() % 9) as u16).to_le_bytes());
        }
        match parse_packet(&bytes) {
            Ok((hdr, payload)) => g.muxer.handle_guest_packet(&hdr, payload),
            Err(_) => {
                if let Ok(hdr) = VsockHeader::decode(&bytes) {
                    g.muxer.reject(&hdr);
                }
            }
        }
        if iterations % 16 == 0 {
            let (host, _) = &mut hosts[(rng.next() % 4) as usize];
            let _ = host.set_nonblocking(true);
            let _ = host.write(b"noise");
            let mut sink = [0u8; 256];
            let _ = host.read(&mut sink);
        }
        while g.recv().is_some() {}
        // Keep some connections alive for the fuzzer to hit.
        if g.muxer.connection_count() < 2 {
            let host = UnixStream::connect(&g.path).unwrap();
            (&host).write_all(b"CONNECT 100\n").unwrap();
            while let Some((h, _)) = g.recv() {
                if h.op == op::REQUEST {
                    g.send(op::RESPONSE, 100, h.src_port, 0, &[]);
                    hosts.push((host, h.src_port));
                    break;
                }
            }
        }
    }
    assert!(iterations >= 2000);
}
