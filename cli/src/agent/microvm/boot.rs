//! `start`'s side of a boot: launches the sandbox's supervisor with its
//! plan, shows what it reports (progress lines, the engine, each service
//! as it comes up, the phases of the start) and returns once it reports
//! the sandbox ready, or with its failure and the logs' tails.

use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::super::backend::{BackendError, BackendResult, SandboxSpec};
use super::super::state::{NestedStatus, SUPERVISOR_SUBCOMMAND};
use super::engine::Layout;
use super::plan::SupervisorPlan;
use super::readiness::{self, NoEvent, ReadyEvent, ReadyReader, Service, READY_FD};

/// How long the guest agent may take to answer once the engine runs (a
/// guest whose kernel KVM emulates takes minutes).
pub const AGENT_TIMEOUT: Duration = Duration::from_secs(600);
/// How long the services and the setup get once the agent is up.
pub const SERVICES_TIMEOUT: Duration = Duration::from_secs(180);
/// How often a wait says it is still waiting.
const NOTE_EVERY: Duration = Duration::from_secs(10);

/// The most of a log's end that [`tail`] reads.
const TAIL_BYTES: u64 = 64 << 10;

/// The last `n` lines of a log file, for error messages, each escaped
/// (the console is the guest's).
pub fn tail(path: &Path, n: usize) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let mut raw = Vec::new();
    if let Ok(mut file) = std::fs::File::open(path) {
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = file.seek(SeekFrom::Start(len.saturating_sub(TAIL_BYTES)));
        let _ = file.take(TAIL_BYTES).read_to_end(&mut raw);
    }
    let text = String::from_utf8_lossy(&raw);
    let lines: Vec<String> = text.lines().map(crate::shown::line).collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn io_failed(what: &str, e: std::io::Error) -> BackendError {
    BackendError::io(what, e)
}

/// What the supervisor reported of a start that succeeded.
pub struct BootReport {
    /// The supervisor, which outlives `start`.
    pub supervisor_pid: i32,
    /// The engine that runs the guest.
    pub engine: String,
    /// Nested virtualization as the engine set it up, and how.
    pub nested: (NestedStatus, String),
    /// Services that came up, with the time since the launch.
    pub services: Vec<(Service, Duration)>,
    /// The steps of the start and how long each took, in order.
    pub phases: Vec<(String, Duration)>,
    /// From the launch to ready.
    pub total: Duration,
}

/// A supervisor being started, and what it reported so far.
pub struct Boot<'a> {
    layout: &'a Layout,
    child: Child,
    events: ReadyReader,
    t0: Instant,
    engine: Option<(String, NestedStatus, String)>,
    services: Vec<(Service, Duration)>,
    phases: Vec<(String, Duration)>,
}

impl<'a> Boot<'a> {
    /// Launches `keystone agent __supervise NAME` in its own session, its
    /// output going to the supervisor log, its plan on its standard input
    /// and the readiness pipe as descriptor [`READY_FD`].
    pub fn launch(spec: &SandboxSpec, layout: &'a Layout) -> BackendResult<Self> {
        let exe =
            std::env::current_exe().map_err(|e| io_failed("cannot find the keystone binary", e))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&layout.supervisor_log)
            .map_err(|e| io_failed(&layout.supervisor_log.display().to_string(), e))?;
        let log2 = log
            .try_clone()
            .map_err(|e| io_failed("supervisor log", e))?;
        let (read_end, write_end) =
            readiness::pipe().map_err(|e| io_failed("cannot make the readiness pipe", e))?;
        let mut cmd = Command::new(exe);
        cmd.args(["agent", SUPERVISOR_SUBCOMMAND, &spec.name])
            .stdin(Stdio::piped())
            .stdout(log)
            .stderr(log2);
        let fd = write_end.as_raw_fd();
        // SAFETY: setsid and dup2 are async-signal-safe system calls that
        // allocate nothing. The supervisor leaves this terminal's session
        // so that it outlives `start`, and gets the pipe's write end as
        // READY_FD (dup2 clears close-on-exec on the copy; the original
        // closes at exec). dup2 stays libc's: rustix's wants the target as
        // an `OwnedFd`, and READY_FD is not open in the child before it.
        unsafe {
            cmd.pre_exec(move || {
                let _ = rustix::process::setsid();
                if libc::dup2(fd, READY_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| io_failed("cannot start the supervisor", e))?;
        // Only the supervisor may hold the write end: the pipe ends when it
        // does.
        drop::<OwnedFd>(write_end);
        let plan = SupervisorPlan::new(spec, AGENT_TIMEOUT.as_secs(), SERVICES_TIMEOUT.as_secs());
        if let Some(mut stdin) = child.stdin.take() {
            // Closing it ends the plan.
            stdin
                .write_all(&plan.to_json())
                .map_err(|e| io_failed("cannot hand the supervisor its plan", e))?;
        }
        let events = ReadyReader::spawn(read_end)
            .map_err(|e| io_failed("cannot read the supervisor's readiness", e))?;
        Ok(Self {
            layout,
            child,
            events,
            t0: Instant::now(),
            engine: None,
            services: Vec::new(),
            phases: Vec::new(),
        })
    }

    /// Shows the supervisor's reports until it says the sandbox is ready
    /// (or failed, or died). The supervisor keeps the deadlines of the
    /// boot; this waits as long as it lives and reports.
    pub fn run(mut self, progress: &mut dyn FnMut(&str)) -> BackendResult<BootReport> {
        let mut last = String::from("the supervisor");
        let mut next_note = NOTE_EVERY;
        let mut quiet_since = Instant::now();
        loop {
            match self.events.next(Duration::from_millis(500)) {
                Ok(ReadyEvent::Ready { .. }) => break,
                Ok(ReadyEvent::Failed { code, message }) => {
                    let message = format!("{message}\n{}", self.logs());
                    let _ = self.child.try_wait();
                    return Err(BackendError::with_code(code, message));
                }
                Ok(event) => {
                    if let Some(line) = self.record(event) {
                        progress(&line);
                        last = line;
                    }
                    quiet_since = Instant::now();
                    next_note = NOTE_EVERY;
                }
                Err(NoEvent::Closed) => return Err(self.died()),
                Err(NoEvent::Timeout) => {}
            }
            if let Ok(Some(_)) = self.child.try_wait() {
                return Err(self.died());
            }
            if quiet_since.elapsed() > next_note {
                progress(&format!(
                    "still working ({} s): {}",
                    self.t0.elapsed().as_secs(),
                    last.trim_end_matches("...")
                ));
                next_note += NOTE_EVERY;
            }
        }
        let (engine, nested, how) = self.engine.take().unwrap_or((
            "unknown".into(),
            NestedStatus::Unavailable,
            "the engine did not report it".into(),
        ));
        Ok(BootReport {
            supervisor_pid: self.child.id() as i32,
            engine,
            nested: (nested, how),
            services: self.services,
            phases: self.phases,
            total: self.t0.elapsed(),
        })
    }

    /// Keeps what an event says; returns the line to show, if any.
    fn record(&mut self, event: ReadyEvent) -> Option<String> {
        let at = self.t0.elapsed();
        match event {
            ReadyEvent::Progress { line } => Some(line),
            ReadyEvent::Phase { phase, ms } => {
                self.phases.push((phase, Duration::from_millis(ms)));
                None
            }
            ReadyEvent::Engine {
                engine,
                nested,
                how,
            } => {
                self.engine = Some((engine, nested, how));
                None
            }
            ReadyEvent::Up { service, .. } => {
                self.services.push((service, at));
                (service == Service::Agent)
                    .then(|| format!("guest agent ready after {:.1} s", at.as_secs_f64()))
            }
            ReadyEvent::Unavailable { service, why, .. } => Some(format!(
                "warning: the {} is not available: {}",
                service.describe(),
                crate::shown::line(&why)
            )),
            ReadyEvent::Ready { .. } | ReadyEvent::Failed { .. } => None,
        }
    }

    fn kill(&mut self) {
        // SIGKILL to our own child, which has not been reaped.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn logs(&self) -> String {
        format!(
            "supervisor log ({}):\n{}\nconsole ({}):\n{}",
            self.layout.supervisor_log.display(),
            tail(&self.layout.supervisor_log, 15),
            self.layout.console_log.display(),
            tail(&self.layout.console_log, 15)
        )
    }

    fn died(&mut self) -> BackendError {
        // Give an exiting supervisor a moment to be reaped and to finish
        // its log.
        let deadline = Instant::now() + Duration::from_secs(5);
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(status)) => break status.to_string(),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                _ => {
                    self.kill();
                    break "closed its readiness pipe".to_string();
                }
            }
        };
        BackendError::Failed(format!(
            "the sandbox supervisor exited during boot ({status}).\n{}",
            self.logs()
        ))
    }
}

/// "egress 1.4 s, port watch 1.4 s": each service and when it came up.
pub fn describe_services(up: &[(Service, Duration)]) -> String {
    up.iter()
        .filter(|(s, _)| *s != Service::Agent)
        .map(|(s, at)| format!("{} {:.1} s", s.describe(), at.as_secs_f64()))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn services_are_listed_with_their_times() {
        let up = [
            (Service::Agent, Duration::from_millis(1200)),
            (Service::Egress, Duration::from_millis(1340)),
            (Service::Ports, Duration::from_millis(1400)),
        ];
        assert_eq!(describe_services(&up), "network 1.3 s, port watch 1.4 s");
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        let dir = std::env::temp_dir().join(format!("ks-boot-tail-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("log");
        std::fs::write(&f, "a\nb\nc\n").unwrap();
        assert_eq!(tail(&f, 2), "b\nc");
        // A console that ends in escape sequences and a long line.
        let hostile = format!("{}\n{}\n", "x".repeat(200_000), crate::shown::HOSTILE);
        std::fs::write(&f, hostile).unwrap();
        let shown = tail(&f, 15);
        assert!(crate::shown::terminal_safe(&shown), "{shown:?}");
        assert_eq!(shown.lines().count(), 3, "{shown}");
        assert_eq!(tail(&dir.join("none"), 2), "");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
