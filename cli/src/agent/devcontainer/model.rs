//! The typed plan a project's devcontainer.json becomes: what the sandbox
//! applies (environment, user, lifecycle commands, ports, features) and
//! what it does not (refused and ignored keys, warnings).
//!
//! The plan is data: it holds the file's strings as written (after
//! variable expansion), bounded in size and count, for the commands that
//! run them in the guest. Whoever prints a field shows it through
//! `crate::shown` (`status --json` through `shown::json`); `refused`,
//! `ignored` and `warnings` are already escaped and bounded.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// What the sandbox makes of a project's devcontainer.json.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DevcontainerPlan {
    /// The file read, relative to the project folder
    /// (`.devcontainer/devcontainer.json` or `.devcontainer.json`).
    pub source: String,
    /// `containerEnv` then `remoteEnv` (a `remoteEnv` value wins; its
    /// `null` removes the variable), for every process the sandbox starts
    /// for the project.
    pub env: BTreeMap<String, String>,
    /// `remoteUser`, else `containerUser`: the guest user that runs the
    /// lifecycle commands and the session (the caller checks that the
    /// image has it).
    pub remote_user: Option<String>,
    /// `onCreateCommand`: the first start only, first of the three.
    pub on_create: Vec<LifecycleCommand>,
    /// `updateContentCommand`: the first start only, after `on_create`.
    pub update_content: Vec<LifecycleCommand>,
    /// `postCreateCommand`: the first start only, after `update_content`.
    pub post_create: Vec<LifecycleCommand>,
    /// `postStartCommand`: every start.
    pub post_start: Vec<LifecycleCommand>,
    /// `postAttachCommand`: every attach.
    pub post_attach: Vec<LifecycleCommand>,
    /// `forwardPorts`, with their `portsAttributes`.
    ///
    /// SECURITY: a port is shown by name through the per-user dev-server
    /// proxy (`http://<port>.<sandbox>.localhost:P/`), never bound on the
    /// host by its number: the repository does not choose host ports.
    pub ports: Vec<PortPlan>,
    /// `portsAttributes` of port ranges, and of single ports that are not
    /// in `forwardPorts` (they apply when such a port starts listening).
    pub port_labels: Vec<PortRangePlan>,
    /// `features`, each mapped to what the image provides, the Debian
    /// packages that stand for it, or why it is not supported.
    pub features: Vec<FeaturePlan>,
    /// Keys the sandbox refuses, each with the reason.
    pub refused: Vec<String>,
    /// Other top-level keys the sandbox does not apply (names escaped).
    pub ignored: Vec<String>,
    /// Everything in the file that was skipped or changed, in words.
    pub warnings: Vec<String>,
}

/// One lifecycle command.
///
/// The string form of devcontainer.json is `["/bin/sh", "-c", STRING]`,
/// the array form runs as it is, and the object form gives one named
/// command per entry; the commands of one hook run in parallel when they
/// are named, and a hook waits for all of them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LifecycleCommand {
    /// The entry's name in the object form.
    pub name: Option<String>,
    /// The program and its arguments (never empty).
    pub argv: Vec<String>,
}

/// A forwarded port.
///
/// SECURITY: reached through the dev-server proxy by name
/// (`http://<port>.<sandbox>.localhost:P/`), never bound on the host by
/// number.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortPlan {
    pub port: u16,
    /// `portsAttributes[port].label`.
    pub label: Option<String>,
    /// `portsAttributes[port].onAutoForward` (`notify`, `openBrowser`,
    /// `openBrowserOnce`, `openPreview`, `silent` or `ignore`).
    pub on_auto_forward: Option<String>,
    /// `portsAttributes[port].protocol` (`http` or `https`).
    pub protocol: Option<String>,
}

/// `portsAttributes` of the ports `from..=to`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortRangePlan {
    pub from: u16,
    pub to: u16,
    pub label: Option<String>,
    pub on_auto_forward: Option<String>,
    pub protocol: Option<String>,
}

/// One entry of `features`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeaturePlan {
    /// The id as written (at most 256 characters).
    pub id: String,
    #[serde(flatten)]
    pub kind: FeatureKind,
}

/// What the sandbox does for a feature. Never a silent skip: a feature it
/// does not map is `Unsupported`, with the reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum FeatureKind {
    /// The guest image already has it.
    Provided { by: String },
    /// Debian 12 packages installed on the first start.
    Packages { apt: Vec<String> },
    /// Not installed, and why.
    Unsupported { reason: String },
}

impl DevcontainerPlan {
    /// The Debian packages of every `Packages` feature, sorted, each once.
    pub fn apt_packages(&self) -> Vec<String> {
        let mut all = BTreeSet::new();
        for feature in &self.features {
            if let FeatureKind::Packages { apt } = &feature.kind {
                all.extend(apt.iter().cloned());
            }
        }
        all.into_iter().collect()
    }

    /// Whether the file asks for nothing the plan carries: no
    /// environment, user, command, port or feature (not even an
    /// unsupported one). `refused`, `ignored` and `warnings` may still
    /// have something to show.
    pub fn is_empty(&self) -> bool {
        self.env.is_empty()
            && self.remote_user.is_none()
            && self.on_create.is_empty()
            && self.update_content.is_empty()
            && self.post_create.is_empty()
            && self.post_start.is_empty()
            && self.post_attach.is_empty()
            && self.ports.is_empty()
            && self.port_labels.is_empty()
            && self.features.is_empty()
    }
}
