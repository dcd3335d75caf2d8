//! `HandleStore`: open files and directories, by the handle number given to
//! the guest in OPEN/OPENDIR/CREATE replies.
//!
//! File handles are used with positional I/O only, so one descriptor can
//! serve concurrent requests. Directory handles carry a lock because a
//! READDIR is a seek followed by `getdents64` on the shared position.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

/// One open file or directory.
pub struct HandleData {
    /// The node the handle was opened on.
    pub inode: u64,
    fd: OwnedFd,
    dir_lock: Mutex<()>,
}

impl HandleData {
    /// The open descriptor.
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// The descriptor, for dup-like uses.
    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    /// Serialises position-dependent directory reads.
    pub fn lock_dir(&self) -> MutexGuard<'_, ()> {
        self.dir_lock.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// All open handles of one file system.
#[derive(Default)]
pub struct HandleStore {
    map: RwLock<HashMap<u64, Arc<HandleData>>>,
    next: AtomicU64,
}

impl HandleStore {
    /// Registers an open descriptor for `inode`; returns its handle number.
    pub fn insert(&self, inode: u64, fd: OwnedFd) -> u64 {
        let handle = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let data = Arc::new(HandleData {
            inode,
            fd,
            dir_lock: Mutex::new(()),
        });
        self.map
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(handle, data);
        handle
    }

    /// The handle `handle`, which must belong to `inode` (else `EBADF`).
    pub fn get(&self, handle: u64, inode: u64) -> io::Result<Arc<HandleData>> {
        let map = self.map.read().unwrap_or_else(|p| p.into_inner());
        match map.get(&handle) {
            Some(h) if h.inode == inode => Ok(h.clone()),
            _ => Err(io::Error::from_raw_os_error(libc::EBADF)),
        }
    }

    /// Closes `handle` (once no request uses it any more).
    pub fn remove(&self, handle: u64, inode: u64) -> io::Result<()> {
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        match map.get(&handle) {
            Some(h) if h.inode == inode => {
                map.remove(&handle);
                Ok(())
            }
            _ => Err(io::Error::from_raw_os_error(libc::EBADF)),
        }
    }

    /// Closes everything (DESTROY).
    pub fn clear(&self) {
        self.map.write().unwrap_or_else(|p| p.into_inner()).clear();
    }
}
