//! `open-vscode` on a real guest (engine qemu): the sandbox becomes the
//! ssh host `keystone-<name>` that VS Code's Remote-SSH connects to, with
//! no sshd service and no network in the guest. Checked with the host's
//! own OpenSSH client, as Remote-SSH uses it: a command runs as the agent
//! user, a file copied with scp (the SFTP subsystem) lands in the
//! workspace, the host key stays the same from one connection to the
//! next, the user's ssh config gets its `Include` line once, and the host
//! entry goes away with the sandbox.
//!
//! Skips (printing `SKIP: <reason>`) without /dev/kvm, qemu-system-x86_64,
//! a guest kernel and rootfs, or the OpenSSH client.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::*;
use keystone_test_kit::skip;

fn ssh_tool(tool: &str, config: &Path, args: &[&str]) -> Output {
    let out = Command::new(tool)
        .arg("-F")
        .arg(config)
        .args(["-o", "BatchMode=yes", "-o", "ConnectTimeout=60"])
        .args(args)
        .output()
        .unwrap();
    eprintln!("{tool} {} -> {:?}", args.join(" "), out.status.code());
    out
}

#[test]
fn vscode_reaches_the_sandbox_over_ssh() {
    if Command::new("ssh").arg("-V").output().is_err() {
        skip!("the OpenSSH client is not installed (apt-get install openssh-client)");
    }
    let Some(env) = setup("vscode", "vscode") else {
        return;
    };
    let repo = env.path("proj");
    let home = env.path("home");
    std::fs::create_dir_all(&home).unwrap();
    let open_vscode = |extra: &[&str]| {
        let mut args = vec!["open-vscode"];
        args.extend_from_slice(extra);
        let out = env
            .command(&args, &repo)
            .env("HOME", &home)
            .output()
            .unwrap();
        eprintln!(
            "keystone agent {} -> {:?}",
            args.join(" "),
            out.status.code()
        );
        out
    };

    // No sandbox yet: exit 1, and nothing written.
    let out = open_vscode(&["--print"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(!home.join(".ssh").exists());

    env.start(&repo, &[]);

    let out = open_vscode(&["--print"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(
        stdout(&out),
        "code --remote ssh-remote+keystone-vscode /workspace\n",
        "{}",
        text(&out)
    );
    let user_config = home.join(".ssh/config");
    let include = format!(
        "Include {}",
        env.path("state/keystone/sandboxes/*/ssh/config").display()
    );
    let config_text = std::fs::read_to_string(&user_config).unwrap();
    assert_eq!(config_text.matches(&include).count(), 1, "{config_text}");

    // The host's ssh client, through the user's config, as VS Code does.
    let out = ssh_tool(
        "ssh",
        &user_config,
        &[
            "keystone-vscode",
            "whoami; pwd; cat /workspace/README; test -d /workspace/.git && echo repo",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(stdout(&out), "agent\n/home/agent\nhello\nrepo\n");

    // A file copied in with scp (SFTP, as Remote-SSH copies its server).
    let local = env.path("to-guest.txt");
    std::fs::write(&local, "copied over ssh\n").unwrap();
    let out = ssh_tool(
        "scp",
        &user_config,
        &[local.to_str().unwrap(), "keystone-vscode:/workspace/"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let out = env.run(&["exec", "--", "cat", "/workspace/to-guest.txt"], &repo);
    assert_eq!(stdout(&out), "copied over ssh\n", "{}", text(&out));

    // The sandbox's host key was pinned once and is the same now.
    let known = env.path("state/keystone/sandboxes/vscode/ssh/known_hosts");
    let pinned = std::fs::read_to_string(&known).unwrap();
    assert_eq!(pinned.lines().count(), 1, "{pinned}");
    assert!(
        pinned.starts_with("keystone-vscode ssh-ed25519 "),
        "{pinned}"
    );
    let out = ssh_tool(
        "ssh",
        &user_config,
        &["-o", "StrictHostKeyChecking=yes", "keystone-vscode", "true"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));

    // Again: the same entry, no second Include, and JSON for scripts.
    let out = open_vscode(&["--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let json: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(json["ssh_host"], "keystone-vscode");
    assert_eq!(json["folder"], "/workspace");
    assert_eq!(json["command"][2], "ssh-remote+keystone-vscode");
    let config_text = std::fs::read_to_string(&user_config).unwrap();
    assert_eq!(config_text.matches(&include).count(), 1, "{config_text}");

    // Stopped: the connection fails and says why.
    let out = env.run(&["stop"], &repo);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let out = ssh_tool("ssh", &user_config, &["keystone-vscode", "true"]);
    assert_ne!(out.status.code(), Some(0));
    assert!(stderr(&out).contains("not running"), "{}", text(&out));

    // Destroyed: the host entry is gone with the sandbox.
    let out = env.run(&["destroy", "--force", env.name], &repo);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(!env.path("state/keystone/sandboxes/vscode/ssh").exists());
    let out = ssh_tool("ssh", &user_config, &["-G", "keystone-vscode"]);
    assert!(
        !stdout(&out).contains("proxycommand"),
        "the entry outlived the sandbox: {}",
        text(&out)
    );
}
