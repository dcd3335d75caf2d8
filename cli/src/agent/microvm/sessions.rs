//! The user's sessions and commands in the guest: `attach` (Zellij,
//! tmux or a login shell; `--web` through `web.rs`), `exec` and `ssh`,
//! each in the workspace or a worktree, with the devcontainer.json's user
//! and environment, and its `postAttachCommand` on attach.
//!
//! SECURITY: these pass the guest program's output and terminal byte for
//! byte (as `ssh` and `docker exec` do).

use std::io::IsTerminal;

use keystone_guest_agent::protocol::{ExecRequest, UserSpec};

use super::super::backend::{AttachOptions, BackendError, BackendResult, ExecOptions, SandboxSpec};
use super::super::config::AgentKind;
use super::super::devcontainer;
use super::engine::{Layout, GUEST_WORKSPACE};
use super::worktrees::{self, guest_dir};
use super::{agents, guest, supervisor, web};

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
    let Ok(supervisor::devcontainer::SharedLog(log)) = supervisor::devcontainer::open_log(layout)
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
    let client = guest::client(&Layout::new(&spec.paths).vsock);
    let status = client
        .exec(req, std::io::stdin(), std::io::stdout(), std::io::stderr())
        .map_err(|e| guest::agent_err("exec in the sandbox", e))?;
    Ok(status.code_or_signal())
}

pub(super) fn attach(spec: &SandboxSpec, opts: &AttachOptions) -> BackendResult<i32> {
    if !opts.web && !std::io::stdin().is_terminal() {
        return Err(BackendError::InvalidState(
            "attach needs a terminal; use `keystone agent exec` for commands, or \
             `keystone agent attach --web` for a browser"
                .into(),
        ));
    }
    let dir = guest_dir(opts.worktree.as_deref())?;
    let layout = Layout::new(&spec.paths);
    if opts.web {
        let branch = match &opts.worktree {
            Some(b) => b.clone(),
            None => worktrees::guest_git(spec, &["rev-parse", "--abbrev-ref", "HEAD"])?
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
    post_attach(spec, &layout);
    let status = guest::interactive(&client, user_request(spec, argv, &dir, None))
        .map_err(|e| guest::agent_err("attach", e))?;
    Ok(status.code_or_signal())
}

pub(super) fn exec(spec: &SandboxSpec, opts: &ExecOptions) -> BackendResult<i32> {
    let dir = guest_dir(opts.worktree.as_deref())?;
    run_exec(
        spec,
        user_request(spec, opts.command.clone(), &dir, opts.user.as_deref()),
    )
}

pub(super) fn ssh(spec: &SandboxSpec) -> BackendResult<i32> {
    let client = guest::client(&Layout::new(&spec.paths).vsock);
    let argv = vec!["bash".into(), "-l".into()];
    let req = user_request(spec, argv, GUEST_WORKSPACE, None);
    if !std::io::stdin().is_terminal() {
        // No terminal: a plain shell reading commands from stdin.
        return run_exec(spec, req);
    }
    let status = guest::interactive(&client, req).map_err(|e| guest::agent_err("ssh", e))?;
    Ok(status.code_or_signal())
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
