//! The driver side of split virtqueues in test guest memory, for the
//! descriptor-chain fuzz test: writing descriptors and avail entries
//! (well-formed or not), reading the used ring, and [`walk`], which follows
//! a chain the way the device's queue library does, so the test knows what
//! the device could read and write.

use vm_memory::{Bytes, GuestAddress};
use vmm::device::GuestMemoryMmap;

pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;
pub const F_INDIRECT: u16 = 4;

/// One 16-byte split-ring descriptor.
#[derive(Clone, Copy, Debug, Default)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

impl Desc {
    pub fn encode(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&self.addr.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b[12..14].copy_from_slice(&self.flags.to_le_bytes());
        b[14..16].copy_from_slice(&self.next.to_le_bytes());
        b
    }

    fn decode(b: &[u8; 16]) -> Self {
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

/// A buffer of a chain as the device sees it.
#[derive(Clone, Copy, Debug)]
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

/// The addresses of one split virtqueue and the driver's indices.
pub struct DriverQueue {
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub size: u16,
    pub avail_idx: u16,
    used_seen: u16,
}

impl DriverQueue {
    pub fn new(desc: u64, avail: u64, used: u64, size: u16) -> Self {
        Self {
            desc,
            avail,
            used,
            size,
            avail_idx: 0,
            used_seen: 0,
        }
    }

    /// Bytes of the used ring, with the `avail_event` field after it.
    pub fn used_len(&self) -> u64 {
        4 + 8 * u64::from(self.size) + 2
    }

    pub fn write_desc(&self, mem: &GuestMemoryMmap, index: u16, d: Desc) {
        let at = self.desc + 16 * u64::from(index);
        mem.write_slice(&d.encode(), GuestAddress(at)).unwrap();
    }

    /// Offers the chain at `head` (any value: the guest may lie).
    pub fn publish(&mut self, mem: &GuestMemoryMmap, head: u16) {
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        mem.write_obj(head.to_le(), GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.write_avail_idx(mem, self.avail_idx);
    }

    /// Writes the avail ring's index (a lying guest writes garbage).
    pub fn write_avail_idx(&self, mem: &GuestMemoryMmap, idx: u16) {
        mem.write_obj(idx.to_le(), GuestAddress(self.avail + 2))
            .unwrap();
    }

    /// Used elements (descriptor head, length) added since the last call.
    pub fn take_used(&mut self, mem: &GuestMemoryMmap) -> Vec<(u32, u32)> {
        let idx = u16::from_le(mem.read_obj(GuestAddress(self.used + 2)).unwrap());
        let fresh = idx.wrapping_sub(self.used_seen);
        assert!(
            fresh <= self.size,
            "used index jumped by {fresh} in a ring of {}",
            self.size
        );
        let mut out = Vec::new();
        while self.used_seen != idx {
            let at = self.used + 4 + 8 * u64::from(self.used_seen % self.size);
            let id: u32 = mem.read_obj(GuestAddress(at)).unwrap();
            let len: u32 = mem.read_obj(GuestAddress(at + 4)).unwrap();
            out.push((u32::from_le(id), u32::from_le(len)));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }
}

/// The buffers of the chain at `head` in the descriptor table at `table`,
/// as the queue library yields them: following NEXT until the
/// time-to-live (the table size) runs out or an index falls outside the
/// table, entering one indirect table (never a nested one), and stopping
/// where a descriptor cannot be read or the chain passes 4 GiB.
pub fn walk(mem: &GuestMemoryMmap, table: u64, size: u16, head: u16) -> Vec<Segment> {
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

/// The first `len` bytes written along `segs`.
pub fn gather(mem: &GuestMemoryMmap, segs: &[Segment], len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    for s in segs {
        let take = (s.len as usize).min(len - out.len());
        let mut buf = vec![0u8; take];
        mem.read_slice(&mut buf, GuestAddress(s.addr)).unwrap();
        out.extend_from_slice(&buf);
    }
    out
}

/// Fails when the device changed guest memory outside `allowed`.
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
