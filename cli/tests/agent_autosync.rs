//! `--sync-mode auto-commit` on a real guest (engine qemu): a commit made in
//! the guest reaches the host branch by fast-forward without anyone running
//! `keystone agent sync`; when the host branch has diverged, the sandbox's
//! commit is only fetched into `refs/remotes/sandbox-<NAME>/` and no merge
//! commit is ever made. The supervisor opens the watch connection; the
//! guest opens none.
//!
//! Skips (printing `SKIP: <reason>`) without /dev/kvm, qemu-system-x86_64
//! or a guest kernel and rootfs. The setup is the minimal one of
//! `agent_e2e.rs`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const NAME: &str = "autosync";
/// How long a guest commit may take to show up on the host.
const SYNC_WAIT: Duration = Duration::from_secs(20);

struct Env {
    root: PathBuf,
    cache: PathBuf,
    kernel_dir: PathBuf,
    rootfs_dir: PathBuf,
}

impl Env {
    fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    fn command(&self, args: &[&str], dir: &Path) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_keystone"));
        cmd.arg("agent").args(args);
        for (key, _) in std::env::vars() {
            if key.starts_with("KEYSTONE_") || key.starts_with("XDG_") || key.starts_with("GIT_") {
                cmd.env_remove(key);
            }
        }
        cmd.env("XDG_CONFIG_HOME", self.path("config"))
            .env("XDG_STATE_HOME", self.path("state"))
            .env("XDG_CACHE_HOME", &self.cache)
            .env("KEYSTONE_KERNEL_DIR", &self.kernel_dir)
            .env("KEYSTONE_ROOTFS_DIR", &self.rootfs_dir)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .current_dir(dir);
        cmd
    }

    fn run(&self, args: &[&str], dir: &Path) -> Output {
        let t = Instant::now();
        let out = self.command(args, dir).output().unwrap();
        eprintln!(
            "keystone agent {} -> {:?} in {:.2?}",
            args.join(" "),
            out.status.code(),
            t.elapsed()
        );
        out
    }

    /// The supervisor log(s) under the temporary state folder.
    fn supervisor_log(&self) -> String {
        let mut text = String::new();
        let mut stack = vec![self.path("state")];
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
}

impl Drop for Env {
    fn drop(&mut self) {
        // Leave no VM behind, even when an assertion failed.
        let _ = self
            .command(&["destroy", NAME, "--force"], &self.root)
            .output();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn text(o: &Output) -> String {
    format!(
        "stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(["-c", "user.name=t", "-c", "user.email=t@t"])
        .args(args)
        .current_dir(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .output()
        .unwrap();
    assert!(out.status.success(), "git {args:?}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
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
        env.supervisor_log()
    );
}

fn setup() -> Option<Env> {
    macro_rules! skip {
        ($($arg:tt)*) => {{
            eprintln!("SKIP: {}", format!($($arg)*));
            return None;
        }};
    }
    if !Path::new("/dev/kvm").exists() {
        skip!("no /dev/kvm");
    }
    let qemu_ok = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !qemu_ok {
        skip!("qemu-system-x86_64 is not runnable (apt-get install qemu-system-x86)");
    }
    let kernel = match guest_image::kernel::ensure_kernel() {
        Ok(k) if k.vmlinux.is_file() => k,
        Ok(k) => skip!("no guest kernel at {}", k.vmlinux.display()),
        Err(e) => skip!("no guest kernel: {e}"),
    };
    let rootfs = match guest_image::rootfs::ensure_rootfs() {
        Ok(r) => r,
        Err(e) => skip!("no guest rootfs: {e}"),
    };
    let root = std::env::temp_dir().join(format!("ks-autosync-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let env = Env {
        cache: guest_image::cache_dir()
            .parent()
            .expect("cache parent")
            .to_path_buf(),
        kernel_dir: kernel.dir.clone(),
        rootfs_dir: rootfs.dir.clone(),
        root,
    };
    std::fs::create_dir_all(env.path("config/keystone")).unwrap();
    std::fs::create_dir_all(env.path("state")).unwrap();
    std::fs::write(
        env.path("config/keystone/agent.toml"),
        "[backend.microvm]\nengine = \"qemu\"\n",
    )
    .unwrap();
    let repo = env.path("proj");
    std::fs::create_dir_all(&repo).unwrap();
    std::fs::write(repo.join("README"), "hello\n").unwrap();
    git(&repo, &["init", "-q", "-b", "main"]);
    git(&repo, &["add", "README"]);
    git(&repo, &["commit", "-qm", "init"]);
    Some(env)
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
    let Some(env) = setup() else {
        return;
    };
    let repo = env.path("proj");
    let out = env.run(
        &[
            "start",
            "--name",
            NAME,
            "--no-attach",
            "--memory",
            "1024",
            "--vcpus",
            "1",
            "--sync-mode",
            "auto-commit",
        ],
        &repo,
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));

    // A guest commit reaches the checked-out host branch by itself.
    let head = guest_commit(&env, &repo, "f", "guest1");
    let took = wait_for_ref(&repo, "refs/heads/main", &head, &env);
    eprintln!("auto-commit: the guest commit reached the host in {took:.2?}");
    assert_eq!(
        std::fs::read_to_string(repo.join("f")).unwrap(),
        "guest1\n",
        "the host checkout was fast-forwarded"
    );
    let log = env.supervisor_log();
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
    let log = env.supervisor_log();
    assert!(log.contains("have diverged; no merge was made"), "{log}");
    eprintln!("supervisor log:\n{log}");

    let out = env.run(&["stop", NAME], &repo);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let out = env.run(&["destroy", NAME, "--force"], &repo);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
}
