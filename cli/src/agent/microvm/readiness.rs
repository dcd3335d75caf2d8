//! When a sandbox is ready: the supervisor tells `start`, service by
//! service, over a pipe.
//!
//! A sandbox is ready when every service it was started with is
//! established, not when its guest agent first answers: a command run the
//! moment `start` returns must find the network up, and a commit made
//! then must reach the host in the auto-sync modes. The services are
//! [`Service`]: the guest agent, the egress offer (network `nat`), the
//! auto-sync watch (`auto-commit`, `auto-idle`) and the port watch.
//!
//! `start` makes a pipe and gives its write end to the supervisor as
//! descriptor [`READY_FD`]. The supervisor writes one JSON object per
//! line ([`ReadyEvent`]): `progress` lines for the user while it prepares
//! and boots, `phase` when a step of the start is done (with how long it
//! took), `engine` once the engine runs the guest (nested virtualization
//! as the engine actually configured it), `up` when a service is first
//! established, `unavailable` when one cannot be (it is then reported, not
//! awaited), and `ready` once every expected service has settled; or
//! `failed` with the exit code and the reason. Then it closes its end.
//! The end of the pipe before `ready` or `failed` means the supervisor
//! died.
//!
//! The services wait for the agent to be up before their first try
//! ([`Readiness::wait_up`]): one prober per boot (the supervisor's ping)
//! instead of one per service, each refused try costing a booting guest
//! kernel time.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::super::state::NestedStatus;

/// The supervisor's descriptor for the write end of the readiness pipe.
pub const READY_FD: RawFd = 3;
/// The longest event line `start` reads.
const MAX_LINE: u64 = 4096;

/// A service of a running sandbox that `start` waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Service {
    /// The guest agent answers.
    Agent,
    /// The supervisor offers outbound connections to the guest's proxy.
    Egress,
    /// The auto-sync watch on `/workspace` is open.
    AutoSync,
    /// The guest's listening ports have been read once.
    Ports,
    /// The setup in the guest: its clock, the `.env` files, the host's
    /// certificate authorities, the coding agents' record.
    Setup,
}

impl Service {
    /// How `start` names it.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Agent => "guest agent",
            Self::Egress => "network",
            Self::AutoSync => "auto-sync watch",
            Self::Ports => "port watch",
            Self::Setup => "setup",
        }
    }
}

/// One line on the readiness pipe.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum ReadyEvent {
    /// A line for the user (the supervisor's own words, or the guest's
    /// escaped by whoever shows it).
    Progress { line: String },
    /// A step of the start is done; it took `ms`.
    Phase { phase: String, ms: u64 },
    /// `engine` is running the guest, with nested virtualization as
    /// `nested`, set up as `how` says.
    Engine {
        engine: String,
        nested: NestedStatus,
        how: String,
    },
    /// The start failed: the exit code `start` leaves with, and why.
    Failed { code: i32, message: String },
    /// `service` is established, `after_ms` after the guest was launched.
    Up { service: Service, after_ms: u64 },
    /// `service` cannot be established; the sandbox runs without it.
    Unavailable {
        service: Service,
        after_ms: u64,
        why: String,
    },
    /// Every expected service has settled.
    Ready { after_ms: u64 },
}

/// What runs once every service has settled, before `start` hears it.
type BeforeReady = Box<dyn FnOnce() + Send>;

struct Inner {
    /// The pipe; `None` once `ready` was written (or there is none).
    out: Option<File>,
    before_ready: Option<BeforeReady>,
    expected: BTreeSet<Service>,
    settled: BTreeMap<Service, Duration>,
    up: BTreeSet<Service>,
}

/// The supervisor's side: records the services as they come up and
/// reports them on the pipe.
pub struct Readiness {
    t0: Instant,
    inner: Mutex<Inner>,
    changed: Condvar,
}

impl Readiness {
    /// Tracks `expected`, reporting on `out` (none: only logged).
    pub fn new(out: Option<File>, expected: &[Service]) -> Self {
        Self {
            t0: Instant::now(),
            inner: Mutex::new(Inner {
                out,
                before_ready: None,
                expected: expected.iter().copied().collect(),
                settled: BTreeMap::new(),
                up: BTreeSet::new(),
            }),
            changed: Condvar::new(),
        }
    }

    /// The write end `start` passed as [`READY_FD`], if there is one.
    pub fn inherited_pipe() -> Option<File> {
        // SAFETY: F_GETFD only reads the descriptor's flags; it fails with
        // EBADF when the descriptor is not open.
        if unsafe { libc::fcntl(READY_FD, libc::F_GETFD) } < 0 {
            return None;
        }
        // SAFETY: `start` opened READY_FD for this process as the pipe's
        // write end (see `spawn_supervisor`) and nothing else in this
        // process owns it; it is taken once, at the supervisor's start.
        Some(unsafe { File::from_raw_fd(READY_FD) })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reports how the engine set the guest up.
    pub fn engine(&self, engine: &str, nested: NestedStatus, how: &str) {
        log::info!("nested virtualization {}: {how}", nested.as_str());
        write_event(
            &mut self.lock().out,
            &ReadyEvent::Engine {
                engine: engine.to_string(),
                nested,
                how: how.to_string(),
            },
        );
    }

    /// A line for the user (also logged).
    pub fn progress(&self, line: &str) {
        log::info!("{}", line);
        write_event(
            &mut self.lock().out,
            &ReadyEvent::Progress {
                line: line.to_string(),
            },
        );
    }

    /// A step of the start is done after `took`.
    pub fn phase(&self, phase: &str, took: Duration) {
        log::info!("phase: {phase} took {:.3} s", took.as_secs_f64());
        write_event(
            &mut self.lock().out,
            &ReadyEvent::Phase {
                phase: phase.to_string(),
                ms: took.as_millis() as u64,
            },
        );
    }

    /// The start failed: `start` leaves with `code` and says `message`.
    /// Nothing more is reported.
    pub fn failed(&self, code: i32, message: &str) {
        let mut inner = self.lock();
        write_event(
            &mut inner.out,
            &ReadyEvent::Failed {
                code,
                message: message.to_string(),
            },
        );
        inner.out = None;
    }

    /// Runs `f` once every expected service has settled, before `ready`
    /// is reported.
    pub fn before_ready(&self, f: impl FnOnce() + Send + 'static) {
        self.lock().before_ready = Some(Box::new(f));
    }

    /// Whether every expected service has settled.
    pub fn is_ready(&self) -> bool {
        let inner = self.lock();
        inner.expected.iter().all(|s| inner.settled.contains_key(s))
    }

    /// Whether `service` is up.
    pub fn is_up(&self, service: Service) -> bool {
        self.lock().up.contains(&service)
    }

    /// `service` is established (only its first report counts).
    pub fn up(&self, service: Service) {
        self.settle(service, None);
    }

    /// `service` cannot be established: `start` says why and does not
    /// wait for it.
    pub fn unavailable(&self, service: Service, why: &str) {
        self.settle(service, Some(why));
    }

    fn settle(&self, service: Service, why: Option<&str>) {
        let mut inner = self.lock();
        if inner.settled.contains_key(&service) {
            return;
        }
        let after = self.t0.elapsed();
        inner.settled.insert(service, after);
        if why.is_none() {
            inner.up.insert(service);
        }
        let after_ms = after.as_millis() as u64;
        let event = match why {
            None => ReadyEvent::Up { service, after_ms },
            Some(why) => ReadyEvent::Unavailable {
                service,
                after_ms,
                why: why.to_string(),
            },
        };
        log::info!(
            "ready: {} {} after {:.2} s",
            service.describe(),
            if why.is_none() { "up" } else { "unavailable" },
            after.as_secs_f64()
        );
        write_event(&mut inner.out, &event);
        let all = inner.expected.iter().all(|s| inner.settled.contains_key(s));
        if all {
            // The run state says `running` before `start` returns.
            if let Some(f) = inner.before_ready.take() {
                f();
            }
        }
        if all && inner.out.is_some() {
            write_event(&mut inner.out, &ReadyEvent::Ready { after_ms });
            // Closing our end tells `start` that nothing more comes.
            inner.out = None;
            log::info!(
                "ready: every service settled after {:.2} s",
                after.as_secs_f64()
            );
        }
        drop(inner);
        self.changed.notify_all();
    }

    /// Waits until `service` is up; false when `stop` was set first.
    pub fn wait_up(&self, service: Service, stop: &AtomicBool) -> bool {
        self.wait_for(stop, |inner| inner.up.contains(&service))
    }

    /// Waits until every expected service has settled (the sandbox is
    /// ready); false when `stop` was set first.
    pub fn wait_ready(&self, stop: &AtomicBool) -> bool {
        self.wait_for(stop, |inner| {
            inner.expected.iter().all(|s| inner.settled.contains_key(s))
        })
    }

    fn wait_for(&self, stop: &AtomicBool, done: impl Fn(&Inner) -> bool) -> bool {
        let mut inner = self.lock();
        loop {
            if done(&inner) {
                return true;
            }
            if stop.load(Ordering::SeqCst) {
                return false;
            }
            inner = self
                .changed
                .wait_timeout(inner, Duration::from_millis(100))
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }
}

fn write_event(out: &mut Option<File>, event: &ReadyEvent) {
    let Some(file) = out.as_mut() else { return };
    let Ok(mut line) = serde_json::to_vec(event) else {
        return;
    };
    line.push(b'\n');
    // `start` may be gone (interrupted): the sandbox runs on regardless.
    if file.write_all(&line).is_err() {
        *out = None;
    }
}

/// Why [`ReadyReader::next`] returned no event.
#[derive(Debug, PartialEq, Eq)]
pub enum NoEvent {
    /// Nothing arrived in time.
    Timeout,
    /// The supervisor closed the pipe (it reported `ready`, or died).
    Closed,
}

/// `start`'s side: the events, read by a thread from the pipe.
pub struct ReadyReader {
    rx: Receiver<ReadyEvent>,
}

impl ReadyReader {
    /// Reads `pipe` (the read end) until the supervisor closes it.
    pub fn spawn(pipe: OwnedFd) -> std::io::Result<Self> {
        let (tx, rx) = sync_channel(16);
        std::thread::Builder::new()
            .name("ready-reader".into())
            .spawn(move || {
                let mut reader = BufReader::new(File::from(pipe));
                loop {
                    let mut line = String::new();
                    match (&mut reader).take(MAX_LINE).read_line(&mut line) {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                    // A line we cannot read is skipped, not fatal.
                    if let Ok(event) = serde_json::from_str::<ReadyEvent>(line.trim_end()) {
                        if tx.send(event).is_err() {
                            return;
                        }
                    }
                }
            })?;
        Ok(Self { rx })
    }

    /// The next event, waiting up to `timeout`.
    pub fn next(&self, timeout: Duration) -> Result<ReadyEvent, NoEvent> {
        self.rx.recv_timeout(timeout).map_err(|e| match e {
            RecvTimeoutError::Timeout => NoEvent::Timeout,
            RecvTimeoutError::Disconnected => NoEvent::Closed,
        })
    }
}

/// A pipe whose two ends are closed on exec: (read end, write end).
pub fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    Ok(rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (ReadyReader, File) {
        let (r, w) = pipe().unwrap();
        (ReadyReader::spawn(r).unwrap(), File::from(w))
    }

    #[test]
    fn ready_comes_once_every_expected_service_settled() {
        let (reader, w) = pair();
        let ready = Readiness::new(Some(w), &[Service::Agent, Service::Egress, Service::Ports]);
        ready.up(Service::Agent);
        ready.up(Service::Agent);
        ready.up(Service::Ports);
        let t = Duration::from_secs(5);
        assert!(matches!(
            reader.next(t),
            Ok(ReadyEvent::Up {
                service: Service::Agent,
                ..
            })
        ));
        assert!(matches!(
            reader.next(t),
            Ok(ReadyEvent::Up {
                service: Service::Ports,
                ..
            })
        ));
        // The duplicate report of the agent wrote nothing; egress is awaited.
        assert_eq!(
            reader.next(Duration::from_millis(200)),
            Err(NoEvent::Timeout)
        );
        ready.unavailable(Service::Egress, "agent too old");
        assert!(matches!(
            reader.next(t),
            Ok(ReadyEvent::Unavailable { service: Service::Egress, ref why, .. }) if why == "agent too old"
        ));
        assert!(matches!(reader.next(t), Ok(ReadyEvent::Ready { .. })));
        assert_eq!(reader.next(t), Err(NoEvent::Closed));
        let stop = AtomicBool::new(true);
        assert!(ready.wait_up(Service::Ports, &stop));
        assert!(
            !ready.wait_up(Service::Egress, &stop),
            "unavailable is not up"
        );
    }

    #[test]
    fn a_supervisor_that_dies_closes_the_pipe() {
        let (reader, w) = pair();
        let ready = Readiness::new(Some(w), &[Service::Agent, Service::Egress]);
        ready.up(Service::Agent);
        drop(ready);
        assert!(matches!(
            reader.next(Duration::from_secs(5)),
            Ok(ReadyEvent::Up { .. })
        ));
        assert_eq!(reader.next(Duration::from_secs(5)), Err(NoEvent::Closed));
    }

    #[test]
    fn services_wait_for_the_agent_or_a_stop() {
        let ready = std::sync::Arc::new(Readiness::new(None, &[Service::Agent]));
        let stop = AtomicBool::new(false);
        let waiter = {
            let ready = std::sync::Arc::clone(&ready);
            std::thread::spawn(move || ready.wait_up(Service::Agent, &AtomicBool::new(false)))
        };
        std::thread::sleep(Duration::from_millis(50));
        ready.up(Service::Agent);
        assert!(waiter.join().unwrap());
        stop.store(true, Ordering::SeqCst);
        assert!(!ready.wait_up(Service::Egress, &stop));
    }

    #[test]
    fn events_are_one_json_object_per_line() {
        let e = ReadyEvent::Up {
            service: Service::AutoSync,
            after_ms: 12,
        };
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"event":"up","service":"auto-sync","after_ms":12}"#
        );
    }
}
