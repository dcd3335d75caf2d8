//! The per-sandbox supervisor (`keystone agent __supervise NAME`): the
//! one process that runs a sandbox, from its start to its stop.
//!
//! `start` hands it a [`SupervisorPlan`] on its standard input and reads
//! its reports on the readiness pipe (`readiness.rs`). In order:
//! 1. it records itself as the sandbox's supervisor (`starting`; it is
//!    the only writer of the run state, see `state.rs`);
//! 2. `prepare.rs`: the engine, the guest kernel and root file system
//!    (built into the cache the first time), the agent's initramfs and the
//!    sandbox-private clone;
//! 3. `engines.rs`: the share daemons and the vsock backend, then QEMU or
//!    our VMM;
//! 4. `watch.rs`: waits for the guest agent, runs the setup in the guest
//!    (`setup.rs`), opens the services (egress, auto-sync, the port watch)
//!    and records `running` once every one has settled; then serves until
//!    a stop signal or the guest's end, and shuts the guest down cleanly;
//! 5. it records how the sandbox ended (`stopped` or `error` and why).
//!
//! Every line it writes goes to the sandbox's supervisor log (bounded).

pub(super) mod devcontainer;
mod engines;
mod memory;
mod prepare;
pub(super) mod setup;
mod watch;

use std::io::Read;
use std::sync::Arc;

use super::super::backend::{BackendError, BackendResult, SandboxSpec};
use super::super::config::{Network, SyncMode};
use super::super::registry::StoreError;
use super::super::state::{RunStateWriter, SandboxState};
use super::engine::Layout;
use super::logfile;
use super::plan::{PlanError, SupervisorPlan};
use super::readiness::{Readiness, Service};
use super::shares::ShareError;
use crate::exit_code;

/// Why a sandbox could not be run.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error("the sandbox's run state")]
    State(#[from] StoreError),
    /// What `start` checked and made before the boot (with its exit code).
    #[error(transparent)]
    Prepare(#[from] BackendError),
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Share(#[from] ShareError),
    #[error("cannot start the VM")]
    Vm(#[source] vmm::StartError),
    #[error("the vsock backend")]
    Vsock(#[source] vsock_lite::VsockError),
    #[error("{what} did not come up within {secs} s; stopped the VM (see {log})")]
    Timeout {
        what: &'static str,
        secs: u64,
        log: String,
    },
}

impl SupervisorError {
    /// `what`, caused by `source`.
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            what: what.into(),
            source,
        }
    }

    /// The exit code `start` leaves with.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Prepare(e) => e.exit_code(),
            _ => exit_code::OPERATION_FAILED,
        }
    }
}

/// The services `start` waits for with `spec`'s settings.
pub fn expected_services(spec: &SandboxSpec) -> Vec<Service> {
    let mut v = vec![Service::Agent, Service::Setup, Service::Ports];
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
pub struct Ended {
    /// A stop was asked for (a termination signal).
    pub requested: bool,
    /// The engine exited cleanly.
    pub clean: bool,
    pub detail: String,
}

/// The error and its causes on one line, as the user reads it.
fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut cause = err.source();
    while let Some(e) = cause {
        let more = e.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        cause = e.source();
    }
    text
}

/// Body of `keystone agent __supervise NAME`: reads the plan from `input`.
pub fn supervise(name: &str, input: &mut dyn Read) -> BackendResult<i32> {
    // Before any thread starts, so that they all leave the signals to it.
    let stops = crate::signals::termination_channel()
        .map_err(|e| BackendError::Failed(format!("cannot watch for stop signals: {e}")))?;
    // The shares keep one descriptor per node up to half of this limit.
    virtiofsd_lite::raise_fd_limit();
    // Taken before any descriptor is made, which could get its number.
    let ready_pipe = Readiness::inherited_pipe();
    let plan = SupervisorPlan::read(input, name).map_err(|e| BackendError::Failed(chain(&e)))?;
    let spec = plan.spec();
    let layout = Layout::new(&spec.paths);
    crate::logging::daemon("supervisor", crate::logging::stderr_line, plan.log_level());
    // Every line of this process and of QEMU, bounded (dropped at return).
    let _output = logfile::capture_output(&layout.supervisor_log)
        .map_err(|e| log::warn!("the supervisor log is not bounded: {e}"))
        .ok();
    log::info!(
        "sandbox {} supervisor pid {}",
        spec.name,
        std::process::id()
    );
    let ready = Arc::new(Readiness::new(ready_pipe, &expected_services(&spec)));
    let state = match RunStateWriter::begin(&spec.paths) {
        Ok(state) => state,
        Err(e) => {
            let err = SupervisorError::from(e);
            ready.failed(err.exit_code(), &chain(&err));
            return Ok(err.exit_code());
        }
    };
    let result = prepare::prepare(&spec, &layout, &ready)
        .map_err(SupervisorError::from)
        .and_then(|prepared| {
            let run = watch::Run {
                plan: &plan,
                spec: &spec,
                layout: &layout,
                ready: &ready,
                state: &state,
                stops: &stops,
            };
            let mut launched = engines::launch(&spec, &layout, &prepared, &ready)?;
            let ended = watch::watch(&run, &prepared, &mut launched);
            drop(launched);
            ended
        });
    let (end, error) = match &result {
        Ok(e) if e.requested || e.clean => (SandboxState::Stopped, None),
        Ok(e) => (
            SandboxState::Error,
            Some(format!(
                "the VM stopped unexpectedly ({}); see {}",
                e.detail,
                layout.console_log.display()
            )),
        ),
        Err(e) => (SandboxState::Error, Some(chain(e))),
    };
    log::info!(
        "guest ended: {}",
        match &result {
            Ok(e) => e.detail.clone(),
            Err(e) => chain(e),
        }
    );
    let code = match &result {
        Err(e) => e.exit_code(),
        Ok(_) if end == SandboxState::Stopped => exit_code::OK,
        Ok(_) => exit_code::OPERATION_FAILED,
    };
    // Recorded before `start` hears of the failure, so that what it and
    // any command after it read is the end state, never `starting`.
    if let Err(e) = state.ended(end, error.clone()) {
        log::warn!("cannot record the end state: {e}");
    }
    if let Some(error) = &error {
        // Only heard while `start` waits (the pipe is closed after ready).
        ready.failed(code, error);
    }
    let _ = std::fs::remove_file(layout.qemu_pid());
    Ok(code)
}
