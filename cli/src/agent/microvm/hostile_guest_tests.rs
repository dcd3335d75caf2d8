//! The backend against a hostile guest agent on a Unix socket (the hybrid
//! vsock handshake and the agent protocol): every program it runs prints
//! escape sequences (an OSC 52 clipboard write, a title, a screen clear,
//! a C1 CSI, a bidirectional override) and forged lines, on stdout and
//! stderr. What the backend hands the CLI to print (worktrees, errors
//! quoting the guest's stderr, live status) holds none of it raw.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;

use keystone_guest_agent::protocol::{
    expect_frame, write_frame, ExitStatus, Frame, FrameKind, Hello, ListeningPort, Request,
    Response,
};
use keystone_test_kit::ScratchDir;

use super::*;
use crate::agent::config::Settings;
use crate::agent::registry::SandboxStore;
use crate::shown::{terminal_safe, HOSTILE};

/// What a program run in the fake guest writes: (stdout, stderr, exit code).
type Program = dyn Fn(&[String]) -> (Vec<u8>, Vec<u8>, i32) + Send + Sync;

/// The fake agent serving `spec`'s vsock socket until the test ends.
fn serve(dir: &Path, program: Arc<Program>) -> SandboxSpec {
    let spec = SandboxSpec {
        name: "t".into(),
        project: dir.to_path_buf(),
        paths: SandboxStore::at(dir).paths("t"),
        settings: Settings::default(),
    };
    let path = MicroVmBackend::layout(&spec).vsock;
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let program = Arc::clone(&program);
            std::thread::spawn(move || answer(conn, &*program));
        }
    });
    spec
}

/// One connection: the handshake, the hello, then the request.
fn answer(conn: UnixStream, program: &Program) -> Option<()> {
    let mut reader = BufReader::new(conn.try_clone().ok()?);
    let mut w = conn;
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    w.write_all(b"OK 1\n").ok()?;
    expect_frame(&mut reader).ok()?;
    write_frame(&mut w, &Frame::json(FrameKind::Hello, &Hello::current())).ok()?;
    let request: Request = expect_frame(&mut reader).ok()?.parse_json().ok()?;
    let respond = |w: &mut UnixStream, r: &Response| {
        write_frame(w, &Frame::json(FrameKind::Response, r)).ok()
    };
    match request {
        Request::Exec(req) => {
            let (stdout, stderr, code) = program(&req.argv);
            respond(&mut w, &Response::Started { pid: 7 })?;
            write_frame(&mut w, &Frame::new(FrameKind::Stdout, stdout)).ok()?;
            write_frame(&mut w, &Frame::new(FrameKind::Stderr, stderr)).ok()?;
            let exit = ExitStatus {
                code: Some(code),
                signal: None,
            };
            write_frame(&mut w, &Frame::json(FrameKind::Exit, &exit)).ok()
        }
        Request::ListeningPorts => {
            let ports = vec![ListeningPort {
                port: 8080,
                address: std::net::Ipv4Addr::LOCALHOST.into(),
            }];
            respond(&mut w, &Response::ListeningPorts { ports })
        }
        Request::Ping => respond(
            &mut w,
            &Response::Pong {
                agent_version: HOSTILE.into(),
                boot: None,
            },
        ),
        _ => write_frame(&mut w, &Frame::new(FrameKind::Error, HOSTILE.into())).ok(),
    }
}

fn scratch(name: &str) -> ScratchDir {
    ScratchDir::new(&format!("hostile-{name}"))
}

/// `git worktree list --porcelain` as a hostile guest's git writes it,
/// and stderr with a clipboard write for every other command (which fails).
fn hostile_git(argv: &[String]) -> (Vec<u8>, Vec<u8>, i32) {
    if argv.iter().any(|a| a == "list") {
        let porcelain = format!(
            "worktree /workspace\nbranch refs/heads/main\n\n\
             worktree /workspace/.worktrees/{HOSTILE}\nbranch refs/heads/{HOSTILE}\n\n\
             worktree /workspace/.worktrees/b\u{1b}]52;c;eA==\u{7}\ndetached\n"
        );
        return (porcelain.into_bytes(), Vec::new(), 0);
    }
    (
        HOSTILE.as_bytes().to_vec(),
        format!("fatal: {HOSTILE}\n\u{1b}]52;c;ZXZpbA==\u{7}").into_bytes(),
        128,
    )
}

#[test]
fn worktrees_and_live_status_of_a_hostile_guest_hold_nothing_raw() {
    let dir = scratch("worktrees");
    let spec = serve(dir.path(), Arc::new(hostile_git));
    let list = MicroVmBackend.worktree(&spec, &WorktreeOp::List).unwrap();
    assert_eq!(list.len(), 2, "{list:?}");
    let status = MicroVmBackend.status(&spec).unwrap();
    assert_eq!(status.worktrees.len(), 2);
    for wt in list.iter().chain(&status.worktrees) {
        for text in [&wt.branch, &wt.path] {
            assert!(terminal_safe(text) && !text.contains('\n'), "{text:?}");
        }
    }
    assert!(list[0]
        .path
        .starts_with("/workspace/.worktrees/ok\\u{1b}]52;c;"));
}

#[test]
fn errors_quoting_the_guests_stderr_hold_nothing_raw() {
    let dir = scratch("errors");
    let spec = serve(dir.path(), Arc::new(hostile_git));
    let add = WorktreeOp::Add {
        branch: "feat".into(),
        create: true,
    };
    let err = MicroVmBackend
        .worktree(&spec, &add)
        .unwrap_err()
        .to_string();
    assert!(err.contains("fatal: ok\\u{1b}]52;c;"), "{err}");
    // As `keystone` prints it.
    let printed = crate::error_text(&anyhow::anyhow!(err));
    assert!(
        terminal_safe(&printed) && !printed.contains('\n'),
        "{printed:?}"
    );

    let layout = MicroVmBackend::layout(&spec);
    let clock = super::supervisor::setup::set_guest_clock(&layout, true)
        .unwrap_err()
        .to_string();
    assert!(terminal_safe(&clock) && !clock.contains('\n'), "{clock:?}");
    let certs = vec![("a.crt".to_string(), "PEM".to_string())];
    let ca = hostca::import(&guest::client(&layout.vsock), &certs)
        .unwrap_err()
        .to_string();
    assert!(terminal_safe(&ca) && !ca.contains('\n'), "{ca:?}");
}
