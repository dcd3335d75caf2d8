//! What a benchmark run is made of, resolved from the arguments: the
//! binaries, the columns (ours, QEMU, the peers), and the guest every VMM
//! boots (kernel, busybox root, initramfs, command line, size).

use std::path::{Path, PathBuf};

use super::peers::PeerKind;
use super::sides::{self, Accel, Boot, Engine, Guest, Vmm};
use super::{cmdline, host, initrd, runs, BootArgs};

fn sibling(name: &str) -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    Some(exe.parent()?.join(name))
}

pub fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn require_file(what: &str, path: Option<PathBuf>, hint: &str) -> anyhow::Result<PathBuf> {
    match path {
        Some(p) if p.is_file() => Ok(p),
        Some(p) => anyhow::bail!("{what} not found at {}; {hint}", p.display()),
        None => anyhow::bail!("{what} not found; {hint}"),
    }
}

/// The binaries of the built-in columns.
pub struct Tools {
    pub keystone: PathBuf,
    pub virtiofsd: PathBuf,
    pub qemu: PathBuf,
    pub kernel: PathBuf,
}

pub fn tools(args: &BootArgs) -> anyhow::Result<Tools> {
    let build = "build it with: cargo build --release -p keystone -p virtiofsd-lite (same target dir), or pass the path";
    let keystone = require_file(
        "keystone",
        args.keystone.clone().or_else(|| sibling("keystone")),
        build,
    )?;
    let virtiofsd = require_file(
        "virtiofsd-lite",
        args.virtiofsd.clone().or_else(|| sibling("virtiofsd-lite")),
        build,
    )?;
    let qemu_path = if args.qemu.components().count() > 1 {
        Some(args.qemu.clone())
    } else {
        find_in_path(&args.qemu.to_string_lossy())
    };
    let qemu = require_file(
        "QEMU",
        qemu_path,
        "install it with: apt-get install qemu-system-x86",
    )?;
    let kernel = match &args.kernel {
        Some(k) => k.clone(),
        None => guest_image::kernel::ensure_kernel()?.vmlinux,
    };
    let kernel = require_file(
        "the guest kernel",
        Some(kernel),
        "build it with guest-image/kernel/build.sh",
    )?;
    for p in &args.peer {
        require_file(
            &format!("the {} binary", p.name),
            Some(p.program.clone()),
            "give its path as --peer NAME=PATH",
        )?;
    }
    Ok(Tools {
        keystone,
        virtiofsd,
        qemu,
        kernel,
    })
}

/// The columns: ours, QEMU, then the peers in the order given.
pub fn columns(args: &BootArgs, t: &Tools) -> Vec<Vmm> {
    let mut v = vec![
        Vmm {
            key: "keystone".into(),
            label: "keystone vm run (our VMM, KVM)".into(),
            engine: Engine::Keystone,
            program: t.keystone.clone(),
        },
        Vmm {
            key: runs::QEMU_KEY.into(),
            label: "QEMU microvm, -accel kvm".into(),
            engine: Engine::Qemu(Accel::Kvm),
            program: t.qemu.clone(),
        },
    ];
    for p in &args.peer {
        let mut key = p.name.clone();
        let mut n = 2;
        while v.iter().any(|c| c.key == key) {
            key = format!("{}-{n}", p.name);
            n += 1;
        }
        let (engine, label) = match p.kind {
            PeerKind::Firecracker => (Engine::Firecracker, "Firecracker (--no-api --config-file)"),
            PeerKind::CloudHypervisor => (Engine::CloudHypervisor, "Cloud Hypervisor"),
            PeerKind::Qemu => (
                Engine::Qemu(Accel::Kvm),
                "QEMU microvm, -accel kvm (peer binary)",
            ),
        };
        v.push(Vmm {
            key,
            label: label.into(),
            engine,
            program: p.program.clone(),
        });
    }
    v
}

pub fn guest(args: &BootArgs, t: &Tools, work: &Path) -> anyhow::Result<(Guest, &'static str)> {
    let root_dir = work.join("root");
    guest_image::busybox::BusyboxRoot::create(
        &root_dir,
        Path::new(guest_image::busybox::DEFAULT_BUSYBOX),
        guest_image::busybox::InitKind::BootCheck,
        "keystone-bench",
    )?;
    let initrd = match args.initrd.as_deref() {
        None => None,
        Some("busybox") => Some(initrd::write_busybox_initramfs(
            &root_dir.join("bin/busybox"),
            &work.join("busybox-initramfs.cpio"),
        )?),
        Some(path) => Some(require_file(
            "the initramfs",
            Some(PathBuf::from(path)),
            "give a file, or `busybox` to build one",
        )?),
    };
    let kind = host::kvm_kind();
    let (base, source) = match &args.cmdline {
        Some(c) => (c.clone(), "--cmdline"),
        None => (
            cmdline::default_base(kind),
            "default: what keystone vm run builds for this host's kind of KVM",
        ),
    };
    let qemu_cpu = match args.qemu_cpu.as_str() {
        "auto" => sides::qemu_cpu_for(kind).to_string(),
        other => other.to_string(),
    };
    let g = Guest {
        kernel: t.kernel.clone(),
        root_dir,
        initrd,
        base_cmdline: base,
        vcpus: args.vcpus,
        memory_mib: args.memory,
        timeout_s: args.timeout,
        qemu_cpu,
    };
    Ok((g, source))
}

/// Fails early when a column cannot make the marker boot at all.
pub fn check_columns(vmms: &[Vmm], g: &Guest, work: &Path) -> anyhow::Result<()> {
    for v in vmms {
        sides::plan(v, g, &Boot::Marker, work, "check")
            .map_err(|why| anyhow::anyhow!("{}: {why}", v.key))?;
    }
    Ok(())
}
