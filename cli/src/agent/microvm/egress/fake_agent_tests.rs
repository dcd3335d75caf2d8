//! The egress service against a fake guest agent on a Unix socket that
//! speaks the hybrid vsock handshake and the agent protocol: one that
//! floods asks and never answers the host's attach connections (the
//! supervisor's threads, memory and log must stay bounded, and stop must
//! be prompt), and one that answers (every ask still gets its answer,
//! and no refusal tells the guest an address a name resolved to).

use std::io::{BufRead, BufReader, Write};
use std::net::ToSocketAddrs;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keystone_guest_agent::protocol::{
    expect_frame, write_frame, EgressAsk, Frame, FrameKind, Hello, Request, Response,
};

use super::*;
use crate::agent::config::Settings;
use crate::agent::registry::SandboxStore;

/// How the fake agent treats the host's attach connections.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Attaches {
    /// Accepted and held: half get the handshake's `OK`, none more.
    Ignored,
    /// Answered as the real agent does.
    Answered,
}

/// A fake agent listening on `path`; ends (and lets go of every held
/// connection) on drop.
struct FakeAgent {
    path: PathBuf,
    done: Arc<AtomicBool>,
    /// Attach connections seen.
    attaches: Arc<AtomicUsize>,
    /// The refusals the host sent, as the guest read them.
    refusals: Arc<Mutex<Vec<String>>>,
    /// Every ask was written to the offer connection.
    flooded: Arc<AtomicBool>,
}

impl FakeAgent {
    fn start(dir: &Path, asks: Vec<(String, u16)>, attaches: Attaches) -> FakeAgent {
        let path = dir.join("vsock.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let agent = FakeAgent {
            path,
            done: Arc::new(AtomicBool::new(false)),
            attaches: Arc::new(AtomicUsize::new(0)),
            refusals: Arc::new(Mutex::new(Vec::new())),
            flooded: Arc::new(AtomicBool::new(false)),
        };
        let (done, seen, refusals, flooded) = (
            Arc::clone(&agent.done),
            Arc::clone(&agent.attaches),
            Arc::clone(&agent.refusals),
            Arc::clone(&agent.flooded),
        );
        let mut asks = Some(asks);
        std::thread::Builder::new()
            .name("fake-agent".into())
            .spawn(move || {
                let mut held = Vec::new();
                for conn in listener.incoming() {
                    if done.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(mut conn) = conn else { continue };
                    if let Some(asks) = asks.take() {
                        let flooded = Arc::clone(&flooded);
                        std::thread::Builder::new()
                            .name("fake-agent-offer".into())
                            .spawn(move || offer(conn, asks, &flooded))
                            .unwrap();
                        continue;
                    }
                    let n = seen.fetch_add(1, Ordering::SeqCst);
                    match attaches {
                        Attaches::Ignored => {
                            if n % 2 == 0 {
                                let _ = conn.write_all(b"OK 1\n");
                            }
                            held.push(conn);
                        }
                        Attaches::Answered => {
                            if let Some(reason) = answer_attach(conn) {
                                refusals.lock().unwrap().push(reason);
                            }
                        }
                    }
                }
            })
            .unwrap();
        agent
    }
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        self.done.store(true, Ordering::SeqCst);
        let _ = UnixStream::connect(&self.path);
    }
}

/// The agent's side of the handshake and hello; the request that follows.
fn greet(conn: &mut UnixStream) -> Option<Request> {
    let mut line = String::new();
    BufReader::new(&*conn).read_line(&mut line).ok()?;
    if !line.starts_with("CONNECT ") {
        return None;
    }
    conn.write_all(b"OK 1\n").ok()?;
    let hello = expect_frame(conn).ok()?;
    assert_eq!(hello.kind, FrameKind::Hello);
    write_frame(conn, &Frame::json(FrameKind::Hello, &Hello::current())).ok()?;
    expect_frame(conn).ok()?.parse_json::<Request>().ok()
}

/// The `Egress` offer: accepts it, writes every ask, then holds it open.
fn offer(mut conn: UnixStream, asks: Vec<(String, u16)>, flooded: &AtomicBool) {
    assert!(matches!(greet(&mut conn), Some(Request::Egress)));
    write_frame(
        &mut conn,
        &Frame::json(FrameKind::Response, &Response::Done),
    )
    .unwrap();
    for (id, (host, port)) in asks.into_iter().enumerate() {
        let ask = EgressAsk {
            id: id as u64,
            host,
            port,
        };
        if write_frame(&mut conn, &Frame::json(FrameKind::EgressAsk, &ask)).is_err() {
            break;
        }
    }
    flooded.store(true, Ordering::SeqCst);
    // Held until the host closes it.
    let _ = expect_frame(&mut conn);
}

/// Answers one `EgressAttach` as the agent does; returns its refusal.
fn answer_attach(mut conn: UnixStream) -> Option<String> {
    match greet(&mut conn)? {
        Request::EgressAttach { refused, .. } => {
            let _ = write_frame(
                &mut conn,
                &Frame::json(FrameKind::Response, &Response::Done),
            );
            refused
        }
        _ => None,
    }
}

fn status_kib_or_count(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// Threads of this process whose name starts with "egress".
fn egress_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm"))
                .map(|c| c.starts_with("egress"))
                .unwrap_or(false)
        })
        .count()
}

/// The service of a sandbox in `dir` (network nat), offering to `agent`
/// once it is up.
fn start_against(dir: &Path, agent: &FakeAgent) -> EgressService {
    let spec = SandboxSpec {
        name: "t".into(),
        project: dir.to_path_buf(),
        paths: SandboxStore::at(dir).paths("t"),
        settings: Settings::default(),
    };
    let ready = Arc::new(Readiness::new(None, &[Service::Agent, Service::Egress]));
    ready.up(Service::Agent);
    start(&spec, &agent.path, &ready).unwrap()
}

/// The tests count this process's threads: one runs at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn temp_dir(what: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ks-egress-{what}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn a_flood_of_unanswered_asks_keeps_the_supervisor_bounded() {
    const ASKS: usize = 5000;
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = temp_dir("flood");
    let targets = ["10.0.0.1", "127.0.0.1", "169.254.169.254", "not a host!"];
    let asks = (0..ASKS)
        .map(|i| (targets[i % targets.len()].to_string(), 80))
        .collect();
    let agent = FakeAgent::start(&dir, asks, Attaches::Ignored);
    let threads_before = status_kib_or_count("Threads:");
    let rss_before = status_kib_or_count("VmRSS:");

    crate::logging::capture::install();
    let lines_before = crate::logging::capture::count(pool::ASKS_TARGET);
    let service = start_against(&dir, &agent);
    let (mut threads, mut rss, mut ours) = (0, 0, 0);
    let t0 = Instant::now();
    let mut flooded_at = None;
    while flooded_at.is_none_or(|at: Instant| at.elapsed() < Duration::from_secs(2)) {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the flood never ended"
        );
        if flooded_at.is_none() && agent.flooded.load(Ordering::SeqCst) {
            flooded_at = Some(Instant::now());
        }
        threads = threads.max(status_kib_or_count("Threads:"));
        rss = rss.max(status_kib_or_count("VmRSS:"));
        ours = ours.max(egress_threads());
        std::thread::sleep(Duration::from_millis(20));
    }
    let lines = crate::logging::capture::count(pool::ASKS_TARGET) - lines_before;
    let stopping = Instant::now();
    service.stop();
    let stop_took = stopping.elapsed();
    let wound_down = Instant::now();
    while egress_threads() > 0 && wound_down.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let left = egress_threads();
    let attaches = agent.attaches.load(Ordering::SeqCst);
    drop(agent);
    let _ = std::fs::remove_dir_all(&dir);

    eprintln!(
        "{ASKS} asks: at most {threads} threads (from {threads_before}), {ours} of egress; \
         RSS at most {rss} KiB (from {rss_before}); {lines} log lines; stop took {stop_took:?}"
    );
    assert!(
        threads <= threads_before + 120,
        "{threads} threads during the flood, {threads_before} before"
    );
    assert!(
        ours <= pool::MAX_WORKERS + 1,
        "{ours} egress threads during the flood"
    );
    assert!(attaches > 0, "no ask was answered");
    assert!(
        rss <= rss_before + 64 * 1024,
        "RSS grew from {rss_before} KiB to {rss} KiB"
    );
    assert!(lines <= 40, "{lines} log lines for {ASKS} refused asks");
    assert!(
        stop_took < Duration::from_millis(500),
        "stop took {stop_took:?}"
    );
    assert_eq!(left, 0, "egress threads still running 5 s after stop");
}

#[test]
fn every_ask_is_answered_and_no_refusal_names_an_address() {
    // As many as wait at once (more are dropped).
    const ASKS: usize = pool::MAX_WORKERS + pool::MAX_QUEUED;
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = temp_dir("answered");
    let mut names: Vec<String> = vec!["localhost".into()];
    if let Ok(h) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        names.push(h.trim().to_string());
    }
    let addresses: Vec<String> = names
        .iter()
        .flat_map(|n| (n.as_str(), 80).to_socket_addrs().into_iter().flatten())
        .map(|a| a.ip().to_string())
        .collect();
    assert!(!addresses.is_empty());
    let asks = (0..ASKS)
        .map(|i| (names[i % names.len()].clone(), 80))
        .collect();
    let agent = FakeAgent::start(&dir, asks, Attaches::Answered);
    let service = start_against(&dir, &agent);
    let t0 = Instant::now();
    while agent.refusals.lock().unwrap().len() < ASKS && t0.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let took = t0.elapsed();
    service.stop();
    let refusals = agent.refusals.lock().unwrap().clone();
    eprintln!("{} of {ASKS} asks answered in {took:?}", refusals.len());
    drop(agent);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(refusals.len(), ASKS, "asks answered");
    for reason in &refusals {
        assert!(reason.contains("network policy"), "{reason}");
        for a in &addresses {
            assert!(!reason.contains(a.as_str()), "{reason:?} names {a}");
        }
    }
}
