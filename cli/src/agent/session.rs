//! Commands that talk to a running sandbox: `attach`, `exec`, `ssh`,
//! `sync`, `worktree`, `open-vscode`, and the hidden `__supervise`. The
//! command layer checks that the sandbox exists (exit 1) and that its
//! supervisor is alive (exit 2) before handing over to the backend.
//!
//! SECURITY: `exec`, `ssh` and `attach` give this terminal the guest
//! program's own output byte for byte, as `ssh` and `docker exec` do:
//! that is what they are for. What these commands print about the sandbox
//! (worktrees, synced branches) is the guest's text, escaped (`shown`).

use anyhow::Result;

use super::backend::{
    AttachOptions, BackendError, ExecOptions, SandboxSpec, SyncOptions, VscodeTarget, WorktreeInfo,
    WorktreeOp,
};
use super::state::{ProcProbe, StateRecord, SyncRecord};
use super::{
    store_err, AttachArgs, Context, ExecArgs, NameArg, OpenVscodeArgs, SuperviseArgs, SyncArgs,
};
use super::{WorktreeCommand, INVALID_STATE};
use crate::exit_code::{self, CodedError};
use crate::shown;

/// The sandbox named (or of this repository), which must be running.
fn running(ctx: &Context, name: Option<&str>) -> Result<(SandboxSpec, StateRecord)> {
    let (name, entry) = ctx.resolve(name)?;
    let spec = ctx.spec(&name, &entry)?;
    let record = StateRecord::load_checked(&spec.paths, &name, &ProcProbe).map_err(store_err)?;
    if !record.is_active() {
        let state = match &record.last_error {
            Some(err) => format!("{}: {err}", record.state),
            None => record.state.to_string(),
        };
        return Err(CodedError::error(
            INVALID_STATE,
            format!(
                "sandbox {name} is not running ({state}); start it with `keystone agent start`"
            ),
        ));
    }
    Ok((spec, record))
}

/// `keystone agent attach`.
pub fn attach(ctx: &Context, args: AttachArgs) -> Result<i32> {
    let (spec, _) = running(ctx, args.name.as_deref())?;
    let opts = AttachOptions {
        worktree: args.worktree,
        web: args.web,
    };
    ctx.backend
        .attach(&spec, &opts)
        .map_err(BackendError::coded)
}

/// `keystone agent exec`: the command's exit code becomes ours.
pub fn exec(ctx: &Context, args: ExecArgs) -> Result<i32> {
    let (spec, _) = running(ctx, args.name.as_deref())?;
    let opts = ExecOptions {
        worktree: args.worktree,
        user: args.user,
        command: args.command,
    };
    ctx.backend.exec(&spec, &opts).map_err(BackendError::coded)
}

/// `keystone agent ssh`.
pub fn ssh(ctx: &Context, args: NameArg) -> Result<i32> {
    let (spec, _) = running(ctx, args.name.as_deref())?;
    ctx.backend.ssh(&spec).map_err(BackendError::coded)
}

/// `keystone agent sync`.
pub fn sync(ctx: &Context, args: SyncArgs) -> Result<i32> {
    let (spec, _) = running(ctx, args.name.as_deref())?;
    let opts = SyncOptions {
        artifacts: args.artifacts,
        dry_run: args.dry_run,
        branch: args.branch,
    };
    let report = ctx
        .backend
        .sync(&spec, &opts)
        .map_err(BackendError::coded)?;
    let verb = if opts.dry_run { "would sync" } else { "synced" };
    // Branch names, commit subjects and paths are the sandbox's.
    for line in &report.refs {
        println!("{verb} {}", shown::line(line));
    }
    for line in &report.details {
        println!("{}", shown::line(line));
    }
    for path in &report.artifacts {
        println!("{verb} artifact {}", shown::line(path));
    }
    if report.refs.is_empty() && report.artifacts.is_empty() {
        println!("Nothing to sync");
    }
    if !opts.dry_run {
        SyncRecord::synced_now(&spec.paths).map_err(store_err)?;
    }
    Ok(exit_code::OK)
}

/// `keystone agent worktree ...`.
pub fn worktree(ctx: &Context, cmd: WorktreeCommand) -> Result<i32> {
    let (name, op) = match cmd {
        WorktreeCommand::Add {
            branch,
            create,
            name,
        } => (name, WorktreeOp::Add { branch, create }),
        WorktreeCommand::List { name } => (name, WorktreeOp::List),
        WorktreeCommand::Remove {
            branch,
            force,
            name,
        } => (name, WorktreeOp::Remove { branch, force }),
    };
    let (spec, _) = running(ctx, name.as_deref())?;
    let worktrees = ctx
        .backend
        .worktree(&spec, &op)
        .map_err(BackendError::coded)?;
    print!("{}", worktree_text(&op, &worktrees));
    Ok(exit_code::OK)
}

/// What `worktree` prints; the worktrees' names and paths are the guest's.
fn worktree_text(op: &WorktreeOp, worktrees: &[WorktreeInfo]) -> String {
    match op {
        WorktreeOp::Add { branch, .. } => format!("Added worktree {}\n", shown::line(branch)),
        WorktreeOp::Remove { branch, .. } => format!("Removed worktree {}\n", shown::line(branch)),
        WorktreeOp::List if worktrees.is_empty() => "No worktrees\n".into(),
        WorktreeOp::List => worktrees
            .iter()
            .map(|wt| format!("{}  {}\n", shown::line(&wt.branch), shown::line(&wt.path)))
            .collect(),
    }
}

/// `keystone agent open-vscode`: makes the sandbox an ssh host and opens
/// VS Code on it (or prints the command).
pub fn open_vscode(ctx: &Context, args: OpenVscodeArgs) -> Result<i32> {
    let (spec, _) = running(ctx, args.name.as_deref())?;
    let target = ctx
        .backend
        .open_vscode(&spec)
        .map_err(BackendError::coded)?;
    let argv = [
        "code".to_string(),
        "--remote".into(),
        format!("ssh-remote+{}", target.ssh_host),
        target.folder.clone(),
    ];
    if args.json {
        #[derive(serde::Serialize)]
        struct Out<'a> {
            #[serde(flatten)]
            target: &'a VscodeTarget,
            command: &'a [String],
        }
        let out = Out {
            target: &target,
            command: &argv,
        };
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(exit_code::OK);
    }
    for note in &target.notes {
        eprintln!("keystone: note: {}", shown::line(note));
    }
    eprintln!(
        "ssh host {} is defined in {} (try: ssh {} true)",
        target.ssh_host,
        target.ssh_config.display(),
        target.ssh_host
    );
    let command = argv.join(" ");
    if args.print || !on_path("code") {
        println!("{command}");
        return Ok(exit_code::OK);
    }
    eprintln!("running: {command}");
    let status = std::process::Command::new(&argv[0])
        .args(&argv[1..])
        .status()
        .map_err(|e| anyhow::anyhow!("cannot run {command}: {e}"))?;
    Ok(status.code().unwrap_or(exit_code::OPERATION_FAILED))
}

/// `keystone agent __ssh-proxy NAME`: the ssh `ProxyCommand` of
/// `open-vscode`, for a running sandbox.
pub fn ssh_proxy(ctx: &Context, args: NameArg) -> Result<i32> {
    let (spec, _) = running(ctx, args.name.as_deref())?;
    super::microvm::ssh_proxy(&spec)
}

/// Whether an executable `program` is on the PATH.
fn on_path(program: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| {
            dir.join(program)
                .metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    })
}

/// `keystone agent __supervise NAME`: the supervisor process body.
pub fn supervise(ctx: &Context, args: SuperviseArgs) -> Result<i32> {
    // Everything it runs is in the plan `start` writes to its stdin.
    ctx.backend
        .supervise(&args.name, &mut std::io::stdin().lock())
        .map_err(BackendError::coded)
}

/// `keystone agent __git-upload-pack NAME`: git's `ext::` command for
/// sync; the sandbox must be running.
pub fn git_upload_pack(ctx: &Context, args: SuperviseArgs) -> Result<i32> {
    let (spec, _) = running(ctx, Some(&args.name))?;
    super::microvm::git_upload_pack(&spec).map_err(BackendError::coded)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shown::{terminal_safe, HOSTILE};

    #[test]
    fn worktrees_named_by_the_guest_print_escaped_one_per_line() {
        let worktrees = vec![
            WorktreeInfo {
                branch: HOSTILE.into(),
                path: format!("/workspace/.worktrees/{HOSTILE}"),
            },
            WorktreeInfo {
                branch: "feat/x".into(),
                path: "/workspace/.worktrees/feat/x".into(),
            },
        ];
        let text = worktree_text(&WorktreeOp::List, &worktrees);
        assert!(terminal_safe(&text), "{text:?}");
        assert_eq!(text.lines().count(), 2, "{text}");
        assert!(text.ends_with("feat/x  /workspace/.worktrees/feat/x\n"));
        let add = WorktreeOp::Add {
            branch: HOSTILE.into(),
            create: true,
        };
        assert!(terminal_safe(&worktree_text(&add, &[])));
    }
}
