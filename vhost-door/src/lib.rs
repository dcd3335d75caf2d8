//! The front doors of a vhost-user backend daemon, shared by
//! `virtiofsd-lite` and `vsock-lite`. A daemon (`VhostUserDaemon`, built
//! by the caller around its backend) is served one of two ways:
//!
//! - [`serve_listener`]: listen on a Unix socket path (replacing a stale
//!   socket file) and serve one frontend until it disconnects, as QEMU's
//!   `-chardev socket,...` needs;
//! - [`spawn_paired`]: serve on background threads and hand back the
//!   frontend's end of a private connection, for a VMM in the same
//!   process. `VhostUserDaemon` only accepts connections from a listener,
//!   so the pair is made through one in a fresh private (0700) directory
//!   whose path is removed as soon as the connection is pending
//!   ([`private_listener`]): no other process can reach the daemon, and
//!   the two ends then talk directly, with nothing relaying them.

use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;

use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::bitmap::BitmapReplace;
use vhost_user_backend::{ShutdownHandle, VhostUserBackend, VhostUserDaemon};
use vm_memory::mmap::NewBitmap;

/// Why a front door could not serve.
#[derive(Debug, thiserror::Error)]
pub enum DoorError {
    /// The socket path for [`serve_listener`] is unusable.
    #[error("cannot listen on vhost-user socket {path}: {reason}; check that its directory exists and is writable")]
    Listen { path: PathBuf, reason: String },
    /// The private connection of [`spawn_paired`] could not be made.
    #[error("cannot set up the in-process vhost-user connection: {0}; check that the temporary directory is writable")]
    Connect(io::Error),
    /// The daemon could not start, or ended with an error other than the
    /// frontend going away.
    #[error("vhost-user daemon failed: {0}")]
    Daemon(String),
    /// The daemon's thread could not be started.
    #[error("cannot start the daemon's thread: {0}")]
    Spawn(io::Error),
    /// The daemon's thread panicked.
    #[error("the daemon's thread panicked; this is a bug, please report it with the log")]
    Panicked,
}

/// Whether a daemon error only says that the frontend went away.
pub fn is_disconnect(e: &vhost_user_backend::Error) -> bool {
    matches!(
        e,
        vhost_user_backend::Error::HandleRequest(
            VhostUserError::Disconnected
                | VhostUserError::PartialMessage
                | VhostUserError::SocketBroken(_)
        )
    )
}

/// Ends a daemon's vring worker threads.
pub fn stop_workers<T>(daemon: &VhostUserDaemon<T>)
where
    T: VhostUserBackend + Clone + 'static,
    T::Bitmap: BitmapReplace + NewBitmap + Clone + Send + Sync,
    T::Vring: Clone + Send + Sync,
{
    for h in daemon.get_epoll_handlers() {
        h.send_exit_event();
    }
}

/// Waits for `daemon`'s frontend to go away, ends its workers and says how
/// it ended (a disconnect is a clean end).
fn run_to_end<T>(mut daemon: VhostUserDaemon<T>) -> Result<(), DoorError>
where
    T: VhostUserBackend + Clone + 'static,
    T::Bitmap: BitmapReplace + NewBitmap + Clone + Send + Sync,
    T::Vring: Clone + Send + Sync,
{
    let result = daemon.wait();
    stop_workers(&daemon);
    daemon.request_shutdown();
    match result {
        Err(e) if !is_disconnect(&e) => Err(DoorError::Daemon(e.to_string())),
        _ => Ok(()),
    }
}

/// Binds the vhost-user socket at `socket_path`, replacing a stale
/// socket file.
pub fn listen(socket_path: &Path) -> Result<Listener, DoorError> {
    Listener::new(socket_path, true).map_err(|e| DoorError::Listen {
        path: socket_path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// Listens on `socket_path` (replacing a stale socket file), serves one
/// frontend connection until it disconnects, then returns.
pub fn serve_listener<T>(daemon: VhostUserDaemon<T>, socket_path: &Path) -> Result<(), DoorError>
where
    T: VhostUserBackend + Clone + 'static,
    T::Bitmap: BitmapReplace + NewBitmap + Clone + Send + Sync,
    T::Vring: Clone + Send + Sync,
{
    serve_on(daemon, listen(socket_path)?)
}

/// [`serve_listener`] on a listener bound earlier (a daemon that confines
/// itself binds first, then drops its view of the host's paths).
pub fn serve_on<T>(mut daemon: VhostUserDaemon<T>, mut listener: Listener) -> Result<(), DoorError>
where
    T: VhostUserBackend + Clone + 'static,
    T::Bitmap: BitmapReplace + NewBitmap + Clone + Send + Sync,
    T::Vring: Clone + Send + Sync,
{
    daemon
        .start(&mut listener)
        .map_err(|e| DoorError::Daemon(e.to_string()))?;
    run_to_end(daemon)
}

/// A listener with exactly one pending connection, and that connection's
/// other end (see the crate documentation).
pub fn private_listener() -> io::Result<(UnixListener, UnixStream)> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let dir = std::env::temp_dir().join(format!(
        "vhost-door-{}-{}-{}",
        std::process::id(),
        nanos,
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    let path = dir.join("s");
    let result = (|| {
        let listener = UnixListener::bind(&path)?;
        let client = UnixStream::connect(&path)?;
        Ok((listener, client))
    })();
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_dir(&dir);
    result
}

/// A daemon served by [`spawn_paired`]: [`PairedDaemon::join`] waits for
/// the frontend to go, [`PairedDaemon::stop`] (or dropping it)
/// disconnects it first.
pub struct PairedDaemon {
    shutdown: ShutdownHandle,
    thread: Option<JoinHandle<Result<(), DoorError>>>,
}

impl PairedDaemon {
    /// Waits until the frontend disconnects and the daemon has stopped.
    pub fn join(mut self) -> Result<(), DoorError> {
        self.join_inner()
    }

    /// Disconnects the frontend and waits for the daemon to stop.
    pub fn stop(mut self) -> Result<(), DoorError> {
        self.shutdown.shutdown();
        self.join_inner()
    }

    fn join_inner(&mut self) -> Result<(), DoorError> {
        match self.thread.take() {
            Some(t) => t.join().map_err(|_| DoorError::Panicked)?,
            None => Ok(()),
        }
    }
}

impl Drop for PairedDaemon {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.shutdown.shutdown();
        }
    }
}

/// Serves one frontend on a background thread named `name` and returns the
/// frontend's end of the private connection (to hand to the VMM's
/// vhost-user device) with the daemon.
pub fn spawn_paired<T>(
    mut daemon: VhostUserDaemon<T>,
    name: &str,
) -> Result<(UnixStream, PairedDaemon), DoorError>
where
    T: VhostUserBackend + Clone + Send + 'static,
    T::Bitmap: BitmapReplace + NewBitmap + Clone + Send + Sync,
    T::Vring: Clone + Send + Sync,
{
    let (listener, frontend) = private_listener().map_err(DoorError::Connect)?;
    let mut listener = Listener::from(listener);
    daemon
        .start(&mut listener)
        .map_err(|e| DoorError::Daemon(e.to_string()))?;
    drop(listener);
    let shutdown = daemon
        .shutdown_handle()
        .ok_or_else(|| DoorError::Daemon("no connection after start".into()))?;
    let thread = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || run_to_end(daemon))
        .map_err(DoorError::Spawn)?;
    Ok((
        frontend,
        PairedDaemon {
            shutdown,
            thread: Some(thread),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn the_private_listener_path_is_gone_once_paired() {
        let (listener, mut client) = private_listener().unwrap();
        let addr = listener.local_addr().unwrap();
        let path = addr.as_pathname().unwrap().to_path_buf();
        assert!(!path.exists(), "{} is still there", path.display());
        assert!(!path.parent().unwrap().exists());
        let (mut server, _) = listener.accept().unwrap();
        client.write_all(b"x").unwrap();
        let mut b = [0u8; 1];
        server.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"x");
        assert!(
            UnixStream::connect(&path).is_err(),
            "nobody else can connect"
        );
    }
}
