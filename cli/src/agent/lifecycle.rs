//! `start`, `stop` and `destroy`: the commands that change a sandbox's
//! lifecycle state. Each holds the sandbox lock for its whole run.

use std::io::{BufRead, IsTerminal, Write};

use anyhow::Result;

use super::backend::{
    AttachOptions, BackendError, SandboxSpec, StartOutcome, StopOptions, SyncOptions,
};
use super::config::{self, FlagOverrides, Network, Settings};
use super::registry::{read_json, write_json, RegistryEntry, SandboxPaths};
use super::state::{NestedStatus, ProcProbe, SandboxLock, SandboxState, StateRecord, SyncRecord};
use super::{fsutil, naming, project_top, store_err, Context, DestroyArgs, StartArgs, StopArgs};
use super::{CANCELLED, INVALID_STATE};
use crate::exit_code::{self, CodedError};
use crate::shown;

fn lock(paths: &SandboxPaths, name: &str) -> Result<SandboxLock> {
    SandboxLock::try_acquire(paths)
        .map_err(store_err)?
        .ok_or_else(|| {
            CodedError::error(
                INVALID_STATE,
                format!("another keystone command is changing sandbox {name}; try again when it is done"),
            )
        })
}

/// `keystone agent start`.
pub fn start(ctx: &Context, args: StartArgs) -> Result<i32> {
    // Settings first: a bad flag or config fails before anything changes.
    let flags = FlagOverrides {
        memory_mib: args.memory,
        vcpus: args.vcpus,
        nested_virt: match (args.nested, args.no_nested) {
            (true, _) => Some(true),
            (_, true) => Some(false),
            _ => None,
        },
        network: args.network,
        sync_mode: args.sync_mode,
        agent: args.agent,
    };
    let settings =
        config::load(&flags).map_err(|e| CodedError::error(exit_code::NOT_FOUND, e.to_string()))?;

    let dir = match &args.project_path {
        Some(p) => p.clone(),
        None => std::env::current_dir()?,
    };
    let dir = dir
        .canonicalize()
        .map_err(|e| CodedError::error(exit_code::NOT_FOUND, format!("{}: {e}", dir.display())))?;
    let project = project_top(&dir).map_err(|e| {
        let code = exit_code::for_error(&e);
        CodedError::error(
            code,
            format!("{e}; `keystone agent start` needs a git project"),
        )
    })?;

    let name = match &args.name {
        Some(name) => {
            naming::validate(name)
                .map_err(|e| CodedError::error(exit_code::NOT_FOUND, e.to_string()))?;
            name.clone()
        }
        None => ctx
            .store
            .registry()
            .map_err(store_err)?
            .find_by_project(&project)
            .map(str::to_string)
            .unwrap_or_else(|| naming::derive(&project)),
    };

    let paths = ctx.store.paths(&name);
    // The sandbox's folder holds the agent's vsock socket (a door to run
    // anything in the guest), the clone and the `.env` copies: this
    // user's alone.
    fsutil::private_dir(&paths.dir).map_err(|e| {
        CodedError::error(
            exit_code::OPERATION_FAILED,
            format!("{}: {e}", paths.dir.display()),
        )
    })?;
    let _lock = lock(&paths, &name)?;

    // Register (or check the registration) under the lock.
    let created_at = fsutil::now_rfc3339();
    let clash = ctx
        .store
        .update_registry(|r| match r.sandboxes.get(&name) {
            Some(entry) if entry.project != project => Some(entry.project.clone()),
            Some(_) => None,
            None => {
                r.sandboxes.insert(
                    name.clone(),
                    RegistryEntry {
                        project: project.clone(),
                        created_at: created_at.clone(),
                    },
                );
                None
            }
        })
        .map_err(store_err)?;
    if let Some(other) = clash {
        return Err(CodedError::error(
            INVALID_STATE,
            format!(
                "sandbox name {name} is already used by {}; pick another --name",
                other.display()
            ),
        ));
    }

    let record = StateRecord::load_checked(&paths, &name, &ProcProbe).map_err(store_err)?;
    if record.is_active() {
        return Err(CodedError::error(
            INVALID_STATE,
            format!(
                "sandbox {name} is already {} (attach with `keystone agent attach {name}`)",
                record.state
            ),
        ));
    }
    if record.state == SandboxState::Error {
        println!(
            "Recovering sandbox {name} from error: {}",
            shown::lines(record.last_error.as_deref().unwrap_or("unknown cause"))
        );
    }

    let changes = naming::uncommitted_changes(&project);
    if !changes.is_empty() {
        eprintln!(
            "keystone: warning: {} has {} uncommitted change(s); the sandbox gets committed work only (commit first to include them)",
            project.display(),
            changes.len()
        );
    }

    if !settings.persist {
        discard_state(&paths, Keep::Nothing)?;
    } else if args.fresh {
        discard_state(&paths, Keep::Workspace)?;
        println!(
            "Discarded the root layer and saved settings of sandbox {name} (--fresh); \
             /workspace and its commits are kept"
        );
    }
    let paths = ctx.store.create_dirs(&name).map_err(store_err)?;
    // A sandbox keeps its own settings between starts; flags of this start
    // override them and are saved with them.
    let settings = match read_json::<Settings>(&paths.config).map_err(store_err)? {
        Some(saved) => config::for_existing(&saved, &settings, &flags)
            .map_err(|e| CodedError::error(exit_code::NOT_FOUND, e.to_string()))?,
        None => settings,
    };
    write_json(&paths.config, &settings).map_err(store_err)?;
    if settings.network == Network::Bridge {
        eprintln!(
            "keystone: warning: --network bridge is not available: the sandbox gets nat \
             (outbound connections made by the host, through the guest's HTTP proxy)"
        );
    }

    let spec = SandboxSpec {
        name: name.clone(),
        project: project.clone(),
        paths: paths.clone(),
        settings,
    };
    println!("Starting sandbox {name} for {}", project.display());
    // Progress lines quote the guest (its errors, the versions it reports).
    let mut progress = |line: &str| println!("  {}", shown::line(line));
    // The supervisor records the run state, this failure included.
    let outcome = ctx
        .backend
        .start(&spec, &mut progress)
        .map_err(BackendError::coded)?;
    if let (NestedStatus::Unavailable, Some(detail)) = (outcome.nested, &outcome.nested_detail) {
        eprintln!(
            "keystone: note: nested virtualization is {}: {}",
            outcome.nested.as_str(),
            shown::line(detail)
        );
    }
    if let Some(file) = &args.timings_json {
        write_timings(file, &name, &outcome)?;
    }
    println!("Sandbox {name} is running (engine {})", outcome.engine);
    drop(_lock);

    if args.no_attach || !std::io::stdout().is_terminal() || !std::io::stdin().is_terminal() {
        println!("Attach with: keystone agent attach {name}");
        return Ok(exit_code::OK);
    }
    ctx.backend
        .attach(&spec, &AttachOptions::default())
        .map_err(BackendError::coded)
}

/// Removes the disk, `state.json` and `config.json` (not the lock we hold,
/// nor the logs).
/// What [`discard_state`] keeps.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Keep {
    Nothing,
    /// The sandbox's clone (`disk/workspace`): `--fresh` discards the
    /// guest's root layer, never work that may not be synced yet.
    Workspace,
}

/// Removes the sandbox's disk (all of it, or all but the workspace), its
/// run state and its saved settings.
fn discard_state(paths: &SandboxPaths, keep: Keep) -> Result<()> {
    let gone = |r: std::io::Result<()>, path: &std::path::Path| match r {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(CodedError::error(
            exit_code::OPERATION_FAILED,
            format!("{}: {e}", path.display()),
        )),
        _ => Ok(()),
    };
    match keep {
        Keep::Nothing => gone(fsutil::remove_tree(&paths.disk), &paths.disk)?,
        Keep::Workspace => {
            let entries = match std::fs::read_dir(&paths.disk) {
                Ok(entries) => entries,
                Err(e) => return gone(Err(e), &paths.disk),
            };
            for entry in entries {
                let entry = entry.map_err(|e| {
                    CodedError::error(
                        exit_code::OPERATION_FAILED,
                        format!("{}: {e}", paths.disk.display()),
                    )
                })?;
                if entry.file_name() != "workspace" {
                    gone(fsutil::remove_tree(&entry.path()), &entry.path())?;
                }
            }
        }
    }
    gone(std::fs::remove_file(&paths.state), &paths.state)?;
    gone(std::fs::remove_file(&paths.config), &paths.config)
}

/// `keystone agent stop`.
pub fn stop(ctx: &Context, args: StopArgs) -> Result<i32> {
    let (name, entry) = ctx.resolve(args.name.as_deref())?;
    let spec = ctx.spec(&name, &entry)?;
    let _lock = lock(&spec.paths, &name)?;
    let record = StateRecord::load_checked(&spec.paths, &name, &ProcProbe).map_err(store_err)?;
    match record.state {
        SandboxState::Starting | SandboxState::Running | SandboxState::Stopping => {}
        SandboxState::Error => {
            // The VM is already gone: its supervisor cannot say so.
            record.acknowledge_dead(&spec.paths).map_err(store_err)?;
            println!("Sandbox {name} was not running (its VM had died); marked stopped");
            return Ok(exit_code::OK);
        }
        other => {
            return Err(CodedError::error(
                INVALID_STATE,
                format!("sandbox {name} is not running (it is {other})"),
            ))
        }
    }
    if args.sync {
        match ctx.backend.sync(&spec, &SyncOptions::default()) {
            Ok(report) => {
                SyncRecord::synced_now(&spec.paths).map_err(store_err)?;
                for line in &report.refs {
                    println!("  synced {}", shown::line(line));
                }
                for line in &report.details {
                    println!("  {}", shown::line(line));
                }
            }
            // "Nothing to sync" must not keep the sandbox running.
            Err(BackendError::InvalidState(msg)) => println!("  {}", shown::line(&msg)),
            Err(err) => return Err(err.coded()),
        }
    }
    // The supervisor records `stopping` and then `stopped`; one that had
    // to be killed cannot, and is recorded here (it is dead, and the lock
    // is ours).
    ctx.backend
        .stop(&spec, &StopOptions { force: args.force })
        .map_err(BackendError::coded)?;
    let after = StateRecord::load_checked(&spec.paths, &name, &ProcProbe).map_err(store_err)?;
    if after.state != SandboxState::Stopped {
        after.acknowledge_dead(&spec.paths).map_err(store_err)?;
    }
    println!("Sandbox {name} stopped");
    Ok(exit_code::OK)
}

/// Writes `start --timings-json`: the phases the supervisor reported, in
/// order, with their times, and the total.
fn write_timings(file: &std::path::Path, name: &str, outcome: &StartOutcome) -> Result<()> {
    let phases: Vec<serde_json::Value> = outcome
        .phases
        .iter()
        .map(|(phase, took)| serde_json::json!({ "phase": phase, "ms": took.as_millis() as u64 }))
        .collect();
    let doc = serde_json::json!({
        "schema": 1,
        "sandbox": name,
        "engine": outcome.engine,
        "supervisor_pid": outcome.supervisor_pid,
        "ready_ms": outcome.total.as_millis() as u64,
        "phases": phases,
    });
    let mut text = serde_json::to_string_pretty(&doc).unwrap_or_default();
    text.push('\n');
    std::fs::write(file, text).map_err(|e| {
        CodedError::error(
            exit_code::OPERATION_FAILED,
            format!("--timings-json {}: {e}", file.display()),
        )
    })
}

/// Asks `question [y/N]` on the terminal.
fn confirm(question: &str) -> bool {
    print!("{question} [y/N] ");
    let _ = std::io::stdout().flush();
    let mut answer = String::new();
    if std::io::stdin().lock().read_line(&mut answer).is_err() {
        return false;
    }
    matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes")
}

/// `keystone agent destroy`. Without `--force` it asks on a terminal; with
/// no terminal to ask on it refuses (exit 5) rather than delete a disk
/// unasked.
pub fn destroy(ctx: &Context, args: DestroyArgs) -> Result<i32> {
    let (name, entry) = ctx.resolve(Some(&args.name))?;
    let spec = ctx.spec(&name, &entry)?;
    let _lock = lock(&spec.paths, &name)?;
    let record = StateRecord::load_checked(&spec.paths, &name, &ProcProbe).map_err(store_err)?;

    if record.is_active() && !args.force {
        return Err(CodedError::error(
            INVALID_STATE,
            format!(
                "sandbox {name} is {}; stop it first (`keystone agent stop {name}`) or pass --force",
                record.state
            ),
        ));
    }
    if !args.force {
        if !std::io::stdin().is_terminal() {
            return Err(CodedError::error(
                CANCELLED,
                format!("not destroying sandbox {name} without confirmation: pass --force"),
            ));
        }
        let what = if args.keep_disk {
            "keeping its disk"
        } else {
            "including its disk"
        };
        if !confirm(&format!(
            "Destroy sandbox {name} of {} ({what})?",
            entry.project.display()
        )) {
            return Err(CodedError::error(
                CANCELLED,
                "cancelled; nothing was destroyed",
            ));
        }
    }
    if record.is_active() {
        println!("Stopping sandbox {name}");
        ctx.backend
            .stop(&spec, &StopOptions { force: true })
            .map_err(BackendError::coded)?;
    }
    ctx.backend.destroy(&spec).map_err(BackendError::coded)?;
    ctx.store
        .update_registry(|r| r.sandboxes.remove(&name))
        .map_err(store_err)?;
    ctx.store
        .remove_dirs(&name, args.keep_disk)
        .map_err(store_err)?;
    if args.keep_disk {
        println!(
            "Destroyed sandbox {name}; kept its disk at {}",
            spec.paths.disk.display()
        );
    } else {
        println!("Destroyed sandbox {name}");
    }
    Ok(exit_code::OK)
}
