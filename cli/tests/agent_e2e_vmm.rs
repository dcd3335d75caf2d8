//! A newcomer's `keystone agent` session on our VMM (engine `vmm`, forced
//! by `[backend.microvm] engine = "vmm"` in the temporary `agent.toml`) on
//! a KVM with hardware semantics: start with 2 vCPUs and nested
//! virtualization, exec sees the project's commit, the agent user opens
//! the sandbox's hardware `/dev/kvm` and runs VMs of its own through it
//! (`keystone vm check`, copied into the workspace; see
//! [`NESTED_RUNS`]), a commit
//! in the guest, sync brings it to the host, `status --json` reports it
//! running on vmm with nesting enabled, stop, start again with
//! `--no-nested` (the commit is kept; `svm` is hidden), stop (the guest
//! agent's server never died on the way), destroy, and `list` is empty.
//! Each command's wall time is printed.
//!
//! Where this host's KVM is hardware the session runs here; on a kvm_pvm
//! host it runs inside the rig's L1 guest (`keystone_tests::rig`: QEMU TCG
//! with AMD SVM, whose kvm_amd is such a KVM). Every command has a
//! deadline; a command that passes it is killed and the test fails with
//! the tail of the sandbox's `logs/console.log`.
//!
//! Skips (printing `SKIP: <reason>`) when neither a hardware KVM nor the
//! rig is available, or there is no guest kernel and rootfs.

mod common;

use std::io::Read;
use std::path::PathBuf;
use std::process::{Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use keystone_test_kit::log_tail;

/// The sandbox's name.
const NAME: &str = "e2e-vmm";
/// The whole session (generous: in the rig every host-side step runs
/// under TCG).
const SESSION_LIMIT: Duration = Duration::from_secs(1200);
/// `start`, which waits for the guest agent and the services.
const START_LIMIT: Duration = Duration::from_secs(600);
/// Every other command.
const COMMAND_LIMIT: Duration = Duration::from_secs(480);
/// Self-test VM runs by the agent user inside the sandbox. In the rig
/// they run a third level deep: L1's kernel once crashed under them
/// (a stack guard page hit in the sandbox's vCPU thread), as it did
/// without them, while L1 ran two TCG vCPUs; with one (the rig's default
/// now) they pass.
const NESTED_RUNS: &str = "3";

/// The sandbox's console log.
fn console_log(env: &Env) -> PathBuf {
    env.path("state/keystone/sandboxes")
        .join(NAME)
        .join("logs/console.log")
}

/// The last `n` lines of the console log, escaped.
fn console_tail(env: &Env, n: usize) -> String {
    let path = console_log(env);
    format!("console ({}):\n{}", path.display(), log_tail(&path, n))
}

/// The last `n` lines of the sandbox's supervisor log, escaped.
fn supervisor_tail(env: &Env, n: usize) -> String {
    let path = console_log(env).with_file_name("supervisor.log");
    format!("supervisor ({}):\n{}", path.display(), log_tail(&path, n))
}

/// Drives the session: each command under a deadline, its duration kept
/// for the summary.
struct Session<'a> {
    env: &'a Env,
    repo: PathBuf,
    t0: Instant,
    timings: Vec<(String, Duration)>,
}

impl Session<'_> {
    /// Runs `keystone agent <args>` in the project; kills it and fails
    /// with the console's tail when it runs past `limit` or the session's
    /// end.
    fn run(&mut self, args: &[&str], limit: Duration) -> Output {
        let left = SESSION_LIMIT.saturating_sub(self.t0.elapsed());
        let limit = limit.min(left);
        let label = format!("keystone agent {}", args.join(" "));
        let t = Instant::now();
        let mut child = self
            .env
            .command(args, &self.repo)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // What the command printed so far, also readable on a timeout.
        let reader = |mut pipe: Box<dyn Read + Send>| {
            let seen = Arc::new(Mutex::new(Vec::new()));
            let sink = Arc::clone(&seen);
            let thread = std::thread::spawn(move || {
                let mut chunk = [0u8; 4096];
                while let Ok(n @ 1..) = pipe.read(&mut chunk) {
                    sink.lock().unwrap().extend_from_slice(&chunk[..n]);
                }
            });
            (seen, thread)
        };
        let out_thread = reader(Box::new(child.stdout.take().unwrap()));
        let err_thread = reader(Box::new(child.stderr.take().unwrap()));
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if t.elapsed() > limit {
                let _ = child.kill();
                let _ = child.wait();
                // The pipes may be held open by a detached supervisor:
                // do not wait for the readers.
                panic!(
                    "{label} did not finish within {:.0?} (session at {:.0?})\n\
                     its stderr so far:\n{}\n{}\n{}",
                    limit,
                    self.t0.elapsed(),
                    String::from_utf8_lossy(&err_thread.0.lock().unwrap()),
                    supervisor_tail(self.env, 20),
                    console_tail(self.env, 40)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let took = t.elapsed();
        let collect = |(seen, thread): (Arc<Mutex<Vec<u8>>>, std::thread::JoinHandle<()>)| {
            thread.join().unwrap();
            std::mem::take(&mut *seen.lock().unwrap())
        };
        let out = Output {
            status,
            stdout: collect(out_thread),
            stderr: collect(err_thread),
        };
        eprintln!("{label} -> {:?} in {took:.2?}", out.status.code());
        self.timings.push((label, took));
        out
    }

    /// `run`, asserting exit status 0 (with the console's tail if not).
    fn ok(&mut self, args: &[&str], limit: Duration) -> Output {
        let out = self.run(args, limit);
        assert_eq!(
            out.status.code(),
            Some(0),
            "keystone agent {}: {}\n{}\n{}",
            args.join(" "),
            text(&out),
            supervisor_tail(self.env, 30),
            console_tail(self.env, 40)
        );
        out
    }
}

#[test]
fn a_newcomer_session_on_our_vmm() {
    if let keystone_tests::rig::Where::Done =
        keystone_tests::rig::where_to_run("a_newcomer_session_on_our_vmm")
    {
        return;
    }
    let Some(env) = setup_on("vmm", NAME, "vmm") else {
        return;
    };
    let repo = env.path("proj");
    let mut s = Session {
        env: &env,
        repo: repo.clone(),
        t0: Instant::now(),
        timings: Vec::new(),
    };

    // start, on our VMM, with nested virtualization.
    let out = s.ok(
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
        START_LIMIT,
    );
    assert!(stdout(&out).contains("engine vmm"), "{}", text(&out));
    assert!(
        stdout(&out).contains("nested virtualization enabled: SVM from the host's KVM")
            || stdout(&out).contains("nested virtualization enabled: VMX from the host's KVM"),
        "{}",
        text(&out)
    );
    if let Some(ready) = stdout(&out).lines().find(|l| l.contains("ready in")) {
        eprintln!("  ({})", ready.trim());
    }

    // exec sees the project's commit.
    let out = s.ok(&["exec", "--", "git", "log", "--oneline"], COMMAND_LIMIT);
    assert!(stdout(&out).contains("init"), "{}", text(&out));

    // The agent user runs VMs of its own.
    let probe = env
        .path("state/keystone/sandboxes")
        .join(NAME)
        .join("disk/workspace/.keystone-check");
    let stripped = std::process::Command::new("strip")
        .arg("-o")
        .arg(&probe)
        .arg(env!("CARGO_BIN_EXE_keystone"))
        .output()
        .expect("strip (binutils) runs");
    assert!(stripped.status.success(), "strip: {}", text(&stripped));
    let _ = std::process::Command::new("chown")
        .arg("1000:1000")
        .arg(&probe)
        .status();
    let out = s.ok(
        &[
            "exec",
            "--",
            "/workspace/.keystone-check",
            "vm",
            "check",
            "--runs",
            NESTED_RUNS,
            "--timeout-ms",
            "30000",
            "--json",
        ],
        COMMAND_LIMIT,
    );
    let check: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("vm check gave no JSON ({e}): {}", text(&out)));
    assert_eq!(check["kvm"], "hardware", "{check}");
    assert_eq!(
        check["ok"].to_string(),
        NESTED_RUNS,
        "every self-test VM came back: {check}"
    );
    let _ = std::fs::remove_file(&probe);

    // A commit in the guest, synced to the host.
    s.ok(
        &[
            "exec",
            "--",
            "sh",
            "-c",
            "echo x > f && git add f && \
             git -c user.name=a -c user.email=a@b commit -qm guest-on-vmm",
        ],
        COMMAND_LIMIT,
    );
    let out = s.ok(&["sync"], COMMAND_LIMIT);
    assert!(stdout(&out).contains("fast-forward"), "{}", text(&out));
    let log = git(&repo, &["log", "--oneline"]);
    assert!(log.contains("guest-on-vmm"), "host log:\n{log}");
    assert_eq!(std::fs::read_to_string(repo.join("f")).unwrap(), "x\n");

    // status: running, on vmm, nesting as the VMM set it.
    let out = s.ok(&["status", "--json"], COMMAND_LIMIT);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("status --json is not JSON ({e}): {}", text(&out)));
    assert_eq!(status["state"], "running", "{status}");
    assert_eq!(status["engine"], "vmm", "{status}");
    assert_eq!(status["nested"], "enabled", "{status}");

    // stop, then start again without nesting: the commit is kept.
    s.ok(&["stop"], COMMAND_LIMIT);
    let out = s.ok(&["start", "--no-attach", "--no-nested"], START_LIMIT);
    assert!(
        stdout(&out).contains("nested virtualization disabled"),
        "{}",
        text(&out)
    );
    let out = s.ok(
        &[
            "exec",
            "--",
            "sh",
            "-c",
            "git log --oneline; grep -cw -e svm -e vmx /proc/cpuinfo; test -e /dev/kvm || echo no-kvm",
        ],
        COMMAND_LIMIT,
    );
    let seen = stdout(&out);
    assert!(seen.contains("guest-on-vmm"), "the commit is kept: {seen}");
    assert!(seen.contains("\n0\nno-kvm"), "no VMX/SVM: {seen}");

    // stop; the agent server ran the whole session without dying (its
    // init would have restarted it and logged why on the console).
    s.ok(&["stop"], COMMAND_LIMIT);
    let console = std::fs::read_to_string(console_log(&env)).unwrap_or_default();
    assert!(
        !console.contains("agent server") && !console.contains("server crashed"),
        "the guest agent server died during the session:\n{}",
        console_tail(&env, 40)
    );

    // destroy; nothing is left.
    s.ok(&["destroy", NAME, "--force"], COMMAND_LIMIT);
    let out = s.ok(&["list", "--json"], COMMAND_LIMIT);
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("list --json is not JSON ({e}): {}", text(&out)));
    assert_eq!(listed, serde_json::json!([]), "{}", text(&out));
    assert!(
        !env.path("state/keystone/sandboxes").join(NAME).exists(),
        "destroy left the sandbox's folder"
    );

    eprintln!("timings (engine vmm):");
    for (label, took) in &s.timings {
        eprintln!("  {:>9.2?}  {label}", took);
    }
    eprintln!("session took {:.1?}", s.t0.elapsed());
}
