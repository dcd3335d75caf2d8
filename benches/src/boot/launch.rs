//! Runs one plan of `sides.rs`: writes its config file, starts what serves
//! it (a `virtiofsd-lite` process for the virtio-fs root, our vsock
//! backend for QEMU's vhost-user vsock device), then either the strace
//! probe of the setup time or a measured boot, and stops them again.

use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use keystone_tests::log_tail;
use serde_json::{json, Value};
use vsock_lite::{self as vsock, VsockConfig};

use super::fsd::FsDaemon;
use super::session::{self, BootOutcome, BootSpec, Until};
use super::sides::{self, Guest, Plan, Vmm};
use super::strace;

/// Time allowed between the marker and the VMM's exit (reboot under emulation).
const EXIT_GRACE: Duration = Duration::from_secs(60);

/// What every launch needs besides the plan.
pub struct Ctx<'a> {
    pub guest: &'a Guest,
    pub work: &'a Path,
    pub virtiofsd: &'a Path,
    pub strace: Option<&'a Path>,
}

/// The processes and threads serving one boot.
struct Serving {
    daemon: Option<FsDaemon>,
    vsock: Option<(JoinHandle<()>, PathBuf)>,
}

impl Serving {
    fn start(ctx: &Ctx<'_>, plan: &Plan, log: &str) -> anyhow::Result<Self> {
        if let Some((path, text)) = &plan.config_file {
            std::fs::write(path, text)
                .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
        }
        let daemon = match &plan.fs_socket {
            Some(socket) => Some(FsDaemon::start(
                ctx.virtiofsd,
                &ctx.guest.root_dir,
                socket.clone(),
                &ctx.work.join(format!("{log}.fsd.log")),
            )?),
            None => None,
        };
        let vsock = match (&plan.vhost_vsock, &plan.agent_uds) {
            (Some(socket), Some(uds)) => Some(start_vsock(socket, uds)?),
            _ => None,
        };
        Ok(Self { daemon, vsock })
    }

    fn pids(&self) -> Vec<u32> {
        self.daemon.iter().map(|d| d.child.pid()).collect()
    }

    /// After the VMM is gone: the daemon stops on the disconnect, the
    /// vsock backend returns when its frontend went away.
    fn stop(self) {
        if let Some(d) = self.daemon {
            d.stop();
        }
        if let Some((thread, socket)) = self.vsock {
            let end = Instant::now() + Duration::from_secs(3);
            while !thread.is_finished() && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(10));
            }
            if thread.is_finished() {
                let _ = thread.join();
            }
            let _ = std::fs::remove_file(socket);
        }
    }
}

/// Our vhost-user vsock backend on `socket` in a thread of this process,
/// with the hybrid host side at `uds`; returns once it listens.
fn start_vsock(socket: &Path, uds: &Path) -> anyhow::Result<(JoinHandle<()>, PathBuf)> {
    let _ = std::fs::remove_file(socket);
    let (s, config) = (
        socket.to_path_buf(),
        VsockConfig {
            guest_cid: 3,
            uds_path: uds.to_path_buf(),
        },
    );
    let thread = std::thread::Builder::new()
        .name("vsock-backend".into())
        .spawn(move || {
            if let Err(e) = vsock::serve_listener(&s, config) {
                eprintln!("keystone-benches: vsock backend: {e}");
            }
        })?;
    let end = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        if thread.is_finished() || Instant::now() >= end {
            anyhow::bail!("the vsock backend did not listen on {}", socket.display());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok((thread, socket.to_path_buf()))
}

/// Exec to first KVM_RUN under strace, for `plan` (a marker boot).
pub fn probe(ctx: &Ctx<'_>, vmm: &Vmm, plan: &Plan, tag: &str) -> Value {
    let Some(st) = ctx.strace else {
        return json!({ "setup_ms": null, "error": "strace not found (apt-get install strace)" });
    };
    let serving = match Serving::start(ctx, plan, &format!("{tag}-probe")) {
        Ok(s) => s,
        Err(e) => return json!({ "setup_ms": null, "error": format!("{e:#}") }),
    };
    let trace = ctx.work.join(format!("{tag}.strace"));
    let p = strace::probe(st, &vmm.program, &plan.args, &plan.env, &trace);
    serving.stop();
    json!(p)
}

/// One measured boot of `plan`.
pub fn boot(ctx: &Ctx<'_>, vmm: &Vmm, plan: &Plan, tag: &str) -> anyhow::Result<BootOutcome> {
    let serving = Serving::start(ctx, plan, tag)?;
    let until = match &plan.agent_uds {
        Some(uds) => Until::Agent(uds),
        None => Until::Marker(guest_image::busybox::BOOT_CHECK_MARKER),
    };
    let grace = if plan.agent_uds.is_some() || !plan.exits_on_reboot {
        Duration::ZERO
    } else {
        EXIT_GRACE
    };
    let o = session::boot(BootSpec {
        name: &vmm.key,
        program: &vmm.program,
        args: plan.args.clone(),
        env: &plan.env,
        until,
        extra_pids: serving.pids(),
        guest_mib: ctx.guest.memory_mib,
        stderr_log: ctx.work.join(format!("{tag}.stderr")),
        limit: Duration::from_secs(ctx.guest.timeout_s),
        exit_grace: grace,
        fatal_stderr: plan.fatal_stderr,
    });
    serving.stop();
    o
}

/// The common part of a run record.
pub fn outcome_json(ctx: &Ctx<'_>, vmm: &Vmm, plan: &Plan, o: &BootOutcome, tag: &str) -> Value {
    json!({
        "command": sides::display(&vmm.program, &plan.args),
        "cmdline_given": plan.cmdline,
        "kernel_cmdline_seen": o.kernel_cmdline,
        "kernel_start_ms": o.kernel_start_ms,
        "init_exec_ms": o.init_exec_ms,
        "userspace_ms": o.userspace_ms,
        "memory": o.memory,
        "fs_daemon_memory": o.extra_memory.first().copied().flatten(),
        "exit": o.exit,
        "serial_bytes": o.serial_bytes,
        "error": o.error,
        // The VMM's own messages, their last lines.
        "stderr_tail": log_tail(&ctx.work.join(format!("{tag}.stderr")), 8),
    })
}
