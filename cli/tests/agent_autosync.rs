//! `--sync-mode auto-commit` on a real guest (engine qemu): a commit made in
//! the guest reaches the host branch by fast-forward without anyone running
//! `keystone agent sync`; when the host branch has diverged, the sandbox's
//! commit is only fetched into `refs/remotes/sandbox-<NAME>/` and no merge
//! commit is ever made; a branch the host lacks is never created (not even
//! `origin/main`), and `sync --branch` takes it when the user names it. The
//! supervisor opens the watch connection; the guest opens none.
//!
//! `start` returns only once the watch is open, so a commit made the
//! moment it returns is synced; and a watch that opens catches up on
//! commits made before it (checked by starting in manual mode, committing,
//! and restarting in auto-commit). The race rounds repeat
//! `KEYSTONE_RACE_ROUNDS` times (3 unless set).
//!
//! Skips (printing `SKIP: <reason>`) without /dev/kvm, qemu-system-x86_64
//! or a guest kernel and rootfs. The setup is `common::setup`, shared with
//! `agent_e2e.rs`.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{setup, text, Env};

const NAME: &str = "autosync";
/// How long a guest commit may take to show up on the host (generous:
/// it is polled, and the time it took is printed).
const SYNC_WAIT: Duration = Duration::from_secs(120);

/// The supervisor log(s) under the temporary state folder.
fn supervisor_log(env: &Env) -> String {
    let mut text = String::new();
    let mut stack = vec![env.path("state")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let p = entry.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.file_name().is_some_and(|n| n == "supervisor.log") {
                text.push_str(&std::fs::read_to_string(&p).unwrap_or_default());
            }
        }
    }
    text
}

/// The supervisor log once it contains `needle` (or after 60 s).
fn wait_for_log(env: &Env, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let log = supervisor_log(env);
        if log.contains(needle) || Instant::now() > deadline {
            return log;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Host git with a committer identity; trimmed output.
fn git(dir: &Path, args: &[&str]) -> String {
    let mut all = vec!["-c", "user.name=t", "-c", "user.email=t@t"];
    all.extend_from_slice(args);
    common::git(dir, &all).trim().to_string()
}

/// `git rev-parse --verify` of `name`, or `None`.
fn rev(dir: &Path, name: &str) -> Option<String> {
    let out = keystone_test_kit::git()
        .args(["rev-parse", "--verify", "--quiet", name])
        .current_dir(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .output()
        .unwrap();
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Polls until `name` in the host repo is `want`; returns how long it took.
fn wait_for_ref(repo: &Path, name: &str, want: &str, env: &Env) -> Duration {
    let t = Instant::now();
    while t.elapsed() < SYNC_WAIT {
        if rev(repo, name).as_deref() == Some(want) {
            return t.elapsed();
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!(
        "{name} did not reach {want} within {SYNC_WAIT:?} (it is {:?}); supervisor log:\n{}",
        rev(repo, name),
        supervisor_log(env)
    );
}

/// Commits `file` in the guest's /workspace; returns the new head.
fn guest_commit(env: &Env, repo: &Path, file: &str, msg: &str) -> String {
    let script = format!(
        "echo {msg} > {file} && git add {file} && \
         git -c user.name=a -c user.email=a@b commit -qm {msg} && git rev-parse HEAD"
    );
    let out = env.run(&["exec", "--", "sh", "-c", &script], repo);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// How many start/commit rounds the race tests make.
fn race_rounds() -> usize {
    std::env::var("KEYSTONE_RACE_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
}

#[test]
fn a_commit_right_after_start_reaches_the_host() {
    let Some(env) = setup("autosync-race", "autosync-race") else {
        return;
    };
    let repo = env.path("proj");
    for round in 1..=race_rounds() {
        // The sandbox keeps its sync mode; naming it each time is harmless.
        let out = env.start(&repo, &["--sync-mode", "auto-commit"]);
        assert!(
            common::stdout(&out).contains("auto-sync watch"),
            "start names the watch among the services it waited for: {}",
            text(&out)
        );
        // No pause: the commit is the first thing after start returns.
        let head = guest_commit(&env, &repo, &format!("r{round}"), &format!("round{round}"));
        let took = wait_for_ref(&repo, "refs/heads/main", &head, &env);
        eprintln!(
            "round {round}: the commit made right after start reached the host in {took:.2?}"
        );
        let out = env.run(&["stop", env.name], &repo);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    }
}

#[test]
fn a_watch_that_opens_catches_up_on_earlier_commits() {
    let Some(env) = setup("autosync-catchup", "autosync-catchup") else {
        return;
    };
    let repo = env.path("proj");
    // In manual mode nothing is synced by itself.
    env.start(&repo, &[]);
    let head = guest_commit(&env, &repo, "early", "early");
    std::thread::sleep(Duration::from_secs(2));
    assert_ne!(
        rev(&repo, "refs/heads/main").as_deref(),
        Some(head.as_str())
    );
    let out = env.run(&["stop", env.name], &repo);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    // The watch that opens now finds the commit ahead of the host.
    env.start(&repo, &["--sync-mode", "auto-commit"]);
    let took = wait_for_ref(&repo, "refs/heads/main", &head, &env);
    eprintln!("the earlier commit reached the host {took:.2?} after start returned");
    assert_eq!(
        std::fs::read_to_string(repo.join("early")).unwrap(),
        "early\n"
    );
}

#[test]
fn auto_commit_fast_forwards_the_host_and_never_merges() {
    let Some(env) = setup("autosync", NAME) else {
        return;
    };
    let repo = env.path("proj");
    env.start(&repo, &["--sync-mode", "auto-commit"]);

    // A guest commit reaches the checked-out host branch by itself.
    let head = guest_commit(&env, &repo, "f", "guest1");
    let took = wait_for_ref(&repo, "refs/heads/main", &head, &env);
    eprintln!("auto-commit: the guest commit reached the host in {took:.2?}");
    assert_eq!(
        std::fs::read_to_string(repo.join("f")).unwrap(),
        "guest1\n",
        "the host checkout was fast-forwarded"
    );
    // The supervisor logs the fast-forward right after making it.
    let log = wait_for_log(&env, "fast-forward");
    assert!(log.contains("auto-sync: watching /workspace"), "{log}");
    assert!(log.contains("fast-forward"), "{log}");

    // The host diverges: the next guest commit is fetched, not merged.
    std::fs::write(repo.join("host"), "h\n").unwrap();
    git(&repo, &["add", "host"]);
    git(&repo, &["commit", "-qm", "host"]);
    let host_head = rev(&repo, "HEAD").unwrap();
    let head = guest_commit(&env, &repo, "g", "guest2");
    wait_for_ref(
        &repo,
        &format!("refs/remotes/sandbox-{NAME}/main"),
        &head,
        &env,
    );
    // Give a wrong merge a chance to happen before looking.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(rev(&repo, "HEAD").as_deref(), Some(host_head.as_str()));
    assert_eq!(git(&repo, &["log", "--merges", "--oneline"]), "");
    assert!(!repo.join("g").exists());
    let log = wait_for_log(&env, "have diverged");
    assert!(log.contains("have diverged; no merge was made"), "{log}");
    eprintln!("supervisor log:\n{log}");

    // Branches the host lacks are fetched, never created: not `feature`,
    // and not `origin/main`, which would hide the host's remote-tracking
    // branch of its remote `origin`.
    git(
        &repo,
        &["remote", "add", "origin", "https://example.invalid/r.git"],
    );
    let mut heads = Vec::new();
    for branch in ["origin/main", "feature"] {
        let script = format!(
            "git checkout -q -b {branch} && echo {branch} > b && git add b && \
             git -c user.name=a -c user.email=a@b commit -qm on-{branch} && git rev-parse HEAD"
        );
        let out = env.run(&["exec", "--", "sh", "-c", &script], &repo);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
        heads.push(String::from_utf8_lossy(&out.stdout).trim().to_string());
    }
    for (branch, head) in ["origin/main", "feature"].iter().zip(&heads) {
        let fetched = format!("refs/remotes/sandbox-{NAME}/{branch}");
        wait_for_ref(&repo, &fetched, head, &env);
    }
    let log = wait_for_log(&env, "creates no branch");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(rev(&repo, "refs/heads/origin/main"), None, "{log}");
    assert_eq!(rev(&repo, "refs/heads/feature"), None, "{log}");
    assert!(
        log.contains("`keystone agent sync autosync --branch feature` takes it"),
        "{log}"
    );
    // The user takes it by naming it.
    let out = env.run(&["sync", "--branch", "feature"], &repo);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(
        rev(&repo, "refs/heads/feature").as_deref(),
        Some(heads[1].as_str())
    );
    let out = env.run(&["sync", "--branch", "origin/main"], &repo);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert_eq!(rev(&repo, "refs/heads/origin/main"), None);

    let out = env.run(&["stop", NAME], &repo);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let out = env.run(&["destroy", NAME, "--force"], &repo);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
}
