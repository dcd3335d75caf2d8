//! The page through which KVM hands user space the guest writes it
//! coalesced (`KVM_REGISTER_COALESCED_MMIO`: MMIO, or port I/O with
//! `pio = 1`) instead of exiting.
//!
//! Layout (uapi `struct kvm_coalesced_mmio_ring`): two u32 indices,
//! `first` (the next entry user space reads; only user space moves it)
//! and `last` (the next slot KVM fills; only KVM moves it), then as many
//! 24-byte entries (`struct kvm_coalesced_mmio`: address, length, pio
//! flag, up to 8 data bytes) as the rest of the page holds. KVM fills the
//! slot at `last`, then, after a write barrier, advances `last`; it never
//! fills the slot just before `first` (one slot always stays free) and
//! falls back to an ordinary exit when the ring is full.
//!
//! The ring is VM-wide: one page, mapped through any vCPU fd at
//! `KVM_COALESCED_MMIO_PAGE_OFFSET`. The guest cannot write it, but it is
//! plain shared memory, so both indices are checked before every use: an
//! index outside the ring stops the consumer with an error; nothing is
//! ever read outside the page.

use std::io;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};

use kvm_bindings::{kvm_coalesced_mmio, kvm_coalesced_mmio_ring};

/// Bytes before the first entry: `first` and `last`.
const HEADER: usize = std::mem::size_of::<kvm_coalesced_mmio_ring>();
/// Bytes per entry.
const ENTRY: usize = std::mem::size_of::<kvm_coalesced_mmio>();
const _: () = assert!(HEADER == 8 && ENTRY == 24);
/// Where `first` and `last` sit in the page.
const FIRST_AT: usize = 0;
const LAST_AT: usize = 4;
/// The most data bytes one entry carries.
const DATA_MAX: usize = 8;

/// One write KVM queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingEntry {
    /// The port (port I/O) or guest-physical address (MMIO).
    pub addr: u64,
    /// True for port I/O.
    pub pio: bool,
    len: u32,
    data: [u8; DATA_MAX],
}

impl RingEntry {
    /// The bytes written, or `None` for an entry whose length is 0 or
    /// more than an entry holds (never written by KVM; skipped).
    pub fn data(&self) -> Option<&[u8]> {
        let len = usize::try_from(self.len).ok()?;
        (1..=DATA_MAX).contains(&len).then(|| &self.data[..len])
    }

    fn decode(raw: &[u8; ENTRY]) -> Self {
        let word = |at: usize| u32::from_ne_bytes([raw[at], raw[at + 1], raw[at + 2], raw[at + 3]]);
        let mut addr = [0u8; 8];
        addr.copy_from_slice(&raw[..8]);
        let mut data = [0u8; DATA_MAX];
        data.copy_from_slice(&raw[16..24]);
        Self {
            addr: u64::from_ne_bytes(addr),
            len: word(8),
            pio: word(12) == 1,
            data,
        }
    }
}

/// The ring's indices are outside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the coalesced I/O ring's indices are out of range (first {first}, last {last}, {capacity} entries); its writes are left unread")]
pub struct BadIndex {
    /// User space's read index.
    pub first: u32,
    /// KVM's write index.
    pub last: u32,
    /// Entries the ring holds.
    pub capacity: u32,
}

/// A mapped coalesced-I/O ring page. Unmapped on drop.
pub struct RingPage {
    base: NonNull<u8>,
    size: usize,
}

// SAFETY: the page is shared memory that KVM writes concurrently anyway;
// this type touches it only through atomics (the indices) and volatile
// reads (entries), and never hands out references into it, so it may be
// used from any thread.
unsafe impl Send for RingPage {}
// SAFETY: as above; `&RingPage` allows no access that is not atomic or a
// volatile read of bytes KVM published before advancing `last`.
unsafe impl Sync for RingPage {}

/// The host's page size.
pub fn page_size() -> usize {
    // SAFETY: sysconf reads a constant of the running system.
    match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        n if n > 0 => n as usize,
        _ => 4096,
    }
}

impl RingPage {
    /// Maps the ring through a vCPU fd; `page_offset` is what
    /// `KVM_CHECK_EXTENSION(KVM_CAP_COALESCED_MMIO)` returned.
    pub fn map(vcpu: &impl AsRawFd, page_offset: u32) -> io::Result<Self> {
        let size = page_size();
        let offset = u64::from(page_offset)
            .checked_mul(size as u64)
            .and_then(|o| libc::off_t::try_from(o).ok())
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        Self::mmap(size, libc::MAP_SHARED, vcpu.as_raw_fd(), offset)
    }

    /// A zeroed page of anonymous memory laid out like the ring (for
    /// tests of the consumer, with [`RingPage::push`] playing KVM).
    #[cfg(test)]
    pub fn anonymous() -> io::Result<Self> {
        Self::mmap(page_size(), libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
    }

    fn mmap(size: usize, flags: i32, fd: i32, offset: libc::off_t) -> io::Result<Self> {
        // SAFETY: a fresh mapping at an address the kernel picks; the
        // result is checked before use, and it is unmapped only in Drop.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd,
                offset,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = NonNull::new(addr.cast::<u8>()).ok_or_else(io::Error::last_os_error)?;
        Ok(Self { base, size })
    }

    /// Entries the ring holds (KVM's `KVM_COALESCED_MMIO_MAX`).
    pub fn capacity(&self) -> u32 {
        ((self.size - HEADER) / ENTRY) as u32
    }

    fn index(&self, at: usize) -> &AtomicU32 {
        debug_assert!(at == FIRST_AT || at == LAST_AT);
        // SAFETY: `at` is 0 or 4, inside the mapped page, which is page
        // aligned, so the u32 there is aligned; the page lives as long as
        // `self`, and KVM accesses the index with single aligned loads and
        // stores too.
        unsafe { &*self.base.as_ptr().add(at).cast::<AtomicU32>() }
    }

    /// True when KVM queued nothing that is not yet consumed (a consumer
    /// that ran before this call has finished applying what it took).
    pub fn is_empty(&self) -> bool {
        self.index(LAST_AT).load(Ordering::Acquire) == self.index(FIRST_AT).load(Ordering::Acquire)
    }

    /// Hands each entry KVM had queued when the call began to `apply`, in
    /// order, advancing `first` past an entry only once `apply` returned
    /// (so a caller that sees the ring empty knows every queued write was
    /// applied). Entries queued meanwhile wait for the next call, which
    /// bounds the work of one call to one ring's worth. Callers must not
    /// consume concurrently: `first` belongs to one consumer at a time.
    pub fn consume(&self, mut apply: impl FnMut(RingEntry)) -> Result<usize, BadIndex> {
        let capacity = self.capacity();
        let last = self.index(LAST_AT).load(Ordering::Acquire);
        let mut first = self.index(FIRST_AT).load(Ordering::Relaxed);
        if first >= capacity || last >= capacity {
            return Err(BadIndex {
                first,
                last,
                capacity,
            });
        }
        let mut taken = 0;
        while first != last {
            apply(self.read(first));
            first = (first + 1) % capacity;
            // Release: the entry was read (and applied) before KVM may
            // reuse its slot.
            self.index(FIRST_AT).store(first, Ordering::Release);
            taken += 1;
        }
        Ok(taken)
    }

    fn read(&self, slot: u32) -> RingEntry {
        debug_assert!(slot < self.capacity());
        let at = HEADER + slot as usize * ENTRY;
        // SAFETY: `slot < capacity`, so `at + ENTRY <= size`: the bytes
        // are inside the mapping. They are read as plain bytes (any value
        // is valid), volatile because KVM writes the page concurrently
        // (it filled this slot before publishing `last`, which the caller
        // loaded with Acquire).
        let raw =
            unsafe { std::ptr::read_volatile(self.base.as_ptr().add(at).cast::<[u8; ENTRY]>()) };
        RingEntry::decode(&raw)
    }

    /// Test only: queues a write as KVM does; false when the ring is full.
    #[cfg(test)]
    pub fn push(&self, addr: u64, pio: bool, data: &[u8]) -> bool {
        let capacity = self.capacity();
        let insert = self.index(LAST_AT).load(Ordering::Relaxed);
        if insert >= capacity
            || (insert + 1) % capacity == self.index(FIRST_AT).load(Ordering::Acquire)
        {
            return false;
        }
        let mut raw = [0u8; ENTRY];
        raw[..8].copy_from_slice(&addr.to_ne_bytes());
        raw[8..12].copy_from_slice(&(data.len() as u32).to_ne_bytes());
        raw[12..16].copy_from_slice(&u32::from(pio).to_ne_bytes());
        let n = data.len().min(DATA_MAX);
        raw[16..16 + n].copy_from_slice(&data[..n]);
        // SAFETY: `insert < capacity`: the slot is inside the page.
        unsafe {
            std::ptr::write_volatile(
                self.base
                    .as_ptr()
                    .add(HEADER + insert as usize * ENTRY)
                    .cast::<[u8; ENTRY]>(),
                raw,
            )
        };
        self.index(LAST_AT)
            .store((insert + 1) % capacity, Ordering::Release);
        true
    }

    /// Test only: sets an index as a broken kernel (or memory corruption)
    /// could.
    #[cfg(test)]
    pub fn set_indices(&self, first: u32, last: u32) {
        self.index(FIRST_AT).store(first, Ordering::SeqCst);
        self.index(LAST_AT).store(last, Ordering::SeqCst);
    }
}

impl Drop for RingPage {
    fn drop(&mut self) {
        // SAFETY: `base`/`size` are the mapping made in `mmap`, unmapped
        // only here; no reference into it outlives `self`.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.size) };
    }
}
