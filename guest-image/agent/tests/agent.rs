//! The agent served on a Unix socket in a thread, driven by the client:
//! the whole protocol without a VM.

use std::io::{BufRead, BufReader, Cursor, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use keystone_guest_agent::agent::{self, AgentConfig};
use keystone_guest_agent::client::{
    hybrid_vsock_connector, unix_connector, AgentClient, ClientError,
};
use keystone_guest_agent::protocol::{
    expect_frame, write_frame, ExecRequest, Frame, FrameKind, Hello, ProtocolError,
    RawStreamRequest, TtySize,
};
use keystone_guest_agent::transport::AgentListener;
use keystone_test_kit::{fnv64, ScratchDir};

struct Harness {
    client: AgentClient,
    dir: ScratchDir,
    workspace: PathBuf,
    socket: PathBuf,
}

fn scratch_dir() -> ScratchDir {
    ScratchDir::new("agent")
}

fn config(workspace: PathBuf) -> AgentConfig {
    AgentConfig {
        workspace_root: workspace,
        ..AgentConfig::default()
    }
}

fn start_agent() -> Harness {
    start_agent_with(|_| {})
}

fn start_agent_with(tweak: impl FnOnce(&mut AgentConfig)) -> Harness {
    let dir = scratch_dir();
    let workspace = dir.join("workspace");
    std::fs::create_dir_all(&workspace).unwrap();
    let socket = dir.join("agent.sock");
    let listener = AgentListener::unix(&socket).unwrap();
    let mut cfg = config(workspace.clone());
    tweak(&mut cfg);
    std::thread::spawn(move || agent::serve(&listener, cfg));
    Harness {
        client: AgentClient::new(unix_connector(&socket)),
        dir,
        workspace,
        socket,
    }
}

#[test]
fn ping_and_uname() {
    let h = start_agent();
    assert_eq!(h.client.ping().unwrap(), env!("CARGO_PKG_VERSION"));
    let out = h.client.exec_output(&["uname", "-r"]).unwrap();
    assert!(out.status.success());
    assert!(!String::from_utf8_lossy(&out.stdout).trim().is_empty());
}

#[test]
fn exit_code_stderr_env_and_cwd() {
    let h = start_agent();
    let out = h.client.exec_output(&["sh", "-c", "exit 7"]).unwrap();
    assert_eq!(out.status.code, Some(7));
    assert_eq!(out.status.code_or_signal(), 7);

    let out = h
        .client
        .exec_output(&["sh", "-c", "echo out; echo err >&2"])
        .unwrap();
    assert_eq!(out.stdout, b"out\n");
    assert_eq!(out.stderr, b"err\n");

    let req = ExecRequest {
        env: vec![("KEYSTONE_TEST".into(), "hello there".into())],
        cwd: Some(h.workspace.to_string_lossy().into_owned()),
        ..ExecRequest::new(&["sh", "-c", "echo \"$KEYSTONE_TEST\"; pwd; echo $HOME"])
    };
    let out = h.client.exec_request_output(req).unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "hello there");
    assert_eq!(lines[1], h.workspace.to_string_lossy());
    assert!(!lines[2].is_empty(), "HOME is set");
}

#[test]
fn missing_program_is_a_clear_error() {
    let h = start_agent();
    let err = h
        .client
        .exec_output(&["/definitely/not/a/program"])
        .unwrap_err();
    assert!(matches!(err, ClientError::Agent(_)), "{err}");
    assert!(err.to_string().contains("cannot run"), "{err}");
}

#[test]
fn fifty_mib_through_cat() {
    let h = start_agent();
    let mut data = vec![0u8; 50 << 20];
    let mut x: u32 = 0x1234_5678;
    for b in data.iter_mut() {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        *b = x as u8;
    }
    let expected = fnv64(&data);
    let start = Instant::now();
    let mut out = Vec::with_capacity(data.len());
    let mut err = Vec::new();
    let status = h
        .client
        .exec(
            ExecRequest::new(&["cat"]),
            Cursor::new(data),
            &mut out,
            &mut err,
        )
        .unwrap();
    let took = start.elapsed();
    assert!(status.success());
    assert_eq!(out.len(), 50 << 20);
    assert_eq!(fnv64(&out), expected);
    assert!(err.is_empty());
    eprintln!("50 MiB through cat: {took:?}");
}

#[test]
fn signal_reaches_the_process() {
    let h = start_agent();
    let session = h
        .client
        .start_exec(ExecRequest::new(&["sleep", "100"]))
        .unwrap();
    session.control().signal(libc::SIGTERM).unwrap();
    let status = session.wait(&mut Vec::new(), &mut Vec::new()).unwrap();
    assert_eq!(status.signal, Some(libc::SIGTERM));
    assert_eq!(status.code_or_signal(), 128 + libc::SIGTERM);
}

/// The command's exit is its answer, even with a background job still
/// running (and holding no pipe of ours open).
#[test]
fn background_job_does_not_hold_exit() {
    let h = start_agent();
    let out = h
        .client
        .exec_output(&["sh", "-c", "sleep 600 </dev/null >/dev/null 2>&1 & echo $!"])
        .unwrap();
    let pid: i32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    // SAFETY: signal 0 only checks that the process exists.
    let alive = unsafe { libc::kill(pid, 0) } == 0;
    // SAFETY: ends the test's own background job.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    assert!(alive, "exec returned while its background job ran on");
}

#[test]
fn pty_exec_and_resize() {
    let h = start_agent();
    let tty = |argv: &[&str], size| ExecRequest {
        tty: Some(size),
        ..ExecRequest::new(argv)
    };
    let out = h
        .client
        .exec_request_output(tty(&["tty"], TtySize { rows: 24, cols: 80 }))
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("/dev/pts/"), "{text:?}");

    let out = h
        .client
        .exec_request_output(tty(
            &["stty", "size"],
            TtySize {
                rows: 33,
                cols: 101,
            },
        ))
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "33 101");

    let session = h
        .client
        .start_exec(tty(
            &["sh", "-c", "read x; stty size"],
            TtySize { rows: 10, cols: 20 },
        ))
        .unwrap();
    let control = session.control();
    control
        .resize(TtySize {
            rows: 50,
            cols: 120,
        })
        .unwrap();
    control.send_stdin(b"go\n").unwrap();
    let mut out = Vec::new();
    let status = session.wait(&mut out, &mut Vec::new()).unwrap();
    assert!(status.success());
    let text = String::from_utf8_lossy(&out);
    assert!(text.contains("50 120"), "{text:?}");
}

#[test]
fn raw_stream_round_trip_and_git() {
    let h = start_agent();
    let raw = |argv: &[&str]| {
        h.client
            .raw_stream(RawStreamRequest {
                argv: argv.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            })
            .unwrap()
    };
    let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let (mut reader, mut writer) = raw(&["cat"]).into_split();
    let to_send = payload.clone();
    let feeder = std::thread::spawn(move || {
        writer.write_all(&to_send).unwrap();
        writer.close_stdin().unwrap();
    });
    let mut echoed = Vec::new();
    reader.read_to_end(&mut echoed).unwrap();
    feeder.join().unwrap();
    assert_eq!(echoed, payload);
    assert!(reader.wait().unwrap().status.success());

    let mut raw = raw(&["git", "--version"]);
    let mut version = String::new();
    raw.read_to_string(&mut version).unwrap();
    assert!(version.starts_with("git version"), "{version:?}");
    assert_eq!(raw.wait().unwrap().status.code, Some(0));
}

#[test]
fn listening_ports_sees_our_listener() {
    let h = start_agent();
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let ports = h.client.listening_ports().unwrap();
    assert!(
        ports
            .iter()
            .any(|p| p.port == port && p.address.is_loopback()),
        "{port} not in {ports:?}"
    );
}

#[test]
fn push_file_is_confined_to_the_workspace() {
    let h = start_agent();
    h.client.push_file(".env", 0o600, b"TOKEN=abc\n").unwrap();
    let written = h.workspace.join(".env");
    assert_eq!(std::fs::read(&written).unwrap(), b"TOKEN=abc\n");
    assert_eq!(
        std::fs::metadata(&written).unwrap().permissions().mode() & 0o777,
        0o600
    );
    h.client
        .push_file("/workspace/app/config/.env", 0o644, b"A=1")
        .unwrap();
    assert_eq!(
        std::fs::read(h.workspace.join("app/config/.env")).unwrap(),
        b"A=1"
    );
    for bad in ["../x", "/etc/passwd", "a/../../x"] {
        let err = h.client.push_file(bad, 0o644, b"nope").unwrap_err();
        assert!(err.to_string().contains("refusing"), "{bad}: {err}");
    }
    assert!(!h.dir.join("x").exists());
    // A symlink pointing out of the workspace is not followed.
    std::os::unix::fs::symlink(h.dir.path(), h.workspace.join("out")).unwrap();
    assert!(h.client.push_file("out/escaped", 0o644, b"no").is_err());
    assert!(!h.dir.join("escaped").exists());
}

#[test]
fn shutdown_is_refused_when_not_pid1() {
    let h = start_agent();
    let err = h.client.shutdown(false).unwrap_err();
    assert!(err.to_string().contains("PID 1"), "{err}");
}

#[test]
fn version_mismatch_is_reported_by_the_agent() {
    let h = start_agent();
    let mut s = UnixStream::connect(&h.socket).unwrap();
    let hello = Hello {
        protocol: 99,
        ..Hello::current()
    };
    write_frame(&mut s, &Frame::json(FrameKind::Hello, &hello)).unwrap();
    let theirs = expect_frame(&mut s).unwrap();
    assert_eq!(theirs.kind, FrameKind::Hello);
    let err = expect_frame(&mut s).unwrap();
    assert_eq!(err.kind, FrameKind::Error);
    assert_eq!(
        err.text(),
        "guest agent speaks protocol 1, this keystone speaks 99: rebuild the guest image or update keystone"
    );
}

/// A fake VMM vsock socket: answers the CONNECT line with `answer`, then
/// (when it is OK) serves the agent protocol on the same stream.
fn fake_hybrid_vsock(answer: &'static str) -> (ScratchDir, PathBuf) {
    let dir = scratch_dir();
    let path = dir.join("vsock.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let workspace = dir.path().to_path_buf();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            let mut line = String::new();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            reader.read_line(&mut line).unwrap();
            assert_eq!(line, "CONNECT 1024\n");
            let mut s = stream;
            s.write_all(answer.as_bytes()).unwrap();
            if answer.starts_with("OK") {
                let cfg = config(workspace.clone());
                let _ = agent::handle_connection(Box::new(s), &cfg);
            }
        }
    });
    (dir, path)
}

#[test]
fn hybrid_vsock_handshake() {
    let (dir, path) = fake_hybrid_vsock("OK 1073741824\n");
    let client = AgentClient::new(hybrid_vsock_connector(&path, 1024));
    assert!(client.ping().is_ok());
    drop(dir);

    let (_dir, path) = fake_hybrid_vsock("ERROR no listener\n");
    let client = AgentClient::new(hybrid_vsock_connector(&path, 1024));
    let err = client.ping().unwrap_err().to_string();
    assert!(err.contains("expected `OK <n>`"), "{err}");
}

/// Not a test on its own: when `KS_SHIM_SOCKET` is set, this process is
/// the `ext::` transport helper of [`git_fetch_through_raw_stream`]: it
/// runs `git upload-pack` in the "guest" over a RawStream and pipes its
/// own fd 0 / fd 3 to it (fd 1 is libtest's noise, sent to stderr).
#[test]
fn shim_entry() {
    use std::os::fd::FromRawFd;
    let (Ok(socket), Ok(repo)) = (
        std::env::var("KS_SHIM_SOCKET"),
        std::env::var("KS_SHIM_REPO"),
    ) else {
        return;
    };
    let client = AgentClient::new(unix_connector(socket));
    let env = std::env::var("GIT_PROTOCOL")
        .map(|p| vec![("GIT_PROTOCOL".to_string(), p)])
        .unwrap_or_default();
    let raw = client
        .raw_stream(RawStreamRequest {
            argv: vec!["git".into(), "upload-pack".into(), repo],
            env,
            ..Default::default()
        })
        .unwrap();
    let (mut reader, mut writer) = raw.into_split();
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin(), &mut writer);
        let _ = writer.close_stdin();
    });
    // SAFETY: fd 3 is the helper's real stdout, set up by the wrapper script.
    let mut out = unsafe { std::fs::File::from_raw_fd(3) };
    std::io::copy(&mut reader, &mut out).unwrap();
    let exit = reader.wait().unwrap();
    assert!(
        exit.status.success(),
        "{}",
        String::from_utf8_lossy(&exit.stderr)
    );
}

#[test]
fn git_fetch_through_raw_stream() {
    let h = start_agent();
    let git = |dir: &PathBuf, args: &[&str]| {
        let out = std::process::Command::new("git")
            .current_dir(dir)
            .args(args)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("HOME", h.dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let origin = h.dir.join("origin");
    std::fs::create_dir_all(&origin).unwrap();
    git(&origin, &["init", "-q", "-b", "main"]);
    std::fs::write(origin.join("README"), "hello from the guest\n").unwrap();
    git(&origin, &["add", "README"]);
    git(
        &origin,
        &[
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@e",
            "commit",
            "-q",
            "-m",
            "first",
        ],
    );
    let head = git(&origin, &["rev-parse", "HEAD"]);

    let shim = h.dir.join("shim.sh");
    std::fs::write(
        &shim,
        format!(
            "#!/bin/sh\nexec 3>&1 1>&2\nexec {} --exact shim_entry --nocapture --test-threads=1\n",
            std::env::current_exe().unwrap().display()
        ),
    )
    .unwrap();
    let host = h.dir.join("host");
    std::fs::create_dir_all(&host).unwrap();
    git(&host, &["init", "-q"]);
    let out = std::process::Command::new("git")
        .current_dir(&host)
        .args([
            "-c",
            "protocol.allow=always",
            "-c",
            "protocol.version=2",
            "fetch",
            "-q",
        ])
        .arg(format!("ext::sh {}", shim.display()))
        .arg("main:refs/remotes/sandbox/main")
        .env("KS_SHIM_SOCKET", &h.socket)
        .env("KS_SHIM_REPO", &origin)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("HOME", h.dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "fetch: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        git(&host, &["rev-parse", "refs/remotes/sandbox/main"]),
        head
    );
}

/// A command sent while the agent server restarts (connections closed
/// before the hello) goes through once the server is back when the client
/// retries; a client that does not retry fails.
#[test]
fn a_retrying_client_waits_for_a_restarting_agent() {
    let dir = scratch_dir();
    let workspace = dir.join("workspace");
    std::fs::create_dir_all(&workspace).unwrap();
    let socket = dir.join("agent.sock");

    // A dying server: it accepts connections and closes them unanswered.
    let dying = UnixListener::bind(&socket).unwrap();
    let plain = AgentClient::new(unix_connector(&socket));
    let refuse = |listener: &UnixListener| drop(listener.accept().unwrap());
    let t = std::thread::spawn(move || {
        refuse(&dying);
        dying
    });
    match plain.ping() {
        Err(ClientError::Protocol(ProtocolError::Closed)) => {}
        Err(ClientError::Protocol(ProtocolError::Io(e)))
            if matches!(
                e.kind(),
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
            ) => {}
        other => panic!("a refused connection gave {other:?}"),
    }
    let dying = t.join().unwrap();

    // Three more refusals, then the real agent takes the socket's place.
    let (s, ws) = (socket.clone(), workspace.clone());
    let server = std::thread::spawn(move || {
        for _ in 0..3 {
            refuse(&dying);
        }
        let fresh = s.with_extension("new");
        let listener = AgentListener::unix(&fresh).unwrap();
        std::fs::rename(&fresh, &s).unwrap();
        drop(dying);
        agent::serve(&listener, config(ws))
    });
    let retrying = AgentClient::new(unix_connector(&socket)).retrying(Duration::from_secs(10));
    let t0 = Instant::now();
    assert_eq!(retrying.ping().unwrap(), env!("CARGO_PKG_VERSION"));
    assert!(
        t0.elapsed() >= Duration::from_millis(500),
        "{:?}",
        t0.elapsed()
    );
    let out = retrying.exec_output(&["true"]).unwrap();
    assert!(out.status.success());
    drop(server);
}

/// Commands started through the spawn helper (the agent binary as
/// `__spawn`, as the guest's agent does) behave as forked ones: output,
/// exit status, working directory, their own process group, a terminal as
/// controlling terminal, the requested user, and an error for a program
/// that does not exist.
#[test]
fn commands_through_the_spawn_helper() {
    let h = start_agent_with(|c| {
        c.spawn_helper = Some(PathBuf::from(env!("CARGO_BIN_EXE_keystone-guest-agent")))
    });
    let ws = h.workspace.to_string_lossy().into_owned();
    let out = h
        .client
        .exec_request_output(ExecRequest {
            cwd: Some(ws.clone()),
            ..ExecRequest::new(&[
                "sh",
                "-c",
                "pwd; echo $FOO; cut -d' ' -f5 /proc/$$/stat; echo $$; echo oops >&2; exit 5",
            ])
        })
        .map(|mut o| {
            o.stdout.retain(|b| *b != b' ');
            o
        })
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(out.status.code, Some(5), "{text}");
    assert_eq!(lines[0], ws, "{text}");
    assert_eq!(lines[2], lines[3], "not its own process group: {text}");
    assert_eq!(out.stderr, b"oops\n");

    let out = h
        .client
        .exec_request_output(ExecRequest {
            tty: Some(TtySize { rows: 24, cols: 80 }),
            ..ExecRequest::new(&["sh", "-c", "tty; stty size"])
        })
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("/dev/pts/"), "{text:?}");
    assert!(text.contains("24 80"), "{text:?}");

    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let out = h
            .client
            .exec_request_output(ExecRequest {
                user: Some(keystone_guest_agent::protocol::UserSpec::Name(
                    "nobody".into(),
                )),
                cwd: Some("/".into()),
                ..ExecRequest::new(&["id", "-u"])
            })
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "65534");
    }

    // A program named relative to the working directory.
    let script = h.workspace.join("hello.sh");
    std::fs::write(&script, "#!/bin/sh\necho hello from $0\n").unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = h
        .client
        .exec_request_output(ExecRequest {
            cwd: Some(ws.clone()),
            ..ExecRequest::new(&["./hello.sh"])
        })
        .unwrap();
    assert_eq!(out.stdout, b"hello from ./hello.sh\n");
    // A program found on the PATH the request gives, not on the default.
    let out = h
        .client
        .exec_request_output(ExecRequest {
            env: vec![("PATH".into(), format!("{ws}:/usr/bin:/bin"))],
            ..ExecRequest::new(&["hello.sh"])
        })
        .unwrap();
    assert!(out.stdout.starts_with(b"hello from "), "{out:?}");

    let err = h.client.exec_output(&["no-such-program-here"]).unwrap_err();
    assert!(err.to_string().contains("no-such-program-here"), "{err}");
}

/// A spawn helper that dies before it runs the command (as processes
/// sometimes do as they start on an emulating KVM) is started again, and
/// the command runs once; one that always dies gives the host an error
/// that says so instead of a command killed by a signal.
#[test]
fn a_spawn_helper_that_dies_before_the_exec_is_retried() {
    let dir = scratch_dir();
    let crashes = dir.join("crashes");
    let flaky = dir.join("flaky-helper");
    std::fs::write(
        &flaky,
        format!(
            "#!/bin/sh\n\
             echo x >> {c}\n\
             [ $(wc -l < {c}) -ge 3 ] || kill -SEGV $$\n\
             exec {agent} \"$@\"\n",
            c = crashes.display(),
            agent = env!("CARGO_BIN_EXE_keystone-guest-agent"),
        ),
    )
    .unwrap();
    std::fs::set_permissions(&flaky, std::fs::Permissions::from_mode(0o755)).unwrap();
    let h = start_agent_with(|c| c.spawn_helper = Some(flaky.clone()));
    let ws = h.workspace.to_string_lossy().into_owned();
    let out = h
        .client
        .exec_request_output(ExecRequest {
            cwd: Some(ws.clone()),
            ..ExecRequest::new(&["sh", "-c", "echo ran >> runs; cat runs"])
        })
        .unwrap();
    assert_eq!(out.status.code, Some(0), "{out:?}");
    assert_eq!(out.stdout, b"ran\n", "the command ran more than once");
    let tries = std::fs::read_to_string(&crashes).unwrap();
    assert_eq!(
        tries.lines().count(),
        3,
        "two crashed tries, then one that ran"
    );

    let dead = dir.join("dead-helper");
    std::fs::write(&dead, "#!/bin/sh\nkill -SEGV $$\n").unwrap();
    std::fs::set_permissions(&dead, std::fs::Permissions::from_mode(0o755)).unwrap();
    let h = start_agent_with(|c| c.spawn_helper = Some(dead.clone()));
    let err = h.client.exec_output(&["true"]).unwrap_err().to_string();
    assert!(
        err.contains("spawn helper ended before running it"),
        "{err}"
    );
}

/// A request through the guest proxy at `proxy`; returns everything the
/// proxy sent back once the peer closes (after `then` is written).
fn through_proxy(proxy: std::net::SocketAddr, head: &str, then: &[u8]) -> String {
    let mut s = std::net::TcpStream::connect(proxy).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(then).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// The guest programs' way out: before the host offers connections the
/// proxy says the sandbox is starting; with an offer, each CONNECT or plain HTTP
/// request is asked of the host, which refuses (the program reads why) or
/// makes the connection (bytes go both ways, the head of a plain request
/// reaches the server without proxy headers); commands get the proxy in
/// their environment; once the host withdraws its offer the proxy says the
/// network is down.
#[test]
fn egress_through_the_host() {
    use keystone_guest_agent::agent::egress::{Egress, NetworkSetting};
    let egress = Egress::listen("127.0.0.1:0".parse().unwrap(), NetworkSetting::Nat).unwrap();
    let proxy: std::net::SocketAddr = egress.proxy_url()["http://".len()..].parse().unwrap();
    let h = start_agent_with(|c| c.egress = Some(egress));

    let out = through_proxy(proxy, "CONNECT example.com:443 HTTP/1.1\r\n\r\n", b"");
    assert!(out.starts_with("HTTP/1.1 503 "), "{out}");
    assert!(out.contains("is starting"), "{out}");
    assert!(!out.contains("--network none"), "{out}");

    // "The internet": an echo server and an HTTP server that returns the
    // head it got.
    let echo = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let echo_port = echo.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for c in echo.incoming().flatten() {
            std::thread::spawn(move || {
                let mut r = c.try_clone().unwrap();
                let mut w = c;
                let _ = std::io::copy(&mut r, &mut w);
            });
        }
    });
    let web = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let web_port = web.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut c in web.incoming().flatten() {
            let mut head = Vec::new();
            let mut b = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && c.read(&mut b).unwrap_or(0) == 1 {
                head.push(b[0]);
            }
            let body = String::from_utf8_lossy(&head).into_owned();
            let _ = write!(
                c,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
        }
    });

    // The host: connects what it allows, refuses the rest with a reason.
    let asks = h.client.egress().unwrap();
    let offer = asks.closer();
    let host_client = std::sync::Arc::new(AgentClient::new(unix_connector(&h.socket)));
    std::thread::spawn(move || {
        for ask in asks {
            let ask = ask.unwrap();
            let c = std::sync::Arc::clone(&host_client);
            std::thread::spawn(move || {
                if ask.host != "127.0.0.1" {
                    let reason = format!("{} is not allowed here", ask.host);
                    assert!(c.egress_attach(ask.id, Some(reason)).unwrap().is_none());
                    return;
                }
                let tcp = std::net::TcpStream::connect(("127.0.0.1", ask.port)).unwrap();
                let tunnel = c.egress_attach(ask.id, None).unwrap().unwrap();
                let _ = tunnel.relay(Box::new(tcp));
            });
        }
    });

    let out = through_proxy(
        proxy,
        &format!("CONNECT 127.0.0.1:{echo_port} HTTP/1.1\r\nHost: x\r\n\r\n"),
        b"through the tunnel",
    );
    assert_eq!(
        out,
        "HTTP/1.1 200 Connection established\r\n\r\nthrough the tunnel"
    );

    let out = through_proxy(proxy, "CONNECT metadata.internal:80 HTTP/1.1\r\n\r\n", b"");
    assert!(out.starts_with("HTTP/1.1 403 "), "{out}");
    assert!(
        out.contains("metadata.internal is not allowed here"),
        "{out}"
    );

    let out = through_proxy(
        proxy,
        &format!(
            "GET http://127.0.0.1:{web_port}/page HTTP/1.1\r\nHost: 127.0.0.1\r\n\
             Proxy-Connection: keep-alive\r\n\r\n"
        ),
        b"",
    );
    assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
    assert!(
        out.contains("GET /page HTTP/1.1\r\nHost: 127.0.0.1\r\n"),
        "{out}"
    );
    assert!(out.contains("Connection: close"), "{out}");
    assert!(
        !out.to_ascii_lowercase().contains("proxy-connection"),
        "{out}"
    );

    let out = h
        .client
        .exec_output(&["sh", "-c", "echo $https_proxy $no_proxy"])
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("http://{proxy} localhost,127.0.0.1,::1")
    );

    // The host withdraws its offer (its supervisor stops).
    offer.close();
    let t0 = std::time::Instant::now();
    let out = loop {
        let out = through_proxy(proxy, "CONNECT example.com:443 HTTP/1.1\r\n\r\n", b"");
        if out.contains("network is down") || t0.elapsed() > Duration::from_secs(30) {
            break out;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(out.starts_with("HTTP/1.1 503 "), "{out}");
    assert!(out.contains("stopped offering"), "{out}");
}

/// A sandbox started with `--network none` says so, at once and for good.
#[test]
fn egress_without_network_says_so() {
    use keystone_guest_agent::agent::egress::{Egress, NetworkSetting};
    let egress = Egress::listen("127.0.0.1:0".parse().unwrap(), NetworkSetting::None).unwrap();
    let proxy: std::net::SocketAddr = egress.proxy_url()["http://".len()..].parse().unwrap();
    let out = through_proxy(proxy, "CONNECT example.com:443 HTTP/1.1\r\n\r\n", b"");
    assert!(out.starts_with("HTTP/1.1 503 "), "{out}");
    assert!(out.contains("started with --network none"), "{out}");
    assert_eq!(
        NetworkSetting::from_cmdline("console=ttyS0 keystone.network=none quiet"),
        NetworkSetting::None
    );
    assert_eq!(
        NetworkSetting::from_cmdline("keystone.network=nat"),
        NetworkSetting::Nat
    );
    assert_eq!(
        NetworkSetting::from_cmdline("console=ttyS0"),
        NetworkSetting::Unknown
    );
}
