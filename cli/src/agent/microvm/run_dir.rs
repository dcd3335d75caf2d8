//! The sandbox's run folder: the vhost-user sockets of QEMU's devices, the
//! console socket, QEMU's pid file and the port forwards. Whoever can
//! write in it can stand in for the sandbox's devices, or name a pid for
//! `stop` to kill, so it belongs to the supervisor's user alone (0700),
//! and so does the workspace daemon's socket folder in it.
//!
//! That folder was once given to the guest user (uid 1000), whose file
//! system ids the workspace daemon's threads then took for good. The
//! daemon now binds its socket as the supervisor's user and acts as the
//! guest's caller per request only (`CallerCreds` in virtiofsd-lite), so
//! no other user needs it; [`prepare`] takes back a folder an older
//! version gave away.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use super::engine::Layout;

/// Creates the run folder and the workspace daemon's socket folder,
/// owned by this user, mode 0700.
pub fn prepare(layout: &Layout) -> Result<(), String> {
    for dir in [layout.run.clone(), layout.workspace_run()] {
        own(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    Ok(())
}

fn own(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let meta = std::fs::symlink_metadata(dir)?;
    if !meta.is_dir() {
        return Err(std::io::Error::other(
            "is not a folder; remove it and start again",
        ));
    }
    // SAFETY: geteuid and getegid have no preconditions.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    if meta.uid() != uid || meta.gid() != gid {
        std::os::unix::fs::lchown(dir, Some(uid), Some(gid))?;
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::microvm::engine::GUEST_UID;
    use crate::agent::registry::SandboxStore;

    #[test]
    fn the_run_folder_is_this_users_alone() {
        let dir = std::env::temp_dir().join(format!("ks-run-dir-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let layout = Layout::new(&SandboxStore::at(&dir).paths("t"));
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        let check = |layout: &Layout| {
            for d in [&layout.run, &layout.workspace_run()] {
                let meta = std::fs::metadata(d).unwrap();
                assert_eq!(
                    meta.uid(),
                    me,
                    "{} belongs to uid {}",
                    d.display(),
                    meta.uid()
                );
                assert_eq!(meta.mode() & 0o777, 0o700, "{}", d.display());
            }
        };
        prepare(&layout).unwrap();
        check(&layout);
        // A socket folder an older version gave to the guest user.
        std::fs::set_permissions(
            layout.workspace_run(),
            std::fs::Permissions::from_mode(0o777),
        )
        .unwrap();
        if me == 0 {
            std::os::unix::fs::chown(layout.workspace_run(), Some(GUEST_UID), Some(GUEST_UID))
                .unwrap();
        }
        prepare(&layout).unwrap();
        check(&layout);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
