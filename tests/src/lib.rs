//! Shared helpers for Keystone's integration tests: what the host can run
//! (KVM, busybox), and the guest fixtures in the modules below (QEMU under
//! TCG, the hardware-KVM rig, the guest agent, virtiofsd-lite in a
//! thread). Loud skips, scratch folders, the guest lock, log tails and the
//! checksum come from `keystone-test-kit`, re-exported here.

pub mod fs_daemon;
pub mod guest_agent;
pub mod pjdfstest;
pub mod qemu;
pub mod rig;

pub use keystone_test_kit::{fnv64, guest_lock, last_lines, log_tail, skip, GuestLock, ScratchDir};

use std::path::Path;

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
