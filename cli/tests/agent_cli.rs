//! `keystone agent` end to end, without a guest: the built binary runs with
//! its XDG directories (and HOME) pointed at a temporary folder.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use keystone_test_kit::ScratchDir;

struct Sandbox {
    root: ScratchDir,
}

impl Sandbox {
    fn new(tag: &str) -> Self {
        let root = ScratchDir::new(&format!("agent-cli-{tag}"));
        for dir in ["home", "config", "state", "work"] {
            std::fs::create_dir_all(root.join(dir)).unwrap();
        }
        Self { root }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_keystone"));
        cmd.arg("agent").args(args);
        for (key, _) in std::env::vars() {
            if key.starts_with("KEYSTONE_") || key.starts_with("XDG_") || key.starts_with("GIT_") {
                cmd.env_remove(key);
            }
        }
        cmd.env("HOME", self.path("home"))
            // The host's own /etc/keystone/agent.toml must not change results.
            .env("KEYSTONE_SYSTEM_CONFIG", self.path("no-system-config.toml"))
            .env("XDG_CONFIG_HOME", self.path("config"))
            .env("XDG_STATE_HOME", self.path("state"))
            .env("GIT_CEILING_DIRECTORIES", self.root.path())
            .current_dir(self.path("work"));
        cmd
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    /// A git repository with one commit, at `work/<name>`.
    fn git_repo(&self, name: &str) -> PathBuf {
        let dir = self.path("work").join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("README"), "hello\n").unwrap();
        for args in [
            &["init", "-q"][..],
            &["add", "README"],
            &[
                "-c",
                "user.name=t",
                "-c",
                "user.email=t@t",
                "commit",
                "-qm",
                "init",
            ],
        ] {
            let ok = keystone_test_kit::git()
                .args(args)
                .current_dir(&dir)
                .env("HOME", self.path("home"))
                .env("GIT_CONFIG_NOSYSTEM", "1")
                .status()
                .unwrap()
                .success();
            assert!(ok, "git {args:?}");
        }
        dir.canonicalize().unwrap()
    }

    /// Registers sandbox `name` for `project` by writing the documented
    /// on-disk format, in state `state` with `pid`.
    fn register(&self, name: &str, project: &Path, state: &str, pid: Option<u32>) {
        let registry = serde_json::json!({
            "version": 1,
            "sandboxes": { name: { "project": project, "created_at": "2026-01-01T00:00:00Z" } }
        });
        let store = self.path("state/keystone");
        std::fs::create_dir_all(store.join("sandboxes").join(name).join("disk")).unwrap();
        std::fs::write(store.join("sandboxes.json"), registry.to_string()).unwrap();
        std::fs::write(
            store.join("sandboxes").join(name).join("disk/root.img"),
            "disk",
        )
        .unwrap();
        let record = serde_json::json!({ "state": state, "supervisor_pid": pid });
        std::fs::write(
            store.join("sandboxes").join(name).join("state.json"),
            record.to_string(),
        )
        .unwrap();
    }

    fn sandbox_dir(&self, name: &str) -> PathBuf {
        self.path("state/keystone/sandboxes").join(name)
    }
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", stdout(o)))
}

#[test]
fn start_outside_a_git_repository_exits_1() {
    let s = Sandbox::new("nogit");
    let out = s.run(&["start", "--no-attach"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("is not inside a git repository"),
        "{}",
        stderr(&out)
    );
    // Nothing was registered.
    assert_eq!(json(&s.run(&["list", "--json"])), serde_json::json!([]));
}

#[test]
fn list_json_of_nothing_is_an_empty_array() {
    let s = Sandbox::new("empty");
    let out = s.run(&["list", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "[]");
    let out = s.run(&["list"]);
    assert!(stdout(&out).contains("No sandboxes"));
}

#[test]
fn status_of_an_unknown_sandbox_exits_1() {
    let s = Sandbox::new("unknown");
    let out = s.run(&["status", "nope", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("no sandbox named \"nope\""),
        "{}",
        stderr(&out)
    );
    // With no name, outside a repository.
    assert_eq!(s.run(&["status"]).status.code(), Some(1));
}

#[test]
fn the_kubernetes_backend_exits_4_everywhere() {
    let s = Sandbox::new("k8s");
    let repo = s.git_repo("proj");
    let message = "the kubernetes backend is not implemented yet; set [backend] type = \"microvm\"";
    for args in [
        &["start", "--no-attach", repo.to_str().unwrap()][..],
        &["list", "--json"],
        &["status", "x"],
        &["destroy", "x", "--force"],
        &["exec", "x", "--", "true"],
    ] {
        let out = s
            .command(args)
            .env("KEYSTONE_AGENT_BACKEND", "kubernetes")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(4), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(message), "{args:?}: {}", stderr(&out));
    }
    // The same from the config file.
    std::fs::create_dir_all(s.path("config/keystone")).unwrap();
    std::fs::write(
        s.path("config/keystone/agent.toml"),
        "[backend]\ntype = \"kubernetes\"\n",
    )
    .unwrap();
    assert_eq!(s.run(&["list"]).status.code(), Some(4));
    // And the environment overrides the file.
    let out = s
        .command(&["list"])
        .env("KEYSTONE_AGENT_BACKEND", "microvm")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

#[test]
fn a_bad_config_file_names_file_line_and_key() {
    let s = Sandbox::new("badcfg");
    std::fs::create_dir_all(s.path("config/keystone")).unwrap();
    let file = s.path("config/keystone/agent.toml");
    std::fs::write(&file, "[defaults]\nmemory = 4096\nmemroy = 2\n").unwrap();
    let out = s.run(&["list"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "{}:3:1: unknown key `defaults.memroy`",
            file.display()
        )),
        "{err}"
    );

    std::fs::write(&file, "[defaults]\nvcpus = \"four\"\n").unwrap();
    let err = stderr(&s.run(&["list"]));
    assert!(
        err.contains(&format!(
            "{}:2:9: invalid value for `defaults.vcpus`",
            file.display()
        )),
        "{err}"
    );
}

#[test]
fn destroy_force_removes_a_created_sandbox() {
    let s = Sandbox::new("destroy");
    let repo = s.git_repo("proj");
    s.register("proj-1", &repo, "created", None);
    let listed = json(&s.run(&["list", "--json"]));
    assert_eq!(listed[0]["name"], "proj-1");
    assert_eq!(listed[0]["state"], "created");
    assert_eq!(listed[0]["project"], repo.to_str().unwrap());

    // No terminal and no --force: refuse (exit 5), keep everything.
    let out = s.run(&["destroy", "proj-1"]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(s.sandbox_dir("proj-1").exists());

    let out = s.run(&["destroy", "proj-1", "--force"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(!s.sandbox_dir("proj-1").exists());
    assert_eq!(json(&s.run(&["list", "--json"])), serde_json::json!([]));
    assert_eq!(
        s.run(&["destroy", "proj-1", "--force"]).status.code(),
        Some(1)
    );
}

#[test]
fn destroy_keep_disk_keeps_only_the_disk() {
    let s = Sandbox::new("keepdisk");
    let repo = s.git_repo("proj");
    s.register("proj-2", &repo, "stopped", None);
    let out = s.run(&["destroy", "proj-2", "--force", "--keep-disk"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(s.sandbox_dir("proj-2").join("disk/root.img").exists());
    assert!(!s.sandbox_dir("proj-2").join("state.json").exists());
    assert_eq!(json(&s.run(&["list", "--json"])), serde_json::json!([]));
}

#[test]
fn start_records_the_sandbox_and_fails_cleanly_without_a_guest_kernel() {
    let s = Sandbox::new("start");
    let repo = s.git_repo("My Project");
    std::fs::write(repo.join("dirty.txt"), "x").unwrap();
    // No guest kernel (or, on a host without KVM and QEMU, no engine):
    // a requirements failure, exit 4, before anything boots.
    let out = s
        .command(&["start", "--no-attach", "--memory", "1024"])
        .env("KEYSTONE_KERNEL_DIR", s.path("no-kernel"))
        .current_dir(&repo)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("guest kernel") || err.contains("engine"),
        "{err}"
    );
    assert!(
        stderr(&out).contains("uncommitted change"),
        "{}",
        stderr(&out)
    );

    let listed = json(&s.run(&["list", "--json"]));
    let name = listed[0]["name"].as_str().unwrap().to_string();
    assert!(
        name.starts_with("my-project-") && name.len() == "my-project-".len() + 6,
        "{name}"
    );
    assert_eq!(listed[0]["state"], "error");
    assert_eq!(listed[0]["memory_mib"], 1024);
    assert!(!listed[0]["last_error"].as_str().unwrap().is_empty());

    // status with no name finds the sandbox of the current repository,
    // from any folder in it.
    std::fs::create_dir(repo.join("src")).unwrap();
    let out = s
        .command(&["status", "--json"])
        .current_dir(repo.join("src"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(json(&out)["name"], name.as_str());
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(s.sandbox_dir(&name).join("config.json")).unwrap())
            .unwrap();
    assert_eq!(config["memory_mib"], 1024);

    // Not running: the guest commands say so with exit 2.
    for args in [
        &["exec", &name, "--", "true"][..],
        &["attach", &name],
        &["stop", &name],
        &["sync", &name],
    ] {
        let out = s.run(args);
        assert_eq!(
            out.status.code(),
            Some(if args[0] == "stop" { 0 } else { 2 }),
            "{args:?}: {}",
            stderr(&out)
        );
    }
    // stop of an errored sandbox marked it stopped; now stop is invalid.
    assert_eq!(s.run(&["stop", &name]).status.code(), Some(2));
}

#[test]
fn a_live_supervisor_means_running_and_a_dead_one_error() {
    let s = Sandbox::new("live");
    let repo = s.git_repo("proj");
    // A stand-in whose command line looks like a supervisor's, in a
    // process group of its own and with no pipe of the test's: its
    // `sleep` is killed with it, and nothing of it outlives the test.
    let mut fake = Command::new("sh")
        .args(["-c", "sleep 600; true", "__supervise", "proj-3"])
        .process_group(0)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    s.register("proj-3", &repo, "running", Some(fake.id()));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut status = json(&s.run(&["status", "proj-3", "--json"]));
    while status["state"] != "running" && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
        status = json(&s.run(&["status", "proj-3", "--json"]));
    }
    assert_eq!(status["state"], "running");
    assert_eq!(status["supervisor_pid"], fake.id());

    let out = s
        .command(&["start", "--no-attach", "--name", "proj-3"])
        .current_dir(&repo)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("already running"), "{}", stderr(&out));
    let out = s.run(&["destroy", "proj-3"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));

    // SAFETY: kill has no memory effects; the group is the stand-in's.
    unsafe { libc::kill(-(fake.id() as i32), libc::SIGKILL) };
    fake.wait().unwrap();
    let status = json(&s.run(&["status", "proj-3", "--json"]));
    assert_eq!(status["state"], "error");
    assert!(status["last_error"]
        .as_str()
        .unwrap()
        .contains("supervisor"));
    let listed = json(&s.run(&["list", "--json", "--state", "error"]));
    assert_eq!(listed.as_array().unwrap().len(), 1);
    let listed = json(&s.run(&["list", "--json", "--state", "running"]));
    assert_eq!(listed, serde_json::json!([]));
}

#[test]
fn a_name_belongs_to_one_project() {
    let s = Sandbox::new("clash");
    let a = s.git_repo("a");
    let b = s.git_repo("b");
    s.register("shared", &a, "stopped", None);
    let out = s
        .command(&["start", "--no-attach", "--name", "shared"])
        .current_dir(&b)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("already used by"), "{}", stderr(&out));
    let out = s
        .command(&["start", "--no-attach", "--name", "Bad_Name"])
        .current_dir(&b)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
}

#[test]
fn a_command_missing_its_arguments_is_a_usage_error() {
    let s = Sandbox::new("usage");
    // exec needs a command after `--`: a usage error, exit 1 (2 is "invalid state").
    let out = s.run(&["exec", "x"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("Usage:"), "{}", stderr(&out));
    // An unknown flag is one too, and names the flag.
    let out = s.run(&["start", "--turbo"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("--turbo"), "{}", stderr(&out));
}
