//! virtiofsd-lite: FUSE over vhost-user, serving one host directory to a
//! virtio-fs guest, confined to that directory.
//!
//! Layers (crosvm/virtiofsd shape): [`fuse`] wire structs, the
//! [`FileSystem`] trait, the generic [`Server`] that decodes and dispatches,
//! [`PassthroughFs`] that serves a host directory, and the vhost-user-fs
//! backend ([`vhost_user::FsBackend`]). Two front doors:
//! - [`serve_listener`]: listen on a Unix socket path and serve one
//!   frontend connection until it disconnects (the binary);
//! - [`spawn_paired`]: serve the in-process VMM on background threads,
//!   returning the frontend's end of a private connection.
//!
//! Both are `vhost-door`'s, shared with the vsock daemon.

pub mod config;
pub mod descriptor;
mod error;
pub mod filesystem;
pub mod fuse;
pub mod idmap;
pub mod passthrough;
pub mod sandbox;
pub mod server;
mod stats;
pub mod vhost_user;

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;

use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

pub use config::{CacheMode, FileHandles, FsConfig};
pub use error::Error;
pub use filesystem::FileSystem;
pub use idmap::{IdMap, IdMaps, IdRule};
pub use passthrough::PassthroughFs;
pub use server::Server;
pub use stats::{FsStats, MAX_PATHS_READ};

/// Request queues offered besides the high-priority queue.
pub const REQUEST_QUEUES: usize = 1;

type Daemon = VhostUserDaemon<Arc<vhost_user::FsBackend<PassthroughFs>>>;

fn new_daemon(config: &FsConfig) -> Result<(Daemon, Arc<FsStats>), Error> {
    new_daemon_with(PassthroughFs::new(config)?, config)
}

fn new_daemon_with(fs: PassthroughFs, config: &FsConfig) -> Result<(Daemon, Arc<FsStats>), Error> {
    let server = Arc::new(Server::new(fs).with_id_maps(config.ids.clone()));
    let stats = server.stats();
    let backend = Arc::new(vhost_user::FsBackend::new(server, REQUEST_QUEUES));
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::<()>::new());
    let daemon = VhostUserDaemon::new("virtiofsd-lite".to_string(), backend, mem)
        .map_err(|e| Error::Daemon(e.to_string()))?;
    log::info!(
        "serving {} (tag {:?}, cache {:?})",
        config.shared_dir.display(),
        config.tag,
        config.cache
    );
    Ok((daemon, stats))
}

/// Raises this process's soft `RLIMIT_NOFILE` to its hard limit and
/// returns the new soft limit. The node descriptor budget of a daemon
/// created afterwards is half of it, so an embedder serving large trees
/// calls this first (the `virtiofsd-lite` binary does).
pub fn raise_fd_limit() -> u64 {
    passthrough::sys::raise_nofile_limit()
}

/// Listens on `socket_path` (replacing a stale socket file), serves one
/// vhost-user frontend connection until it disconnects, then returns.
pub fn serve_listener(socket_path: &Path, config: FsConfig) -> Result<(), Error> {
    let (daemon, _stats) = new_daemon(&config)?;
    Ok(vhost_door::serve_listener(daemon, socket_path)?)
}

/// [`serve_listener`] inside the namespace sandbox (the binary's
/// `--sandbox namespace`): the caller has run
/// [`sandbox::enter_namespaces`] and is PID 1 of the new namespaces. The
/// socket, the shared directory and `/proc/self/fd` are opened first, then
/// the mount namespace is pivoted into the shared directory.
pub fn serve_listener_sandboxed(socket_path: &Path, config: FsConfig) -> Result<(), Error> {
    let listener = vhost_door::listen(socket_path)?;
    let fs = PassthroughFs::new(&config)?;
    sandbox::pivot_into(&config.shared_dir)?;
    let (daemon, _stats) = new_daemon_with(fs, &config)?;
    Ok(vhost_door::serve_on(daemon, listener)?)
}

/// A daemon serving a connected stream on background threads.
pub struct FsDaemonHandle {
    stats: Arc<FsStats>,
    daemon: vhost_door::PairedDaemon,
}

impl FsDaemonHandle {
    /// The request counters of this daemon.
    pub fn stats(&self) -> Arc<FsStats> {
        self.stats.clone()
    }

    /// Waits until the frontend disconnects and the daemon has stopped.
    pub fn join(self) -> Result<(), Error> {
        Ok(self.daemon.join()?)
    }

    /// Disconnects the frontend and waits for the daemon to stop.
    pub fn stop(self) -> Result<(), Error> {
        Ok(self.daemon.stop()?)
    }
}

/// Serves one vhost-user frontend on background threads and returns the
/// frontend's end of a private connection, to hand to the VMM's vhost-user
/// device, with the daemon's handle (see `vhost_door::spawn_paired`).
pub fn spawn_paired(config: FsConfig) -> Result<(UnixStream, FsDaemonHandle), Error> {
    let (daemon, stats) = new_daemon(&config)?;
    let (frontend, daemon) = vhost_door::spawn_paired(daemon, "virtiofsd-lite")?;
    Ok((frontend, FsDaemonHandle { stats, daemon }))
}
