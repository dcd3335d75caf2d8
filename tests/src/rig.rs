//! A hardware-style KVM on a host that has none: the tests of our VMM on
//! real VMX/SVM semantics (the `host` CPU template, nested
//! virtualization, the VMM engine end to end) run inside a QEMU TCG guest
//! whose CPU is `-cpu max` (AuthenticAMD with SVM and nested paging). Our
//! guest kernel has kvm_amd built in, so that guest ("L1") gets a
//! `/dev/kvm` with hardware semantics; see `shared/KVM-HERE.md`.
//!
//! L1 boots a busybox initramfs whose `/init` mounts this host's root
//! read-only over virtio-fs (virtiofsd-lite here), puts fresh `/tmp`,
//! `/run` and `/dev` mounts over it, and runs one command there as root:
//! the test binary itself, asked to run one test (see [`run_in_l1`]). So a
//! test reads:
//!
//! ```no_run
//! # fn checks() {}
//! #[test]
//! fn something_on_hardware_kvm() {
//!     match keystone_tests::rig::where_to_run("something_on_hardware_kvm") {
//!         keystone_tests::rig::Where::Here => checks(),
//!         keystone_tests::rig::Where::Done => {}
//!     }
//! }
//! ```
//!
//! On a host whose KVM is hardware the checks run here; on a kvm_pvm host
//! the test boots L1 and runs itself there, and passes when the inner run
//! passed; where neither can run it prints `SKIP:` with the reason.
//!
//! L1 is an emulated machine and at times fails as one: it dies, or it
//! stops running (QEMU 7.2's TCG, now and then, while L1 runs an L2
//! guest; see [`RigError::Stalled`]). L1's `/init` prints a heartbeat, by
//! which such a stop is told within a minute from a test that is only
//! slow; a test whose L1 died, stopped or ran past its time gets one more
//! L1, and a test that failed inside L1 none.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use keystone_test_kit::ScratchDir;

use crate::fs_daemon::FsDaemon;
use crate::qemu::{qemu_missing, QemuGuest};

/// Set in L1 for the inner run (so it never boots another L1).
pub const INNER_ENV: &str = "KEYSTONE_RIG_INNER";
/// L1's CPU: AMD SVM with nested paging.
pub const L1_CPU: &str = "max";

/// L1's kernel options beyond the TCG ones: the host's TSC frequency
/// (L1's, under TCG), without which a loaded host makes L1's TSC
/// calibration fail and every KVM_RUN in L1 hang (see
/// `vmm::arch::x86_64::tsc`).
fn l1_cmdline(script: &Path) -> String {
    let tsc = vmm::host::tsc_khz()
        .map(|khz| format!(" tsc_early_khz={khz}"))
        .unwrap_or_default();
    format!("rdinit=/init quiet{tsc} rig.cmd={}", script.display())
}
/// The marker L1's `/init` prints once the host root is mounted.
const UP_MARKER: &str = "RIG-L1-UP";
/// The marker before the inner command's exit code.
const EXIT_MARKER: &str = "RIG-EXIT ";
/// What starts every line L1's `/init` adds to the console while the
/// command runs: the heartbeat and the thread states.
pub const RIG_LINE: &str = "RIG-L1-";
/// The heartbeat L1's `/init` prints every 10 s while the command runs.
const BEAT_MARKER: &str = "RIG-L1-ALIVE ";
/// How long L1 may go without a heartbeat before it counts as stopped
/// (six beats: L1's user space gets the CPU within a second or two even
/// when its vCPU is busy, and L1's clock follows this host's).
pub const STALL_LIMIT: Duration = Duration::from_secs(60);

/// How big L1 is.
#[derive(Clone, Debug)]
pub struct RigSize {
    /// L1's memory, MiB (room for the sandboxes it runs).
    pub memory_mib: u32,
    /// L1's vCPUs (each a TCG thread on this host). One by default
    /// (`KEYSTONE_RIG_VCPUS` sets another count): with two, L1's kernel
    /// crashed now and then in the threads that run KVM_RUN (a double
    /// fault, a stack guard page hit, a corrupted preempt count) and L2
    /// guests triple-faulted, signs of TCG emulating SVM on several
    /// threads at once; with one, L2's vCPUs share L1's and the rig's
    /// tests take about as long.
    pub vcpus: u32,
    /// L1's QEMU CPU model: [`L1_CPU`] unless `KEYSTONE_RIG_CPU` names
    /// another (with SVM, for the rig to mean anything).
    pub cpu: String,
    /// The longest the whole L1 run may take: 600 s unless
    /// `KEYSTONE_RIG_TIMEOUT_S` says otherwise.
    pub timeout: Duration,
    /// How long L1 may go without a heartbeat ([`STALL_LIMIT`]).
    pub stall_limit: Duration,
}

impl Default for RigSize {
    fn default() -> Self {
        Self {
            memory_mib: 3072,
            vcpus: std::env::var("KEYSTONE_RIG_VCPUS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(1),
            cpu: std::env::var("KEYSTONE_RIG_CPU").unwrap_or_else(|_| L1_CPU.to_string()),
            // Some 8x what the longest rig test takes (agent_e2e_vmm,
            // 70-85 s): a run past it has hung.
            timeout: Duration::from_secs(
                std::env::var("KEYSTONE_RIG_TIMEOUT_S")
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(600),
            ),
            stall_limit: STALL_LIMIT,
        }
    }
}

/// Where a hardware-KVM test's checks run.
pub enum Where {
    /// Here: this host's KVM is hardware (or this is L1).
    Here,
    /// Elsewhere, already done: the test ran in L1 and passed, or skipped.
    Done,
}

/// Whether `/dev/kvm` here has hardware semantics (not kvm_pvm).
pub fn hardware_kvm_here() -> bool {
    crate::kvm_unusable().is_none()
        && vmm::host::detect_kind(Path::new("/sys/module")) == vmm::KvmKind::Hardware
}

/// Decides where the test `name` (its path as the test harness names it)
/// runs its checks with a default-sized L1; see [`where_to_run_with`].
pub fn where_to_run(name: &str) -> Where {
    where_to_run_with(name, &RigSize::default())
}

/// [`Where::Here`] when this host's KVM is hardware or this is L1;
/// otherwise runs the test in L1 (panicking if it failed there) or skips.
pub fn where_to_run_with(name: &str, size: &RigSize) -> Where {
    if std::env::var_os(INNER_ENV).is_some() {
        assert!(
            hardware_kvm_here(),
            "inside the rig's L1 guest, /dev/kvm should be kvm_amd: {}",
            crate::kvm_unusable().unwrap_or_else(|| "it is paravirtual".into())
        );
        return Where::Here;
    }
    if hardware_kvm_here() {
        return Where::Here;
    }
    if let Some(why) = rig_missing() {
        println!("SKIP: {name}: no hardware KVM here, and no rig to emulate one: {why}");
        return Where::Done;
    }
    let t = Instant::now();
    let outcome = match run_in_l1(name, size) {
        // L1 itself died (its kernel panicked, QEMU exited), stopped
        // running or hung before the test ended: the emulated machine
        // failed, not the test, which gets one more L1 (and says so). A test that fails in
        // L1 is never rerun.
        Err(e @ (RigError::L1Died(_) | RigError::TimedOut(_) | RigError::Stalled(_))) => {
            eprintln!("rig: {e}\nrig: booting a new L1 once more for {name}");
            run_in_l1(name, size)
        }
        other => other,
    };
    eprintln!("rig: {name} in L1 took {:.1?}", t.elapsed());
    match outcome {
        Ok(()) => Where::Done,
        Err(e) => panic!("{name} failed inside the rig's L1 guest:\n{e}"),
    }
}

/// Why the rig cannot run here, if it cannot.
pub fn rig_missing() -> Option<String> {
    if let Some(why) = qemu_missing() {
        return Some(why);
    }
    if let Some(why) = crate::busybox_missing() {
        return Some(why);
    }
    match guest_image::kernel::ensure_kernel() {
        Ok(k) if k.vmlinux.is_file() => None,
        Ok(k) => Some(format!("no guest kernel at {}", k.vmlinux.display())),
        Err(e) => Some(format!("no guest kernel: {e}")),
    }
}

/// The L1 `/init`: mounts the host root read-only with fresh writable
/// mounts over it, and runs `rig.cmd` there (a script path on the host).
const L1_INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
ip link set lo up
if ! mount -t virtiofs hostroot /mnt -o ro; then echo "RIG: cannot mount the host root"; reboot -f; fi
mount --bind /proc /mnt/proc
mount --bind /sys /mnt/sys
mount -t devtmpfs dev /mnt/dev
mkdir -p /mnt/dev/pts /mnt/dev/shm
mount -t devpts -o mode=0620,ptmxmode=0666 devpts /mnt/dev/pts
mount -t tmpfs -o mode=1777 shm /mnt/dev/shm
mount -t tmpfs -o mode=1777 tmp /mnt/tmp
mount -t tmpfs -o mode=0755 run /mnt/run
echo RIG-L1-UP
# A heartbeat every 10 s (`BEAT_MARKER`), by which the host tells an L1
# that stopped running at all from a test that is slow; from the third
# minute on, once a minute, the state of every user thread (state, what it
# waits in, CPU ticks), to show where a slow run spends its time.
(
  n=0
  while sleep 10; do
    n=$((n + 1))
    echo "RIG-L1-ALIVE uptime=$(cut -d' ' -f1 /proc/uptime) load=$(cut -d' ' -f1-3 /proc/loadavg)"
    [ "$n" -ge 18 ] && [ $((n % 6)) -eq 0 ] || continue
    for t in /proc/[0-9]*/task/[0-9]*; do
      [ -s "${t%/task/*}/cmdline" ] || continue
      read -r stat < "$t/stat" || continue
      rest=${stat##*) }
      set -- $rest
      echo "RIG-L1-THREAD ${t#/proc/} $(cat "$t/comm") state=$1 wchan=$(cat "$t/wchan") utime=${12} stime=${13}"
    done 2>/dev/null
  done
) &
beat=$!
cmd=$(sed -n 's/.*rig\.cmd=\([^ ]*\).*/\1/p' /proc/cmdline)
chroot /mnt /bin/sh "$cmd"
code=$?
kill $beat
echo "RIG-EXIT $code"
reboot -f
"#;

/// A folder on this host that L1 sees at the same path (L1's `/tmp` is its
/// own).
fn shared_scratch(name: &str) -> PathBuf {
    let base = PathBuf::from("/var/tmp/keystone-rig");
    let safe: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    base.join(format!("rig-{safe}-{}", std::process::id()))
}

/// Single-quotes `s` for sh.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Boots L1 and runs this test binary's test `name` there, with the
/// environment the guest tests need (kernel and rootfs folders from this
/// host, writable homes and caches in L1's `/tmp`). `Ok` when the inner
/// run passed; the error says how it ended (L1's console is printed).
pub fn run_in_l1(name: &str, size: &RigSize) -> Result<(), RigError> {
    let kernel =
        guest_image::kernel::ensure_kernel().map_err(|e| RigError::Failed(e.to_string()))?;
    let exe = std::env::current_exe().map_err(|e| RigError::Failed(e.to_string()))?;
    // What the inner test needs from this host's environment.
    let mut env = vec![
        (INNER_ENV.to_string(), "1".to_string()),
        (
            "PATH".into(),
            "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin".into(),
        ),
        ("HOME".into(), "/tmp/home".into()),
        ("TMPDIR".into(), "/tmp".into()),
        ("XDG_CACHE_HOME".into(), "/tmp/cache".into()),
        ("RUST_BACKTRACE".into(), "1".into()),
        (
            "KEYSTONE_KERNEL_DIR".into(),
            kernel.dir.display().to_string(),
        ),
    ];
    if let Ok(rootfs) = guest_image::rootfs::ensure_rootfs() {
        env.push((
            "KEYSTONE_ROOTFS_DIR".into(),
            rootfs.dir.display().to_string(),
        ));
    }
    for (key, value) in std::env::vars() {
        let passed = key.starts_with("KEYSTONE_") && !env.iter().any(|(k, _)| *k == key);
        if passed {
            env.push((key, value));
        }
    }
    let exports: String = env
        .iter()
        .map(|(k, v)| format!("export {k}={}\n", sh_quote(v)))
        .collect();
    let script = format!(
        "{exports}mkdir -p /tmp/home /tmp/cache\ncd /tmp\n{} --exact {} --nocapture --test-threads=1\n",
        sh_quote(&exe.display().to_string()),
        sh_quote(name)
    );
    let (code, inner) = boot_l1(name, &script, size)?;
    eprintln!("rig: L1's console:\n{inner}");
    // The inner run's skips are this run's skips.
    for line in inner.lines().filter(|l| l.starts_with("SKIP:")) {
        println!("{line}");
    }
    let passed = inner
        .lines()
        .any(|l| l.starts_with("test result: ok. 1 passed"));
    if code == "0" && passed {
        Ok(())
    } else {
        Err(RigError::Failed(format!(
            "the inner run of {name} exited {code} (see L1's console above)"
        )))
    }
}

/// Why a run in L1 did not pass.
#[derive(Debug)]
pub enum RigError {
    /// L1 itself stopped (QEMU exited, L1's kernel panicked) before the
    /// command ended; the console tail says how.
    L1Died(String),
    /// L1 did not come up, or the command did not end, within the rig's
    /// time (`RigSize::timeout`); the console tail says how far it got.
    TimedOut(String),
    /// L1 stopped running: no heartbeat from its `/init` for
    /// `RigSize::stall_limit`, and so neither its kernel nor its user space ran
    /// (seen with QEMU 7.2's TCG while L1 ran an L2 guest: the emulated CPU
    /// was in L2's kernel, spinning for a lock with interrupts off, while
    /// L2's two vCPUs shared L1's one).
    Stalled(String),
    /// The command or test failed in L1, or L1 could not be set up.
    Failed(String),
}

impl RigError {
    /// The same error with its text mapped by `f`.
    fn map(self, f: impl FnOnce(String) -> String) -> Self {
        match self {
            RigError::L1Died(why) => RigError::L1Died(f(why)),
            RigError::TimedOut(why) => RigError::TimedOut(f(why)),
            RigError::Stalled(why) => RigError::Stalled(f(why)),
            RigError::Failed(why) => RigError::Failed(f(why)),
        }
    }
}

impl std::fmt::Display for RigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RigError::L1Died(why) => write!(f, "L1 died: {why}"),
            RigError::TimedOut(why) => write!(f, "L1 ran past its time: {why}"),
            RigError::Stalled(why) => write!(f, "L1 stopped running: {why}"),
            RigError::Failed(why) => f.write_str(why),
        }
    }
}

/// Boots L1 and runs the shell script `script` there as root (host root
/// read-only, `/tmp` writable and L1's own), for work that is not one
/// test: a benchmark, say. Returns L1's console after L1 came up (the
/// script's output, the inner exit code on the `RIG-EXIT` line) when the
/// script exited 0; the error carries that console too.
pub fn run_command_in_l1(script: &str, size: &RigSize) -> Result<String, String> {
    let (code, inner) = boot_l1("command", script, size).map_err(|e| e.to_string())?;
    if code == "0" {
        Ok(inner)
    } else {
        Err(format!(
            "the command exited {code} in L1; L1's console:\n{inner}"
        ))
    }
}

/// Waits until L1 prints the command's exit code. Fails when QEMU exits
/// first, at `deadline`, or when L1 goes `stall_limit` without a
/// heartbeat: it stopped running (its kernel and its user space alike),
/// which no command in it can cause.
fn wait_for_exit(
    guest: &mut QemuGuest,
    deadline: Instant,
    stall_limit: Duration,
) -> Result<(), RigError> {
    let mut beats = 0;
    let mut last_beat = Instant::now();
    loop {
        let wait = (Instant::now() + Duration::from_secs(1))
            .min(deadline)
            .saturating_duration_since(Instant::now());
        match guest.wait_for(EXIT_MARKER, wait) {
            Ok(()) => return Ok(()),
            Err(e) if guest.exited() => return Err(RigError::L1Died(e)),
            Err(e) if Instant::now() >= deadline => return Err(RigError::TimedOut(e)),
            Err(_) => {}
        }
        let now_beats = guest.console().matches(BEAT_MARKER).count();
        if now_beats != beats {
            beats = now_beats;
            last_beat = Instant::now();
        } else if last_beat.elapsed() >= stall_limit {
            return Err(RigError::Stalled(format!(
                "no heartbeat from L1 for {:.0?} (after {beats} beats)",
                last_beat.elapsed()
            )));
        }
    }
}

/// Boots L1 with `script` as the command its `/init` runs, waits for it
/// to end (or `size.timeout`), and returns its exit code (as L1 printed
/// it; `?` when it did not) and L1's console after L1 came up.
fn boot_l1(label: &str, script: &str, size: &RigSize) -> Result<(String, String), RigError> {
    let failed = |e: String| RigError::Failed(e);
    let kernel = guest_image::kernel::ensure_kernel().map_err(|e| failed(e.to_string()))?;
    let scratch = ScratchDir::at(shared_scratch(label));
    let dir = scratch.path();
    let busybox = std::fs::read(guest_image::busybox::DEFAULT_BUSYBOX)
        .map_err(|e| failed(format!("busybox: {e}")))?;
    let mut archive = guest_image::initramfs::Archive::new();
    archive
        .dir("bin", 0o755)
        .file("bin/busybox", 0o755, &busybox)
        .dir("dev", 0o755)
        .char_dev("dev/console", 0o600, 5, 1)
        .dir("proc", 0o755)
        .dir("sys", 0o755)
        .dir("mnt", 0o755)
        .file("init", 0o755, L1_INIT.as_bytes());
    let initrd = dir.join("l1.cpio");
    std::fs::write(&initrd, archive.finish()).map_err(|e| failed(e.to_string()))?;
    let script_path = dir.join("command.sh");
    std::fs::write(&script_path, script).map_err(|e| failed(e.to_string()))?;

    let socket = dir.join("hostroot.sock");
    let mut cfg = virtiofsd_lite::FsConfig::new(Path::new("/"), "hostroot");
    cfg.readonly = true;
    let daemon = FsDaemon::start_with(socket.clone(), cfg);
    let mut guest = QemuGuest::builder(&kernel.vmlinux)
        .memory_mib(size.memory_mib)
        .vcpus(size.vcpus)
        .cpu(&size.cpu)
        .initrd(&initrd)
        .vhost_user_fs(&socket, "hostroot")
        .append(&l1_cmdline(&script_path))
        .console_file(dir.join("l1-console.log"))
        .monitor_socket(dir.join("monitor.sock"))
        .start()
        .map_err(|e| failed(format!("cannot start QEMU: {e}")))?;
    eprintln!(
        "rig: L1's console, as it runs: {}",
        dir.join("l1-console.log").display()
    );
    let t0 = Instant::now();
    let up = guest
        .wait_for(UP_MARKER, Duration::from_secs(300))
        .map_err(|e| {
            if guest.exited() {
                RigError::L1Died(e)
            } else {
                RigError::TimedOut(e)
            }
        });
    if up.is_ok() {
        eprintln!("rig: L1 up after {:.1?}", t0.elapsed());
    }
    let waited = up.and_then(|()| wait_for_exit(&mut guest, t0 + size.timeout, size.stall_limit));
    let console = guest.console();
    // Where L1's CPU is when the run hangs (at L2's code when L1 runs a
    // guest: TCG shows the emulated CPU's current state).
    let registers = match &waited {
        Err(RigError::TimedOut(_) | RigError::Stalled(_)) => guest
            .monitor("info registers", Duration::from_secs(10))
            // The general, segment and control registers; not the FPU's.
            .map(|regs| {
                let general = regs.lines().take_while(|l| !l.starts_with("FCW="));
                general.collect::<Vec<_>>().join("\n")
            })
            .unwrap_or_else(|e| format!("(none: {e})")),
        _ => String::new(),
    };
    guest.kill();
    drop(daemon);
    waited.map_err(|e| {
        // The first line says how it ended; a longer tail than the wait's
        // own shows the heartbeat's thread states.
        e.map(|why| {
            let how = why.lines().next().unwrap_or_default();
            let mut why = format!(
                "{how}\nL1's console tail:\n{}",
                keystone_test_kit::last_lines(&console, 250)
            );
            if !registers.is_empty() {
                why.push_str(&format!("\nL1's CPU when it was stopped:\n{registers}"));
            }
            why
        })
    })?;
    let inner = console
        .split_once(UP_MARKER)
        .map_or(console.as_str(), |(_, after)| after)
        .to_string();
    let code = inner
        .lines()
        .find_map(|l| l.trim().strip_prefix(EXIT_MARKER.trim_end()))
        .map(str::trim)
        .unwrap_or("?")
        .to_string();
    Ok((code, inner))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An L1 whose heartbeat stops is found out within the stall limit,
    /// well before the rig's time, and the error shows where L1's CPU was.
    /// (Stopping the heartbeat's `sleep` stands in for an L1 that stopped
    /// running altogether, as QEMU 7.2's TCG did now and then.)
    #[test]
    fn an_l1_without_a_heartbeat_counts_as_stopped() {
        if let Some(why) = rig_missing() {
            keystone_test_kit::skip!("{why}");
        }
        let size = RigSize {
            memory_mib: 256,
            vcpus: 1,
            cpu: L1_CPU.into(),
            timeout: Duration::from_secs(240),
            stall_limit: Duration::from_secs(15),
        };
        let t = Instant::now();
        let script = "sleep 12; killall -STOP sleep; echo heartbeat-stopped; sleep 600\n";
        let err = boot_l1("stall", script, &size).expect_err("the script never ends");
        let took = t.elapsed();
        let RigError::Stalled(why) = err else {
            panic!("not counted as stopped: {err}");
        };
        assert!(why.contains("heartbeat-stopped"), "{why}");
        assert!(why.contains("RIP="), "L1's registers: {why}");
        assert!(took < Duration::from_secs(120), "took {took:?}");
    }

    #[test]
    fn scratch_is_outside_l1s_own_tmp() {
        let d = shared_scratch("a::b c");
        assert!(!d.starts_with("/tmp/"), "{}", d.display());
        assert!(d
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("rig-a--b-c-"));
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
    }
}
