//! The setup in the guest once its agent answers, while the services
//! open: the guest's clock, the project's `.env*` files in `/workspace`,
//! the host's added certificate authorities (network `nat`), the
//! project's devcontainer.json (`devcontainer.rs`), and the line about the
//! coding agents. Each step is a phase of the start; a step that
//! fails is a warning, never the end of the start.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use guest_image::agents::AgentPin;
use keystone_guest_agent::client::ClientError;
use keystone_guest_agent::protocol::{ExecRequest, UserSpec};

use super::super::super::backend::SandboxSpec;
use super::super::super::config::Network;
use super::super::engine::{Layout, GUEST_WORKSPACE};
use super::super::readiness::Readiness;
use super::super::{agents, guest, hostca};
use crate::shown;

/// Runs every step, reporting each on `ready`; `agent_pins` are the
/// coding agents the image carries. The steps touch separate things in
/// the guest, each over its own connection, so they run side by side.
pub fn run(spec: &SandboxSpec, layout: &Layout, agent_pins: &[AgentPin], ready: &Readiness) {
    std::thread::scope(|s| {
        s.spawn(|| {
            let step = Instant::now();
            match set_guest_clock(layout, false) {
                Ok(ClockSet::AlreadyRight) => {
                    ready.phase("setup: clock (already right)", step.elapsed())
                }
                Ok(ClockSet::Set) => ready.phase("setup: clock", step.elapsed()),
                Err(e) => {
                    ready.progress(&format!("warning: cannot set the guest clock: {e}"));
                    ready.phase("setup: clock", step.elapsed());
                }
            }
        });
        s.spawn(|| {
            let step = Instant::now();
            match push_env_files(&spec.project, layout) {
                Ok(pushed) if pushed.is_empty() => {}
                Ok(pushed) => {
                    ready.progress(&format!("copied {} into /workspace", pushed.join(", ")))
                }
                Err(e) => ready.progress(&format!("warning: {e}")),
            }
            ready.phase("setup: .env files", step.elapsed());
        });
        if spec.settings.network != Network::None {
            s.spawn(|| {
                let step = Instant::now();
                import_host_certificates(layout, ready);
                ready.phase("setup: certificate authorities", step.elapsed());
            });
        }
    });
    // After the rest: its commands may need the .env files and the CAs.
    let step = Instant::now();
    super::devcontainer::apply(spec, layout, ready);
    ready.phase("setup: devcontainer", step.elapsed());
    ready.progress(&agents::summary(spec.settings.agent, agent_pins));
}

/// Adds the host's added certificate authorities to the guest's store.
fn import_host_certificates(layout: &Layout, ready: &Readiness) {
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
}

/// What [`set_guest_clock`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(in crate::agent::microvm) enum ClockSet {
    /// The guest's clock was within [`CLOCK_TOLERANCE`] of the host's.
    AlreadyRight,
    Set,
}

/// Why the guest's clock could not be set.
#[derive(Debug, thiserror::Error)]
pub(in crate::agent::microvm) enum ClockError {
    /// The guest agent did not answer or did not do it.
    #[error("{0}")]
    Agent(#[source] ClientError),
    /// The host's clock is before 1970.
    #[error("{0}")]
    HostBeforeEpoch(#[source] std::time::SystemTimeError),
    /// The host's clock is past what milliseconds in a u64 hold.
    #[error("{0}")]
    HostTooLate(#[source] std::num::TryFromIntError),
    /// `date` in the guest (an agent before protocol 1.5) failed; its
    /// standard error, shown as one escaped line.
    #[error("{}", shown::bytes(.0))]
    Date(Vec<u8>),
}

/// How far the guest's clock may be from the host's before it is set.
const CLOCK_TOLERANCE: Duration = Duration::from_secs(1);

/// Sets the guest's clock from the host's, unless the
/// guest says (in its agent's answer to a ping) that it is within a
/// second already, or `always`. The guest's RTC gives it the time at
/// boot, so a fresh guest is usually right; this keeps a guest whose clock
/// drifted, or was resumed, from dating its commits wrong.
pub(in crate::agent::microvm) fn set_guest_clock(
    layout: &Layout,
    always: bool,
) -> Result<ClockSet, ClockError> {
    let client = guest::client(&layout.vsock);
    if !always {
        let (_, boot) = client.pong().map_err(ClockError::Agent)?;
        let guest_wall = boot.map(|b| b.wall_ms).filter(|&ms| ms != 0);
        if guest_wall.is_some_and(|ms| clock_is_right(ms, SystemTime::now())) {
            return Ok(ClockSet::AlreadyRight);
        }
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(ClockError::HostBeforeEpoch)?;
    let unix_ms = u64::try_from(now.as_millis()).map_err(ClockError::HostTooLate)?;
    match client.set_clock(unix_ms) {
        Ok(()) => return Ok(ClockSet::Set),
        Err(ClientError::Unsupported { .. }) => {}
        Err(e) => return Err(ClockError::Agent(e)),
    }
    // An agent before protocol 1.5: `date`, to the millisecond (`@seconds`
    // alone would leave the guest up to a second behind).
    let at = format!("@{}.{:03}", now.as_secs(), now.subsec_millis());
    let mut req = ExecRequest::new(&["date", "-u", "-s", &at]);
    req.user = Some(UserSpec::Uid(0));
    let out = client.exec_request_output(req).map_err(ClockError::Agent)?;
    if out.status.success() {
        Ok(ClockSet::Set)
    } else {
        Err(ClockError::Date(out.stderr))
    }
}

/// Whether a guest clock that read `guest_wall_ms` is within
/// [`CLOCK_TOLERANCE`] of `host_now`.
fn clock_is_right(guest_wall_ms: u64, host_now: SystemTime) -> bool {
    let Ok(host) = host_now.duration_since(UNIX_EPOCH) else {
        return false;
    };
    let host_ms = u64::try_from(host.as_millis()).unwrap_or(u64::MAX);
    host_ms.abs_diff(guest_wall_ms) <= CLOCK_TOLERANCE.as_millis() as u64
}

/// Why a `.env*` file did not reach the guest.
#[derive(Debug, thiserror::Error)]
enum EnvFileError {
    /// The host's file could not be read.
    #[error("{}: {source}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The guest agent did not take it.
    #[error("pushing {name}: {source}")]
    Push {
        name: String,
        #[source]
        source: ClientError,
    },
}

/// Copies the project's `.env*` files (regular files at its top, not
/// links) into `/workspace`, owned by the agent user; returns their names.
fn push_env_files(project: &Path, layout: &Layout) -> Result<Vec<String>, EnvFileError> {
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
        let bytes = std::fs::read(entry.path()).map_err(|source| EnvFileError::Read {
            path: entry.path(),
            source,
        })?;
        client
            .push_file(&name, 0o600, &bytes)
            .map_err(|source| EnvFileError::Push {
                name: name.clone(),
                source,
            })?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guest_clock_within_a_second_is_left_alone() {
        let host = UNIX_EPOCH + Duration::from_millis(1_800_000_000_000);
        assert!(clock_is_right(1_800_000_000_000, host));
        assert!(clock_is_right(1_800_000_000_900, host));
        assert!(clock_is_right(1_799_999_999_000, host));
        assert!(!clock_is_right(1_800_000_001_001, host));
        assert!(!clock_is_right(1_799_999_998_000, host));
        // A guest that booted in 1970 (no RTC) is set.
        assert!(!clock_is_right(5_000, host));
    }
}
