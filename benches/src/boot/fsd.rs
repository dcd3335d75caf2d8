//! A `virtiofsd-lite` process serving the root directory on a Unix socket,
//! for QEMU's `vhost-user-fs-device` (our VMM serves it in-process). One
//! daemon serves one connection, so each QEMU boot gets a fresh one.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::child::GroupChild;

/// A running daemon; killed when dropped.
pub struct FsDaemon {
    pub child: GroupChild,
    pub socket: PathBuf,
}

impl FsDaemon {
    /// Starts the daemon and waits until its socket exists.
    pub fn start(
        binary: &Path,
        shared_dir: &Path,
        socket: PathBuf,
        log: &Path,
    ) -> anyhow::Result<Self> {
        let _ = std::fs::remove_file(&socket);
        let log_file = std::fs::File::create(log)
            .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", log.display()))?;
        let mut cmd = Command::new(binary);
        cmd.arg("--socket-path")
            .arg(&socket)
            .arg("--shared-dir")
            .arg(shared_dir)
            .arg("--tag")
            .arg("root")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file);
        let mut child = GroupChild::spawn("virtiofsd-lite", &mut cmd)?;
        let end = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            if let Some(status) = child.try_wait()? {
                let err = std::fs::read_to_string(log).unwrap_or_default();
                anyhow::bail!(
                    "virtiofsd-lite exited ({status}) before listening: {}",
                    err.trim()
                );
            }
            if Instant::now() >= end {
                anyhow::bail!(
                    "virtiofsd-lite did not create {} within 10 s",
                    socket.display()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(Self { child, socket })
    }

    /// Lets the daemon exit on its own after the frontend went away (it
    /// stops on disconnect), killing it after a short wait.
    pub fn stop(mut self) {
        if let Ok(None) | Err(_) = self.child.wait_for(Duration::from_secs(3)) {
            self.child.kill();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}
