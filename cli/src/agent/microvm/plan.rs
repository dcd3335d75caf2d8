//! The supervisor's plan: everything `start` resolved for one run of a
//! sandbox, handed to `keystone agent __supervise NAME` on its standard
//! input as one JSON document, so that the supervisor never re-reads the
//! configuration or re-decides what `start` decided.
//!
//! The supervisor then does the whole start (images, clone, daemons,
//! engine, setup in the guest) and reports over the readiness pipe
//! (`readiness.rs`); `start` only shows what it reports.

use std::io::Read;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::super::backend::SandboxSpec;
use super::super::config::Settings;
use super::super::registry::SandboxPaths;

/// The largest plan the supervisor reads.
const MAX_PLAN_BYTES: u64 = 1 << 20;

/// One run of a sandbox, as `start` resolved it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SupervisorPlan {
    pub name: String,
    /// The project's git top-level folder on the host.
    pub project: PathBuf,
    pub paths: SandboxPaths,
    pub settings: Settings,
    /// How long the guest agent may take to answer once the engine runs.
    pub agent_timeout_s: u64,
    /// How long the other services and the setup may take after that.
    pub services_timeout_s: u64,
    /// The level `start` logs at (`--log-level`).
    #[serde(default)]
    pub log_level: String,
}

/// Why a plan could not be read.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("reading the supervisor's plan from its standard input: {0}")]
    Read(#[source] std::io::Error),
    #[error("the supervisor's plan is not valid: {0}")]
    Parse(#[source] serde_json::Error),
    #[error("the supervisor's plan is larger than {MAX_PLAN_BYTES} bytes")]
    TooLarge,
    #[error(
        "the plan is for sandbox {planned}, not {asked}: the supervisor is started by \
         `keystone agent start`, not by hand"
    )]
    OtherSandbox { planned: String, asked: String },
}

impl SupervisorPlan {
    /// The plan of a start of `spec`.
    pub fn new(spec: &SandboxSpec, agent_timeout_s: u64, services_timeout_s: u64) -> Self {
        Self {
            name: spec.name.clone(),
            project: spec.project.clone(),
            paths: spec.paths.clone(),
            settings: spec.settings.clone(),
            agent_timeout_s,
            services_timeout_s,
            log_level: log::max_level().to_string(),
        }
    }

    /// The supervisor's level: its log tells the boot's steps (info) at
    /// least, more when `start` ran with `--log-level debug` or `trace`.
    pub fn log_level(&self) -> log::LevelFilter {
        let asked = self.log_level.parse().unwrap_or(log::LevelFilter::Info);
        asked.max(log::LevelFilter::Info)
    }

    /// The sandbox the plan runs.
    pub fn spec(&self) -> SandboxSpec {
        SandboxSpec {
            name: self.name.clone(),
            project: self.project.clone(),
            paths: self.paths.clone(),
            settings: self.settings.clone(),
        }
    }

    /// Reads the plan for sandbox `name` from `input` (to its end).
    pub fn read(input: &mut dyn Read, name: &str) -> Result<Self, PlanError> {
        let mut bytes = Vec::new();
        input
            .take(MAX_PLAN_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(PlanError::Read)?;
        if bytes.len() as u64 > MAX_PLAN_BYTES {
            return Err(PlanError::TooLarge);
        }
        let plan: Self = serde_json::from_slice(&bytes).map_err(PlanError::Parse)?;
        if plan.name != name {
            return Err(PlanError::OtherSandbox {
                planned: plan.name,
                asked: name.to_string(),
            });
        }
        Ok(plan)
    }

    /// The plan as the supervisor reads it.
    pub fn to_json(&self) -> Vec<u8> {
        // Paths, strings and numbers: serialising cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::registry::SandboxStore;

    fn spec() -> SandboxSpec {
        SandboxSpec {
            name: "app-1".into(),
            project: "/src/app".into(),
            paths: SandboxStore::at("/state").paths("app-1"),
            settings: Settings::default(),
        }
    }

    #[test]
    fn a_plan_round_trips_and_names_its_sandbox() {
        let plan = SupervisorPlan::new(&spec(), 600, 180);
        let read = SupervisorPlan::read(&mut &plan.to_json()[..], "app-1").unwrap();
        assert_eq!(read.spec().paths.dir, spec().paths.dir);
        assert_eq!(read.settings.memory_mib, Settings::default().memory_mib);
        assert_eq!((read.agent_timeout_s, read.services_timeout_s), (600, 180));
        let err = SupervisorPlan::read(&mut &plan.to_json()[..], "other").unwrap_err();
        assert!(err.to_string().contains("not by hand"), "{err}");
        let err = SupervisorPlan::read(&mut &b"{}"[..], "app-1").unwrap_err();
        assert!(matches!(err, PlanError::Parse(_)), "{err}");
        let big = vec![b' '; (MAX_PLAN_BYTES + 10) as usize];
        let err = SupervisorPlan::read(&mut &big[..], "app-1").unwrap_err();
        assert!(matches!(err, PlanError::TooLarge), "{err}");
    }
}
