//! The ring consumer on a page laid out as KVM lays it out, with
//! `RingPage::push` filling it the way KVM does: empty, in order,
//! wrap-around, full, bad indices and malformed entries.

use super::ring::{BadIndex, RingEntry, RingPage};

fn page() -> RingPage {
    RingPage::anonymous().expect("an anonymous page")
}

fn drain(ring: &RingPage) -> Vec<(u64, bool, Vec<u8>)> {
    let mut seen = Vec::new();
    ring.consume(|e: RingEntry| seen.push((e.addr, e.pio, e.data().unwrap_or_default().to_vec())))
        .expect("indices in range");
    seen
}

#[test]
fn a_4k_page_holds_what_kvm_says() {
    // KVM_COALESCED_MMIO_MAX for 4 KiB pages: (4096 - 8) / 24.
    if super::ring::page_size() == 4096 {
        assert_eq!(page().capacity(), 170);
    }
}

#[test]
fn an_empty_ring_yields_nothing() {
    let ring = page();
    assert!(ring.is_empty());
    assert_eq!(ring.consume(|_| panic!("no entry")), Ok(0));
    assert!(ring.is_empty());
}

#[test]
fn entries_come_out_in_order_with_their_bytes() {
    let ring = page();
    assert!(ring.push(0x3f8, true, b"a"));
    assert!(ring.push(0xd000_0050, false, &[1, 2, 3, 4]));
    assert!(ring.push(0x3f8, true, b"b"));
    assert!(!ring.is_empty());
    assert_eq!(
        drain(&ring),
        vec![
            (0x3f8, true, b"a".to_vec()),
            (0xd000_0050, false, vec![1, 2, 3, 4]),
            (0x3f8, true, b"b".to_vec()),
        ]
    );
    assert!(ring.is_empty());
}

#[test]
fn the_ring_wraps_around() {
    let ring = page();
    let cap = ring.capacity();
    let mut expected = Vec::new();
    // Three passes over the ring, a few entries short of full each time,
    // so the read and write indices cross the end.
    for round in 0..3u32 {
        let mut batch = Vec::new();
        for i in 0..cap - 3 {
            let byte = ((round * 7 + i) % 251) as u8;
            assert!(ring.push(0x3f8, true, &[byte]), "round {round} entry {i}");
            batch.push((0x3f8, true, vec![byte]));
        }
        let got = drain(&ring);
        assert_eq!(got, batch, "round {round}");
        expected.extend(batch);
    }
    assert_eq!(expected.len() as u32, 3 * (cap - 3));
}

#[test]
fn a_full_ring_refuses_more_and_drains_whole() {
    let ring = page();
    let cap = ring.capacity();
    // One slot always stays free.
    for i in 0..cap - 1 {
        assert!(ring.push(0x3f8, true, &[(i % 256) as u8]), "entry {i}");
    }
    assert!(!ring.push(0x3f8, true, b"x"), "the ring is full");
    let got = drain(&ring);
    assert_eq!(got.len() as u32, cap - 1);
    assert_eq!(
        got.last().map(|e| e.2.clone()),
        Some(vec![((cap - 2) % 256) as u8])
    );
    assert!(ring.push(0x3f8, true, b"y"), "room again after the drain");
    assert_eq!(drain(&ring), vec![(0x3f8, true, b"y".to_vec())]);
}

#[test]
fn indices_outside_the_ring_are_an_error_not_a_read() {
    let ring = page();
    let cap = ring.capacity();
    for (first, last) in [(cap, 0), (0, cap), (u32::MAX, 3), (5, u32::MAX)] {
        ring.set_indices(first, last);
        let err = ring.consume(|_| panic!("nothing may be read")).unwrap_err();
        assert_eq!(
            err,
            BadIndex {
                first,
                last,
                capacity: cap
            }
        );
        assert!(err.to_string().contains("out of range"), "{err}");
    }
    // Back in range, the consumer works again.
    ring.set_indices(cap - 1, cap - 1);
    assert!(ring.push(0x3f8, true, b"z"));
    assert_eq!(drain(&ring), vec![(0x3f8, true, b"z".to_vec())]);
}

#[test]
fn malformed_lengths_carry_no_data() {
    let ring = page();
    assert!(ring.push(0x3f8, true, &[]));
    assert!(ring.push(0x3f8, true, &[9; 12]));
    let mut lens = Vec::new();
    ring.consume(|e| lens.push(e.data().map(<[u8]>::len)))
        .unwrap();
    assert_eq!(lens, vec![None, None]);
}
