//! `keystone vm run`: boot a kernel with the serial console on this
//! terminal, optionally with a host directory as the root file system
//! (virtio-fs, served by virtiofsd-lite in this process), and report the
//! boot timeline measured by the VMM.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use vmm::{BootEvent, BootTimeline, CpuTemplate, NestedMode, SerialOutput, VmBuilder};

use crate::exit_code::{self, CodedError};
use crate::terminal::RawMode;

/// Ctrl-A then `x` stops the VM (as in QEMU's console).
const ESCAPE: u8 = 0x01;

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Kernel image: a vmlinux ELF or a bzImage.
    #[arg(long)]
    kernel: PathBuf,
    /// Initramfs to load.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Host directory to serve as the guest's root file system over virtio-fs.
    #[arg(long)]
    root_dir: Option<PathBuf>,
    /// Boot the embedded guest agent as PID 1 (from an initramfs); with
    /// --root-dir it mounts that directory read-only under a tmpfs overlay.
    /// Use with --vsock-uds to reach it.
    #[arg(long, conflicts_with = "initrd")]
    agent: bool,
    /// Kernel command line (console, root and host-specific options are added).
    #[arg(long, default_value = "")]
    cmdline: String,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    memory: u64,
    /// CPUID template: auto (by host detection), host or baseline.
    #[arg(long, default_value = "auto")]
    cpu_template: String,
    /// Nested virtualization: auto, on or off.
    #[arg(long, default_value = "auto")]
    nested: String,
    /// Do not add the options this host's KVM needs to the command line.
    #[arg(long)]
    no_host_cmdline: bool,
    /// Add virtio-vsock (guest CID 3); host programs reach guest port P by
    /// connecting to this Unix socket and writing `CONNECT P\n`.
    #[arg(long)]
    vsock_uds: Option<PathBuf>,
    /// Write the boot timeline and VMM resource use as JSON to this file.
    #[arg(long)]
    timings_json: Option<PathBuf>,
    /// Stop the VM after this many seconds (exit code 3).
    #[arg(long)]
    timeout: Option<u64>,
}

#[derive(Args, Debug)]
pub struct MakeRootArgs {
    /// Directory to create (or refresh).
    dir: PathBuf,
    /// Which /init: `shell` (a console shell) or `boot-check` (prints a
    /// marker, reads a file back, reboots).
    #[arg(long, default_value = "shell")]
    init: String,
    /// The static busybox to copy in.
    #[arg(long, default_value = guest_image::busybox::DEFAULT_BUSYBOX)]
    busybox: PathBuf,
}

/// `keystone vm make-root`.
pub fn make_root(args: MakeRootArgs) -> anyhow::Result<i32> {
    use guest_image::busybox::{BusyboxRoot, InitKind, RootError};
    let kind = match args.init.as_str() {
        "shell" => InitKind::Shell,
        "boot-check" => InitKind::BootCheck,
        other => {
            return Err(CodedError::error(
                exit_code::NOT_FOUND,
                format!("--init takes shell or boot-check, not '{other}'"),
            ))
        }
    };
    match BusyboxRoot::create(&args.dir, &args.busybox, kind, "keystone") {
        Ok(_) => Ok(exit_code::OK),
        Err(e @ (RootError::NoBusybox(_) | RootError::NotStatic(_))) => Err(CodedError::because(
            exit_code::REQUIREMENTS,
            "cannot lay out the busybox root",
            e,
        )),
        Err(e) => Err(e.into()),
    }
}

fn parse_template(s: &str) -> anyhow::Result<Option<CpuTemplate>> {
    if s == "auto" {
        return Ok(None);
    }
    s.parse::<CpuTemplate>()
        .map(Some)
        .map_err(|e| CodedError::error(exit_code::NOT_FOUND, e))
}

fn parse_nested(s: &str) -> anyhow::Result<NestedMode> {
    match s {
        "auto" => Ok(NestedMode::Auto),
        "on" => Ok(NestedMode::On),
        "off" => Ok(NestedMode::Off),
        other => Err(CodedError::error(
            exit_code::NOT_FOUND,
            format!("--nested takes auto, on or off, not '{other}'"),
        )),
    }
}

/// Memory use of this process, guest RAM (shared memfd pages) excluded.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct VmmMemory {
    pub rss_kib: u64,
    pub rss_anon_kib: u64,
    pub rss_file_kib: u64,
    pub rss_shmem_kib: u64,
    /// RSS without shared memory, i.e. without guest RAM.
    pub vmm_rss_kib: u64,
}

/// Reads this process's memory use from /proc/self/status.
pub fn vmm_memory() -> VmmMemory {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let m = VmmMemory {
        rss_kib: field("VmRSS:"),
        rss_anon_kib: field("RssAnon:"),
        rss_file_kib: field("RssFile:"),
        rss_shmem_kib: field("RssShmem:"),
        vmm_rss_kib: 0,
    };
    VmmMemory {
        vmm_rss_kib: m.rss_anon_kib + m.rss_file_kib,
        ..m
    }
}

/// The boot timeline as JSON: absolute CLOCK_MONOTONIC ns per event, and
/// milliseconds since the process started (or since `Vm::start`).
/// The shape of `--timings-json` (bumped when it changes).
pub const TIMINGS_SCHEMA: u32 = 2;

/// The SHA-256 of a file, in hex.
fn file_sha256(path: &std::path::Path) -> std::io::Result<String> {
    use sha2::Digest;
    let mut hasher = sha2::Sha256::new();
    std::io::copy(&mut std::fs::File::open(path)?, &mut hasher)?;
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

pub fn timeline_json(t: &BootTimeline) -> serde_json::Value {
    let origin = t
        .get(BootEvent::ProcessStart)
        .or_else(|| t.get(BootEvent::VmmStart));
    let mut ns = serde_json::Map::new();
    let mut ms = serde_json::Map::new();
    for (event, at) in t.recorded() {
        ns.insert(event.name().into(), at.into());
        if let Some(o) = origin {
            ms.insert(event.name().into(), ((at as f64 - o as f64) / 1e6).into());
        }
    }
    serde_json::json!({ "monotonic_ns": ns, "ms_since_process_start": ms })
}

fn print_timeline(t: &BootTimeline) {
    let origin = t
        .get(BootEvent::ProcessStart)
        .or_else(|| t.get(BootEvent::VmmStart));
    let Some(origin) = origin else { return };
    let parts: Vec<String> = t
        .recorded()
        .into_iter()
        .filter(|(e, _)| *e != BootEvent::ProcessStart)
        .map(|(e, at)| format!("{} {:.1} ms", e.name(), (at as f64 - origin as f64) / 1e6))
        .collect();
    eprintln!(
        "keystone: boot timeline (from process start): {}",
        parts.join(", ")
    );
}

fn forward_stdin(vm: Arc<vmm::VmHandle>, raw: bool) {
    let mut stdin = std::io::stdin();
    let mut buf = [0u8; 64];
    let mut escape = false;
    loop {
        let n = match stdin.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let mut out = Vec::with_capacity(n);
        for &b in &buf[..n] {
            if raw && escape {
                escape = false;
                if b == b'x' {
                    vm.stop();
                    return;
                }
                out.push(ESCAPE);
            }
            if raw && b == ESCAPE {
                escape = true;
                continue;
            }
            out.push(b);
        }
        let mut rest = &out[..];
        while !rest.is_empty() {
            let taken = vm.serial_input(rest);
            rest = &rest[taken..];
            if vm.exit_reason().is_some() {
                return;
            }
            if taken == 0 {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }
}

/// Runs the VM to completion; returns the process exit code.
pub fn run(args: RunArgs, process_start_ns: u64) -> anyhow::Result<i32> {
    if !args.kernel.is_file() {
        return Err(CodedError::error(
            exit_code::NOT_FOUND,
            format!(
                "kernel {} not found; build ours with guest-image/kernel/build.sh",
                args.kernel.display()
            ),
        ));
    }
    let mut cmdline = format!("console=ttyS0 earlyprintk=ttyS0 {}", args.cmdline);
    let mut builder = VmBuilder::new(&args.kernel)
        .vcpus(args.vcpus)
        .memory_mib(args.memory)
        .nested(parse_nested(&args.nested)?)
        .serial(SerialOutput::Stdout);
    if let Some(t) = parse_template(&args.cpu_template)? {
        builder = builder.cpu_template(t);
    }
    if let Some(initrd) = &args.initrd {
        builder = builder.initrd(initrd);
    }
    if args.agent {
        let dir = guest_image::cache_dir().join("agent");
        let initrd = crate::embedded::agent_initramfs(&dir)
            .with_context(|| format!("cannot write the agent initramfs under {}", dir.display()))?;
        builder = builder.initrd(initrd);
    }
    let mut fs_daemon = None;
    if let Some(root) = &args.root_dir {
        if !root.is_dir() {
            return Err(CodedError::error(
                exit_code::NOT_FOUND,
                format!("root directory {} not found", root.display()),
            ));
        }
        let config = virtiofsd_lite::FsConfig::new(root, "root");
        let (vmm_end, daemon) = virtiofsd_lite::spawn_paired(config)
            .context("cannot start virtiofsd-lite for --root-dir")?;
        fs_daemon = Some(daemon);
        builder = builder.vhost_user_fs(vmm_end, "root");
        if args.agent {
            cmdline.push_str(" keystone.root=root");
        } else if !args.cmdline.contains("root=") {
            cmdline.push_str(" root=root rootfstype=virtiofs rw init=/init");
        }
    }
    let mut _vsock = None;
    if let Some(uds) = &args.vsock_uds {
        let (stream, handle) = vsock_lite::spawn_paired(vsock_lite::VsockConfig {
            guest_cid: 3,
            uds_path: uds.clone(),
        })
        .with_context(|| format!("cannot start the vsock backend on {}", uds.display()))?;
        builder = builder.vhost_user_vsock(stream, 3, uds);
        _vsock = Some(handle);
    }
    let mut config = builder.cmdline(cmdline).into_config();
    config.host_cmdline_extras = !args.no_host_cmdline;
    config.process_start_ns = Some(process_start_ns);

    let vm = Arc::new(vmm::start(config).context("cannot start the VM")?);
    let info = vm.info().clone();
    eprintln!(
        "keystone: VM started: {} vCPU, {} MiB, KVM {}, CPU template {}, nested {}",
        info.vcpus,
        info.memory_mib,
        info.kvm_kind.name(),
        info.cpu_template.name(),
        match (&info.nested.enabled, &info.nested.warning) {
            (Some(ext), _) => format!("{ext:?}"),
            (None, Some(_)) => "unavailable".into(),
            (None, None) => "off".into(),
        }
    );
    if let Some(w) = &info.nested.warning {
        eprintln!("keystone: warning: {w}");
    }
    let raw = RawMode::enter();
    if raw.active() {
        eprint!("keystone: console attached; Ctrl-A x stops the VM\r\n");
    }
    {
        let vm = vm.clone();
        let raw = raw.active();
        std::thread::Builder::new()
            .name("stdin".into())
            .spawn(move || forward_stdin(vm, raw))
            .context("cannot start the console input thread")?;
    }
    let wait_for = Duration::from_secs(args.timeout.unwrap_or(u64::MAX / 4));
    let (reason, timed_out) = match vm.wait_timeout(wait_for) {
        Some(r) => (r, false),
        None => (vmm::VmExitReason::Stopped, true),
    };
    let memory = vmm_memory();
    vm.stop();
    drop(raw);
    let _ = std::io::stdout().flush();
    let timeline = vm.timeline();
    eprintln!("\nkeystone: VM stopped: {reason}");
    print_timeline(&timeline);
    if let Some(path) = &args.timings_json {
        let mut doc = timeline_json(&timeline);
        // Schema 2: the run's identity (kernel, command line, size, nesting).
        doc["schema"] = TIMINGS_SCHEMA.into();
        doc["kernel"] = serde_json::json!({
            "path": args.kernel.display().to_string(),
            "sha256": file_sha256(&args.kernel).ok(),
        });
        doc["cmdline"] = info.cmdline.clone().into();
        doc["vcpus"] = info.vcpus.into();
        doc["memory_mib"] = info.memory_mib.into();
        doc["nested"] = serde_json::json!({
            "enabled": info.nested.enabled.map(|e| format!("{e:?}").to_uppercase()),
            "warning": info.nested.warning,
        });
        doc["exit"] = reason.to_string().into();
        // What the boot cost in exits, by device and kind.
        doc["exits"] = vm
            .exit_counts()
            .iter()
            .map(|c| {
                serde_json::json!({
                    "kind": c.kind,
                    "count": c.count,
                    "handling_us": c.handling.as_micros() as u64,
                })
            })
            .collect::<Vec<_>>()
            .into();
        doc["clean_exit"] = reason.is_clean().into();
        doc["kvm"] = info.kvm_kind.name().into();
        doc["cpu_template"] = info.cpu_template.name().into();
        doc["memory"] = serde_json::to_value(memory)?;
        if let Some(d) = &fs_daemon {
            let stats = d.stats();
            doc["virtiofs_paths_read"] = stats
                .paths_read()
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .into();
        }
        std::fs::write(path, serde_json::to_vec_pretty(&doc)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if timed_out {
        Err(CodedError::error(
            exit_code::OPERATION_FAILED,
            format!(
                "the VM did not stop within {} s; stopped it",
                args.timeout.unwrap_or(0)
            ),
        ))
    } else if reason.is_clean() {
        Ok(exit_code::OK)
    } else {
        Err(CodedError::error(
            exit_code::OPERATION_FAILED,
            format!("the VM failed: {reason}"),
        ))
    }
}
