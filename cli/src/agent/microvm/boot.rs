//! `start`'s side of a boot: launches the sandbox's supervisor and waits,
//! with deadlines and progress lines, until the supervisor reports the
//! guest agent up and then every service ready (`readiness.rs`).

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::super::backend::{BackendError, BackendResult, SandboxSpec};
use super::super::state::{NestedStatus, SUPERVISOR_SUBCOMMAND};
use super::engine::{EngineKind, Layout};
use super::readiness::{self, NoEvent, ReadyEvent, ReadyReader, Service, READY_FD};
use super::supervisor;

/// How long `start` waits for the guest agent (a guest whose kernel KVM
/// emulates takes minutes).
const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
/// How long the services get once the agent is up.
const SERVICES_TIMEOUT: Duration = Duration::from_secs(180);
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

fn io_failed(what: &str, e: impl std::fmt::Display) -> BackendError {
    BackendError::Failed(format!("{what}: {e}"))
}

/// What the supervisor needs besides the sandbox.
pub struct Images<'a> {
    pub kernel: &'a Path,
    pub rootfs: &'a Path,
    pub initrd: &'a Path,
}

/// A supervisor being started, and what it reported so far.
pub struct Boot<'a> {
    layout: &'a Layout,
    child: Child,
    events: ReadyReader,
    t0: Instant,
    /// Services that came up, with the time since `start` launched them.
    up: Vec<(Service, Duration)>,
    ready: bool,
    /// Nested virtualization as the engine set it up.
    nested: Option<(NestedStatus, String)>,
}

impl<'a> Boot<'a> {
    /// Launches `keystone agent __supervise NAME` in its own session, its
    /// output going to the supervisor log, with the readiness pipe as
    /// descriptor [`READY_FD`].
    pub fn launch(
        spec: &SandboxSpec,
        layout: &'a Layout,
        engine: EngineKind,
        images: &Images<'_>,
    ) -> BackendResult<Self> {
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
            .env(supervisor::ENV_ENGINE, engine.as_str())
            .env(supervisor::ENV_KERNEL, images.kernel)
            .env(supervisor::ENV_ROOTFS, images.rootfs)
            .env(supervisor::ENV_INITRD, images.initrd)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        let fd = write_end.as_raw_fd();
        // SAFETY: setsid and dup2 are async-signal-safe. The supervisor
        // leaves this terminal's session so that it outlives `start`, and
        // gets the pipe's write end as READY_FD (dup2 clears close-on-exec
        // on the copy; the original closes at exec).
        unsafe {
            cmd.pre_exec(move || {
                libc::setsid();
                if libc::dup2(fd, READY_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| io_failed("cannot start the supervisor", e))?;
        // Only the supervisor may hold the write end: the pipe ends when it
        // does.
        drop::<OwnedFd>(write_end);
        let events = ReadyReader::spawn(read_end)
            .map_err(|e| io_failed("cannot read the supervisor's readiness", e))?;
        Ok(Self {
            layout,
            child,
            events,
            t0: Instant::now(),
            up: Vec::new(),
            ready: false,
            nested: None,
        })
    }

    /// The supervisor's process id.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Nested virtualization as the engine reported it.
    pub fn nested(&self) -> Option<&(NestedStatus, String)> {
        self.nested.as_ref()
    }

    /// The services that came up, in order, with their times.
    pub fn services_up(&self) -> &[(Service, Duration)] {
        &self.up
    }

    /// Waits until the guest agent answers.
    pub fn wait_agent(&mut self, progress: &mut dyn FnMut(&str)) -> BackendResult<()> {
        self.wait_until(
            |b| b.up.iter().any(|(s, _)| *s == Service::Agent),
            BOOT_TIMEOUT,
            "the guest agent",
            progress,
        )
    }

    /// Waits until every service of the sandbox is established.
    pub fn wait_services(&mut self, progress: &mut dyn FnMut(&str)) -> BackendResult<()> {
        self.wait_until(
            |b| b.ready,
            SERVICES_TIMEOUT,
            "the sandbox's services",
            progress,
        )
    }

    fn wait_until(
        &mut self,
        done: impl Fn(&Self) -> bool,
        limit: Duration,
        what: &str,
        progress: &mut dyn FnMut(&str),
    ) -> BackendResult<()> {
        let started = Instant::now();
        let mut next_note = NOTE_EVERY;
        while !done(self) {
            match self.events.next(Duration::from_millis(500)) {
                Ok(event) => self.record(event, progress),
                Err(NoEvent::Closed) => {
                    // The supervisor ended, or closed the pipe without
                    // saying ready: either way it is not coming up.
                    return Err(self.died());
                }
                Err(NoEvent::Timeout) => {}
            }
            if let Ok(Some(_)) = self.child.try_wait() {
                return Err(self.died());
            }
            let waited = started.elapsed();
            if waited > limit && !done(self) {
                self.kill();
                return Err(BackendError::Failed(format!(
                    "{what} did not come up within {} s; stopped the VM.\n{}",
                    limit.as_secs(),
                    self.logs()
                )));
            }
            if waited > next_note {
                progress(&format!(
                    "waiting for {what} ({} s)",
                    self.t0.elapsed().as_secs()
                ));
                next_note += NOTE_EVERY;
            }
        }
        Ok(())
    }

    fn record(&mut self, event: ReadyEvent, progress: &mut dyn FnMut(&str)) {
        let at = self.t0.elapsed();
        match event {
            ReadyEvent::Up { service, .. } => {
                if service == Service::Agent {
                    progress(&format!(
                        "guest agent ready after {:.1} s",
                        at.as_secs_f64()
                    ));
                }
                self.up.push((service, at));
            }
            ReadyEvent::Unavailable { service, why, .. } => progress(&format!(
                "warning: the {} is not available: {}",
                service.describe(),
                crate::shown::line(&why)
            )),
            ReadyEvent::Ready { .. } => self.ready = true,
            ReadyEvent::Engine { nested, how } => self.nested = Some((nested, how)),
        }
    }

    fn kill(&mut self) {
        // SAFETY: signalling our own child, which has not been reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGKILL) };
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

    /// Hands the running supervisor over (it outlives `start`).
    pub fn into_pid(self) -> i32 {
        self.pid()
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
