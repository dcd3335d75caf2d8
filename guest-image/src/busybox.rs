//! A minimal root directory made of Debian's static busybox and an
//! `/init`, served to the guest over virtio-fs (`rootfstype=virtiofs`).
//!
//! Two inits:
//! - [`InitKind::Shell`]: mounts /proc, /sys and /dev, signals user space to
//!   the VMM's boot timer and gives the console a shell; `exit` reboots.
//! - [`InitKind::BootCheck`]: the boot test's init: signals the boot timer,
//!   prints [`BOOT_CHECK_MARKER`], reads [`BOOT_CHECK_FILE`] back through
//!   virtio-fs and prints it between markers, then reboots (which the VMM
//!   sees as a clean exit through the i8042).

use std::fs;
use std::io;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};

/// Where Debian's busybox-static puts the binary.
pub const DEFAULT_BUSYBOX: &str = "/bin/busybox";
/// The line the boot-check init prints first.
pub const BOOT_CHECK_MARKER: &str = "KEYSTONE-USERSPACE-OK";
/// The file the boot-check init reads back (relative to the root).
pub const BOOT_CHECK_FILE: &str = "etc/keystone-boot-check";

/// Which `/init` to install.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitKind {
    Shell,
    BootCheck,
}

/// Errors laying out the root.
#[derive(Debug, thiserror::Error)]
pub enum RootError {
    #[error("{0} not found; install it with: apt-get install busybox-static")]
    NoBusybox(PathBuf),
    #[error("{0} is not a static busybox (it must run with no libraries in the guest); install busybox-static")]
    NotStatic(PathBuf),
    #[error("cannot write the root directory {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// A root directory for the guest.
pub struct BusyboxRoot {
    pub dir: PathBuf,
}

const BOOT_TIMER_WRITE: &str =
    "printf '\\001' | /bin/busybox dd of=/dev/port bs=1 seek=1088 count=1 2>/dev/null";

fn init_script(kind: InitKind, check_token: &str) -> String {
    match kind {
        InitKind::Shell => format!(
            "#!/bin/busybox sh\n\
             /bin/busybox mount -t proc proc /proc\n\
             /bin/busybox mount -t sysfs sysfs /sys\n\
             {BOOT_TIMER_WRITE}\n\
             echo 'keystone: guest shell; exit or Ctrl-D reboots the VM'\n\
             /bin/busybox setsid /bin/busybox cttyhack /bin/sh -l\n\
             /bin/busybox reboot -f\n"
        ),
        InitKind::BootCheck => format!(
            "#!/bin/busybox sh\n\
             {BOOT_TIMER_WRITE}\n\
             echo {BOOT_CHECK_MARKER}\n\
             echo \"readback:$(/bin/busybox cat /{BOOT_CHECK_FILE}):end\"\n\
             /bin/busybox reboot -f\n\
             # token {check_token}\n"
        ),
    }
}

fn is_static_elf(bytes: &[u8]) -> bool {
    // A dynamically linked ELF has a PT_INTERP program header.
    if bytes.len() < 64 || &bytes[..4] != b"\x7fELF" || bytes[4] != 2 {
        return false;
    }
    let u16_at = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(bytes[32..40].try_into().unwrap_or([0; 8])) as usize;
    let (phentsize, phnum) = (u16_at(54), u16_at(56));
    (0..phnum).all(|i| {
        let o = phoff + i * phentsize;
        bytes
            .get(o..o + 4)
            .map(|t| u32::from_le_bytes([t[0], t[1], t[2], t[3]]) != 3)
            .unwrap_or(false)
    })
}

impl BusyboxRoot {
    /// Lays out `dir` with busybox from `busybox` and the given init. For
    /// [`InitKind::BootCheck`], `check_token` is written to
    /// [`BOOT_CHECK_FILE`] so the test can see it come back.
    pub fn create(
        dir: &Path,
        busybox: &Path,
        kind: InitKind,
        check_token: &str,
    ) -> Result<Self, RootError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| RootError::Io { path, source }
        };
        let bytes = fs::read(busybox).map_err(|_| RootError::NoBusybox(busybox.to_path_buf()))?;
        if !is_static_elf(&bytes) {
            return Err(RootError::NotStatic(busybox.to_path_buf()));
        }
        for sub in ["bin", "dev", "proc", "sys", "tmp", "etc", "root"] {
            fs::create_dir_all(dir.join(sub)).map_err(io(&dir.join(sub)))?;
        }
        let bb = dir.join("bin/busybox");
        fs::write(&bb, &bytes).map_err(io(&bb))?;
        fs::set_permissions(&bb, fs::Permissions::from_mode(0o755)).map_err(io(&bb))?;
        for applet in [
            "sh", "ls", "cat", "echo", "mount", "dd", "reboot", "poweroff", "uname", "ps",
        ] {
            let link = dir.join("bin").join(applet);
            let _ = fs::remove_file(&link);
            symlink("busybox", &link).map_err(io(&link))?;
        }
        let init = dir.join("init");
        fs::write(&init, init_script(kind, check_token)).map_err(io(&init))?;
        fs::set_permissions(&init, fs::Permissions::from_mode(0o755)).map_err(io(&init))?;
        let check = dir.join(BOOT_CHECK_FILE);
        fs::write(&check, check_token).map_err(io(&check))?;
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_check_init_prints_marker_reads_file_and_reboots() {
        let s = init_script(InitKind::BootCheck, "tok123");
        assert!(s.starts_with("#!/bin/busybox sh\n"));
        assert!(s.contains(BOOT_CHECK_MARKER));
        assert!(s.contains(&format!("cat /{BOOT_CHECK_FILE}")));
        assert!(s.contains("seek=1088"), "boot timer port 0x440");
        assert!(s.contains("reboot -f"));
    }

    #[test]
    fn static_elf_detection() {
        assert!(!is_static_elf(b"#!/bin/sh\n"));
        if let Ok(bytes) = fs::read("/bin/ls") {
            assert!(
                !is_static_elf(&bytes),
                "/bin/ls is dynamically linked on Debian"
            );
        }
    }

    #[test]
    fn refuses_a_missing_busybox() {
        let dir = std::env::temp_dir().join(format!("bbroot-{}", std::process::id()));
        let err = BusyboxRoot::create(&dir, Path::new("/nonexistent/busybox"), InitKind::Shell, "");
        assert!(matches!(err, Err(RootError::NoBusybox(_))));
        let _ = fs::remove_dir_all(&dir);
    }
}
