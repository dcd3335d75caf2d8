//! A project's devcontainer.json on a real guest (engine qemu): a file
//! with comments and trailing commas that uses each key the sandbox
//! applies, and some it refuses or cannot map.
//! - `start` names the file, the refused `image`, the unknown feature and
//!   the failed `onCreateCommand` entry;
//! - `onCreateCommand` (object form, side by side) and
//!   `updateContentCommand` (string form) ran before start returned, with
//!   the file's environment; `postCreateCommand` and `postStartCommand`
//!   (array form) run after it;
//! - `exec` runs as `remoteUser` with `containerEnv` and `remoteEnv`;
//! - `status --json` reports the ports, labels, features and each
//!   command's outcome, and `status` shows them;
//! - a second start runs `postStartCommand` only;
//! - `attach` runs `postAttachCommand`.
//!
//! Skips (printing `SKIP: <reason>`) without /dev/kvm, qemu-system-x86_64
//! or a guest kernel and rootfs.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

const DEVCONTAINER: &str = r#"// The sandbox has its own image: "image" is refused.
{
  "name": "demo",
  "image": "mcr.microsoft.com/devcontainers/base:bookworm",
  "containerEnv": { "FROM_CONTAINER": "c", "SHARED": "container" },
  "remoteEnv": { "SHARED": "remote", "WS": "${containerWorkspaceFolder}", },
  "remoteUser": "root",
  /* Named commands run side by side; "c" fails. */
  "onCreateCommand": {
    "a": "echo a >> /var/tmp/dc-oncreate",
    "b": ["sh", "-c", "echo b >> /var/tmp/dc-oncreate"],
    "c": "exit 7",
  },
  "updateContentCommand": "echo \"$SHARED $(id -un)\" > /var/tmp/dc-update",
  "postCreateCommand": "echo created >> /var/tmp/dc-created",
  "postStartCommand": ["sh", "-c", "echo started >> /var/tmp/dc-started"],
  "postAttachCommand": "echo attached >> /var/tmp/dc-attached",
  "forwardPorts": [8000],
  "portsAttributes": { "8000": { "label": "web" }, "9000-9009": { "label": "workers" } },
  "features": {
    "ghcr.io/devcontainers/features/git:1": {},
    "ghcr.io/example/unknown-feature:1": {},
  },
}
"#;

/// `sh -c SCRIPT` in the sandbox; its stdout.
fn guest_sh(env: &Env, repo: &Path, script: &str) -> String {
    let out = env.run(&["exec", "--", "sh", "-c", script], repo);
    assert_eq!(out.status.code(), Some(0), "{script}: {}", text(&out));
    stdout(&out)
}

/// Waits until every lifecycle command in `status --json` has ended.
fn wait_commands_ended(env: &Env, repo: &Path) -> serde_json::Value {
    let t = Instant::now();
    loop {
        let status = env.status_json(repo);
        let commands = status["devcontainer"]["commands"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let busy = commands
            .iter()
            .any(|c| matches!(c["outcome"]["state"].as_str(), Some("waiting" | "running")));
        if !busy {
            return status;
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "the commands did not end: {status}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn outcome(status: &serde_json::Value, hook: &str, name: Option<&str>) -> String {
    let commands = status["devcontainer"]["commands"].as_array().unwrap();
    let c = commands
        .iter()
        .find(|c| c["hook"] == hook && c["name"].as_str() == name)
        .unwrap_or_else(|| panic!("no {hook} {name:?} in {status}"));
    c["outcome"]["state"].as_str().unwrap().to_string()
}

#[test]
fn devcontainer_json_is_applied_on_a_real_guest() {
    let Some(env) = setup("devcontainer", "devc") else {
        return;
    };
    let repo = env.path("proj");
    std::fs::create_dir_all(repo.join(".devcontainer")).unwrap();
    std::fs::write(repo.join(".devcontainer/devcontainer.json"), DEVCONTAINER).unwrap();

    let out = env.start(&repo, &[]);
    let started = stdout(&out);
    for want in [
        "devcontainer: applying .devcontainer/devcontainer.json",
        "image",
        "feature ghcr.io/example/unknown-feature:1 is not installed",
        "onCreateCommand `c` failed: exit code 7",
        "postCreateCommand then postStartCommand run in the background",
    ] {
        assert!(
            started.contains(want),
            "start should say {want:?}: {started}"
        );
    }

    // Before start returned: the create commands, with the environment,
    // as remoteUser.
    let mut oncreate: Vec<String> = guest_sh(&env, &repo, "cat /var/tmp/dc-oncreate")
        .lines()
        .map(str::to_string)
        .collect();
    oncreate.sort();
    assert_eq!(oncreate, ["a", "b"]);
    assert_eq!(
        guest_sh(&env, &repo, "cat /var/tmp/dc-update").trim(),
        "remote root"
    );

    // Sessions and commands: remoteUser, containerEnv and remoteEnv.
    assert_eq!(guest_sh(&env, &repo, "id -un").trim(), "root");
    assert_eq!(
        guest_sh(&env, &repo, "echo \"$FROM_CONTAINER $SHARED $WS\"").trim(),
        "c remote /workspace"
    );

    // After start: postCreateCommand, then postStartCommand.
    let status = wait_commands_ended(&env, &repo);
    assert_eq!(
        guest_sh(&env, &repo, "cat /var/tmp/dc-created").trim(),
        "created"
    );
    assert_eq!(
        guest_sh(&env, &repo, "cat /var/tmp/dc-started").trim(),
        "started"
    );
    let d = &status["devcontainer"];
    assert_eq!(d["source"], ".devcontainer/devcontainer.json", "{status}");
    assert_eq!(d["user"], "root");
    assert_eq!(d["primary_port"], 8000);
    assert_eq!(d["ports"][0]["port"], 8000);
    assert_eq!(d["ports"][0]["label"], "web");
    assert_eq!(d["port_labels"][0]["label"], "workers");
    assert_eq!(d["env"]["SHARED"], "remote");
    let features = d["features"].as_array().unwrap();
    assert_eq!(features.len(), 2, "{status}");
    assert!(features
        .iter()
        .any(|f| f["id"] == "ghcr.io/devcontainers/features/git:1" && f["kind"] == "provided"));
    assert!(features
        .iter()
        .any(|f| f["id"] == "ghcr.io/example/unknown-feature:1" && f["kind"] == "unsupported"));
    assert!(
        d["refused"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r.as_str().unwrap().contains("image")),
        "{status}"
    );
    assert_eq!(outcome(&status, "onCreateCommand", Some("a")), "succeeded");
    assert_eq!(outcome(&status, "onCreateCommand", Some("c")), "failed");
    assert_eq!(outcome(&status, "updateContentCommand", None), "succeeded");
    assert_eq!(outcome(&status, "postCreateCommand", None), "succeeded");
    assert_eq!(outcome(&status, "postStartCommand", None), "succeeded");
    let human = stdout(&env.run(&["status"], &repo));
    assert!(
        human.contains("Devcontainer: .devcontainer/devcontainer.json")
            && human.contains("ports 8000 (web)")
            && human.contains("onCreateCommand `c`: failed: exit code 7"),
        "{human}"
    );
    let log = std::fs::read_to_string(
        Path::new(status["dir"].as_str().unwrap()).join("logs/devcontainer.log"),
    )
    .unwrap();
    assert!(log.contains("== postStartCommand"), "{log}");

    // A second start: postStartCommand only.
    let out = env.run(&["stop"], &repo);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    env.start(&repo, &[]);
    let status = wait_commands_ended(&env, &repo);
    assert_eq!(outcome(&status, "onCreateCommand", Some("a")), "skipped");
    assert_eq!(outcome(&status, "postCreateCommand", None), "skipped");
    assert_eq!(outcome(&status, "postStartCommand", None), "succeeded");
    assert_eq!(
        guest_sh(
            &env,
            &repo,
            "cat /var/tmp/dc-oncreate /var/tmp/dc-created | wc -l"
        )
        .trim(),
        "3"
    );
    assert_eq!(
        guest_sh(&env, &repo, "cat /var/tmp/dc-started | wc -l").trim(),
        "2"
    );

    // attach: postAttachCommand.
    let (_master, mut attach) = env.spawn_on_pty(&["attach"], &repo);
    let t = Instant::now();
    let attached = loop {
        let out = env.run(&["exec", "--", "cat", "/var/tmp/dc-attached"], &repo);
        // The shell creates the file before it writes the line.
        if out.status.success() && stdout(&out).contains('\n') {
            break stdout(&out);
        }
        if t.elapsed() > Duration::from_secs(60) {
            break String::new();
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let _ = attach.kill();
    let _ = attach.wait();
    assert_eq!(
        attached.trim(),
        "attached",
        "postAttachCommand ran on attach"
    );
}
