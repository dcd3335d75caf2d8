//! Boots our guest kernel with our VMM on this host's KVM, with the root
//! file system on virtio-fs served by virtiofsd-lite in this process, into
//! user space, and checks what a user would: the kernel came up, probed the
//! virtio-fs device and mounted root from it, the daemon served the read of
//! `/init`, `/init` ran (marker on the serial port, a file read back through
//! virtio-fs), and the guest's reboot ended the VM cleanly. The CPUID
//! template and host-specific command line come from detection.
//!
//! One boot, many checks: on a trap-and-emulate KVM this boot takes a minute
//! or more of emulated kernel time.

use std::path::Path;
use std::time::Duration;

use guest_image::busybox::{BusyboxRoot, InitKind, BOOT_CHECK_MARKER, DEFAULT_BUSYBOX};
use keystone_tests::{busybox_missing, guest_lock, kvm_unusable, last_lines, skip, ScratchDir};
use vmm::{BootEvent, VmBuilder, VmExitReason};

const BOOT_TIMEOUT: Duration = Duration::from_secs(420);

#[test]
fn boots_to_userspace_on_a_virtiofs_root() {
    if let Some(reason) = kvm_unusable() {
        skip!("{reason}");
    }
    if let Some(reason) = busybox_missing() {
        skip!("{reason}");
    }
    let kernel = guest_image::kernel::ensure_kernel().expect("guest kernel");
    let host = vmm::host::kvm_facts().expect("open /dev/kvm");
    let _guest = guest_lock();

    let root = ScratchDir::new("vmm-boot-root");
    let token = format!("token-{}", std::process::id());
    BusyboxRoot::create(
        root.path(),
        Path::new(DEFAULT_BUSYBOX),
        InitKind::BootCheck,
        &token,
    )
    .expect("lay out the root directory");

    let (vmm_end, daemon) =
        virtiofsd_lite::spawn_paired(virtiofsd_lite::FsConfig::new(root.path(), "root"))
            .expect("start virtiofsd-lite");

    let vm = VmBuilder::new(&kernel.vmlinux)
        .cmdline("console=ttyS0 earlyprintk=ttyS0 root=root rootfstype=virtiofs rw init=/init")
        .vcpus(2)
        .memory_mib(128)
        .vhost_user_fs(vmm_end, "root")
        .start()
        .expect("start the VM");

    let info = vm.info().clone();
    assert_eq!(
        info.cpu_template, host.template,
        "template follows detection"
    );
    if host.kind == vmm::KvmKind::Pvm {
        assert!(info.cmdline.contains("syscall_via_idt"), "{}", info.cmdline);
    } else {
        assert!(
            !info.cmdline.contains("syscall_via_idt"),
            "{}",
            info.cmdline
        );
    }
    assert!(
        info.cmdline.contains("virtio_mmio.device=4K@0xd0000000:5"),
        "{}",
        info.cmdline
    );

    let reason = vm.wait_timeout(BOOT_TIMEOUT);
    let console = vm.console().contents();
    let timeline = vm.timeline();
    drop(vm);
    let reason = reason.unwrap_or_else(|| {
        panic!("the VM did not stop within {BOOT_TIMEOUT:?}; console:\n{console}")
    });

    let tail = last_lines(&console, 40);
    assert!(
        console.contains("Linux version 6.12"),
        "kernel banner missing:\n{tail}"
    );
    assert!(
        console.contains("smp: Brought up 1 node, 2 CPUs"),
        "SMP bring-up missing:\n{tail}"
    );
    assert!(
        console.contains("VFS: Mounted root (virtiofs filesystem)"),
        "root not mounted from virtio-fs:\n{tail}"
    );
    assert!(
        console.contains("Run /init as init process"),
        "init not started:\n{tail}"
    );
    assert!(
        console.contains(BOOT_CHECK_MARKER),
        "user-space marker missing:\n{tail}"
    );
    assert!(
        console.contains(&format!("readback:{token}:end")),
        "file not read back through virtio-fs:\n{tail}"
    );
    assert_eq!(
        reason,
        VmExitReason::Reset,
        "the guest's reboot is a clean exit:\n{tail}"
    );

    let read = daemon.stats().paths_read();
    assert!(
        read.iter().any(|p| p == Path::new("init")),
        "virtiofsd-lite did not serve a READ of /init; it read {read:?}"
    );

    for (from, to) in [
        (BootEvent::VmmStart, BootEvent::FirstKvmRun),
        (BootEvent::FirstKvmRun, BootEvent::KernelStart),
        (BootEvent::KernelStart, BootEvent::InitExec),
        (BootEvent::InitExec, BootEvent::Userspace),
        (BootEvent::VmmStart, BootEvent::Exit),
    ] {
        let ms = timeline.millis_between(from, to);
        assert!(
            ms.is_some(),
            "{} -> {} was not recorded",
            from.name(),
            to.name()
        );
        println!(
            "boot stage {} -> {}: {:.1} ms",
            from.name(),
            to.name(),
            ms.unwrap_or(0.0)
        );
    }
}
