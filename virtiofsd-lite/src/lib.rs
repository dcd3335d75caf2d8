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

pub mod config;
pub mod descriptor;
mod error;
pub mod filesystem;
pub mod fuse;
pub mod idmap;
pub mod log_limit;
pub mod passthrough;
mod rendezvous;
pub mod sandbox;
pub mod server;
mod stats;
pub mod vhost_user;

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;

use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
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

/// Whether a daemon error only says that the frontend went away.
fn is_disconnect(e: &vhost_user_backend::Error) -> bool {
    matches!(
        e,
        vhost_user_backend::Error::HandleRequest(
            VhostUserError::Disconnected
                | VhostUserError::PartialMessage
                | VhostUserError::SocketBroken(_)
        )
    )
}

fn stop_workers(daemon: &Daemon) {
    for h in daemon.get_epoll_handlers() {
        h.send_exit_event();
    }
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
    let listener = listen(socket_path)?;
    serve_daemon(daemon, listener)
}

/// Binds the vhost-user socket at `socket_path` (replacing a stale file).
fn listen(socket_path: &Path) -> Result<Listener, Error> {
    Listener::new(socket_path, true).map_err(|e| Error::Listen {
        path: socket_path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// [`serve_listener`] inside the namespace sandbox (the binary's
/// `--sandbox namespace`): the caller has run
/// [`sandbox::enter_namespaces`] and is PID 1 of the new namespaces. The
/// socket, the shared directory and `/proc/self/fd` are opened first, then
/// the mount namespace is pivoted into the shared directory.
pub fn serve_listener_sandboxed(socket_path: &Path, config: FsConfig) -> Result<(), Error> {
    let listener = listen(socket_path)?;
    let fs = PassthroughFs::new(&config)?;
    sandbox::pivot_into(&config.shared_dir)?;
    let (daemon, _stats) = new_daemon_with(fs, &config)?;
    serve_daemon(daemon, listener)
}

fn serve_daemon(mut daemon: Daemon, mut listener: Listener) -> Result<(), Error> {
    daemon
        .start(&mut listener)
        .map_err(|e| Error::Daemon(e.to_string()))?;
    let result = daemon.wait();
    stop_workers(&daemon);
    match result {
        Err(e) if !is_disconnect(&e) => Err(Error::Daemon(e.to_string())),
        _ => Ok(()),
    }
}

/// A daemon serving a connected stream on background threads.
pub struct FsDaemonHandle {
    stats: Arc<FsStats>,
    shutdown: ShutdownHandle,
    thread: Option<JoinHandle<Result<(), Error>>>,
}

impl FsDaemonHandle {
    /// The request counters of this daemon.
    pub fn stats(&self) -> Arc<FsStats> {
        self.stats.clone()
    }

    /// Waits until the frontend disconnects and the daemon has stopped.
    pub fn join(mut self) -> Result<(), Error> {
        self.join_inner()
    }

    /// Disconnects the frontend and waits for the daemon to stop.
    pub fn stop(mut self) -> Result<(), Error> {
        self.shutdown.shutdown();
        self.join_inner()
    }

    fn join_inner(&mut self) -> Result<(), Error> {
        match self.thread.take() {
            Some(t) => t.join().map_err(|_| Error::Panicked)?,
            None => Ok(()),
        }
    }
}

impl Drop for FsDaemonHandle {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.shutdown.shutdown();
        }
    }
}

/// Serves one vhost-user frontend on background threads and returns the
/// frontend's end of the connection, to hand to the VMM's vhost-user device,
/// with the daemon's handle.
///
/// `VhostUserDaemon` only accepts connections from a listener, so the
/// connection is made through one in a fresh private (0700) temporary
/// directory whose path is removed as soon as the connection is pending
/// (see `rendezvous.rs`): no other process can reach the daemon, and the two
/// ends then talk directly.
pub fn spawn_paired(config: FsConfig) -> Result<(UnixStream, FsDaemonHandle), Error> {
    let (mut daemon, stats) = new_daemon(&config)?;
    let (listener, frontend) = rendezvous::private_listener().map_err(Error::Connect)?;
    let mut listener = Listener::from(listener);
    daemon
        .start(&mut listener)
        .map_err(|e| Error::Daemon(e.to_string()))?;
    drop(listener);
    let shutdown = daemon
        .shutdown_handle()
        .ok_or_else(|| Error::Daemon("no connection after start".into()))?;
    let thread = std::thread::Builder::new()
        .name("virtiofsd-lite".into())
        .spawn(move || {
            let result = daemon.wait();
            stop_workers(&daemon);
            daemon.request_shutdown();
            match result {
                Err(e) if !is_disconnect(&e) => Err(Error::Daemon(e.to_string())),
                _ => Ok(()),
            }
        })
        .map_err(Error::Spawn)?;
    let handle = FsDaemonHandle {
        stats,
        shutdown,
        thread: Some(thread),
    };
    Ok((frontend, handle))
}
