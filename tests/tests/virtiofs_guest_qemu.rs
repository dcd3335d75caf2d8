//! virtio-fs conformance with a real Linux guest: our guest kernel boots
//! under QEMU's software emulation (TCG) with its root on one
//! virtiofsd-lite instance (tag `root`) and a scratch workspace on a second
//! (tag `workspace`), both served on threads of this test process. The
//! guest's `/init` runs a suite of file-system checks on `/workspace`,
//! printing `CHECK <name> ok|FAIL <detail>` per check, then `SUITE-DONE`,
//! and reboots (which ends QEMU). The test then asserts every check passed
//! and verifies on the host what the guest wrote, and that no escape
//! attempt from the guest ever showed host content.
//!
//! One boot, many checks.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use guest_image::busybox::{BusyboxRoot, InitKind, DEFAULT_BUSYBOX};
use keystone_tests::fs_daemon::{assert_checks_pass, FsDaemon};
use keystone_tests::qemu::{qemu_missing, QemuGuest};
use keystone_tests::{busybox_missing, skip, ScratchDir};

const SUITE_TIMEOUT: Duration = Duration::from_secs(180);
/// `touch -d` in the guest (UTC: no TZ there) and the epoch it means.
const MTIME_DATE: &str = "2001-02-03 04:05:06";
const MTIME_EPOCH: i64 = 981_173_106;
const BIG_SIZE: u64 = 8 * 1024 * 1024;
const MANY_FILES: usize = 500;
/// The host uid and gid the workspace daemon maps guest root to
/// (`--translate-uid map:0:4242:1`, `--translate-gid map:0:4343:1`).
const MAPPED_ROOT: (u32, u32) = (4242, 4343);

/// Every check the guest must report `ok`.
const EXPECTED_CHECKS: &[&str] = &[
    "mount_workspace",
    "create_write_read",
    "append",
    "truncate_shell",
    "truncate_dd",
    "truncate_grow",
    "mkdir_rmdir",
    "rename_file",
    "rename_dir",
    "unlink",
    "hardlink_inode",
    "hardlink_count",
    "symlink_readlink",
    "symlink_follow",
    "chmod",
    "owner_guest_root",
    "owner_host_mapped",
    "owner_host_unmapped",
    "owner_chown_unmapped",
    "mtime_touch_d",
    "large_file_size",
    "large_file_md5",
    "random_file_md5",
    "readdir_500",
    "statfs_df",
    "mknod_block_denied",
    "setuid_stripped",
    "escape_dotdot_sentinel",
    "escape_dotdot_is_guest_root",
    "escape_symlink_up",
    "escape_abs_symlink_host_path",
    "escape_etc_shadow",
    "escape_host_made_symlinks",
    "escape_root_dotdot",
    "enospc_dd",
    "enospc_small_write",
    "enospc_append",
    "enospc_new_files",
];

/// The guest's `/init`. `@SENT@` is the host-only sentinel's file name,
/// `@HOSTSECRET@` the absolute host path of a secret file (a path only;
/// never its content).
const INIT_TEMPLATE: &str = r#"#!/bin/busybox sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
echo 1 > /proc/sys/kernel/printk
echo GUEST-INIT-START
W=/workspace
mkdir -p $W
ok() { echo "CHECK $1 ok"; }
fail() { echo "CHECK $1 FAIL $2" | tr '\n' ' '; echo; }
# res NAME GOT WANT
res() { if [ "$2" = "$3" ]; then ok "$1"; else fail "$1" "got [$2] want [$3]"; fi; }
# cond NAME DETAIL CMD...: ok when CMD succeeds
cond() { n=$1; d=$2; shift 2; if "$@"; then ok "$n"; else fail "$n" "$d"; fi; }

if mount -t virtiofs workspace $W; then ok mount_workspace; else fail mount_workspace "mount -t virtiofs workspace failed"; fi

echo hello-virtiofs > $W/hello.txt
res create_write_read "$(cat $W/hello.txt)" "hello-virtiofs"

echo line1 > $W/append.txt
echo line2 >> $W/append.txt
res append "$(cat $W/append.txt | tr '\n' ,)" "line1,line2,"

echo something > $W/trunc_shell
: > $W/trunc_shell
res truncate_shell "$(stat -c %s $W/trunc_shell)" 0
dd if=/dev/zero of=$W/trunc_dd bs=1024 count=10 2>/dev/null
dd if=/dev/null of=$W/trunc_dd bs=1 seek=100 2>/dev/null
res truncate_dd "$(stat -c %s $W/trunc_dd)" 100
echo abc > $W/trunc_grow
truncate -s 5000 $W/trunc_grow
res truncate_grow "$(stat -c %s $W/trunc_grow)" 5000

if mkdir $W/d1 && [ -d $W/d1 ] && rmdir $W/d1 && [ ! -e $W/d1 ]; then ok mkdir_rmdir; else fail mkdir_rmdir "mkdir/rmdir d1"; fi
mkdir -p $W/keep/sub

echo renamed-content > $W/old.txt
mv $W/old.txt $W/new.txt
res rename_file "$(cat $W/new.txt 2>&1):$([ -e $W/old.txt ] && echo old-left)" "renamed-content:"
mkdir $W/olddir
echo inner > $W/olddir/inner.txt
mv $W/olddir $W/newdir
res rename_dir "$(cat $W/newdir/inner.txt 2>&1):$([ -e $W/olddir ] && echo old-left)" "inner:"

echo doomed > $W/gone
rm $W/gone
cond unlink "gone still exists" [ ! -e $W/gone ]

echo linked > $W/hl_a
ln $W/hl_a $W/hl_b
ia=$(ls -li $W/hl_a | awk '{print $1}')
ib=$(ls -li $W/hl_b | awk '{print $1}')
if [ -n "$ia" ] && [ "$ia" = "$ib" ]; then ok hardlink_inode; else fail hardlink_inode "inodes [$ia] [$ib]"; fi
res hardlink_count "$(stat -c %h $W/hl_a)" 2

ln -s hello.txt $W/sym
res symlink_readlink "$(readlink $W/sym)" hello.txt
res symlink_follow "$(cat $W/sym 2>&1)" hello-virtiofs

echo m > $W/mode640
chmod 640 $W/mode640
res chmod "$(stat -c %a $W/mode640)" 640

# Owners: the workspace daemon runs with map:0:@HOSTUID@:1 (gid @HOSTGID@).
res owner_guest_root "$(stat -c %u:%g $W/hello.txt)" "0:0"
res owner_host_mapped "$(stat -c %u:%g $W/host_mapped)" "0:0"
res owner_host_unmapped "$(stat -c %u:%g $W/host_unmapped)" "7:8"
echo c > $W/chowned
chown 9:10 $W/chowned
res owner_chown_unmapped "$(stat -c %u:%g $W/chowned)" "9:10"

touch $W/mtime
touch -d "@MTIME_DATE@" $W/mtime
res mtime_touch_d "$(stat -c %Y $W/mtime)" @MTIME_EPOCH@

dd if=/dev/zero of=$W/big bs=1048576 count=8 2>/dev/null
sync
res large_file_size "$(stat -c %s $W/big)" @BIG_SIZE@
want=$(dd if=/dev/zero bs=1048576 count=8 2>/dev/null | md5sum | cut -d' ' -f1)
echo 3 > /proc/sys/vm/drop_caches
got=$(md5sum $W/big | cut -d' ' -f1)
res large_file_md5 "$got" "$want"
echo "MD5 big $got"

dd if=/dev/urandom of=/tmp/rand bs=65536 count=16 2>/dev/null
cp /tmp/rand $W/rand
want=$(md5sum /tmp/rand | cut -d' ' -f1)
echo 3 > /proc/sys/vm/drop_caches
got=$(md5sum $W/rand | cut -d' ' -f1)
res random_file_md5 "$got" "$want"
echo "MD5 rand $want"

mkdir $W/many
i=0
while [ $i -lt @MANY@ ]; do : > $W/many/f$i; i=$((i+1)); done
res readdir_500 "$(ls $W/many | wc -l)" @MANY@

if out=$(df $W 2>&1) && echo "$out" | grep -q "$W"; then ok statfs_df; else fail statfs_df "$out"; fi
echo "DF $(df $W | tail -1)"

out=$(mknod $W/blk b 8 0 2>&1); rc=$?
if [ $rc -ne 0 ] && echo "$out" | grep -qi "not permitted" && [ ! -e $W/blk ]; then ok mknod_block_denied; else fail mknod_block_denied "rc=$rc out=$out"; fi

echo s > $W/suid
chmod 4755 $W/suid
res setuid_stripped "$(stat -c %a $W/suid)" 755

# Escape attempts: every output goes to the console, so host content read
# by any of them would show there (the test asserts it never does).
out=$(cat $W/../@SENT@ 2>&1); rc=$?
echo "ESCAPE dotdot: rc=$rc $out"
if [ $rc -ne 0 ] && [ -z "$(find $W -name @SENT@ 2>/dev/null)" ]; then ok escape_dotdot_sentinel; else fail escape_dotdot_sentinel "rc=$rc"; fi
up=$(ls -a $W/.. | tr '\n' ' ')
echo "ESCAPE ls-dotdot: $up"
if echo " $up " | grep -q " init " && ! echo " $up " | grep -q "@SENT@"; then ok escape_dotdot_is_guest_root; else fail escape_dotdot_is_guest_root "$up"; fi
ln -s ../../.. $W/up
up=$(ls -a $W/up/ | tr '\n' ' ')
echo "ESCAPE ls-up: $up"
if echo " $up " | grep -q " init " && ! echo " $up " | grep -q "@SENT@"; then ok escape_symlink_up; else fail escape_symlink_up "$up"; fi
ln -s @HOSTSECRET@ $W/abslink
out=$(cat $W/abslink 2>&1); rc=$?
echo "ESCAPE abslink: rc=$rc $out"
cond escape_abs_symlink_host_path "rc=$rc" [ $rc -ne 0 ]
ln -s /etc/shadow $W/shadowlink
out=$(cat $W/shadowlink 2>&1); rc=$?
echo "ESCAPE shadow: rc=$rc $out"
if [ $rc -ne 0 ] && [ ! -e /etc/shadow ]; then ok escape_etc_shadow; else fail escape_etc_shadow "rc=$rc"; fi
out=$(cat $W/hostlink_rel $W/hostlink_abs 2>&1); rc=$?
echo "ESCAPE host-made symlinks: rc=$rc $out"
res escape_host_made_symlinks "$rc:$(readlink $W/hostlink_rel)" "1:../@SENT@"
out=$(cat /../@SENT@ /../../@SENT@ 2>&1); rc=$?
echo "ESCAPE root-dotdot: rc=$rc $out"
cond escape_root_dotdot "rc=$rc" [ $rc -ne 0 ]

# A full share (a 1 MiB tmpfs on the host, cached as the supervisor
# serves workspaces): every write says what the host said, ENOSPC.
S=/small
mkdir -p $S
if mount -t virtiofs small $S; then
  out=$(dd if=/dev/zero of=$S/fill bs=65536 count=64 2>&1); rc=$?
  if [ $rc -ne 0 ] && echo "$out" | grep -q "No space left"; then ok enospc_dd; else fail enospc_dd "rc=$rc $out"; fi
  out=$( (echo x > $S/after) 2>&1 ); rc=$?
  if [ $rc -ne 0 ] && echo "$out" | grep -q "No space left"; then ok enospc_small_write; else fail enospc_small_write "rc=$rc $out"; fi
  out=$( (echo y >> $S/fill) 2>&1 ); rc=$?
  if [ $rc -ne 0 ] && echo "$out" | grep -q "No space left"; then ok enospc_append; else fail enospc_append "rc=$rc $out"; fi
  i=0; out=ok
  while [ $i -lt 64 ]; do
    if ! e=$( (mkdir $S/d$i) 2>&1 ); then out=$e; break; fi
    i=$((i+1))
  done
  if echo "$out" | grep -q "No space left"; then ok enospc_new_files; else fail enospc_new_files "after $i: $out"; fi
  umount $S
else
  fail enospc_dd "mount -t virtiofs small failed"
fi

sync
echo SUITE-DONE
umount $W
reboot -f
"#;

/// Unmounts a mount point on drop.
struct Unmount(std::path::PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A virtiofsd-lite instance serving `dir` on a Unix socket from a thread.
/// Adds symlinks for every applet the host's busybox (the same static
/// binary the root gets) knows.
fn install_applets(root: &Path) {
    let list = Command::new(DEFAULT_BUSYBOX)
        .arg("--list")
        .output()
        .expect("busybox --list");
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        let link = root.join("bin").join(applet);
        if !applet.is_empty() && !applet.contains('/') && fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink("busybox", &link).expect("applet symlink");
        }
    }
}

fn host_md5(path: &Path) -> Option<String> {
    let out = Command::new("md5sum").arg(path).output().ok()?;
    let s = String::from_utf8_lossy(&out.stdout);
    s.split_whitespace().next().map(str::to_string)
}

#[test]
fn virtiofs_conformance_in_a_tcg_guest() {
    if let Some(reason) = qemu_missing() {
        skip!("{reason}");
    }
    if let Some(reason) = busybox_missing() {
        skip!("{reason}");
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        skip!("the suite gives host files to other users (the ID map checks): needs root");
    }
    let t0 = Instant::now();
    let kernel = guest_image::kernel::ensure_kernel().expect("guest kernel");

    // scratch/root            the guest's root (tag root)
    // scratch/host/workspace  the workspace (tag workspace)
    // scratch/host/<SENT>     host-only sentinel next to the workspace
    // scratch/<SENT>          and next to the root
    let scratch = ScratchDir::new("virtiofs-qemu");
    let root = scratch.path().join("root");
    let host = scratch.path().join("host");
    let ws = host.join("workspace");
    fs::create_dir_all(&ws).unwrap();
    let sent = format!("keystone-host-sentinel-{}", std::process::id());
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let secret = format!("HOST-ONLY-SECRET-{}-{nanos}", std::process::id());
    for p in [host.join(&sent), scratch.path().join(&sent)] {
        fs::write(&p, &secret).unwrap();
    }
    // Symlinks planted on the host inside the workspace, pointing at the
    // sentinel: the guest resolves them in its own namespace.
    std::os::unix::fs::symlink(format!("../{sent}"), ws.join("hostlink_rel")).unwrap();
    std::os::unix::fs::symlink(host.join(&sent), ws.join("hostlink_abs")).unwrap();
    BusyboxRoot::create(&root, Path::new(DEFAULT_BUSYBOX), InitKind::Shell, "")
        .expect("lay out the busybox root");
    install_applets(&root);
    let init = INIT_TEMPLATE
        .replace("@SENT@", &sent)
        .replace("@HOSTSECRET@", &host.join(&sent).display().to_string())
        .replace("@MTIME_DATE@", MTIME_DATE)
        .replace("@MTIME_EPOCH@", &MTIME_EPOCH.to_string())
        .replace("@BIG_SIZE@", &BIG_SIZE.to_string())
        .replace("@MANY@", &MANY_FILES.to_string())
        .replace("@HOSTUID@", &MAPPED_ROOT.0.to_string())
        .replace("@HOSTGID@", &MAPPED_ROOT.1.to_string());
    assert!(!init.contains(&secret));
    fs::write(root.join("init"), init).unwrap();
    fs::set_permissions(root.join("init"), fs::Permissions::from_mode(0o755)).unwrap();

    let root_fs = FsDaemon::start(scratch.path().join("root.sock"), &root, "root");
    // Guest root is host user 4242 in the workspace: what it makes is
    // 4242's on the host, and 4242's files are root's in the guest.
    let mut ws_cfg = virtiofsd_lite::FsConfig::new(&ws, "workspace");
    let map = |host: u32| {
        let rule = format!("map:0:{host}:1").parse().unwrap();
        virtiofsd_lite::IdMap::new(vec![rule]).unwrap()
    };
    ws_cfg.ids = virtiofsd_lite::IdMaps {
        uid: map(MAPPED_ROOT.0),
        gid: map(MAPPED_ROOT.1),
    };
    let (muid, mgid) = MAPPED_ROOT;
    fs::write(ws.join("host_mapped"), "").unwrap();
    std::os::unix::fs::chown(ws.join("host_mapped"), Some(muid), Some(mgid)).unwrap();
    fs::write(ws.join("host_unmapped"), "").unwrap();
    std::os::unix::fs::chown(ws.join("host_unmapped"), Some(7), Some(8)).unwrap();
    // The mapped root creates files as 4242 here: it needs the folder.
    std::os::unix::fs::chown(&ws, Some(muid), Some(mgid)).unwrap();
    let ws_fs = FsDaemon::start_with(scratch.path().join("ws.sock"), ws_cfg);
    // A share that fills up: 1 MiB and 32 inodes.
    let small = scratch.path().join("small");
    fs::create_dir_all(&small).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m,nr_inodes=32", "small"])
        .arg(&small)
        .status()
        .is_ok_and(|s| s.success());
    assert!(mounted, "mount a small tmpfs at {}", small.display());
    let _unmount = Unmount(small.clone());
    let mut small_cfg = virtiofsd_lite::FsConfig::new(&small, "small");
    small_cfg.cache = virtiofsd_lite::CacheMode::Always;
    let small_fs = FsDaemon::start_with(scratch.path().join("small.sock"), small_cfg);

    let t_boot = Instant::now();
    let mut guest = QemuGuest::builder(&kernel.vmlinux)
        .vhost_user_fs(&root_fs.socket, "root")
        .vhost_user_fs(&ws_fs.socket, "workspace")
        .vhost_user_fs(&small_fs.socket, "small")
        .virtiofs_root("root")
        .append("init=/init")
        .start()
        .expect("start qemu-system-x86_64");
    eprintln!("qemu {}", guest.args().join(" "));

    guest
        .wait_for("GUEST-INIT-START", SUITE_TIMEOUT)
        .unwrap_or_else(|e| panic!("guest /init did not start: {e}"));
    let to_init = guest.elapsed();
    guest
        .wait_for("SUITE-DONE", SUITE_TIMEOUT)
        .unwrap_or_else(|e| panic!("the guest suite did not finish: {e}"));
    let to_done = guest.elapsed();
    let status = guest
        .wait_exit(Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("guest did not reboot: {e}"));
    let console = guest.console();
    let tail = guest.console_tail(80);
    eprintln!(
        "timings: kernel+setup {:?}, boot to /init {to_init:?}, suite done {to_done:?}, \
         qemu exit {:?} ({status})",
        t_boot - t0,
        guest.elapsed()
    );
    drop(guest);
    assert!(
        status.success(),
        "QEMU exit {status}\nconsole tail:\n{tail}"
    );

    // The daemons return once QEMU disconnects.
    root_fs.assert_ended_cleanly(&tail);
    ws_fs.assert_ended_cleanly(&tail);
    small_fs.assert_ended_cleanly(&tail);

    // Guest-side results.
    let mut checks: BTreeMap<String, String> = BTreeMap::new();
    for line in console.lines() {
        if let Some(rest) = line.trim().strip_prefix("CHECK ") {
            let (name, verdict) = rest.split_once(' ').unwrap_or((rest, ""));
            checks.insert(name.to_string(), verdict.to_string());
        }
    }
    for line in console.lines().map(str::trim) {
        if ["CHECK ", "ESCAPE ", "DF ", "MD5 "]
            .iter()
            .any(|p| line.starts_with(p))
        {
            eprintln!("guest: {line}");
        }
    }
    assert_checks_pass(&checks, EXPECTED_CHECKS, &tail);
    assert!(
        !console.contains(&secret),
        "host-only content reached the guest console:\n{tail}"
    );

    // Host-side verification of what the guest wrote.
    let read = |name: &str| {
        fs::read_to_string(ws.join(name))
            .unwrap_or_else(|e| panic!("host read of {name}: {e}\nconsole tail:\n{tail}"))
    };
    let meta = |name: &str| {
        fs::symlink_metadata(ws.join(name))
            .unwrap_or_else(|e| panic!("host stat of {name}: {e}\nconsole tail:\n{tail}"))
    };
    let absent = |name: &str| {
        assert!(
            fs::symlink_metadata(ws.join(name)).is_err(),
            "{name} should not exist on the host\nconsole tail:\n{tail}"
        )
    };
    assert_eq!(read("hello.txt"), "hello-virtiofs\n", "{tail}");
    assert_eq!(read("append.txt"), "line1\nline2\n", "{tail}");
    assert_eq!(meta("trunc_shell").len(), 0, "{tail}");
    assert_eq!(meta("trunc_dd").len(), 100, "{tail}");
    assert_eq!(meta("trunc_grow").len(), 5000, "{tail}");
    assert!(meta("keep/sub").is_dir(), "{tail}");
    absent("d1");
    assert_eq!(read("new.txt"), "renamed-content\n", "{tail}");
    absent("old.txt");
    assert_eq!(read("newdir/inner.txt"), "inner\n", "{tail}");
    absent("olddir");
    absent("gone");
    let (a, b) = (meta("hl_a"), meta("hl_b"));
    assert_eq!(a.ino(), b.ino(), "hard link inodes on the host\n{tail}");
    assert_eq!(a.nlink(), 2, "hard link count on the host\n{tail}");
    assert_eq!(read("hl_b"), "linked\n", "{tail}");
    assert_eq!(
        fs::read_link(ws.join("sym")).unwrap(),
        Path::new("hello.txt")
    );
    assert_eq!(fs::read_link(ws.join("up")).unwrap(), Path::new("../../.."));
    assert_eq!(
        fs::read_link(ws.join("shadowlink")).unwrap(),
        Path::new("/etc/shadow")
    );
    assert_eq!(meta("mode640").mode() & 0o7777, 0o640, "{tail}");
    let owner = |name: &str| (meta(name).uid(), meta(name).gid());
    for name in ["hello.txt", "newdir", "newdir/inner.txt", "sym", "big"] {
        assert_eq!(
            owner(name),
            MAPPED_ROOT,
            "{name}: guest root's file\n{tail}"
        );
    }
    assert_eq!(owner("chowned"), (9, 10), "{tail}");
    assert_eq!(meta("suid").mode() & 0o7777, 0o755, "setuid kept\n{tail}");
    assert_eq!(meta("mtime").mtime(), MTIME_EPOCH, "{tail}");
    let big = fs::read(ws.join("big")).unwrap();
    assert_eq!(big.len() as u64, BIG_SIZE, "{tail}");
    assert!(big.iter().all(|&b| b == 0), "big is not all zeros\n{tail}");
    for (name, tag) in [("big", "MD5 big "), ("rand", "MD5 rand ")] {
        let guest_md5 = console
            .lines()
            .find_map(|l| l.trim().strip_prefix(tag))
            .map(str::trim)
            .unwrap_or_else(|| panic!("no {tag:?} line\n{tail}"));
        if let Some(h) = host_md5(&ws.join(name)) {
            assert_eq!(h, guest_md5, "{name} md5 host vs guest\n{tail}");
        }
    }
    assert_eq!(meta("rand").len(), 1 << 20, "{tail}");
    assert_eq!(
        fs::read_dir(ws.join("many")).unwrap().count(),
        MANY_FILES,
        "{tail}"
    );
    absent("blk");
    for p in [host.join(&sent), scratch.path().join(&sent)] {
        assert_eq!(fs::read_to_string(&p).unwrap(), secret, "sentinel changed");
    }
    eprintln!(
        "virtiofs guest suite: {} checks ok, total {:?}",
        checks.len(),
        t0.elapsed()
    );
}
