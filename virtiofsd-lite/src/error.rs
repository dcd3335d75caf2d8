//! The crate's error type: what went wrong setting up or running a daemon,
//! phrased so the operator knows what to do next.

use std::io;
use std::path::PathBuf;

/// Errors of `virtiofsd-lite`'s front doors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The shared directory cannot be opened.
    #[error("cannot open shared directory {path}: {source}; check that it exists, is a directory and is readable")]
    SharedDir { path: PathBuf, source: io::Error },
    /// `--inode-file-handles mandatory` where file handles do not work.
    #[error("file handles do not work on {path}: {source}; they need CAP_DAC_READ_SEARCH and a file system that exports them (use --inode-file-handles prefer)")]
    FileHandles { path: PathBuf, source: io::Error },
    /// `/proc/self/fd` cannot be opened.
    #[error("cannot open /proc/self/fd: {0}; virtiofsd-lite needs /proc mounted")]
    ProcFd(io::Error),
    /// The vhost-user daemon could not be created, started or ended badly.
    #[error("vhost-user daemon failed: {0}")]
    Daemon(String),
    /// The socket path for `serve_listener` is unusable.
    #[error("cannot listen on vhost-user socket {path}: {reason}; check that its directory exists and is writable")]
    Listen { path: PathBuf, reason: String },
    /// The in-process connection could not be set up.
    #[error("cannot set up the in-process vhost-user connection: {0}; check that the temporary directory is writable")]
    Connect(io::Error),
    /// A thread could not be spawned.
    #[error("cannot spawn the virtiofsd-lite thread: {0}")]
    Spawn(io::Error),
    /// A step of `--sandbox namespace` failed.
    #[error(
        "cannot set up the namespace sandbox ({step}): {source}; run as root or use --sandbox none"
    )]
    Sandbox {
        step: &'static str,
        source: io::Error,
    },
    /// The daemon thread panicked.
    #[error("the virtiofsd-lite thread panicked; this is a bug, please report it with the log")]
    Panicked,
}
