//! Nested virtualization on the QEMU engine, on a real guest: QEMU's TCG
//! emulates AMD SVM with nested paging (`-cpu max`), so a sandbox started
//! with `--nested` has `svm` in its CPU flags and a `/dev/kvm` that the
//! agent user (a member of `kvm`) can open; `keystone vm check`, copied
//! into the workspace, runs its self-test VM there as the agent user, many
//! times right after boot and again later, and every run must come back.
//! `status --json` reports what the engine set. `--no-nested` hides `svm`
//! and leaves no `/dev/kvm`.
//!
//! Skips (printing `SKIP: <reason>`) without /dev/kvm, qemu-system-x86_64
//! or a guest kernel and rootfs.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

const NAME: &str = "nested";

/// Self-test runs right after boot, and later.
const EARLY_RUNS: u32 = 25;
const LATER_RUNS: u32 = 25;

/// Puts a stripped copy of this build's `keystone` into the sandbox's
/// workspace (the host side of `/workspace`), owned by the agent user.
fn keystone_into_workspace(env: &Env) -> PathBuf {
    let ws = env.path(&format!("state/keystone/sandboxes/{NAME}/disk/workspace"));
    let dest = ws.join(".keystone-check");
    let out = Command::new("strip")
        .arg("-o")
        .arg(&dest)
        .arg(env!("CARGO_BIN_EXE_keystone"))
        .output()
        .expect("strip (binutils) runs");
    assert!(out.status.success(), "strip: {}", text(&out));
    let _ = Command::new("chown").arg("1000:1000").arg(&dest).status();
    dest
}

/// `keystone vm check --runs N --json` as the agent user in the guest.
fn check_in_guest(env: &Env, repo: &Path, runs: u32) -> serde_json::Value {
    let runs = runs.to_string();
    let out = env.run(
        &[
            "exec",
            "--",
            "/workspace/.keystone-check",
            "vm",
            "check",
            "--runs",
            &runs,
            "--timeout-ms",
            "30000",
            "--json",
        ],
        repo,
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("vm check gave no JSON ({e}): {}", text(&out)));
    eprintln!("vm check in the guest: {v}");
    v
}

fn guest_stdout(env: &Env, repo: &Path, script: &str) -> String {
    let out = env.run(&["exec", "--", "sh", "-c", script], repo);
    stdout(&out)
}

#[test]
fn a_nested_sandbox_runs_vms_as_the_agent_user() {
    let Some(env) = setup("nested", NAME) else {
        return;
    };
    let repo = env.path("proj");
    // Two vCPUs: the agent's VMs must work whichever vCPU runs them.
    let started = env.run(
        &[
            "start",
            "--name",
            NAME,
            "--no-attach",
            "--memory",
            "1024",
            "--vcpus",
            "2",
            "--nested",
        ],
        &repo,
    );
    assert_eq!(started.status.code(), Some(0), "{}", text(&started));
    assert!(
        stdout(&started).contains("nested virtualization enabled: SVM emulated by QEMU's TCG"),
        "{}",
        text(&started)
    );
    keystone_into_workspace(&env);

    let v = check_in_guest(&env, &repo, EARLY_RUNS);
    assert_eq!(v["kvm"], "hardware", "{v}");
    assert_eq!(
        v["nested"], "SVM",
        "a VM in the sandbox could nest further: {v}"
    );
    assert_eq!(v["ok"], EARLY_RUNS, "every self-test VM came back: {v}");

    let status = env.status_json(&repo);
    assert_eq!(status["nested"], "enabled", "{status}");
    assert!(
        status["nested_detail"]
            .as_str()
            .is_some_and(|d| d.contains("TCG")),
        "{status}"
    );
    let flags = guest_stdout(&env, &repo, "grep -cw svm /proc/cpuinfo; id -nG");
    assert!(flags.starts_with('2'), "svm on both vCPUs: {flags}");
    assert!(
        flags.contains("kvm"),
        "the agent user is in the kvm group: {flags}"
    );

    // Later, after the guest has done other work.
    guest_stdout(
        &env,
        &repo,
        "git log --oneline >/dev/null; ls -R /usr/share/doc >/dev/null",
    );
    let v = check_in_guest(&env, &repo, LATER_RUNS);
    assert_eq!(v["ok"], LATER_RUNS, "every self-test VM came back: {v}");

    // --no-nested hides SVM; the setting is kept by the next start.
    let out = env.run(&["stop"], &repo);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let started = env.start(&repo, &["--no-nested"]);
    assert!(
        stdout(&started).contains("nested virtualization disabled"),
        "{}",
        text(&started)
    );
    let flags = guest_stdout(
        &env,
        &repo,
        "grep -cw -e svm -e vmx /proc/cpuinfo; test -e /dev/kvm && echo kvm-present || echo no-kvm",
    );
    assert_eq!(flags, "0\nno-kvm\n", "SVM hidden and no /dev/kvm: {flags}");
    let status = env.status_json(&repo);
    assert_eq!(status["nested"], "disabled", "{status}");
}
