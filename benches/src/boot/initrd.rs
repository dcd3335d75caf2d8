//! `--initrd busybox`: an uncompressed initramfs holding the static busybox
//! and an `/init` that does what the virtio-fs root's boot-check init does
//! up to its marker: tell our VMM's boot timer that user space runs, print
//! the user-space marker, and reboot (which ends every VMM but Cloud
//! Hypervisor, which boots the guest again; the harness stops it).

use std::path::{Path, PathBuf};

use guest_image::busybox::BOOT_CHECK_MARKER;
use guest_image::initramfs::Archive;

/// The `/init` of the busybox initramfs. devtmpfs is not mounted for an
/// initramfs, so `/dev/port` (the boot-timer write) needs the mount.
pub fn init_script() -> String {
    format!(
        "#!/bin/busybox sh\n\
         /bin/busybox mount -t devtmpfs dev /dev 2>/dev/null\n\
         printf '\\001' | /bin/busybox dd of=/dev/port bs=1 seek=1088 count=1 2>/dev/null\n\
         echo {BOOT_CHECK_MARKER}\n\
         /bin/busybox reboot -f\n"
    )
}

/// The archive bytes around `busybox` (the binary's contents).
pub fn busybox_initramfs(busybox: &[u8]) -> Vec<u8> {
    let mut a = Archive::new();
    a.dir("bin", 0o755)
        .file("bin/busybox", 0o755, busybox)
        .dir("dev", 0o755)
        .char_dev("dev/console", 0o600, 5, 1)
        .dir("proc", 0o755)
        .dir("sys", 0o755)
        .file("init", 0o755, init_script().as_bytes());
    a.finish()
}

/// Writes the busybox initramfs to `out`, taking busybox from `busybox`
/// (the copy in the benchmark's root directory, already checked to be
/// static).
pub fn write_busybox_initramfs(busybox: &Path, out: &Path) -> anyhow::Result<PathBuf> {
    let bytes = std::fs::read(busybox)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", busybox.display()))?;
    std::fs::write(out, busybox_initramfs(&bytes))
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", out.display()))?;
    Ok(out.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (name, mode, data) of each `newc` member, read back.
    fn members(bytes: &[u8]) -> Vec<(String, u32, Vec<u8>)> {
        let mut out = Vec::new();
        let mut at = 0;
        let hex = |s: &[u8]| u32::from_str_radix(std::str::from_utf8(s).unwrap(), 16).unwrap();
        let up4 = |n: usize| (n + 3) & !3;
        while at + 110 <= bytes.len() {
            let h = &bytes[at..at + 110];
            assert_eq!(&h[..6], b"070701");
            let field = |i: usize| hex(&h[6 + i * 8..14 + i * 8]);
            let (mode, size, namesize) = (field(1), field(6) as usize, field(11) as usize);
            let name_end = at + 110 + namesize - 1;
            let name = String::from_utf8(bytes[at + 110..name_end].to_vec()).unwrap();
            let data_at = up4(at + 110 + namesize);
            if name == "TRAILER!!!" {
                break;
            }
            out.push((name, mode, bytes[data_at..data_at + size].to_vec()));
            at = up4(data_at + size);
        }
        out
    }

    #[test]
    fn archive_has_an_executable_init_that_prints_the_marker() {
        let bytes = busybox_initramfs(b"\x7fELF-not-really");
        let m = members(&bytes);
        let init = m.iter().find(|(n, _, _)| n == "init").expect("init");
        assert_eq!(init.1 & 0o170777, 0o100755);
        let text = String::from_utf8(init.2.clone()).unwrap();
        assert!(text.starts_with("#!/bin/busybox sh\n"));
        assert!(text.contains(&format!("echo {BOOT_CHECK_MARKER}\n")));
        assert!(text.contains("reboot -f"));
        let bb = m
            .iter()
            .find(|(n, _, _)| n == "bin/busybox")
            .expect("busybox");
        assert_eq!(bb.2, b"\x7fELF-not-really");
        let console = m
            .iter()
            .find(|(n, _, _)| n == "dev/console")
            .expect("console");
        assert_eq!(console.1 & 0o170000, 0o020000);
        assert_eq!(bytes.len() % 512, 0);
    }

    #[test]
    fn marker_comes_after_the_dev_mount() {
        let s = init_script();
        let mount = s.find("mount -t devtmpfs").unwrap();
        let port = s.find("/dev/port").unwrap();
        let marker = s.find(BOOT_CHECK_MARKER).unwrap();
        assert!(mount < port && port < marker);
    }
}
