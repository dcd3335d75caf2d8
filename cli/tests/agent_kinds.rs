//! The coding agents in the guest image, on a real guest (engine qemu). In
//! a fresh sandbox started with `--network none` (so nothing can be
//! downloaded at start):
//! - `claude`, `codex` and `gemini` answer `--version` as the agent user,
//!   at the versions `guest-image/rootfs/agents.lock` pins;
//! - each agent's settings turn permission prompts off and belong to the
//!   agent user;
//! - `status` (human and `--json`) reports the versions, from the host;
//! - `attach` opens the Zellij session with the agent running in the first
//!   pane and a shell in the second, in /workspace, with a configuration
//!   that shows no release notes or tips;
//! - a later `start --agent gemini` switches the session's agent, and it
//!   sticks.
//!
//! Skips (printing `SKIP: <reason>`) without /dev/kvm, qemu-system-x86_64
//! or a guest kernel and rootfs.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

/// The pinned versions users know (`codex` without its `-linux-x64`).
fn pinned() -> Vec<(String, String)> {
    guest_image::agents::read_lock(&guest_image::agents::lock_path())
        .unwrap()
        .into_iter()
        .filter(|p| ["claude", "codex", "gemini"].contains(&p.name.as_str()))
        .map(|p| (p.name.clone(), p.release().to_string()))
        .collect()
}

/// `sh -c SCRIPT` in the sandbox as the agent user; its stdout.
fn guest_sh(env: &Env, repo: &Path, script: &str) -> String {
    let out = env.run(&["exec", "--", "sh", "-c", script], repo);
    assert_eq!(out.status.code(), Some(0), "{script}: {}", text(&out));
    stdout(&out)
}

/// `keystone agent attach` on a pseudo-terminal until the session
/// `session` is drawn; then the client is ended (the session lives on).
fn attach_until_drawn(env: &Env, repo: &Path, session: &str) {
    let drawn = env.attach_until_drawn(repo, session, Duration::from_secs(180));
    eprintln!("attach drew {session} in {:.1?}", drawn.drawn);
}

/// The layout of the running session `session`, as Zellij dumps it.
fn session_layout(env: &Env, repo: &Path, session: &str) -> String {
    // A session whose client has just gone may answer with an empty
    // layout for a moment while its server settles: ask again.
    let t = Instant::now();
    loop {
        let out = env.run(
            &[
                "exec",
                "--",
                "zellij",
                "-s",
                session,
                "action",
                "dump-layout",
            ],
            repo,
        );
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
        let layout = stdout(&out);
        if !layout.trim().is_empty() || t.elapsed() > Duration::from_secs(30) {
            return layout;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn the_coding_agents_are_in_the_image_and_ready() {
    let Some(env) = setup("kinds", "kinds") else {
        return;
    };
    let repo = env.path("proj");
    let pinned = pinned();
    assert_eq!(pinned.len(), 3, "{pinned:?}");

    let out = env.start(&repo, &["--network", "none"]);
    let started = stdout(&out);
    assert!(
        started.contains("coding agent: Claude Code ") && !started.contains("install"),
        "start names the session's agent and installs nothing: {started}"
    );

    // Each agent runs as the agent user, at its pinned version, offline.
    assert_eq!(guest_sh(&env, &repo, "id -un").trim(), "agent");
    for (name, version) in &pinned {
        let out = env.run(&["exec", "--", name, "--version"], &repo);
        assert_eq!(out.status.code(), Some(0), "{name}: {}", text(&out));
        assert!(
            stdout(&out).contains(version.as_str()),
            "{name} --version should say {version}: {}",
            text(&out)
        );
    }

    // The settings that turn the prompts off, owned by the agent user.
    let owners = guest_sh(
        &env,
        &repo,
        "cd && stat -c '%U %n' .claude/settings.json .claude.json .codex/config.toml \
         .gemini/settings.json .config/zellij/config.kdl",
    );
    assert_eq!(owners.lines().count(), 5, "{owners}");
    for line in owners.lines() {
        assert!(
            line.starts_with("agent "),
            "owned by the agent user: {line}"
        );
    }
    let claude: serde_json::Value =
        serde_json::from_str(&guest_sh(&env, &repo, "cat ~/.claude/settings.json")).unwrap();
    assert_eq!(claude["permissions"]["defaultMode"], "bypassPermissions");
    assert_eq!(claude["skipDangerousModePermissionPrompt"], true);
    let trust: serde_json::Value =
        serde_json::from_str(&guest_sh(&env, &repo, "cat ~/.claude.json")).unwrap();
    assert_eq!(
        trust["projects"]["/workspace"]["hasTrustDialogAccepted"],
        true
    );
    let codex: toml::Value = guest_sh(&env, &repo, "cat ~/.codex/config.toml")
        .parse()
        .unwrap();
    assert_eq!(codex["approval_policy"].as_str(), Some("never"));
    assert_eq!(codex["sandbox_mode"].as_str(), Some("danger-full-access"));
    assert_eq!(
        codex["projects"]["/workspace"]["trust_level"].as_str(),
        Some("trusted")
    );
    let gemini: serde_json::Value =
        serde_json::from_str(&guest_sh(&env, &repo, "cat ~/.gemini/settings.json")).unwrap();
    assert_eq!(gemini["general"]["defaultApprovalMode"], "auto_edit");
    assert_eq!(gemini["security"]["folderTrust"]["enabled"], false);
    // YOLO mode is a command-line option only: interactive shells add it.
    let wrapped = guest_sh(&env, &repo, "bash -ic 'type gemini' 2>/dev/null");
    assert!(wrapped.contains("--approval-mode=yolo"), "{wrapped}");

    // status: the versions from the host's record of the image.
    let status = env.status_json(&repo);
    assert_eq!(status["agent"], "claude", "{status}");
    for (name, version) in &pinned {
        assert_eq!(status["agents"][name], version.as_str(), "{status}");
    }
    let human = stdout(&env.run(&["status"], &repo));
    assert!(
        human.contains(&format!("claude {}", pinned[0].1)),
        "{human}"
    );

    // attach: the agent in the first pane, a shell in the second, in
    // /workspace, under a configuration without pop-ups.
    attach_until_drawn(&env, &repo, "kinds-main");
    let layout = session_layout(&env, &repo, "kinds-main");
    assert!(layout.contains("cwd \"/workspace\""), "{layout}");
    assert!(layout.contains("command=\"claude\""), "{layout}");
    assert!(layout.contains("name=\"shell\""), "{layout}");
    for plugin in layout.lines().filter(|l| l.contains("plugin location=")) {
        assert!(
            plugin.contains("zellij:tab-bar") || plugin.contains("zellij:status-bar"),
            "no pop-up over the panes: {plugin}"
        );
    }
    guest_sh(&env, &repo, "pgrep -u agent -x claude");
    let config = guest_sh(
        &env,
        &repo,
        "zellij setup --check; cat ~/.config/zellij/config.kdl",
    );
    assert!(config.contains(".config/zellij"), "{config}");
    for option in ["show_release_notes false", "show_startup_tips false"] {
        assert!(
            config.lines().any(|l| l.trim() == option),
            "{option}: {config}"
        );
    }

    // --agent on a later start switches the session's agent, and sticks.
    let out = env.run(&["stop"], &repo);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let out = env.start(&repo, &["--agent", "gemini"]);
    assert!(
        stdout(&out).contains("coding agent: Gemini CLI "),
        "{}",
        text(&out)
    );
    attach_until_drawn(&env, &repo, "kinds-main");
    let layout = session_layout(&env, &repo, "kinds-main");
    // Zellij names the running program: node running the gemini script.
    assert!(layout.contains("tab name=\"gemini\""), "{layout}");
    assert!(
        layout.contains("\"/usr/local/bin/gemini\" \"--approval-mode=yolo\""),
        "{layout}"
    );
    let out = env.run(&["stop"], &repo);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    env.start(&repo, &[]);
    assert_eq!(env.status_json(&repo)["agent"], "gemini");
}
