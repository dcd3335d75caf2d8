//! The guest agent, embedded at build time (see build.rs), so the host
//! needs only the `keystone` binary and a kernel.

use std::path::{Path, PathBuf};

/// The static guest agent binary.
pub static GUEST_AGENT: &[u8] = include_bytes!(env!("KEYSTONE_AGENT_BIN"));

/// Writes the agent initramfs into `dir` (once per agent build) and returns
/// its path.
pub fn agent_initramfs(dir: &Path) -> std::io::Result<PathBuf> {
    let hash = GUEST_AGENT.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    });
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
