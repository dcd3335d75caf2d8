//! Servers in a sandbox reached by name through the per-user dev-server
//! proxy, and nothing listening on the host for a guest port unless asked.
//!
//! Without a guest (always runs): the proxy process a command starts, its
//! pages for a stopped and an unknown sandbox, one proxy per state folder,
//! a port change, a taken port, its exit once its state folder goes.
//!
//! On a real guest (engine qemu; skips, printing `SKIP: <reason>`, without
//! /dev/kvm, qemu-system-x86_64 or a guest kernel and rootfs): two guest
//! servers reached by `http://<port>.<sandbox>.localhost:<P>/` and the
//! primary `http://<sandbox>.localhost:<P>/`, a WebSocket echo through the
//! proxy, no host listener for guest port 5432, `forward` for raw TCP, the
//! 503 page after `stop` and the 404 page after `destroy`; `attach --web`
//! in a browser's place; and an ignored measurement (`measure.rs`).
//!
//! The guest's server is a Perl script (Perl comes with git in the guest
//! image).

mod common;
#[path = "agent_ports/host.rs"]
mod host;
#[path = "agent_ports/measure.rs"]
mod measure;
#[path = "agent_ports/web.rs"]
mod web;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use web::*;

/// A port free on this host now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Sets `[proxy] port = <port>` in the test's `agent.toml` (its last
/// table, replaced if there).
fn set_proxy_port(config: &Path, port: u16) {
    let text = std::fs::read_to_string(config).unwrap_or_default();
    let kept = text.split("\n[proxy]\n").next().unwrap_or("");
    std::fs::write(config, format!("{kept}\n[proxy]\nport = {port}\n")).unwrap();
}

/// Starts the guest's server (`web::SERVER`) on `addr:port`, detached.
fn start_server(env: &Env, repo: &Path, addr: &str, port: u16, user: &str) {
    let out = env.run(
        &[
            "exec",
            "--user",
            user,
            "--",
            "sh",
            "-c",
            "exec setsid -f perl -e \"$0\" \"$1\" \"$2\" </dev/null >/tmp/server-$2.log 2>&1",
            SERVER,
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
            return entry;
        }
        assert!(
            t.elapsed() < limit,
            "guest port {guest_port} did not reach the expected state in {limit:?}: {status}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Whether something accepts TCP connections on `addr` of this host.
fn host_listens(addr: &str) -> bool {
    TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(1)).is_ok()
}

#[test]
fn guest_servers_are_reached_by_name_and_never_squat_host_ports() {
    let Some(env) = setup("ports", "ports") else {
        return;
    };
    let t0 = Instant::now();
    let p = free_port();
    set_proxy_port(&env.path("config/keystone/agent.toml"), p);
    let host_had_5432 = [("127.0.0.1:5432"), ("[::1]:5432")].map(host_listens);
    let repo = env.path("proj");
    env.start(&repo, &[]);

    // Two servers, one the lowest (the primary); a system port as root.
    start_server(&env, &repo, "127.0.0.1", 8000, "agent");
    start_server(&env, &repo, "0.0.0.0", 5432, "agent");
    start_server(&env, &repo, "0.0.0.0", 81, "root");
    let listed = |e: Option<&serde_json::Value>| e.is_some_and(|e| e["url"].is_string());
    let web = wait_port(&env, &repo, 8000, Duration::from_secs(120), listed).unwrap();
    assert_eq!(
        web["url"],
        format!("http://8000.ports.localhost:{p}/"),
        "{web}"
    );
    assert_eq!(web["host_port"], serde_json::Value::Null, "{web}");
    let db = wait_port(&env, &repo, 5432, Duration::from_secs(120), listed).unwrap();
    assert_eq!(db["host_port"], serde_json::Value::Null, "{db}");
    let system = wait_port(&env, &repo, 81, Duration::from_secs(60), |e| e.is_some()).unwrap();
    assert_eq!(system["url"], serde_json::Value::Null, "{system}");
    assert!(
        system["note"].as_str().unwrap_or("").contains("below 1024"),
        "{system}"
    );
    let status = env.status_json(&repo);
    assert_eq!(
        status["proxy"]["url"],
        format!("http://ports.localhost:{p}/")
    );
    assert_eq!(status["proxy"]["primary_port"], 5432, "{status}");
    assert_eq!(status["proxy"]["running"], true, "{status}");

    // Both URL forms, as a browser sends them.
    let (code, _, body) = http_get(p, Some(&format!("8000.ports.localhost:{p}")), "/a?b=1");
    assert_eq!((code, body.as_str()), (200, "port 8000 path /a?b=1\n"));
    let (code, _, body) = http_get(p, Some(&format!("ports.localhost:{p}")), "/");
    assert_eq!((code, body.as_str()), (200, "port 5432 path /\n"));
    let (code, _, body) = http_get(p, Some("8000.PORTS.localhost."), "/x");
    assert_eq!((code, body.as_str()), (200, "port 8000 path /x\n"));
    // Many requests on one kept-alive connection.
    let stream = TcpStream::connect(("127.0.0.1", p)).unwrap();
    let mut kept = KeepAlive::new(stream, "8000.ports.localhost");
    for i in 0..20 {
        let (code, body) = kept.get(&format!("/{i}"));
        assert_eq!(code, 200);
        assert_eq!(body, format!("port 8000 path /{i}\n").as_bytes());
    }
    // A WebSocket (hot reload's transport) echoes through the proxy.
    let mut ws = ws_connect(p, &format!("8000.ports.localhost:{p}"), "/hmr");
    for msg in [&b"hello"[..], &[b'z'; 70_000]] {
        ws_send(&mut ws, msg);
        assert_eq!(ws_recv(&mut ws), (1, msg.to_vec()));
    }
    // The guest listens on 5432: the host does not, on either loopback.
    for (addr, had) in ["127.0.0.1:5432", "[::1]:5432"].iter().zip(host_had_5432) {
        if had {
            eprintln!("SKIP (one check): this host already serves {addr}");
        } else {
            assert!(
                !host_listens(addr),
                "something listens on {addr} for the guest"
            );
        }
    }
    // Nor for the agent's own proxy port.
    let (code, _, body) = http_get(p, Some("3128.ports.localhost"), "/");
    assert_eq!(code, 404, "{body}");

    // What a user reads in `status`.
    let out = env.run(&["status"], &repo);
    let human = stdout(&out);
    for line in [
        format!("Dev server: http://ports.localhost:{p}/ (guest port 5432)"),
        format!("Port 8000:  http://8000.ports.localhost:{p}/ (guest 127.0.0.1:8000)"),
        "Port 81:  not routed".to_string(),
    ] {
        assert!(human.contains(&line), "{line:?} in {human}");
    }

    // Raw TCP on a host port only when asked, and only while asked.
    let host_port = free_port();
    let mut fwd = env
        .command(&["forward", "ports", "5432", &host_port.to_string()], &repo)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut said = String::new();
    BufReader::new(fwd.stdout.take().unwrap())
        .read_line(&mut said)
        .unwrap();
    assert!(
        said.starts_with(&format!("Forwarding 127.0.0.1:{host_port} to port 5432")),
        "{said}"
    );
    let mut raw = TcpStream::connect(("127.0.0.1", host_port)).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    raw.write_all(b"GET /raw HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    raw.shutdown(Shutdown::Write).unwrap();
    let mut answer = String::new();
    let _ = raw.read_to_string(&mut answer);
    assert!(answer.ends_with("port 5432 path /raw\n"), "{answer}");
    let _ = fwd.kill();
    let _ = fwd.wait();
    assert!(!host_listens(&format!("127.0.0.1:{host_port}")));

    // Stopped: both URL forms give the "not running" page.
    let out = env.run(&["stop"], &repo);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    std::thread::sleep(Duration::from_secs(1));
    for host in [
        format!("8000.ports.localhost:{p}"),
        format!("ports.localhost:{p}"),
    ] {
        let (code, head, body) = http_get(p, Some(&host), "/");
        assert_eq!(code, 503, "{head}{body}");
        assert!(body.contains("<code>ports</code> is not running"), "{body}");
        assert!(body.contains("keystone agent start ports"), "{body}");
    }
    // Destroyed: an unknown name.
    let out = env.run(&["destroy", "--force", "ports"], &repo);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    std::thread::sleep(Duration::from_secs(1));
    let (code, _, body) = http_get(p, Some("ports.localhost"), "/");
    assert_eq!(code, 404, "{body}");
    assert!(body.contains("No sandbox at"), "{body}");
    eprintln!("ports test took {:.1?}", t0.elapsed());
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
    let Some(env) = setup("web", "web") else {
        return;
    };
    let t0 = Instant::now();
    let p = free_port();
    set_proxy_port(&env.path("config/keystone/agent.toml"), p);
    let repo = env.path("proj");
    env.start(&repo, &[]);

    let out = env.run(&["attach", "--web"], &repo);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let (url, token) = web_url_and_token(&stdout(&out));
    assert_eq!(url, format!("http://8082.web.localhost:{p}/web-main"));
    assert!(
        token.len() >= 16 && token.chars().all(|c| c.is_ascii_hexdigit() || c == '-'),
        "{token:?}"
    );
    // The page a browser gets at that URL is Zellij's web client.
    let (code, head, body) = http_get(p, Some(&format!("8082.web.localhost:{p}")), "/web-main");
    assert_eq!(code, 200, "{head}{body}");
    assert!(body.contains("Zellij Web Client"), "{body}");
    // A second `attach --web` reuses the server and gives a new token.
    let out = env.run(&["attach", "--web"], &repo);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let (url2, token2) = web_url_and_token(&stdout(&out));
    assert_eq!(url2, url);
    assert_ne!(token2, token);
    let out = env.run(&["worktree", "add", "feat", "--create"], &repo);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let out = env.run(&["attach", "--web", "--worktree", "feat"], &repo);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let (url3, _) = web_url_and_token(&stdout(&out));
    assert!(url3.ends_with("/web-feat"), "{url3}");
    eprintln!("attach --web test took {:.1?}", t0.elapsed());
}
