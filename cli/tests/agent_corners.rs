//! The corners of the CLI contract a newcomer session does not reach, on
//! a real guest (engine qemu):
//! - `start PROJECT_PATH` from a folder outside the project;
//! - `status --all --json` lists the sandbox;
//! - `ssh` without a terminal: a login shell in /workspace, as the agent
//!   user, reading its commands from standard input;
//! - `stop --sync`: the guest's commit reaches the host as it stops;
//! - `start --fresh`: the root layer is discarded, /workspace and a commit
//!   not synced yet are kept;
//! - `destroy` answered "y" on a terminal removes the sandbox.
//!
//! Skips (printing `SKIP: <reason>`) without /dev/kvm, qemu-system-x86_64
//! or a guest kernel and rootfs.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::Stdio;

use common::*;

const NAME: &str = "corner";

fn ok(env: &Env, args: &[&str], dir: &Path) -> String {
    let out = env.run(args, dir);
    assert_eq!(out.status.code(), Some(0), "{args:?}: {}", text(&out));
    stdout(&out)
}

/// `start PROJECT --name corner --no-attach` with 1 GiB and one vCPU,
/// plus `extra`, run from `dir`; its output.
fn start(env: &Env, project: &Path, dir: &Path, extra: &[&str]) -> String {
    let project = project.to_str().unwrap();
    let mut args = vec![
        "start",
        project,
        "--name",
        NAME,
        "--no-attach",
        "--memory",
        "1024",
        "--vcpus",
        "1",
    ];
    args.extend_from_slice(extra);
    ok(env, &args, dir)
}

/// `exec --user root -- ARGV` in the sandbox, which must exit 0.
fn as_root(env: &Env, dir: &Path, argv: &[&str]) -> String {
    let mut args = vec!["exec", NAME, "--user", "root", "--"];
    args.extend_from_slice(argv);
    ok(env, &args, dir)
}

fn guest_sh(env: &Env, dir: &Path, script: &str) -> String {
    ok(env, &["exec", NAME, "--", "sh", "-c", script], dir)
}

#[test]
fn the_seeds_corners_on_a_real_guest() {
    let Some(env) = setup("corners", NAME) else {
        return;
    };
    let repo = env.path("proj");
    let elsewhere = env.path("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();

    // start PROJECT_PATH, from outside the project.
    start(&env, &repo, &elsewhere, &[]);

    // status --all: every sandbox, as a JSON array.
    let all: serde_json::Value =
        serde_json::from_str(&ok(&env, &["status", "--all", "--json"], &elsewhere)).unwrap();
    let listed = all.as_array().expect("an array");
    assert_eq!(listed.len(), 1, "{all}");
    assert_eq!(listed[0]["name"], NAME);
    assert_eq!(listed[0]["state"], "running");
    let recorded = Path::new(listed[0]["project"].as_str().unwrap());
    assert_eq!(
        recorded.canonicalize().unwrap(),
        repo.canonicalize().unwrap()
    );

    // ssh without a terminal: commands from standard input.
    let mut ssh = env
        .command(&["ssh", NAME], &elsewhere)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    ssh.stdin
        .take()
        .unwrap()
        .write_all(b"pwd; whoami; git log --oneline | wc -l\nexit 7\n")
        .unwrap();
    let out = ssh.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(7), "{}", text(&out));
    assert_eq!(stdout(&out), "/workspace\nagent\n1\n", "{}", text(&out));

    // stop --sync: the guest's commit reaches the host.
    guest_sh(
        &env,
        &elsewhere,
        "echo kept > kept && git add kept && git -c user.name=a -c user.email=a@b commit -qm synced-on-stop",
    );
    as_root(
        &env,
        &elsewhere,
        &["sh", "-c", "echo x > /etc/corner-root-layer"],
    );
    ok(&env, &["stop", NAME, "--sync"], &elsewhere);
    assert!(
        git(&repo, &["log", "--oneline"]).contains("synced-on-stop"),
        "{}",
        git(&repo, &["log", "--oneline"])
    );

    // start --fresh: the root layer goes, the workspace stays.
    start(&env, &repo, &elsewhere, &[]);
    guest_sh(
        &env,
        &elsewhere,
        "git -c user.name=a -c user.email=a@b commit -q --allow-empty -m not-synced-yet",
    );
    as_root(&env, &elsewhere, &["test", "-e", "/etc/corner-root-layer"]);
    ok(&env, &["stop", NAME], &elsewhere);
    let out = start(&env, &repo, &elsewhere, &["--fresh"]);
    assert!(out.contains("/workspace and its commits are kept"), "{out}");
    let out = env.run(
        &["exec", NAME, "--", "test", "-e", "/etc/corner-root-layer"],
        &elsewhere,
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "the root layer is gone: {}",
        text(&out)
    );
    assert!(
        guest_sh(&env, &elsewhere, "git log --oneline").contains("not-synced-yet"),
        "the workspace's commits are kept"
    );

    // destroy, answered "y" on a terminal.
    ok(&env, &["stop", NAME], &elsewhere);
    let out = env.run_on_pty(&["destroy", NAME], &elsewhere, "y\n");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let listed: serde_json::Value =
        serde_json::from_str(&ok(&env, &["list", "--json"], &elsewhere)).unwrap();
    assert_eq!(listed, serde_json::json!([]));
    assert!(!env
        .path(&format!("state/keystone/sandboxes/{NAME}"))
        .exists());
}
