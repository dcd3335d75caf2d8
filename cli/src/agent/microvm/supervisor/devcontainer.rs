//! The project's devcontainer.json, applied at the end of the setup.
//!
//! - The plan (`crate::agent::devcontainer`) is read from the host
//!   project; a file that cannot be read or parsed is a warning, and
//!   nothing of it applies.
//! - Refused keys, ignored keys and the plan's warnings are lines of the
//!   start; features the sandbox does not map are warnings too.
//! - `remoteUser` applies when the image has that user.
//! - On the sandbox's first start (no marker in the guest's root layer,
//!   so `start --fresh` counts as a first start): the features' Debian
//!   packages, then `onCreateCommand` and `updateContentCommand`, before
//!   the sandbox is ready (devcontainer.json's default `waitFor`);
//!   `postCreateCommand` then `postStartCommand` run after it, in the
//!   background. On later starts only `postStartCommand` runs.
//! - The commands run in `/workspace` with the file's environment; their
//!   output goes to `logs/devcontainer.log` (escaped, rotated); a failure
//!   is a warning that names the command.
//! - The record (`devcontainer::applied`) says what applied, for `status`,
//!   the proxy and the session commands; this module is its only writer.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use keystone_guest_agent::client::ClientError;
use keystone_guest_agent::protocol::{ExecRequest, UserSpec};

use super::super::super::backend::SandboxSpec;
use super::super::super::config::Network;
use super::super::super::devcontainer::applied::{self, Applied, CommandRun, Outcome};
use super::super::super::devcontainer::{self, DevcontainerPlan, FeatureKind, LifecycleCommand};
use super::super::engine::{Layout, GUEST_USER, GUEST_WORKSPACE};
use super::super::guest;
use super::super::logfile::CappedLog;
use super::super::readiness::Readiness;
use crate::shown;

/// Where the first start leaves its mark in the guest's root layer.
const CREATED_MARKER: &str = "/var/lib/keystone/devcontainer-created";

/// The most lines of refused keys and warnings the start shows; the rest
/// are in `status --json`.
const MAX_SHOWN_WARNINGS: usize = 12;

/// Applies the project's devcontainer.json (see the module documentation).
pub fn apply(spec: &SandboxSpec, layout: &Layout, ready: &Readiness) {
    let plan = match devcontainer::load(&spec.project, &spec.name) {
        Ok(Some(plan)) => plan,
        Ok(None) => {
            forget(spec);
            return;
        }
        Err(e) => {
            ready.progress(&format!(
                "warning: devcontainer.json: {e}; nothing of it was applied"
            ));
            forget(spec);
            return;
        }
    };
    ready.progress(&format!(
        "devcontainer: applying {}",
        shown::line(&plan.source)
    ));
    show_what_is_left_out(&plan, ready);
    if plan.is_empty() {
        Record::new(spec, Applied::new(&plan, None)).save();
        return;
    }

    let client = guest::client(&layout.vsock);
    let user = plan.remote_user.as_ref().and_then(|name| {
        let exists = run_as_root(&client, &["id", "-u", "--", name]).is_ok();
        if !exists {
            ready.progress(&format!(
                "warning: devcontainer: remoteUser {} does not exist in the sandbox's image; \
                 commands and sessions run as {GUEST_USER}",
                shown::line(name)
            ));
        }
        exists.then(|| name.clone())
    });
    let record = Record::new(spec, Applied::new(&plan, user));
    let log = match open_log(layout) {
        Ok(SharedLog(log)) => log,
        Err(e) => {
            ready.progress(&format!(
                "warning: devcontainer: cannot open its log: {e}; its commands do not run"
            ));
            record.save();
            return;
        }
    };
    let runner = Runner {
        layout: layout.clone(),
        log,
        record: record.clone(),
    };

    let first_start = run_as_root(&client, &["test", "-e", CREATED_MARKER]).is_err();
    let hooks: [(&str, &[LifecycleCommand]); 4] = [
        ("onCreateCommand", &plan.on_create),
        ("updateContentCommand", &plan.update_content),
        ("postCreateCommand", &plan.post_create),
        ("postStartCommand", &plan.post_start),
    ];
    for (hook, commands) in hooks {
        let outcome = if first_start || hook == "postStartCommand" {
            Outcome::Waiting
        } else {
            Outcome::Skipped {
                why: "it ran on the sandbox's first start".into(),
            }
        };
        record.add(hook, commands, outcome);
    }
    record.save();

    if first_start {
        // These run before ready, when a large guest has only the memory
        // it booted with.
        super::memory::add(
            &layout.vsock,
            "before the devcontainer's first-start commands",
        );
        install_packages(spec, &plan, &runner, ready);
        for hook in ["onCreateCommand", "updateContentCommand"] {
            for warning in runner.run_hook(hook) {
                ready.progress(&warning);
            }
        }
        if let Err(e) = run_as_root(
            &client,
            &[
                "sh",
                "-c",
                "mkdir -p /var/lib/keystone && touch \"$0\"",
                CREATED_MARKER,
            ],
        ) {
            ready.progress(&format!(
                "warning: devcontainer: cannot mark the first start done ({e}); \
                 its create commands will run again"
            ));
        }
    }
    let later: Vec<&str> = ["postCreateCommand", "postStartCommand"]
        .into_iter()
        .filter(|hook| record.has_waiting(hook))
        .collect();
    if !later.is_empty() {
        ready.progress(&format!(
            "devcontainer: {} run{} in the background; output in {}",
            later.join(" then "),
            if later.len() == 1 { "s" } else { "" },
            shown::line(
                &layout
                    .supervisor_log
                    .with_file_name("devcontainer.log")
                    .display()
                    .to_string()
            )
        ));
        let spawned = std::thread::Builder::new()
            .name("devcontainer".into())
            .spawn(move || {
                for hook in later {
                    for warning in runner.run_hook(hook) {
                        log::warn!("{warning}");
                    }
                }
            });
        if let Err(e) = spawned {
            ready.progress(&format!(
                "warning: devcontainer: cannot start its commands: {e}"
            ));
        }
    }
}

/// Removes the record of a project that has no (readable) devcontainer.json.
fn forget(spec: &SandboxSpec) {
    if let Err(e) = applied::write(&spec.paths, None) {
        log::warn!("cannot remove the devcontainer record: {e}");
    }
}

/// Lines for the refused keys, the ignored ones and the plan's warnings,
/// at most [`MAX_SHOWN_WARNINGS`] of them.
fn show_what_is_left_out(plan: &DevcontainerPlan, ready: &Readiness) {
    let mut lines: Vec<String> = plan
        .refused
        .iter()
        .map(|r| format!("warning: devcontainer: {r}"))
        .collect();
    for feature in &plan.features {
        if let FeatureKind::Unsupported { reason } = &feature.kind {
            lines.push(format!(
                "warning: devcontainer: feature {} is not installed: {}",
                shown::line(&feature.id),
                shown::line(reason)
            ));
        }
    }
    lines.extend(
        plan.warnings
            .iter()
            .map(|w| format!("warning: devcontainer: {w}")),
    );
    if !plan.ignored.is_empty() {
        lines.push(format!(
            "devcontainer: not applied (no meaning in a sandbox): {}",
            plan.ignored.join(", ")
        ));
    }
    let more = lines.len().saturating_sub(MAX_SHOWN_WARNINGS);
    for line in lines.iter().take(MAX_SHOWN_WARNINGS) {
        ready.progress(line);
    }
    if more > 0 {
        ready.progress(&format!(
            "devcontainer: {more} more in `keystone agent status --json`"
        ));
    }
}

/// The features' Debian packages, on the first start, through the
/// sandbox's network.
fn install_packages(
    spec: &SandboxSpec,
    plan: &DevcontainerPlan,
    runner: &Runner,
    ready: &Readiness,
) {
    let packages = plan.apt_packages();
    if packages.is_empty() {
        return;
    }
    if spec.settings.network == Network::None {
        ready.progress(&format!(
            "warning: devcontainer: the features need Debian packages ({}), and the sandbox \
             has no network: start it with --network nat to install them",
            shown::line(&packages.join(" "))
        ));
        return;
    }
    ready.progress(&format!(
        "devcontainer: installing Debian packages for its features: {}",
        shown::line(&packages.join(" "))
    ));
    let mut argv = vec![
        "sh".to_string(),
        "-c".into(),
        "apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
         --no-install-recommends \"$@\""
            .into(),
        "sh".into(),
    ];
    argv.extend(packages);
    let command = LifecycleCommand { name: None, argv };
    if let Err(why) = runner.run_one("features", &command, Some(UserSpec::Uid(0))) {
        ready.progress(&format!(
            "warning: devcontainer: installing the features' packages failed: {why}"
        ));
    }
}

/// Runs a hook's commands and keeps the record up to date.
#[derive(Clone)]
struct Runner {
    layout: Layout,
    log: Arc<Mutex<CappedLog>>,
    record: Record,
}

impl Runner {
    /// Runs the waiting commands of `hook`: one after the other, or side
    /// by side when they are named (the object form), as devcontainer.json
    /// defines. Returns a warning per command that failed.
    fn run_hook(&self, hook: &str) -> Vec<String> {
        let commands = self.record.waiting(hook);
        let user = self.record.user().map(UserSpec::Name);
        let run = |(index, command): &(usize, LifecycleCommand)| {
            self.record.set(*index, Outcome::Running);
            let outcome = match self.run_one(hook, command, user.clone()) {
                Ok(()) => Outcome::Succeeded,
                Err(why) => Outcome::Failed {
                    why: why.to_string(),
                },
            };
            self.record.set(*index, outcome.clone());
            match outcome {
                Outcome::Failed { why } => Some(format!(
                    "warning: devcontainer: {hook} {} failed: {why}",
                    describe(command)
                )),
                _ => None,
            }
        };
        let parallel = commands.len() > 1 && commands.iter().all(|(_, c)| c.name.is_some());
        if !parallel {
            return commands.iter().filter_map(run).collect();
        }
        std::thread::scope(|s| {
            let handles: Vec<_> = commands.iter().map(|c| s.spawn(move || run(c))).collect();
            handles
                .into_iter()
                .filter_map(|h| h.join().ok().flatten())
                .collect()
        })
    }

    /// Runs one command with the file's environment (see [`run_logged`]).
    fn run_one(
        &self,
        hook: &str,
        command: &LifecycleCommand,
        user: Option<UserSpec>,
    ) -> Result<(), CommandError> {
        let env = self.record.env();
        run_logged(&self.layout, &self.log, hook, command, env, user)
    }
}

/// The log of the devcontainer's commands, `logs/devcontainer.log`.
pub(in crate::agent::microvm) fn open_log(layout: &Layout) -> std::io::Result<SharedLog> {
    let log = CappedLog::open(&layout.supervisor_log.with_file_name("devcontainer.log"))?;
    Ok(SharedLog(Arc::new(Mutex::new(log))))
}

/// Why a command in the guest did not succeed: a devcontainer command
/// (its record and warning say it) or one of the setup's own.
#[derive(Debug, thiserror::Error)]
pub(in crate::agent::microvm) enum CommandError {
    /// It ran and exited with a failure (the code, or 128 + the signal).
    #[error("exit code {0}")]
    Exit(i32),
    /// The guest agent did not run it to the end.
    #[error("running it: {0}")]
    Agent(#[source] ClientError),
}

/// Runs one command of `hook` in `/workspace` with `env`, as `user` (else
/// the agent user), its output into `log`; `Err` says why it failed.
pub(in crate::agent::microvm) fn run_logged(
    layout: &Layout,
    log: &Arc<Mutex<CappedLog>>,
    hook: &str,
    command: &LifecycleCommand,
    env: Vec<(String, String)>,
    user: Option<UserSpec>,
) -> Result<(), CommandError> {
    let started = Instant::now();
    log_line(log, &format!("== {hook} {}: started", describe(command)));
    let request = ExecRequest {
        argv: command.argv.clone(),
        env,
        cwd: Some(GUEST_WORKSPACE.into()),
        user: Some(user.unwrap_or_else(|| UserSpec::Name(GUEST_USER.into()))),
        tty: None,
    };
    let client = guest::client(&layout.vsock);
    let result = client.exec(
        request,
        std::io::empty(),
        SharedLog(Arc::clone(log)),
        SharedLog(Arc::clone(log)),
    );
    let result = match result {
        Ok(status) if status.success() => Ok(()),
        Ok(status) => Err(CommandError::Exit(status.code_or_signal())),
        Err(e) => Err(CommandError::Agent(e)),
    };
    let line = match &result {
        Ok(()) => "exited 0".to_string(),
        Err(why) => why.to_string(),
    };
    log_line(
        log,
        &format!(
            "== {hook} {}: {line} after {:.1} s",
            describe(command),
            started.elapsed().as_secs_f64()
        ),
    );
    result
}

fn log_line(log: &Mutex<CappedLog>, line: &str) {
    if let Ok(mut log) = log.lock() {
        let _ = writeln!(log, "{line}");
    }
}

/// A command as the start names it: its entry name, else its words.
fn describe(command: &LifecycleCommand) -> String {
    let text = match &command.name {
        Some(name) => format!("`{name}`"),
        None => format!("`{}`", command.argv.join(" ")),
    };
    let shown = shown::line(&text);
    match shown.char_indices().nth(120) {
        Some((cut, _)) => format!("{}...`", &shown[..cut]),
        None => shown,
    }
}

/// Runs `argv` as root in the guest; `Err` says why it did not exit 0.
fn run_as_root(
    client: &keystone_guest_agent::AgentClient,
    argv: &[&str],
) -> Result<(), CommandError> {
    let mut request = ExecRequest::new(argv);
    request.user = Some(UserSpec::Uid(0));
    let out = client
        .exec_request_output(request)
        .map_err(CommandError::Agent)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(CommandError::Exit(out.status.code_or_signal()))
    }
}

/// The output of the commands, into the shared log.
pub(in crate::agent::microvm) struct SharedLog(pub Arc<Mutex<CappedLog>>);

impl Write for SharedLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self.0.lock() {
            Ok(mut log) => log.write(buf),
            Err(_) => Ok(buf.len()),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self.0.lock() {
            Ok(mut log) => log.flush(),
            Err(_) => Ok(()),
        }
    }
}

/// The record, shared by the setup and the background commands, saved at
/// each change.
#[derive(Clone)]
struct Record {
    spec: SandboxSpec,
    applied: Arc<Mutex<Applied>>,
}

impl Record {
    fn new(spec: &SandboxSpec, applied: Applied) -> Self {
        Self {
            spec: spec.clone(),
            applied: Arc::new(Mutex::new(applied)),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut Applied) -> T) -> T {
        let mut guard = self
            .applied
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut guard)
    }

    fn add(&self, hook: &str, commands: &[LifecycleCommand], outcome: Outcome) {
        self.with(|a| {
            a.commands.extend(commands.iter().map(|c| CommandRun {
                hook: hook.to_string(),
                name: c.name.clone(),
                argv: c.argv.clone(),
                outcome: outcome.clone(),
            }))
        });
    }

    fn has_waiting(&self, hook: &str) -> bool {
        !self.waiting(hook).is_empty()
    }

    /// The waiting commands of `hook`, with their places in the record.
    fn waiting(&self, hook: &str) -> Vec<(usize, LifecycleCommand)> {
        self.with(|a| {
            a.commands
                .iter()
                .enumerate()
                .filter(|(_, c)| c.hook == hook && c.outcome == Outcome::Waiting)
                .map(|(i, c)| {
                    let command = LifecycleCommand {
                        name: c.name.clone(),
                        argv: c.argv.clone(),
                    };
                    (i, command)
                })
                .collect()
        })
    }

    fn set(&self, index: usize, outcome: Outcome) {
        self.with(|a| {
            if let Some(c) = a.commands.get_mut(index) {
                c.outcome = outcome;
            }
        });
        self.save();
    }

    fn user(&self) -> Option<String> {
        self.with(|a| a.user.clone())
    }

    fn env(&self) -> Vec<(String, String)> {
        self.with(|a| a.env_pairs())
    }

    fn save(&self) {
        let result = self.with(|a| applied::write(&self.spec.paths, Some(a)));
        if let Err(e) = result {
            log::warn!("cannot write the devcontainer record: {e}");
        }
    }
}
