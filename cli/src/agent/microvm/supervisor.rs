//! The per-sandbox supervisor (`keystone agent __supervise NAME`): runs
//! the guest with the chosen engine until it stops, shuts it down cleanly
//! on SIGTERM, and records how it ended in `state.json`.
//!
//! `start` passes what it resolved through the environment (see the
//! `ENV_*` names), so the supervisor never rebuilds or re-decides anything.
//!
//! With `--sync-mode auto-commit` or `auto-idle` it also runs auto-sync
//! (`autosync.rs`) on a watch connection it opens to the guest agent; its
//! lines land in this log.
//!
//! While the guest runs it watches the guest's listening TCP ports
//! (`forward.rs`), which the per-user proxy reaches by name.
//!
//! It tells `start` when the sandbox is ready, service by service
//! (`readiness.rs`): it pings the guest agent until it answers, then each
//! service reports when it is established.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm::{NestedMode, SerialOutput, VmBuilder};

use super::super::backend::{BackendError, BackendResult, SandboxSpec};
use super::super::config::{Network, SyncMode};
use super::super::state::{SandboxState, StateRecord};
use super::egress;
use super::engine::{
    guest_cmdline, qemu_args, qemu_nested, vmm_nested, EngineKind, Layout, QemuPlan, GUEST_CID,
    QEMU, SHARES,
};
use super::readiness::{Readiness, Service};
use super::{autosync, forward, guest, logfile, run_dir, shares};

pub const ENV_ENGINE: &str = "KEYSTONE_SUPERVISOR_ENGINE";
pub const ENV_KERNEL: &str = "KEYSTONE_SUPERVISOR_KERNEL";
pub const ENV_ROOTFS: &str = "KEYSTONE_SUPERVISOR_ROOTFS";
pub const ENV_INITRD: &str = "KEYSTONE_SUPERVISOR_INITRD";

/// How long the guest gets to shut down after the agent was asked.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

static TERMINATE: AtomicBool = AtomicBool::new(false);

extern "C" fn on_terminate(_: libc::c_int) {
    TERMINATE.store(true, Ordering::SeqCst);
}

fn install_signal_handlers() {
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is
        // async-signal-safe.
        unsafe {
            libc::signal(
                sig,
                on_terminate as extern "C" fn(libc::c_int) as libc::sighandler_t,
            );
        }
    }
}

/// The services `start` waits for with `spec`'s settings.
pub fn expected_services(spec: &SandboxSpec) -> Vec<Service> {
    let mut v = vec![Service::Agent, Service::Ports];
    // `bridge` is not available and means nat (start says so).
    if spec.settings.network != Network::None {
        v.push(Service::Egress);
    }
    if spec.settings.sync_mode != SyncMode::Manual {
        v.push(Service::AutoSync);
    }
    v
}

/// How the guest ended.
struct Ended {
    /// A stop was asked for (SIGTERM).
    requested: bool,
    /// The engine exited cleanly.
    clean: bool,
    detail: String,
}

/// One line of the supervisor log (its standard error, which
/// `logfile::capture_output` bounds); what it quotes of the guest is
/// escaped and kept to the line.
pub(super) fn log(msg: &str) {
    eprintln!(
        "[{}] supervisor: {}",
        super::super::fsutil::now_rfc3339(),
        crate::shown::line(msg)
    );
}

fn env_path(key: &str) -> BackendResult<PathBuf> {
    std::env::var_os(key).map(PathBuf::from).ok_or_else(|| {
        BackendError::Failed(format!(
            "{key} is not set: the supervisor is started by `keystone agent start`, not by hand"
        ))
    })
}

/// Body of `keystone agent __supervise NAME`.
pub fn supervise(spec: &SandboxSpec) -> BackendResult<i32> {
    install_signal_handlers();
    // The shares keep one descriptor per node up to half of this limit.
    virtiofsd_lite::raise_fd_limit();
    // Taken before any descriptor is made, which could get its number.
    let ready_pipe = Readiness::inherited_pipe();
    let layout = Layout::new(&spec.paths);
    // Every line of this process and of QEMU, bounded (dropped at return).
    let _output = logfile::capture_output(&layout.supervisor_log)
        .map_err(|e| log(&format!("the supervisor log is not bounded: {e}")))
        .ok();
    let engine = std::env::var(ENV_ENGINE)
        .ok()
        .and_then(|e| EngineKind::parse(&e))
        .ok_or_else(|| {
            BackendError::Failed(format!(
                "{ENV_ENGINE} is not set: the supervisor is started by `keystone agent start`"
            ))
        })?;
    let kernel = env_path(ENV_KERNEL)?;
    let rootfs = env_path(ENV_ROOTFS)?;
    let initrd = env_path(ENV_INITRD)?;
    log(&format!(
        "sandbox {} engine {} pid {}",
        spec.name,
        engine.as_str(),
        std::process::id()
    ));
    let ready = Arc::new(Readiness::new(ready_pipe, &expected_services(spec), log));
    let result = match engine {
        EngineKind::Qemu => run_qemu(spec, &layout, &kernel, &rootfs, &initrd, &ready),
        EngineKind::Vmm => run_vmm(spec, &layout, &kernel, &rootfs, &initrd, &ready),
    };
    let (state, error) = match &result {
        Ok(e) if e.requested || e.clean => (SandboxState::Stopped, None),
        Ok(e) => (
            SandboxState::Error,
            Some(format!(
                "the VM stopped unexpectedly ({}); see {}",
                e.detail,
                layout.console_log.display()
            )),
        ),
        Err(e) => (SandboxState::Error, Some(e.clone())),
    };
    log(&format!(
        "guest ended: {}",
        match &result {
            Ok(e) => e.detail.clone(),
            Err(e) => e.clone(),
        }
    ));
    record_end(spec, state, error);
    let _ = std::fs::remove_file(layout.qemu_pid());
    Ok(if state == SandboxState::Stopped { 0 } else { 3 })
}

/// Writes how the sandbox ended, unless another supervisor owns the record.
fn record_end(spec: &SandboxSpec, state: SandboxState, error: Option<String>) {
    let me = std::process::id() as i32;
    let Ok(mut record) = StateRecord::load(&spec.paths) else {
        return;
    };
    if record.supervisor_pid.is_some_and(|p| p != me) {
        return;
    }
    record.state = state;
    record.supervisor_pid = None;
    if error.is_some() {
        record.last_error = error;
    }
    if let Err(e) = record.save(&spec.paths) {
        log(&format!("cannot record the end state: {e}"));
    }
}

/// Asks the agent to power off, from a thread (a wedged guest must not
/// block the supervisor).
fn ask_shutdown(vsock: &Path) {
    let uds = vsock.to_path_buf();
    std::thread::spawn(move || {
        let client = guest::quick_client(&uds, Duration::from_secs(5));
        match client.shutdown(false) {
            Ok(()) => log("guest agent acknowledged the shutdown"),
            Err(e) => log(&format!("shutdown request failed: {e}")),
        }
    });
}

/// Ends auto-sync's watch before the guest goes away.
fn stop_autosync(auto: Option<&autosync::AutoSync>) {
    if let Some(a) = auto {
        a.stop();
    }
}

fn wait_for_sockets(paths: &[PathBuf]) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    for p in paths {
        while !p.exists() {
            if Instant::now() > deadline {
                return Err(format!("{} did not appear", p.display()));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    Ok(())
}

fn run_qemu(
    spec: &SandboxSpec,
    layout: &Layout,
    kernel: &Path,
    rootfs: &Path,
    initrd: &Path,
    ready: &Arc<Readiness>,
) -> Result<Ended, String> {
    run_dir::prepare(layout)?;
    for s in layout.sockets() {
        let _ = std::fs::remove_file(s);
    }
    let mut shares = Vec::new();
    // Serving until the guest ends (dropped on return).
    let mut _servers = Vec::new();
    for (tag, readonly) in SHARES {
        let cfg = shares::config(tag, readonly, rootfs, layout);
        let socket = layout.fs_socket(tag);
        _servers.push(shares::serve_on_socket(cfg, readonly, &socket, log)?);
        shares.push((socket, tag.to_string()));
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
                    log(&format!("vsock backend: {e}"));
                }
            })
            .map_err(|e| format!("cannot start the vsock thread: {e}"))?;
    }
    // Measured while the daemons start listening.
    let tsc_khz = vmm::host::tsc_khz();
    let mut wanted: Vec<PathBuf> = shares.iter().map(|(s, _)| s.clone()).collect();
    wanted.push(vhost_vsock.clone());
    wait_for_sockets(&wanted)?;

    let plan = QemuPlan {
        kernel: kernel.to_path_buf(),
        initrd: initrd.to_path_buf(),
        memory_mib: spec.settings.memory_mib,
        vcpus: spec.settings.vcpus,
        nested: spec.settings.nested_virt,
        cmdline: guest_cmdline(EngineKind::Qemu, &spec.name, spec.settings.network, tsc_khz),
        shares,
        vsock_socket: vhost_vsock,
        console_socket: layout.console_socket(),
    };
    logfile::serve_console(&plan.console_socket, &layout.console_log)
        .map_err(|e| format!("the console log: {e}"))?;
    let args = qemu_args(&plan);
    log(&format!("{QEMU} {}", args.join(" ")));
    let mut cmd = Command::new(QEMU);
    cmd.args(&args).stdin(Stdio::null());
    // SAFETY: prctl is async-signal-safe; QEMU dies with the supervisor.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|e| format!("cannot run {QEMU}: {e}"))?;
    let _ = std::fs::write(layout.qemu_pid(), child.id().to_string());
    let (nested, how) = qemu_nested(spec.settings.nested_virt);
    ready.engine(nested, &how);
    watch_guest(spec, layout, &mut QemuChild(child), ready)
}

fn run_vmm(
    spec: &SandboxSpec,
    layout: &Layout,
    kernel: &Path,
    rootfs: &Path,
    initrd: &Path,
    ready: &Arc<Readiness>,
) -> Result<Ended, String> {
    // The share daemons' sockets live there.
    run_dir::prepare(layout)?;
    let _ = std::fs::remove_file(&layout.vsock);
    let console = logfile::CappedLog::open(&layout.console_log)
        .map_err(|e| format!("{}: {e}", layout.console_log.display()))?;
    let vcpus = u8::try_from(spec.settings.vcpus).unwrap_or(u8::MAX);
    let mut builder = VmBuilder::new(kernel)
        .vcpus(vcpus)
        .memory_mib(u64::from(spec.settings.memory_mib))
        .nested(if spec.settings.nested_virt {
            NestedMode::Auto
        } else {
            NestedMode::Off
        })
        .initrd(initrd)
        .serial(SerialOutput::Writer(Box::new(console)))
        .cmdline(guest_cmdline(
            EngineKind::Vmm,
            &spec.name,
            spec.settings.network,
            None,
        ));
    // Serving until the guest ends (dropped on return).
    let mut _servers = Vec::new();
    for (tag, readonly) in SHARES {
        let cfg = shares::config(tag, readonly, rootfs, layout);
        // virtiofsd-lite creates each file as the guest user who asked.
        let (vmm_end, server) = shares::serve_paired(cfg, readonly, &layout.fs_socket(tag))?;
        _servers.push(server);
        builder = builder.vhost_user_fs(vmm_end, tag);
    }
    // A socket left by a crashed supervisor would make the bind fail.
    let _ = std::fs::remove_file(&layout.vsock);
    let (stream, _vsock) = vsock_lite::spawn_paired(vsock_lite::VsockConfig {
        guest_cid: GUEST_CID,
        uds_path: layout.vsock.clone(),
    })
    .map_err(|e| format!("vsock backend: {e}"))?;
    let builder = builder.vhost_user_vsock(stream, GUEST_CID, &layout.vsock);
    let vm = builder
        .start()
        .map_err(|e| format!("cannot start the VM: {e}"))?;
    let (nested, how) = vmm_nested(spec.settings.nested_virt, &vm.info().nested);
    ready.engine(nested, &how);
    watch_guest(spec, layout, &mut VmGuest(vm), ready)
}

/// A guest the supervisor watches: QEMU as a child process, or our VMM in
/// this process.
trait RunningGuest {
    /// Waits up to `timeout` for the guest to end: whether it ended
    /// cleanly and how, once it did.
    fn wait_end(&mut self, timeout: Duration) -> Result<Option<(bool, String)>, String>;
    /// Ends the guest now; says how it ended.
    fn force_stop(&mut self) -> Result<String, String>;
}

struct QemuChild(std::process::Child);

impl RunningGuest for QemuChild {
    fn wait_end(&mut self, timeout: Duration) -> Result<Option<(bool, String)>, String> {
        match self.0.try_wait() {
            Ok(Some(status)) => Ok(Some((status.success(), format!("{QEMU} {status}")))),
            Ok(None) => {
                std::thread::sleep(timeout);
                Ok(None)
            }
            Err(e) => Err(format!("waiting for {QEMU}: {e}")),
        }
    }

    fn force_stop(&mut self) -> Result<String, String> {
        let _ = self.0.kill();
        let status = self.0.wait().map_err(|e| e.to_string())?;
        Ok(format!("{QEMU} killed: {status}"))
    }
}

struct VmGuest(vmm::VmHandle);

impl RunningGuest for VmGuest {
    fn wait_end(&mut self, timeout: Duration) -> Result<Option<(bool, String)>, String> {
        Ok(self
            .0
            .wait_timeout(timeout)
            .map(|reason| (reason.is_clean(), reason.to_string())))
    }

    fn force_stop(&mut self) -> Result<String, String> {
        Ok(format!("VM stopped: {}", self.0.stop()))
    }
}

/// Pings the guest agent until it answers, then reports it up. Each try
/// that a booting guest answers with a reset costs it kernel time (dear
/// where KVM emulates the kernel and the boot takes a minute): after a
/// few seconds, one try a second.
fn probe_agent(vsock: &Path, ready: &Readiness, stop: &AtomicBool) {
    let t0 = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        if vsock.exists()
            && guest::quick_client(vsock, Duration::from_secs(3))
                .ping()
                .is_ok()
        {
            ready.up(Service::Agent);
            return;
        }
        std::thread::sleep(if t0.elapsed() < Duration::from_secs(5) {
            Duration::from_millis(50)
        } else {
            Duration::from_secs(1)
        });
    }
}

/// Ends the agent prober when dropped.
struct ProbeStop(Arc<AtomicBool>);

impl Drop for ProbeStop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Runs the sandbox's host-side services (auto sync, port forwarding)
/// while `guest` runs, and turns a stop request (SIGTERM) into a guest
/// shutdown, forced after [`SHUTDOWN_GRACE`].
fn watch_guest(
    spec: &SandboxSpec,
    layout: &Layout,
    guest: &mut dyn RunningGuest,
    ready: &Arc<Readiness>,
) -> Result<Ended, String> {
    let probe = ProbeStop(Arc::new(AtomicBool::new(false)));
    {
        let (vsock, ready, stop) = (
            layout.vsock.clone(),
            Arc::clone(ready),
            Arc::clone(&probe.0),
        );
        std::thread::Builder::new()
            .name("agent-probe".into())
            .spawn(move || probe_agent(&vsock, &ready, &stop))
            .map_err(|e| format!("cannot start the agent prober: {e}"))?;
    }
    let auto = autosync::start(spec, &layout.vsock, ready, log);
    // Outbound connections for the guest's programs; ended on return.
    let egress = egress::start(spec, &layout.vsock, ready, log);
    // Watches the guest's ports while the guest runs; dropped (published
    // ports closed) on return.
    let publish = spec.settings.proxy_publish_same_port;
    let mut ports = forward::PortForwarder::start(layout, ready, publish, log);
    let mut requested = false;
    let mut asked_at: Option<Instant> = None;
    loop {
        if let Some((clean, detail)) = guest.wait_end(Duration::from_millis(50))? {
            stop_autosync(auto.as_ref());
            ports.stop();
            return Ok(Ended {
                requested,
                clean,
                detail,
            });
        }
        if TERMINATE.load(Ordering::SeqCst) && asked_at.is_none() {
            log("stop requested: asking the guest to shut down");
            stop_autosync(auto.as_ref());
            if let Some(e) = &egress {
                e.stop();
            }
            ports.stop();
            requested = true;
            asked_at = Some(Instant::now());
            ask_shutdown(&layout.vsock);
        }
        if asked_at.is_some_and(|t| t.elapsed() > SHUTDOWN_GRACE) {
            log("the guest did not shut down in time: stopping it");
            let how = guest.force_stop()?;
            return Ok(Ended {
                requested,
                clean: false,
                detail: format!("stopped after {SHUTDOWN_GRACE:?} ({how})"),
            });
        }
    }
}
