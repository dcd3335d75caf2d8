//! One measured boot: spawn a VMM with its serial console on a pipe, time
//! the milestones from the spawn, sample its memory at the milestone (the
//! marker line, or the agent's first answer), and wait for it to exit
//! (killed if it does not exit soon after the marker, e.g. when its reboot
//! path hangs; stopped at once after the agent answered, or after the
//! marker for a VMM that boots the guest again on reboot).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use keystone_tests::log_tail;
use serde::Serialize;
use vmm::host::monotonic_ns;

use super::agent;
use super::child::GroupChild;
use super::console::{Console, ConsoleState};
use super::procmem::{self, ProcMemory};

/// The status of a boot the harness ended at its milestone, as planned.
const STOPPED_AT_MILESTONE: &str = "stopped by the harness at the milestone";

/// What ends the measured part of a boot.
pub enum Until<'a> {
    /// A console line containing this marker.
    Marker(&'a str),
    /// The guest agent behind this hybrid vsock socket answering a ping.
    Agent(&'a Path),
}

/// What to boot.
pub struct BootSpec<'a> {
    pub name: &'a str,
    pub program: &'a Path,
    pub args: Vec<OsString>,
    pub env: &'a [(String, PathBuf)],
    pub until: Until<'a>,
    /// Extra processes (e.g. the virtio-fs daemon) whose memory is sampled too.
    pub extra_pids: Vec<u32>,
    /// The guest's memory, MiB (left out of the VMM's).
    pub guest_mib: u64,
    pub stderr_log: PathBuf,
    pub limit: Duration,
    /// How long to wait for an exit after the milestone (0: stop the VMM
    /// at once, for a VMM that boots the guest again on reboot).
    pub exit_grace: Duration,
    /// Text on the VMM's stderr that means it is stuck for good (QEMU
    /// pauses instead of exiting on a KVM emulation failure): kill at once.
    pub fatal_stderr: &'a [&'a str],
}

/// How the VMM ended.
#[derive(Debug, Clone, Serialize)]
pub struct ExitInfo {
    /// The guest reached the marker and the VMM exited by itself with status 0.
    pub clean: bool,
    /// Human-readable: exit status, or why the harness killed it.
    pub status: String,
    pub killed_by_harness: bool,
    /// Stopped by the harness at the milestone, as planned (the agent
    /// boot; a VMM that boots the guest again on reboot).
    pub stopped_at_milestone: bool,
    /// Spawn to exit (or to kill), ms.
    pub wall_ms: f64,
}

/// Milestones of one boot, in ms from the spawn (harness clock).
#[derive(Debug, Clone, Serialize)]
pub struct BootOutcome {
    pub spawn_ns: u64,
    pub kernel_start_ms: Option<f64>,
    pub init_exec_ms: Option<f64>,
    pub userspace_ms: Option<f64>,
    /// Until::Agent: the first answered ping, and the agent's version.
    pub agent_ready_ms: Option<f64>,
    pub agent_version: Option<String>,
    /// The VMM process's memory at the milestone.
    pub memory: Option<ProcMemory>,
    /// Memory of the extra processes at the milestone.
    pub extra_memory: Vec<Option<ProcMemory>>,
    pub exit: ExitInfo,
    /// The final command line as the guest kernel printed it.
    pub kernel_cmdline: Option<String>,
    pub serial_bytes: u64,
    pub error: Option<String>,
}

fn ms_since(from: u64, at: Option<u64>) -> Option<f64> {
    at.map(|t| (t as f64 - from as f64) / 1e6)
}

/// The last `lines` lines of a log that are not blank, escaped, on one
/// line (read from the end of the log only).
fn tail(path: &Path, lines: usize) -> String {
    let text = log_tail(path, usize::MAX);
    let all: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    all[all.len().saturating_sub(lines)..].join(" | ")
}

fn fatal_text(path: &Path, patterns: &[&str]) -> Option<String> {
    if patterns.is_empty() {
        return None;
    }
    let text = std::fs::read_to_string(path).ok()?;
    patterns
        .iter()
        .find(|p| text.contains(**p))
        .map(|p| p.to_string())
}

/// A marker no guest prints, for boots that end on the agent instead.
const NO_MARKER: &str = "KEYSTONE-BENCH-NO-MARKER";

/// Boots once; errors only if the VMM cannot be started at all.
pub fn boot(spec: BootSpec<'_>) -> anyhow::Result<BootOutcome> {
    let stderr = std::fs::File::create(&spec.stderr_log)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", spec.stderr_log.display()))?;
    let mut cmd = Command::new(spec.program);
    cmd.args(&spec.args)
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr);
    let mut child = GroupChild::spawn(spec.name, &mut cmd)?;
    let spawn_ns = child.spawn_ns;
    let started = Instant::now();
    let stdout = child
        .take_stdout()
        .ok_or_else(|| anyhow::anyhow!("{}: no stdout pipe", spec.name))?;
    let mut watch = vec![child.pid()];
    watch.extend(&spec.extra_pids);
    let (marker, client) = match spec.until {
        Until::Marker(m) => (m, None),
        Until::Agent(uds) => (NO_MARKER, Some(agent::client(uds))),
    };
    let console = Console::start(stdout, marker, watch.clone(), spec.guest_mib)?;

    let mut agent_ready: Option<(u64, String, Vec<Option<ProcMemory>>)> = None;
    let mut milestone_at: Option<Instant> = None;
    let mut polls: u64 = 0;
    let (status, killed) = loop {
        if let Some(s) = child.try_wait()? {
            break (s.to_string(), false);
        }
        polls += 1;
        if polls % 25 == 0 {
            if let Some(text) = fatal_text(&spec.stderr_log, spec.fatal_stderr) {
                child.kill();
                break (
                    format!("killed: the VMM reported '{text}' and stopped running the guest"),
                    true,
                );
            }
        }
        if started.elapsed() >= spec.limit {
            child.kill();
            break (
                format!(
                    "killed: no exit within {} s (milestone {})",
                    spec.limit.as_secs(),
                    if milestone_at.is_some() {
                        "seen"
                    } else {
                        "not seen"
                    }
                ),
                true,
            );
        }
        if milestone_at.is_none() {
            let reached = match &client {
                None => console.snapshot().marker_ns.is_some(),
                Some(c) => match agent::ping(c) {
                    Some(version) => {
                        let now = monotonic_ns();
                        let mem = watch
                            .iter()
                            .map(|&pid| procmem::read(pid, spec.guest_mib))
                            .collect();
                        agent_ready = Some((now, version, mem));
                        true
                    }
                    None => false,
                },
            };
            if reached {
                milestone_at = Some(Instant::now());
            }
        }
        if let Some(at) = milestone_at {
            if at.elapsed() >= spec.exit_grace {
                child.kill();
                let why = if spec.exit_grace.is_zero() {
                    STOPPED_AT_MILESTONE.to_string()
                } else {
                    format!(
                        "killed: milestone seen but no exit within {} s after it",
                        spec.exit_grace.as_secs()
                    )
                };
                break (why, true);
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let end_ns = monotonic_ns();
    // Make sure nothing in the group holds the pipe open, then drain it.
    child.kill();
    let st: ConsoleState = console.finish();
    let samples = match &agent_ready {
        Some((_, _, mem)) => mem.clone(),
        None => st.marker_memory.clone(),
    };
    let mut mem = samples.into_iter();
    let memory = mem.next().flatten();
    let extra_memory: Vec<_> = mem.collect();
    let stopped = killed && status == STOPPED_AT_MILESTONE;
    let exited_ok = (!killed && status == "exit status: 0") || stopped;
    let reached = milestone_at.is_some();
    let error = if reached && exited_ok {
        None
    } else {
        let what = match (reached, &client) {
            (false, None) => "the guest never printed the user-space marker",
            (false, Some(_)) => "the guest agent never answered a ping",
            (true, _) => "the VMM did not exit cleanly after the milestone",
        };
        Some(format!(
            "{what}; {status}; VMM stderr: {}; last console lines: {}",
            tail(&spec.stderr_log, 6),
            st.tail
                .iter()
                .rev()
                .take(4)
                .rev()
                .cloned()
                .collect::<Vec<_>>()
                .join(" | ")
        ))
    };
    Ok(BootOutcome {
        spawn_ns,
        kernel_start_ms: ms_since(spawn_ns, st.first_byte_ns),
        init_exec_ms: ms_since(spawn_ns, st.init_exec_ns),
        userspace_ms: ms_since(spawn_ns, st.marker_ns),
        agent_ready_ms: ms_since(spawn_ns, agent_ready.as_ref().map(|a| a.0)),
        agent_version: agent_ready.map(|a| a.1),
        memory,
        extra_memory,
        exit: ExitInfo {
            clean: reached && exited_ok,
            status,
            killed_by_harness: killed && !stopped,
            stopped_at_milestone: stopped,
            wall_ms: (end_ns as f64 - spawn_ns as f64) / 1e6,
        },
        kernel_cmdline: st.kernel_cmdline,
        serial_bytes: st.bytes,
        error,
    })
}
