//! A bounded-time robustness run of the host-side client ([`AgentClient`])
//! against a hostile guest agent: every operation reads a conversation
//! built from the real encoders (hellos with odd versions, right and wrong
//! responses, output streams, exits with edge values, watch events, egress
//! asks, raw relay bytes), broken at the frame level (lengths past the cap,
//! unknown kinds, mangled JSON, control characters, frames dropped,
//! repeated or cut), from a stream that then ends. For each one:
//!
//! - the call returns (no hang, no endless iterator) and does not panic;
//! - no single allocation is larger than twice what the guest sent plus
//!   the client's fixed buffers: a claimed length allocates nothing before
//!   its bytes arrive (this binary counts allocations, so it holds only
//!   this test);
//! - no error the user could see carries a control character from the
//!   guest (security invariant 5: nothing from the guest is printed raw).

mod frame_script;
#[path = "../../../vsock-lite/tests/fuzz_support/mod.rs"]
mod fuzz_support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::fmt::Display;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Mutex};
use std::time::Duration;

use frame_script::{Script, NASTY_TEXT};
use fuzz_support::{Budget, Rng};
use keystone_guest_agent::client::AgentClient;
use keystone_guest_agent::protocol::{
    EgressAsk, ExitStatus, FrameKind, Hello, ListeningPort, RawStreamRequest, Response, WatchEvent,
    PROTOCOL_MINOR, PROTOCOL_VERSION, STREAM_CHUNK,
};
use keystone_guest_agent::transport::DuplexStream;

/// The largest single allocation since it was last reset.
static LARGEST: AtomicUsize = AtomicUsize::new(0);

/// The system allocator, noting the largest request.
struct Measured;

// SAFETY: every call is forwarded unchanged to the system allocator.
unsafe impl GlobalAlloc for Measured {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract for `alloc` is passed on as is.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        // SAFETY: `ptr` came from this allocator, which is the system's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator, which is the system's.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Measured = Measured;

/// The client's own buffers (its 256 KiB reader, a stdin chunk) and slack.
const FIXED_BUFFERS: usize = (256 << 10) + STREAM_CHUNK + (64 << 10);

#[derive(Clone, Copy, Debug)]
enum Op {
    Ping,
    Ports,
    PushFile,
    Shutdown,
    Exec,
    Raw,
    Watch,
    Tcp,
    Egress,
    Attach,
    Refuse,
}

const OPS: [Op; 11] = [
    Op::Ping,
    Op::Ports,
    Op::PushFile,
    Op::Shutdown,
    Op::Exec,
    Op::Raw,
    Op::Watch,
    Op::Tcp,
    Op::Egress,
    Op::Attach,
    Op::Refuse,
];

fn text(rng: &mut Rng) -> String {
    match rng.below(5) {
        0 => rng.pick(NASTY_TEXT).to_string(),
        1 => String::new(),
        2 => "v".repeat(5000),
        _ => "0.1.0".to_string(),
    }
}

/// The response `op` expects, three times in four; another one otherwise.
fn answer(rng: &mut Rng, op: Op) -> Response {
    let ports = (0..rng.below(4))
        .map(|i| ListeningPort {
            port: rng.pick(&[0, 22, 8080, u16::MAX]),
            address: if i % 2 == 0 { "127.0.0.1" } else { "::" }.parse().unwrap(),
        })
        .collect();
    let all = [
        Response::Pong {
            agent_version: text(rng),
            boot: Some(keystone_guest_agent::protocol::BootTimes {
                init_ms: rng.next() >> 1,
                root_ms: rng.next() >> 1,
                listening_ms: rng.next() >> 1,
                now_ms: rng.next() >> 1,
                wall_ms: rng.next() >> 1,
            }),
        },
        Response::ListeningPorts { ports },
        Response::Done,
        Response::Started {
            pid: rng.pick(&[1, 0, -1, i32::MAX, i32::MIN]),
        },
        Response::Watching {
            directories: rng.pick(&[0, 3, u64::MAX]),
        },
        Response::Connected {
            address: rng
                .pick(&["127.0.0.1:80", "[::1]:65535", "10.0.0.1:0"])
                .parse()
                .unwrap(),
        },
    ];
    let right = match op {
        Op::Ping => 0,
        Op::Ports => 1,
        Op::Exec | Op::Raw => 3,
        Op::Watch => 4,
        Op::Tcp => 5,
        _ => 2,
    };
    let pick = if rng.one_in(4) {
        rng.below(all.len())
    } else {
        right
    };
    all[pick].clone()
}

fn edge_i32(rng: &mut Rng) -> Option<i32> {
    rng.pick(&[
        None,
        Some(0),
        Some(1),
        Some(-1),
        Some(9),
        Some(i32::MAX),
        Some(i32::MIN),
    ])
}

/// What a hostile guest answers to `op`.
fn guest_script(rng: &mut Rng, op: Op) -> Script {
    let mut s = Script::new();
    match rng.below(12) {
        0 => s.data(FrameKind::Error, text(rng).into_bytes()),
        1 => s.json(
            FrameKind::Hello,
            &Hello {
                protocol: rng.pick(&[0, 2, u32::MAX]),
                ..Hello::current()
            },
        ),
        _ => s.json(
            FrameKind::Hello,
            &Hello {
                protocol: PROTOCOL_VERSION,
                minor: rng.pick(&[PROTOCOL_MINOR, PROTOCOL_MINOR, 0, 1, 2, u32::MAX]),
                agent_version: text(rng),
            },
        ),
    };
    if rng.one_in(8) {
        s.data(FrameKind::Error, text(rng).into_bytes());
    } else {
        s.json(FrameKind::Response, &answer(rng, op));
    }
    for _ in 0..rng.below(6) {
        match op {
            Op::Exec | Op::Raw => {
                let kind = rng.pick(&[FrameKind::Stdout, FrameKind::Stdout, FrameKind::Stderr]);
                let len = rng.pick(&[0, 1, 100, STREAM_CHUNK, 300_000]);
                s.data(kind, vec![b'o'; len])
            }
            Op::Watch => match rng.below(3) {
                0 => s.json(FrameKind::Event, &WatchEvent::Idle),
                _ => s.json(
                    FrameKind::Event,
                    &WatchEvent::Commit {
                        branch: text(rng),
                        head: "0123456789abcdef0123456789abcdef01234567".into(),
                    },
                ),
            },
            Op::Egress => s.json(
                FrameKind::EgressAsk,
                &EgressAsk {
                    id: rng.pick(&[0, 1, u64::MAX]),
                    host: text(rng),
                    port: rng.pick(&[0, 443, u16::MAX]),
                },
            ),
            Op::Tcp | Op::Attach => s.raw(vec![b'r'; rng.pick(&[1, 100, 70_000])]),
            _ => s.data(FrameKind::Stdout, b"unasked".to_vec()),
        };
    }
    if matches!(op, Op::Exec | Op::Raw) && !rng.one_in(5) {
        let status = ExitStatus {
            code: edge_i32(rng),
            signal: edge_i32(rng),
        };
        s.json(FrameKind::Exit, &status);
    }
    s.mutate(rng);
    s
}

/// Drains an iterator of guest items, noting its errors; it must end
/// within the frames the guest sent.
fn drain<T>(items: impl Iterator<Item = io::Result<T>>, frames: usize, seen: &mut Vec<String>) {
    for (n, item) in items.enumerate() {
        assert!(n <= frames, "more items than the guest sent frames");
        if let Err(e) = item {
            seen.push(e.to_string());
        }
    }
}

/// Runs `op` as the CLI would; returns every error text it produced.
fn run_op(client: &AgentClient, op: Op, frames: usize) -> Vec<String> {
    let mut seen = Vec::new();
    let mut note = |e: &dyn Display| seen.push(e.to_string());
    let read_all = |r: &mut dyn Read, note: &mut dyn FnMut(&dyn Display)| {
        if let Err(e) = io::copy(r, &mut io::sink()) {
            note(&e);
        }
    };
    let raw_request = RawStreamRequest {
        argv: vec!["git-upload-pack".into()],
        ..Default::default()
    };
    match op {
        Op::Ping => client.ping().map(drop),
        Op::Ports => client.listening_ports().map(drop),
        Op::PushFile => client.push_file(".env", 0o600, b"A=1\n"),
        Op::Shutdown => client.shutdown(false),
        Op::Exec => client.exec_output(&["true"]).map(|out| {
            // What the CLI turns into its exit code.
            let _ = (out.status.code_or_signal(), out.status.success());
        }),
        Op::Raw => client.raw_stream(raw_request).map(|mut raw| {
            read_all(&mut raw, &mut note);
            match raw.wait() {
                Ok(exit) => drop(exit.status.code_or_signal()),
                Err(e) => note(&e),
            }
        }),
        Op::Watch => client.watch(&[], 0).map(|w| {
            let mut texts = Vec::new();
            drain(w, frames, &mut texts);
            texts.iter().for_each(|t| note(t));
        }),
        Op::Egress => client.egress().map(|asks| {
            let mut texts = Vec::new();
            drain(asks, frames, &mut texts);
            texts.iter().for_each(|t| note(t));
        }),
        Op::Tcp => client
            .tcp_connect(8080)
            .map(|mut t| read_all(&mut t, &mut note)),
        Op::Attach => client.egress_attach(7, None).map(|t| {
            if let Some(mut t) = t {
                read_all(&mut t, &mut note);
            }
        }),
        Op::Refuse => client.egress_attach(7, Some("policy".into())).map(drop),
    }
    .unwrap_or_else(|e| note(&e));
    seen
}

/// A client whose one connection is `stream`.
fn client_on(stream: UnixStream) -> AgentClient {
    let slot = Mutex::new(Some(stream));
    AgentClient::new(Box::new(move || {
        let stream = slot.lock().unwrap().take();
        let stream = stream.ok_or_else(|| io::Error::from(io::ErrorKind::ConnectionRefused))?;
        Ok(Box::new(stream) as Box<dyn DuplexStream>)
    }))
}

#[test]
fn client_reading_hostile_guest_frames_never_breaks() {
    let budget = Budget::from_env("frames_fuzz", 0xa9e7_f4a3, 20_000, Duration::from_secs(20));
    let mut rng = Rng::new(budget.seed);
    let mut done = 0u64;
    let mut errors = 0usize;
    while budget.more(done) {
        let op = rng.pick(&OPS);
        let script = guest_script(&mut rng, op);
        let bytes = script.bytes();
        let sent = bytes.len();
        let frames = script.frames();
        let (client_end, guest_end) = UnixStream::pair().unwrap();
        // The guest says its piece, ends its side, and takes what comes.
        let guest = std::thread::spawn(move || {
            let _ = guest_end.set_read_timeout(Some(Duration::from_secs(10)));
            let _ = (&guest_end).write_all(&bytes);
            let _ = guest_end.shutdown(std::net::Shutdown::Write);
            let _ = io::copy(&mut &guest_end, &mut io::sink());
        });
        let client = client_on(client_end);
        LARGEST.store(0, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(run_op(&client, op, frames));
        });
        let seen = match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(seen) => seen,
            Err(mpsc::RecvTimeoutError::Timeout) => panic!("iteration {done}: {op:?} hung"),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                panic!("iteration {done}: {op:?} panicked")
            }
        };
        guest.join().unwrap();
        let largest = LARGEST.load(Ordering::Relaxed);
        assert!(
            largest <= 2 * sent + FIXED_BUFFERS,
            "iteration {done}: {op:?} allocated {largest} bytes at once for {sent} bytes from the guest"
        );
        for text in &seen {
            assert!(
                !text.chars().any(char::is_control),
                "iteration {done}: {op:?} error shows the guest's control characters: {text:?}"
            );
        }
        errors += seen.len();
        done += 1;
    }
    eprintln!(
        "frames_fuzz: {done} conversations in {:?}, {errors} errors",
        budget.elapsed()
    );
    assert!(done >= 1000, "only {done} conversations");
}
