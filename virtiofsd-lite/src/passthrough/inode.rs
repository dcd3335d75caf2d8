//! `InodeStore`: the node ids handed to the guest and the confined host
//! inodes behind them.
//!
//! Host inodes are keyed by `(st_dev, st_ino)` so that looking up the same
//! file twice (or through a hard link) yields the same node id. Every
//! LOOKUP-like reply adds one to the node's lookup count; FORGET subtracts
//! exactly what the guest says, and the node is dropped at zero. The root
//! node (id 1) is never dropped. Node ids are never reused.
//!
//! Descriptor budget: a node keeps its `O_PATH` descriptor only while fewer
//! than [`InodeStore::fd_budget`] nodes do; beyond that it keeps a kernel
//! file handle instead and each request re-opens it with
//! `open_by_handle_at(O_PATH)` for as long as the request runs, so a tree of
//! any size never exhausts `RLIMIT_NOFILE`. Handles are only made by the
//! daemon from descriptors that are already confined, never taken from the
//! guest. Where handles do not work (no `CAP_DAC_READ_SEARCH`, a file system
//! without export support, another mount below the shared directory, or
//! `--inode-file-handles never`), a node that is not a directory keeps its
//! parent node and its name instead, and each request re-opens it with
//! `openat2(parent, name, O_PATH | O_NOFOLLOW, RESOLVE_BENEATH)` and checks
//! that the result is still the same inode (`ESTALE` otherwise: the host
//! removed or replaced it). RENAME through the daemon moves the recorded
//! name with the file; a hard link removed under the recorded name makes
//! the node stale although other names remain. Directories (and nodes
//! whose name is not known) keep their descriptor past the budget, and a
//! warning is logged once; a tree has far fewer directories than files.

use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::io;
use std::ops::Deref;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::sys::{self, FileHandle};
use crate::config::FileHandles;
use crate::fuse::ROOT_ID;

/// `(st_dev, st_ino)` of a host inode.
pub type InodeKey = (u64, u64);

/// The budget when `RLIMIT_NOFILE` is large.
const MAX_FD_BUDGET: usize = 65536;
/// The smallest budget we pick on our own.
const MIN_FD_BUDGET: usize = 64;

/// How a node reaches its host inode.
enum HostRef {
    /// An `O_PATH | O_NOFOLLOW` descriptor, opened beneath the shared directory.
    Fd(OwnedFd),
    /// A file handle on the shared directory's mount (re-opened per request).
    Handle(FileHandle),
    /// A name in a directory node (re-opened and checked per request).
    Name(Mutex<NameRef>),
}

/// Where a node without descriptor or handle lives: a name in a directory.
struct NameRef {
    /// The directory node; its `Arc` keeps its descriptor or handle alive.
    parent: Arc<InodeData>,
    name: CString,
    /// `sys::identity_fd` when recorded: a file the host put in its place
    /// may reuse the inode number, not the birth time too.
    identity: (u64, u64, i64, u32),
}

/// One inode the guest knows about.
pub struct InodeData {
    /// Our node id.
    pub inode: u64,
    host: HostRef,
    /// The host identity.
    pub key: InodeKey,
    /// `st_mode & S_IFMT` at lookup time (the type never changes).
    pub file_type: u32,
    refcount: AtomicU64,
}

impl InodeData {
    /// Whether this inode is a symbolic link.
    pub fn is_symlink(&self) -> bool {
        self.file_type == libc::S_IFLNK
    }

    /// Whether this inode is a directory.
    pub fn is_dir(&self) -> bool {
        self.file_type == libc::S_IFDIR
    }

    /// Whether `fd` is this node's inode. A held descriptor pins its inode,
    /// so its number cannot have been reused; a handle or name is checked.
    fn is_same_inode(&self, fd: &OwnedFd) -> bool {
        match &self.host {
            HostRef::Fd(_) => true,
            HostRef::Handle(h) => {
                sys::name_to_handle(fd.as_raw_fd()).is_ok_and(|(new, _)| new == *h)
            }
            HostRef::Name(at) => {
                let at = at.lock().unwrap_or_else(|p| p.into_inner());
                sys::identity_fd(fd.as_raw_fd()).is_ok_and(|id| id == at.identity)
            }
        }
    }

    /// Whether this node holds an open descriptor (else a file handle or a
    /// name).
    pub fn holds_fd(&self) -> bool {
        matches!(self.host, HostRef::Fd(_))
    }
}

/// A node in use by one request: its data and an `O_PATH` descriptor that
/// stays open while this value lives.
pub struct Node {
    data: Arc<InodeData>,
    /// The descriptor re-opened from a file handle, if the node has no fd.
    reopened: Option<OwnedFd>,
}

impl Node {
    /// The node's shared data, to record as a parent.
    pub fn data(&self) -> &Arc<InodeData> {
        &self.data
    }

    /// The `O_PATH` descriptor of the node.
    pub fn raw_fd(&self) -> RawFd {
        match (&self.reopened, &self.data.host) {
            (Some(fd), _) | (None, HostRef::Fd(fd)) => fd.as_raw_fd(),
            // `InodeStore::node` always re-opens the other kinds.
            (None, _) => -1,
        }
    }
}

impl AsRawFd for Node {
    fn as_raw_fd(&self) -> RawFd {
        self.raw_fd()
    }
}

impl Deref for Node {
    type Target = InodeData;
    fn deref(&self) -> &InodeData {
        &self.data
    }
}

#[derive(Default)]
struct Maps {
    by_id: HashMap<u64, Arc<InodeData>>,
    by_key: HashMap<InodeKey, u64>,
    /// Nodes holding a descriptor, root included.
    open_fds: usize,
    /// Nodes reached by name.
    named: usize,
}

/// The shared directory's mount, for `open_by_handle_at`.
struct Mount {
    /// A plain (not `O_PATH`) descriptor of the shared directory.
    fd: OwnedFd,
    id: i32,
}

/// The node table of one passthrough file system.
pub struct InodeStore {
    maps: RwLock<Maps>,
    next: AtomicU64,
    budget: AtomicUsize,
    /// `None` when file handles cannot be used here.
    mount: Option<Mount>,
    warned: AtomicBool,
}

impl InodeStore {
    /// A store holding only the root, `fd` being the shared directory.
    /// `handles` says whether nodes past the budget may use file handles;
    /// `Mandatory` fails where they do not work.
    pub fn new(root_fd: OwnedFd, st: &libc::stat64, handles: FileHandles) -> io::Result<Self> {
        let mount = match handles {
            FileHandles::Never => None,
            FileHandles::Prefer => match probe_handles(&root_fd) {
                Ok(m) => Some(m),
                Err(e) => {
                    log::info!("file handles unavailable ({e}); nodes past the budget are re-opened by name");
                    None
                }
            },
            FileHandles::Mandatory => Some(probe_handles(&root_fd)?),
        };
        let limit = usize::try_from(sys::nofile_limit()).unwrap_or(usize::MAX);
        let store = InodeStore {
            maps: RwLock::new(Maps::default()),
            next: AtomicU64::new(ROOT_ID + 1),
            budget: AtomicUsize::new((limit / 2).clamp(MIN_FD_BUDGET, MAX_FD_BUDGET)),
            mount,
            warned: AtomicBool::new(false),
        };
        let root = Arc::new(InodeData {
            inode: ROOT_ID,
            host: HostRef::Fd(root_fd),
            key: (st.st_dev, st.st_ino),
            file_type: st.st_mode & libc::S_IFMT,
            refcount: AtomicU64::new(1),
        });
        {
            let mut m = store.write();
            m.by_key.insert(root.key, ROOT_ID);
            m.by_id.insert(ROOT_ID, root);
            m.open_fds = 1;
        }
        Ok(store)
    }

    /// The most node descriptors kept open (half the soft `RLIMIT_NOFILE`,
    /// at most 65536, by default).
    pub fn fd_budget(&self) -> usize {
        self.budget.load(Ordering::Relaxed)
    }

    /// Changes the descriptor budget for nodes looked up from now on.
    pub fn set_fd_budget(&self, budget: usize) {
        self.budget.store(budget.max(1), Ordering::Relaxed);
    }

    /// Whether nodes beyond the budget can be kept as file handles.
    pub fn handles_supported(&self) -> bool {
        self.mount.is_some()
    }

    /// How many nodes hold an open descriptor, root included.
    pub fn open_fds(&self) -> usize {
        self.read().open_fds
    }

    /// How many nodes are reached by parent and name.
    pub fn named(&self) -> usize {
        self.read().named
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

    /// The node `inode` with a usable descriptor (`EBADF` if not held,
    /// `ESTALE` if its host inode is gone).
    pub fn node(&self, inode: u64) -> io::Result<Node> {
        let data = self
            .get(inode)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EBADF))?;
        let reopened = match &data.host {
            HostRef::Fd(_) => None,
            HostRef::Handle(h) => Some(self.open_handle(h)?),
            HostRef::Name(at) => {
                let (parent, name, identity) = {
                    let at = at.lock().unwrap_or_else(|p| p.into_inner());
                    (at.parent.clone(), at.name.clone(), at.identity)
                };
                // Only non-directories are named, so the parent is not.
                let opened;
                let dir = match &parent.host {
                    HostRef::Fd(fd) => fd.as_raw_fd(),
                    HostRef::Handle(h) => {
                        opened = self.open_handle(h)?;
                        opened.as_raw_fd()
                    }
                    HostRef::Name(_) => return Err(io::Error::from_raw_os_error(libc::EIO)),
                };
                let fd = sys::openat2(
                    dir,
                    &name,
                    libc::O_PATH | libc::O_NOFOLLOW,
                    libc::RESOLVE_BENEATH | libc::RESOLVE_NO_MAGICLINKS,
                )
                .map_err(stale_if_gone)?;
                if sys::identity_fd(fd.as_raw_fd())? != identity {
                    return Err(io::Error::from_raw_os_error(libc::ESTALE));
                }
                Some(fd)
            }
        };
        Ok(Node { data, reopened })
    }

    fn open_handle(&self, h: &FileHandle) -> io::Result<OwnedFd> {
        let m = self
            .mount
            .as_ref()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EIO))?;
        sys::open_by_handle(m.fd.as_raw_fd(), h, libc::O_PATH | libc::O_NOFOLLOW)
    }

    /// Records one more lookup of the host inode described by `st`, opened
    /// as `fd` and found as `name` in `parent` where known; returns the
    /// (possibly pre-existing) node.
    pub fn add_lookup(
        &self,
        fd: OwnedFd,
        st: &libc::stat64,
        at: Option<(&Arc<InodeData>, &CStr)>,
    ) -> Arc<InodeData> {
        let key = (st.st_dev, st.st_ino);
        let mut m = self.write();
        if let Some(existing) = m.by_key.get(&key).and_then(|id| m.by_id.get(id)) {
            if existing.is_same_inode(&fd) {
                existing.refcount.fetch_add(1, Ordering::Relaxed);
                return existing.clone();
            }
            // The host replaced a file the node reached by handle or name,
            // and the new one got the old inode number: the old node stays
            // (stale) until the guest forgets it; the new file gets its own.
            m.by_key.remove(&key);
        }
        let host = if m.open_fds < self.fd_budget() {
            HostRef::Fd(fd)
        } else {
            let dir = st.st_mode & libc::S_IFMT == libc::S_IFDIR;
            self.handle_for(fd, at.filter(|_| !dir))
        };
        match host {
            HostRef::Fd(_) => m.open_fds += 1,
            HostRef::Name(_) => m.named += 1,
            HostRef::Handle(_) => {}
        }
        let inode = self.next.fetch_add(1, Ordering::Relaxed);
        let data = Arc::new(InodeData {
            inode,
            host,
            key,
            file_type: st.st_mode & libc::S_IFMT,
            refcount: AtomicU64::new(1),
        });
        m.by_key.insert(key, inode);
        m.by_id.insert(inode, data.clone());
        data
    }

    /// A file handle for `fd` (closing it); else the name `at`, when given
    /// (a non-directory); else `fd` itself.
    fn handle_for(&self, fd: OwnedFd, at: Option<(&Arc<InodeData>, &CStr)>) -> HostRef {
        let why = match (&self.mount, sys::name_to_handle(fd.as_raw_fd())) {
            (Some(m), Ok((h, id))) if id == m.id => return HostRef::Handle(h),
            (None, _) => "file handles are unavailable".to_string(),
            (Some(_), Ok(_)) => "a node lies on another mount".to_string(),
            (Some(_), Err(e)) => format!("name_to_handle_at failed: {e}"),
        };
        // Only non-directories are named, so `parent` never is.
        if let Some((parent, name)) = at {
            if let Ok(identity) = sys::identity_fd(fd.as_raw_fd()) {
                return HostRef::Name(Mutex::new(NameRef {
                    parent: parent.clone(),
                    name: name.to_owned(),
                    identity,
                }));
            }
        }
        if !self.warned.swap(true, Ordering::Relaxed) {
            log::warn!(
                "over the descriptor budget of {} and {why}: keeping directory descriptors open",
                self.fd_budget()
            );
        }
        HostRef::Fd(fd)
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
            match data.host {
                HostRef::Fd(_) => m.open_fds -= 1,
                HostRef::Name(_) => m.named -= 1,
                HostRef::Handle(_) => {}
            }
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
        m.open_fds = 1;
        m.named = 0;
    }

    /// After a rename through the daemon: the node of the inode now at
    /// `name` in `parent`, if reached by name, is recorded there.
    pub fn moved(&self, parent: &Arc<InodeData>, name: &CStr, st: &libc::stat64) {
        if self.read().named == 0 {
            return;
        }
        let Some(data) = self.get_by_key((st.st_dev, st.st_ino)) else {
            return;
        };
        if let HostRef::Name(at) = &data.host {
            let mut at = at.lock().unwrap_or_else(|p| p.into_inner());
            at.parent = parent.clone();
            at.name = name.to_owned();
        }
    }

    fn get_by_key(&self, key: InodeKey) -> Option<Arc<InodeData>> {
        let m = self.read();
        m.by_key.get(&key).and_then(|id| m.by_id.get(id)).cloned()
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

/// The error of re-opening a node by its name: `ESTALE` when the name no
/// longer leads to a file of ours (removed, or replaced by a symlink);
/// anything else (`EMFILE`, `ENOMEM`, `EACCES`) as the host said it, since
/// the file is still there and the request may succeed later.
fn stale_if_gone(e: io::Error) -> io::Error {
    match e.raw_os_error() {
        Some(libc::ENOENT | libc::ENOTDIR | libc::ELOOP | libc::EXDEV) | None => {
            io::Error::from_raw_os_error(libc::ESTALE)
        }
        Some(_) => e,
    }
}

/// Checks that file handles of the shared directory's mount can be made and
/// re-opened here; returns that mount.
fn probe_handles(root_fd: &OwnedFd) -> io::Result<Mount> {
    let fd = sys::openat(
        root_fd.as_raw_fd(),
        c".",
        libc::O_RDONLY | libc::O_DIRECTORY,
        0,
    )?;
    let (handle, id) = sys::name_to_handle(root_fd.as_raw_fd())?;
    sys::open_by_handle(fd.as_raw_fd(), &handle, libc::O_PATH)?;
    Ok(Mount { fd, id })
}
