//! The `Backend` trait: what runs a sandbox. The command layer (argument
//! checks, config, registry, state, locks, output) is backend-neutral and
//! calls these methods only once a command's preconditions hold.
//!
//! Contract for implementations:
//! - `start` boots the sandbox and returns once it is ready, with the pid
//!   of a supervisor process that stays alive while the sandbox runs.
//!   That process must run as `keystone agent __supervise <NAME> ...`
//!   ([`SUPERVISOR_SUBCOMMAND`](super::state::SUPERVISOR_SUBCOMMAND)):
//!   the liveness check reads its `/proc/<pid>/cmdline`. The supervisor
//!   alone writes the sandbox's run state (`starting`, `running`,
//!   `stopping`, `stopped`, `error`; see `state.rs`).
//! - The command layer holds the sandbox lock during `start`, `stop` and
//!   `destroy`, and calls `attach`, `exec`, `ssh`, `sync`, `worktree` and
//!   `open_vscode` only for a sandbox whose supervisor is alive.
//! - Errors are [`BackendError`]s; each maps to a SPEC.md exit code.
//!   Never report success for work that was not done.

use std::path::PathBuf;

use super::config::{BackendKind, Settings};
use super::microvm::{ContentError, GitError};
use super::registry::SandboxPaths;
use super::state::{NestedStatus, SandboxState};
use super::{CANCELLED, INVALID_STATE};
use crate::exit_code;

/// Everything a backend knows about one sandbox.
#[derive(Clone, Debug)]
pub struct SandboxSpec {
    pub name: String,
    /// Absolute path of the project's git top-level directory on the host.
    pub project: PathBuf,
    /// The sandbox's folder, `config.json`, `state.json`, `logs/`, `disk/`.
    pub paths: SandboxPaths,
    /// The resolved settings (memory, vCPUs, nesting, network, engine, ...).
    pub settings: Settings,
}

/// Which coding agent the sandbox's session opens with (a setting, saved
/// with the others).
pub use super::config::AgentKind;

/// What a successful start reports.
#[derive(Clone, Debug)]
pub struct StartOutcome {
    /// The supervisor process (see the module contract).
    pub supervisor_pid: i32,
    /// The engine actually used (`vmm` or `qemu`).
    pub engine: String,
    pub nested: NestedStatus,
    /// Why nesting is unavailable, when it is.
    pub nested_detail: Option<String>,
    /// The steps of the start and how long each took, in order.
    pub phases: Vec<(String, std::time::Duration)>,
    /// From the launch of the supervisor to ready.
    pub total: std::time::Duration,
}

/// `stop` options.
#[derive(Clone, Debug, Default)]
pub struct StopOptions {
    /// Do not wait for a clean guest shutdown.
    pub force: bool,
}

/// `attach` options.
#[derive(Clone, Debug, Default)]
pub struct AttachOptions {
    pub worktree: Option<String>,
    /// Serve the session to a browser instead of this terminal.
    pub web: bool,
}

/// `exec` options.
#[derive(Clone, Debug, Default)]
pub struct ExecOptions {
    pub worktree: Option<String>,
    pub user: Option<String>,
    /// The command and its arguments (at least one word).
    pub command: Vec<String>,
}

/// `sync` options.
#[derive(Clone, Debug, Default)]
pub struct SyncOptions {
    pub artifacts: bool,
    pub dry_run: bool,
    pub branch: Option<String>,
}

/// What a sync did (or, with `dry_run`, would do).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct SyncReport {
    /// One line per updated ref, e.g. `main: 1a2b3c..4d5e6f`.
    pub refs: Vec<String>,
    /// Lines printed as they are under the refs (the commits).
    pub details: Vec<String>,
    /// Artifact paths copied.
    pub artifacts: Vec<String>,
}

/// A `worktree` subcommand.
#[derive(Clone, Debug)]
pub enum WorktreeOp {
    Add { branch: String, create: bool },
    List,
    Remove { branch: String, force: bool },
}

/// One worktree in the sandbox.
#[derive(Clone, Debug, serde::Serialize)]
pub struct WorktreeInfo {
    pub branch: String,
    /// Path inside the guest, `/workspace/.worktrees/<branch>`.
    pub path: String,
}

/// A TCP port listening in the guest and what the host does with it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PortForward {
    /// The port in the guest.
    pub guest_port: u16,
    /// The address it listens on in the guest (e.g. `127.0.0.1`, `::`).
    pub guest_address: String,
    /// The port on the host's 127.0.0.1 that reaches it, when forwarded.
    pub host_port: Option<u16>,
    /// `http://<sandbox>.localhost:<host_port>`, when forwarded.
    pub url: Option<String>,
    /// Why it is not forwarded, when it is not.
    pub note: Option<String>,
}

/// Where VS Code attaches to a sandbox (`open-vscode`).
#[derive(Clone, Debug, serde::Serialize)]
pub struct VscodeTarget {
    /// The ssh host name VS Code's Remote-SSH connects to.
    pub ssh_host: String,
    /// The ssh config file that defines it.
    pub ssh_config: std::path::PathBuf,
    /// The folder to open in the sandbox.
    pub folder: String,
    /// What the user should know (changes made, settings needed).
    pub notes: Vec<String>,
}

/// Live details a running sandbox reports (for `status`).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct BackendStatus {
    pub state: Option<SandboxState>,
    /// The guest's listening TCP ports and their host forwards.
    pub ports: Vec<PortForward>,
    pub worktrees: Vec<WorktreeInfo>,
    pub nested: Option<NestedStatus>,
}

/// Backend failures, each with its SPEC.md exit code.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The backend exists in config but not in code (exit 4). `detail`
    /// names the backend's settings from the config, if any.
    #[error(
        "the {backend} backend is not implemented yet{detail}; set [backend] type = \"microvm\""
    )]
    NotImplemented {
        backend: &'static str,
        detail: String,
    },
    /// Host requirements are missing, e.g. no `/dev/kvm` (exit 4).
    #[error("{0}")]
    Requirements(String),
    /// The sandbox is in the wrong state for this (exit 2).
    #[error("{0}")]
    InvalidState(String),
    /// Something named does not exist, e.g. a worktree (exit 1).
    #[error("{0}")]
    NotFound(String),
    /// A merge conflict during sync (exit 3).
    #[error("{0}")]
    Conflict(String),
    /// The user said no (exit 5).
    #[error("{0}")]
    Cancelled(String),
    /// Any other failure (exit 3).
    #[error("{0}")]
    Failed(String),
    /// A step failed on the host's files or processes (exit 3).
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// The guest agent could not be reached or did not do it (exit 3).
    #[error("{what}: {source}")]
    Agent {
        what: String,
        #[source]
        source: keystone_guest_agent::client::ClientError,
    },
    /// A git command on the host failed (exit 3); `what` names the step
    /// where git's words alone would not say it.
    #[error("{}{source}", step(.what))]
    Git {
        what: Option<String>,
        #[source]
        source: GitError,
    },
    /// Git on the host could not be readied to take the sandbox's content
    /// (exit 3).
    #[error("{0}")]
    Content(#[source] ContentError),
}

/// `what: ` before a cause, when there is a `what`.
fn step(what: &Option<String>) -> String {
    what.as_ref().map(|w| format!("{w}: ")).unwrap_or_default()
}

impl From<ContentError> for BackendError {
    fn from(source: ContentError) -> Self {
        Self::Content(source)
    }
}

impl From<GitError> for BackendError {
    /// Git's words alone.
    fn from(source: GitError) -> Self {
        Self::Git { what: None, source }
    }
}

impl BackendError {
    /// The SPEC.md exit code.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::NotImplemented { .. } | Self::Requirements(_) => exit_code::REQUIREMENTS,
            Self::InvalidState(_) => INVALID_STATE,
            Self::NotFound(_) => exit_code::NOT_FOUND,
            Self::Cancelled(_) => CANCELLED,
            Self::Conflict(_)
            | Self::Failed(_)
            | Self::Io { .. }
            | Self::Agent { .. }
            | Self::Git { .. }
            | Self::Content(_) => exit_code::OPERATION_FAILED,
        }
    }

    /// The error a process reported with exit code `code` (the
    /// supervisor's failures reach `start` so).
    pub fn with_code(code: i32, message: String) -> Self {
        match code {
            exit_code::REQUIREMENTS => Self::Requirements(message),
            INVALID_STATE => Self::InvalidState(message),
            exit_code::NOT_FOUND => Self::NotFound(message),
            CANCELLED => Self::Cancelled(message),
            _ => Self::Failed(message),
        }
    }

    /// `what` failed because of `source` on the host.
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            what: what.into(),
            source,
        }
    }

    /// `what` failed because of git on the host.
    pub fn git(what: impl Into<String>, source: GitError) -> Self {
        Self::Git {
            what: Some(what.into()),
            source,
        }
    }

    /// As an `anyhow` error: the exit code and the causes go along
    /// (`exit_code::for_error` finds the code, `main` prints the chain).
    pub fn coded(self) -> anyhow::Error {
        anyhow::Error::new(self)
    }
}

pub type BackendResult<T> = Result<T, BackendError>;

/// What runs sandboxes. See the module documentation for the contract.
pub trait Backend {
    /// Fails if this backend cannot be used at all on this host or build.
    /// Every command calls it first, before touching any sandbox.
    fn check_available(&self) -> BackendResult<()>;

    /// Whether a sandbox of this backend gets outbound networking (`nat`);
    /// `status` reports the configured value as not available otherwise
    /// rather than claim it.
    fn network_available(&self) -> bool {
        false
    }

    /// Boots the sandbox and makes the agent ready; `progress` receives
    /// one-line human updates ("booting kernel", ...).
    fn start(
        &self,
        sandbox: &SandboxSpec,
        progress: &mut dyn FnMut(&str),
    ) -> BackendResult<StartOutcome>;

    /// Shuts the sandbox down; the supervisor exits.
    fn stop(&self, sandbox: &SandboxSpec, opts: &StopOptions) -> BackendResult<()>;

    /// Interactive session on this terminal (or the web); returns the exit
    /// code to leave with.
    fn attach(&self, sandbox: &SandboxSpec, opts: &AttachOptions) -> BackendResult<i32>;

    /// Runs a command in the guest; returns its exit code.
    fn exec(&self, sandbox: &SandboxSpec, opts: &ExecOptions) -> BackendResult<i32>;

    /// Interactive login shell over vsock; returns the shell's exit code.
    fn ssh(&self, sandbox: &SandboxSpec) -> BackendResult<i32>;

    /// Fetches the sandbox's commits (and artifacts) into the host repo.
    fn sync(&self, sandbox: &SandboxSpec, opts: &SyncOptions) -> BackendResult<SyncReport>;

    /// Adds, lists or removes a worktree; returns the worktrees after it.
    fn worktree(&self, sandbox: &SandboxSpec, op: &WorktreeOp) -> BackendResult<Vec<WorktreeInfo>>;

    /// Live details of a running sandbox.
    fn status(&self, sandbox: &SandboxSpec) -> BackendResult<BackendStatus>;

    /// Makes the sandbox reachable by VS Code's Remote-SSH and says how.
    fn open_vscode(&self, sandbox: &SandboxSpec) -> BackendResult<VscodeTarget>;

    /// Releases anything the backend holds for a sandbox outside its folder
    /// (the command layer removes the folder and registry entry). Called
    /// with no supervisor alive.
    fn destroy(&self, sandbox: &SandboxSpec) -> BackendResult<()>;

    /// Body of the hidden `__supervise NAME` subcommand: runs the
    /// sandbox's VM and services, from the plan `start` writes to `plan`
    /// (its standard input), until it stops; returns the exit code.
    fn supervise(&self, name: &str, plan: &mut dyn std::io::Read) -> BackendResult<i32>;
}

/// The backend the settings select.
pub fn for_kind(settings: &Settings) -> Box<dyn Backend> {
    match settings.backend {
        BackendKind::MicroVm => Box::new(super::microvm::MicroVmBackend),
        BackendKind::Kubernetes => Box::new(KubernetesBackend {
            target: settings.kubernetes.describe(),
        }),
    }
}

/// Kubernetes: accepted by config, not implemented (SPEC user story 7).
/// `target` is its `[backend.kubernetes]` settings, for the message.
pub struct KubernetesBackend {
    target: Option<String>,
}

impl KubernetesBackend {
    fn no<T>(&self) -> BackendResult<T> {
        Err(BackendError::NotImplemented {
            backend: "kubernetes",
            detail: self
                .target
                .as_ref()
                .map(|t| format!(" (asked for [backend.kubernetes] {t})"))
                .unwrap_or_default(),
        })
    }
}

impl Backend for KubernetesBackend {
    fn check_available(&self) -> BackendResult<()> {
        self.no()
    }
    fn start(&self, _: &SandboxSpec, _: &mut dyn FnMut(&str)) -> BackendResult<StartOutcome> {
        self.no()
    }
    fn stop(&self, _: &SandboxSpec, _: &StopOptions) -> BackendResult<()> {
        self.no()
    }
    fn attach(&self, _: &SandboxSpec, _: &AttachOptions) -> BackendResult<i32> {
        self.no()
    }
    fn exec(&self, _: &SandboxSpec, _: &ExecOptions) -> BackendResult<i32> {
        self.no()
    }
    fn ssh(&self, _: &SandboxSpec) -> BackendResult<i32> {
        self.no()
    }
    fn sync(&self, _: &SandboxSpec, _: &SyncOptions) -> BackendResult<SyncReport> {
        self.no()
    }
    fn worktree(&self, _: &SandboxSpec, _: &WorktreeOp) -> BackendResult<Vec<WorktreeInfo>> {
        self.no()
    }
    fn status(&self, _: &SandboxSpec) -> BackendResult<BackendStatus> {
        self.no()
    }
    fn open_vscode(&self, _: &SandboxSpec) -> BackendResult<VscodeTarget> {
        self.no()
    }
    fn destroy(&self, _: &SandboxSpec) -> BackendResult<()> {
        self.no()
    }
    fn supervise(&self, _: &str, _: &mut dyn std::io::Read) -> BackendResult<i32> {
        self.no()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_spec() {
        let mut settings = Settings {
            backend: BackendKind::Kubernetes,
            ..Settings::default()
        };
        let err = for_kind(&settings).check_available().unwrap_err();
        assert_eq!(err.exit_code(), 4);
        assert_eq!(
            err.to_string(),
            "the kubernetes backend is not implemented yet; set [backend] type = \"microvm\""
        );
        settings.kubernetes.namespace = Some("agents".into());
        settings.kubernetes.storage_class = Some("fast".into());
        let err = for_kind(&settings).check_available().unwrap_err();
        assert_eq!(err.exit_code(), 4);
        assert_eq!(
            err.to_string(),
            "the kubernetes backend is not implemented yet (asked for [backend.kubernetes] \
             namespace = \"agents\", storage_class = \"fast\"); set [backend] type = \"microvm\""
        );
        let vm = for_kind(&Settings::default());
        vm.check_available().unwrap();
        // No guest behind the sandbox's socket: a clean failure, exit 3.
        let err = vm.ssh_for_test().unwrap_err();
        assert_eq!(err.exit_code(), 3);
        assert!(
            err.to_string().contains("cannot reach the guest agent"),
            "{err}"
        );
        assert_eq!(BackendError::InvalidState("x".into()).exit_code(), 2);
        assert_eq!(BackendError::Cancelled("x".into()).exit_code(), 5);
        assert_eq!(BackendError::NotFound("x".into()).exit_code(), 1);
        assert_eq!(
            crate::exit_code::for_error(&BackendError::Conflict("x".into()).coded()),
            3
        );
    }

    trait SshForTest {
        fn ssh_for_test(&self) -> BackendResult<i32>;
    }
    impl SshForTest for Box<dyn Backend> {
        fn ssh_for_test(&self) -> BackendResult<i32> {
            let spec = SandboxSpec {
                name: "t".into(),
                project: "/p".into(),
                paths: super::super::registry::SandboxStore::at("/nonexistent").paths("t"),
                settings: Settings::default(),
            };
            self.ssh(&spec)
        }
    }
}
