//! `keystone-benches boot`: boots the same kernel and busybox root (on
//! virtio-fs) with our VMM and with QEMU microvm on the same KVM, one after
//! the other in each run, and reports per VMM and run:
//! - setup: exec to first KVM_RUN, measured the same way for both under
//!   strace in a separate short run (`strace.rs`); for ours also the VMM's
//!   own first_kvm_run stamp minus the harness's spawn time (no strace);
//! - kernel_start / init_exec / userspace: ms from the spawn to the first
//!   serial byte, the "Run /init" line and the init's marker line, as the
//!   harness reads the console (`console.rs`);
//! - the VMM's RSS without guest RAM, sampled at the marker (`procmem.rs`);
//! - how it exited and the wall time (`session.rs`).
//!
//! If QEMU cannot boot with KVM here, that is recorded and QEMU with TCG
//! runs as the fallback peer (labelled as such).

mod child;
mod console;
mod fsd;
mod procmem;
mod report;
mod runs;
mod session;
mod sides;
mod strace;

use std::path::{Path, PathBuf};

use clap::Args;

use sides::Inputs;

#[derive(Args, Debug)]
pub struct BootArgs {
    /// Boots per VMM.
    #[arg(long, default_value_t = 1)]
    runs: u32,
    /// Guest memory in MiB (both VMMs).
    #[arg(long, default_value_t = 128)]
    memory: u64,
    /// Also write the JSON to this file.
    #[arg(long)]
    out: Option<PathBuf>,
    /// The keystone binary (default: next to this one).
    #[arg(long)]
    keystone: Option<PathBuf>,
    /// The virtiofsd-lite binary for QEMU (default: next to this one).
    #[arg(long)]
    virtiofsd: Option<PathBuf>,
    /// The QEMU binary.
    #[arg(long, default_value = "qemu-system-x86_64")]
    qemu: PathBuf,
    /// QEMU's -cpu model.
    #[arg(long, default_value = sides::QEMU_CPU)]
    qemu_cpu: String,
    /// Guest kernel (vmlinux); default: the cached build of guest-image.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Limit per boot, seconds.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
    /// Also boot QEMU with TCG even when QEMU with KVM works.
    #[arg(long)]
    tcg: bool,
    /// Keep the work folder (logs, traces, root) instead of removing it.
    #[arg(long)]
    keep: bool,
}

fn sibling(name: &str) -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    Some(exe.parent()?.join(name))
}

fn find_in_path(name: &str) -> Option<PathBuf> {
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

fn resolve(args: &BootArgs, work: &Path) -> anyhow::Result<Inputs> {
    let build = "build it with: cargo build -p keystone -p virtiofsd-lite (same target dir), or pass the path";
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
    let root_dir = work.join("root");
    guest_image::busybox::BusyboxRoot::create(
        &root_dir,
        Path::new(guest_image::busybox::DEFAULT_BUSYBOX),
        guest_image::busybox::InitKind::BootCheck,
        "keystone-bench",
    )?;
    Ok(Inputs {
        keystone,
        virtiofsd,
        qemu,
        qemu_cpu: args.qemu_cpu.clone(),
        strace: find_in_path("strace"),
        kernel,
        root_dir,
        memory_mib: args.memory,
        timeout_s: args.timeout,
    })
}

/// Runs the benchmark and prints the report.
pub fn run(args: BootArgs) -> anyhow::Result<()> {
    if args.runs == 0 {
        anyhow::bail!("--runs must be at least 1");
    }
    if !Path::new("/dev/kvm").exists() {
        anyhow::bail!("/dev/kvm not found: this benchmark needs KVM");
    }
    let work = std::env::temp_dir().join(format!("keystone-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", work.display()))?;
    let result = resolve(&args, &work).and_then(|inputs| runs::all(&inputs, &args, &work));
    if args.keep {
        eprintln!("keystone-benches: work folder kept: {}", work.display());
    } else {
        let _ = std::fs::remove_dir_all(&work);
    }
    let doc = result?;
    report::print_table(&doc);
    let text = serde_json::to_string_pretty(&doc)?;
    println!("{text}");
    if let Some(out) = &args.out {
        std::fs::write(out, format!("{text}\n"))
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", out.display()))?;
    }
    Ok(())
}
