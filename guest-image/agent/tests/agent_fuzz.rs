//! A bounded-time robustness run of the guest agent's connection handler
//! ([`agent::handle_connection`]) against broken host frames: hellos with
//! odd versions, every request (with edge values), the stream phase of
//! `Exec` (stdin, end of input, resizes and signals of any size and
//! number, frames that do not belong there), raw bytes behind a
//! `TcpConnect`, all encoded with the real encoder and then broken at the
//! frame level, on a stream that ends. For each conversation:
//!
//! - the handler returns and the connection ends (no hang), without a panic;
//! - everything the agent sends is a well-formed frame of a kind the guest
//!   may send, with a payload that decodes;
//! - nothing outside the workspace changes.
//!
//! Requests that would run or reach something other than this test's own
//! (a program other than `cat` or `true`, a TCP port other than the test's
//! echo server, a watch outside the workspace) are decoded but not served.

mod frame_script;
#[path = "../../../vsock-lite/tests/fuzz_support/mod.rs"]
mod fuzz_support;

use std::io::{ErrorKind, Write};
use std::net::{Shutdown, TcpListener};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use frame_script::Script;
use fuzz_support::{Budget, Rng};
use keystone_guest_agent::agent::{self, AgentConfig};
use keystone_guest_agent::protocol::{
    read_frame, EgressAsk, ExecRequest, ExitStatus, Frame, FrameKind, Hello, ProtocolError,
    PushFileRequest, RawStreamRequest, Request, Response, TtySize, UserSpec, WatchEvent,
};
use keystone_test_kit::ScratchDir;

/// Programs the agent may run for this test.
const SAFE_PROGRAMS: &[&[&str]] = &[&["cat"], &["true"], &["/nonexistent/program"]];

fn edge_i32(rng: &mut Rng) -> i32 {
    rng.pick(&[0, 1, 9, 15, 19, 28, -1, 64, 65, 9999, i32::MAX, i32::MIN])
}

/// The test's TCP ports on 127.0.0.1: an echo server, and one that
/// nothing listens on.
#[derive(Clone, Copy)]
struct Ports {
    echo: u16,
    closed: u16,
}

impl Ports {
    fn start() -> Self {
        let closed = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let echo = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut &conn, &mut &conn);
                    let _ = conn.shutdown(Shutdown::Write);
                });
            }
        });
        Self { echo, closed }
    }
}

/// A request of each kind, with edge values.
fn request(rng: &mut Rng, ports: Ports) -> Request {
    let argv: Vec<String> = rng
        .pick(SAFE_PROGRAMS)
        .iter()
        .map(|s| s.to_string())
        .collect();
    let tty = rng.one_in(3).then(|| TtySize {
        rows: rng.pick(&[0, 24, u16::MAX]),
        cols: rng.pick(&[0, 80, u16::MAX]),
    });
    match rng.below(20) {
        0..=5 => Request::Exec(ExecRequest {
            env: vec![("A".into(), "b".into())],
            cwd: rng.one_in(4).then(|| "/nonexistent".into()),
            user: rng
                .one_in(4)
                .then(|| UserSpec::Uid(rng.pick(&[0, u32::MAX]))),
            tty,
            argv,
        }),
        6 | 7 => Request::RawStream(RawStreamRequest {
            argv,
            ..Default::default()
        }),
        8 => Request::Ping,
        9 => Request::ListeningPorts,
        10 | 11 => Request::PushFile(PushFileRequest {
            path: rng
                .pick(&["notes.txt", "sub/dir/file", "../escape", "/etc/x", ""])
                .into(),
            mode: rng.pick(&[0o600, 0o4777, u32::MAX]),
            bytes: vec![b'p'; rng.pick(&[0, 10, 70_000])],
        }),
        12 => Request::Shutdown {
            reboot: rng.one_in(2),
        },
        13 => Request::Watch {
            paths: vec![rng.pick(&["", "sub dir", "."]).into()],
            idle_ms: rng.pick(&[0, 1, u64::MAX]),
        },
        14 | 15 => Request::TcpConnect {
            port: if rng.one_in(4) {
                ports.closed
            } else {
                ports.echo
            },
        },
        16 => Request::Egress,
        _ => Request::EgressAttach {
            id: rng.pick(&[0, u64::MAX]),
            refused: rng.one_in(2).then(|| "no".into()),
        },
    }
}

/// What a broken host sends: hello, request, then the stream phase.
fn host_script(rng: &mut Rng, ports: Ports) -> Script {
    let mut s = Script::new();
    s.json(
        FrameKind::Hello,
        &Hello {
            protocol: if rng.one_in(12) {
                rng.pick(&[0, 2, u32::MAX])
            } else {
                1
            },
            minor: rng.pick(&[0, 3, u32::MAX]),
            ..Hello::current()
        },
    );
    let req = request(rng, ports);
    let tcp = matches!(req, Request::TcpConnect { .. });
    s.json(FrameKind::Request, &req);
    for _ in 0..rng.below(8) {
        match rng.below(8) {
            _ if tcp => s.raw(vec![b't'; rng.pick(&[1, 100, 70_000])]),
            0 | 1 => s.data(
                FrameKind::Stdin,
                vec![b'i'; rng.pick(&[0, 1, 4096, 70_000])],
            ),
            2 => s.data(FrameKind::StdinEof, Vec::new()),
            3 => s.frame(&Frame::resize(TtySize {
                rows: rng.pick(&[0, 1, u16::MAX]),
                cols: rng.pick(&[0, 1, u16::MAX]),
            })),
            4 => s.data(FrameKind::Resize, vec![1; rng.pick(&[0, 3, 5])]),
            5 => s.frame(&Frame::signal(edge_i32(rng))),
            6 => s.data(FrameKind::Signal, vec![1; rng.pick(&[0, 3, 8])]),
            _ => s.json(FrameKind::Request, &Request::Ping),
        };
    }
    s.mutate(rng);
    s
}

/// Whether the agent may serve what `bytes` asks, decoded as it would.
fn safe_to_serve(bytes: &[u8], ports: Ports) -> bool {
    let mut r = bytes;
    let Ok(Some(hello)) = read_frame(&mut r) else {
        return true;
    };
    let ok_hello = hello.kind == FrameKind::Hello
        && hello
            .parse_json::<Hello>()
            .is_ok_and(|h| h.check_host().is_ok());
    if !ok_hello {
        return true;
    }
    let request = match read_frame(&mut r) {
        Ok(Some(f)) if f.kind == FrameKind::Request => f.parse_json::<Request>(),
        _ => return true,
    };
    let safe_argv = |argv: &[String]| SAFE_PROGRAMS.iter().any(|p| p == &argv);
    match request {
        Ok(Request::Exec(e)) => safe_argv(&e.argv),
        Ok(Request::RawStream(r)) => safe_argv(&r.argv),
        Ok(Request::TcpConnect { port }) => port == ports.echo || port == ports.closed,
        Ok(Request::Watch { paths, .. }) => paths.iter().all(|p| {
            let p = Path::new(p);
            p.is_relative() && !p.components().any(|c| c.as_os_str() == "..")
        }),
        _ => true,
    }
}

/// Reads everything the agent sends until it closes; every frame must be
/// one a guest may send, with a payload that decodes. Returns the frames.
fn check_replies(mut host: &UnixStream) -> usize {
    let mut frames = 0;
    loop {
        let frame = match read_frame(&mut host) {
            Ok(Some(f)) => f,
            Ok(None) => return frames,
            // Closed with our bytes unread: a reset, after all it sent.
            Err(ProtocolError::Io(e)) if e.kind() == ErrorKind::ConnectionReset => return frames,
            Err(e) => panic!("the agent sent a broken frame or hung: {e}"),
        };
        frames += 1;
        let decoded = match frame.kind {
            FrameKind::Hello => frame.parse_json::<Hello>().map(drop),
            FrameKind::Response => match frame.parse_json::<Response>() {
                // Raw relay bytes follow: read them to the end.
                Ok(Response::Connected { .. }) => {
                    std::io::copy(&mut host, &mut std::io::sink()).unwrap();
                    return frames;
                }
                other => other.map(drop),
            },
            FrameKind::Exit => frame.parse_json::<ExitStatus>().map(drop),
            FrameKind::Event => frame.parse_json::<WatchEvent>().map(drop),
            FrameKind::EgressAsk => frame.parse_json::<EgressAsk>().map(drop),
            FrameKind::Error | FrameKind::Stdout | FrameKind::Stderr => Ok(()),
            other => panic!("the agent sent a {other:?} frame"),
        };
        if let Err(e) = decoded {
            panic!("the agent sent {:?} that does not decode: {e}", frame.kind);
        }
    }
}

/// The names in `dir` and the bytes of each plain file.
fn listing(dir: &Path) -> Vec<(PathBuf, Option<Vec<u8>>)> {
    let mut all: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let path = e.unwrap().path();
            let bytes = path.is_file().then(|| std::fs::read(&path).unwrap());
            (path, bytes)
        })
        .collect();
    all.sort();
    all
}

#[test]
fn agent_reading_broken_host_frames_never_breaks() {
    let budget = Budget::from_env("agent_fuzz", 0x6e57_a6e7, 1_500, Duration::from_secs(25));
    let mut rng = Rng::new(budget.seed);
    let dir = ScratchDir::new("agent-fuzz");
    let workspace = dir.join("workspace");
    std::fs::create_dir_all(workspace.join("sub dir")).unwrap();
    std::fs::write(dir.join("outside.txt"), b"not the guest's").unwrap();
    let before = listing(dir.path());
    let shutdowns = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&shutdowns);
    let config = Arc::new(AgentConfig {
        workspace_root: workspace.clone(),
        shutdown: Some(Arc::new(move |_reboot| {
            counter.fetch_add(1, Ordering::SeqCst);
        })),
        ..AgentConfig::default()
    });
    let ports = Ports::start();
    let (mut done, mut served, mut replies) = (0u64, 0usize, 0usize);
    while budget.more(done) {
        done += 1;
        let bytes = host_script(&mut rng, ports).bytes();
        if !safe_to_serve(&bytes, ports) {
            continue;
        }
        served += 1;
        let (host, guest) = UnixStream::pair().unwrap();
        host.set_read_timeout(Some(Duration::from_secs(15)))
            .unwrap();
        let (tx, rx) = mpsc::channel();
        let config = Arc::clone(&config);
        std::thread::spawn(move || {
            let _ = agent::handle_connection(Box::new(guest), &config);
            let _ = tx.send(());
        });
        let writer = host.try_clone().unwrap();
        let sender = std::thread::spawn(move || {
            let _ = (&writer).write_all(&bytes);
            let _ = writer.shutdown(Shutdown::Write);
        });
        replies += check_replies(&host);
        sender.join().unwrap();
        match rx.recv_timeout(Duration::from_secs(15)) {
            Ok(()) => {}
            Err(mpsc::RecvTimeoutError::Timeout) => panic!("iteration {done}: the agent hung"),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                panic!("iteration {done}: the agent panicked")
            }
        }
    }
    eprintln!(
        "agent_fuzz: {done} conversations ({served} served, {replies} frames back, {} shutdowns) in {:?}",
        shutdowns.load(Ordering::SeqCst),
        budget.elapsed()
    );
    assert!(served >= 100, "only {served} conversations served");
    let after = listing(dir.path());
    assert_eq!(before, after, "something outside the workspace changed");
}
