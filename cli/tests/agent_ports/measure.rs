//! Measured, not asserted (`cargo test -p keystone --test agent_ports --
//! --ignored --nocapture latency`): one JSON object on stdout.
//!
//! - `proxy_*`: 64-byte HTTP responses from the guest's server on one
//!   kept-alive connection through the dev-server proxy, and, interleaved
//!   with those, on a `TcpConnect` tunnel opened directly on the sandbox's
//!   vsock socket (the proxy's own path to the guest, minus the proxy);
//!   `proxy_added_p50_ms` / `_p99_ms` are the differences; the same
//!   exchange made inside the guest on its loopback is
//!   `in_guest_rtt_mean_ms` (a mean: the guest's clock may tick coarsely);
//! - `rps_*`: requests per second with 64 concurrent kept-alive clients
//!   for [`RPS_SECONDS`] each, through the proxy and through 64 direct
//!   tunnels;
//! - `attach_*`: `keystone agent attach` on a pseudo-terminal to its first
//!   output bytes and to the session drawn (median of 10), beside `exec --
//!   true` and `exec -- zellij --version` (median of 5 each).

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::*;
use crate::web::KeepAlive;

/// Round trips per way of reaching the server.
const ROUND_TRIPS: usize = 1000;
/// Concurrent clients in the throughput runs.
const CLIENTS: usize = 64;
/// How long each throughput run lasts.
const RPS_SECONDS: u64 = 5;

fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

/// A kept-alive client on a direct tunnel to guest `port`.
fn tunnel(dir: &Path, port: u16) -> KeepAlive<keystone_guest_agent::client::TcpTunnel> {
    let client =
        keystone_guest_agent::AgentClient::new(keystone_guest_agent::hybrid_vsock_connector(
            dir.join("vsock.sock"),
            keystone_guest_agent::protocol::AGENT_VSOCK_PORT,
        ));
    KeepAlive::new(client.tcp_connect(port).unwrap(), "x")
}

/// One timed `GET /64`, in ms.
fn timed<S: std::io::Read + std::io::Write>(c: &mut KeepAlive<S>) -> f64 {
    let t = Instant::now();
    let (code, body) = c.get("/64");
    let ms = t.elapsed().as_secs_f64() * 1e3;
    assert_eq!((code, body.len()), (200, 64));
    ms
}

/// Requests per second with [`CLIENTS`] clients made by `open`.
fn rps<S: std::io::Read + std::io::Write + Send + 'static>(
    open: impl Fn() -> KeepAlive<S> + Sync,
) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<KeepAlive<S>> = (0..CLIENTS).map(|_| open()).collect();
    let t = Instant::now();
    let threads: Vec<_> = clients
        .into_iter()
        .map(|mut c| {
            let (done, stop) = (Arc::clone(&done), Arc::clone(&stop));
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    assert_eq!(c.get("/64").0, 200);
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(RPS_SECONDS));
    stop.store(true, Ordering::Relaxed);
    for th in threads {
        th.join().unwrap();
    }
    done.load(Ordering::Relaxed) as f64 / t.elapsed().as_secs_f64()
}

#[test]
#[ignore = "a measurement: cargo test -p keystone --test agent_ports -- --ignored --nocapture latency"]
fn latency() {
    let Some(env) = setup("portlat", "plat") else {
        return;
    };
    let p = crate::free_port();
    crate::set_proxy_port(&env.path("config/keystone/agent.toml"), p);
    let repo = env.path("proj");
    env.start(&repo, &[]);
    let attach = attach_figures(&env, &repo);

    crate::start_server(&env, &repo, "127.0.0.1", 4400, "agent");
    crate::wait_port(&env, &repo, 4400, Duration::from_secs(120), |e| {
        e.is_some_and(|e| e["url"].is_string())
    });
    let dir = PathBuf::from(env.status_json(&repo)["dir"].as_str().unwrap());
    let host = "4400.plat.localhost";
    let via_proxy = || {
        let s = TcpStream::connect(("127.0.0.1", p)).unwrap();
        s.set_nodelay(true).unwrap();
        KeepAlive::new(s, host)
    };
    let (mut proxied, mut direct) = (via_proxy(), tunnel(&dir, 4400));
    for _ in 0..20 {
        timed(&mut proxied);
        timed(&mut direct);
    }
    // Interleaved, so that both see the same load on the host.
    let (mut through, mut tunnelled) = (Vec::new(), Vec::new());
    for _ in 0..ROUND_TRIPS {
        through.push(timed(&mut proxied));
        tunnelled.push(timed(&mut direct));
    }
    let script = format!(
        r#"
use IO::Socket::INET; use Time::HiRes qw(time);
my $s = IO::Socket::INET->new(PeerAddr => "127.0.0.1", PeerPort => 4400) or die $!;
$s->setsockopt(6, 1, 1);
sub rt {{ syswrite($s, "GET /64 HTTP/1.1\r\nHost: x\r\n\r\n"); my $got = ""; my $b;
    until ($got =~ /\r\n\r\n(.{{64}})\z/s) {{ sysread($s, $b, 4096) or die; $got .= $b }} }}
rt() for 1..20;
my $t0 = time; rt() for 1..{ROUND_TRIPS}; print((time - $t0) * 1000 / {ROUND_TRIPS}, "\n");
"#
    );
    let out = env.run(&["exec", "--", "perl", "-e", &script], &repo);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let in_guest: f64 = stdout(&out).trim().parse().unwrap();

    let rps_proxy = rps(via_proxy);
    let rps_tunnel = rps(|| tunnel(&dir, 4400));
    let (p50, p99) = (percentile(through.clone(), 0.5), percentile(through, 0.99));
    let (t50, t99) = (
        percentile(tunnelled.clone(), 0.5),
        percentile(tunnelled, 0.99),
    );
    let mut report = serde_json::json!({
        "engine": env.status_json(&repo)["engine"].clone(),
        "proxy_rtt_p50_ms": p50,
        "proxy_rtt_p99_ms": p99,
        "tunnel_rtt_p50_ms": t50,
        "tunnel_rtt_p99_ms": t99,
        "proxy_added_p50_ms": p50 - t50,
        "proxy_added_p99_ms": p99 - t99,
        "in_guest_rtt_mean_ms": in_guest,
        "rps_proxy": rps_proxy,
        "rps_tunnel": rps_tunnel,
        "rps_clients": CLIENTS,
        "response_bytes": 64,
        "round_trips": ROUND_TRIPS,
    });
    report.as_object_mut().unwrap().extend(attach);
    println!("{report}");
}

/// The attach figures (see the module's overview).
fn attach_figures(env: &Env, repo: &Path) -> serde_json::Map<String, serde_json::Value> {
    let out = env.run(
        &[
            "exec",
            "--",
            "zellij",
            "attach",
            "--create-background",
            "plat-main",
        ],
        repo,
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    attach_ms(env, repo, "plat-main");
    let (first, drawn): (Vec<f64>, Vec<f64>) =
        (0..10).map(|_| attach_ms(env, repo, "plat-main")).unzip();
    let cli_ms = |args: &[&str]| {
        let times: Vec<f64> = (0..5)
            .map(|_| {
                let t = Instant::now();
                let out = env.command(args, repo).output().unwrap();
                assert_eq!(out.status.code(), Some(0), "{}", text(&out));
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        percentile(times, 0.5)
    };
    let mut m = serde_json::Map::new();
    m.insert(
        "attach_first_bytes_median_ms".into(),
        percentile(first, 0.5).into(),
    );
    m.insert(
        "attach_session_drawn_median_ms".into(),
        percentile(drawn, 0.5).into(),
    );
    m.insert(
        "exec_true_median_ms".into(),
        cli_ms(&["exec", "--", "true"]).into(),
    );
    m.insert(
        "exec_zellij_version_median_ms".into(),
        cli_ms(&["exec", "--", "zellij", "--version"]).into(),
    );
    m
}

/// Runs `keystone agent attach` on a new pseudo-terminal and returns the
/// ms until its first output bytes and until Zellij has drawn `session`
/// (its name in the status bar), then kills it.
fn attach_ms(env: &Env, repo: &Path, session: &str) -> (f64, f64) {
    let drawn = env.attach_until_drawn(repo, session, Duration::from_secs(60));
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    (ms(drawn.first_output), ms(drawn.drawn))
}
