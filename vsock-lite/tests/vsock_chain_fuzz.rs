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

mod chain_guest;
mod fuzz_support;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use chain_guest::{Guest, CID, QSIZE, TX_DATA, TX_DATA_END};
use fuzz_support::{mutate, Budget, Rng, EDGE_U32};
use keystone_test_kit::virtq::check_writes;
use vhost_user_backend::{VhostUserBackend, VringT};
use vsock_lite::backend::{MUXER_EVENT, RX_QUEUE, TX_QUEUE};
use vsock_lite::connection::CONN_BUF_SIZE;
use vsock_lite::packet::{op, VsockHeader, HDR_LEN, HOST_CID, MAX_PAYLOAD, TYPE_STREAM};

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
