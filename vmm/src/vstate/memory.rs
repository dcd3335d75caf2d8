//! Guest memory backed by one memfd, so that vhost-user backends can map
//! exactly the pages the guest sees.

use std::fs::File;
use std::os::fd::FromRawFd;

use vm_memory::{FileOffset, GuestAddress};

/// The guest memory type used throughout the VMM.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

/// Errors creating guest memory.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MemoryError {
    /// The memfd could not be created.
    #[error("memfd_create failed: {0}")]
    Memfd(std::io::Error),
    /// The memfd could not be sized.
    #[error("cannot size the guest memory file to {size} bytes: {source}")]
    Truncate {
        /// The size asked for.
        size: u64,
        /// The error.
        source: std::io::Error,
    },
    /// The memory could not be mapped.
    #[error("cannot map guest memory: {0}")]
    Mmap(String),
    /// The ranges overlap or are empty.
    #[error("guest memory layout is invalid: {0}")]
    Layout(String),
}

/// Creates guest memory for `ranges` (guest address, length), all backed by
/// one memfd at consecutive file offsets and mapped shared.
pub fn create_memfd_memory(
    ranges: &[(GuestAddress, usize)],
) -> Result<GuestMemoryMmap, MemoryError> {
    let total: u64 = ranges.iter().map(|(_, len)| *len as u64).sum();
    let name = c"keystone-guest-ram";
    // SAFETY: `name` is a valid NUL-terminated string; the flags are valid.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(total)
        .map_err(|source| MemoryError::Truncate {
            size: total,
            source,
        })?;

    let mut offset = 0u64;
    let mut regions = Vec::with_capacity(ranges.len());
    for &(addr, len) in ranges {
        let file_offset = FileOffset::new(file.try_clone().map_err(MemoryError::Memfd)?, offset);
        regions.push((addr, len, Some(file_offset)));
        offset += len as u64;
    }
    GuestMemoryMmap::from_ranges_with_files(regions.iter().map(|(a, l, f)| (*a, *l, f.clone())))
        .map_err(|e| MemoryError::Mmap(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

    #[test]
    fn regions_share_one_memfd_at_consecutive_offsets() {
        let mem = create_memfd_memory(&[
            (GuestAddress(0), 0x10_0000),
            (GuestAddress(0x1_0000_0000), 0x20_0000),
        ])
        .unwrap();
        assert_eq!(mem.num_regions(), 2);
        let offsets: Vec<u64> = mem
            .iter()
            .map(|r| r.file_offset().expect("memfd-backed").start())
            .collect();
        assert_eq!(offsets, vec![0, 0x10_0000]);
        mem.write_obj(0xdead_beef_u32, GuestAddress(0x1_0000_0010))
            .unwrap();
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(0x1_0000_0010)).unwrap(),
            0xdead_beef
        );
    }
}
