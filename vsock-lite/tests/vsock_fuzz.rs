//! A bounded-time robustness run of the vsock connection table ([`Muxer`])
//! against a hostile guest, with real host programs on Unix streams.
//!
//! Each iteration the guest sends one packet built with the real encoder
//! ([`VsockHeader::encode`]) from plausible fields (ports of live
//! connections, every op, edge values for lengths, credit and CIDs), then
//! mutated as bytes and decoded by the real [`parse_packet`]; host programs
//! connect (with good and bad `CONNECT` lines), write, read, half-close and
//! vanish; the guest takes what the device offers with RX buffers of odd
//! sizes. After every step:
//!
//! - a guest packet never adds a connection, and the device never sends
//!   RESPONSE: the guest cannot open a connection to the host;
//! - connections stay under [`MAX_CONNECTIONS`] and the bytes held for the
//!   host under [`CONN_BUF_SIZE`] (plus an `OK` line) per connection;
//! - every packet for the guest is well formed (addresses, type, length).
//!
//! At the end, once host programs are gone and the guest resets what it was
//! offered, no connection is left, and a new one still carries data.
//! Bursts of requests, resets and connections: [`vsock_floods`] (a test
//! file of its own).

mod fuzz_support;
mod muxer_rig;

use std::io::{Read, Write};
use std::net::Shutdown;
use std::time::Duration;

use fuzz_support::{mutate, Budget, Rng, EDGE_U32};
use muxer_rig::{Link, Rig, CID};
use vsock_lite::connection::CONN_BUF_SIZE;
use vsock_lite::packet::{op, VsockHeader, HDR_LEN, HOST_CID, MAX_PAYLOAD, TYPE_STREAM};

/// Host programs alive at once during the run.
const MAX_HOSTS: usize = 48;

/// A plausible guest packet, mutated a third of the time.
fn guest_packet(rng: &mut Rng, links: &[Link]) -> Vec<u8> {
    let recent = &links[links.len().saturating_sub(32)..];
    let link = if recent.is_empty() || rng.one_in(5) {
        Link {
            guest_port: rng.pick(&[0, 1, 52, 1024, u32::MAX]),
            host_port: rng.pick(&[0, 1023, 1024, 1025, 1100, u32::MAX]),
            received: rng.next() as u32,
        }
    } else {
        recent[rng.below(recent.len())]
    };
    let ops = [
        op::RW,
        op::RW,
        op::RW,
        op::CREDIT_UPDATE,
        op::CREDIT_REQUEST,
        op::SHUTDOWN,
        op::RST,
        op::REQUEST,
        op::RESPONSE,
        0,
        8,
        u16::MAX,
    ];
    let op = rng.pick(&ops);
    let len = if op == op::RW || rng.one_in(8) {
        let any = rng.below(MAX_PAYLOAD + 1);
        rng.pick(&[0, 1, 5, 4096, MAX_PAYLOAD, any])
    } else {
        0
    };
    let hdr = VsockHeader {
        src_cid: if rng.one_in(16) {
            rng.pick(&[0, 1, 2, 4, u64::MAX])
        } else {
            CID
        },
        dst_cid: if rng.one_in(16) {
            rng.pick(&[0, 1, CID, u64::MAX])
        } else {
            HOST_CID
        },
        src_port: link.guest_port,
        dst_port: link.host_port,
        len: len as u32,
        type_: if rng.one_in(16) {
            rng.next() as u16
        } else {
            TYPE_STREAM
        },
        op,
        flags: if op == op::SHUTDOWN || rng.one_in(8) {
            rng.below(4) as u32
        } else {
            0
        },
        buf_alloc: if rng.one_in(3) {
            rng.pick(EDGE_U32)
        } else {
            CONN_BUF_SIZE
        },
        fwd_cnt: if rng.one_in(3) {
            rng.pick(EDGE_U32)
        } else {
            link.received
        },
    };
    let mut bytes = hdr.encode().to_vec();
    bytes.resize(HDR_LEN + len, rng.next() as u8);
    if rng.one_in(3) {
        mutate(rng, &mut bytes);
    }
    bytes
}

/// A burst of one kind of packet: data to one connection (a host program
/// that may not be reading), or requests, resets, shutdowns or credit
/// requests to live and unknown ports.
fn burst(rig: &mut Rig, rng: &mut Rng) {
    let recent = rig.links.len().saturating_sub(8);
    let target = match rig.links[recent..] {
        [] => return,
        ref l => l[rng.below(l.len())],
    };
    let ops = [
        op::RW,
        op::REQUEST,
        op::RST,
        op::SHUTDOWN,
        op::CREDIT_REQUEST,
    ];
    let burst_op = rng.pick(&ops);
    let count = if burst_op == op::RW {
        1 + rng.below(40)
    } else {
        1 + rng.below(2000)
    };
    let payload = vec![b'g'; if burst_op == op::RW { MAX_PAYLOAD } else { 0 }];
    for i in 0..count {
        let mut link = target;
        if burst_op != op::RW && rng.one_in(2) {
            link.guest_port = 50_000 + i as u32;
        }
        let flags = if burst_op == op::SHUTDOWN {
            rng.below(4) as u32
        } else {
            0
        };
        rig.send_flags(burst_op, link, flags, &payload);
        rig.check_bounds();
        if rng.one_in(16) {
            rig.muxer.handle_host_events();
        }
    }
}

/// One host program's move: connect, write, read, half-close or vanish.
fn host_step(rig: &mut Rig, rng: &mut Rng) {
    let any = rng.below(rig.hosts.len());
    match rng.below(6) {
        0 if rig.hosts.len() < MAX_HOSTS => {
            let port = rng.pick(&[52, 1024, 0, u32::MAX]);
            let n = rng.below(48);
            let garbage: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
            let line = match rng.below(6) {
                0 => b"CONNECT 7\r\n".to_vec(),
                1 => format!("CONNECT {port}\nearly data").into_bytes(),
                2 => b"CONNECT".to_vec(),
                3 => garbage,
                _ => format!("CONNECT {port}\n").into_bytes(),
            };
            let stream = rig.connect_host(&line);
            rig.hosts.push(stream);
        }
        1 if !rig.hosts.is_empty() => {
            let len = rng.pick(&[1, 100, 4096, 65536]);
            let _ = rig.hosts[any].write(&vec![b'h'; len]);
        }
        2 if !rig.hosts.is_empty() => {
            let mut sink = [0u8; 65536];
            let _ = rig.hosts[any].read(&mut sink);
        }
        3 if !rig.hosts.is_empty() => {
            let _ = rig.hosts[any].shutdown(Shutdown::Write);
        }
        4 if !rig.hosts.is_empty() => drop(rig.hosts.swap_remove(any)),
        _ => {}
    }
    rig.muxer.handle_host_events();
}

/// The guest resets everything it was offered; then nothing may be left.
fn wind_down(rig: &mut Rig, rng: &mut Rng) {
    rig.hosts.clear();
    for _ in 0..64 {
        rig.muxer.handle_host_events();
        while rig.drain(rng, 4096) > 0 {}
        for link in rig.links.clone() {
            rig.send(op::RST, link, &[]);
        }
        if rig.muxer.connection_count() == 0 {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    panic!(
        "{} connections outlived their host programs and a guest reset",
        rig.muxer.connection_count()
    );
}

/// A fresh connection still works both ways.
fn still_serves(rig: &mut Rig, rng: &mut Rng) {
    let mut host = rig.connect_host(b"CONNECT 4242\n");
    host.set_nonblocking(false).unwrap();
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    rig.drain(rng, 8);
    let link = *rig.links.last().unwrap();
    assert_eq!(link.guest_port, 4242, "no REQUEST for a new host program");
    rig.send(op::RESPONSE, link, &[]);
    let want = format!("OK {}\n", link.host_port);
    let mut line = vec![0u8; want.len()];
    host.read_exact(&mut line).unwrap();
    assert_eq!(line, want.as_bytes());
    rig.send(op::RW, link, b"ping");
    let mut got = [0u8; 4];
    host.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"ping");
    host.write_all(b"pong").unwrap();
    for _ in 0..100 {
        rig.muxer.handle_host_events();
        if let Some((hdr, n)) = rig.take(MAX_PAYLOAD) {
            assert_eq!((hdr.op, &rig.rx_buf[..n]), (op::RW, &b"pong"[..]));
            return;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    panic!("host data never reached the guest");
}

#[test]
fn mutated_guest_packets_never_break_the_connection_table() {
    let budget = Budget::from_env("vsock_fuzz", 0x5eed_f5ca, 150_000, Duration::from_secs(20));
    let mut rng = Rng::new(budget.seed);
    let mut rig = Rig::new("vsock-fuzz");
    let mut done = 0u64;
    while budget.more(done) {
        match rng.below(64) {
            0 => burst(&mut rig, &mut rng),
            1..=31 => {
                let bytes = guest_packet(&mut rng, &rig.links);
                rig.feed(&bytes);
            }
            32..=47 => host_step(&mut rig, &mut rng),
            _ => {
                let max = rng.below(64);
                rig.drain(&mut rng, max);
            }
        }
        rig.check_bounds();
        done += 1;
    }
    eprintln!(
        "vsock_fuzz: {done} steps in {:?}: {} host programs, {} connections offered, \
         packets to the guest by op {:?}",
        budget.elapsed(),
        rig.accepted,
        rig.links.len(),
        rig.rx_ops
    );
    assert!(done >= 1000, "only {done} steps");
    wind_down(&mut rig, &mut rng);
    still_serves(&mut rig, &mut rng);
}
