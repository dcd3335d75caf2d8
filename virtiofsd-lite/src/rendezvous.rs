//! A private vhost-user connection for the in-process VMM.
//!
//! `vhost-user-backend`'s `VhostUserDaemon` only accepts connections from a
//! `Listener` (or connects to a path), so [`spawn_paired`](crate::spawn_paired)
//! binds a listener in a fresh private (0700) temporary directory, connects
//! to it and removes the path at once: the connection is pending before any
//! other process could find the path, and nobody can connect after.

use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicU64, Ordering};

/// A listener with exactly one pending connection, and that connection's
/// other end.
pub(crate) fn private_listener() -> io::Result<(UnixListener, UnixStream)> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let dir = std::env::temp_dir().join(format!(
        "virtiofsd-lite-{}-{}-{}",
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
