//! A newcomer's `keystone agent` session on a real guest, with engine qemu
//! (QEMU's software emulation boots our guest kernel in seconds here):
//! start, exec, a commit in the guest, sync, status, stop, start again
//! (the commit persists), destroy. The binary runs with its XDG state and
//! config folders in a temporary directory; the guest kernel and rootfs
//! come from the usual cache.
//!
//! A second test walks the lifecycle's edges on one sandbox: every exit
//! code of SPEC.md from a real command, settings that persist between
//! starts, `sync --dry-run` and a merge conflict that leave the host
//! untouched, `kill -9` of the supervisor and the recovery from it, and
//! the network as configured (nat, with no network device in the guest).
//! A third starts the same
//! sandbox from two terminals at once: one boots it, the other is refused
//! with exit 2 and no second VM is left behind. An ignored fourth prints
//! sync and exec latencies as JSON (`cargo test -p keystone --test
//! agent_e2e -- --ignored --nocapture latency`).
//!
//! Skips (printing `SKIP: <reason>`) without /dev/kvm, qemu-system-x86_64
//! or a guest kernel and rootfs.

mod common;

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use common::*;

#[test]
fn a_newcomer_session_on_a_real_guest() {
    let Some(env) = setup("newcomer", "e2e") else {
        return;
    };
    let t0 = Instant::now();
    let repo = env.path("proj");
    // What the host's refs do not share: a commit reset away and a stash
    // of an untracked .env.local.
    let id = |args: &[&str]| git(&repo, args).trim().to_string();
    let as_t = |args: &[&'static str]| [&COMMIT[..4], args].concat();
    std::fs::write(repo.join("secret"), "reset-away\n").unwrap();
    git(&repo, &["add", "secret"]);
    git(&repo, &as_t(&["commit", "-qm", "oops"]));
    let reset_away = id(&["rev-parse", "HEAD"]);
    git(&repo, &["reset", "-q", "--hard", "HEAD~1"]);
    std::fs::write(repo.join(".env.local"), "STASHED=secret\n").unwrap();
    git(
        &repo,
        &as_t(&["stash", "push", "-q", "-u", "--", ".env.local"]),
    );
    let stashed = id(&["rev-parse", "refs/stash^3:.env.local"]);

    // start
    let out = env.start(&repo, &[]);
    let start_text = stdout(&out);
    assert!(start_text.contains("engine qemu"), "{}", text(&out));
    assert!(start_text.contains("copied .env"), "{}", text(&out));
    // QEMU runs under its seccomp filter (`-sandbox on`).
    let qemu_pid = std::fs::read_to_string(env.path(&format!(
        "state/keystone/sandboxes/{}/run/qemu.pid",
        env.name
    )))
    .expect("qemu.pid");
    let qemu_status = std::fs::read_to_string(format!("/proc/{}/status", qemu_pid.trim())).unwrap();
    assert!(
        qemu_status.lines().any(|l| l == "Seccomp:\t2"),
        "QEMU without a seccomp filter:\n{qemu_status}"
    );
    // As root, the shares the guest writes are served by daemons whose
    // root is the shared folder itself (a namespace sandbox).
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        // What each share's root holds, and what a host root would.
        for (share, inside) in [("disk/workspace", ".git"), ("disk/state", "upper")] {
            let dir = env.path(&format!("state/keystone/sandboxes/{}/{share}", env.name));
            let daemons: Vec<std::path::PathBuf> = std::fs::read_dir("/proc")
                .unwrap()
                .flatten()
                .map(|p| p.path())
                .filter(|p| {
                    let cmd = std::fs::read(p.join("cmdline")).unwrap_or_default();
                    let cmd = String::from_utf8_lossy(&cmd);
                    cmd.contains("__share") && cmd.contains(&*dir.to_string_lossy())
                })
                .collect();
            let confined = daemons.iter().any(|p| {
                let root = p.join("root");
                root.join(inside).exists() && !root.join("proc/self").exists()
            });
            assert!(
                confined,
                "no daemon of {share} sees only it as its root: {daemons:?}"
            );
        }
    } else {
        println!("SKIP: the share daemons' namespace sandbox needs root");
    }
    // The clone's host folder holds the guest's .git (config, hooks): start
    // never shows it as a place to work.
    let clone = env.path(&format!(
        "state/keystone/sandboxes/{}/disk/workspace",
        env.name
    ));
    assert!(clone.join(".git").is_dir(), "{}", clone.display());
    let shown = format!("{}{}", start_text, stderr(&out));
    assert!(
        !shown.contains(&clone.display().to_string()),
        "start printed the clone's host path: {shown}"
    );

    // exec: the clone, the .env file, the user, exit codes.
    let out = env.run(&["exec", "--", "git", "log", "--oneline"], &repo);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(stdout(&out).contains("init"), "{}", text(&out));
    let out = env.run(&["exec", "--", "sh", "-c", "id -un; pwd; cat .env"], &repo);
    assert_eq!(
        stdout(&out),
        "agent\n/workspace\nTOKEN=from-host\n",
        "{}",
        text(&out)
    );
    // An interactive shell's direnv hook loads the bare .env (the
    // project has no .envrc).
    let out = env.run(
        &[
            "exec",
            "--",
            "bash",
            "-ic",
            "_direnv_hook; echo \"token=$TOKEN\"",
        ],
        &repo,
    );
    assert!(stdout(&out).contains("token=from-host"), "{}", text(&out));
    let out = env.run(&["exec", "--", "sh", "-c", "exit 7"], &repo);
    assert_eq!(out.status.code(), Some(7), "{}", text(&out));
    // The clone holds what the host's branches and tags reach, no more,
    // and its origin leads nowhere.
    for object in [&reset_away, &stashed] {
        let out = env.run(&["exec", "--", "git", "cat-file", "-e", object], &repo);
        assert_ne!(out.status.code(), Some(0), "{object} is in the sandbox");
    }
    let out = env.run(&["exec", "--", "git", "remote", "get-url", "origin"], &repo);
    assert_eq!(stdout(&out), "/dev/null/keystone-host\n", "{}", text(&out));

    // A commit in the guest, synced to the host.
    let out = env.run(
        &[
            "exec",
            "--",
            "sh",
            "-c",
            "echo x > f && mkdir -p d && echo y > d/g && git add f d && \
             git -c user.name=a -c user.email=a@b commit -qm guest",
        ],
        &repo,
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let out = env.run(&["sync"], &repo);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(stdout(&out).contains("fast-forward"), "{}", text(&out));
    assert!(git(&repo, &["log", "--oneline"]).contains("guest"));
    assert_eq!(std::fs::read_to_string(repo.join("f")).unwrap(), "x\n");
    let out = env.run(&["sync"], &repo);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));

    // worktrees
    let out = env.run(&["worktree", "add", "feat", "--create"], &repo);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let out = env.run(
        &[
            "exec",
            "--worktree",
            "feat",
            "--",
            "git",
            "branch",
            "--show-current",
        ],
        &repo,
    );
    assert_eq!(stdout(&out), "feat\n", "{}", text(&out));
    let out = env.run(&["worktree", "list"], &repo);
    assert!(
        stdout(&out).contains("/workspace/.worktrees/feat"),
        "{}",
        text(&out)
    );
    let out = env.run(&["worktree", "remove", "feat"], &repo);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));

    // status
    let out = env.run(&["status", "--json"], &repo);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["state"], "running", "{status}");
    assert_eq!(status["engine"], "qemu", "{status}");
    // TCG emulates SVM: nested virtualization is on by default.
    assert_eq!(status["nested"], "enabled", "{status}");
    // The sandbox's folder (its disk, the agent's socket) and the run
    // folder (the devices' sockets, QEMU's pid file) are this user's
    // alone, and the console reaches its log through the supervisor.
    {
        use std::os::unix::fs::MetadataExt;
        let dir = env.path(&format!("state/keystone/sandboxes/{}", env.name));
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        for run in [dir.clone(), dir.join("run"), dir.join("run/ws")] {
            let meta = std::fs::metadata(&run).unwrap();
            assert_eq!(
                (meta.uid(), meta.mode() & 0o777),
                (me, 0o700),
                "{}",
                run.display()
            );
        }
        assert!(dir.join("logs/console.log").is_file());
    }

    // A change to the guest's own root (outside /workspace) lands in the
    // sandbox's writable layer on the state share, not in a tmpfs.
    let out = env.run(
        &[
            "exec",
            "--user",
            "root",
            "--",
            "sh",
            "-c",
            "echo kept > /etc/e2e-root-layer",
        ],
        &repo,
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let console = std::fs::read_to_string(env.path(&format!(
        "state/keystone/sandboxes/{}/logs/console.log",
        env.name
    )))
    .unwrap_or_default();
    assert!(
        !console.contains("tmpfs upper layer"),
        "the root overlay refused the state share:\n{console}"
    );

    // stop, start again: the guest's commit is still in the sandbox, and
    // so is the change to its root.
    let out = env.run(&["stop"], &repo);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let listed: serde_json::Value =
        serde_json::from_slice(&env.run(&["list", "--json"], &repo).stdout).unwrap();
    assert_eq!(listed[0]["state"], "stopped", "{listed}");
    let out = env.run(&["exec", "--", "true"], &repo);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let out = env.run(&["start", "--no-attach"], &repo);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let out = env.run(&["exec", "--", "git", "log", "--oneline"], &repo);
    assert!(stdout(&out).contains("guest"), "{}", text(&out));
    let out = env.run(&["exec", "--", "cat", "/etc/e2e-root-layer"], &repo);
    assert_eq!(stdout(&out), "kept\n", "{}", text(&out));

    // destroy
    let out = env.run(&["destroy", "e2e", "--force"], &repo);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let out = env.run(&["list", "--json"], &repo);
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed, serde_json::json!([]), "{}", text(&out));
    eprintln!("session took {:.1?}", t0.elapsed());
}

#[test]
fn lifecycle_edges_exit_codes_recovery_and_saved_settings() {
    let Some(env) = setup("life", "life") else {
        return;
    };
    let t0 = Instant::now();
    let repo = env.path("proj");
    let code = |o: &Output| o.status.code();

    // Exit 1: start outside a git repository; status of an unknown name.
    let plain = env.path("plain");
    std::fs::create_dir_all(&plain).unwrap();
    let out = env.run(&["start", "--no-attach"], &plain);
    assert_eq!(code(&out), Some(1), "{}", text(&out));
    assert!(
        stderr(&out).contains("not inside a git repository"),
        "{}",
        text(&out)
    );
    let out = env.run(&["status", "no-such-sandbox"], &repo);
    assert_eq!(code(&out), Some(1), "{}", text(&out));
    assert!(stderr(&out).contains("no-such-sandbox"), "{}", text(&out));

    // Exit 4: a backend that is not implemented.
    let out = env
        .command(&["start", "--no-attach"], &repo)
        .env("KEYSTONE_AGENT_BACKEND", "kubernetes")
        .output()
        .unwrap();
    assert_eq!(code(&out), Some(4), "{}", text(&out));
    assert!(stderr(&out).contains("not implemented"), "{}", text(&out));

    // Exit 0: start, with settings that must stick.
    let out = env.run(
        &[
            "start",
            "--name",
            "life",
            "--no-attach",
            "--memory",
            "1024",
            "--vcpus",
            "1",
            "--network",
            "nat",
        ],
        &repo,
    );
    assert_eq!(code(&out), Some(0), "{}", text(&out));
    assert!(stdout(&out).contains("network nat: "), "{}", text(&out));
    let status = env.status_json(&repo);
    assert_eq!(status["state"], "running", "{status}");
    assert_eq!(status["memory_mib"], 1024, "{status}");
    assert_eq!(status["network"], "nat", "{status}");
    assert_eq!(status["network_available"], true, "{status}");
    let out = env.run(&["status"], &repo);
    assert!(
        stdout(&out).contains("Network:    nat (outbound TCP made by the host"),
        "{}",
        text(&out)
    );
    let out = env.run(&["exec", "--", "sh", "-c", "ls /sys/class/net"], &repo);
    assert!(!stdout(&out).contains("eth"), "{}", text(&out));

    // Exit 2: start while running.
    let out = env.run(&["start", "--no-attach"], &repo);
    assert_eq!(code(&out), Some(2), "{}", text(&out));
    assert!(stderr(&out).contains("already running"), "{}", text(&out));

    // A guest commit that changes README's only line.
    let out = env.run(
        &[
            "exec",
            "--",
            "sh",
            "-c",
            "echo from-sandbox > README && git -c user.name=a -c user.email=a@b \
             commit -qam sandbox-edit",
        ],
        &repo,
    );
    assert_eq!(code(&out), Some(0), "{}", text(&out));

    // sync --dry-run says what would move and moves nothing.
    let before = host_snapshot(&repo);
    let out = env.run(&["sync", "--dry-run"], &repo);
    assert_eq!(code(&out), Some(0), "{}", text(&out));
    assert!(stdout(&out).contains("would sync main:"), "{}", text(&out));
    assert!(stdout(&out).contains("sandbox-edit"), "{}", text(&out));
    assert_eq!(
        host_snapshot(&repo),
        before,
        "sync --dry-run changed the host"
    );

    // Exit 3: the host changed the same line; sync names the file and
    // leaves the host as it was, with no merge in progress.
    std::fs::write(repo.join("README"), "from-host\n").unwrap();
    let mut args = COMMIT.to_vec();
    args.extend(["-qam", "host-edit"]);
    git(&repo, &args);
    let before = host_snapshot(&repo);
    let out = env.run(&["sync"], &repo);
    assert_eq!(code(&out), Some(3), "{}", text(&out));
    assert!(stderr(&out).contains("README"), "{}", text(&out));
    let after = host_snapshot(&repo);
    assert_eq!(
        (&after.1, &after.2, &after.3),
        (&before.1, &before.2, &before.3),
        "a conflicting sync changed HEAD or the working tree"
    );
    assert!(
        !repo.join(".git/MERGE_HEAD").exists(),
        "a merge is in progress"
    );
    let tracked = git(&repo, &["status", "--porcelain", "--untracked-files=no"]);
    assert_eq!(tracked, "", "git status is not clean");

    // Stop; exec on a stopped sandbox is exit 2; a start without flags
    // keeps the saved settings.
    let out = env.run(&["stop"], &repo);
    assert_eq!(code(&out), Some(0), "{}", text(&out));
    let out = env.run(&["exec", "--", "true"], &repo);
    assert_eq!(code(&out), Some(2), "{}", text(&out));
    let out = env.run(&["start", "--no-attach"], &repo);
    assert_eq!(code(&out), Some(0), "{}", text(&out));
    let status = env.status_json(&repo);
    assert_eq!(status["state"], "running", "{status}");
    assert_eq!(
        status["memory_mib"], 1024,
        "settings were not kept: {status}"
    );
    assert_eq!(status["vcpus"], 1, "settings were not kept: {status}");
    let kib = guest_memory_kib(&env, &repo);
    assert!(kib < 1024 * 1024, "the guest has {kib} KiB, not 1024 MiB");

    // kill -9 of the supervisor: error, never running; start recovers it
    // and the guest's commit is still there.
    let pid = status["supervisor_pid"].as_i64().expect("supervisor pid") as i32;
    // SAFETY: kill has no memory preconditions; pid is the supervisor.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut status = env.status_json(&repo);
    while status["state"] != "error" && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        status = env.status_json(&repo);
    }
    assert_eq!(status["state"], "error", "{status}");
    assert_eq!(
        status["supervisor_pid"],
        serde_json::Value::Null,
        "{status}"
    );
    let out = env.run(&["status"], &repo);
    assert!(stdout(&out).contains("State:      error"), "{}", text(&out));
    let out = env.run(&["exec", "--", "true"], &repo);
    assert_eq!(code(&out), Some(2), "{}", text(&out));
    // A flag on this start overrides the saved memory and is saved.
    let out = env.run(&["start", "--no-attach", "--memory", "1536"], &repo);
    assert_eq!(code(&out), Some(0), "{}", text(&out));
    assert!(stdout(&out).contains("Recovering"), "{}", text(&out));
    let out = env.run(&["exec", "--", "git", "log", "--oneline"], &repo);
    assert!(stdout(&out).contains("sandbox-edit"), "{}", text(&out));
    let status = env.status_json(&repo);
    assert_eq!(status["state"], "running", "{status}");
    assert_eq!(
        (&status["memory_mib"], &status["vcpus"]),
        (&1536.into(), &1.into())
    );
    // The guest booted with 1 GiB of it; the rest arrives after ready.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let kib = guest_memory_kib(&env, &repo);
        if kib > 1400 * 1024 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the guest has {kib} KiB a minute after start, not 1536 MiB"
        );
        std::thread::sleep(Duration::from_millis(500));
    }

    // Exit 5: destroy asks on a terminal; "n" cancels and keeps it.
    let out = env.run(&["stop"], &repo);
    assert_eq!(code(&out), Some(0), "{}", text(&out));
    let out = env.run_on_pty(&["destroy", "life"], &repo, "n\n");
    assert_eq!(code(&out), Some(5), "{}", text(&out));
    assert!(
        stdout(&out).contains("Destroy sandbox life"),
        "{}",
        text(&out)
    );
    assert!(stderr(&out).contains("cancelled"), "{}", text(&out));
    let listed: serde_json::Value =
        serde_json::from_slice(&env.run(&["list", "--json"], &repo).stdout).unwrap();
    assert_eq!(listed[0]["name"], "life", "{listed}");
    // Without a terminal it refuses rather than asks.
    let out = env.run(&["destroy", "life"], &repo);
    assert_eq!(code(&out), Some(5), "{}", text(&out));
    eprintln!("lifecycle test took {:.1?}", t0.elapsed());
}

/// The guest's `MemTotal`, KiB.
fn guest_memory_kib(env: &Env, repo: &Path) -> u64 {
    let out = env.run(
        &["exec", "--", "sh", "-c", "grep MemTotal /proc/meminfo"],
        repo,
    );
    stdout(&out)
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{}", text(&out)))
}

/// The supervisors of sandbox `name` of this test's home, by pid.
fn supervisors(env: &Env, name: &str) -> Vec<u32> {
    let home = env.path("state");
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|p| p.parse().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let supervises = args
            .windows(2)
            .any(|w| w[0] == b"__supervise" && w[1] == name.as_bytes());
        let environ = std::fs::read(entry.path().join("environ")).unwrap_or_default();
        let ours = environ
            .split(|b| *b == 0)
            .any(|kv| kv == format!("XDG_STATE_HOME={}", home.display()).as_bytes());
        if supervises && ours {
            pids.push(pid);
        }
    }
    pids
}

#[test]
fn two_starts_at_once_boot_one_sandbox() {
    let Some(env) = setup("race", "race") else {
        return;
    };
    let repo = env.path("proj");
    let args = [
        "start",
        "--name",
        "race",
        "--no-attach",
        "--memory",
        "512",
        "--vcpus",
        "1",
    ];
    let spawn = || {
        env.command(&args, &repo)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    let both = format!("first:\n{}\nsecond:\n{}", text(&a), text(&b));
    let mut codes = [a.status.code(), b.status.code()];
    codes.sort();
    assert_eq!(codes, [Some(0), Some(2)], "{both}");
    let refused = if a.status.code() == Some(2) { &a } else { &b };
    let why = stderr(refused);
    assert!(
        why.contains("another keystone command is changing sandbox race")
            || why.contains("already running"),
        "{both}"
    );

    // One sandbox, running, with one supervisor; it works.
    assert_eq!(supervisors(&env, "race").len(), 1, "{both}");
    let status = env.status_json(&repo);
    assert_eq!(status["state"], "running", "{status}");
    let out = env.run(&["exec", "--", "git", "log", "--oneline"], &repo);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(stdout(&out).contains("init"), "{}", text(&out));
    let listed: serde_json::Value =
        serde_json::from_slice(&env.run(&["list", "--json"], &repo).stdout).unwrap();
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");

    // And the same race on stop: both end with it stopped, none fails
    // with anything but "busy" (2).
    let stop = || {
        env.command(&["stop"], &repo)
            .stdin(std::process::Stdio::null())
            .output()
    };
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(stop);
        let b = s.spawn(stop);
        (a.join().unwrap().unwrap(), b.join().unwrap().unwrap())
    });
    let both = format!("first:\n{}\nsecond:\n{}", text(&a), text(&b));
    assert!(
        [a.status.code(), b.status.code()].contains(&Some(0)),
        "{both}"
    );
    for o in [&a, &b] {
        assert!(matches!(o.status.code(), Some(0 | 2)), "{both}");
    }
    assert_eq!(env.status_json(&repo)["state"], "stopped");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !supervisors(&env, "race").is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(supervisors(&env, "race"), Vec::<u32>::new(), "{both}");
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Measured, not asserted: prints one JSON object with the latency of a
/// typical sync (10 files, 200 lines, committed in the guest) and of
/// `exec -- true` (median of 10), each as the CLI's wall time.
#[test]
#[ignore = "a measurement: cargo test -p keystone --test agent_e2e -- --ignored --nocapture latency"]
fn latency() {
    let Some(env) = setup("latency", "lat") else {
        return;
    };
    let repo = env.path("proj");
    let ms = |t: Instant| t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    let out = env.run(
        &[
            "start",
            "--name",
            "lat",
            "--no-attach",
            "--memory",
            "1024",
            "--vcpus",
            "1",
        ],
        &repo,
    );
    let start_ms = ms(t);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let out = env.run(
        &[
            "exec",
            "--",
            "sh",
            "-c",
            "mkdir -p src && for f in 0 1 2 3 4 5 6 7 8 9; do \
               for l in $(seq 1 20); do echo \"line $l of file $f\"; done > src/f$f.txt; \
             done && git add src && git -c user.name=a -c user.email=a@b commit -qm ten-files",
        ],
        &repo,
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let t = Instant::now();
    let out = env.run(&["sync"], &repo);
    let sync_ms = ms(t);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        stdout(&out).contains("10 file(s) changed, 200 insertion(s)"),
        "{}",
        text(&out)
    );
    let mut exec = Vec::new();
    for _ in 0..10 {
        let t = Instant::now();
        let out = env
            .command(&["exec", "--", "true"], &repo)
            .output()
            .unwrap();
        exec.push(ms(t));
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    }
    let engine = env.status_json(&repo)["engine"].clone();
    let report = serde_json::json!({
        "engine": engine,
        "start_ms": start_ms,
        "sync_typical_commit_ms": sync_ms,
        "exec_true_median_ms": median(exec.clone()),
        "exec_true_min_ms": exec.iter().copied().fold(f64::INFINITY, f64::min),
        "exec_true_max_ms": exec.iter().copied().fold(0.0, f64::max),
    });
    println!("{report}");
}
