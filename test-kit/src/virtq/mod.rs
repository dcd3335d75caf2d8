//! The driver side of a split virtqueue (virtio 1.x, 2.7) in guest
//! memory, for tests that play the guest to a device: [`DriverQueue`]
//! lays out descriptor chains, offers them on the available ring, kicks
//! the device and reads what it put on the used ring.
//!
//! A well-behaved driver uses [`DriverQueue::add_chain`]; a lying one
//! writes its own descriptors with [`DriverQueue::write_desc`] (any
//! address, length, flags or next index) and offers any head with
//! [`DriverQueue::publish`]. [`chain`] follows a chain the way the device's
//! queue library does, so a test knows what the device may read and write.
//!
//! Guest memory is anything `vm-memory` can address
//! ([`GuestMemory`]). Memory errors panic: the test laid the queue out.

pub mod chain;

use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemory};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub use chain::{check_writes, gather, overlapping, walk, Segment};

/// The descriptor continues in its `next` field.
pub const F_NEXT: u16 = 1;
/// The device may write the buffer (the driver may not read it first).
pub const F_WRITE: u16 = 2;
/// The buffer is a table of descriptors.
pub const F_INDIRECT: u16 = 4;

/// One 16-byte split-ring descriptor.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

impl Desc {
    /// The descriptor as it lies in memory (little-endian).
    pub fn encode(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&self.addr.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b[12..14].copy_from_slice(&self.flags.to_le_bytes());
        b[14..16].copy_from_slice(&self.next.to_le_bytes());
        b
    }

    /// The descriptor in the 16 bytes `b`.
    pub fn decode(b: &[u8; 16]) -> Self {
        let mut addr = [0u8; 8];
        addr.copy_from_slice(&b[0..8]);
        Self {
            addr: u64::from_le_bytes(addr),
            len: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
            flags: u16::from_le_bytes([b[12], b[13]]),
            next: u16::from_le_bytes([b[14], b[15]]),
        }
    }
}

/// One buffer of a chain that [`DriverQueue::add_chain`] lays out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buf {
    pub addr: u64,
    pub len: u32,
    pub writable: bool,
}

impl Buf {
    /// A buffer the device reads.
    pub fn readable(addr: u64, len: u32) -> Self {
        Self {
            addr,
            len,
            writable: false,
        }
    }

    /// A buffer the device writes.
    pub fn writable(addr: u64, len: u32) -> Self {
        Self {
            addr,
            len,
            writable: true,
        }
    }
}

/// One split virtqueue: where its three parts lie, the driver's indices,
/// and the eventfd that kicks the device.
#[derive(Debug)]
pub struct DriverQueue {
    /// The descriptor table.
    pub desc: u64,
    /// The available ring.
    pub avail: u64,
    /// The used ring.
    pub used: u64,
    /// Entries in each.
    pub size: u16,
    /// The available index the driver published last.
    pub avail_idx: u16,
    used_seen: u16,
    next_desc: u16,
    kick: EventFd,
}

/// `at` rounded up to a 4 KiB boundary.
fn page_up(at: u64) -> u64 {
    (at + 0xfff) & !0xfff
}

impl DriverQueue {
    /// A queue of `size` entries with its parts at the given addresses.
    pub fn new(desc: u64, avail: u64, used: u64, size: u16) -> Self {
        let kick = EventFd::new(EFD_NONBLOCK).expect("an eventfd for the kick");
        Self {
            desc,
            avail,
            used,
            size,
            avail_idx: 0,
            used_seen: 0,
            next_desc: 0,
            kick,
        }
    }

    /// A queue laid out from `base` on, each part on its own 4 KiB page
    /// (descriptors, then the available ring, then the used ring).
    pub fn paged(base: u64, size: u16) -> Self {
        let avail = page_up(base + 16 * u64::from(size));
        let used = page_up(avail + 6 + 2 * u64::from(size));
        Self::new(base, avail, used, size)
    }

    /// Bytes of the used ring, with the `avail_event` field after it.
    pub fn used_len(&self) -> u64 {
        4 + 8 * u64::from(self.size) + 2
    }

    /// The eventfd the device waits on (its vring kick).
    pub fn kick_fd(&self) -> &EventFd {
        &self.kick
    }

    /// Tells the device that the available ring moved.
    pub fn kick(&self) {
        self.kick.write(1).expect("kick the device");
    }

    /// Writes descriptor `index` of the table (any value: the guest may
    /// lie).
    pub fn write_desc<M: GuestMemory + ?Sized>(&self, mem: &M, index: u16, d: Desc) {
        let at = self.desc + 16 * u64::from(index);
        mem.write_slice(&d.encode(), GuestAddress(at))
            .expect("write a descriptor");
    }

    /// Lays `bufs` out as one chain in the next free descriptors (in
    /// order, wrapping at the table's end), offers it, and asks for a
    /// call at the next used entry (`used_event`, which counts when the
    /// device negotiated EVENT_IDX). Returns the chain's head; the device
    /// hears of it at the next [`kick`](Self::kick).
    pub fn add_chain<M: GuestMemory + ?Sized>(&mut self, mem: &M, bufs: &[Buf]) -> u16 {
        let head = self.next_desc;
        for (i, buf) in bufs.iter().enumerate() {
            let index = self.next_desc;
            self.next_desc = (self.next_desc + 1) % self.size;
            let mut flags = if buf.writable { F_WRITE } else { 0 };
            if i + 1 < bufs.len() {
                flags |= F_NEXT;
            }
            let d = Desc {
                addr: buf.addr,
                len: buf.len,
                flags,
                next: self.next_desc,
            };
            self.write_desc(mem, index, d);
        }
        let used_event = GuestAddress(self.avail + 4 + 2 * u64::from(self.size));
        mem.write_obj(self.used_seen.to_le(), used_event)
            .expect("write used_event");
        self.publish(mem, head);
        head
    }

    /// Offers the chain at `head` (any value: the guest may lie) and
    /// moves the available index past it.
    pub fn publish<M: GuestMemory + ?Sized>(&mut self, mem: &M, head: u16) {
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        mem.write_obj(head.to_le(), GuestAddress(slot))
            .expect("write an available entry");
        fence(Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.write_avail_idx(mem, self.avail_idx);
        fence(Ordering::SeqCst);
    }

    /// Writes the available ring's index (a lying guest writes garbage).
    pub fn write_avail_idx<M: GuestMemory + ?Sized>(&self, mem: &M, idx: u16) {
        mem.write_obj(idx.to_le(), GuestAddress(self.avail + 2))
            .expect("write the available index");
    }

    /// The used ring's index as the device last wrote it.
    fn used_idx<M: GuestMemory + ?Sized>(&self, mem: &M) -> u16 {
        let idx: u16 = mem
            .read_obj(GuestAddress(self.used + 2))
            .expect("read the used index");
        u16::from_le(idx)
    }

    /// The next used element (descriptor head, length written), which the
    /// caller knows is there.
    fn next_used<M: GuestMemory + ?Sized>(&mut self, mem: &M) -> (u32, u32) {
        let at = self.used + 4 + 8 * u64::from(self.used_seen % self.size);
        let id: u32 = mem.read_obj(GuestAddress(at)).expect("read a used id");
        let len: u32 = mem
            .read_obj(GuestAddress(at + 4))
            .expect("read a used length");
        self.used_seen = self.used_seen.wrapping_add(1);
        (u32::from_le(id), u32::from_le(len))
    }

    /// Used elements (descriptor head, length) added since the last call;
    /// fails when the device moved its index by more than the ring holds.
    pub fn take_used<M: GuestMemory + ?Sized>(&mut self, mem: &M) -> Vec<(u32, u32)> {
        let idx = self.used_idx(mem);
        let fresh = idx.wrapping_sub(self.used_seen);
        assert!(
            fresh <= self.size,
            "used index jumped by {fresh} in a ring of {}",
            self.size
        );
        fence(Ordering::SeqCst);
        let mut out = Vec::with_capacity(usize::from(fresh));
        while self.used_seen != idx {
            out.push(self.next_used(mem));
        }
        out
    }

    /// Waits for the next used element (descriptor head, length); fails
    /// when the device used none within `limit`.
    pub fn wait_used<M: GuestMemory + ?Sized>(&mut self, mem: &M, limit: Duration) -> (u32, u32) {
        let deadline = Instant::now() + limit;
        while self.used_idx(mem) == self.used_seen {
            assert!(
                Instant::now() < deadline,
                "the device used no buffer in {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        fence(Ordering::SeqCst);
        self.next_used(mem)
    }
}

#[cfg(test)]
#[path = "driver_tests.rs"]
mod tests;
