//! Helpers shared by the agent tests that boot a real guest
//! (`agent_e2e.rs`, `agent_artifacts.rs`): a temporary home for the binary,
//! a one-commit project, and the commands that drive `keystone agent`.
//!
//! [`setup`] takes the process's guest lock
//! ([`keystone_test_kit::guest_lock`]) and the [`Env`] it returns holds it
//! until its sandbox is destroyed, so the tests of one binary boot one
//! guest at a time (the host may have two cores).

#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use keystone_test_kit::{guest_lock, skip, GuestLock, ScratchDir};

pub struct Env {
    /// The sandbox the test uses (destroyed when the test ends).
    pub name: &'static str,
    pub root: PathBuf,
    pub cache: PathBuf,
    pub kernel_dir: PathBuf,
    pub rootfs_dir: PathBuf,
    /// `root`, removed after the sandbox was destroyed.
    _root_dir: ScratchDir,
    /// Held until everything above is gone (fields drop in order).
    _guest: GuestLock,
}

impl Env {
    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    pub fn command(&self, args: &[&str], dir: &Path) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_keystone"));
        cmd.arg("agent").args(args);
        for (key, _) in std::env::vars() {
            if key.starts_with("KEYSTONE_") || key.starts_with("XDG_") || key.starts_with("GIT_") {
                cmd.env_remove(key);
            }
        }
        cmd.env("XDG_CONFIG_HOME", self.path("config"))
            // The host's own /etc/keystone/agent.toml must not change results.
            .env("KEYSTONE_SYSTEM_CONFIG", self.path("no-system-config.toml"))
            .env("XDG_STATE_HOME", self.path("state"))
            .env("XDG_CACHE_HOME", &self.cache)
            .env("KEYSTONE_KERNEL_DIR", &self.kernel_dir)
            .env("KEYSTONE_ROOTFS_DIR", &self.rootfs_dir)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .current_dir(dir);
        cmd
    }

    pub fn run(&self, args: &[&str], dir: &Path) -> Output {
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

    /// Runs with stdin on a pseudo-terminal that receives `input`.
    pub fn run_on_pty(&self, args: &[&str], dir: &Path, input: &str) -> Output {
        let (mut master, slave) = open_pty();
        let mut cmd = self.command(args, dir);
        cmd.stdin(Stdio::from(slave))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = cmd.spawn().unwrap();
        drop(cmd);
        master.write_all(input.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        eprintln!(
            "keystone agent {} (on a pty, typed {input:?}) -> {:?}",
            args.join(" "),
            out.status.code()
        );
        out
    }

    /// `keystone agent ARGS` with a new pseudo-terminal as its standard
    /// input, output and error (`TERM=xterm-256color`); returns the
    /// terminal's master side and the process.
    pub fn spawn_on_pty(&self, args: &[&str], dir: &Path) -> (std::fs::File, Child) {
        let (master, slave) = open_pty();
        let mut cmd = self.command(args, dir);
        cmd.env("TERM", "xterm-256color")
            .stdin(Stdio::from(slave.try_clone().unwrap()))
            .stdout(Stdio::from(slave.try_clone().unwrap()))
            .stderr(Stdio::from(slave));
        let child = cmd.spawn().unwrap();
        (master, child)
    }

    /// `keystone agent attach` on a new pseudo-terminal until Zellij has
    /// drawn the session `session` (its name in the status bar), within
    /// `limit`; then the client is killed (the session lives on). Times
    /// are from the spawn; panics, quoting what attach printed, when the
    /// session was not drawn.
    pub fn attach_until_drawn(&self, dir: &Path, session: &str, limit: Duration) -> Drawn {
        let t = Instant::now();
        let (master, mut child) = self.spawn_on_pty(&["attach"], dir);
        let drawn = format!("Zellij ({session})");
        let (mut seen, mut first, mut buf) = (Vec::new(), None, [0u8; 65536]);
        let mut result = None;
        while t.elapsed() < limit {
            let mut pfd = libc::pollfd {
                fd: master.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd on the master we hold.
            if unsafe { libc::poll(&mut pfd, 1, 100) } != 1 {
                continue;
            }
            let n = (&master).read(&mut buf).unwrap_or(0);
            if n == 0 {
                break;
            }
            let first_output = *first.get_or_insert_with(|| t.elapsed());
            seen.extend_from_slice(&buf[..n]);
            if String::from_utf8_lossy(&seen).contains(&drawn) {
                result = Some(Drawn {
                    first_output,
                    drawn: t.elapsed(),
                });
                break;
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        result.unwrap_or_else(|| {
            panic!(
                "attach did not draw {drawn:?} within {limit:?}; it printed {:?}",
                String::from_utf8_lossy(&seen)
            )
        })
    }

    /// `start --no-attach` of this sandbox with 1 GiB and one vCPU (what
    /// the guest tests need; the host may have two cores), plus `extra`;
    /// asserts that it succeeded and returns its output.
    pub fn start(&self, repo: &Path, extra: &[&str]) -> Output {
        let mut args = vec![
            "start",
            "--name",
            self.name,
            "--no-attach",
            "--memory",
            "1024",
            "--vcpus",
            "1",
        ];
        args.extend_from_slice(extra);
        let out = self.run(&args, repo);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
        out
    }

    pub fn status_json(&self, dir: &Path) -> serde_json::Value {
        let out = self.run(&["status", "--json"], dir);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        // Leave no VM behind, even when an assertion failed.
        let _ = self
            .command(&["destroy", self.name, "--force"], &self.root)
            .output();
    }
}

pub fn text(o: &Output) -> String {
    format!(
        "stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = keystone_test_kit::git()
        .args(args)
        .current_dir(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .output()
        .unwrap();
    assert!(out.status.success(), "git {args:?}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A temporary home for the binary and a one-commit git project at
/// `proj`, with engine qemu, once no other guest of this process runs; or
/// `None` (after printing `SKIP: <reason>`) when no guest can run here.
pub fn setup(tag: &str, name: &'static str) -> Option<Env> {
    setup_on(tag, name, "qemu")
}

/// [`setup`] with `[backend.microvm] engine = "<engine>"` (`qemu` or `vmm`):
/// QEMU must be runnable for the first, `/dev/kvm` usable for the second.
pub fn setup_on(tag: &str, name: &'static str, engine: &str) -> Option<Env> {
    let guest = guest_lock();
    if !Path::new("/dev/kvm").exists() {
        skip!(None; "no /dev/kvm");
    }
    if engine == "vmm" {
        if let Err(e) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
        {
            skip!(None; "/dev/kvm is not usable: {e}");
        }
    } else {
        let qemu_ok = Command::new("qemu-system-x86_64")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !qemu_ok {
            skip!(None; "qemu-system-x86_64 is not runnable (apt-get install qemu-system-x86)");
        }
    }
    let kernel = match guest_image::kernel::ensure_kernel() {
        Ok(k) if k.vmlinux.is_file() => k,
        Ok(k) => skip!(None; "no guest kernel at {}", k.vmlinux.display()),
        Err(e) => skip!(None; "no guest kernel: {e}"),
    };
    let rootfs = match guest_image::rootfs::ensure_rootfs() {
        Ok(r) => r,
        Err(e) => skip!(None; "no guest rootfs: {e}"),
    };
    let root_dir =
        ScratchDir::at(std::env::temp_dir().join(format!("ks-e2e-{tag}-{}", std::process::id())));
    let env = Env {
        name,
        cache: guest_image::cache_dir()
            .parent()
            .expect("cache parent")
            .to_path_buf(),
        kernel_dir: kernel.dir.clone(),
        rootfs_dir: rootfs.dir.clone(),
        root: root_dir.path().to_path_buf(),
        _root_dir: root_dir,
        _guest: guest,
    };
    std::fs::create_dir_all(env.path("config/keystone")).unwrap();
    std::fs::create_dir_all(env.path("state")).unwrap();
    std::fs::write(
        env.path("config/keystone/agent.toml"),
        format!("[backend.microvm]\nengine = \"{engine}\"\n"),
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

    Some(env)
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// What a user looks at to see that the host repository was not touched:
/// every ref, HEAD, the working tree's status and a tracked file.
pub fn host_snapshot(repo: &Path) -> (String, String, String, String) {
    (
        git(repo, &["for-each-ref"]),
        git(repo, &["rev-parse", "HEAD"]),
        git(repo, &["status", "--porcelain", "--untracked-files=all"]),
        std::fs::read_to_string(repo.join("README")).unwrap(),
    )
}

pub const COMMIT: [&str; 5] = ["-c", "user.name=t", "-c", "user.email=t@t", "commit"];

/// When `attach` showed its first bytes and drew its session.
pub struct Drawn {
    pub first_output: Duration,
    pub drawn: Duration,
}

/// A new pseudo-terminal of 40 rows and 120 columns: (master, slave).
pub fn open_pty() -> (std::fs::File, std::fs::File) {
    let (mut m, mut s) = (-1, -1);
    let ws = libc::winsize {
        ws_row: 40,
        ws_col: 120,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: openpty writes two new descriptors into m and s; the winsize
    // pointer is valid, name and termios may be null.
    let rc = unsafe { libc::openpty(&mut m, &mut s, std::ptr::null_mut(), std::ptr::null(), &ws) };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors are new and owned by nothing else.
    unsafe { (std::fs::File::from_raw_fd(m), std::fs::File::from_raw_fd(s)) }
}
