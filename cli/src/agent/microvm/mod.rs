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
pub mod shares;
mod supervisor;
mod sync;
mod vscode;
mod web;

use std::io::IsTerminal;
use std::path::Path;
use std::time::{Duration, Instant};

use keystone_guest_agent::protocol::{ExecRequest, UserSpec};

use super::backend::{
    AttachOptions, Backend, BackendError, BackendResult, BackendStatus, ExecOptions, PortForward,
    SandboxSpec, StartOutcome, StopOptions, SyncOptions, SyncReport, VscodeTarget, WorktreeInfo,
    WorktreeOp,
};
use super::config::{AgentKind, Network};
use super::devcontainer;
use super::state::{ProcProbe, ProcessProbe, StateRecord};
use crate::shown;
use engine::{Layout, GUEST_WORKSPACE};

/// How long `stop` waits for the supervisor before SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);

/// The micro-VM backend.
pub struct MicroVmBackend;

fn io_failed(what: &str, e: impl std::fmt::Display) -> BackendError {
    BackendError::Failed(format!("{what}: {e}"))
}

/// The guest directory of a worktree (or the workspace).
fn guest_dir(worktree: Option<&str>) -> BackendResult<String> {
    match worktree {
        None => Ok(GUEST_WORKSPACE.to_string()),
        Some(b) => {
            check_branch(b)?;
            Ok(format!("{GUEST_WORKSPACE}/.worktrees/{b}"))
        }
    }
}

fn check_branch(b: &str) -> BackendResult<()> {
    let bad = b.is_empty()
        || b.starts_with('-')
        || b.starts_with('/')
        || b.split('/').any(|c| c.is_empty() || c == "." || c == "..")
        || b.chars()
            .any(|c| c.is_whitespace() || c.is_control() || "~^:?*[\\'\"".contains(c));
    if bad {
        return Err(BackendError::NotFound(format!("invalid branch name {b:?}")));
    }
    Ok(())
}

/// Parses `git worktree list --porcelain`, keeping the worktrees under
/// `/workspace/.worktrees/`; their names and paths are the guest's, kept
/// escaped (`shown::line`).
fn parse_worktrees(porcelain: &str) -> Vec<WorktreeInfo> {
    let prefix = format!("{GUEST_WORKSPACE}/.worktrees/");
    let mut out = Vec::new();
    for block in porcelain.split("\n\n") {
        let mut path = None;
        let mut branch = None;
        for line in block.lines() {
            if let Some(p) = line.strip_prefix("worktree ") {
                path = Some(p.to_string());
            } else if let Some(b) = line.strip_prefix("branch ") {
                branch = Some(b.trim_start_matches("refs/heads/").to_string());
            }
        }
        if let Some(path) = path.filter(|p| p.starts_with(&prefix)) {
            let branch = branch.unwrap_or_else(|| path[prefix.len()..].to_string());
            out.push(WorktreeInfo {
                branch: shown::line(&branch),
                path: shown::line(&path),
            });
        }
    }
    out
}

/// The shell command of `attach`, run by `bash -c` in the session's
/// directory. It works out the session name `<sandbox>-<branch>` in the
/// guest (the branch from `/workspace/.git/HEAD` unless a worktree names
/// it; the same name as [`guest::session_name`] gives, so no extra round
/// trip), lets the session be served on the web (`attach --web`), then
/// re-attaches a running Zellij session at once; a session that does not
/// run yet is created from a login shell, so that it gets the user's
/// login environment, with the layout of the sandbox's coding agent (the
/// agent in the first pane, a shell in the second) where the image has it;
/// images without Zellij fall back to tmux or a plain login shell.
fn attach_command(sandbox: &str, worktree: Option<&str>, agent: AgentKind) -> String {
    // Sandbox names, checked branch names and layout paths hold no quote.
    let branch = worktree.unwrap_or("");
    let layout = agents::layout_path(agent);
    format!(
        r#"{cfg}b='{branch}'
if [ -z "$b" ]; then
  h=; read -r h < {GUEST_WORKSPACE}/.git/HEAD 2>/dev/null
  case "$h" in 'ref: refs/heads/'*) b=${{h#ref: refs/heads/}} ;; '') b=main ;; *) b=HEAD ;; esac
fi
LC_ALL=C.UTF-8; s='{sandbox}'-"$b"; s=${{s//[^A-Za-z0-9_-]/-}}; unset LC_ALL
for sock in /tmp/zellij-$UID/contract_version_*/"$s"; do
  if [ -S "$sock" ] && command -v zellij >/dev/null 2>&1; then exec zellij attach --create "$s"; fi
done
exec bash -l -c 'if command -v zellij >/dev/null 2>&1; then if [ -f "$1" ]; then exec zellij attach --create "$0" options --default-layout "$1"; fi; exec zellij attach --create "$0"; elif command -v tmux >/dev/null 2>&1; then exec tmux new-session -A -s "$0"; else echo "keystone: no terminal multiplexer in the guest image: plain login shell (no re-attach)"; exec bash -l; fi' "$s" '{layout}'
"#,
        cfg = web::web_sharing_config_script(),
    )
}

impl MicroVmBackend {
    fn layout(spec: &SandboxSpec) -> Layout {
        Layout::new(&spec.paths)
    }

    /// A command or session the user asked for, in `dir`: as `user`, else
    /// the devcontainer.json's `remoteUser` (when the image has it), else
    /// the agent user; with the devcontainer.json's environment.
    fn user_request(
        spec: &SandboxSpec,
        argv: Vec<String>,
        dir: &str,
        user: Option<&str>,
    ) -> ExecRequest {
        let applied = devcontainer::applied::read(&spec.paths).unwrap_or_default();
        let mut req = guest::request(argv, dir, user.or(applied.user.as_deref()));
        req.env = applied.env_pairs();
        req
    }

    /// Runs the devcontainer.json's `postAttachCommand` in the background,
    /// its output and any failure into `logs/devcontainer.log`.
    fn post_attach(spec: &SandboxSpec, layout: &Layout) {
        let Some(applied) = devcontainer::applied::read(&spec.paths) else {
            return;
        };
        if applied.post_attach.is_empty() {
            return;
        }
        let Ok(supervisor::devcontainer::SharedLog(log)) =
            supervisor::devcontainer::open_log(layout)
        else {
            return;
        };
        let layout = layout.clone();
        let user = applied.user.clone().map(UserSpec::Name);
        let _ = std::thread::Builder::new()
            .name("post-attach".into())
            .spawn(move || {
                for command in &applied.post_attach {
                    let env = applied.env_pairs();
                    let hook = "postAttachCommand";
                    let _ = supervisor::devcontainer::run_logged(
                        &layout,
                        &log,
                        hook,
                        command,
                        env,
                        user.clone(),
                    );
                }
            });
    }

    fn run_exec(spec: &SandboxSpec, req: ExecRequest) -> BackendResult<i32> {
        let client = guest::client(&Self::layout(spec).vsock);
        let status = client
            .exec(req, std::io::stdin(), std::io::stdout(), std::io::stderr())
            .map_err(|e| guest::agent_err("exec in the sandbox", e))?;
        Ok(status.code_or_signal())
    }

    /// Runs a git command in the guest's workspace as the agent user;
    /// returns stdout (the guest's bytes: escape what is shown of it) or
    /// the error text (escaped, one line).
    fn guest_git(spec: &SandboxSpec, args: &[&str]) -> BackendResult<Result<String, String>> {
        let mut argv = vec!["git".to_string(), "-C".into(), GUEST_WORKSPACE.into()];
        argv.extend(args.iter().map(|s| s.to_string()));
        let client = guest::client(&Self::layout(spec).vsock);
        let out = client
            .exec_request_output(guest::request(argv, GUEST_WORKSPACE, None))
            .map_err(|e| guest::agent_err("git in the sandbox", e))?;
        Ok(if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).to_string())
        } else {
            Err(shown::bytes(&out.stderr))
        })
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
        progress(&format!(
            "ready in {:.1} s: {} MiB, {} vCPU(s)",
            report.total.as_secs_f64(),
            spec.settings.memory_mib,
            spec.settings.vcpus,
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
            // SAFETY: pid is our sandbox's supervisor (checked above).
            unsafe { libc::kill(pid, libc::SIGKILL) };
        } else {
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            if !wait(STOP_TIMEOUT) {
                eprintln!(
                    "keystone: the supervisor did not stop within {} s: killing it",
                    STOP_TIMEOUT.as_secs()
                );
                // SAFETY: as above.
                unsafe { libc::kill(pid, libc::SIGKILL) };
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
        if !opts.web && !std::io::stdin().is_terminal() {
            return Err(BackendError::InvalidState(
                "attach needs a terminal; use `keystone agent exec` for commands, or \
                 `keystone agent attach --web` for a browser"
                    .into(),
            ));
        }
        let dir = guest_dir(opts.worktree.as_deref())?;
        let layout = Self::layout(spec);
        if opts.web {
            let branch = match &opts.worktree {
                Some(b) => b.clone(),
                None => Self::guest_git(spec, &["rev-parse", "--abbrev-ref", "HEAD"])?
                    .map(|s| s.trim().to_string())
                    .unwrap_or_else(|_| "main".into()),
            };
            let session = guest::session_name(&spec.name, &branch);
            return web::attach_web(spec, &layout, &dir, &session);
        }
        let argv = vec![
            "bash".to_string(),
            "-c".into(),
            attach_command(&spec.name, opts.worktree.as_deref(), spec.settings.agent),
        ];
        let client = guest::client(&layout.vsock);
        Self::post_attach(spec, &layout);
        let status = guest::interactive(&client, Self::user_request(spec, argv, &dir, None))
            .map_err(|e| guest::agent_err("attach", e))?;
        Ok(status.code_or_signal())
    }

    fn exec(&self, spec: &SandboxSpec, opts: &ExecOptions) -> BackendResult<i32> {
        let dir = guest_dir(opts.worktree.as_deref())?;
        Self::run_exec(
            spec,
            Self::user_request(spec, opts.command.clone(), &dir, opts.user.as_deref()),
        )
    }

    fn ssh(&self, spec: &SandboxSpec) -> BackendResult<i32> {
        let client = guest::client(&Self::layout(spec).vsock);
        let argv = vec!["bash".into(), "-l".into()];
        let req = Self::user_request(spec, argv, GUEST_WORKSPACE, None);
        if !std::io::stdin().is_terminal() {
            // No terminal: a plain shell reading commands from stdin.
            return Self::run_exec(spec, req);
        }
        let status = guest::interactive(&client, req).map_err(|e| guest::agent_err("ssh", e))?;
        Ok(status.code_or_signal())
    }

    fn sync(&self, spec: &SandboxSpec, opts: &SyncOptions) -> BackendResult<SyncReport> {
        if opts.artifacts {
            artifacts::sync(spec, opts)
        } else {
            sync::sync(spec, opts)
        }
    }

    fn worktree(&self, spec: &SandboxSpec, op: &WorktreeOp) -> BackendResult<Vec<WorktreeInfo>> {
        match op {
            WorktreeOp::Add { branch, create } => {
                check_branch(branch)?;
                let path = format!("{GUEST_WORKSPACE}/.worktrees/{branch}");
                let args: Vec<&str> = if *create {
                    vec!["worktree", "add", "-b", branch, &path]
                } else {
                    vec!["worktree", "add", &path, branch]
                };
                if let Err(e) = Self::guest_git(spec, &args)? {
                    if !create && e.contains("invalid reference") {
                        return Err(BackendError::NotFound(format!(
                            "the sandbox has no branch {branch}; pass --create to create it"
                        )));
                    }
                    return Err(BackendError::Failed(format!("git worktree add: {e}")));
                }
            }
            WorktreeOp::Remove { branch, force } => {
                check_branch(branch)?;
                let path = format!("{GUEST_WORKSPACE}/.worktrees/{branch}");
                let mut args = vec!["worktree", "remove"];
                if *force {
                    args.push("--force");
                }
                args.push(&path);
                if let Err(e) = Self::guest_git(spec, &args)? {
                    if e.contains("is not a working tree") {
                        return Err(BackendError::NotFound(format!("no worktree {branch}")));
                    }
                    return Err(BackendError::Failed(format!("git worktree remove: {e}")));
                }
            }
            WorktreeOp::List => {}
        }
        let list = Self::guest_git(spec, &["worktree", "list", "--porcelain"])?
            .map_err(|e| BackendError::Failed(format!("git worktree list: {e}")))?;
        Ok(parse_worktrees(&list))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worktree_porcelain_keeps_sandbox_worktrees() {
        let p = "worktree /workspace\nHEAD abc\nbranch refs/heads/main\n\n\
                 worktree /workspace/.worktrees/feat/x\nHEAD def\nbranch refs/heads/feat/x\n\n\
                 worktree /workspace/.worktrees/det\nHEAD 123\ndetached\n";
        let w = parse_worktrees(p);
        assert_eq!(w.len(), 2);
        assert_eq!(w[0].branch, "feat/x");
        assert_eq!(w[0].path, "/workspace/.worktrees/feat/x");
        assert_eq!(w[1].branch, "det");
    }

    #[test]
    fn attach_command_names_the_session_like_session_name() {
        let script = attach_command("app-1", None, AgentKind::Claude);
        assert!(script.contains("b=''"), "{script}");
        assert!(script.contains("/workspace/.git/HEAD"), "{script}");
        assert!(script.contains("s='app-1'-\"$b\""), "{script}");
        assert!(script.contains("zellij attach --create"), "{script}");
        assert!(script.contains("tmux new-session -A -s"), "{script}");
        assert!(attach_command("app-1", Some("feat/x"), AgentKind::Claude).contains("b='feat/x'"));
        // A new session opens with the layout of the sandbox's agent.
        assert!(
            script.contains(r#"zellij attach --create "$0" options --default-layout "$1""#),
            "{script}"
        );
        assert!(
            attach_command("app-1", None, AgentKind::Gemini)
                .contains("\"$s\" '/usr/local/share/keystone/zellij/gemini.kdl'"),
            "the layout path is the shell's $1"
        );
        // The name the shell computes, for branches of every shape.
        for branch in ["main", "feat/x.y", "HEAD", "é-ü"] {
            let script = format!(
                "b='{branch}'; LC_ALL=C.UTF-8; s='app-1'-\"$b\"; s=${{s//[^A-Za-z0-9_-]/-}}; \
                 unset LC_ALL; printf %s \"$s\""
            );
            let Ok(out) = std::process::Command::new("bash")
                .args(["-c", &script])
                .output()
            else {
                eprintln!("SKIP: no bash on this host");
                return;
            };
            assert_eq!(
                String::from_utf8_lossy(&out.stdout),
                guest::session_name("app-1", branch),
                "{branch}"
            );
        }
    }

    #[test]
    fn branch_names_cannot_escape_the_worktrees_folder() {
        for bad in ["", "../x", "a/../b", "-x", "/abs", "a b", "a'b"] {
            assert!(check_branch(bad).is_err(), "{bad}");
        }
        check_branch("feat/x-1").unwrap();
        assert_eq!(
            guest_dir(Some("feat/x")).unwrap(),
            "/workspace/.worktrees/feat/x"
        );
        assert_eq!(guest_dir(None).unwrap(), "/workspace");
    }
}
