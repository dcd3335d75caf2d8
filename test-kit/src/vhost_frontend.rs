//! The frontend side of vhost-user-fs for a process that plays the VMM:
//! guest memory in one memfd region, shared with the daemon, and a split
//! virtqueue handed to it. Used by the virtio-fs benchmark `bench_direct`
//! (`benches/virtiofs/`) and by virtiofsd-lite's in-process protocol tests
//! (`virtiofsd-lite/tests/vhost_user.rs`).

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};

use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

fn err<E: std::fmt::Display>(what: &'static str) -> impl FnOnce(E) -> String {
    move |e| format!("{what}: {e}")
}

/// Guest memory: one memfd region of `size` bytes at guest address `base`.
pub struct SharedMemory {
    pub mem: GuestMemoryMmap,
    file: File,
    base: u64,
    size: usize,
    /// Where the region is mapped in this process.
    host: u64,
}

impl SharedMemory {
    pub fn new(base: u64, size: usize) -> Result<Self, String> {
        // SAFETY: memfd_create with a valid NUL-terminated name.
        let fd = unsafe { libc::memfd_create(c"guest".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(format!("memfd_create: {}", std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just created and nothing else owns it.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size as u64).map_err(err("memfd size"))?;
        let clone = file.try_clone().map_err(err("memfd dup"))?;
        let mem = GuestMemoryMmap::<()>::from_ranges_with_files(&[(
            GuestAddress(base),
            size,
            Some(FileOffset::new(clone, 0)),
        )])
        .map_err(err("guest memory"))?;
        let host = mem
            .get_host_address(GuestAddress(base))
            .map_err(err("guest memory"))? as u64;
        Ok(SharedMemory {
            mem,
            file,
            base,
            size,
            host,
        })
    }

    /// The memory, once shared (the daemon keeps its own mapping).
    pub fn into_memory(self) -> GuestMemoryMmap {
        self.mem
    }

    /// Tells the daemon about the region (SET_MEM_TABLE).
    pub fn share(&self, fe: &mut Frontend) -> Result<(), String> {
        let region = VhostUserMemoryRegionInfo {
            guest_phys_addr: self.base,
            memory_size: self.size as u64,
            userspace_addr: self.host,
            mmap_offset: 0,
            mmap_handle: self.file.as_raw_fd(),
        };
        fe.set_mem_table(&[region])
            .map(|_| ())
            .map_err(err("set_mem_table"))
    }

    /// Hands queue `q` to the daemon: `size` entries, its descriptor table
    /// and rings at the given guest addresses, `call` and `kick` as its
    /// eventfds; then enables it.
    pub fn enable_queue(
        &self,
        fe: &mut Frontend,
        q: usize,
        size: u16,
        (desc, avail, used): (u64, u64, u64),
        call: &EventFd,
        kick: &EventFd,
    ) -> Result<(), String> {
        let host = |gpa: u64| self.host + (gpa - self.base);
        fe.set_vring_num(q, size).map_err(err("set_vring_num"))?;
        let config = VringConfigData {
            queue_max_size: size,
            queue_size: size,
            flags: 0,
            desc_table_addr: host(desc),
            used_ring_addr: host(used),
            avail_ring_addr: host(avail),
            log_addr: None,
        };
        fe.set_vring_addr(q, &config)
            .map_err(err("set_vring_addr"))?;
        fe.set_vring_base(q, 0).map_err(err("set_vring_base"))?;
        fe.set_vring_call(q, call).map_err(err("set_vring_call"))?;
        fe.set_vring_kick(q, kick).map_err(err("set_vring_kick"))?;
        fe.set_vring_enable(q, true)
            .map_err(err("set_vring_enable"))
    }
}
