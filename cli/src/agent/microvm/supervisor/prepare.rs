//! What a boot needs before any engine runs: the engine for this host,
//! the guest kernel and root file system (built into the cache the first
//! time; the build's own output goes to the supervisor log), the guest
//! agent's initramfs, the sandbox's folders and its private clone. Each
//! failure carries the exit code `start` leaves with (4 for a host or
//! image that cannot run a sandbox).

use std::path::PathBuf;
use std::time::Instant;

use guest_image::agents::AgentPin;

use super::super::super::backend::{BackendError, BackendResult, SandboxSpec};
use super::super::engine::{self, EngineChoice, HostFacts, Layout, MAX_SOCKET_PATH};
use super::super::readiness::Readiness;
use super::super::{agents, clone};

/// What the boot runs.
pub struct Prepared {
    pub choice: EngineChoice,
    pub kernel: PathBuf,
    pub rootfs: PathBuf,
    pub initrd: PathBuf,
    /// The coding agents the image carries (for the setup's summary).
    pub agent_pins: Vec<AgentPin>,
}

fn io_failed(what: &str, e: std::io::Error) -> BackendError {
    BackendError::io(what, e)
}

/// Makes everything ready for the engine, reporting each step.
pub fn prepare(spec: &SandboxSpec, layout: &Layout, ready: &Readiness) -> BackendResult<Prepared> {
    let step = Instant::now();
    let host = HostFacts::detect();
    let choice = engine::choose(spec.settings.engine, &host)
        .map_err(|e| BackendError::Requirements(e.to_string()))?;
    if let Some(long) = layout
        .sockets()
        .into_iter()
        .find(|p| p.as_os_str().len() > MAX_SOCKET_PATH)
    {
        return Err(BackendError::Requirements(format!(
            "the socket path {} is longer than {MAX_SOCKET_PATH} bytes; use a shorter XDG_STATE_HOME",
            long.display()
        )));
    }
    ready.progress(&format!(
        "engine {}: {}",
        choice.engine.as_str(),
        choice.reason
    ));
    ready.phase("engine choice", step.elapsed());

    let step = Instant::now();
    ready.progress("guest kernel: checking the cache (the first build takes ~7 min)...");
    let kernel = guest_image::kernel::ensure_kernel()
        .map_err(|e| BackendError::Requirements(format!("guest kernel: {e}")))?;
    if !kernel.vmlinux.is_file() {
        return Err(BackendError::Requirements(format!(
            "guest kernel {} not found (build it with {})",
            kernel.vmlinux.display(),
            guest_image::kernel::build_script().display()
        )));
    }
    ready.phase("guest kernel", step.elapsed());

    let step = Instant::now();
    ready.progress("guest root file system: checking the cache (the first build takes ~2 min)...");
    let rootfs = guest_image::rootfs::ensure_rootfs()
        .map_err(|e| BackendError::Requirements(format!("guest root file system: {e}")))?;
    // The agents this image carries, recorded for `status`.
    let agent_pins = agents::record(&rootfs.dir, &spec.paths.dir).unwrap_or_else(|e| {
        ready.progress(&format!("warning: the guest image's agents lock: {e}"));
        Vec::new()
    });
    let agent_dir = guest_image::cache_dir().join("agent");
    let initrd = crate::embedded::agent_initramfs(&agent_dir)
        .map_err(|e| io_failed("cannot write the agent initramfs", e))?;
    ready.phase("root file system", step.elapsed());

    let step = Instant::now();
    for dir in [
        layout.state.join("upper"),
        layout.state.join("work"),
        spec.paths.logs.clone(),
    ] {
        std::fs::create_dir_all(&dir).map_err(|e| io_failed(&dir.display().to_string(), e))?;
    }
    clone::ensure_clone(spec, layout, &mut |line| ready.progress(line))?;
    ready.phase("clone", step.elapsed());
    Ok(Prepared {
        choice,
        kernel: kernel.vmlinux,
        rootfs: rootfs.dir,
        initrd,
        agent_pins,
    })
}
