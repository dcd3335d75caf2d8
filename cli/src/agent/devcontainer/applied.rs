//! What the sandbox made of its project's devcontainer.json on its last
//! start: `<sandbox>/devcontainer.json`, written by the supervisor alone
//! (at setup, then as each lifecycle command ends) and read by `status`,
//! the dev-server proxy (the primary port), and the commands that open
//! sessions in the guest (`exec`, `attach`, `ssh`: the environment, the
//! user and `postAttachCommand`).
//!
//! Its strings come from the repository: whoever prints them shows them
//! through `crate::shown`. Reading is bounded ([`MAX_RECORD_BYTES`]).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::model::{DevcontainerPlan, FeaturePlan, LifecycleCommand, PortPlan, PortRangePlan};
use crate::agent::registry::SandboxPaths;

/// The largest record read: a plan is bounded well below it.
pub const MAX_RECORD_BYTES: u64 = 4 << 20;

/// The record (see the module documentation).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    /// The file, relative to the project.
    pub source: String,
    /// The environment of every command and session (`containerEnv`, then
    /// `remoteEnv`).
    pub env: BTreeMap<String, String>,
    /// The guest user of the lifecycle commands and of sessions: the
    /// file's `remoteUser` (else `containerUser`) when the image has it,
    /// else `None` (the agent user).
    pub user: Option<String>,
    /// The guest port of `http://<sandbox>.localhost:P/`: the first of
    /// `forwardPorts` (`[proxy] primary_port` wins over it).
    pub primary_port: Option<u16>,
    /// `forwardPorts` with their attributes.
    pub ports: Vec<PortPlan>,
    /// `portsAttributes` of ranges and of ports not forwarded.
    pub port_labels: Vec<PortRangePlan>,
    /// Run by every `attach`.
    pub post_attach: Vec<LifecycleCommand>,
    /// `features` and what became of each.
    pub features: Vec<FeaturePlan>,
    /// The lifecycle commands of the start, each with its outcome.
    pub commands: Vec<CommandRun>,
    /// Keys refused, with the reason.
    pub refused: Vec<String>,
    /// Keys not applied.
    pub ignored: Vec<String>,
    /// What was skipped or changed, in words.
    pub warnings: Vec<String>,
}

/// One lifecycle command of a start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandRun {
    /// `onCreateCommand`, `postStartCommand`, ...
    pub hook: String,
    pub name: Option<String>,
    pub argv: Vec<String>,
    pub outcome: Outcome,
}

/// How a lifecycle command went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Outcome {
    /// Not begun yet.
    Waiting,
    Running,
    /// Exited 0.
    Succeeded,
    /// Exited otherwise, or could not run; `why` says which.
    Failed {
        why: String,
    },
    /// Not run on this start, and why (a create hook after the first start).
    Skipped {
        why: String,
    },
}

impl Applied {
    /// The record of `plan` before anything ran; `user` is the user the
    /// image has (see [`Applied::user`]).
    pub fn new(plan: &DevcontainerPlan, user: Option<String>) -> Self {
        Self {
            source: plan.source.clone(),
            env: plan.env.clone(),
            user,
            primary_port: plan.ports.first().map(|p| p.port),
            ports: plan.ports.clone(),
            port_labels: plan.port_labels.clone(),
            post_attach: plan.post_attach.clone(),
            features: plan.features.clone(),
            commands: Vec::new(),
            refused: plan.refused.clone(),
            ignored: plan.ignored.clone(),
            warnings: plan.warnings.clone(),
        }
    }

    /// The label `portsAttributes` gives guest port `port`, if any.
    pub fn label(&self, port: u16) -> Option<&str> {
        self.ports
            .iter()
            .find(|p| p.port == port)
            .and_then(|p| p.label.as_deref())
            .or_else(|| {
                self.port_labels
                    .iter()
                    .find(|r| (r.from..=r.to).contains(&port))
                    .and_then(|r| r.label.as_deref())
            })
    }

    /// The environment as an exec request carries it.
    pub fn env_pairs(&self) -> Vec<(String, String)> {
        self.env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

/// Where the record of the sandbox at `paths` lives.
pub fn path(paths: &SandboxPaths) -> PathBuf {
    paths.dir.join("devcontainer.json")
}

/// The record of the sandbox at `paths`, or `None` when its project has
/// no devcontainer.json (or the record cannot be read: it is rewritten at
/// every start).
pub fn read(paths: &SandboxPaths) -> Option<Applied> {
    read_from(&path(paths))
}

fn read_from(path: &Path) -> Option<Applied> {
    let file = std::fs::File::open(path).ok()?;
    let mut bytes = Vec::new();
    file.take(MAX_RECORD_BYTES + 1)
        .read_to_end(&mut bytes)
        .ok()?;
    if bytes.len() as u64 > MAX_RECORD_BYTES {
        return None;
    }
    serde_json::from_slice(&bytes).ok()
}

/// Writes the record (atomically), or removes it when `applied` is `None`.
pub fn write(paths: &SandboxPaths, applied: Option<&Applied>) -> std::io::Result<()> {
    let at = path(paths);
    match applied {
        Some(a) => crate::agent::fsutil::write_json_atomic(&at, a),
        None => match std::fs::remove_file(&at) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::registry::SandboxStore;

    #[test]
    fn a_record_round_trips_and_a_missing_or_huge_one_is_none() {
        let dir = keystone_test_kit::ScratchDir::new("devcontainer-applied");
        let paths = SandboxStore::at(dir.path()).paths("app");
        std::fs::create_dir_all(&paths.dir).unwrap();
        assert_eq!(read(&paths), None);
        let plan = DevcontainerPlan {
            source: ".devcontainer.json".into(),
            env: BTreeMap::from([("A".into(), "1".into())]),
            ports: vec![PortPlan {
                port: 3000,
                label: Some("web".into()),
                on_auto_forward: None,
                protocol: None,
            }],
            port_labels: vec![PortRangePlan {
                from: 9000,
                to: 9009,
                label: Some("workers".into()),
                on_auto_forward: None,
                protocol: None,
            }],
            ..DevcontainerPlan::default()
        };
        let mut applied = Applied::new(&plan, Some("root".into()));
        applied.commands.push(CommandRun {
            hook: "postStartCommand".into(),
            name: None,
            argv: vec!["true".into()],
            outcome: Outcome::Failed {
                why: "exit code 1".into(),
            },
        });
        write(&paths, Some(&applied)).unwrap();
        let back = read(&paths).unwrap();
        assert_eq!(back, applied);
        assert_eq!(back.primary_port, Some(3000));
        assert_eq!(back.label(3000), Some("web"));
        assert_eq!(back.label(9005), Some("workers"));
        assert_eq!(back.label(8080), None);
        assert_eq!(back.env_pairs(), vec![("A".to_string(), "1".to_string())]);

        std::fs::write(path(&paths), vec![b' '; MAX_RECORD_BYTES as usize + 1]).unwrap();
        assert_eq!(read(&paths), None);
        write(&paths, None).unwrap();
        assert!(!path(&paths).exists());
        write(&paths, None).unwrap();
    }
}
