//! Tests of the plans: every VMM gets the same command line and size,
//! and each boot the devices and files it needs.

use super::*;

fn guest(initrd: Option<&str>) -> Guest {
    Guest {
        kernel: "/k/vmlinux".into(),
        root_dir: "/w/root".into(),
        initrd: initrd.map(PathBuf::from),
        base_cmdline: cmdline::default_base(KvmKind::Hardware),
        vcpus: 2,
        memory_mib: 128,
        timeout_s: 300,
        qemu_cpu: qemu_cpu_for(KvmKind::Hardware).into(),
    }
}

fn vmm(engine: Engine) -> Vmm {
    Vmm {
        key: "x".into(),
        label: "x".into(),
        engine,
        program: "/bin/x".into(),
    }
}

fn strings(p: &Plan) -> Vec<String> {
    p.args
        .iter()
        .map(|s| s.to_string_lossy().into_owned())
        .collect()
}

fn after(a: &[String], flag: &str) -> String {
    a[a.iter().position(|x| x == flag).expect(flag) + 1].clone()
}

#[test]
fn every_vmm_gets_the_same_command_line_and_size() {
    let g = guest(Some("/w/init.cpio"));
    let w = Path::new("/w");
    let ours = plan(&vmm(Engine::Keystone), &g, &Boot::Marker, w, "k").unwrap();
    let qemu = plan(&vmm(Engine::Qemu(Accel::Kvm)), &g, &Boot::Marker, w, "q").unwrap();
    let fc = plan(&vmm(Engine::Firecracker), &g, &Boot::Marker, w, "f").unwrap();
    let ch = plan(&vmm(Engine::CloudHypervisor), &g, &Boot::Marker, w, "c").unwrap();
    for p in [&qemu, &fc, &ch] {
        assert_eq!(p.cmdline, ours.cmdline);
        assert!(p.cmdline.ends_with("rdinit=/init"), "{}", p.cmdline);
    }
    let k = strings(&ours);
    assert_eq!(after(&k, "--initrd"), "/w/init.cpio");
    assert_eq!(after(&k, "--vcpus"), "2");
    assert!(k.contains(&"--no-host-cmdline".to_string()));
    let q = strings(&qemu);
    assert_eq!(after(&q, "-smp"), "2");
    assert_eq!(after(&q, "-cpu"), "host");
    assert_eq!(after(&q, "-initrd"), "/w/init.cpio");
    assert!(!q.iter().any(|a| a.contains("vhost-user-fs")));
    assert!(qemu.fs_socket.is_none());
    let (path, doc) = fc.config_file.as_ref().unwrap();
    assert_eq!(path, Path::new("/w/f.firecracker.json"));
    assert!(doc.contains("\"vcpu_count\":2"), "{doc}");
    assert!(!ch.exits_on_reboot);
}

#[test]
fn virtio_fs_root_needs_a_daemon_and_rules_out_firecracker() {
    let g = guest(None);
    let w = Path::new("/w");
    let q = plan(&vmm(Engine::Qemu(Accel::Kvm)), &g, &Boot::Marker, w, "q").unwrap();
    assert_eq!(q.fs_socket.as_deref(), Some(Path::new("/w/q.fs.sock")));
    assert!(q.cmdline.contains("rootfstype=virtiofs"));
    let ours = plan(&vmm(Engine::Keystone), &g, &Boot::Marker, w, "k").unwrap();
    assert_eq!(after(&strings(&ours), "--root-dir"), "/w/root");
    let e = plan(&vmm(Engine::Firecracker), &g, &Boot::Marker, w, "f").unwrap_err();
    assert!(e.contains("--initrd"), "{e}");
}

#[test]
fn agent_boots_reach_the_agent_over_vsock() {
    let g = guest(None);
    let w = Path::new("/w");
    let initrd = Path::new("/w/cache/agent.cpio");
    let boot = Boot::Agent {
        initrd: Some(initrd),
    };
    let ours = plan(&vmm(Engine::Keystone), &g, &boot, w, "k").unwrap();
    let k = strings(&ours);
    assert!(k.contains(&"--agent".to_string()));
    assert_eq!(after(&k, "--vsock-uds"), "/w/k.vsock");
    assert_eq!(ours.agent_uds.as_deref(), Some(Path::new("/w/k.vsock")));
    let q = plan(&vmm(Engine::Qemu(Accel::Kvm)), &g, &boot, w, "q").unwrap();
    assert!(q.vhost_vsock.is_some() && q.fs_socket.is_some());
    assert!(q.cmdline.ends_with("keystone.root=root"));
    assert_eq!(after(&strings(&q), "-initrd"), "/w/cache/agent.cpio");
    let ch = plan(&vmm(Engine::CloudHypervisor), &g, &boot, w, "c").unwrap();
    assert_eq!(after(&strings(&ch), "--vsock"), "cid=3,socket=/w/c.vsock");
    assert!(plan(&vmm(Engine::Firecracker), &g, &boot, w, "f").is_err());
    let none = Boot::Agent { initrd: None };
    assert!(plan(&vmm(Engine::Qemu(Accel::Kvm)), &g, &none, w, "q").is_err());
}

#[test]
fn tcg_never_asks_for_the_host_cpu() {
    let g = guest(None);
    let q = plan(
        &vmm(Engine::Qemu(Accel::Tcg)),
        &g,
        &Boot::Marker,
        Path::new("/w"),
        "t",
    );
    assert_eq!(after(&strings(&q.unwrap()), "-cpu"), "max");
    assert_eq!(qemu_cpu_for(KvmKind::Pvm), QEMU_CPU_PVM);
}

#[test]
fn quotes_for_display() {
    let s = display(Path::new("/q"), &[os("-append"), os("a b")]);
    assert_eq!(s, "/q -append 'a b'");
}
