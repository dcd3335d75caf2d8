//! The micro-VM backend: one supervisor process per sandbox runs the guest
//! (our VMM on KVM, or QEMU's software emulation), virtiofsd-lite serves
//! three shares (the read-only root, the persistent `state` layer and the
//! sandbox-private clone at `/workspace`), and every command talks to the
//! guest agent over the hybrid vsock socket.
//!
//! - `engine.rs`: engine choice, layout, kernel command lines, QEMU args;
//! - `supervisor.rs`: the `__supervise` process;
//! - `autosync.rs`: `--sync-mode auto-commit|auto-idle` in the supervisor;
//! - `forward.rs`: the guest's listening ports, watched by the supervisor
//!   (published on the host only when asked; the proxy routes to them);
//! - `web.rs`: `attach --web` (Zellij's web client, through the proxy);
//! - `guest.rs`: agent connections and interactive terminals;
//! - `sessions.rs`: `attach`, `exec` and `ssh`;
//! - `worktrees.rs`: `worktree` (git worktrees in the guest);
//! - `clone.rs`: the sandbox-private clone of the project;
//! - `sync.rs`: `sync` and the `__git-upload-pack` bridge;
//! - `artifacts.rs`: `sync --artifacts` (the sandbox's tar stream, checked on the host).
//!
//! SECURITY: `exec`, `ssh` and `attach` pass the guest program's output
//! and terminal to this one byte for byte (as `ssh` and `docker exec`
//! do); everything else the backend reports of the guest (its errors,
//! worktrees, ports, versions) is escaped through `crate::shown`.

mod agents;
mod artifacts;
mod autosync;
mod boot;
mod clone;
mod egress;
mod engine;
mod forward;
mod guest;
mod hostca;
mod leftover;
mod logfile;
mod plan;
mod readiness;
mod run_dir;
mod sessions;
pub mod shares;
mod supervisor;
mod sync;
mod vscode;
mod web;
mod worktrees;

use std::path::Path;
use std::time::{Duration, Instant};

use rustix::process::Signal;

use super::backend::{
    AttachOptions, Backend, BackendError, BackendResult, BackendStatus, ExecOptions, PortForward,
    SandboxSpec, StartOutcome, StopOptions, SyncOptions, SyncReport, VscodeTarget, WorktreeInfo,
    WorktreeOp,
};
use super::config::Network;
use super::state::{send_signal, ProcProbe, ProcessProbe, StateRecord};
use engine::Layout;

/// How long `stop` waits for the supervisor before SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);

/// The micro-VM backend.
pub struct MicroVmBackend;

fn io_failed(what: &str, e: impl std::fmt::Display) -> BackendError {
    BackendError::Failed(format!("{what}: {e}"))
}

impl MicroVmBackend {
    fn layout(spec: &SandboxSpec) -> Layout {
        Layout::new(&spec.paths)
    }
}

impl Backend for MicroVmBackend {
    /// `nat`: the guest's programs get outbound connections, made by the
    /// supervisor (see `egress`).
    fn network_available(&self) -> bool {
        true
    }

    /// Usable for the commands that need no guest (list, status, destroy);
    /// KVM, QEMU and image checks belong in `start`.
    fn check_available(&self) -> BackendResult<()> {
        Ok(())
    }

    /// Hands the start to the sandbox's supervisor and shows what it
    /// reports; then the summary of what runs.
    fn start(
        &self,
        spec: &SandboxSpec,
        progress: &mut dyn FnMut(&str),
    ) -> BackendResult<StartOutcome> {
        let layout = Self::layout(spec);
        let report = boot::Boot::launch(spec, &layout)?.run(progress)?;
        let services = boot::describe_services(&report.services);
        if !services.is_empty() {
            progress(&format!("services up: {services}"));
        }
        let (nested, how) = report.nested.clone();
        let vcpus = match report.engine.as_str() {
            "qemu" => engine::qemu_vcpus(spec.settings.vcpus, engine::host_cores()),
            _ => spec.settings.vcpus,
        };
        progress(&format!(
            "ready in {:.1} s: {} MiB, {vcpus} vCPU(s)",
            report.total.as_secs_f64(),
            spec.settings.memory_mib,
        ));
        progress(&format!("nested virtualization {}: {how}", nested.as_str()));
        progress(&match spec.settings.network {
            Network::None => "network none: the guest's programs reach nothing outside".to_string(),
            _ => "network nat: outbound connections through the host (http(s)_proxy in the guest; \
                  private addresses need [network] allow)"
                .to_string(),
        });
        progress(&format!(
            "sync mode {}: `keystone agent sync {}` fetches the sandbox's commits",
            spec.settings.sync_mode, spec.name
        ));
        // The clone's host folder is not named: it holds the guest's .git
        // (its config and hooks), which a git-aware shell prompt opened
        // there would run. `status --json` gives it to scripts.
        progress(&format!(
            "workspace: /workspace in the guest (a private clone; work on the host stays in {}); \
             logs in {}",
            spec.project.display(),
            spec.paths.logs.display()
        ));
        Ok(StartOutcome {
            supervisor_pid: report.supervisor_pid,
            engine: report.engine,
            nested,
            nested_detail: Some(how),
            phases: report.phases,
            total: report.total,
        })
    }

    fn stop(&self, spec: &SandboxSpec, opts: &StopOptions) -> BackendResult<()> {
        let record = StateRecord::load(&spec.paths).map_err(|e| io_failed("state", e))?;
        let Some(pid) = record.supervisor_pid else {
            return Ok(());
        };
        let alive = || ProcProbe.is_supervisor(pid, &spec.name);
        if !alive() {
            return Ok(());
        }
        let wait = |limit: Duration| {
            let t = Instant::now();
            while alive() && t.elapsed() < limit {
                std::thread::sleep(Duration::from_millis(50));
            }
            !alive()
        };
        if opts.force {
            // The guest gets no clean shutdown; QEMU dies with its parent.
            // pid is our sandbox's supervisor (checked above).
            send_signal(pid, Signal::KILL);
        } else {
            send_signal(pid, Signal::TERM);
            if !wait(STOP_TIMEOUT) {
                eprintln!(
                    "keystone: the supervisor did not stop within {} s: killing it",
                    STOP_TIMEOUT.as_secs()
                );
                send_signal(pid, Signal::KILL);
            }
        }
        if !wait(Duration::from_secs(5)) {
            return Err(BackendError::Failed(format!(
                "the supervisor (pid {pid}) did not exit"
            )));
        }
        // A QEMU left behind (PDEATHSIG covers it; this is belt and braces).
        leftover::kill(&Self::layout(spec));
        Ok(())
    }

    fn attach(&self, spec: &SandboxSpec, opts: &AttachOptions) -> BackendResult<i32> {
        sessions::attach(spec, opts)
    }

    fn exec(&self, spec: &SandboxSpec, opts: &ExecOptions) -> BackendResult<i32> {
        sessions::exec(spec, opts)
    }

    fn ssh(&self, spec: &SandboxSpec) -> BackendResult<i32> {
        sessions::ssh(spec)
    }

    fn sync(&self, spec: &SandboxSpec, opts: &SyncOptions) -> BackendResult<SyncReport> {
        if opts.artifacts {
            artifacts::sync(spec, opts)
        } else {
            sync::sync(spec, opts)
        }
    }

    fn worktree(&self, spec: &SandboxSpec, op: &WorktreeOp) -> BackendResult<Vec<WorktreeInfo>> {
        worktrees::worktree(spec, op)
    }

    fn status(&self, spec: &SandboxSpec) -> BackendResult<BackendStatus> {
        let layout = Self::layout(spec);
        let ports = match forward::read_forwards(&layout) {
            Some(ports) => ports,
            // A supervisor that keeps no forwards file: list what listens.
            None => guest::quick_client(&layout.vsock, Duration::from_secs(5))
                .listening_ports()
                .map_err(|e| guest::agent_err("listening ports", e))?
                .iter()
                .map(|p| PortForward {
                    guest_port: p.port,
                    guest_address: p.address.to_string(),
                    host_port: None,
                    url: None,
                    note: Some(
                        "not forwarded: this sandbox's supervisor does not forward ports; \
                         restart the sandbox"
                            .into(),
                    ),
                })
                .collect(),
        };
        let worktrees = self.worktree(spec, &WorktreeOp::List).unwrap_or_default();
        Ok(BackendStatus {
            state: None,
            ports,
            worktrees,
            nested: None,
        })
    }

    fn open_vscode(&self, spec: &SandboxSpec) -> BackendResult<VscodeTarget> {
        vscode::prepare(spec)
    }

    /// Once its supervisor is gone a micro-VM sandbox holds nothing
    /// outside its folder (the per-user proxy notices it gone).
    fn destroy(&self, _spec: &SandboxSpec) -> BackendResult<()> {
        Ok(())
    }

    fn supervise(&self, name: &str, plan: &mut dyn std::io::Read) -> BackendResult<i32> {
        supervisor::supervise(name, plan)
    }
}

pub use vscode::ssh_proxy;

/// The coding agents' versions in the image the sandbox last started from
/// (`claude`, `codex`, `gemini` -> version), from the host's record.
pub fn agent_versions(
    paths: &super::registry::SandboxPaths,
) -> Option<std::collections::BTreeMap<String, String>> {
    agents::recorded_versions(&paths.dir)
}

pub use forward::{is_routable, ForwardError};
pub use sync::content::ContentError;
pub use sync::GitError;

/// The hybrid vsock socket of the sandbox whose files are `paths`.
pub fn vsock_path(paths: &super::registry::SandboxPaths) -> std::path::PathBuf {
    Layout::new(paths).vsock
}

/// The routable listening guest ports of a running sandbox, ascending, as
/// its supervisor's port watch lists them (none when it keeps no list).
pub fn routable_ports(paths: &super::registry::SandboxPaths) -> Vec<u16> {
    let listed = forward::read_forwards(&Layout::new(paths)).unwrap_or_default();
    let mut ports: Vec<u16> = listed
        .iter()
        .filter(|p| forward::is_routable(p))
        .map(|p| p.guest_port)
        .collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// A connection to the guest agent behind the hybrid vsock socket `uds`,
/// its handshake answered within `handshake` (the read timeout stays set).
pub fn agent_connect(
    uds: &Path,
    handshake: Duration,
) -> std::io::Result<std::os::unix::net::UnixStream> {
    guest::connect(
        uds,
        keystone_guest_agent::protocol::AGENT_VSOCK_PORT,
        handshake,
        true,
    )
}

/// `keystone agent forward`: raw TCP from 127.0.0.1:`host_port` to
/// `guest_port` until interrupted or until `alive` says the sandbox stopped.
pub fn forward_port(
    spec: &SandboxSpec,
    guest_port: u16,
    host_port: u16,
    alive: &dyn Fn() -> bool,
    ready: &mut dyn FnMut(),
) -> Result<(), ForwardError> {
    let vsock = Layout::new(&spec.paths).vsock;
    forward::forward_until_interrupted(vsock, guest_port, host_port, alive, ready)
}

/// `keystone agent __git-upload-pack NAME`.
pub fn git_upload_pack(spec: &SandboxSpec) -> BackendResult<i32> {
    sync::upload_pack(spec)
}

#[cfg(test)]
#[path = "hostile_guest_tests.rs"]
mod hostile_guest_tests;
