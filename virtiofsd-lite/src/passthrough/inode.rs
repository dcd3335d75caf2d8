//! `InodeStore`: the node ids handed to the guest and the confined `O_PATH`
//! descriptors behind them.
//!
//! Host inodes are keyed by `(st_dev, st_ino)` so that looking up the same
//! file twice (or through a hard link) yields the same node id. Every
//! LOOKUP-like reply adds one to the node's lookup count; FORGET subtracts
//! exactly what the guest says, and the descriptor is closed at zero. The
//! root node (id 1) is never dropped. Node ids are never reused.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::fuse::ROOT_ID;

/// `(st_dev, st_ino)` of a host inode.
pub type InodeKey = (u64, u64);

/// One inode the guest knows about.
pub struct InodeData {
    /// Our node id.
    pub inode: u64,
    /// `O_PATH | O_NOFOLLOW` descriptor, opened beneath the shared directory.
    pub fd: OwnedFd,
    /// The host identity.
    pub key: InodeKey,
    /// `st_mode & S_IFMT` at lookup time (the type never changes).
    pub file_type: u32,
    refcount: AtomicU64,
}

impl InodeData {
    /// The raw `O_PATH` descriptor.
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Whether this inode is a symbolic link.
    pub fn is_symlink(&self) -> bool {
        self.file_type == libc::S_IFLNK
    }

    /// Whether this inode is a directory.
    pub fn is_dir(&self) -> bool {
        self.file_type == libc::S_IFDIR
    }
}

#[derive(Default)]
struct Maps {
    by_id: HashMap<u64, Arc<InodeData>>,
    by_key: HashMap<InodeKey, u64>,
}

/// The node table of one passthrough file system.
pub struct InodeStore {
    maps: RwLock<Maps>,
    next: AtomicU64,
}

impl InodeStore {
    /// A store holding only the root, `fd` being the shared directory.
    pub fn new(root_fd: OwnedFd, st: &libc::stat64) -> Self {
        let store = InodeStore {
            maps: RwLock::new(Maps::default()),
            next: AtomicU64::new(ROOT_ID + 1),
        };
        let root = Arc::new(InodeData {
            inode: ROOT_ID,
            fd: root_fd,
            key: (st.st_dev, st.st_ino),
            file_type: st.st_mode & libc::S_IFMT,
            refcount: AtomicU64::new(1),
        });
        {
            let mut m = store.write();
            m.by_key.insert(root.key, ROOT_ID);
            m.by_id.insert(ROOT_ID, root);
        }
        store
    }

    fn read(&self) -> RwLockReadGuard<'_, Maps> {
        self.maps.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Maps> {
        self.maps.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The inode with node id `inode`, if the guest holds it.
    pub fn get(&self, inode: u64) -> Option<Arc<InodeData>> {
        self.read().by_id.get(&inode).cloned()
    }

    /// Records one more lookup of the host inode described by `st`, opened
    /// as `fd`; returns the (possibly pre-existing) node.
    pub fn add_lookup(&self, fd: OwnedFd, st: &libc::stat64) -> Arc<InodeData> {
        let key = (st.st_dev, st.st_ino);
        let mut m = self.write();
        if let Some(existing) = m.by_key.get(&key).and_then(|id| m.by_id.get(id)) {
            existing.refcount.fetch_add(1, Ordering::Relaxed);
            return existing.clone();
        }
        let inode = self.next.fetch_add(1, Ordering::Relaxed);
        let data = Arc::new(InodeData {
            inode,
            fd,
            key,
            file_type: st.st_mode & libc::S_IFMT,
            refcount: AtomicU64::new(1),
        });
        m.by_key.insert(key, inode);
        m.by_id.insert(inode, data.clone());
        data
    }

    /// Adds one lookup to a node already held (LOOKUP of "." or of the root).
    pub fn add_ref(&self, data: &InodeData) {
        let _m = self.write();
        data.refcount.fetch_add(1, Ordering::Relaxed);
    }

    /// Drops `count` lookups of `inode`; forgets it at zero (never the root).
    pub fn forget(&self, inode: u64, count: u64) {
        if inode == ROOT_ID {
            return;
        }
        let mut m = self.write();
        let Some(data) = m.by_id.get(&inode) else {
            return;
        };
        let left = data.refcount.load(Ordering::Relaxed).saturating_sub(count);
        data.refcount.store(left, Ordering::Relaxed);
        if left == 0 {
            let key = data.key;
            m.by_id.remove(&inode);
            if m.by_key.get(&key) == Some(&inode) {
                m.by_key.remove(&key);
            }
        }
    }

    /// Forgets everything but the root (DESTROY).
    pub fn clear(&self) {
        let mut m = self.write();
        m.by_id.retain(|&id, _| id == ROOT_ID);
        let root_key = m.by_id.get(&ROOT_ID).map(|r| r.key);
        m.by_key.retain(|k, _| Some(*k) == root_key);
    }

    /// How many nodes are held, root included.
    pub fn len(&self) -> usize {
        self.read().by_id.len()
    }

    /// Always false: the root is always held.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The lookup count of `inode` (0 when not held).
    pub fn lookup_count(&self, inode: u64) -> u64 {
        self.get(inode)
            .map_or(0, |d| d.refcount.load(Ordering::Relaxed))
    }
}
