//! `--sync-mode auto-commit` on a real guest (engine qemu): a commit made in
//! the guest reaches the host branch by fast-forward without anyone running
//! `keystone agent sync`; when the host branch has diverged, the sandbox's
//! commit is only fetched into `refs/remotes/sandbox-<NAME>/` and no merge
//! commit is ever made. The supervisor opens the watch connection; the
//! guest opens none.
//!
//! Skips (printing `SKIP: <reason>`) without /dev/kvm, qemu-system-x86_64
//! or a guest kernel and rootfs. The setup is `common::setup`, shared with
//! `agent_e2e.rs`.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{setup, text, Env};

const NAME: &str = "autosync";
/// How long a guest commit may take to show up on the host.
const SYNC_WAIT: Duration = Duration::from_secs(20);

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

/// The supervisor log once it contains `needle` (or after 10 s).
fn wait_for_log(env: &Env, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
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
    let out = Command::new("git")
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

    let out = env.run(&["stop", NAME], &repo);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let out = env.run(&["destroy", NAME, "--force"], &repo);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
}
