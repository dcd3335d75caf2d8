//! vsock-lite: virtio-vsock (virtio 1.2, section 5.10) as a vhost-user
//! backend daemon with a Firecracker-style "hybrid" Unix-socket host side.
//!
//! The guest driver talks to [`backend::VsockBackend`] through vhost-user
//! (with Keystone's VMM the frontend is its `VhostUserDevice::vsock` in
//! the same process; under QEMU it is `vhost-user-vsock-device`). Host
//! programs reach guest ports through the Unix socket at
//! [`VsockConfig::uds_path`]: connect, write `CONNECT <port>\n`, read
//! `OK <local_port>\n`, then talk. The guest cannot connect to the host:
//! its REQUESTs are answered with RST.
//!
//! Two front doors, `vhost-door`'s, as for virtiofsd-lite:
//! - [`spawn_paired`]: the backend runs on threads of this process; the
//!   caller gets the frontend's end of a private vhost-user connection;
//! - [`serve_listener`]: serve one frontend that connects to a socket path,
//!   blocking until it disconnects (the binary, and QEMU).
//!
//! Files: [`packet`] (wire format), [`connection`] and [`muxer`] (the
//! connection table, pure logic), [`backend`] (queues and events).

pub mod backend;
pub mod connection;
pub mod muxer;
pub mod packet;

use std::io;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use vhost_user_backend::VhostUserDaemon;
use vm_memory::GuestMemoryAtomic;
use vmm_sys_util::epoll::EventSet;

use backend::{VsockBackend, MUXER_EVENT};

/// The guest memory the backend maps.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

/// Size of `struct virtio_vsock_config` (`guest_cid`, le64).
pub const CONFIG_LEN: usize = 8;

/// Builds `struct virtio_vsock_config` for `guest_cid`.
pub fn vsock_config_space(guest_cid: u64) -> Vec<u8> {
    guest_cid.to_le_bytes().to_vec()
}

/// What a vsock backend serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VsockConfig {
    /// The guest's CID (3 to 0xffff_fffe).
    pub guest_cid: u64,
    /// Where host programs connect (`CONNECT <port>\n`); created by the
    /// backend and removed when it stops.
    pub uds_path: PathBuf,
}

/// Errors from starting or running a vsock backend.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("guest CID {0} is reserved; use a CID from 3 to 4294967294")]
    InvalidCid(u64),
    #[error("cannot listen on the vsock host socket {path:?}: {source} (is another sandbox using it, or is a stale socket left there?)")]
    Bind { path: PathBuf, source: io::Error },
    #[error("cannot set up the vsock backend: {0}")]
    Io(#[from] io::Error),
    #[error("vhost-user vsock daemon: {0}")]
    Daemon(String),
    #[error(transparent)]
    Door(#[from] vhost_door::DoorError),
}

type Daemon = VhostUserDaemon<Arc<VsockBackend>>;

fn daemon_err(e: vhost_user_backend::Error) -> VsockError {
    VsockError::Daemon(e.to_string())
}

/// Binds `config.uds_path` and builds a daemon whose vring worker also
/// watches the muxer.
fn new_daemon(config: &VsockConfig) -> Result<Daemon, VsockError> {
    if !(3..=0xffff_fffe).contains(&config.guest_cid) {
        return Err(VsockError::InvalidCid(config.guest_cid));
    }
    let listener = UnixListener::bind(&config.uds_path).map_err(|source| VsockError::Bind {
        path: config.uds_path.clone(),
        source,
    })?;
    let result = (|| {
        let backend = Arc::new(VsockBackend::new(config.guest_cid, listener)?);
        let fd = backend.muxer_fd();
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::default());
        let daemon =
            VhostUserDaemon::new("vhost-user-vsock".into(), backend, mem).map_err(daemon_err)?;
        let handlers = daemon.get_epoll_handlers();
        let worker = handlers
            .first()
            .ok_or_else(|| VsockError::Daemon("no vring worker thread".into()))?;
        worker.register_listener(fd, EventSet::IN, u64::from(MUXER_EVENT))?;
        Ok(daemon)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&config.uds_path);
    }
    result
}

/// Starts a vsock backend on threads of this process and returns the
/// frontend's end of its private vhost-user connection (hand it to the
/// VMM's vsock device) and a handle that stops it (see
/// `vhost_door::spawn_paired`).
pub fn spawn_paired(config: VsockConfig) -> Result<(UnixStream, VsockBackendHandle), VsockError> {
    let daemon = new_daemon(&config)?;
    match vhost_door::spawn_paired(daemon, "vsock-lite") {
        Ok((stream, daemon)) => Ok((
            stream,
            VsockBackendHandle {
                daemon: Some(daemon),
                uds_path: config.uds_path,
            },
        )),
        Err(e) => {
            let _ = std::fs::remove_file(&config.uds_path);
            Err(e.into())
        }
    }
}

/// Serves one vhost-user frontend that connects to `socket_path` (for
/// example QEMU's `-chardev socket,path=...` with
/// `-device vhost-user-vsock-device`), returning when it disconnects.
/// Removes `config.uds_path` before returning.
pub fn serve_listener(socket_path: &Path, config: VsockConfig) -> Result<(), VsockError> {
    let daemon = new_daemon(&config)?;
    let result = vhost_door::serve_listener(daemon, socket_path);
    let _ = std::fs::remove_file(&config.uds_path);
    Ok(result?)
}

/// Owns a backend started by [`spawn_paired`]: [`VsockBackendHandle::stop`]
/// (or dropping it) disconnects the frontend, joins the daemon and worker
/// threads and removes the host socket.
pub struct VsockBackendHandle {
    daemon: Option<vhost_door::PairedDaemon>,
    uds_path: PathBuf,
}

impl VsockBackendHandle {
    /// The host socket path that host programs connect to.
    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    /// Stops the backend and waits for its threads.
    pub fn stop(mut self) -> Result<(), VsockError> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<(), VsockError> {
        let Some(daemon) = self.daemon.take() else {
            return Ok(());
        };
        let result = daemon.stop();
        let _ = std::fs::remove_file(&self.uds_path);
        Ok(result?)
    }
}

impl Drop for VsockBackendHandle {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            log::warn!("vsock backend stopped with an error: {e}");
        }
    }
}

/// A fresh private (0700) directory, for tests that need a socket path
/// nobody else can reach.
#[cfg(test)]
fn private_dir() -> io::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "vsock-lite-test-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    Ok(dir)
}
