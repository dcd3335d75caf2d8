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
    /// The vhost-user daemon could not be created.
    #[error("vhost-user daemon failed: {0}")]
    Daemon(String),
    /// Serving the frontend failed (listening, pairing, or the daemon's run).
    #[error(transparent)]
    Door(#[from] vhost_door::DoorError),
    /// A step of `--sandbox namespace` failed.
    #[error(
        "cannot set up the namespace sandbox ({step}): {source}; run as root or use --sandbox none"
    )]
    Sandbox {
        step: &'static str,
        source: io::Error,
    },
}
