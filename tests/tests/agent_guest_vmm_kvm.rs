//! The guest agent on our VMM on this host's KVM, one boot with several
//! checks: the agent comes up as PID 1 from its initramfs on the real
//! Debian rootfs (virtiofsd-lite, read-only, under a tmpfs overlay), tells
//! the boot timer it is ready, answers exec over our virtio-vsock device,
//! sees /workspace through a second virtiofsd-lite both ways, a host
//! `git fetch` through the guest's `git upload-pack` raw stream brings over
//! a commit from the workspace, and its shutdown ends the VM with a reset.
//!
//! On a trap-and-emulate KVM (see shared/KVM-HERE.md) the guest kernel runs
//! 50-100 times slower than normal: the boot takes minutes, hence one boot
//! and a 600 s budget.

use std::fs;
use std::sync::Arc;
use std::time::{Duration, Instant};

use guest_image::rootfs::{ensure_rootfs, RootfsError};
use keystone_tests::guest_agent::{self, fetch_from_guest, host_git, step, wait_for_agent};
use keystone_tests::{guest_lock, kvm_unusable, last_lines, skip, ScratchDir};
use virtiofsd_lite::FsConfig;
use vmm::{BootEvent, VmBuilder, VmExitReason};

/// Everything, boot included, must fit in this.
const TOTAL: Duration = Duration::from_secs(600);
const STEP: Duration = Duration::from_secs(300);

/// The `ext::` helper of the git fetch (this binary, re-run); a no-op test
/// otherwise.
#[test]
fn shim_entry() {
    guest_agent::upload_pack_shim();
}

/// Prints the end of the guest console when the test fails.
struct ConsoleOnPanic(Arc<vmm::ConsoleLog>);

impl Drop for ConsoleOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let tail = last_lines(&self.0.contents(), 60);
            eprintln!("guest console tail:\n{tail}");
        }
    }
}

#[test]
fn agent_over_vsock_on_our_vmm() {
    if let Some(reason) = kvm_unusable() {
        skip!("{reason}");
    }
    let t0 = Instant::now();
    let rootfs = match ensure_rootfs() {
        Ok(r) => r,
        Err(e @ RootfsError::Unavailable) => skip!("{e}"),
        Err(e) => panic!("guest rootfs: {e}"),
    };
    let kernel = guest_image::kernel::ensure_kernel().expect("guest kernel");
    let _guest = guest_lock();
    let scratch = ScratchDir::new("agent-vmm");
    let initrd = guest_agent::agent_initramfs(scratch.path()).expect("agent initramfs");
    let t_prep = t0.elapsed();

    let ws = scratch.path().join("workspace");
    fs::create_dir_all(&ws).unwrap();
    fs::write(ws.join("from-host.txt"), "written by the host\n").unwrap();

    let (root_vmm, _root_fs) = virtiofsd_lite::spawn_paired(FsConfig {
        readonly: true,
        ..FsConfig::new(&rootfs.dir, "root")
    })
    .expect("virtiofsd-lite for the root");
    let (ws_vmm, ws_fs) = virtiofsd_lite::spawn_paired(FsConfig::new(&ws, "workspace"))
        .expect("virtiofsd-lite for the workspace");

    let uds = scratch.path().join("vsock.sock");
    let builder = VmBuilder::new(&kernel.vmlinux)
        .cmdline(
            "console=ttyS0 earlyprintk=ttyS0 keystone.root=root keystone.workspace=workspace \
             keystone.hostname=ks-agent-vmm",
        )
        .initrd(&initrd)
        .vcpus(1)
        .memory_mib(256)
        .vhost_user_fs(root_vmm, "root")
        .vhost_user_fs(ws_vmm, "workspace");
    let (vsock_stream, _vsock) = vsock_lite::spawn_paired(vsock_lite::VsockConfig {
        guest_cid: guest_agent::GUEST_CID,
        uds_path: uds.clone(),
    })
    .expect("vsock backend");
    let builder = builder.vhost_user_vsock(vsock_stream, guest_agent::GUEST_CID, &uds);
    let t_start = Instant::now();
    let vm = builder.start().expect("start the VM");
    eprintln!(
        "VM: KVM {}, template {:?}, cmdline {}",
        vm.info().kvm_kind.name(),
        vm.info().cpu_template,
        vm.info().cmdline
    );

    let client = Arc::new(guest_agent::client(&uds));
    let console = vm.console();
    let _dump = ConsoleOnPanic(console.clone());
    let waited = wait_for_agent(&client, TOTAL - Duration::from_secs(120), || {
        match vm.exit_reason() {
            Some(r) => Err(format!("the VM stopped ({r}) before the agent answered")),
            None => Ok(()),
        }
    });
    let (version, waited, tries) = waited.unwrap_or_else(|e| {
        let tail = last_lines(&console.contents(), 60);
        panic!("{e}\nconsole tail:\n{tail}")
    });
    let t_agent = t_start.elapsed();
    eprintln!("agent {version} answered {waited:?} after VM start ({tries} refused tries)");
    assert_eq!(version, env!("CARGO_PKG_VERSION"));
    let c = client.clone();
    let pings = step("ping", Duration::from_secs(60), move || {
        guest_agent::ping_times(&c, 5)
    });
    eprintln!("ping round trips over vsock: {pings:?}");
    let remaining = || TOTAL.saturating_sub(t_start.elapsed()).min(STEP);

    // One exec for several checks: each guest process costs seconds here.
    let c = client.clone();
    let ws2 = ws.clone();
    step("exec-and-workspace", remaining(), move || {
        let out = c
            .exec_output(&[
                "sh",
                "-c",
                "uname -r; cat /proc/sys/kernel/hostname /workspace/from-host.txt; \
                 echo 'written by the guest' > /workspace/from-guest.txt; exit 7",
            ])
            .expect("exec in the guest");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code, Some(7), "{text}{err}");
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines.len() == 3 && lines[0].starts_with("6.12"),
            "{text:?} {err}"
        );
        assert_eq!(&lines[1..], ["ks-agent-vmm", "written by the host"]);
        assert_eq!(
            fs::read_to_string(ws2.join("from-guest.txt")).unwrap(),
            "written by the guest\n"
        );
    });

    // The repository is committed on the host, in the workspace (a guest
    // `git init` + `commit` costs minutes here; the QEMU suite covers it);
    // the host fetches it back through the guest's `git upload-pack`.
    let ws_repo = ws.join("repo");
    fs::create_dir_all(&ws_repo).unwrap();
    host_git(&ws_repo, scratch.path(), &["init", "-q", "-b", "main"]);
    fs::write(ws_repo.join("README"), "served by the guest\n").unwrap();
    host_git(&ws_repo, scratch.path(), &["add", "README"]);
    host_git(
        &ws_repo,
        scratch.path(),
        &[
            "-c",
            "user.name=Host",
            "-c",
            "user.email=host@keystone.invalid",
            "commit",
            "-q",
            "-m",
            "workspace commit",
        ],
    );
    let head = host_git(&ws_repo, scratch.path(), &["rev-parse", "HEAD"]);

    let host_repo = scratch.path().join("host-repo");
    fs::create_dir_all(&host_repo).unwrap();
    host_git(&host_repo, scratch.path(), &["init", "-q"]);
    let (u, hr, sp) = (uds.clone(), host_repo.clone(), scratch.path().to_path_buf());
    step("git-fetch", remaining(), move || {
        fetch_from_guest(
            &u,
            "/workspace/repo",
            &hr,
            "main:refs/remotes/sandbox/main",
            "shim_entry",
            &sp,
        )
        .unwrap();
    });
    assert_eq!(
        host_git(
            &host_repo,
            scratch.path(),
            &["rev-parse", "refs/remotes/sandbox/main"]
        ),
        head
    );
    assert_eq!(
        host_git(
            &host_repo,
            scratch.path(),
            &["show", "refs/remotes/sandbox/main:README"]
        ),
        "served by the guest"
    );

    let c = client.clone();
    step("shutdown", remaining(), move || {
        c.shutdown(false).expect("shutdown")
    });
    let reason = vm.wait_timeout(remaining().max(Duration::from_secs(30)));
    let timeline = vm.timeline();
    let text = console.contents();
    drop(vm);
    let tail = last_lines(&text, 40);
    assert_eq!(
        reason,
        Some(VmExitReason::Reset),
        "the agent's shutdown did not end the VM cleanly:\n{tail}"
    );
    assert!(
        text.contains("keystone-guest-agent"),
        "no agent log on the console:\n{tail}"
    );
    let read = ws_fs.stats().paths_read();
    assert!(
        read.iter().any(|p| p.ends_with("from-host.txt")),
        "virtiofsd-lite did not serve the workspace read; it read {read:?}"
    );
    assert!(
        timeline.get(BootEvent::AgentReady).is_some(),
        "the agent never signalled the boot timer"
    );
    for (from, to) in [
        (BootEvent::VmmStart, BootEvent::KernelStart),
        (BootEvent::KernelStart, BootEvent::InitExec),
        (BootEvent::InitExec, BootEvent::AgentReady),
        (BootEvent::VmmStart, BootEvent::AgentReady),
        (BootEvent::VmmStart, BootEvent::Exit),
    ] {
        if let Some(ms) = timeline.millis_between(from, to) {
            eprintln!("boot stage {} -> {}: {ms:.1} ms", from.name(), to.name());
        }
    }
    eprintln!(
        "timings: prepare {t_prep:?}, VM start to agent answering {t_agent:?}, \
         VM total {:?}, test total {:?}",
        t_start.elapsed(),
        t0.elapsed()
    );
}
