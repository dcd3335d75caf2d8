//! `keystone-benches boot`: boots the same kernel, command line, vCPUs and
//! memory with our VMM and its peers on the same KVM (QEMU's microvm
//! machine always, Firecracker, Cloud Hypervisor or another QEMU with
//! `--peer`), one after the other in each run, and reports per VMM and run:
//! - setup: exec to first KVM_RUN, measured the same way for all under
//!   strace in a separate short run (`strace.rs`); for ours also the VMM's
//!   own first_kvm_run stamp minus the harness's spawn time (no strace);
//! - kernel_start / init_exec / userspace: ms from the spawn to the first
//!   serial byte, the "Run /init" line and the init's marker line, as the
//!   harness reads the console (`console.rs`), with the busybox root on
//!   virtio-fs or, with `--initrd`, a busybox initramfs (`initrd.rs`);
//! - agent ready: a second boot with the guest agent as PID 1, to its
//!   first answer over vsock (`agent.rs`), where the VMM can carry it;
//! - the VMM's RSS without guest RAM, sampled at the milestone (`procmem.rs`);
//! - for ours, its exits by device and kind with their handling time, as
//!   its timings JSON has them (`exits.rs`);
//! - how it exited and the wall time (`session.rs`).
//!
//! If QEMU cannot boot with KVM here, that is recorded and QEMU with TCG
//! runs as the fallback peer (labelled as such). `--rig` runs all of it
//! inside a hardware-style KVM (`rig.rs`).

mod agent;
mod child;
mod cmdline;
mod console;
mod exits;
#[cfg(test)]
mod fake_peers;
mod fsd;
mod host;
mod initrd;
mod launch;
mod peers;
mod procmem;
mod report;
mod rig;
mod runs;
mod session;
mod setup;
mod sides;
mod strace;

use std::path::{Path, PathBuf};

use clap::Args;

use peers::Peer;

#[derive(Args, Debug, Clone)]
pub struct BootArgs {
    /// Boots per VMM.
    #[arg(long, default_value_t = 1)]
    runs: u32,
    /// vCPUs of every guest.
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// Guest memory in MiB (every VMM).
    #[arg(long, default_value_t = 128)]
    memory: u64,
    /// The base kernel command line given to every VMM (the root words and
    /// each VMM's device entries are added); default: what `keystone vm
    /// run` builds on this host's kind of KVM.
    #[arg(long)]
    cmdline: Option<String>,
    /// Boot an initramfs instead of the virtio-fs root, with every VMM:
    /// `busybox` builds one whose /init prints the marker, or a path to
    /// one whose /init prints KEYSTONE-USERSPACE-OK.
    #[arg(long, value_name = "busybox|PATH")]
    initrd: Option<String>,
    /// A further VMM as a column: firecracker=PATH, cloud-hypervisor=PATH
    /// or qemu=PATH (repeatable).
    #[arg(long, value_name = "NAME=PATH", value_parser = peers::parse_peer)]
    peer: Vec<Peer>,
    /// Skip the agent boots.
    #[arg(long)]
    no_agent: bool,
    /// Run the whole benchmark inside the rig's L1 guest (hardware-style
    /// KVM under QEMU TCG with AMD SVM) and print the JSON from there.
    #[arg(long)]
    rig: bool,
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
    /// QEMU's -cpu model; auto: host on hardware KVM, a qemu64 variant
    /// tuned to our CPUID template on kvm_pvm.
    #[arg(long, default_value = "auto")]
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

fn measure_here(args: &BootArgs, work: &Path) -> anyhow::Result<serde_json::Value> {
    let t = setup::tools(args)?;
    let (g, source) = setup::guest(args, &t, work)?;
    let vmms = setup::columns(args, &t);
    setup::check_columns(&vmms, &g, work)?;
    let strace = setup::find_in_path("strace");
    let ctx = launch::Ctx {
        guest: &g,
        work,
        virtiofsd: &t.virtiofsd,
        strace: strace.as_deref(),
    };
    let cols = runs::all(&ctx, &vmms, args.runs, !args.no_agent, args.tcg)?;
    let set = report::Setting {
        guest: &g,
        runs: args.runs,
        with_agent: !args.no_agent,
        cmdline_source: source,
        initrd_source: args.initrd.as_deref(),
    };
    Ok(report::document(&set, cols))
}

/// Runs the benchmark and prints the report.
pub fn run(args: BootArgs) -> anyhow::Result<()> {
    if args.runs == 0 {
        anyhow::bail!("--runs must be at least 1");
    }
    if args.vcpus == 0 {
        anyhow::bail!("--vcpus must be at least 1");
    }
    let doc = if args.rig {
        let out = "/tmp/keystone-bench.json";
        let argv = rig::argv(&args, &setup::tools(&args)?, out)?;
        let boots_per_run = 3 * (2 + args.peer.len() as u32);
        let size = rig::size_for(
            args.vcpus,
            args.runs,
            boots_per_run,
            std::time::Duration::from_secs(args.timeout),
        );
        rig::run(&argv, out, &size)?
    } else {
        if !Path::new("/dev/kvm").exists() {
            anyhow::bail!("/dev/kvm not found: this benchmark needs KVM (or --rig)");
        }
        let work = std::env::temp_dir().join(format!("keystone-bench-{}", std::process::id()));
        std::fs::create_dir_all(&work)
            .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", work.display()))?;
        let result = measure_here(&args, &work);
        if args.keep {
            eprintln!("keystone-benches: work folder kept: {}", work.display());
        } else {
            let _ = std::fs::remove_dir_all(&work);
        }
        result?
    };
    report::print_table(&doc);
    let text = serde_json::to_string_pretty(&doc)?;
    println!("{text}");
    if let Some(out) = &args.out {
        std::fs::write(out, format!("{text}\n"))
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", out.display()))?;
    }
    Ok(())
}
