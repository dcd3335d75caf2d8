//! `--network nat` on a real guest (engine qemu): the guest's programs
//! reach the outside through the guest agent's HTTP proxy, and the host
//! makes every connection after its policy allowed the target.
//!
//! "The outside" is a web server in a network namespace this test makes
//! (a veth pair, 10.213.N.0/30, `busybox httpd` on the far side), so the
//! host reaches it as it would a machine on its LAN; that needs root,
//! iproute2 and busybox, and without them those steps print `SKIP:` and
//! the rest runs. Checked: a plain HTTP GET and one through CONNECT reach
//! the server once `[network] allow` lists its block, and are refused
//! (HTTP 403, with the reason) before; the host's loopback, the host's own
//! address and the cloud metadata address are refused whatever the
//! configuration; `--network none` answers 503 saying so. Each refusal is
//! in the supervisor log.
//!
//! `start` returns only once the host offers connections: a request made
//! the moment it returns goes through (repeated `KEYSTONE_RACE_ROUNDS`
//! times, 3 unless set).
//!
//! Skips (printing `SKIP: <reason>`) without /dev/kvm, qemu-system-x86_64
//! or a guest kernel and rootfs.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use keystone_test_kit::skip;

/// A web server in its own network namespace, removed on drop.
struct Outside {
    ns: String,
    veth: String,
    server: std::process::Child,
    /// The server's address, `10.213.N.2`.
    address: String,
    /// The host's end of the link, `10.213.N.1`.
    host_end: String,
}

impl Outside {
    fn start(root: &Path) -> Result<Outside, String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("not root (network namespaces need it)".into());
        }
        if Command::new("busybox")
            .arg("httpd")
            .arg("--help")
            .output()
            .is_err()
        {
            return Err("busybox is not installed (apt-get install busybox-static)".into());
        }
        let n = std::process::id() % 250 + 1;
        let ns = format!("ks-net-{}", std::process::id());
        let veth = format!("ksn{n}h");
        let peer = format!("ksn{n}g");
        let (host_end, address) = (format!("10.213.{n}.1"), format!("10.213.{n}.2"));
        let ip = |args: &[&str]| -> Result<(), String> {
            let out = Command::new("ip")
                .args(args)
                .output()
                .map_err(|e| format!("ip: {e}"))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(format!(
                    "ip {}: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr).trim()
                ))
            }
        };
        let _ = ip(&["netns", "del", &ns]);
        let _ = ip(&["link", "del", &veth]);
        ip(&["netns", "add", &ns])?;
        let setup = (|| {
            ip(&["link", "add", &veth, "type", "veth", "peer", "name", &peer])?;
            ip(&["link", "set", &peer, "netns", &ns])?;
            ip(&["addr", "add", &format!("{host_end}/30"), "dev", &veth])?;
            ip(&["link", "set", &veth, "up"])?;
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{address}/30"),
                "dev",
                &peer,
            ])?;
            ip(&["-n", &ns, "link", "set", &peer, "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])
        })();
        if let Err(e) = setup {
            let _ = ip(&["link", "del", &veth]);
            let _ = ip(&["netns", "del", &ns]);
            return Err(e);
        }
        let www = root.join("www");
        std::fs::create_dir_all(&www).unwrap();
        std::fs::write(www.join("hello.txt"), "hello from outside\n").unwrap();
        let server = Command::new("ip")
            .args(["netns", "exec", &ns, "busybox", "httpd", "-f", "-p"])
            .arg(format!("{address}:8080"))
            .arg("-h")
            .arg(&www)
            .spawn()
            .map_err(|e| format!("busybox httpd: {e}"))?;
        let outside = Outside {
            ns,
            veth,
            server,
            address,
            host_end,
        };
        // Up once the host can fetch from it.
        let t = std::time::Instant::now();
        while std::net::TcpStream::connect((outside.address.as_str(), 8080)).is_err() {
            if t.elapsed() > std::time::Duration::from_secs(10) {
                return Err("the namespace's web server did not come up".into());
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        Ok(outside)
    }
}

impl Drop for Outside {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
        let _ = Command::new("ip")
            .args(["link", "del", &self.veth])
            .output();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
    }
}

/// `curl` in the guest; returns (HTTP status, body) as the program saw them.
fn guest_curl(env: &Env, repo: &Path, extra: &[&str], url: &str) -> (String, String) {
    let mut args = vec![
        "exec",
        "--",
        "sh",
        "-c",
        "curl -sS --max-time 60 -o /tmp/body -w '%{http_code}' \"$@\"; echo; cat /tmp/body",
        "curl",
    ];
    args.extend_from_slice(extra);
    args.push(url);
    let out = env.run(&args, repo);
    let text = stdout(&out);
    let (code, body) = text.split_once('\n').unwrap_or((text.as_str(), ""));
    (code.trim().to_string(), body.to_string())
}

/// The guest's CA bundle holds the certificate line `line` exactly once.
fn assert_in_bundle_once(env: &Env, repo: &Path, line: &str) {
    let bundle = "/etc/ssl/certs/ca-certificates.crt";
    let out = env.run(&["exec", "--", "grep", "-cxF", line, bundle], repo);
    assert_eq!(stdout(&out), "1\n", "{}", text(&out));
}

#[test]
fn outbound_connections_follow_the_hosts_policy() {
    let Some(env) = setup("network", "net") else {
        return;
    };
    let repo = env.path("proj");
    let outside = match Outside::start(&env.root) {
        Ok(o) => Some(o),
        Err(e) => {
            eprintln!("SKIP: the reachable-server steps: {e}");
            None
        }
    };

    let started = env.start(&repo, &[]);
    // The host's added certificate authorities are trusted in the guest
    // (once: a second start adds nothing).
    let host_cas: Vec<String> = std::fs::read_dir("/usr/local/share/ca-certificates")
        .map(|d| {
            d.flatten()
                .filter_map(|e| std::fs::read_to_string(e.path()).ok())
                .filter(|t| t.contains("-----BEGIN CERTIFICATE-----") && !t.contains("PRIVATE KEY"))
                .collect()
        })
        .unwrap_or_default();
    let ca_line = host_cas
        .first()
        .and_then(|t| t.lines().nth(1).map(str::to_string));
    match &ca_line {
        Some(line) => {
            assert!(
                stdout(&started).contains("trusts the host's"),
                "{}",
                text(&started)
            );
            assert_in_bundle_once(&env, &repo, line);
        }
        None => {
            eprintln!("SKIP: the host-CA step: no certificates in /usr/local/share/ca-certificates")
        }
    }
    let out = env.run(&["exec", "--", "sh", "-c", "echo $https_proxy"], &repo);
    assert_eq!(stdout(&out), "http://127.0.0.1:3128\n", "{}", text(&out));

    // Never: the host's loopback, the cloud metadata address, the host's
    // own addresses.
    let (code, body) = guest_curl(&env, &repo, &[], "http://169.254.169.254/latest/meta-data/");
    assert_eq!(code, "403", "{body}");
    assert!(body.contains("link-local"), "{body}");
    let (code, body) = guest_curl(&env, &repo, &[], "http://127.0.0.2:22/");
    assert_eq!(code, "403", "{body}");
    assert!(body.contains("loopback"), "{body}");

    if let Some(outside) = &outside {
        let url = format!("http://{}:8080/hello.txt", outside.address);
        // A private address: refused until the configuration allows it.
        let (code, body) = guest_curl(&env, &repo, &[], &url);
        assert_eq!(code, "403", "{body}");
        assert!(body.contains("[network] allow"), "{body}");
        let host_end_url = format!("http://{}:8080/hello.txt", outside.host_end);
        let refused_as_the_host = || {
            let (code, body) = guest_curl(&env, &repo, &[], &host_end_url);
            assert_eq!(code, "403", "{body}");
            assert!(body.contains("the host itself"), "{body}");
        };
        refused_as_the_host();

        let out = env.run(&["stop"], &repo);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
        let config = env.path("config/keystone/agent.toml");
        let mut toml = std::fs::read_to_string(&config).unwrap();
        toml.push_str("\n[network]\nallow = [\"10.213.0.0/16\"]\n");
        std::fs::write(&config, toml).unwrap();
        let out = env.run(&["start", "--no-attach"], &repo);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));

        let (code, body) = guest_curl(&env, &repo, &[], &url);
        assert_eq!(
            (code.as_str(), body.as_str()),
            ("200", "hello from outside\n")
        );
        if let Some(line) = &ca_line {
            assert_in_bundle_once(&env, &repo, line);
        }
        // The same through a CONNECT tunnel (how TLS goes).
        let (code, body) = guest_curl(&env, &repo, &["-p"], &url);
        assert_eq!(
            (code.as_str(), body.as_str()),
            ("200", "hello from outside\n")
        );
        // The host's own end of that link stays refused.
        refused_as_the_host();
    }

    let log = std::fs::read_to_string(env.path("state/keystone/sandboxes/net/logs/supervisor.log"))
        .unwrap_or_default();
    assert!(log.contains("egress refused: "), "{log}");

    // --network none: the proxy says there is no network.
    let out = env.run(&["stop"], &repo);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let out = env.run(&["start", "--no-attach", "--network", "none"], &repo);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let (code, body) = guest_curl(&env, &repo, &[], "http://93.184.216.34/");
    assert_eq!(code, "503", "{body}");
    assert!(body.contains("started with --network none"), "{body}");
    let status = env.status_json(&repo);
    assert_eq!(status["network"], "none", "{status}");
}

#[test]
fn a_request_right_after_start_goes_through() {
    let Some(env) = setup("network-race", "net-race") else {
        return;
    };
    let repo = env.path("proj");
    let outside = match Outside::start(&env.root) {
        Ok(o) => o,
        Err(e) => skip!("a request right after start: {e}"),
    };
    let config = env.path("config/keystone/agent.toml");
    let mut toml = std::fs::read_to_string(&config).unwrap();
    toml.push_str("\n[network]\nallow = [\"10.213.0.0/16\"]\n");
    std::fs::write(&config, toml).unwrap();
    let url = format!("http://{}:8080/hello.txt", outside.address);
    let rounds = std::env::var("KEYSTONE_RACE_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    for round in 1..=rounds {
        let started = env.start(&repo, &[]);
        assert!(
            stdout(&started).contains("network"),
            "start names the network among the services it waited for: {}",
            text(&started)
        );
        // No pause: the request is the first thing after start returns.
        let t = std::time::Instant::now();
        let (code, body) = guest_curl(&env, &repo, &[], &url);
        eprintln!(
            "round {round}: the request right after start took {:.2?}",
            t.elapsed()
        );
        assert_eq!(
            (code.as_str(), body.as_str()),
            ("200", "hello from outside\n"),
            "round {round}"
        );
        let out = env.run(&["stop"], &repo);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    }
}
