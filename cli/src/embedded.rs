//! The guest agent, embedded at build time (see build.rs), so the host
//! needs only the `keystone` binary and a kernel.

use std::path::{Path, PathBuf};

/// The static guest agent binary.
pub static GUEST_AGENT: &[u8] = include_bytes!(env!("KEYSTONE_AGENT_BIN"));

/// Writes the agent initramfs into `dir` (once per agent build) and returns
/// its path.
pub fn agent_initramfs(dir: &Path) -> std::io::Result<PathBuf> {
    let hash = crate::agent::naming::fnv1a(GUEST_AGENT);
    let path = dir.join(format!("agent-initramfs-{hash:016x}.cpio"));
    if !path.exists() {
        std::fs::create_dir_all(dir)?;
        let tmp = path.with_extension("tmp");
        std::fs::write(
            &tmp,
            guest_image::initramfs::agent_initramfs_bytes(GUEST_AGENT),
        )?;
        std::fs::rename(&tmp, &path)?;
    }
    Ok(path)
}
