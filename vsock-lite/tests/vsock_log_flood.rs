//! A guest that floods the vsock device with descriptor chains it cannot
//! read, packets to a CID that is not the host's and RX chains too small
//! for a header leaves a bounded number of lines in the host's log: the
//! device keeps serving (every chain comes back used) and says so a few
//! times, with how many lines it left out, instead of once per chain.

#[allow(dead_code)]
mod chain_guest;
mod fuzz_support;

use std::sync::atomic::{AtomicUsize, Ordering};

use chain_guest::{Guest, OUTSIDE, TX_DATA};
use keystone_test_kit::virtq::Desc;
use log_limit::BURST;
use vm_memory::{Bytes, GuestAddress};
use vsock_lite::backend::TX_QUEUE;
use vsock_lite::packet::{op, VsockHeader, HDR_LEN, TYPE_STREAM};

/// Counts the vsock lines logged, by kind.
struct Counter;

static BAD_CHAIN: AtomicUsize = AtomicUsize::new(0);
static WRONG_CID: AtomicUsize = AtomicUsize::new(0);
static ANY: AtomicUsize = AtomicUsize::new(0);

impl log::Log for Counter {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &log::Record<'_>) {
        if record.level() > log::Level::Warn {
            return;
        }
        let text = record.args().to_string();
        ANY.fetch_add(1, Ordering::SeqCst);
        if text.contains("bad TX chain") {
            BAD_CHAIN.fetch_add(1, Ordering::SeqCst);
        }
        if text.contains("dropping a packet from CID") {
            WRONG_CID.fetch_add(1, Ordering::SeqCst);
        }
    }
    fn flush(&self) {}
}

static COUNTER: Counter = Counter;

const CHAINS: usize = 3000;

#[test]
fn a_flood_of_bad_chains_leaves_a_bounded_number_of_log_lines() {
    log::set_logger(&COUNTER).unwrap();
    log::set_max_level(log::LevelFilter::Trace);
    let mut guest = Guest::new();
    let wrong_cid = VsockHeader {
        src_cid: 99,
        dst_cid: 2,
        src_port: 5000,
        dst_port: 1024,
        len: 0,
        type_: TYPE_STREAM,
        op: op::REQUEST,
        flags: 0,
        buf_alloc: 0,
        fwd_cnt: 0,
    };
    guest
        .mem
        .write_slice(&wrong_cid.encode(), GuestAddress(TX_DATA))
        .unwrap();
    for i in 0..CHAINS {
        // One buffer outside guest memory, or a readable packet from
        // a CID that is not the guest's.
        let desc = if i % 2 == 0 {
            Desc {
                addr: OUTSIDE[i / 2 % OUTSIDE.len()],
                len: 64,
                ..Desc::default()
            }
        } else {
            Desc {
                addr: TX_DATA,
                len: HDR_LEN as u32,
                ..Desc::default()
            }
        };
        guest.tx.write_desc(&guest.mem, 0, desc);
        guest.tx.publish(&guest.mem, 0);
        guest.event(TX_QUEUE);
        assert_eq!(guest.tx.take_used(&guest.mem).len(), 1, "chain {i}");
    }
    let (bad, cid, any) = (
        BAD_CHAIN.load(Ordering::SeqCst),
        WRONG_CID.load(Ordering::SeqCst),
        ANY.load(Ordering::SeqCst),
    );
    let burst = BURST as usize;
    assert!(
        (1..=burst).contains(&bad),
        "{bad} lines for {} unreadable chains",
        CHAINS / 2
    );
    assert!(
        (1..=burst).contains(&cid),
        "{cid} lines for {} packets to the wrong CID",
        CHAINS / 2
    );
    assert!(any <= 4 * burst, "{any} warnings in all");
}
