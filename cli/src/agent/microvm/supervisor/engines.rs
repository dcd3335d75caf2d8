//! Starting the guest: the three virtio-fs shares and the vsock backend,
//! then QEMU (its own process, reaching the daemons by their sockets) or
//! our VMM (in this process, each daemon paired with it on a private
//! connection). What serves the guest lives as long as the [`Launched`].

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rustix::process::{set_parent_process_death_signal, Signal};
use vmm::{NestedMode, SerialOutput, VmBuilder};

use super::super::super::backend::SandboxSpec;
use super::super::super::state::NestedStatus;
use super::super::engine::{
    boot_memory, guest_cmdline, host_cores, qemu_args, qemu_nested, qemu_vcpus, vmm_nested,
    EngineKind, Layout, QemuPlan, Share, GUEST_CID, QEMU,
};
use super::super::readiness::Readiness;
use super::super::{logfile, run_dir, shares};
use super::prepare::Prepared;
use super::SupervisorError;

/// A running guest and what serves it.
pub struct Launched {
    pub guest: Box<dyn RunningGuest>,
    pub engine: EngineKind,
    pub nested: NestedStatus,
    /// How nested virtualization was set up (or why it was not).
    pub nested_how: String,
    /// When the engine was started (the guest's boot times count from
    /// the kernel's start, a little later).
    pub launched_at: Instant,
    /// The memory the guest booted with, MiB, when it has more to add
    /// once ready (see `engine::boot_memory`).
    pub boot_memory_mib: Option<u32>,
    /// The share daemons (dropped after the guest: they end with it).
    _servers: Vec<shares::ShareServer>,
    /// Our VMM's vsock backend, paired with it.
    _vsock: Option<vsock_lite::VsockBackendHandle>,
}

/// Starts the engine `prepared` chose, with the sandbox's shares.
pub fn launch(
    spec: &SandboxSpec,
    layout: &Layout,
    prepared: &Prepared,
    ready: &Readiness,
) -> Result<Launched, SupervisorError> {
    run_dir::prepare(layout).map_err(|e| SupervisorError::io("the run folder", e))?;
    let kernel_can = guest_image::kernel::adds_memory_after_boot(&prepared.kernel);
    let boot_memory_mib = boot_memory(spec.settings.memory_mib, kernel_can);
    let launched = match prepared.choice.engine {
        EngineKind::Qemu => launch_qemu(spec, layout, prepared, ready, boot_memory_mib)?,
        EngineKind::Vmm => launch_vmm(spec, layout, prepared, ready, boot_memory_mib)?,
    };
    ready.engine(
        launched.engine.as_str(),
        launched.nested,
        &launched.nested_how,
    );
    Ok(launched)
}

fn wait_for_sockets(paths: &[PathBuf]) -> Result<(), SupervisorError> {
    let deadline = Instant::now() + Duration::from_secs(10);
    for p in paths {
        while !p.exists() {
            if Instant::now() > deadline {
                return Err(SupervisorError::io(
                    format!("{} did not appear", p.display()),
                    std::io::ErrorKind::TimedOut.into(),
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    Ok(())
}

fn launch_qemu(
    spec: &SandboxSpec,
    layout: &Layout,
    prepared: &Prepared,
    ready: &Readiness,
    boot_memory_mib: Option<u32>,
) -> Result<Launched, SupervisorError> {
    let step = Instant::now();
    for s in layout.sockets() {
        let _ = std::fs::remove_file(s);
    }
    let mut sockets = Vec::new();
    let mut servers = Vec::new();
    for share in Share::ALL {
        let cfg = shares::config(share, &prepared.rootfs, layout);
        let socket = layout.fs_socket(share);
        servers.push(shares::serve_on_socket(cfg, &socket)?);
        sockets.push((socket, share.tag().to_string()));
    }
    let vhost_vsock = layout.vsock_vhost_socket();
    {
        let socket = vhost_vsock.clone();
        let uds = layout.vsock.clone();
        std::thread::Builder::new()
            .name("vsock".into())
            .spawn(move || {
                // A socket left by a crashed supervisor would make the bind fail.
                let _ = std::fs::remove_file(&uds);
                let config = vsock_lite::VsockConfig {
                    guest_cid: GUEST_CID,
                    uds_path: uds,
                };
                if let Err(e) = vsock_lite::serve_listener(&socket, config) {
                    log::info!("vsock backend: {e}");
                }
            })
            .map_err(|e| SupervisorError::io("cannot start the vsock thread", e))?;
    }
    // Measured while the daemons start listening.
    let tsc_khz = vmm::host::tsc_khz();
    let mut wanted: Vec<PathBuf> = sockets.iter().map(|(s, _)| s.clone()).collect();
    wanted.push(vhost_vsock.clone());
    wait_for_sockets(&wanted)?;
    ready.phase("daemons", step.elapsed());

    let step = Instant::now();
    let cores = host_cores();
    let vcpus = qemu_vcpus(spec.settings.vcpus, cores);
    if vcpus < spec.settings.vcpus {
        ready.progress(&format!(
            "engine qemu: {vcpus} vCPU(s) of the {} configured: software emulation runs each \
             vCPU on a host core, and this host has {cores}",
            spec.settings.vcpus
        ));
    }
    let plan = QemuPlan {
        kernel: prepared.kernel.clone(),
        initrd: prepared.initrd.clone(),
        memory_mib: spec.settings.memory_mib,
        vcpus,
        nested: spec.settings.nested_virt,
        cmdline: guest_cmdline(
            EngineKind::Qemu,
            &spec.name,
            spec.settings.network,
            tsc_khz,
            boot_memory_mib,
        ),
        shares: sockets,
        vsock_socket: vhost_vsock,
        console_socket: layout.console_socket(),
    };
    logfile::serve_console(&plan.console_socket, &layout.console_log)
        .map_err(|e| SupervisorError::io("the console log", e))?;
    let args = qemu_args(&plan);
    log::info!("{QEMU} {}", args.join(" "));
    let mut cmd = Command::new(QEMU);
    cmd.args(&args).stdin(Stdio::null());
    // SAFETY: the hook makes one prctl(2) system call, which is
    // async-signal-safe and allocates nothing; QEMU dies with the
    // supervisor.
    unsafe {
        cmd.pre_exec(|| {
            let _ = set_parent_process_death_signal(Some(Signal::KILL));
            Ok(())
        });
    }
    let launched_at = Instant::now();
    let child = cmd
        .spawn()
        .map_err(|e| SupervisorError::io(format!("cannot run {QEMU}"), e))?;
    let _ = std::fs::write(layout.qemu_pid(), child.id().to_string());
    ready.phase("engine spawn", step.elapsed());
    let (nested, nested_how) = qemu_nested(spec.settings.nested_virt);
    Ok(Launched {
        guest: Box::new(QemuChild(child)),
        engine: EngineKind::Qemu,
        nested,
        nested_how,
        launched_at,
        boot_memory_mib,
        _servers: servers,
        _vsock: None,
    })
}

fn launch_vmm(
    spec: &SandboxSpec,
    layout: &Layout,
    prepared: &Prepared,
    ready: &Readiness,
    boot_memory_mib: Option<u32>,
) -> Result<Launched, SupervisorError> {
    let step = Instant::now();
    let console = logfile::CappedLog::open(&layout.console_log)
        .map_err(|e| SupervisorError::io(layout.console_log.display().to_string(), e))?;
    let vcpus = u8::try_from(spec.settings.vcpus).unwrap_or(u8::MAX);
    let mut builder = VmBuilder::new(&prepared.kernel)
        .vcpus(vcpus)
        .memory_mib(u64::from(spec.settings.memory_mib))
        .nested(if spec.settings.nested_virt {
            NestedMode::Auto
        } else {
            NestedMode::Off
        })
        .initrd(&prepared.initrd)
        .serial(SerialOutput::Writer(Box::new(console)))
        .cmdline(guest_cmdline(
            EngineKind::Vmm,
            &spec.name,
            spec.settings.network,
            None,
            boot_memory_mib,
        ));
    let mut servers = Vec::new();
    for share in Share::ALL {
        let cfg = shares::config(share, &prepared.rootfs, layout);
        // virtiofsd-lite creates each file as the guest user who asked.
        let (vmm_end, server) = shares::serve_paired(cfg, &layout.fs_socket(share))?;
        servers.push(server);
        builder = builder.vhost_user_fs(vmm_end, share.tag());
    }
    // A socket left by a crashed supervisor would make the bind fail.
    let _ = std::fs::remove_file(&layout.vsock);
    let (stream, vsock) = vsock_lite::spawn_paired(vsock_lite::VsockConfig {
        guest_cid: GUEST_CID,
        uds_path: layout.vsock.clone(),
    })
    .map_err(SupervisorError::Vsock)?;
    ready.phase("daemons", step.elapsed());
    let step = Instant::now();
    let launched_at = Instant::now();
    let vm = builder
        .vhost_user_vsock(stream, GUEST_CID, &layout.vsock)
        .start()
        .map_err(SupervisorError::Vm)?;
    ready.phase("engine spawn", step.elapsed());
    let (nested, nested_how) = vmm_nested(spec.settings.nested_virt, &vm.info().nested);
    Ok(Launched {
        guest: Box::new(VmGuest(vm)),
        engine: EngineKind::Vmm,
        nested,
        nested_how,
        launched_at,
        boot_memory_mib,
        _servers: servers,
        _vsock: Some(vsock),
    })
}

/// A guest the supervisor watches: QEMU as a child process, or our VMM in
/// this process.
pub trait RunningGuest {
    /// Waits up to `timeout` for the guest to end: whether it ended
    /// cleanly and how, once it did.
    fn wait_end(&mut self, timeout: Duration) -> std::io::Result<Option<(bool, String)>>;
    /// Ends the guest now; says how it ended.
    fn force_stop(&mut self) -> std::io::Result<String>;
}

struct QemuChild(std::process::Child);

impl RunningGuest for QemuChild {
    fn wait_end(&mut self, timeout: Duration) -> std::io::Result<Option<(bool, String)>> {
        if let Some(status) = self.0.try_wait()? {
            return Ok(Some((status.success(), format!("{QEMU} {status}"))));
        }
        std::thread::sleep(timeout);
        Ok(None)
    }

    fn force_stop(&mut self) -> std::io::Result<String> {
        let _ = self.0.kill();
        let status = self.0.wait()?;
        Ok(format!("{QEMU} killed: {status}"))
    }
}

struct VmGuest(vmm::VmHandle);

impl RunningGuest for VmGuest {
    fn wait_end(&mut self, timeout: Duration) -> std::io::Result<Option<(bool, String)>> {
        Ok(self
            .0
            .wait_timeout(timeout)
            .map(|reason| (reason.is_clean(), reason.to_string())))
    }

    fn force_stop(&mut self) -> std::io::Result<String> {
        Ok(format!("VM stopped: {}", self.0.stop()))
    }
}
