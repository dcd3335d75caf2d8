//! Helpers for the real-guest tests of the guest agent over virtio-vsock:
//! the static agent and its initramfs, waiting for the agent to answer,
//! steps with a deadline, test data, a host `git fetch` through the
//! agent's `git upload-pack` raw stream, and a tiny static C program that
//! tries to open vsock connections from the guest to the host.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use keystone_guest_agent::client::{hybrid_vsock_connector, AgentClient};
use keystone_guest_agent::protocol::RawStreamRequest;

/// The guest's vsock context id in these tests.
pub const GUEST_CID: u64 = 3;

/// Env var naming the hybrid vsock socket for the upload-pack shim.
pub const SHIM_UDS_ENV: &str = "KS_I4_SHIM_UDS";
/// Env var naming the guest repository for the upload-pack shim.
pub const SHIM_REPO_ENV: &str = "KS_I4_SHIM_REPO";

/// The static guest agent: `$KEYSTONE_AGENT_BIN` when set, otherwise built
/// by `guest-image/agent/build-static.sh` into `$CARGO_TARGET_DIR` (or the
/// workspace's `target/`). The first build takes about a minute.
pub fn agent_binary() -> Result<PathBuf, String> {
    if let Ok(p) = std::env::var("KEYSTONE_AGENT_BIN") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!("KEYSTONE_AGENT_BIN={} is not a file", p.display()))
        };
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or("no workspace directory")?
        .to_path_buf();
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| workspace.join("target"));
    let out = Command::new("sh")
        .arg(workspace.join("guest-image/agent/build-static.sh"))
        .arg(&target)
        .current_dir(&workspace)
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run build-static.sh: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "build-static.sh failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!("build-static.sh printed {path:?}, not a file"))
    }
}

/// Writes the agent initramfs (`/init` = the static agent) into `dir`.
pub fn agent_initramfs(dir: &Path) -> Result<PathBuf, String> {
    let agent = agent_binary()?;
    let out = dir.join("agent-initramfs.cpio");
    guest_image::initramfs::write_agent_initramfs(&agent, &out)
        .map_err(|e| format!("writing the agent initramfs: {e}"))?;
    Ok(out)
}

/// A client of the agent on its guest port behind the hybrid socket `uds`.
pub fn client(uds: &Path) -> AgentClient {
    AgentClient::new(hybrid_vsock_connector(
        uds,
        keystone_guest_agent::protocol::AGENT_VSOCK_PORT,
    ))
}

/// Pings until the agent answers; `alive` is asked between tries and ends
/// the wait with its error (e.g. the VM stopped). Returns the agent
/// version, the time waited and the number of failed tries.
pub fn wait_for_agent(
    client: &AgentClient,
    timeout: Duration,
    mut alive: impl FnMut() -> Result<(), String>,
) -> Result<(String, Duration, u32), String> {
    let start = Instant::now();
    let mut tries = 0;
    loop {
        match client.ping() {
            Ok(v) => return Ok((v, start.elapsed(), tries)),
            Err(e) => {
                tries += 1;
                alive()?;
                if start.elapsed() > timeout {
                    return Err(format!(
                        "the agent did not answer within {timeout:?} ({tries} tries; last: {e})"
                    ));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Pings `n` times in a row and returns each round trip (a fresh vsock
/// connection, hello and request each time; no guest process).
pub fn ping_times(client: &AgentClient, n: usize) -> Vec<Duration> {
    (0..n)
        .map(|_| {
            let t = Instant::now();
            client.ping().expect("ping the agent");
            t.elapsed()
        })
        .collect()
}

/// Runs `f` on a thread and waits at most `timeout` for it, so a hung
/// guest fails the test instead of stalling it. Prints the step's time.
pub fn step<T: Send + 'static>(
    name: &str,
    timeout: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = mpsc::channel();
    let start = Instant::now();
    let _ = std::thread::Builder::new()
        .name(format!("step-{name}"))
        .spawn(move || {
            let _ = tx.send(std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)));
        })
        .expect("spawn a step thread");
    match rx.recv_timeout(timeout) {
        Ok(Ok(v)) => {
            eprintln!("step {name}: {:?}", start.elapsed());
            v
        }
        Ok(Err(panic)) => {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "a panic".into());
            panic!("step {name} failed after {:?}: {msg}", start.elapsed())
        }
        Err(_) => panic!("step {name} did not finish within {timeout:?}"),
    }
}

/// `len` xorshift bytes (incompressible, never all one value).
pub fn pseudo_random(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// Runs host `git` in `dir` with a private `HOME`; panics on failure and
/// returns trimmed stdout.
pub fn host_git(dir: &Path, home: &Path, args: &[&str]) -> String {
    let out = keystone_test_kit::git()
        .current_dir(dir)
        .args(args)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("HOME", home)
        .output()
        .expect("run host git");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// `git fetch`es `refspec` from the guest repository `guest_repo` into the
/// host repository `host_repo` through the agent's raw stream: an `ext::`
/// remote whose helper is this test binary re-run as `shim_test` (a test
/// that calls [`upload_pack_shim`]). `scratch` holds the helper script.
pub fn fetch_from_guest(
    uds: &Path,
    guest_repo: &str,
    host_repo: &Path,
    refspec: &str,
    shim_test: &str,
    scratch: &Path,
) -> Result<(), String> {
    let shim = scratch.join("upload-pack-shim.sh");
    std::fs::write(
        &shim,
        format!(
            "#!/bin/sh\nexec 3>&1 1>&2\nexec {} --exact {shim_test} --nocapture --test-threads=1\n",
            std::env::current_exe()
                .map_err(|e| e.to_string())?
                .display()
        ),
    )
    .map_err(|e| e.to_string())?;
    let out = keystone_test_kit::git()
        .current_dir(host_repo)
        .args([
            "-c",
            "protocol.allow=always",
            "-c",
            "protocol.version=2",
            "fetch",
            "-q",
        ])
        .arg(format!("ext::sh {}", shim.display()))
        .arg(refspec)
        .env(SHIM_UDS_ENV, uds)
        .env(SHIM_REPO_ENV, guest_repo)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("HOME", scratch)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("run host git fetch: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "git fetch through the agent failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// The `ext::` helper of [`fetch_from_guest`]: when its env vars are set,
/// runs `git upload-pack` in the guest over a raw stream and pipes this
/// process's stdin and fd 3 to it. Does nothing otherwise.
pub fn upload_pack_shim() {
    use std::os::fd::FromRawFd;
    let (Ok(uds), Ok(repo)) = (std::env::var(SHIM_UDS_ENV), std::env::var(SHIM_REPO_ENV)) else {
        return;
    };
    let client = client(Path::new(&uds));
    let env = std::env::var("GIT_PROTOCOL")
        .map(|p| vec![("GIT_PROTOCOL".to_string(), p)])
        .unwrap_or_default();
    let raw = client
        .raw_stream(RawStreamRequest {
            argv: vec!["git".into(), "upload-pack".into(), repo],
            env,
            ..Default::default()
        })
        .expect("start git upload-pack in the guest");
    let (mut reader, mut writer) = raw.into_split();
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin(), &mut writer);
        let _ = writer.close_stdin();
    });
    // SAFETY: fd 3 is the helper's real stdout, set up by the shim script.
    let mut out = unsafe { std::fs::File::from_raw_fd(3) };
    std::io::copy(&mut reader, &mut out).expect("copy upload-pack output");
    let _ = out.flush();
    let exit = reader.wait().expect("upload-pack exit");
    assert!(
        exit.status.success(),
        "guest upload-pack: {:?} {}",
        exit.status,
        String::from_utf8_lossy(&exit.stderr)
    );
}

/// A guest program that tries `connect()` to vsock CID `argv[1]` on each
/// port that follows, printing one line per port; exit 0 when every
/// connect failed, 1 when one succeeded, 2 when no vsock socket could be
/// made at all.
pub const VSOCK_PROBE_C: &str = r#"
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

int main(int argc, char **argv) {
    if (argc < 3) { fprintf(stderr, "usage: vsock-probe CID PORT...\n"); return 3; }
    unsigned cid = (unsigned)strtoul(argv[1], 0, 10);
    int connected = 0;
    for (int i = 2; i < argc; i++) {
        unsigned port = (unsigned)strtoul(argv[i], 0, 10);
        int fd = socket(AF_VSOCK, SOCK_STREAM, 0);
        if (fd < 0) { printf("socket: errno=%d %s\n", errno, strerror(errno)); return 2; }
        struct sockaddr_vm sa;
        memset(&sa, 0, sizeof sa);
        sa.svm_family = AF_VSOCK;
        sa.svm_cid = cid;
        sa.svm_port = port;
        if (connect(fd, (struct sockaddr *)&sa, sizeof sa) == 0) {
            printf("cid %u port %u: CONNECTED\n", cid, port);
            connected = 1;
        } else {
            printf("cid %u port %u: errno=%d %s\n", cid, port, errno, strerror(errno));
        }
        fflush(stdout);
        close(fd);
    }
    return connected;
}
"#;

/// A guest program that tries, for `argv[2]` milliseconds (at least
/// once), to bind vsock port `argv[1]` on any CID, as whoever runs it:
/// prints `BOUND` and exits 1 the first time a bind succeeds, else prints
/// how many tries failed with which errno and exits 0.
pub const VSOCK_BIND_PROBE_C: &str = r#"
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

static long long now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long long)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

int main(int argc, char **argv) {
    if (argc < 3) { fprintf(stderr, "usage: vsock-bind-probe PORT MS\n"); return 3; }
    unsigned port = (unsigned)strtoul(argv[1], 0, 10);
    long long until = now_ms() + atoll(argv[2]);
    long tries = 0, eacces = 0, eaddrinuse = 0, other = 0;
    do {
        int fd = socket(AF_VSOCK, SOCK_STREAM, 0);
        if (fd < 0) { printf("socket: errno=%d\n", errno); return 2; }
        struct sockaddr_vm sa;
        memset(&sa, 0, sizeof sa);
        sa.svm_family = AF_VSOCK;
        sa.svm_cid = VMADDR_CID_ANY;
        sa.svm_port = port;
        tries++;
        if (bind(fd, (struct sockaddr *)&sa, sizeof sa) == 0) {
            printf("BOUND port %u after %ld tries\n", port, tries);
            return 1;
        }
        if (errno == EACCES) eacces++; else if (errno == EADDRINUSE) eaddrinuse++; else other++;
        close(fd);
        usleep(1000);
    } while (now_ms() < until);
    printf("tries=%ld eacces=%ld eaddrinuse=%ld other=%ld\n", tries, eacces, eaddrinuse, other);
    return 0;
}
"#;

/// Compiles [`VSOCK_PROBE_C`] statically with the host's `gcc` into `out`.
pub fn compile_vsock_probe(out: &Path) -> Result<(), String> {
    compile_static(VSOCK_PROBE_C, out)
}

/// Compiles the C program `source` statically with the host's `gcc` into
/// `out`.
pub fn compile_static(source: &str, out: &Path) -> Result<(), String> {
    let src = out.with_extension("c");
    std::fs::write(&src, source).map_err(|e| e.to_string())?;
    let res = Command::new("gcc")
        .args(["-static", "-O2", "-o"])
        .arg(out)
        .arg(&src)
        .output()
        .map_err(|e| format!("gcc not runnable ({e})"))?;
    let _ = std::fs::remove_file(&src);
    if res.status.success() {
        Ok(())
    } else {
        Err(format!(
            "gcc -static failed: {}",
            String::from_utf8_lossy(&res.stderr)
        ))
    }
}
