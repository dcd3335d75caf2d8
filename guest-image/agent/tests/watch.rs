//! `Watch` (protocol 1.1) end to end without a VM: the agent served on a
//! Unix socket in a thread watches a temporary git repository, and the
//! client reads the events: a commit moves a branch ref, a burst of file
//! changes ends in one `Idle`, an agent older than 1.1 is refused clearly.

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use keystone_guest_agent::agent::{self, AgentConfig};
use keystone_guest_agent::client::{unix_connector, AgentClient, ClientError, WatchCloser};
use keystone_guest_agent::protocol::{
    expect_frame, read_frame, write_frame, Frame, FrameKind, Hello, Request,
};
use keystone_guest_agent::transport::AgentListener;
use keystone_guest_agent::WatchEvent;
use keystone_test_kit::ScratchDir;

struct Harness {
    client: AgentClient,
    /// The agent's folder, removed with the harness.
    _dir: ScratchDir,
    workspace: PathBuf,
}

fn scratch_dir() -> ScratchDir {
    ScratchDir::new("watch")
}

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(["-c", "user.name=t", "-c", "user.email=t@t"])
        .args(args)
        .current_dir(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// An agent whose workspace is a one-commit git repository on `main`.
fn start_agent() -> Harness {
    let dir = scratch_dir();
    let workspace = dir.join("workspace");
    std::fs::create_dir_all(workspace.join("src/deep")).unwrap();
    std::fs::write(workspace.join("README"), "hi\n").unwrap();
    git(&workspace, &["init", "-q", "-b", "main"]);
    git(&workspace, &["add", "README"]);
    git(&workspace, &["commit", "-qm", "init"]);
    let socket = dir.join("agent.sock");
    let listener = AgentListener::unix(&socket).unwrap();
    let cfg = AgentConfig {
        workspace_root: workspace.clone(),
        ..AgentConfig::default()
    };
    std::thread::spawn(move || agent::serve(&listener, cfg));
    Harness {
        client: AgentClient::new(unix_connector(&socket)),
        _dir: dir,
        workspace,
    }
}

/// Starts a watch and forwards its events to a channel.
fn watch(h: &Harness, idle_ms: u64) -> (Receiver<WatchEvent>, WatchCloser) {
    let events = h.client.watch(&[], idle_ms).unwrap();
    assert!(events.directories() >= 3, "{}", events.directories());
    let closer = events.closer();
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for ev in events {
            if tx.send(ev.unwrap()).is_err() {
                return;
            }
        }
    });
    (rx, closer)
}

/// Waits up to 10 s for the event saying `branch` is at `head` (a new
/// branch reports its first tip too, so earlier events are skipped).
fn expect_commit(rx: &Receiver<WatchEvent>, branch: &str, head: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(WatchEvent::Commit { branch: b, head: h }) if b == branch && h == head => return,
            Ok(ev) => seen.push(ev),
            Err(e) => panic!("no commit event for {branch} at {head} ({e:?}); saw {seen:?}"),
        }
    }
}

#[test]
fn a_commit_moves_a_branch_and_is_reported() {
    let h = start_agent();
    let (rx, closer) = watch(&h, 0);

    std::fs::write(h.workspace.join("src/deep/a.rs"), "fn a() {}\n").unwrap();
    git(&h.workspace, &["add", "."]);
    git(&h.workspace, &["commit", "-qm", "second"]);
    let head = git(&h.workspace, &["rev-parse", "HEAD"]);
    expect_commit(&rx, "main", &head);

    // A branch with a slash: its folder under refs/heads is new.
    git(&h.workspace, &["checkout", "-qb", "feat/x"]);
    std::fs::write(h.workspace.join("b"), "b\n").unwrap();
    git(&h.workspace, &["add", "b"]);
    git(&h.workspace, &["commit", "-qm", "third"]);
    let head = git(&h.workspace, &["rev-parse", "HEAD"]);
    expect_commit(&rx, "feat/x", &head);

    // A directory made after the watch started is watched too: a
    // worktree's commit moves a ref in the main repository.
    git(
        &h.workspace,
        &["worktree", "add", "-q", ".worktrees/w", "-b", "w"],
    );
    let wt = h.workspace.join(".worktrees/w");
    std::fs::write(wt.join("c"), "c\n").unwrap();
    git(&wt, &["add", "c"]);
    git(&wt, &["commit", "-qm", "in worktree"]);
    let head = git(&wt, &["rev-parse", "HEAD"]);
    expect_commit(&rx, "w", &head);

    // Idle is off with idle_ms 0; closing ends the event stream.
    closer.close();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(WatchEvent::Idle) => panic!("idle event with idle_ms 0"),
            Ok(_) => {}
            Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => panic!("the watch did not end on close"),
        }
    }
}

#[test]
fn idle_follows_a_burst_of_changes_once() {
    let h = start_agent();
    let (rx, _closer) = watch(&h, 300);
    // Nothing changed yet: no idle event.
    assert!(matches!(
        rx.recv_timeout(Duration::from_millis(600)),
        Err(RecvTimeoutError::Timeout)
    ));
    let t = Instant::now();
    let mut last_write = Instant::now();
    for i in 0..5 {
        std::thread::sleep(Duration::from_millis(50));
        std::fs::write(h.workspace.join(format!("src/f{i}")), "x").unwrap();
        last_write = Instant::now();
    }
    match rx.recv_timeout(Duration::from_secs(5)) {
        Ok(WatchEvent::Idle) => {}
        other => panic!("expected idle, got {other:?}"),
    }
    assert!(
        last_write.elapsed() >= Duration::from_millis(290),
        "idle came {:?} after the last write (burst began {:?} ago)",
        last_write.elapsed(),
        t.elapsed()
    );
    // Once per burst.
    assert!(matches!(
        rx.recv_timeout(Duration::from_millis(800)),
        Err(RecvTimeoutError::Timeout)
    ));
    // A new directory's file counts as a change too.
    std::fs::create_dir(h.workspace.join("new")).unwrap();
    std::fs::write(h.workspace.join("new/f"), "y").unwrap();
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(5)).unwrap(),
        WatchEvent::Idle
    );
}

#[test]
fn watching_a_missing_directory_is_refused() {
    let h = start_agent();
    let err = h
        .client
        .watch(&["no/such/dir".to_string()], 0)
        .err()
        .expect("watch of a missing directory");
    assert!(matches!(err, ClientError::Agent(_)), "{err}");
    assert!(err.to_string().contains("not a directory"), "{err}");
}

/// An agent of protocol 1.0: says hello with minor 0, and would answer an
/// unknown request with an error frame (as the real 1.0 agent does).
fn old_agent(dir: &Path) -> PathBuf {
    let socket = dir.join("old.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { return };
            let _ = expect_frame(&mut s);
            let hello = Hello {
                minor: 0,
                agent_version: "0.0.9".into(),
                ..Hello::current()
            };
            let _ = write_frame(&mut s, &Frame::json(FrameKind::Hello, &hello));
            if let Ok(Some(_)) = read_frame(&mut s) {
                let _ = write_frame(
                    &mut s,
                    &Frame::new(FrameKind::Error, b"unknown variant `watch`".to_vec()),
                );
            }
        }
    });
    socket
}

#[test]
fn an_old_agent_is_reported_clearly() {
    let dir = scratch_dir();
    let client = AgentClient::new(unix_connector(old_agent(dir.path())));
    let err = client.watch(&[], 0).err().expect("old agent");
    assert!(matches!(err, ClientError::Unsupported { .. }), "{err}");
    assert_eq!(
        err.to_string(),
        "the guest agent (version 0.0.9, protocol 1.0) does not support watch, which needs \
         protocol 1.1: rebuild the guest image or update keystone"
    );
    // The request itself is plain JSON a 1.0 agent fails to parse.
    let wire = serde_json::to_string(&Request::Watch {
        paths: vec![],
        idle_ms: 1,
    })
    .unwrap();
    assert!(wire.contains(r#""op":"watch""#), "{wire}");
}
