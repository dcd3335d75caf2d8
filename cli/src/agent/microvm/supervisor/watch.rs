//! While the guest runs: the agent prober (with the guest's boot
//! milestones), the setup in the guest, the host-side services (egress,
//! auto-sync, the port watch), the deadlines of the start, and the stop.
//!
//! The run state goes `running` once every expected service has settled.
//! A termination signal (on the channel from `crate::signals`) asks the
//! guest agent to power off, forced after [`SHUTDOWN_GRACE`].

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::super::super::backend::SandboxSpec;
use super::super::super::state::RunStateWriter;
use super::super::engine::Layout;
use super::super::plan::SupervisorPlan;
use super::super::readiness::{Readiness, Service};
use super::super::{autosync, egress, forward, guest};
use super::engines::Launched;
use super::prepare::Prepared;
use super::{memory, setup, Ended, SupervisorError};

/// How long the guest gets to shut down after the agent was asked.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// How often the loop looks at the guest between signals.
const TICK: Duration = Duration::from_millis(50);

/// What one run of the supervisor works with.
pub struct Run<'a> {
    pub plan: &'a SupervisorPlan,
    pub spec: &'a SandboxSpec,
    pub layout: &'a Layout,
    pub ready: &'a Arc<Readiness>,
    pub state: &'a RunStateWriter,
    pub stops: &'a Receiver<libc::c_int>,
}

/// Sets a flag when dropped: the end of the helper threads' work.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Runs the sandbox until the guest ends or a stop was asked for.
pub fn watch(
    run: &Run<'_>,
    prepared: &Prepared,
    launched: &mut Launched,
) -> Result<Ended, SupervisorError> {
    let (spec, layout, ready) = (run.spec, run.layout, run.ready);
    ready.before_ready({
        let state = run.state.clone();
        let (engine, nested, how) = (
            launched.engine.as_str(),
            launched.nested,
            launched.nested_how.clone(),
        );
        move || {
            if let Err(e) = state.running(engine, nested, &how) {
                log::warn!("cannot record the running state: {e}");
            }
        }
    });
    let stop = StopOnDrop(Arc::new(AtomicBool::new(false)));
    spawn("agent-probe", {
        let (vsock, ready, stop) = (layout.vsock.clone(), Arc::clone(ready), Arc::clone(&stop.0));
        let launched_at = launched.launched_at;
        move || probe_agent(&vsock, &ready, &stop, launched_at)
    })?;
    spawn("setup", {
        let (spec, layout, ready, stop) = (
            spec.clone(),
            layout.clone(),
            Arc::clone(ready),
            Arc::clone(&stop.0),
        );
        let pins = prepared.agent_pins.clone();
        move || {
            if ready.wait_up(Service::Agent, &stop) {
                setup::run(&spec, &layout, &pins, &ready);
                ready.up(Service::Setup);
            }
        }
    })?;
    if let Some(booted) = launched.boot_memory_mib {
        spawn("memory", {
            let (vsock, ready, stop) =
                (layout.vsock.clone(), Arc::clone(ready), Arc::clone(&stop.0));
            move || {
                if ready.wait_ready(&stop) {
                    memory::add(&vsock, &format!("after ready (booted with {booted} MiB)"));
                }
            }
        })?;
    }
    let auto = autosync::start(spec, &layout.vsock, ready);
    // Outbound connections for the guest's programs; ended on return.
    let egress = egress::start(spec, &layout.vsock, ready);
    // Watches the guest's ports while the guest runs; dropped (published
    // ports closed) on return.
    let publish = spec.settings.proxy_publish_same_port;
    let mut ports = forward::PortForwarder::start(layout, ready, publish);
    let stop_services = |ports: &mut forward::PortForwarder| {
        if let Some(a) = &auto {
            a.stop();
        }
        if let Some(e) = &egress {
            e.stop();
        }
        ports.stop();
    };

    let agent_deadline = launched.launched_at + Duration::from_secs(run.plan.agent_timeout_s);
    let mut agent_up_at: Option<Instant> = None;
    let mut asked_at: Option<Instant> = None;
    loop {
        if let Some((clean, detail)) = launched
            .guest
            .wait_end(Duration::ZERO)
            .map_err(|e| SupervisorError::io("waiting for the guest", e))?
        {
            stop_services(&mut ports);
            return Ok(Ended {
                requested: asked_at.is_some(),
                clean,
                detail,
            });
        }
        if agent_up_at.is_none() && ready.is_up(Service::Agent) {
            agent_up_at = Some(Instant::now());
        }
        if asked_at.is_none() {
            let late = match agent_up_at {
                None if Instant::now() > agent_deadline => {
                    Some(("the guest agent", run.plan.agent_timeout_s))
                }
                Some(up)
                    if !ready.is_ready()
                        && up.elapsed() > Duration::from_secs(run.plan.services_timeout_s) =>
                {
                    Some(("the sandbox's services", run.plan.services_timeout_s))
                }
                _ => None,
            };
            if let Some((what, secs)) = late {
                stop_services(&mut ports);
                let how = launched
                    .guest
                    .force_stop()
                    .unwrap_or_else(|e| e.to_string());
                log::warn!("{what} did not come up within {secs} s: {how}");
                return Err(SupervisorError::Timeout {
                    what,
                    secs,
                    log: layout.console_log.display().to_string(),
                });
            }
        }
        match run.stops.recv_timeout(TICK) {
            Ok(_) if asked_at.is_none() => {
                log::info!("stop requested: asking the guest to shut down");
                if let Err(e) = run.state.stopping() {
                    log::warn!("cannot record the stopping state: {e}");
                }
                stop_services(&mut ports);
                asked_at = Some(Instant::now());
                ask_shutdown(&layout.vsock);
            }
            Ok(_) | Err(RecvTimeoutError::Timeout) => {}
            // The signal thread is gone: no stop can be asked for again.
            Err(RecvTimeoutError::Disconnected) => std::thread::sleep(TICK),
        }
        if asked_at.is_some_and(|t| t.elapsed() > SHUTDOWN_GRACE) {
            log::warn!("the guest did not shut down in time: stopping it");
            let how = launched
                .guest
                .force_stop()
                .map_err(|e| SupervisorError::io("stopping the guest", e))?;
            return Ok(Ended {
                requested: true,
                clean: false,
                detail: format!("stopped after {SHUTDOWN_GRACE:?} ({how})"),
            });
        }
    }
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Result<(), SupervisorError> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map(drop)
        .map_err(|e| SupervisorError::io(format!("cannot start the {name} thread"), e))
}

/// Asks the agent to power off, from a thread (a wedged guest must not
/// block the supervisor).
fn ask_shutdown(vsock: &Path) {
    let uds: PathBuf = vsock.to_path_buf();
    std::thread::spawn(move || {
        let client = guest::quick_client(&uds, Duration::from_secs(5));
        match client.shutdown(false) {
            Ok(()) => log::info!("guest agent acknowledged the shutdown"),
            Err(e) => log::warn!("shutdown request failed: {e}"),
        }
    });
}

/// Pings the guest agent until it answers, then reports it up, with the
/// guest's boot milestones as phases. Each try that a booting guest
/// answers with a reset costs it kernel time (dear where KVM emulates the
/// kernel and the boot takes a minute): after a few seconds, one try a
/// second.
fn probe_agent(vsock: &Path, ready: &Readiness, stop: &AtomicBool, launched_at: Instant) {
    let t0 = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        if vsock.exists() {
            if let Ok((_, boot)) = guest::quick_client(vsock, Duration::from_secs(3)).pong() {
                let answered = Instant::now();
                if let Some(b) = boot {
                    report_boot(ready, launched_at, answered, &b);
                }
                ready.up(Service::Agent);
                return;
            }
        }
        std::thread::sleep(if t0.elapsed() < Duration::from_secs(5) {
            Duration::from_millis(50)
        } else {
            Duration::from_secs(1)
        });
    }
}

/// The guest's milestones as phases of the start: from the engine's
/// start to the guest kernel's (the answer's uptime places it on our
/// clock), then the kernel to `/init`, `/init` to the sandbox's root, the
/// root to the agent's listening, and the listening to our first answer.
fn report_boot(
    ready: &Readiness,
    launched_at: Instant,
    answered: Instant,
    b: &keystone_guest_agent::protocol::BootTimes,
) {
    let ms = Duration::from_millis;
    let kernel_at = answered.checked_sub(ms(b.now_ms));
    if let Some(at) = kernel_at {
        ready.phase(
            "guest: engine to kernel start",
            at.saturating_duration_since(launched_at),
        );
    }
    ready.phase("guest: kernel to /init", ms(b.init_ms));
    ready.phase(
        "guest: /init to the sandbox's root",
        ms(b.root_ms.saturating_sub(b.init_ms)),
    );
    ready.phase(
        "guest: root to agent listening",
        ms(b.listening_ms.saturating_sub(b.root_ms)),
    );
    ready.phase(
        "guest: agent listening to the host's answer",
        ms(b.now_ms.saturating_sub(b.listening_ms)),
    );
}
