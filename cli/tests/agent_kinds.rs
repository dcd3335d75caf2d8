//! `start --agent claude` on a real guest (engine qemu): Claude Code is
//! installed in the sandbox through the sandbox's own proxy (so the host's
//! network policy applies), answers `--version`, and the agent user's
//! settings turn permission prompts off; a second start finds it
//! installed. `--agent gemini` says why it cannot be made ready.
//!
//! The download comes from registry.npmjs.org: where the host cannot reach
//! it, the install steps print `SKIP:` and only the refusal is checked.
//! Skips (printing `SKIP: <reason>`) without /dev/kvm, qemu-system-x86_64
//! or a guest kernel and rootfs.

mod common;

use std::net::ToSocketAddrs;
use std::time::Duration;

use common::*;

fn registry_reachable() -> bool {
    ("registry.npmjs.org", 443)
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .is_some_and(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_secs(5)).is_ok())
}

/// `start --agent claude`, which must succeed and say Claude Code is ready.
fn start_with_claude(env: &Env, repo: &std::path::Path) {
    let out = env.run(&["start", "--no-attach", "--agent", "claude"], repo);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        stdout(&out).contains("Claude Code is ready ("),
        "{}",
        text(&out)
    );
}

#[test]
fn the_coding_agent_is_made_ready() {
    let _one = ONE_GUEST_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let Some(env) = setup("kinds", "kinds") else {
        return;
    };
    let repo = env.path("proj");

    let out = env.start(&repo, &["--agent", "gemini"]);
    assert!(
        stdout(&out).contains("warning: Gemini CLI needs Node.js 20"),
        "{}",
        text(&out)
    );
    let out = env.run(&["stop"], &repo);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));

    if !registry_reachable() {
        eprintln!(
            "SKIP: installing Claude Code: registry.npmjs.org is not reachable from this host"
        );
        return;
    }
    start_with_claude(&env, &repo);
    let out = env.run(&["exec", "--", "claude", "--version"], &repo);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(stdout(&out).contains("Claude Code"), "{}", text(&out));
    let out_home = env.run(
        &[
            "exec",
            "--",
            "sh",
            "-c",
            "cat ~/.claude/settings.json; stat -c %U ~/.claude/settings.json",
        ],
        &repo,
    );
    let settings = stdout(&out_home);
    assert!(
        settings.contains("\"defaultMode\": \"bypassPermissions\""),
        "{settings}"
    );
    assert!(
        settings.trim_end().ends_with("agent"),
        "owned by the agent user: {settings}"
    );

    // Installed once: a second start finds it (no download).
    let out = env.run(&["stop"], &repo);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let t = std::time::Instant::now();
    start_with_claude(&env, &repo);
    eprintln!("second start with --agent claude: {:.1?}", t.elapsed());
}
