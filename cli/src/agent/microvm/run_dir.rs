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

use std::path::Path;

use super::engine::Layout;
use crate::agent::fsutil;

/// Makes the sandbox's folder (which holds the agent's vsock socket, the
/// clone and the `.env` copies), the run folder and the workspace
/// daemon's socket folder this user's alone, mode 0700: `start` creates
/// the first so, and this takes back any an older version left open.
pub fn prepare(layout: &Layout) -> std::io::Result<()> {
    let sandbox = layout.vsock.parent().map(Path::to_path_buf);
    for dir in sandbox
        .into_iter()
        .chain([layout.run.clone(), layout.workspace_run()])
    {
        fsutil::private_dir(&dir)
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", dir.display())))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    use super::*;
    use crate::agent::microvm::engine::GUEST_UID;
    use crate::agent::registry::SandboxStore;

    #[test]
    fn the_run_folder_is_this_users_alone() {
        let dir = std::env::temp_dir().join(format!("ks-run-dir-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let layout = Layout::new(&SandboxStore::at(&dir).paths("t"));
        let me = rustix::process::geteuid().as_raw();
        let sandbox = layout.vsock.parent().unwrap().to_path_buf();
        let check = |layout: &Layout| {
            for d in [&sandbox, &layout.run, &layout.workspace_run()] {
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
        // A sandbox folder an older version left to the umask, and a socket
        // folder it gave to the guest user.
        std::fs::set_permissions(&sandbox, std::fs::Permissions::from_mode(0o755)).unwrap();
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
