//! `keystone agent ...`: sandboxes for AI coding agents.
//!
//! Layout:
//! - `mod.rs` (this file): the clap definitions and dispatch, name
//!   resolution shared by the commands;
//! - `config.rs`: `agent.toml`, environment and flag precedence;
//! - `naming.rs`: sandbox names, git project detection;
//! - `registry.rs`: the on-disk store (`sandboxes.json`, per-sandbox folders);
//! - `state.rs`: `state.json`, the sandbox lock, the liveness check;
//! - `backend.rs`: the `Backend` trait and the Kubernetes placeholder;
//! - `microvm/`: the micro-VM backend (supervisor, engines, guest agent
//!   sessions, sync);
//! - `lifecycle.rs`: start, stop, destroy;
//! - `inspect.rs`: list, status (human and `--json` output);
//! - `proxy/`: the per-user dev-server proxy and `forward`;
//! - `session.rs`: attach, exec, ssh, sync, worktree, open-vscode;
//! - `fsutil.rs`: atomic writes, flock, timestamps.

mod backend;
mod config;
pub mod devcontainer;
pub(crate) mod fsutil;
mod inspect;
mod lifecycle;
mod microvm;

pub use backend::BackendError;
pub use microvm::shares::{share_main, ShareArgs};
pub(crate) mod naming;
mod netpolicy;
mod proxy;
mod registry;
mod session;
mod state;

use std::path::PathBuf;

use clap::{Args, Subcommand};

use crate::exit_code::{self, CodedError};
use backend::{AgentKind, Backend, SandboxSpec};
use config::{Network, Settings, SyncMode};
use naming::GitLookup;
use registry::{RegistryEntry, SandboxStore};
use state::SandboxState;

pub use crate::exit_code::CANCELLED;
pub use crate::exit_code::INVALID_STATE;

const NAME_HELP: &str =
    "Sandbox name [default: the sandbox of the git repository in the current directory]";

/// `keystone agent <subcommand>`.
#[derive(Subcommand, Debug)]
pub enum AgentCommand {
    /// Start (or resume) the sandbox of a git project and make an agent ready.
    Start(StartArgs),
    /// Stop a running sandbox; its disk is kept for the next start.
    Stop(StopArgs),
    /// Open the persistent terminal session inside the sandbox.
    ///
    /// The session is the Zellij session `<sandbox>-<branch>`: detach with
    /// Ctrl-o d, and `attach` again re-attaches to it. Guest images without
    /// Zellij use a tmux session of the same name (detach with Ctrl-b d).
    Attach(AttachArgs),
    /// Run a command in the sandbox; its exit code is passed through.
    Exec(ExecArgs),
    /// Open an interactive login shell in the sandbox (over vsock, no sshd).
    Ssh(NameArg),
    /// Fetch the sandbox's commits (and optionally artifacts) into the host repository.
    Sync(SyncArgs),
    /// Manage git worktrees inside the sandbox (/workspace/.worktrees/<branch>).
    #[command(subcommand)]
    Worktree(WorktreeCommand),
    /// Show a sandbox's state, resources and nested-virtualization status.
    Status(StatusArgs),
    /// List sandboxes.
    List(ListArgs),
    /// Delete a sandbox: its registry entry, state, logs and (unless --keep-disk) its disk.
    Destroy(DestroyArgs),
    /// Open VS Code on the sandbox's /workspace (Remote-SSH over vsock; no sshd service, no network).
    OpenVscode(OpenVscodeArgs),
    /// Forward a host port to a guest port, raw TCP, until interrupted.
    ///
    /// Listens on the host's 127.0.0.1:HOST_PORT (default: the guest
    /// port's number; refused when it is in use on 127.0.0.1 or ::1) and
    /// relays each connection to GUEST_PORT in the sandbox, like `kubectl
    /// port-forward`. Web servers need no command: the dev-server proxy
    /// reaches them at http://<port>.<sandbox>.localhost:<P>/ (see
    /// `status`). A sandbox named by digits only needs all three arguments.
    Forward(ForwardArgs),
    /// Internal: the per-sandbox supervisor process started by `start`.
    #[command(name = "__supervise", hide = true)]
    Supervise(SuperviseArgs),
    /// Internal: git's `ext::` transport command for `sync` (pipes
    /// `git upload-pack /workspace` in the guest).
    #[command(name = "__git-upload-pack", hide = true)]
    GitUploadPack(SuperviseArgs),
    /// Internal: the ssh `ProxyCommand` of `open-vscode` (one `sshd -i` in
    /// the guest on stdin/stdout).
    #[command(name = "__ssh-proxy", hide = true)]
    SshProxy(NameArg),
    /// Internal: the per-user dev-server proxy (started detached by the
    /// other commands when it does not run).
    #[command(name = "__proxy", hide = true)]
    Proxy(ProxyArgs),
}

#[derive(Args, Debug)]
pub struct ProxyArgs {
    /// The loopback port to listen on.
    pub port: u16,
}

#[derive(Args, Debug)]
pub struct ForwardArgs {
    /// [NAME] GUEST_PORT [HOST_PORT]: the sandbox [default: the one of the
    /// git repository in the current directory], the port in the guest,
    /// the port on the host's 127.0.0.1 [default: GUEST_PORT].
    #[arg(value_name = "ARGS", num_args = 1..=3, required = true)]
    pub args: Vec<String>,
}

#[derive(Args, Debug)]
pub struct NameArg {
    #[arg(help = NAME_HELP)]
    pub name: Option<String>,
}

/// `open-vscode`: the sandbox becomes the ssh host `keystone-<name>`
/// (an `Include` line in ~/.ssh/config, added once), then VS Code opens it.
#[derive(Args, Debug)]
pub struct OpenVscodeArgs {
    #[arg(help = NAME_HELP)]
    pub name: Option<String>,
    /// Print the command that opens VS Code instead of running it (the
    /// default when `code` is not on the PATH).
    #[arg(long)]
    pub print: bool,
    /// Print what was set up as JSON (implies --print).
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct StartArgs {
    /// The git project to run [default: the current directory].
    pub project_path: Option<PathBuf>,
    /// Sandbox name [default: derived from the repository's directory name
    /// and a hash of its path, e.g. my-app-1a2b3c].
    #[arg(long)]
    pub name: Option<String>,
    /// Guest memory in MiB [default: 8192, or [defaults] memory].
    #[arg(long, value_name = "MB")]
    pub memory: Option<u32>,
    /// Number of vCPUs [default: 4, or [defaults] vcpus].
    #[arg(long, value_name = "N")]
    pub vcpus: Option<u32>,
    /// Give the guest VMX/SVM and /dev/kvm (default where the host allows it).
    #[arg(long, overrides_with = "no_nested")]
    pub nested: bool,
    /// Do not expose nested virtualization to the guest.
    #[arg(long, overrides_with = "nested")]
    pub no_nested: bool,
    /// Discard the sandbox's root layer (what was installed or changed
    /// outside /workspace) and saved settings before starting;
    /// /workspace and its commits are kept.
    #[arg(long)]
    pub fresh: bool,
    /// Guest networking [default: nat]: nat (outbound connections made by
    /// the host for the guest's HTTP proxy, under [network] allow and the
    /// built-in policy), none, bridge (not available: nat).
    #[arg(long, value_enum)]
    pub network: Option<Network>,
    /// When commits move to the host [default: manual]: manual (only
    /// `keystone agent sync`), auto-commit (each commit in the sandbox is
    /// fetched and fast-forwarded into the host branch), auto-idle (the same
    /// after 30 s without file changes in /workspace). Auto modes never
    /// merge: a diverged branch waits for a manual sync.
    #[arg(long, value_enum)]
    pub sync_mode: Option<SyncMode>,
    /// Do not attach to the terminal session once the sandbox is ready.
    #[arg(long)]
    pub no_attach: bool,
    /// The coding agent the terminal session opens with [default:
    /// `[defaults] agent`, else claude]: claude, codex or gemini. All three
    /// are in the guest image, set to work without permission prompts;
    /// the choice is saved with the sandbox.
    #[arg(long, value_enum)]
    pub agent: Option<AgentKind>,
    /// Write where the start's time went to FILE, as JSON: each step on
    /// the host (images, clone, daemons, engine), in the guest (kernel,
    /// /init, root, agent) and after (clock, .env, certificates), and when
    /// each service came up.
    #[arg(long, value_name = "FILE")]
    pub timings_json: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct StopArgs {
    #[arg(help = NAME_HELP)]
    pub name: Option<String>,
    /// Stop at once, without waiting for a clean guest shutdown.
    #[arg(long)]
    pub force: bool,
    /// Sync the sandbox's commits to the host before stopping.
    #[arg(long)]
    pub sync: bool,
}

#[derive(Args, Debug)]
pub struct AttachArgs {
    #[arg(help = NAME_HELP)]
    pub name: Option<String>,
    /// Attach to the session of this worktree's branch.
    #[arg(long, value_name = "BRANCH")]
    pub worktree: Option<String>,
    /// Serve the session to a browser instead of this terminal.
    #[arg(long)]
    pub web: bool,
}

#[derive(Args, Debug)]
pub struct ExecArgs {
    #[arg(help = NAME_HELP)]
    pub name: Option<String>,
    /// Run in this worktree (/workspace/.worktrees/<BRANCH>).
    #[arg(long, value_name = "B")]
    pub worktree: Option<String>,
    /// Run as this guest user.
    #[arg(long, value_name = "U")]
    pub user: Option<String>,
    /// The command to run, after `--`.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<String>,
}

#[derive(Args, Debug)]
pub struct SyncArgs {
    #[arg(help = NAME_HELP)]
    pub name: Option<String>,
    /// Also copy the sandbox's files that git does not track (build
    /// outputs, generated files) to the host, where nothing runs them.
    ///
    /// They land in the sandbox's staging folder
    /// (~/.local/state/keystone/sandboxes/NAME/artifacts/, mirroring the
    /// workspace), or in place in the project under the paths listed in
    /// agent.toml's `[sync] artifacts = ["dist"]`, overwriting what is
    /// there. Only plain files and folders come across, as mode 0644 and
    /// 0755; links, devices and bad names are refused and listed; nothing
    /// is written through a symbolic link, inside .git, .husky or the
    /// hooks folder (core.hooksPath), or as a .env* file; paths git tracks
    /// (they move as commits) are skipped; nothing on the host is deleted.
    /// With --dry-run, lists what would move and where.
    #[arg(long)]
    pub artifacts: bool,
    /// Show what would move without changing anything.
    #[arg(long)]
    pub dry_run: bool,
    /// Sync only this branch.
    #[arg(long, value_name = "B")]
    pub branch: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum WorktreeCommand {
    /// Add a worktree for BRANCH at /workspace/.worktrees/<BRANCH>, with its own session.
    Add {
        branch: String,
        /// Create the branch if it does not exist.
        #[arg(long)]
        create: bool,
        #[arg(long, help = NAME_HELP)]
        name: Option<String>,
    },
    /// List the sandbox's worktrees.
    List {
        #[arg(long, help = NAME_HELP)]
        name: Option<String>,
    },
    /// Remove the worktree of BRANCH.
    Remove {
        branch: String,
        /// Remove it even with uncommitted changes.
        #[arg(long)]
        force: bool,
        #[arg(long, help = NAME_HELP)]
        name: Option<String>,
    },
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    #[arg(help = NAME_HELP, conflicts_with = "all")]
    pub name: Option<String>,
    /// Print JSON (fields are documented in inspect.rs).
    #[arg(long)]
    pub json: bool,
    /// Every sandbox.
    #[arg(long)]
    pub all: bool,
}

#[derive(Args, Debug)]
pub struct ListArgs {
    /// Print a JSON array (fields are documented in inspect.rs).
    #[arg(long)]
    pub json: bool,
    /// Only sandboxes in this state.
    #[arg(long, value_enum, value_name = "STATE")]
    pub state: Option<SandboxState>,
}

#[derive(Args, Debug)]
pub struct DestroyArgs {
    /// The sandbox to destroy.
    pub name: String,
    /// Do not ask; stop the sandbox first if it is running.
    #[arg(long)]
    pub force: bool,
    /// Keep the sandbox's disk (disk/ in its folder).
    #[arg(long)]
    pub keep_disk: bool,
}

#[derive(Args, Debug)]
pub struct SuperviseArgs {
    pub name: String,
}

/// Runs an agent subcommand; returns the process exit code.
pub fn run(command: AgentCommand) -> anyhow::Result<i32> {
    let ctx = Context::from_env()?;
    match &command {
        AgentCommand::Start(_) => proxy::ensure_for_command(&ctx.store, &ctx.settings, true),
        AgentCommand::Supervise(_)
        | AgentCommand::GitUploadPack(_)
        | AgentCommand::SshProxy(_)
        | AgentCommand::Proxy(_) => {}
        _ => proxy::ensure_for_command(&ctx.store, &ctx.settings, false),
    }
    match command {
        AgentCommand::Start(args) => lifecycle::start(&ctx, args),
        AgentCommand::Stop(args) => lifecycle::stop(&ctx, args),
        AgentCommand::Destroy(args) => lifecycle::destroy(&ctx, args),
        AgentCommand::List(args) => inspect::list(&ctx, args),
        AgentCommand::Status(args) => inspect::status(&ctx, args),
        AgentCommand::Attach(args) => session::attach(&ctx, args),
        AgentCommand::Exec(args) => session::exec(&ctx, args),
        AgentCommand::Ssh(args) => session::ssh(&ctx, args),
        AgentCommand::Sync(args) => session::sync(&ctx, args),
        AgentCommand::Worktree(cmd) => session::worktree(&ctx, cmd),
        AgentCommand::OpenVscode(args) => session::open_vscode(&ctx, args),
        AgentCommand::Supervise(args) => session::supervise(&ctx, args),
        AgentCommand::GitUploadPack(args) => session::git_upload_pack(&ctx, args),
        AgentCommand::SshProxy(args) => session::ssh_proxy(&ctx, args),
        AgentCommand::Forward(args) => proxy::forward(&ctx, &args),
        AgentCommand::Proxy(args) => Ok(proxy::run(&ctx.store, &ctx.settings, args.port)),
    }
}

/// What every command starts from: the store, the settings from the file
/// and environment, and the backend they select (already checked usable).
pub struct Context {
    pub store: SandboxStore,
    pub settings: Settings,
    pub backend: Box<dyn Backend>,
}

impl Context {
    fn from_env() -> anyhow::Result<Self> {
        Self::with_flags(&config::FlagOverrides::default())
    }

    fn with_flags(flags: &config::FlagOverrides) -> anyhow::Result<Self> {
        let settings = config::load(flags)
            .map_err(|e| CodedError::error(exit_code::NOT_FOUND, e.to_string()))?;
        let backend = backend::for_kind(&settings);
        backend
            .check_available()
            .map_err(backend::BackendError::coded)?;
        let store = SandboxStore::from_env().map_err(store_err)?;
        Ok(Self {
            store,
            settings,
            backend,
        })
    }

    /// The sandbox `name`, or the one of the git repository around the
    /// current directory. Exit 1 if there is none.
    pub fn resolve(&self, name: Option<&str>) -> anyhow::Result<(String, RegistryEntry)> {
        let registry = self.store.registry().map_err(store_err)?;
        let name = match name {
            Some(name) => name.to_string(),
            None => {
                let cwd = std::env::current_dir().map_err(|e| {
                    CodedError::error(exit_code::NOT_FOUND, format!("current directory: {e}"))
                })?;
                let top = project_top(&cwd)?;
                match registry.find_by_project(&top) {
                    Some(name) => name.to_string(),
                    None => {
                        return Err(CodedError::error(
                            exit_code::NOT_FOUND,
                            format!(
                                "no sandbox for {}; start one with `keystone agent start`",
                                top.display()
                            ),
                        ))
                    }
                }
            }
        };
        match registry.sandboxes.get(&name) {
            Some(entry) => Ok((name, entry.clone())),
            None => Err(CodedError::error(
                exit_code::NOT_FOUND,
                format!("no sandbox named {name:?} (see `keystone agent list`)"),
            )),
        }
    }

    /// The spec of a registered sandbox: its recorded settings, or the
    /// current ones if it never recorded any.
    pub fn spec(&self, name: &str, entry: &RegistryEntry) -> anyhow::Result<SandboxSpec> {
        let paths = self.store.paths(name);
        let settings = registry::read_json::<Settings>(&paths.config)
            .map_err(store_err)?
            .unwrap_or_else(|| self.settings.clone());
        Ok(SandboxSpec {
            name: name.to_string(),
            project: entry.project.clone(),
            paths,
            settings,
        })
    }
}

/// The git top-level directory around `dir`: exit 1 if there is none, 4 if
/// git is missing.
pub fn project_top(dir: &std::path::Path) -> anyhow::Result<PathBuf> {
    match naming::git_toplevel(dir) {
        GitLookup::Repo(top) => Ok(top),
        GitLookup::NotARepo => Err(CodedError::error(
            exit_code::NOT_FOUND,
            format!("{} is not inside a git repository", dir.display()),
        )),
        GitLookup::NoGit(e) => Err(CodedError::error(
            exit_code::REQUIREMENTS,
            format!("cannot run git ({e}); install git"),
        )),
    }
}

/// Store failures are operation failures (exit 3).
pub fn store_err(e: registry::StoreError) -> anyhow::Error {
    // Exit 3, the error's own chain printed by `main`.
    anyhow::Error::new(e)
}
