//! The proxy process without a guest: started by a command, its pages
//! for a stopped and an unknown sandbox, one per state folder, a new port
//! from the configuration, a port another program holds, and its end once
//! its state folder is removed.

use std::net::TcpListener;
use std::time::{Duration, Instant};

use crate::common::{stdout, text};
use crate::web::http_get;
use crate::{free_port, host_listens, set_proxy_port};

/// The binary with its XDG folders in a temporary root, and no guest.
struct Host {
    root: std::path::PathBuf,
}

impl Host {
    fn new(tag: &str) -> Self {
        let root = std::env::temp_dir().join(format!("ks-proxy-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("config/keystone")).unwrap();
        std::fs::create_dir_all(root.join("state/keystone/sandboxes/idle")).unwrap();
        Self { root }
    }

    fn run(&self, args: &[&str]) -> std::process::Output {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_keystone"));
        cmd.arg("agent").args(args);
        for (key, _) in std::env::vars() {
            if key.starts_with("KEYSTONE_") || key.starts_with("XDG_") {
                cmd.env_remove(key);
            }
        }
        cmd.env("HOME", &self.root)
            .env("KEYSTONE_SYSTEM_CONFIG", self.root.join("none.toml"))
            .env("XDG_CONFIG_HOME", self.root.join("config"))
            .env("XDG_STATE_HOME", self.root.join("state"))
            .current_dir(&self.root)
            .output()
            .unwrap()
    }

    /// Registers a stopped sandbox `idle`, as `start` leaves one.
    fn register_stopped(&self) {
        let store = self.root.join("state/keystone");
        let registry = serde_json::json!({"version": 1, "sandboxes": {"idle": {
            "project": "/nonexistent/idle", "created_at": "2026-01-01T00:00:00Z"}}});
        std::fs::write(store.join("sandboxes.json"), registry.to_string()).unwrap();
        std::fs::write(
            store.join("sandboxes/idle/state.json"),
            r#"{"state": "stopped"}"#,
        )
        .unwrap();
    }

    fn proxy_pid(&self) -> i32 {
        let info = std::fs::read(self.root.join("state/keystone/proxy.json")).unwrap();
        let info: serde_json::Value = serde_json::from_slice(&info).unwrap();
        info["pid"].as_i64().unwrap() as i32
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit_once(')')
            .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
    })
}

#[test]
fn a_command_starts_the_proxy_which_pages_stopped_and_unknown_sandboxes() {
    let host = Host::new("pages");
    let p = free_port();
    set_proxy_port(&host.root.join("config/keystone/agent.toml"), p);
    host.register_stopped();
    let out = host.run(&["list"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let pid = host.proxy_pid();
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    assert!(String::from_utf8_lossy(&cmdline).contains(&format!("__proxy\0{p}")));

    for host_header in ["idle.localhost", "3000.idle.localhost:80"] {
        let (code, head, body) = http_get(p, Some(host_header), "/");
        assert_eq!(code, 503, "{head}{body}");
        assert!(
            head.to_ascii_lowercase().contains("retry-after: 5"),
            "{head}"
        );
        assert!(
            body.contains("Sandbox <code>idle</code> is not running"),
            "{body}"
        );
        assert!(body.contains("keystone agent start idle"), "{body}");
    }
    let (code, _, body) = http_get(p, Some("other.localhost"), "/");
    assert_eq!(code, 404);
    assert!(body.contains("No sandbox is running"), "{body}");
    let (code, _, _) = http_get(p, None, "/");
    assert_eq!(code, 404);

    // Another command: the same proxy.
    assert_eq!(host.run(&["list"]).status.code(), Some(0));
    assert_eq!(host.proxy_pid(), pid);
    // A new port in the configuration: a new proxy there, the old one gone.
    let p2 = free_port();
    set_proxy_port(&host.root.join("config/keystone/agent.toml"), p2);
    assert_eq!(host.run(&["list"]).status.code(), Some(0));
    let pid2 = host.proxy_pid();
    assert_ne!(pid2, pid);
    assert_eq!(http_get(p2, Some("idle.localhost"), "/").0, 503);
    let t = Instant::now();
    while alive(pid) {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the old proxy still runs"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!host_listens(&format!("127.0.0.1:{p}")));

    // A port another program holds: a clear error, never another port.
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_port = taken.local_addr().unwrap().port();
    let other = Host::new("taken");
    let out = other.run(&["__proxy", &taken_port.to_string()]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let said = stdout(&out);
    assert!(
        said.starts_with("error: the dev-server proxy cannot listen on 127.0.0.1:"),
        "{said}"
    );
    assert!(said.contains("another program uses that port"), "{said}");
    assert!(said.contains("`[proxy] port`"), "{said}");

    // Its state folder removed, the proxy ends.
    std::fs::remove_dir_all(host.root.join("state")).unwrap();
    let t = Instant::now();
    while alive(pid2) {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the proxy outlived its state folder"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
