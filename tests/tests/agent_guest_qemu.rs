//! The guest agent as PID 1 of a real guest under QEMU's software
//! emulation (TCG), reached over virtio-vsock: QEMU's
//! `vhost-user-vsock-device` served by our vsock backend in this process,
//! whose hybrid Unix socket the agent client connects through. The agent
//! boots from its initramfs, mounts the cached Debian rootfs (virtiofsd-lite,
//! read-only) under a tmpfs overlay and a scratch workspace (virtiofsd-lite)
//! at /workspace.
//!
//! One boot, then checks in order: exec (`uname -r`, exit codes), 50 MiB
//! through stdin/stdout, an interactive shell on a PTY with a resize, files
//! in /workspace both ways, git on 3000 files, pjdfstest on /workspace and
//! on a share cached as keystone caches workspaces, a guest `git commit`
//! fetched on the host through the `git upload-pack` raw stream, a pushed
//! `.env` read back through direnv, that no guest process can open a vsock
//! connection to the host, and a clean shutdown.

use std::fs;
use std::io::Cursor;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use guest_image::rootfs::{ensure_rootfs, RootfsError};
use keystone_guest_agent::client::AgentClient;
use keystone_guest_agent::protocol::{ExecRequest, TtySize, UserSpec};
use keystone_tests::guest_agent::{
    self, compile_vsock_probe, fetch_from_guest, host_git, pseudo_random, step, wait_for_agent,
    GUEST_CID,
};
use keystone_tests::pjdfstest;
use keystone_tests::qemu::{qemu_missing, QemuGuest};
use keystone_tests::{fnv64, skip, ScratchDir};
use virtiofsd_lite::FsConfig;
use vsock_lite::VsockConfig;

const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
const STEP: Duration = Duration::from_secs(60);
const STREAM_BYTES: usize = 50 << 20;

/// The `ext::` helper of the git fetch (this binary, re-run); a no-op test
/// otherwise.
#[test]
fn shim_entry() {
    guest_agent::upload_pack_shim();
}

/// Waits for a vhost-user backend thread to create its socket.
fn wait_socket<T>(socket: &Path, thread: &JoinHandle<T>, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(
            !thread.is_finished() && Instant::now() < deadline,
            "{what} did not start listening on {}",
            socket.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn start_fs(
    socket: PathBuf,
    cfg: FsConfig,
) -> (PathBuf, JoinHandle<Result<(), virtiofsd_lite::Error>>) {
    let s = socket.clone();
    let tag = cfg.tag.clone();
    let thread = std::thread::spawn(move || virtiofsd_lite::serve_listener(&s, cfg));
    wait_socket(&socket, &thread, &format!("virtiofsd-lite {tag}"));
    (socket, thread)
}

/// Runs pjdfstest as root in `<mount>/pjdfstest` of the guest, where
/// `host` is the shared directory behind `mount`, and checks its report.
fn run_pjdfstest(client: &AgentClient, host: &Path, mount: &str, bin: &Path) {
    let dir = host.join(".pjdfstest");
    fs::create_dir_all(host.join("pjdfstest")).unwrap();
    fs::create_dir_all(&dir).unwrap();
    fs::copy(bin, dir.join("pjdfstest")).unwrap();
    fs::write(dir.join("config.toml"), pjdfstest::CONFIG).unwrap();
    let started = Instant::now();
    let out = client
        .exec_request_output(ExecRequest {
            user: Some(UserSpec::Uid(0)),
            ..ExecRequest::new(&[
                &format!("{mount}/.pjdfstest/pjdfstest"),
                "-c",
                &format!("{mount}/.pjdfstest/config.toml"),
                "-p",
                &format!("{mount}/pjdfstest"),
            ])
        })
        .expect("pjdfstest in the guest");
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let cases = pjdfstest::parse_report(&report);
    let passed = cases
        .iter()
        .filter(|(_, v)| *v == pjdfstest::Verdict::Ok)
        .count();
    let skipped: Vec<String> = cases
        .iter()
        .filter_map(|(n, v)| match v {
            pjdfstest::Verdict::Skipped(why) => Some(format!("{n} ({why})")),
            _ => None,
        })
        .collect();
    let mut expected = Vec::new();
    let mut unexpected = Vec::new();
    for (name, v) in &cases {
        if let pjdfstest::Verdict::Failed(why) = v {
            match pjdfstest::expected_failure(name) {
                Some(policy) => expected.push(format!("{name} ({policy})")),
                None => unexpected.push(format!("{name}: {why}")),
            }
        }
    }
    eprintln!(
        "pjdfstest {} on virtiofsd-lite ({mount}) under TCG: {passed} passed, {} failed as \
         the policy says, {} failed otherwise, {} skipped, in {:?}",
        pjdfstest::VERSION,
        expected.len(),
        unexpected.len(),
        skipped.len(),
        started.elapsed()
    );
    for s in &skipped {
        eprintln!("pjdfstest skipped: {s}");
    }
    for s in &expected {
        eprintln!("pjdfstest failed by policy: {s}");
    }
    assert!(
        passed > 300 && unexpected.is_empty(),
        "pjdfstest on {mount}: {passed} passed; unexpected failures: {unexpected:#?}\nstderr: {stderr}"
    );
}

fn exec(client: &AgentClient, argv: &[&str]) -> (i32, String, String) {
    let out = client
        .exec_output(argv)
        .unwrap_or_else(|e| panic!("exec {argv:?}: {e}"));
    (
        out.status.code_or_signal(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn agent_over_vsock_under_qemu() {
    if let Some(reason) = qemu_missing() {
        skip!("{reason}");
    }
    let t0 = Instant::now();
    let rootfs = match ensure_rootfs() {
        Ok(r) => r,
        Err(e @ RootfsError::Unavailable) => skip!("{e}"),
        Err(e) => panic!("guest rootfs: {e}"),
    };
    let kernel = guest_image::kernel::ensure_kernel().expect("guest kernel");
    let scratch = ScratchDir::new("agent-qemu");
    let initrd = guest_agent::agent_initramfs(scratch.path()).expect("agent initramfs");
    let t_prep = t0.elapsed();

    let ws = scratch.path().join("workspace");
    fs::create_dir_all(&ws).unwrap();
    fs::write(ws.join("from-host.txt"), "written by the host\n").unwrap();
    let probe = ws.join("vsock-probe");
    let probe_built = compile_vsock_probe(&probe);
    let bind_probe_built = guest_agent::compile_static(
        guest_agent::VSOCK_BIND_PROBE_C,
        &ws.join("vsock-bind-probe"),
    );

    let (root_sock, root_thread) = start_fs(
        scratch.path().join("root.sock"),
        FsConfig {
            readonly: true,
            ..FsConfig::new(&rootfs.dir, "root")
        },
    );
    let (ws_sock, ws_thread) = start_fs(
        scratch.path().join("ws.sock"),
        FsConfig::new(&ws, "workspace"),
    );
    // A second share as the keystone supervisor serves workspaces (names
    // and attributes cached for long), for pjdfstest.
    let cached = scratch.path().join("cached");
    fs::create_dir_all(&cached).unwrap();
    let (cached_sock, cached_thread) = start_fs(
        scratch.path().join("cached.sock"),
        FsConfig {
            cache: virtiofsd_lite::CacheMode::Always,
            ..FsConfig::new(&cached, "cached")
        },
    );
    let vsock_sock = scratch.path().join("vsock-vhost.sock");
    let uds = scratch.path().join("vsock.sock");
    let vsock_thread = {
        let (s, cfg) = (
            vsock_sock.clone(),
            VsockConfig {
                guest_cid: GUEST_CID,
                uds_path: uds.clone(),
            },
        );
        std::thread::spawn(move || vsock_lite::serve_listener(&s, cfg).map_err(|e| e.to_string()))
    };
    wait_socket(&vsock_sock, &vsock_thread, "the vsock backend");

    let mut guest = QemuGuest::builder(&kernel.vmlinux)
        .memory_mib(512)
        .initrd(&initrd)
        .vhost_user_fs(&root_sock, "root")
        .vhost_user_fs(&ws_sock, "workspace")
        .vhost_user_fs(&cached_sock, "cached")
        .append("keystone.root=root keystone.workspace=workspace keystone.hostname=ks-agent-qemu")
        .qemu_args([
            "-chardev".to_string(),
            format!("socket,id=vsock0,path={}", vsock_sock.display()),
            "-device".to_string(),
            "vhost-user-vsock-device,chardev=vsock0".to_string(),
        ])
        .start()
        .expect("start qemu-system-x86_64");
    eprintln!("qemu {}", guest.args().join(" "));

    let client = Arc::new(guest_agent::client(&uds));
    let waited = wait_for_agent(&client, BOOT_TIMEOUT, || {
        if vsock_thread.is_finished() {
            return Err("the vsock backend stopped".into());
        }
        if guest.console().contains("Kernel panic") {
            return Err("the guest panicked".into());
        }
        match guest.wait_exit(Duration::ZERO) {
            Ok(st) => Err(format!("QEMU exited ({st}) before the agent answered")),
            Err(_) => Ok(()),
        }
    });
    let (version, waited, tries) = match waited {
        Ok(v) => v,
        Err(e) => {
            guest.kill();
            let backend = if vsock_thread.is_finished() {
                format!("{:?}", vsock_thread.join())
            } else {
                "still running".into()
            };
            panic!(
                "{e}\nvsock backend: {backend}\nconsole tail:\n{}",
                guest.console_tail(60)
            )
        }
    };
    let t_boot = guest.elapsed();
    eprintln!("agent {version} answered {waited:?} after QEMU start ({tries} refused tries)");
    assert_eq!(version, env!("CARGO_PKG_VERSION"));
    let c = client.clone();
    let pings = step("ping", Duration::from_secs(60), move || {
        guest_agent::ping_times(&c, 5)
    });
    eprintln!("ping round trips over vsock: {pings:?}");

    // exec: uname, exit codes, stderr, the overlay root and hostname.
    let c = client.clone();
    step("exec", STEP, move || {
        let (code, out, _) = exec(&c, &["uname", "-r"]);
        assert_eq!(code, 0);
        assert!(out.starts_with("6.12"), "uname -r: {out:?}");
        let (code, _, _) = exec(&c, &["sh", "-c", "exit 7"]);
        assert_eq!(code, 7, "sh -c 'exit 7'");
        let (code, out, err) = exec(&c, &["sh", "-c", "echo out; echo err >&2; exit 3"]);
        assert_eq!((code, out.as_str(), err.as_str()), (3, "out\n", "err\n"));
        let (code, out, _) = exec(
            &c,
            &[
                "sh",
                "-c",
                "cat /proc/sys/kernel/hostname; id -un; cut -d. -f1 /etc/debian_version; touch /etc/overlay-ok && echo rw",
            ],
        );
        assert_eq!(code, 0, "{out}");
        assert_eq!(out, "ks-agent-qemu\nroot\n12\nrw\n");
    });
    assert!(
        !rootfs.dir.join("etc/overlay-ok").exists(),
        "a guest write reached the cached rootfs"
    );

    // 50 MiB through cat, both directions at once.
    let c = client.clone();
    step("stream-50MiB", Duration::from_secs(120), move || {
        let data = pseudo_random(STREAM_BYTES, 0x1234_5678);
        let want = fnv64(&data);
        let start = Instant::now();
        let (mut out, mut err) = (Vec::with_capacity(STREAM_BYTES), Vec::new());
        let st = c
            .exec(
                ExecRequest::new(&["cat"]),
                Cursor::new(data),
                &mut out,
                &mut err,
            )
            .expect("exec cat");
        let took = start.elapsed();
        assert!(
            st.success(),
            "cat: {st:?} {}",
            String::from_utf8_lossy(&err)
        );
        assert_eq!(out.len(), STREAM_BYTES);
        assert_eq!(fnv64(&out), want, "the 50 MiB came back changed");
        eprintln!(
            "50 MiB through cat under TCG: {took:?} ({:.1} MiB/s each way)",
            50.0 / took.as_secs_f64()
        );
    });

    // An interactive shell on a PTY, with a resize.
    let c = client.clone();
    step("pty", STEP, move || {
        let out = c
            .exec_request_output(ExecRequest {
                tty: Some(TtySize {
                    rows: 33,
                    cols: 101,
                }),
                ..ExecRequest::new(&["sh", "-c", "tty; stty size"])
            })
            .expect("tty exec");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.starts_with("/dev/pts/"), "{text:?}");
        assert!(text.contains("33 101"), "{text:?}");

        let session = c
            .start_exec(ExecRequest {
                tty: Some(TtySize { rows: 24, cols: 80 }),
                ..ExecRequest::new(&["bash", "--norc", "--noprofile", "-i"])
            })
            .expect("start bash -i");
        let control = session.control();
        control
            .send_stdin(b"PS1='ks$ '; echo sum=$((6*7))\n")
            .unwrap();
        control
            .resize(TtySize {
                rows: 50,
                cols: 120,
            })
            .unwrap();
        control.send_stdin(b"stty size; exit 3\n").unwrap();
        let mut out = Vec::new();
        let status = session.wait(&mut out, &mut Vec::new()).expect("bash -i");
        let text = String::from_utf8_lossy(&out);
        assert_eq!(status.code, Some(3), "{text:?}");
        assert!(text.contains("sum=42"), "{text:?}");
        assert!(text.contains("50 120"), "{text:?}");
    });

    // Files in /workspace both ways.
    let c = client.clone();
    let ws2 = ws.clone();
    step("workspace", STEP, move || {
        let (code, out, err) = exec(
            &c,
            &[
                "sh",
                "-c",
                "cat /workspace/from-host.txt && echo 'written by the guest' > /workspace/from-guest.txt && sync",
            ],
        );
        assert_eq!((code, out.as_str()), (0, "written by the host\n"), "{err}");
        assert_eq!(
            fs::read_to_string(ws2.join("from-guest.txt")).unwrap(),
            "written by the guest\n"
        );
    });

    // git on a few thousand files in the virtio-fs /workspace, as the
    // agent user: init, add, commit, status, gc and fsck in the guest; the
    // host then reads the same repository.
    let c = client.clone();
    let ws2 = ws.clone();
    step("git-many-files", Duration::from_secs(300), move || {
        // The agent user's own directory in the (root-owned) scratch workspace.
        fs::create_dir_all(ws2.join("many")).unwrap();
        std::os::unix::fs::chown(ws2.join("many"), Some(1000), Some(1000)).unwrap();
        let script = "set -e; cd /workspace/many && git init -q && \
            for d in $(seq 30); do mkdir d$d; for f in $(seq 100); do echo \"$d/$f\" > d$d/f$f; done; done && \
            git add -A && git -c user.name=agent -c user.email=agent@sandbox commit -qm many && \
            echo 'changed' > d7/f7 && rm d9/f9 && git status --porcelain && \
            git checkout -q -- . && test -z \"$(git status --porcelain)\" && \
            git gc -q && git fsck --no-progress && git ls-files | wc -l";
        let started = Instant::now();
        let out = c
            .exec_request_output(ExecRequest {
                user: Some(UserSpec::Name("agent".into())),
                env: vec![
                    ("GIT_AUTHOR_DATE".into(), "2026-11-27T00:00:00Z".into()),
                    ("GIT_COMMITTER_DATE".into(), "2026-11-27T00:00:00Z".into()),
                ],
                ..ExecRequest::new(&["bash", "-c", script])
            })
            .expect("git on many files");
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            out.status.code_or_signal(),
            0,
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            text.contains(" M d7/f7") && text.contains(" D d9/f9"),
            "{text}"
        );
        assert_eq!(text.lines().last(), Some("3000"), "{text}");
        eprintln!(
            "git init/add/commit/status/gc/fsck of 3000 files under TCG: {:?}",
            started.elapsed()
        );
        let repo = ws2.join("many");
        let home = ws2.join(".host-home");
        fs::create_dir_all(&home).unwrap();
        let count = host_git(&repo, &home, &["-c", "safe.directory=*", "ls-files"])
            .lines()
            .count();
        assert_eq!(count, 3000);
        assert_eq!(fs::read_to_string(repo.join("d7/f7")).unwrap(), "7/7\n");
        let meta = fs::metadata(repo.join("d30/f100")).unwrap();
        assert_eq!(
            std::os::unix::fs::MetadataExt::uid(&meta),
            1000,
            "owned by the guest's agent user"
        );
    });

    // pjdfstest as root on /workspace (`--cache auto`) and on a share
    // served as keystone serves workspaces (`--cache always`): every case
    // it runs passes, but those the daemon's policy refuses (each with its
    // reason in `pjdfstest.rs`).
    match pjdfstest::binary() {
        Err(why) => println!("SKIP: pjdfstest on virtio-fs: {why}"),
        Ok(bin) => {
            let c = client.clone();
            let (ws3, cached3) = (ws.clone(), cached.clone());
            step("pjdfstest", Duration::from_secs(900), move || {
                run_pjdfstest(&c, &ws3, "/workspace", &bin);
                let out = c
                    .exec_request_output(ExecRequest {
                        user: Some(UserSpec::Uid(0)),
                        ..ExecRequest::new(&[
                            "sh",
                            "-c",
                            "mkdir -p /mnt/cached && mount -t virtiofs cached /mnt/cached",
                        ])
                    })
                    .expect("mount the cached share");
                assert!(out.status.success(), "{out:?}");
                run_pjdfstest(&c, &cached3, "/mnt/cached", &bin);
            });
        }
    }

    // A commit in the guest, outside /workspace, fetched by the host.
    let c = client.clone();
    let guest_head = step("git-commit", STEP, move || {
        let req = ExecRequest {
            env: [
                ("GIT_AUTHOR_DATE", "2026-01-02T03:04:05Z"),
                ("GIT_COMMITTER_DATE", "2026-01-02T03:04:05Z"),
            ]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
            ..ExecRequest::new(&[
                "sh",
                "-c",
                "set -e; git init -q -b main /root/project; cd /root/project; \
                 echo 'made in the guest' > README; git add README; \
                 git -c user.name=Guest -c user.email=guest@keystone.invalid commit -q -m 'guest commit'; \
                 git rev-parse HEAD",
            ])
        };
        let out = c.exec_request_output(req).expect("git in the guest");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    });
    assert_eq!(guest_head.len(), 40, "{guest_head:?}");
    let host_repo = scratch.path().join("host-repo");
    fs::create_dir_all(&host_repo).unwrap();
    host_git(&host_repo, scratch.path(), &["init", "-q"]);
    let (u, hr, sp) = (uds.clone(), host_repo.clone(), scratch.path().to_path_buf());
    step("git-fetch", STEP, move || {
        fetch_from_guest(
            &u,
            "/root/project",
            &hr,
            "main:refs/remotes/sandbox/main",
            "shim_entry",
            &sp,
        )
        .unwrap();
    });
    assert_eq!(
        host_git(
            &host_repo,
            scratch.path(),
            &["rev-parse", "refs/remotes/sandbox/main"]
        ),
        guest_head
    );
    assert_eq!(
        host_git(
            &host_repo,
            scratch.path(),
            &[
                "log",
                "-1",
                "--format=%s|%an|%aI",
                "refs/remotes/sandbox/main"
            ]
        ),
        "guest commit|Guest|2026-01-02T03:04:05Z"
    );
    assert_eq!(
        host_git(
            &host_repo,
            scratch.path(),
            &["show", "refs/remotes/sandbox/main:README"]
        ),
        "made in the guest"
    );

    // A pushed .env, read back directly and through direnv.
    let c = client.clone();
    let ws2 = ws.clone();
    step("env-direnv", STEP, move || {
        c.push_file(".env", 0o600, b"MY_VAR=hello-from-dotenv\n")
            .expect("push .env");
        c.push_file("/workspace/.envrc", 0o644, b"dotenv\n")
            .expect("push .envrc");
        let meta = fs::metadata(ws2.join(".env")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let (code, out, _) = exec(&c, &["cat", "/workspace/.env"]);
        assert_eq!((code, out.as_str()), (0, "MY_VAR=hello-from-dotenv\n"));
        let (code, out, err) = exec(
            &c,
            &[
                "bash",
                "-lc",
                r#"cd /workspace && direnv exec . sh -c 'echo "var=$MY_VAR"'"#,
            ],
        );
        assert_eq!(code, 0, "direnv: {out} {err}");
        assert!(out.contains("var=hello-from-dotenv"), "{out:?} {err:?}");
    });

    // No guest process can reach the host over vsock.
    match &probe_built {
        Ok(()) => {
            let c = client.clone();
            step("vsock-to-host", STEP, move || {
                let ports = ["1024", "22", "80", "443", "1", "2049", "5000", "8080"];
                let mut argv = vec!["/workspace/vsock-probe", "2"];
                argv.extend(ports);
                let (code, out, err) = exec(&c, &argv);
                eprintln!("vsock probe (exit {code}):\n{out}{err}");
                assert_eq!(
                    code, 0,
                    "a guest connect to the host succeeded:\n{out}{err}"
                );
                assert_eq!(out.lines().count(), ports.len(), "{out}");
                for line in out.lines() {
                    assert!(
                        line.contains("errno=104") || line.contains("errno=111"),
                        "expected ECONNRESET or ECONNREFUSED: {line}"
                    );
                }
            });
        }
        Err(e) => eprintln!("SKIP: vsock-to-host probe: {e}"),
    }

    // The agent's vsock port is never anyone else's: a privileged port no
    // guest user may bind, whose listener PID 1 holds even while it
    // restarts a dead agent server (root's bind then finds it in use).
    match &bind_probe_built {
        Ok(()) => {
            let c = client.clone();
            step("agent-port-held", STEP, move || {
                let port = keystone_guest_agent::protocol::AGENT_VSOCK_PORT.to_string();
                let mut as_agent = ExecRequest::new(&["/workspace/vsock-bind-probe", &port, "0"]);
                as_agent.user = Some(UserSpec::Uid(1000));
                let out = c
                    .exec_request_output(as_agent)
                    .expect("bind probe as the agent user");
                let text = String::from_utf8_lossy(&out.stdout).into_owned();
                assert!(
                    out.status.success(),
                    "the agent user bound the agent's port: {text}"
                );
                assert!(text.contains("eacces=1"), "a privileged port: {text}");
                // Kill the server (the parent of this command) while root
                // tries to bind its port for 3 s.
                let script = format!(
                    "/workspace/vsock-bind-probe {port} 3000 > /tmp/held.out 2>&1 & \
                     sleep 0.3; kill -9 $PPID"
                );
                let _ = c.exec_output(&["sh", "-c", &script]);
                // The client retries while PID 1 starts the server again.
                let (code, out, err) = exec(&c, &["sh", "-c", "sleep 4; cat /tmp/held.out"]);
                eprintln!("root's bind tries while the agent server restarted: {out}{err}");
                assert_eq!(code, 0, "{out}{err}");
                assert!(
                    !out.contains("BOUND"),
                    "the port was free while the server restarted: {out}"
                );
                assert!(out.contains("eaddrinuse="), "{out}");
                assert!(!out.contains("eaddrinuse=0 "), "{out}");
            });
        }
        Err(e) => eprintln!("SKIP: agent-port-held: {e}"),
    }

    // The agent still answers; then a clean shutdown ends QEMU.
    let c = client.clone();
    step("shutdown", STEP, move || {
        c.ping().expect("ping after the checks");
        c.shutdown(false).expect("shutdown");
    });
    let status = guest
        .wait_exit(Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("QEMU did not exit after shutdown: {e}"));
    let total = guest.elapsed();
    let tail = guest.console_tail(40);
    drop(guest);
    assert!(status.success(), "QEMU exit {status}:\n{tail}");
    for (name, t) in [
        ("root", root_thread),
        ("workspace", ws_thread),
        ("cached", cached_thread),
    ] {
        let r = t.join().expect("virtiofsd-lite thread");
        assert!(r.is_ok(), "virtiofsd-lite {name}: {r:?}");
    }
    let r = vsock_thread.join().expect("vsock thread");
    assert!(r.is_ok(), "vsock backend: {r:?}");
    assert!(!uds.exists(), "the hybrid socket was left behind");
    eprintln!(
        "timings: prepare (rootfs, kernel, agent, initramfs) {t_prep:?}, boot to agent {t_boot:?}, \
         QEMU total {total:?}, test total {:?}",
        t0.elapsed()
    );
}
