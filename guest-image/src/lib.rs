//! Guest images for Keystone: the recipes (kernel config fragment and
//! patches, root file system scripts) live in this crate's folder; this
//! library finds or builds their cached outputs.
//!
//! - [`kernel::ensure_kernel`] runs `kernel/build.sh`, which builds the
//!   guest kernel once per recipe hash under
//!   `${XDG_CACHE_HOME:-~/.cache}/keystone/kernel/<hash>/`.
//! - [`busybox::BusyboxRoot`] lays out a minimal root directory (busybox
//!   and an `/init`) that the VMM serves over virtio-fs.
//! - [`initramfs::write_agent_initramfs`] packs the static guest agent as
//!   `/init` of an uncompressed newc initramfs.
//! - [`agents`] reads the lock of the coding agents the root file system
//!   carries (`rootfs/agents.lock`, and its copy beside a built image).

pub mod agents;
pub mod busybox;
pub mod initramfs;
pub mod kernel;
pub mod rootfs;

use std::path::PathBuf;

/// The folder holding this crate's recipes (kernel/, rootfs/).
pub fn recipe_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `${XDG_CACHE_HOME:-$HOME/.cache}/keystone`.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/tmp"))
        .join("keystone")
}
