//! A newcomer's `keystone agent` session on a real guest, with engine qemu
//! (QEMU's software emulation boots our guest kernel in seconds here):
//! start, exec, a commit in the guest, sync, status, stop, start again
//! (the commit persists), destroy. The binary runs with its XDG state and
//! config folders in a temporary directory; the guest kernel and rootfs
//! come from the usual cache.
//!
//! Skips (printing `SKIP: <reason>`) without /dev/kvm, qemu-system-x86_64
//! or a guest kernel and rootfs.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;

macro_rules! skip {
    ($($arg:tt)*) => {{
        eprintln!("SKIP: {}", format!($($arg)*));
        return;
    }};
}

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
}

impl Drop for Env {
    fn drop(&mut self) {
        // Leave no VM behind, even when an assertion failed.
        let _ = self
            .command(&["destroy", "e2e", "--force"], &self.root)
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

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .output()
        .unwrap();
    assert!(out.status.success(), "git {args:?}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_newcomer_session_on_a_real_guest() {
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
    let t0 = Instant::now();
    let root = std::env::temp_dir().join(format!("ks-e2e-{}", std::process::id()));
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
    std::fs::write(repo.join(".env"), "TOKEN=from-host\n").unwrap();
    git(&repo, &["init", "-q", "-b", "main"]);
    git(&repo, &["add", "README"]);
    git(
        &repo,
        &[
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t",
            "commit",
            "-qm",
            "init",
        ],
    );

    // start
    let out = env.run(
        &[
            "start",
            "--name",
            "e2e",
            "--no-attach",
            "--memory",
            "1024",
            "--vcpus",
            "1",
        ],
        &repo,
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let start_text = stdout(&out);
    assert!(start_text.contains("engine qemu"), "{}", text(&out));
    assert!(start_text.contains("copied .env"), "{}", text(&out));

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
    let out = env.run(&["exec", "--", "sh", "-c", "exit 7"], &repo);
    assert_eq!(out.status.code(), Some(7), "{}", text(&out));

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
    assert_eq!(status["nested"], "unavailable", "{status}");

    // stop, start again: the guest's commit is still in the sandbox.
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

    // destroy
    let out = env.run(&["destroy", "e2e", "--force"], &repo);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let out = env.run(&["list", "--json"], &repo);
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed, serde_json::json!([]), "{}", text(&out));
    eprintln!("session took {:.1?}", t0.elapsed());
}
