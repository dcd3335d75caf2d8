//! Shared helpers for Keystone's integration tests: what the host can run,
//! loud skips, scratch directories.

pub mod fs_daemon;
pub mod guest_agent;
pub mod pjdfstest;
pub mod qemu;
pub mod rig;

use std::path::{Path, PathBuf};

/// Prints the skip line the test harness and CI count, and returns.
#[macro_export]
macro_rules! skip {
    ($($arg:tt)*) => {{
        println!("SKIP: {}", format!($($arg)*));
        return;
    }};
}

/// Why this host cannot run a KVM guest, if it cannot.
pub fn kvm_unusable() -> Option<String> {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => None,
        Err(e) => Some(format!("/dev/kvm is not usable here ({e})")),
    }
}

/// Why a static busybox is missing, if it is.
pub fn busybox_missing() -> Option<String> {
    let p = Path::new(guest_image::busybox::DEFAULT_BUSYBOX);
    (!p.is_file()).then(|| format!("{} missing (apt-get install busybox-static)", p.display()))
}

/// A scratch directory removed on drop.
pub struct ScratchDir(pub PathBuf);

impl ScratchDir {
    /// Creates `$TMPDIR/keystone-<name>-<pid>-<n>`.
    pub fn new(name: &str) -> Self {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("keystone-{name}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create scratch dir");
        Self(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
