//! What the two virtiofsd comparisons share: finding the two daemons,
//! watching a daemon process (RSS, CPU time) and summarising figures.
// Each benchmark uses part of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const LITE: &str = "virtiofsd-lite";
pub const VFSD: &str = "virtiofsd-1.14";
/// The options both daemons get (besides the socket and the directory).
pub const DAEMON_OPTS: [&str; 4] = ["--cache", "never", "--sandbox", "none"];

/// The two daemon binaries: `VIRTIOFSD_LITE_BIN` (default: `virtiofsd-lite`
/// beside this benchmark's binary, in the same profile folder) and `VIRTIOFSD_BIN` (default
/// `/work/.cache-virtiofsd/bin/virtiofsd`).
pub fn daemon_binaries() -> Result<(String, String), String> {
    let exe = std::env::current_exe().unwrap_or_default();
    let default_lite = exe
        .parent()
        .map(|p| p.join("virtiofsd-lite"))
        .unwrap_or_else(|| PathBuf::from("virtiofsd-lite"));
    let lite = std::env::var("VIRTIOFSD_LITE_BIN").map_or(default_lite, PathBuf::from);
    if !lite.is_file() {
        return Err(format!(
            "{} not found: cargo build -p virtiofsd-lite --release --bins",
            lite.display()
        ));
    }
    let vfsd = std::env::var("VIRTIOFSD_BIN")
        .unwrap_or_else(|_| "/work/.cache-virtiofsd/bin/virtiofsd".into());
    if !Path::new(&vfsd).is_file() {
        return Err(format!("{vfsd} not found: cargo install virtiofsd --version 1.14.0 --root /work/.cache-virtiofsd (needs libseccomp-dev libcap-ng-dev)"));
    }
    Ok((lite.display().to_string(), vfsd))
}

/// Each daemon's command line: the binary and [`DAEMON_OPTS`].
pub fn daemon_commands(lite: &str, vfsd: &str) -> [(&'static str, Vec<String>); 2] {
    let cmd = |bin: &str| -> Vec<String> {
        std::iter::once(bin.to_string())
            .chain(DAEMON_OPTS.iter().map(|s| s.to_string()))
            .collect()
    };
    [(LITE, cmd(lite)), (VFSD, cmd(vfsd))]
}

/// `RssAnon + RssFile` of `pid` in KiB, if it is alive.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    Some(field("RssAnon:") + field("RssFile:"))
}

/// Starts `cmd` serving `shared` on `sock` and waits for its socket; the
/// daemon's log goes to `stderr`.
pub fn spawn_daemon(
    cmd: &[String],
    sock: &Path,
    shared: &Path,
    stderr: Stdio,
) -> Result<Child, String> {
    let mut child = Command::new(&cmd[0])
        .args(&cmd[1..])
        .args(["--socket-path", &sock.display().to_string()])
        .args(["--shared-dir", &shared.display().to_string()])
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", cmd[0]))?;
    if let Err(e) = wait_for_socket(sock, &mut child) {
        let _ = child.kill();
        let _ = child.wait();
        return Err(e);
    }
    Ok(child)
}

/// Waits for a daemon's socket to appear (20 s at most).
pub fn wait_for_socket(path: &Path, daemon: &mut Child) -> Result<(), String> {
    let start = Instant::now();
    while !path.exists() {
        if let Ok(Some(s)) = daemon.try_wait() {
            return Err(format!("daemon exited early: {s}"));
        }
        if start.elapsed() > Duration::from_secs(20) {
            return Err(format!("no socket at {} after 20 s", path.display()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// User plus system CPU time of `pid` in clock ticks, if it is alive.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name: state is the first,
    // utime the 12th and stime the 13th.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// What the sampler saw of one daemon process.
#[derive(Default)]
pub struct Samples {
    pub rss_max_kib: AtomicU64,
    pub cpu_ticks: AtomicU64,
}

/// Samples the RSS (keeping the largest) and CPU time of `pid` every
/// 100 ms until `stop` is set.
pub fn sampler(pid: u32, stop: Arc<AtomicBool>, out: Arc<Samples>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            if let Some(k) = rss_kib(pid) {
                out.rss_max_kib.fetch_max(k, Ordering::Relaxed);
            }
            if let Some(t) = cpu_ticks(pid) {
                out.cpu_ticks.fetch_max(t, Ordering::Relaxed);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    })
}

/// CPU time of every thread of `pid`, in nanoseconds (schedstat).
pub fn cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// A JSON string literal.
pub fn json_str(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// Median, min and max of `v` (not empty).
pub fn summary(v: &[f64]) -> (f64, f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    let median = if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    };
    (median, s[0], s[n - 1])
}

/// Whether a smaller value is the better one for this unit.
pub fn lower_is_better(unit: &str) -> bool {
    matches!(unit, "ms" | "us" | "MiB" | "s")
}
