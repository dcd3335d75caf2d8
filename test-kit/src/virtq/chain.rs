//! What the device makes of a descriptor chain, computed on the driver's
//! side: [`walk`] follows a chain the way the device's queue library
//! (virtio-queue) does, [`gather`] reads what the device wrote along it,
//! [`overlapping`] tells buffers that share bytes (whose contents are
//! then anyone's guess), and [`check_writes`] fails when the device wrote
//! guest memory it was not given.

use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::{Desc, F_INDIRECT, F_NEXT, F_WRITE};

/// A buffer of a chain as the device sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub addr: u64,
    pub len: u32,
    pub writable: bool,
}

impl Segment {
    /// Whether the buffer lies inside `mem_size` bytes of guest memory.
    pub fn in_memory(&self, mem_size: u64) -> bool {
        self.addr
            .checked_add(u64::from(self.len))
            .is_some_and(|end| end <= mem_size)
    }
}

/// The buffers of the chain at `head` in the descriptor table at `table`
/// (of `size` entries), as the queue library yields them: following NEXT
/// until the time-to-live (the table size) runs out or an index falls
/// outside the table, entering one indirect table (never a nested one),
/// and stopping where a descriptor cannot be read or the chain passes
/// 4 GiB.
pub fn walk<M: GuestMemory + ?Sized>(mem: &M, table: u64, size: u16, head: u16) -> Vec<Segment> {
    let (mut table, mut size, mut ttl, mut index) = (table, size, size, head);
    let mut indirect = false;
    let mut total = 0u32;
    let mut out = Vec::new();
    while ttl > 0 && index < size {
        let Some(at) = table.checked_add(16 * u64::from(index)) else {
            break;
        };
        let Ok(raw) = mem.read_obj::<[u8; 16]>(GuestAddress(at)) else {
            break;
        };
        let d = Desc::decode(&raw);
        if d.flags & F_INDIRECT != 0 {
            if indirect || d.len % 16 != 0 || d.len / 16 > u32::from(u16::MAX) {
                break;
            }
            (table, size, index, indirect) = (d.addr, (d.len / 16) as u16, 0, true);
            ttl = size;
            continue;
        }
        let Some(sum) = total.checked_add(d.len) else {
            break;
        };
        total = sum;
        out.push(Segment {
            addr: d.addr,
            len: d.len,
            writable: d.flags & F_WRITE != 0,
        });
        if d.flags & F_NEXT == 0 {
            break;
        }
        index = d.next;
        ttl -= 1;
    }
    out
}

/// Whether any two buffers share a byte.
pub fn overlapping(segs: &[Segment]) -> bool {
    let mut ranges: Vec<(u64, u64)> = segs
        .iter()
        .map(|s| (s.addr, s.addr + u64::from(s.len)))
        .collect();
    ranges.sort_unstable();
    ranges.windows(2).any(|w| w[1].0 < w[0].1)
}

/// The first `len` bytes written along `segs` (fewer if they hold less).
pub fn gather<M: GuestMemory + ?Sized>(mem: &M, segs: &[Segment], len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    for s in segs {
        let take = (s.len as usize).min(len - out.len());
        let mut buf = vec![0u8; take];
        mem.read_slice(&mut buf, GuestAddress(s.addr))
            .expect("read a written buffer");
        out.extend_from_slice(&buf);
    }
    out
}

/// Fails when guest memory changed from `before` to `after` (two
/// snapshots from address 0) outside the `[start, end)` ranges in
/// `allowed`.
pub fn check_writes(before: &[u8], after: &[u8], allowed: &[(u64, u64)]) {
    for (i, (a, b)) in before.chunks(64).zip(after.chunks(64)).enumerate() {
        if a == b {
            continue;
        }
        for j in (0..a.len()).filter(|&j| a[j] != b[j]) {
            let addr = (i * 64 + j) as u64;
            assert!(
                allowed.iter().any(|&(s, e)| s <= addr && addr < e),
                "the device wrote guest memory at {addr:#x}, outside the used rings and its RX buffers"
            );
        }
    }
}
