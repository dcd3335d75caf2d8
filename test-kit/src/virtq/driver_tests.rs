//! The driver against a real device side: virtio-queue's `Queue`, the
//! library our devices use, reads the chains [`DriverQueue`] lays out and
//! returns them on the used ring; [`walk`] must agree with it on what a
//! chain holds, lying chains included.

use std::time::Duration;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;

const MEM: usize = 0x10_0000;
const SIZE: u16 = 16;

fn memory() -> GuestMemoryMmap<()> {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap()
}

/// The device's view of `q`, as a frontend would set it up.
fn device(q: &DriverQueue) -> Queue {
    let mut dev = Queue::new(SIZE).unwrap();
    dev.set_size(q.size);
    let halves = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
    let (lo, hi) = halves(q.desc);
    dev.set_desc_table_address(lo, hi);
    let (lo, hi) = halves(q.avail);
    dev.set_avail_ring_address(lo, hi);
    let (lo, hi) = halves(q.used);
    dev.set_used_ring_address(lo, hi);
    dev.set_ready(true);
    dev
}

#[test]
fn paged_puts_each_part_on_its_own_page() {
    let q = DriverQueue::paged(0x1000, 256);
    assert_eq!((q.desc, q.avail, q.used), (0x1000, 0x2000, 0x3000));
    let q = DriverQueue::paged(0x10_0000, 64);
    assert_eq!((q.avail, q.used), (0x10_1000, 0x10_2000));
    assert_eq!(q.used_len(), 4 + 8 * 64 + 2);
}

#[test]
fn a_chain_goes_to_the_device_and_comes_back_used() {
    let mem = memory();
    let mut q = DriverQueue::paged(0, SIZE);
    let mut dev = device(&q);
    assert!(dev.is_valid(&mem));
    mem.write_slice(b"request", GuestAddress(0x8000)).unwrap();
    let bufs = [Buf::readable(0x8000, 7), Buf::writable(0x9000, 64)];
    for round in 0..3 * SIZE {
        let head = q.add_chain(&mem, &bufs);
        assert_eq!(
            head,
            (2 * round) % SIZE,
            "heads follow the free descriptors"
        );
        q.kick();
        assert_eq!(q.kick_fd().read().unwrap(), 1);

        let chain = dev
            .pop_descriptor_chain(&mem)
            .expect("the device sees a chain");
        assert_eq!(chain.head_index(), head);
        let seen: Vec<(u64, u32, bool)> = chain
            .map(|d| (d.addr().0, d.len(), d.is_write_only()))
            .collect();
        assert_eq!(seen, [(0x8000, 7, false), (0x9000, 64, true)]);
        let walked = walk(&mem, q.desc, q.size, head);
        let walked: Vec<(u64, u32, bool)> =
            walked.iter().map(|s| (s.addr, s.len, s.writable)).collect();
        assert_eq!(walked, seen, "walk reads the chain as the device does");

        mem.write_slice(b"reply", GuestAddress(0x9000)).unwrap();
        dev.add_used(&mem, head, 5).unwrap();
        assert_eq!(
            q.wait_used(&mem, Duration::from_secs(1)),
            (u32::from(head), 5)
        );
        let written = walk(&mem, q.desc, q.size, head);
        let writable: Vec<Segment> = written.into_iter().filter(|s| s.writable).collect();
        assert_eq!(gather(&mem, &writable, 5), b"reply");
    }
    assert!(q.take_used(&mem).is_empty());
}

#[test]
fn take_used_returns_each_element_once() {
    let mem = memory();
    let mut q = DriverQueue::paged(0, SIZE);
    let mut dev = device(&q);
    let heads: Vec<u16> = (0..4)
        .map(|i| q.add_chain(&mem, &[Buf::writable(0x8000 + 0x100 * i, 16)]))
        .collect();
    while let Some(chain) = dev.pop_descriptor_chain(&mem) {
        let head = chain.head_index();
        dev.add_used(&mem, head, u32::from(head) + 1).unwrap();
    }
    let used = q.take_used(&mem);
    let want: Vec<(u32, u32)> = heads
        .iter()
        .map(|&h| (u32::from(h), u32::from(h) + 1))
        .collect();
    assert_eq!(used, want);
    assert!(q.take_used(&mem).is_empty());
}

#[test]
#[should_panic(expected = "the device used no buffer")]
fn waiting_on_a_silent_device_fails() {
    let mem = memory();
    let mut q = DriverQueue::paged(0, SIZE);
    q.add_chain(&mem, &[Buf::writable(0x8000, 16)]);
    q.wait_used(&mem, Duration::from_millis(20));
}

#[test]
fn a_lying_chain_is_walked_as_the_device_walks_it() {
    let mem = memory();
    let mut q = DriverQueue::paged(0, SIZE);
    let mut dev = device(&q);
    // A loop back to the head: the time-to-live ends it.
    for i in 0..3u16 {
        let d = Desc {
            addr: 0x8000 + 0x10 * u64::from(i),
            len: 8,
            flags: F_NEXT,
            next: (i + 1) % 3,
        };
        q.write_desc(&mem, i, d);
    }
    // An indirect table holding a nested indirect descriptor.
    let table = 0xa000;
    let inner = Desc {
        addr: 0xb000,
        len: 4,
        flags: F_WRITE | F_NEXT,
        next: 1,
    };
    let nested = Desc {
        addr: table,
        len: 32,
        flags: F_INDIRECT,
        next: 0,
    };
    mem.write_slice(&inner.encode(), GuestAddress(table))
        .unwrap();
    mem.write_slice(&nested.encode(), GuestAddress(table + 16))
        .unwrap();
    q.write_desc(&mem, 5, nested);
    for head in [0u16, 5] {
        q.publish(&mem, head);
        let chain = dev.pop_descriptor_chain(&mem).unwrap();
        let seen: Vec<Segment> = chain
            .map(|d| Segment {
                addr: d.addr().0,
                len: d.len(),
                writable: d.is_write_only(),
            })
            .collect();
        assert_eq!(walk(&mem, q.desc, q.size, head), seen, "head {head}");
        assert!(!seen.is_empty());
    }
    assert_eq!(walk(&mem, q.desc, q.size, 0).len(), usize::from(SIZE));
    // A head outside the table: nothing.
    assert!(walk(&mem, q.desc, q.size, SIZE).is_empty());
}

#[test]
fn descriptors_encode_as_they_lie_in_memory() {
    let d = Desc {
        addr: 0x1122_3344_5566_7788,
        len: 0x99aa_bbcc,
        flags: F_NEXT | F_WRITE,
        next: 0x0102,
    };
    let b = d.encode();
    assert_eq!(b[0], 0x88, "little-endian");
    assert_eq!(Desc::decode(&b), d);
}

#[test]
fn overlap_and_stray_writes_are_told() {
    let seg = |addr, len| Segment {
        addr,
        len,
        writable: true,
    };
    assert!(!overlapping(&[seg(0, 16), seg(16, 16)]));
    assert!(overlapping(&[seg(16, 16), seg(0, 17)]));
    assert!(seg(0xf0, 0x10).in_memory(0x100) && !seg(0xf1, 0x10).in_memory(0x100));
    assert!(!seg(u64::MAX, 2).in_memory(u64::MAX));
    let before = vec![0u8; 256];
    let mut after = before.clone();
    after[100] = 1;
    check_writes(&before, &after, &[(96, 104)]);
    let stray = std::panic::catch_unwind(|| check_writes(&before, &after, &[(0, 100)]));
    assert!(stray.is_err(), "a write outside the allowed ranges passed");
}
