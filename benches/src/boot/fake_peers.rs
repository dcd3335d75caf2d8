//! The run path with stand-ins for the peers: shell scripts that check the
//! arguments and files a real Firecracker or Cloud Hypervisor would get,
//! then print what a booting guest prints. No KVM is needed; the strace
//! probe finds no KVM_RUN and says so.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::launch::Ctx;
use super::runs;
use super::sides::{Engine, Guest, Vmm};

/// A Firecracker stand-in: needs `--no-api --config-file FILE` with the
/// kernel, initramfs and boot arguments in FILE; prints the kernel's
/// command line from FILE, then the milestones, and exits 0 soon after (a
/// guest reboot ends Firecracker).
const FAKE_FIRECRACKER: &str = r#"#!/bin/sh
[ "$1" = --no-api ] && [ "$2" = --config-file ] || { echo "bad arguments: $*" >&2; exit 2; }
grep -q '"initrd_path":"[^"]*init.cpio"' "$3" || { echo "no initrd_path in $3" >&2; exit 3; }
grep -q '"mem_size_mib":96' "$3" || { echo "no mem_size_mib in $3" >&2; exit 4; }
echo "Linux version 6.12 (stand-in)"
echo "Kernel command line: $(sed -n 's/.*"boot_args":"\([^"]*\)".*/\1/p' "$3")"
echo "Run /init as init process"
echo KEYSTONE-USERSPACE-OK
sleep 0.3
exit 0
"#;

/// A Cloud Hypervisor stand-in: prints the milestones, then keeps running
/// as Cloud Hypervisor does when the guest reboots (for longer than the
/// harness waits, not so long that the strace probe drags).
const FAKE_CLOUD_HYPERVISOR: &str = r#"#!/bin/sh
case "$*" in *"--initramfs "*"--serial tty --console off"*) ;; *) echo "bad arguments: $*" >&2; exit 2;; esac
echo "Run /init as init process"
echo KEYSTONE-USERSPACE-OK
exec sleep 4
"#;

fn script(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

#[test]
fn peers_run_through_the_whole_measuring_path() {
    let dir = std::env::temp_dir().join(format!("ks-bench-fake-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("vmlinux"), b"kernel").unwrap();
    std::fs::write(dir.join("init.cpio"), b"initramfs").unwrap();
    let g = Guest {
        kernel: dir.join("vmlinux"),
        root_dir: dir.join("root"),
        initrd: Some(dir.join("init.cpio")),
        base_cmdline: "console=ttyS0 reboot=k".into(),
        vcpus: 1,
        memory_mib: 96,
        timeout_s: 20,
        qemu_cpu: "host".into(),
    };
    let vmms = [
        Vmm {
            key: "firecracker".into(),
            label: "fc".into(),
            engine: Engine::Firecracker,
            program: script(&dir, "firecracker", FAKE_FIRECRACKER),
        },
        Vmm {
            key: "cloud-hypervisor".into(),
            label: "ch".into(),
            engine: Engine::CloudHypervisor,
            program: script(&dir, "cloud-hypervisor", FAKE_CLOUD_HYPERVISOR),
        },
    ];
    let strace = ["/usr/bin/strace", "/bin/strace"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file());
    let ctx = Ctx {
        guest: &g,
        work: &dir,
        virtiofsd: Path::new("/nonexistent"),
        strace: strace.as_deref(),
    };
    let cols = runs::all(&ctx, &vmms, 1, true, false).expect("runs");
    let _ = std::fs::remove_dir_all(&dir);

    let fc = &cols[0].1[0];
    assert!(fc["error"].is_null(), "{fc:#}");
    assert_eq!(fc["exit"]["clean"], true, "{fc:#}");
    assert_eq!(fc["exit"]["stopped_at_milestone"], false);
    let (init, marker) = (fc["init_exec_ms"].as_f64(), fc["userspace_ms"].as_f64());
    assert!(
        init.is_some() && marker.is_some() && init <= marker,
        "{fc:#}"
    );
    assert_eq!(
        fc["kernel_cmdline_seen"],
        "console=ttyS0 reboot=k rdinit=/init"
    );
    assert_eq!(fc["cmdline_given"], fc["kernel_cmdline_seen"]);
    assert!(
        fc["memory"]["vmm_rss_kib"].as_u64().is_some_and(|k| k > 0),
        "{fc:#}"
    );
    assert!(fc["agent_ready_ms"].is_null());
    assert!(fc["agent"]["skipped"]
        .as_str()
        .unwrap()
        .contains("virtio-fs"));
    if strace.is_some() {
        let why = fc["setup"]["strace_error"].as_str().unwrap_or_default();
        assert!(why.contains("before any KVM_RUN"), "{fc:#}");
    }

    let ch = &cols[1].1[0];
    assert!(ch["error"].is_null(), "{ch:#}");
    assert_eq!(ch["exit"]["stopped_at_milestone"], true, "{ch:#}");
    assert_eq!(ch["exit"]["clean"], true);
    assert!(ch["exit"]["wall_ms"].as_f64().unwrap() < 3_000.0, "{ch:#}");
    assert!(ch["agent"]["skipped"]
        .as_str()
        .unwrap()
        .contains("agent initramfs"));
}
