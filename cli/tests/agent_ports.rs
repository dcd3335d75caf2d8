//! Guest ports reach the host, on a real guest (engine qemu): a server
//! that starts listening in the sandbox is forwarded to the host's
//! 127.0.0.1 within seconds, bytes round-trip both ways through it,
//! `status` shows its URL, and the forward goes away with the server; once
//! the sandbox stops its ports answer with a "sandbox not running" page
//! until it starts again or is destroyed. A second test opens the Zellij session in a browser's
//! place with `attach --web`. An ignored third one measures attach latency
//! and the forwarding path's latency and prints them as JSON (`cargo test
//! -p keystone --test agent_ports -- --ignored --nocapture latency`).
//!
//! The guest servers are small Perl scripts (Perl comes with git in the
//! guest image). Skips (printing `SKIP: <reason>`) without /dev/kvm,
//! qemu-system-x86_64 or a guest kernel and rootfs.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;

/// A TCP echo server for the guest: `perl -e ECHO ADDRESS PORT`. Each
/// connection echoes until end of stream, then half-closes.
const ECHO: &str = r#"
use IO::Socket::INET;
$SIG{CHLD} = 'IGNORE';
my ($addr, $port) = @ARGV;
my $l = IO::Socket::INET->new(LocalAddr => $addr, LocalPort => $port, Listen => 16, ReuseAddr => 1)
    or die "listen $addr:$port: $!";
while (my $c = $l->accept) {
    if (fork() == 0) {
        $c->setsockopt(6, 1, 1);
        my $b;
        while (sysread($c, $b, 65536)) {
            my $o = 0;
            while ($o < length $b) { my $n = syswrite($c, $b, length($b) - $o, $o); die unless defined $n; $o += $n }
        }
        shutdown($c, 1);
        exit 0;
    }
    close $c;
}
"#;

/// Starts the echo server in the guest, detached from the exec.
fn start_echo(env: &Env, repo: &Path, addr: &str, port: u16, user: &str) {
    let out = env.run(
        &[
            "exec",
            "--user",
            user,
            "--",
            "sh",
            "-c",
            "exec setsid -f perl -e \"$0\" \"$1\" \"$2\" </dev/null >/tmp/echo-$2.log 2>&1",
            ECHO,
            addr,
            &port.to_string(),
        ],
        repo,
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
}

/// The `live.ports` entry of `guest_port`, once `want` holds for it (or
/// for its absence), within `limit`.
fn wait_port(
    env: &Env,
    repo: &Path,
    guest_port: u16,
    limit: Duration,
    want: impl Fn(Option<&serde_json::Value>) -> bool,
) -> Option<serde_json::Value> {
    let t = Instant::now();
    loop {
        let status = env.status_json(repo);
        let entry = status["live"]["ports"]
            .as_array()
            .and_then(|a| a.iter().find(|p| p["guest_port"] == guest_port))
            .cloned();
        if want(entry.as_ref()) {
            eprintln!(
                "guest port {guest_port}: {:?} after {:.1?}",
                entry.as_ref().map(|e| e.to_string()),
                t.elapsed()
            );
            return entry;
        }
        assert!(
            t.elapsed() < limit,
            "guest port {guest_port} did not reach the expected state in {limit:?}: {status}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn forwarded_port(entry: &serde_json::Value) -> u16 {
    let port = entry["host_port"].as_u64().expect("a host port") as u16;
    assert!(port > 0);
    port
}

fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 13 % 251) as u8).collect()
}

/// Sends `data` through `port` on the host's loopback and reads the echo.
fn echo_round_trip(port: u16, data: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut w = s.try_clone().unwrap();
    let sent = data.to_vec();
    let writer = std::thread::spawn(move || {
        w.write_all(&sent).unwrap();
        w.shutdown(Shutdown::Write).unwrap();
    });
    let mut back = Vec::new();
    s.read_to_end(&mut back).unwrap();
    writer.join().unwrap();
    back
}

#[test]
fn a_guest_server_is_reachable_from_the_host() {
    let _one = ONE_GUEST_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let Some(env) = setup("ports", "ports") else {
        return;
    };
    let t0 = Instant::now();
    let repo = env.path("proj");
    env.start(&repo, &[]);

    // A dev server on the guest's loopback, and a system port on all
    // addresses (root), which stays in the guest.
    start_echo(&env, &repo, "127.0.0.1", 4321, "agent");
    start_echo(&env, &repo, "0.0.0.0", 81, "root");
    let entry = wait_port(&env, &repo, 4321, Duration::from_secs(120), |e| {
        e.is_some_and(|e| e["host_port"].is_u64())
    })
    .unwrap();
    let host_port = forwarded_port(&entry);
    assert_eq!(
        entry["url"],
        format!("http://ports.localhost:{host_port}"),
        "{entry}"
    );
    assert_eq!(entry["guest_address"], "127.0.0.1", "{entry}");
    let system = wait_port(&env, &repo, 81, Duration::from_secs(120), |e| e.is_some()).unwrap();
    assert_eq!(system["host_port"], serde_json::Value::Null, "{system}");
    assert!(
        system["note"].as_str().unwrap_or("").contains("below 1024"),
        "{system}"
    );

    // Bytes both ways: a short exchange, then 4 MiB each way.
    assert_eq!(echo_round_trip(host_port, b"ping\n"), b"ping\n");
    let data = pattern(4 << 20);
    let back = echo_round_trip(host_port, &data);
    assert_eq!(back.len(), data.len());
    assert!(back == data, "the bytes came back changed");
    // Several connections at once.
    let handles: Vec<_> = (0..4)
        .map(|i| {
            std::thread::spawn(move || {
                let data = pattern(100_000 * (i + 1));
                assert!(echo_round_trip(host_port, &data) == data, "connection {i}");
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }

    // What a user reads in `status`.
    let out = env.run(&["status"], &repo);
    let human = stdout(&out);
    assert!(
        human.contains(&format!(
            "Port 4321:  http://ports.localhost:{host_port} (guest 127.0.0.1:4321)"
        )),
        "{human}"
    );
    assert!(human.contains("Port 81:  not forwarded"), "{human}");

    // The server stops: the forward goes away and the host port closes.
    let out = env.run(
        &["exec", "--", "pkill", "-u", "agent", "-f", "perl -e"],
        &repo,
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    wait_port(&env, &repo, 4321, Duration::from_secs(120), |e| e.is_none());
    assert!(
        TcpStream::connect(("127.0.0.1", host_port)).is_err(),
        "127.0.0.1:{host_port} still accepts connections"
    );

    // A new server is picked up again; a stopped sandbox forwards nothing.
    start_echo(&env, &repo, "0.0.0.0", 4322, "agent");
    let entry = wait_port(&env, &repo, 4322, Duration::from_secs(120), |e| {
        e.is_some_and(|e| e["host_port"].is_u64())
    })
    .unwrap();
    let port2 = forwarded_port(&entry);
    assert_eq!(echo_round_trip(port2, b"again"), b"again");
    let out = env.run(&["stop"], &repo);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(env.status_json(&repo)["live"], serde_json::Value::Null);
    // What a browser on that port gets now: a page saying so, not a
    // refused connection (and no bytes reach an echo server).
    let (status, body) = http_get(port2, "ports.localhost", "/");
    assert!(status.starts_with("HTTP/1.1 503"), "{status}\n{body}");
    assert!(body.contains("<code>ports</code> is not running"), "{body}");
    assert!(body.contains("keystone agent start ports"), "{body}");
    // Started again, the page is gone and the port is free for the
    // forwarder; destroyed, nothing is left listening.
    env.start(&repo, &[]);
    assert!(
        TcpStream::connect(("127.0.0.1", port2)).is_err(),
        "127.0.0.1:{port2} still answers after start"
    );
    start_echo(&env, &repo, "127.0.0.1", 4322, "agent");
    let entry = wait_port(&env, &repo, 4322, Duration::from_secs(120), |e| {
        e.is_some_and(|e| e["host_port"].is_u64())
    })
    .unwrap();
    let port3 = forwarded_port(&entry);
    let out = env.run(&["stop"], &repo);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(http_get(port3, "ports.localhost", "/")
        .0
        .starts_with("HTTP/1.1 503"));
    let out = env.run(&["destroy", "--force", "ports"], &repo);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        TcpStream::connect(("127.0.0.1", port3)).is_err(),
        "127.0.0.1:{port3} still answers after destroy"
    );
    eprintln!("ports test took {:.1?}", t0.elapsed());
}

/// An HTTP/1.1 GET on the host's loopback; returns (status line, body).
fn http_get(port: u16, host: &str, path: &str) -> (String, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = Vec::new();
    let _ = s.read_to_end(&mut response);
    let response = String::from_utf8_lossy(&response).into_owned();
    let status = response.lines().next().unwrap_or("").to_string();
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// `(URL, token)` from `attach --web`'s output.
fn web_url_and_token(out: &str) -> (String, String) {
    let field = |name: &str| {
        out.lines()
            .find_map(|l| l.trim().strip_prefix(name))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| panic!("no {name} line in {out}"))
    };
    (field("URL:"), field("token:"))
}

#[test]
fn attach_web_serves_the_session_to_a_browser() {
    let _one = ONE_GUEST_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let Some(env) = setup("web", "web") else {
        return;
    };
    let t0 = Instant::now();
    let repo = env.path("proj");
    env.start(&repo, &[]);

    let out = env.run(&["attach", "--web"], &repo);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let (url, token) = web_url_and_token(&stdout(&out));
    let rest = url
        .strip_prefix("http://web.localhost:")
        .unwrap_or_else(|| panic!("{url}"));
    let (port, path) = rest.split_once('/').unwrap();
    assert_eq!(path, "web-main", "{url}");
    let port: u16 = port.parse().unwrap();
    assert!(
        token.len() >= 16 && token.chars().all(|c| c.is_ascii_hexdigit() || c == '-'),
        "{token:?}"
    );
    // The page a browser gets at that URL is Zellij's web client.
    let (status, body) = http_get(port, &format!("web.localhost:{port}"), "/web-main");
    assert!(status.contains(" 200 "), "{status}\n{body}");
    assert!(body.contains("Zellij Web Client"), "{body}");
    // The session it serves exists in the guest, for the terminal too.
    let out = env.run(
        &["exec", "--", "zellij", "list-sessions", "-n", "-s"],
        &repo,
    );
    assert!(
        stdout(&out).lines().any(|l| l.trim() == "web-main"),
        "{}",
        text(&out)
    );
    let status = env.status_json(&repo);
    let ports = status["live"]["ports"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        ports
            .iter()
            .any(|p| p["guest_port"] == 8082 && p["host_port"] == port),
        "{status}"
    );
    // A second `attach --web` reuses the server and gives a new token.
    let out = env.run(&["attach", "--web"], &repo);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let (url2, token2) = web_url_and_token(&stdout(&out));
    assert_eq!(url2, url);
    assert_ne!(token2, token);
    // A worktree has its own session; one first opened in a terminal is
    // the one the browser gets.
    let out = env.run(&["worktree", "add", "feat", "--create"], &repo);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let (_, drawn) = attach_ms(&env, &repo, &["attach", "--worktree", "feat"], "web-feat");
    eprintln!("attach --worktree feat drew a new session in {drawn:.0} ms");
    let out = env.run(&["attach", "--web", "--worktree", "feat"], &repo);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let (url3, _) = web_url_and_token(&stdout(&out));
    assert!(url3.ends_with("/web-feat"), "{url3}");
    let out = env.run(
        &["exec", "--", "zellij", "list-sessions", "-n", "-s"],
        &repo,
    );
    let sessions: Vec<String> = stdout(&out).lines().map(|l| l.trim().to_string()).collect();
    assert_eq!(
        sessions.iter().filter(|s| *s == "web-feat").count(),
        1,
        "{sessions:?}"
    );
    eprintln!("attach --web test took {:.1?}", t0.elapsed());
}

/// Round trips per way of reaching the echo server in `latency`.
const ROUND_TRIPS: usize = 1000;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Round trips of `size`-byte messages on one connection; the times in ms.
fn ping_pong(s: &mut (impl Read + Write), size: usize, n: usize) -> Vec<f64> {
    let msg = pattern(size);
    let mut back = vec![0u8; size];
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        s.write_all(&msg).unwrap();
        s.read_exact(&mut back).unwrap();
        times.push(t.elapsed().as_secs_f64() * 1e3);
        assert!(back == msg);
    }
    times
}

/// Runs `keystone agent attach` on a new pseudo-terminal (stdin, stdout
/// and stderr) and returns the ms until its first output bytes and until
/// Zellij has drawn the session (its name in the status bar), then kills
/// it (the session lives on in the guest).
fn attach_ms(env: &Env, repo: &Path, args: &[&str], session: &str) -> (f64, f64) {
    let (master, slave) = {
        let (mut m, mut s) = (-1, -1);
        let ws = libc::winsize {
            ws_row: 40,
            ws_col: 120,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: openpty writes two new descriptors into m and s; the
        // winsize pointer is valid, name and termios may be null.
        let rc =
            unsafe { libc::openpty(&mut m, &mut s, std::ptr::null_mut(), std::ptr::null(), &ws) };
        assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
        // SAFETY: both descriptors are new and owned by nothing else.
        unsafe { (std::fs::File::from_raw_fd(m), std::fs::File::from_raw_fd(s)) }
    };
    let mut cmd = env.command(args, repo);
    cmd.env("TERM", "xterm-256color")
        .stdin(Stdio::from(slave.try_clone().unwrap()))
        .stdout(Stdio::from(slave.try_clone().unwrap()))
        .stderr(Stdio::from(slave));
    let t = Instant::now();
    let mut child = cmd.spawn().unwrap();
    drop(cmd);
    let drawn = format!("Zellij ({session})");
    let mut seen = Vec::new();
    let mut first = None;
    let mut buf = [0u8; 65536];
    while t.elapsed() < Duration::from_secs(60) {
        let mut pfd = libc::pollfd {
            fd: master.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd on the master we hold.
        if unsafe { libc::poll(&mut pfd, 1, 100) } != 1 {
            continue;
        }
        let n = (&master).read(&mut buf).unwrap_or(0);
        if n == 0 {
            break;
        }
        first.get_or_insert_with(|| t.elapsed().as_secs_f64() * 1e3);
        seen.extend_from_slice(&buf[..n]);
        if String::from_utf8_lossy(&seen).contains(&drawn) {
            let screen = t.elapsed().as_secs_f64() * 1e3;
            let _ = child.kill();
            let _ = child.wait();
            return (first.unwrap_or(screen), screen);
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!(
        "attach did not draw {drawn:?} within 60 s; it printed {:?}",
        String::from_utf8_lossy(&seen)
    );
}

/// Measured, not asserted: one JSON object with
/// - `attach_first_bytes_*`: `keystone agent attach` on a pseudo-terminal
///   to its first output bytes (Zellij's client setting the terminal up),
///   and `attach_session_drawn_median_ms` to the session's status bar
///   drawn, for an existing session, median of 10, beside two floors of it on this engine: `exec -- true`
///   and `exec -- zellij --version` (median of 5 each);
/// - round trips of 64-byte messages on one open connection to an echo
///   server in the guest, 1000 each: through the forwarded host port
///   (`forwarded_rtt_p50_ms`) and, interleaved with those, through a
///   `TcpConnect` tunnel opened directly on the sandbox's vsock socket
///   (`tunnel_rtt_p50_ms`), and made inside the guest on its loopback
///   (`in_guest_rtt_mean_ms`, a mean: the guest's clock may tick coarsely);
/// - `proxy_added_p50_ms`: forwarded minus tunnel, what the host-side
///   forwarder adds; `path_added_p50_ms`: forwarded minus in-guest, what
///   the whole host-to-guest path adds (vsock emulation included).
#[test]
#[ignore = "a measurement: cargo test -p keystone --test agent_ports -- --ignored --nocapture latency"]
fn latency() {
    let _one = ONE_GUEST_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let Some(env) = setup("portlat", "plat") else {
        return;
    };
    let repo = env.path("proj");
    env.start(&repo, &[]);

    // Attach: the session exists first (as on every attach after the
    // first), one warm-up, then 10 measured.
    let out = env.run(
        &[
            "exec",
            "--",
            "zellij",
            "attach",
            "--create-background",
            "plat-main",
        ],
        &repo,
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    attach_ms(&env, &repo, &["attach"], "plat-main");
    let (attach, screen): (Vec<f64>, Vec<f64>) = (0..10)
        .map(|_| attach_ms(&env, &repo, &["attach"], "plat-main"))
        .unzip();
    // Its floor on this engine: a guest exec, and Zellij starting at all.
    let cli_ms = |args: &[&str]| {
        let times: Vec<f64> = (0..5)
            .map(|_| {
                let t = Instant::now();
                let out = env.command(args, &repo).output().unwrap();
                assert_eq!(out.status.code(), Some(0), "{}", text(&out));
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        median(times)
    };
    let exec_true = cli_ms(&["exec", "--", "true"]);
    let zellij_version = cli_ms(&["exec", "--", "zellij", "--version"]);

    // Proxy: one echo server, three ways to reach it.
    start_echo(&env, &repo, "127.0.0.1", 4400, "agent");
    let entry = wait_port(&env, &repo, 4400, Duration::from_secs(120), |e| {
        e.is_some_and(|e| e["host_port"].is_u64())
    })
    .unwrap();
    let host_port = forwarded_port(&entry);
    let mut s = TcpStream::connect(("127.0.0.1", host_port)).unwrap();
    s.set_nodelay(true).unwrap();
    let dir = PathBuf::from(env.status_json(&repo)["dir"].as_str().unwrap());
    let client =
        keystone_guest_agent::AgentClient::new(keystone_guest_agent::hybrid_vsock_connector(
            dir.join("vsock.sock"),
            keystone_guest_agent::protocol::AGENT_VSOCK_PORT,
        ));
    let mut tunnel = client.tcp_connect(4400).unwrap();
    ping_pong(&mut s, 64, 20);
    ping_pong(&mut tunnel, 64, 20);
    // Interleaved, so that both see the same load on the host.
    let (mut forwarded, mut tunnel_times) = (Vec::new(), Vec::new());
    for _ in 0..ROUND_TRIPS {
        forwarded.extend(ping_pong(&mut s, 64, 1));
        tunnel_times.extend(ping_pong(&mut tunnel, 64, 1));
    }

    // The guest's clock may tick in jiffies (QEMU's microvm): time all
    // round trips together and divide.
    let script = format!(
        r#"
use IO::Socket::INET; use Time::HiRes qw(time);
my $s = IO::Socket::INET->new(PeerAddr => "127.0.0.1", PeerPort => 4400) or die $!;
$s->setsockopt(6, 1, 1);
my $m = "x" x 64;
sub rt {{ syswrite($s, $m); my $got = ""; my $b;
    while (length $got < 64) {{ sysread($s, $b, 64 - length $got) or die; $got .= $b }} }}
rt() for 1..20;
my $t0 = time; rt() for 1..{ROUND_TRIPS}; print((time - $t0) * 1000 / {ROUND_TRIPS}, "\n");
"#
    );
    let out = env.run(&["exec", "--", "perl", "-e", &script], &repo);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let in_guest: f64 = stdout(&out).trim().parse().unwrap();

    let (fwd, tun) = (median(forwarded.clone()), median(tunnel_times));
    let engine = env.status_json(&repo)["engine"].clone();
    let report = serde_json::json!({
        "engine": engine,
        "attach_first_bytes_median_ms": median(attach.clone()),
        "attach_first_bytes_min_ms": attach.iter().copied().fold(f64::INFINITY, f64::min),
        "attach_first_bytes_max_ms": attach.iter().copied().fold(0.0, f64::max),
        "attach_session_drawn_median_ms": median(screen),
        "exec_true_median_ms": exec_true,
        "exec_zellij_version_median_ms": zellij_version,
        "forwarded_rtt_p50_ms": fwd,
        "tunnel_rtt_p50_ms": tun,
        "in_guest_rtt_mean_ms": in_guest,
        "proxy_added_p50_ms": fwd - tun,
        "path_added_p50_ms": fwd - in_guest,
        "message_bytes": 64,
        "round_trips": ROUND_TRIPS,
    });
    println!("{report}");
}
