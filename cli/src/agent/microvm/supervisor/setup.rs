//! The setup in the guest once its agent answers, while the services
//! open: the guest's clock, the project's `.env*` files in `/workspace`,
//! the host's added certificate authorities (network `nat`), and the line
//! about the coding agents. Each step is a phase of the start; a step that
//! fails is a warning, never the end of the start.

use std::path::Path;
use std::time::Instant;

use guest_image::agents::AgentPin;
use keystone_guest_agent::protocol::{ExecRequest, UserSpec};

use super::super::super::backend::SandboxSpec;
use super::super::super::config::Network;
use super::super::engine::{Layout, GUEST_WORKSPACE};
use super::super::readiness::Readiness;
use super::super::{agents, guest, hostca};
use crate::shown;

/// Runs every step, reporting each on `ready`; `agent_pins` are the
/// coding agents the image carries.
pub fn run(spec: &SandboxSpec, layout: &Layout, agent_pins: &[AgentPin], ready: &Readiness) {
    let step = Instant::now();
    if let Err(e) = set_guest_clock(layout) {
        ready.progress(&format!("warning: cannot set the guest clock: {e}"));
    }
    ready.phase("setup: clock", step.elapsed());

    let step = Instant::now();
    match push_env_files(&spec.project, layout) {
        Ok(pushed) if pushed.is_empty() => {}
        Ok(pushed) => ready.progress(&format!("copied {} into /workspace", pushed.join(", "))),
        Err(e) => ready.progress(&format!("warning: {e}")),
    }
    ready.phase("setup: .env files", step.elapsed());

    if spec.settings.network != Network::None {
        let step = Instant::now();
        let certs = hostca::host_certificates(Path::new(hostca::HOST_DIR));
        match hostca::import(&guest::client(&layout.vsock), &certs) {
            Ok(0) => {}
            Ok(n) => ready.progress(&format!(
                "the sandbox trusts the host's {n} added certificate authorit{} (from {})",
                if n == 1 { "y" } else { "ies" },
                hostca::HOST_DIR
            )),
            Err(e) => ready.progress(&format!(
                "warning: cannot add the host's certificate authorities: {e}"
            )),
        }
        ready.phase("setup: certificate authorities", step.elapsed());
    }
    ready.progress(&agents::summary(spec.settings.agent, agent_pins));
}

/// Sets the guest's clock from the host's, to the second: the guest's
/// RTC gives it at boot, and this keeps a guest whose clock source drifted
/// from dating its commits wrong.
pub(in crate::agent::microvm) fn set_guest_clock(layout: &Layout) -> Result<(), String> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|e| e.to_string())?;
    let mut req = ExecRequest::new(&["date", "-u", "-s", &format!("@{}", now.as_secs())]);
    req.user = Some(UserSpec::Uid(0));
    let out = guest::client(&layout.vsock)
        .exec_request_output(req)
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(shown::bytes(&out.stderr))
    }
}

/// Copies the project's `.env*` files (regular files at its top, not
/// links) into `/workspace`, owned by the agent user; returns their names.
fn push_env_files(project: &Path, layout: &Layout) -> Result<Vec<String>, String> {
    let Ok(entries) = std::fs::read_dir(project) else {
        return Ok(Vec::new());
    };
    let client = guest::client(&layout.vsock);
    let mut pushed = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let is_file = entry.file_type().is_ok_and(|t| t.is_file());
        if !name.starts_with(".env") || !is_file {
            continue;
        }
        let bytes =
            std::fs::read(entry.path()).map_err(|e| format!("{}: {e}", entry.path().display()))?;
        client
            .push_file(&name, 0o600, &bytes)
            .map_err(|e| guest::agent_err(&format!("pushing {name}"), e).to_string())?;
        pushed.push(name);
    }
    if pushed.is_empty() {
        return Ok(pushed);
    }
    let mut argv = vec!["chown".to_string(), "agent:agent".to_string()];
    argv.extend(pushed.iter().map(|n| format!("{GUEST_WORKSPACE}/{n}")));
    let mut req = ExecRequest::new(&argv);
    req.user = Some(UserSpec::Uid(0));
    let _ = client.exec_request_output(req);
    Ok(pushed)
}
