//! The Debian guest root file system (`guest-image/rootfs/build.sh`) in a
//! real Linux guest: our guest kernel boots under QEMU's software emulation
//! (TCG) with the cached rootfs folder as its root, served by one
//! virtiofsd-lite instance (tag `root`) and mounted read-only, and a scratch
//! workspace on a second one (tag `workspace`).
//!
//! Nothing is written into the cached rootfs: the kernel starts
//! `/bin/bash -c "mount -t virtiofs workspace /workspace && exec bash
//! /workspace/check"` as PID 1 (the unknown words on the kernel command line
//! become init's arguments; they may hold neither `=` nor `.`), and the
//! script checks the tools, the `agent` user, git, direnv and the read-only
//! root, printing `ROOTFS-CHECK ok|FAIL <name> ...` per check and
//! `ROOTFS-DONE`. The rootfs has no `reboot` (no systemd), so the script then
//! exits: the kernel panics on init's exit, `panic=-1` reboots at once and
//! QEMU's `-no-reboot` ends it. The test asserts every check passed and
//! verifies on the host the git commit the guest made in the workspace.
//!
//! One boot, many checks.

use std::collections::BTreeMap;
use std::fs;
use std::time::{Duration, Instant};

use guest_image::rootfs::{ensure_rootfs, RootfsError};
use keystone_tests::fs_daemon::{assert_checks_pass, FsDaemon};
use keystone_tests::qemu::{qemu_missing, QemuGuest};
use keystone_tests::{skip, ScratchDir};

const SUITE_TIMEOUT: Duration = Duration::from_secs(300);

/// Every check the guest must report `ok`.
const EXPECTED_CHECKS: &[&str] = &[
    "debian_12",
    "root_readonly",
    "hostname_file",
    "hosts_file",
    "resolv_conf_in_run",
    "bash_version",
    "coreutils",
    "git_version",
    "rsync_version",
    "direnv_version",
    "tmux_version",
    "zellij_version",
    "curl_version",
    "ssh_version",
    "xz_version",
    "nano_less",
    "ca_certificates",
    "procps_ps",
    "iproute2_ip",
    "id_agent",
    "agent_home_shell",
    "runuser_agent",
    "git_safe_directory",
    "git_commit",
    "rsync_copy",
    "direnv_bashrc_hook",
    "direnv_workspace_allowed",
    "tmux_session",
    "no_docs",
    "workspace_mountpoints",
];

/// The guest's check script, run by bash as PID 1 from the workspace share.
const CHECK_SCRIPT: &str = r#"#!/bin/bash
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C.UTF-8 TERM=dumb
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mountpoint -q /dev || mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts 2>/dev/null
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
echo 1 > /proc/sys/kernel/printk
echo ROOTFS-INIT-START
echo "ROOTFS-INFO kernel: $(uname -r), date: $(date -u +%FT%TZ)"
cd /
ok() { echo "ROOTFS-CHECK ok $1"; }
fail() { echo "ROOTFS-CHECK FAIL $1 $(echo "$2" | tr '\n' ' ')"; }
# res NAME GOT WANT
res() { if [ "$2" = "$3" ]; then ok "$1"; else fail "$1" "got [$2] want [$3]"; fi; }
# has NAME OUTPUT PATTERN: ok when OUTPUT contains PATTERN
has() { case "$2" in *"$3"*) ok "$1";; *) fail "$1" "[$2] lacks [$3]";; esac; }
show() { echo "ROOTFS-INFO $1: $(echo "$2" | head -n1)"; }

res debian_12 "$(cut -d. -f1 /etc/debian_version)" 12
out=$(touch /keystone-write-test 2>&1); rc=$?
if [ $rc -ne 0 ] && [ ! -e /keystone-write-test ]; then ok root_readonly; else fail root_readonly "rc=$rc $out"; fi
res hostname_file "$(cat /etc/hostname)" sandbox
has hosts_file "$(cat /etc/hosts)" "sandbox"
res resolv_conf_in_run "$(readlink /etc/resolv.conf)" /run/resolv.conf

v=$(bash --version 2>&1); show bash "$v"; has bash_version "$v" "GNU bash, version 5.2"
v=$(ls --version 2>&1); show coreutils "$v"; has coreutils "$v" "GNU coreutils"
v=$(git --version 2>&1); show git "$v"; has git_version "$v" "git version 2."
v=$(rsync --version 2>&1); show rsync "$v"; has rsync_version "$v" "rsync  version 3."
v=$(direnv version 2>&1); show direnv "$v"; has direnv_version "$v" "2."
v=$(tmux -V 2>&1); show tmux "$v"; has tmux_version "$v" "tmux 3."
v=$(zellij --version 2>&1); show zellij "$v"; has zellij_version "$v" "zellij 0.45"
v=$(curl --version 2>&1); show curl "$v"; has curl_version "$v" "curl 7."
v=$(ssh -V 2>&1); show ssh "$v"; has ssh_version "$v" "OpenSSH_9"
v=$(xz --version 2>&1); show xz "$v"; has xz_version "$v" "xz (XZ Utils) 5."
if command -v nano >/dev/null && command -v less >/dev/null; then ok nano_less; else fail nano_less "nano or less missing"; fi
if [ -s /etc/ssl/certs/ca-certificates.crt ]; then ok ca_certificates; else fail ca_certificates "no /etc/ssl/certs/ca-certificates.crt"; fi
res procps_ps "$(ps -o pid= -p 1 | tr -d ' ')" 1
has iproute2_ip "$(ip link show lo 2>&1)" "lo:"

v=$(id agent 2>&1); show id-agent "$v"
# The agent user, in the kvm group (it runs VMs with nested virtualization).
res id_agent "$(id -u agent):$(id -g agent):$(id -nG agent)" "1000:1000:agent kvm"
res agent_home_shell "$(getent passwd agent | cut -d: -f6,7)" "/home/agent:/bin/bash"
res runuser_agent "$(runuser -u agent -- id -un 2>&1)" agent

res git_safe_directory "$(git config --system --get-all safe.directory)" "*"
mkdir -p /workspace/repo && cd /workspace/repo
git init -q 2>&1
git config user.name "Keystone Test"
git config user.email "test@keystone.invalid"
echo "hello from the debian guest" > README
git add README
git commit -q -m "guest commit" 2>&1
res git_commit "$(git log --format=%s 2>&1)" "guest commit"
echo "ROOTFS-INFO head: $(git rev-parse HEAD 2>&1)"
cd /

out=$(rsync -a /workspace/repo/ /tmp/repo-copy/ 2>&1)
res rsync_copy "$(cat /tmp/repo-copy/README 2>&1)" "hello from the debian guest"

has direnv_bashrc_hook "$(cat /etc/bash.bashrc)" 'eval "$(direnv hook bash)"'
mkdir -p /workspace/proj
echo 'export KEYSTONE_DIRENV=loaded' > /workspace/proj/.envrc
out=$(cd /workspace/proj && HOME=/tmp DIRENV_CONFIG=/etc/direnv direnv exec /workspace/proj bash -c 'echo "[$KEYSTONE_DIRENV]"' 2>&1)
has direnv_workspace_allowed "$out" "[loaded]"

out=$(tmux -S /tmp/tmux.sock new-session -d -s ks 'sleep 30' 2>&1 && tmux -S /tmp/tmux.sock list-sessions -F '#{session_name}' 2>&1)
res tmux_session "$out" ks
tmux -S /tmp/tmux.sock kill-server 2>/dev/null

res no_docs "$(find /usr/share/doc /usr/share/man -mindepth 1 2>/dev/null | wc -l)" 0
if mountpoint -q /workspace && [ -d /mnt ] && [ -d /home/agent ]; then ok workspace_mountpoints; else fail workspace_mountpoints "missing"; fi

sync
echo ROOTFS-DONE
# No reboot binary without systemd: init exits, the kernel panics and
# reboots (panic=-1), QEMU exits (-no-reboot).
exit 0
"#;

/// A virtiofsd-lite instance serving `dir` on a Unix socket from a thread.
#[test]
fn debian_rootfs_boots_and_has_the_tools() {
    if let Some(reason) = qemu_missing() {
        skip!("{reason}");
    }
    let t0 = Instant::now();
    let rootfs = match ensure_rootfs() {
        Ok(r) => r,
        Err(e @ RootfsError::Unavailable) => skip!("{e}"),
        Err(e) => panic!("guest rootfs: {e}"),
    };
    let t_rootfs = t0.elapsed();
    let kernel = guest_image::kernel::ensure_kernel().expect("guest kernel");
    let packages = rootfs.packages();
    eprintln!(
        "rootfs {} ({} packages, {t_rootfs:?})",
        rootfs.dir.display(),
        packages.len()
    );
    if rootfs.manifest.is_some() {
        for want in ["git", "rsync", "direnv", "tmux", "bash", "ca-certificates"] {
            assert!(
                packages.iter().any(|(p, _)| p == want),
                "{want} not in the manifest {:?}",
                rootfs.manifest
            );
        }
        assert!(
            !packages.iter().any(|(p, _)| p == "systemd"),
            "systemd in the rootfs"
        );
    }

    let scratch = ScratchDir::new("rootfs-qemu");
    let ws = scratch.path().join("workspace");
    fs::create_dir_all(&ws).unwrap();
    fs::write(ws.join("check"), CHECK_SCRIPT).unwrap();

    let root_fs = FsDaemon::start(scratch.path().join("root.sock"), &rootfs.dir, "root");
    let ws_fs = FsDaemon::start(scratch.path().join("ws.sock"), &ws, "workspace");

    let t_boot = Instant::now();
    let mut guest = QemuGuest::builder(&kernel.vmlinux)
        .memory_mib(512)
        .vhost_user_fs(&root_fs.socket, "root")
        .vhost_user_fs(&ws_fs.socket, "workspace")
        .virtiofs_root("root")
        // `ro` after the builder's `rw`: the last one wins.
        .append("ro init=/bin/bash")
        .append(r#"-c "mount -t virtiofs workspace /workspace && exec bash /workspace/check""#)
        .start()
        .expect("start qemu-system-x86_64");
    eprintln!("qemu {}", guest.args().join(" "));

    guest
        .wait_for("ROOTFS-INIT-START", SUITE_TIMEOUT)
        .unwrap_or_else(|e| panic!("the check script did not start: {e}"));
    let to_init = guest.elapsed();
    guest
        .wait_for("ROOTFS-DONE", SUITE_TIMEOUT)
        .unwrap_or_else(|e| panic!("the guest checks did not finish: {e}"));
    let to_done = guest.elapsed();
    let status = guest
        .wait_exit(Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("guest did not end after init exited: {e}"));
    let console = guest.console();
    let tail = guest.console_tail(80);
    eprintln!(
        "timings: rootfs {t_rootfs:?}, kernel+setup {:?}, boot to check script {to_init:?}, \
         checks done {to_done:?}, qemu exit {:?} ({status})",
        t_boot - t0,
        guest.elapsed()
    );
    drop(guest);
    assert!(
        status.success(),
        "QEMU exit {status}\nconsole tail:\n{tail}"
    );

    root_fs.assert_ended_cleanly(&tail);
    ws_fs.assert_ended_cleanly(&tail);

    let mut checks: BTreeMap<String, String> = BTreeMap::new();
    for line in console.lines().map(str::trim) {
        if line.starts_with("ROOTFS-CHECK ") || line.starts_with("ROOTFS-INFO ") {
            eprintln!("guest: {line}");
        }
        if let Some(rest) = line.strip_prefix("ROOTFS-CHECK ") {
            let (verdict, rest) = rest.split_once(' ').unwrap_or((rest, ""));
            let (name, detail) = rest.split_once(' ').unwrap_or((rest, ""));
            checks.insert(name.to_string(), format!("{verdict} {detail}"));
        }
    }
    assert_checks_pass(&checks, EXPECTED_CHECKS, &tail);

    // The commit the guest made, seen by the host's git.
    let repo = ws.join("repo");
    let log = keystone_test_kit::git()
        .arg("-c")
        .arg("safe.directory=*")
        .arg("-C")
        .arg(&repo)
        .args(["log", "--oneline"])
        .output();
    match log {
        Ok(out) => {
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success() && text.contains("guest commit"),
                "host git log in {}: {}{}",
                repo.display(),
                text,
                String::from_utf8_lossy(&out.stderr)
            );
            eprintln!("host git log: {}", text.trim());
        }
        Err(e) => {
            // No host git: check the objects the commit must have made.
            eprintln!("host git not runnable ({e}); checking the repository files");
            let head = fs::read_to_string(repo.join(".git/HEAD")).unwrap();
            let branch = head.trim().trim_start_matches("ref: ");
            assert!(repo.join(".git").join(branch).is_file(), "no {branch}");
        }
    }
    assert_eq!(
        fs::read_to_string(repo.join("README")).unwrap(),
        "hello from the debian guest\n"
    );
    assert!(
        !rootfs.dir.join("keystone-write-test").exists(),
        "the guest wrote into the cached rootfs"
    );
    eprintln!(
        "rootfs guest suite: {} checks ok, total {:?}",
        checks.len(),
        t0.elapsed()
    );
}
