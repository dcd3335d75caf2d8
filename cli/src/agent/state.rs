//! A sandbox's lifecycle state (`state.json`), its per-sandbox lock, and the
//! liveness check that turns a dead VM into `error`.
//!
//! `state.json`:
//!
//! ```json
//! {
//!   "state": "running",           // created|starting|running|stopping|stopped|error
//!   "supervisor_pid": 4242,       // the supervisor process while one exists
//!   "started_at": "2026-...Z",    // last successful start
//!   "engine": "vmm",              // engine the last start used
//!   "nested": "enabled",          // enabled|disabled|unavailable
//!   "nested_detail": null,        // why nesting is unavailable, if it is
//!   "last_error": null,           // why the state is error
//!   "updated_at": "2026-...Z"
//! }
//! ```
//!
//! A sandbox recorded as `starting`, `running` or `stopping` whose supervisor
//! is gone (no such pid, a zombie, or a pid reused by another program) is
//! reported as `error`, never as running.
//!
//! One writer: the sandbox's supervisor, through [`RunStateWriter`], from
//! its first moment (`starting`) to its last (`stopped` or `error`). The
//! command layer never writes the file while a supervisor lives; it only
//! discards it (`start --fresh`, `destroy`) and, holding the sandbox lock,
//! acknowledges a supervisor that died ([`StateRecord::acknowledge_dead`]).
//! When the sandbox last synced is the sync command's, in `sync.json`
//! ([`SyncRecord`]).

use std::path::Path;

use rustix::io::Errno;
use rustix::process::{kill_process, test_kill_process, Pid, Signal};
use serde::{Deserialize, Serialize};

use super::fsutil::{self, FileLock};
use super::registry::{read_json, write_json, SandboxPaths, StoreError};

/// Sandbox lifecycle states (SPEC.md).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SandboxState {
    #[default]
    Created,
    Starting,
    Running,
    Stopping,
    Stopped,
    Error,
}

impl SandboxState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Starting => "starting",
            Self::Running => "running",
            Self::Stopping => "stopping",
            Self::Stopped => "stopped",
            Self::Error => "error",
        }
    }

    /// States in which a supervisor process must exist.
    pub fn needs_supervisor(self) -> bool {
        matches!(self, Self::Starting | Self::Running | Self::Stopping)
    }
}

impl std::fmt::Display for SandboxState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether the guest got nested virtualization.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NestedStatus {
    /// The guest sees VMX/SVM and has `/dev/kvm`.
    Enabled,
    /// Not asked for (`--no-nested` or `nested_virt = false`).
    Disabled,
    /// Asked for, but the host cannot nest.
    Unavailable,
}

impl NestedStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Enabled => "enabled",
            Self::Disabled => "disabled",
            Self::Unavailable => "unavailable",
        }
    }
}

/// `state.json`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateRecord {
    pub state: SandboxState,
    #[serde(default)]
    pub supervisor_pid: Option<i32>,
    #[serde(default)]
    pub started_at: Option<String>,
    /// Written by versions before `sync.json`; read by [`SyncRecord`].
    #[serde(default, skip_serializing)]
    pub last_sync: Option<String>,
    #[serde(default)]
    pub engine: Option<String>,
    #[serde(default)]
    pub nested: Option<NestedStatus>,
    #[serde(default)]
    pub nested_detail: Option<String>,
    #[serde(default)]
    pub last_error: Option<String>,
    #[serde(default)]
    pub updated_at: Option<String>,
}

impl StateRecord {
    /// Reads `state.json`; a sandbox with no state file is `created`.
    pub fn load(paths: &SandboxPaths) -> Result<Self, StoreError> {
        Ok(read_json(&paths.state)?.unwrap_or_default())
    }

    /// Writes `state.json` atomically, stamping `updated_at` (the writers
    /// are [`RunStateWriter`] and [`Self::acknowledge_dead`]).
    fn save(&mut self, paths: &SandboxPaths) -> Result<(), StoreError> {
        self.updated_at = Some(fsutil::now_rfc3339());
        write_json(&paths.state, self)
    }

    /// Records as `stopped` a sandbox whose supervisor died (its record
    /// says `error` after the liveness check): what `stop` does for a VM
    /// that is already gone. The caller holds the sandbox lock, and no
    /// supervisor lives to write the record itself.
    pub fn acknowledge_dead(mut self, paths: &SandboxPaths) -> Result<(), StoreError> {
        self.state = SandboxState::Stopped;
        self.supervisor_pid = None;
        self.save(paths)
    }

    /// Reads `state.json` and applies the liveness check with `probe`.
    pub fn load_checked(
        paths: &SandboxPaths,
        name: &str,
        probe: &dyn ProcessProbe,
    ) -> Result<Self, StoreError> {
        let mut record = Self::load(paths)?;
        record.check_liveness(name, probe);
        Ok(record)
    }

    /// Marks the record `error` if it claims a supervisor that is not alive.
    /// Returns whether it changed. The file is not rewritten: the next
    /// command that takes the sandbox lock records what it does.
    pub fn check_liveness(&mut self, name: &str, probe: &dyn ProcessProbe) -> bool {
        if !self.state.needs_supervisor() {
            return false;
        }
        let alive = self
            .supervisor_pid
            .is_some_and(|pid| probe.is_supervisor(pid, name));
        if alive {
            return false;
        }
        let was = self.state;
        self.state = SandboxState::Error;
        self.last_error = Some(match self.supervisor_pid {
            Some(pid) => format!("the sandbox was {was} but its supervisor (pid {pid}) is gone"),
            None => format!("the sandbox was {was} but no supervisor was recorded"),
        });
        true
    }

    /// Whether a live supervisor runs this sandbox (after the check).
    pub fn is_active(&self) -> bool {
        self.state.needs_supervisor()
    }
}

/// The supervisor's hold on `state.json` (see the module documentation).
#[derive(Clone)]
pub struct RunStateWriter {
    paths: SandboxPaths,
    pid: i32,
}

impl RunStateWriter {
    /// Records this process as the sandbox's supervisor, `starting`.
    pub fn begin(paths: &SandboxPaths) -> Result<Self, StoreError> {
        let writer = Self {
            paths: paths.clone(),
            pid: std::process::id() as i32,
        };
        let mut record = StateRecord::load(paths)?;
        record.state = SandboxState::Starting;
        record.supervisor_pid = Some(writer.pid);
        record.last_error = None;
        record.save(paths)?;
        Ok(writer)
    }

    /// Changes the record, unless another supervisor has taken it over.
    fn change(&self, f: impl FnOnce(&mut StateRecord)) -> Result<(), StoreError> {
        let mut record = StateRecord::load(&self.paths)?;
        if record.supervisor_pid.is_some_and(|p| p != self.pid) {
            return Ok(());
        }
        f(&mut record);
        record.save(&self.paths)
    }

    /// Every service is up: `running`, with what the engine set up.
    pub fn running(
        &self,
        engine: &str,
        nested: NestedStatus,
        nested_detail: &str,
    ) -> Result<(), StoreError> {
        self.change(|r| {
            r.state = SandboxState::Running;
            r.started_at = Some(fsutil::now_rfc3339());
            r.engine = Some(engine.to_string());
            r.nested = Some(nested);
            r.nested_detail = Some(nested_detail.to_string());
        })
    }

    /// A stop was asked for.
    pub fn stopping(&self) -> Result<(), StoreError> {
        self.change(|r| r.state = SandboxState::Stopping)
    }

    /// The supervisor's last word: `stopped`, or `error` and why.
    pub fn ended(&self, state: SandboxState, error: Option<String>) -> Result<(), StoreError> {
        self.change(|r| {
            r.state = state;
            r.supervisor_pid = None;
            if error.is_some() {
                r.last_error = error;
            }
        })
    }
}

/// `sync.json`: when the sandbox's commits last came to the host.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncRecord {
    #[serde(default)]
    pub last_sync: Option<String>,
}

impl SyncRecord {
    fn path(paths: &SandboxPaths) -> std::path::PathBuf {
        paths.dir.join("sync.json")
    }

    /// The record; before the first sync of this version, what
    /// `state.json` kept.
    pub fn load(paths: &SandboxPaths) -> Result<Self, StoreError> {
        match read_json::<Self>(&Self::path(paths))? {
            Some(record) => Ok(record),
            None => Ok(Self {
                last_sync: StateRecord::load(paths)?.last_sync,
            }),
        }
    }

    /// Records a sync made now.
    pub fn synced_now(paths: &SandboxPaths) -> Result<(), StoreError> {
        write_json(
            &Self::path(paths),
            &Self {
                last_sync: Some(fsutil::now_rfc3339()),
            },
        )
    }
}

/// The hidden subcommand a sandbox supervisor runs as:
/// `keystone agent __supervise <NAME> ...`. The liveness check looks for it
/// in `/proc/<pid>/cmdline`, so a reused pid is never taken for ours.
pub const SUPERVISOR_SUBCOMMAND: &str = "__supervise";

/// How the liveness check looks at processes (faked in tests).
pub trait ProcessProbe {
    /// Whether `pid` is alive and is the supervisor of sandbox `name`.
    fn is_supervisor(&self, pid: i32, name: &str) -> bool;
}

/// The real probe: `kill(pid, 0)`, not a zombie, and a command line of
/// `... __supervise <name> ...`.
pub struct ProcProbe;

impl ProcessProbe for ProcProbe {
    fn is_supervisor(&self, pid: i32, name: &str) -> bool {
        runs_subcommand(pid, SUPERVISOR_SUBCOMMAND, name)
    }
}

/// `pid` as a [`Pid`] when it names one process (it is positive): zero and
/// negative numbers would name process groups to `kill(2)`.
fn positive_pid(pid: i32) -> Option<Pid> {
    if pid > 0 {
        Pid::from_raw(pid)
    } else {
        None
    }
}

/// Sends `signal` to the process `pid`, ignoring the outcome (callers see
/// whether it went by watching it); a pid that is not positive is left
/// alone.
pub fn send_signal(pid: i32, signal: Signal) {
    if let Some(pid) = positive_pid(pid) {
        let _ = kill_process(pid, signal);
    }
}

/// Whether `pid` is alive (`kill(pid, 0)`, not a zombie) and its command
/// line is `... <subcommand> <name> ...`: one of our hidden subcommands
/// for sandbox `name`, never a process that reused the pid.
pub fn runs_subcommand(pid: i32, subcommand: &str, name: &str) -> bool {
    let Some(target) = positive_pid(pid) else {
        return false;
    };
    // Signal 0 only checks that the process exists and may be signalled;
    // nothing is delivered.
    match test_kill_process(target) {
        Ok(()) | Err(Errno::PERM) => {}
        Err(_) => return false,
    }
    let proc_dir = Path::new("/proc").join(pid.to_string());
    if let Ok(stat) = std::fs::read_to_string(proc_dir.join("stat")) {
        // The state follows the parenthesised command name.
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next());
        if matches!(state, Some('Z') | Some('X')) {
            return false;
        }
    }
    match std::fs::read(proc_dir.join("cmdline")) {
        Ok(cmdline) => cmdline_runs(&cmdline, subcommand, name),
        Err(_) => false,
    }
}

/// Whether a NUL-separated command line is `... <subcommand> <name> ...`.
fn cmdline_runs(cmdline: &[u8], subcommand: &str, name: &str) -> bool {
    let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
    args.windows(2)
        .any(|w| w[0] == subcommand.as_bytes() && w[1] == name.as_bytes())
}

/// The per-sandbox lock: held by any command that changes a sandbox's state
/// (start, stop, destroy), so two of them cannot race.
pub struct SandboxLock {
    _lock: FileLock,
}

impl SandboxLock {
    /// Takes the lock, or `Ok(None)` if another command holds it.
    pub fn try_acquire(paths: &SandboxPaths) -> Result<Option<Self>, StoreError> {
        FileLock::try_acquire(&paths.lock)
            .map(|lock| lock.map(|l| Self { _lock: l }))
            .map_err(|source| StoreError::Io {
                path: paths.lock.clone(),
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::super::registry::SandboxStore;
    use super::*;
    use keystone_test_kit::ScratchDir;

    fn is_supervisor_cmdline(cmdline: &[u8], name: &str) -> bool {
        cmdline_runs(cmdline, SUPERVISOR_SUBCOMMAND, name)
    }

    struct FakeProbe(Option<(i32, &'static str)>);
    impl ProcessProbe for FakeProbe {
        fn is_supervisor(&self, pid: i32, name: &str) -> bool {
            self.0.is_some_and(|(p, n)| p == pid && n == name)
        }
    }

    #[test]
    fn state_round_trips_and_defaults_to_created() {
        let dir = ScratchDir::new("state");
        let paths = SandboxStore::at(dir.path()).create_dirs("s").unwrap();
        assert_eq!(
            StateRecord::load(&paths).unwrap().state,
            SandboxState::Created
        );
        let mut record = StateRecord {
            state: SandboxState::Running,
            supervisor_pid: Some(42),
            started_at: Some("2026-01-01T00:00:00Z".into()),
            engine: Some("vmm".into()),
            nested: Some(NestedStatus::Unavailable),
            nested_detail: Some("host has no VMX".into()),
            ..Default::default()
        };
        record.save(&paths).unwrap();
        let read = StateRecord::load(&paths).unwrap();
        assert_eq!(read, record);
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&paths.state).unwrap()).unwrap();
        assert_eq!(json["state"], "running");
        assert_eq!(json["nested"], "unavailable");
    }

    #[test]
    fn dead_supervisors_make_error() {
        let mut record = StateRecord {
            state: SandboxState::Running,
            supervisor_pid: Some(7),
            ..Default::default()
        };
        assert!(!record
            .clone()
            .check_liveness("s", &FakeProbe(Some((7, "s")))));
        assert!(record.check_liveness("s", &FakeProbe(Some((7, "other")))));
        assert_eq!(record.state, SandboxState::Error);
        assert!(record.last_error.unwrap().contains("pid 7"));

        let mut starting = StateRecord {
            state: SandboxState::Starting,
            ..Default::default()
        };
        assert!(starting.check_liveness("s", &FakeProbe(None)));
        assert_eq!(starting.state, SandboxState::Error);

        let mut stopped = StateRecord {
            state: SandboxState::Stopped,
            supervisor_pid: Some(7),
            ..Default::default()
        };
        assert!(!stopped.check_liveness("s", &FakeProbe(None)));
        assert_eq!(stopped.state, SandboxState::Stopped);
    }

    #[test]
    fn the_real_probe_checks_the_command_line() {
        // This test process is alive but is not a supervisor.
        let me = std::process::id() as i32;
        assert!(!ProcProbe.is_supervisor(me, "s"));
        assert!(!ProcProbe.is_supervisor(0, "s"));
        assert!(!ProcProbe.is_supervisor(i32::MAX, "s"));
        assert!(is_supervisor_cmdline(
            b"/bin/keystone\0agent\0__supervise\0app-1\0",
            "app-1"
        ));
        assert!(!is_supervisor_cmdline(
            b"/bin/keystone\0agent\0__supervise\0app-12\0",
            "app-1"
        ));
        assert!(!is_supervisor_cmdline(b"/bin/sleep\0app-1\0", "app-1"));
    }

    #[test]
    fn a_real_supervisor_process_is_recognised() {
        // A stand-in whose command line looks like a supervisor's.
        let mut child = std::process::Command::new("sh")
            .args(["-c", "sleep 30; true", SUPERVISOR_SUBCOMMAND, "live-1"])
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        // sh -c CMD ARG0 ARG1: the extra words are in its argv once it
        // has exec'd (poll: right after fork it is still this test).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut seen = false;
        while !seen && std::time::Instant::now() < deadline {
            seen = ProcProbe.is_supervisor(pid, "live-1");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(seen);
        assert!(!ProcProbe.is_supervisor(pid, "live-1"));
    }

    #[test]
    fn the_sandbox_lock_excludes_a_second_holder() {
        let dir = ScratchDir::new("slock");
        let paths = SandboxStore::at(dir.path()).create_dirs("s").unwrap();
        let held = SandboxLock::try_acquire(&paths).unwrap().unwrap();
        assert!(SandboxLock::try_acquire(&paths).unwrap().is_none());
        drop(held);
        assert!(SandboxLock::try_acquire(&paths).unwrap().is_some());
    }
}
