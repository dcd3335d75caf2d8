//! `FsConfig`: what to share and how, shared by both front doors and the
//! binary.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

/// How long the guest may cache names, attributes and file data.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CacheMode {
    /// No caching: timeouts 0 and direct I/O (for directories changed on the host).
    Never,
    /// Short timeouts (1 s); page cache kept until a change is noticed.
    #[default]
    Auto,
    /// Long timeouts (one day) and kept page cache (the guest owns the tree).
    Always,
}

impl CacheMode {
    /// The entry and attribute timeout for this mode.
    pub fn timeout(self) -> Duration {
        match self {
            CacheMode::Never => Duration::ZERO,
            CacheMode::Auto => Duration::from_secs(1),
            CacheMode::Always => Duration::from_secs(86400),
        }
    }
}

impl FromStr for CacheMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "never" | "none" => Ok(CacheMode::Never),
            "auto" => Ok(CacheMode::Auto),
            "always" => Ok(CacheMode::Always),
            other => Err(format!(
                "unknown cache mode {other:?}: use never, auto or always"
            )),
        }
    }
}

/// When nodes past the descriptor budget use kernel file handles
/// (virtiofsd's `--inode-file-handles`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FileHandles {
    /// Never: nodes past the budget are re-opened by their parent and name.
    Never,
    /// Where the file system and our capabilities allow; by name elsewhere.
    #[default]
    Prefer,
    /// Always: the daemon refuses to start where handles do not work.
    Mandatory,
}

impl FromStr for FileHandles {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "never" => Ok(FileHandles::Never),
            "prefer" | "fallback" => Ok(FileHandles::Prefer),
            "mandatory" => Ok(FileHandles::Mandatory),
            other => Err(format!(
                "unknown file handle mode {other:?}: use never, prefer or mandatory"
            )),
        }
    }
}

/// Configuration of one daemon instance.
#[derive(Clone, Debug)]
pub struct FsConfig {
    /// The host directory served to the guest; nothing outside it is reachable.
    pub shared_dir: PathBuf,
    /// The virtio-fs tag (kept for logs; the frontend owns the config space).
    pub tag: String,
    /// Guest caching policy.
    pub cache: CacheMode,
    /// Offer `FUSE_WRITEBACK_CACHE` to the guest.
    pub writeback: bool,
    /// Keep setuid/setgid bits on create and chmod (stripped by default).
    pub allow_setuid: bool,
    /// Accepted for virtiofsd compatibility but not used yet: requests are
    /// served on one worker thread for all queues, without a separate pool.
    pub thread_pool_size: usize,
    /// Serve the directory read-only: every modifying request (and opening
    /// a file for writing) is answered `EROFS`, as virtiofsd's `--readonly`.
    pub readonly: bool,
    /// UID/GID translation between guest and host (identity by default).
    pub ids: crate::idmap::IdMaps,
    /// Whether nodes past the descriptor budget use file handles.
    pub file_handles: FileHandles,
}

impl FsConfig {
    /// Defaults for serving `shared_dir` under `tag`.
    pub fn new(shared_dir: impl Into<PathBuf>, tag: impl Into<String>) -> Self {
        FsConfig {
            shared_dir: shared_dir.into(),
            tag: tag.into(),
            cache: CacheMode::Auto,
            writeback: false,
            allow_setuid: false,
            thread_pool_size: 0,
            readonly: false,
            ids: crate::idmap::IdMaps::default(),
            file_handles: FileHandles::Prefer,
        }
    }
}
