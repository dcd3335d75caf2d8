//! Benchmark: virtiofsd-lite against virtiofsd 1.14, same frontend, same
//! guest. Our guest kernel boots under QEMU TCG (microvm) with its root on
//! an in-process virtiofsd-lite (tag `root`) and a second vhost-user-fs
//! device (tag `bench`) served by the daemon under test, each run as its
//! own process so their RSS compares. The guest `/init`
//! (`bench_guest_init.sh`) prints `BENCH <name> <value> <unit>` lines;
//! this prints both result sets and their ratio as JSON.
//!
//! ```text
//! cargo build -p virtiofsd-lite --release
//! cargo run -p virtiofsd-lite --release --example bench_vs_virtiofsd
//! ```
//! Environment: `VIRTIOFSD_BIN` (default
//! `/work/.cache-virtiofsd/bin/virtiofsd`), `VIRTIOFSD_LITE_BIN` (default:
//! `virtiofsd-lite` next to this example's profile folder), `BENCH_FILES`
//! (10000), `BENCH_RAND_OPS` (200), `KEYSTONE_KERNEL_DIR`.
//!
//! Under TCG every guest instruction is emulated, so the guest side
//! dominates and the comparison is coarse; the JSON says so.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use guest_image::busybox::{BusyboxRoot, InitKind, DEFAULT_BUSYBOX};
use virtiofsd_lite::FsConfig;

const INIT: &str = include_str!("bench_guest_init.sh");
const RUN_TIMEOUT: Duration = Duration::from_secs(900);

type Metrics = BTreeMap<String, (f64, String)>;

struct RunResult {
    metrics: Metrics,
    rss_max_kib: u64,
    wall_s: f64,
    failures: Vec<String>,
    notes: Vec<String>,
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

/// `RssAnon + RssFile` of `pid` in KiB, if it is alive.
fn rss_kib(pid: u32) -> Option<u64> {
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

fn wait_for_socket(path: &Path, daemon: &mut Child) -> Result<(), String> {
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

fn qemu_args(kernel: &Path, root_sock: &Path, bench_sock: &Path) -> Vec<String> {
    let mut a: Vec<String> = [
        "-M",
        "microvm,x-option-roms=off,rtc=off,pit=on,pic=on,acpi=off,memory-backend=mem",
        "-accel",
        "tcg",
        "-cpu",
        "qemu64",
        "-m",
        "512M",
        "-object",
        "memory-backend-memfd,id=mem,size=512M,share=on",
        "-append",
        "console=ttyS0 lpj=5000000 tsc=reliable reboot=k panic=-1 nokaslr \
         root=root rootfstype=virtiofs rw init=/init",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-monitor",
        "none",
        "-no-reboot",
        "-serial",
        "stdio",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.extend(["-kernel".into(), kernel.display().to_string()]);
    for (i, (sock, tag)) in [(root_sock, "root"), (bench_sock, "bench")]
        .iter()
        .enumerate()
    {
        a.extend([
            "-chardev".into(),
            format!("socket,id=fs{i},path={}", sock.display()),
            "-device".into(),
            format!("vhost-user-fs-device,chardev=fs{i},tag={tag}"),
        ]);
    }
    a
}

/// One boot: root on an in-process virtiofsd-lite, `bench` on `daemon_cmd`.
fn run_once(
    label: &str,
    kernel: &Path,
    work: &Path,
    daemon_cmd: &[String],
) -> Result<RunResult, String> {
    let run_dir = work.join(label);
    let _ = std::fs::remove_dir_all(&run_dir);
    let (root, shared) = (run_dir.join("root"), run_dir.join("shared"));
    std::fs::create_dir_all(&shared).map_err(|e| e.to_string())?;
    BusyboxRoot::create(&root, Path::new(DEFAULT_BUSYBOX), InitKind::Shell, "")
        .map_err(|e| e.to_string())?;
    let init = INIT
        .replace("@FILES@", &env_or("BENCH_FILES", "10000"))
        .replace("@RAND_OPS@", &env_or("BENCH_RAND_OPS", "200"));
    std::fs::write(root.join("init"), init).map_err(|e| e.to_string())?;
    std::fs::set_permissions(root.join("init"), std::fs::Permissions::from_mode(0o755))
        .map_err(|e| e.to_string())?;
    let (root_sock, bench_sock) = (run_dir.join("root.sock"), run_dir.join("bench.sock"));

    let root_cfg = FsConfig::new(&root, "root");
    let rs = root_sock.clone();
    let root_thread = std::thread::spawn(move || virtiofsd_lite::serve_listener(&rs, root_cfg));
    let mut daemon = Command::new(&daemon_cmd[0])
        .args(&daemon_cmd[1..])
        .args(["--socket-path", &bench_sock.display().to_string()])
        .args(["--shared-dir", &shared.display().to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", daemon_cmd[0]))?;
    wait_for_socket(&bench_sock, &mut daemon)?;
    while !root_sock.exists() {
        std::thread::sleep(Duration::from_millis(10));
    }

    let pid = daemon.id();
    let (stop, rss_max) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
    );
    let sampler = {
        let (stop, rss_max) = (stop.clone(), rss_max.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if let Some(k) = rss_kib(pid) {
                    rss_max.fetch_max(k, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };

    let start = Instant::now();
    let mut qemu = Command::new("qemu-system-x86_64")
        .args(qemu_args(kernel, &root_sock, &bench_sock))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot run qemu-system-x86_64: {e}"))?;
    let stdout = qemu.stdout.take().ok_or("no qemu stdout")?;
    let (mut metrics, mut failures, mut notes) = (Metrics::new(), Vec::new(), Vec::new());
    let mut done = false;
    let watchdog_pid = qemu.id();
    let finished = Arc::new(AtomicBool::new(false));
    let watchdog = {
        let finished = finished.clone();
        std::thread::spawn(move || {
            let t = Instant::now();
            while !finished.load(Ordering::Relaxed) {
                if t.elapsed() > RUN_TIMEOUT {
                    // SAFETY: signals the QEMU child we spawned.
                    unsafe { libc::kill(watchdog_pid as i32, libc::SIGKILL) };
                    return;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    };
    for line in BufReader::new(stdout).lines().map_while(Result::ok) {
        let line = line.trim_end_matches('\r');
        eprintln!("[{label} {:6.1}s] {line}", start.elapsed().as_secs_f64());
        if let Some(rest) = line.strip_prefix("BENCH ") {
            let f: Vec<&str> = rest.split_whitespace().collect();
            if let [name, value, unit] = f[..] {
                if let Ok(v) = value.parse::<f64>() {
                    metrics.insert(name.to_string(), (v, unit.to_string()));
                }
            }
        } else if let Some(rest) = line.strip_prefix("BENCH-NOTE ") {
            notes.push(rest.to_string());
        } else if let Some(rest) = line.strip_prefix("BENCH-FAIL ") {
            failures.push(rest.to_string());
        } else if line.starts_with("BENCH-DONE") {
            done = true;
        }
    }
    let _ = qemu.wait();
    finished.store(true, Ordering::Relaxed);
    let _ = watchdog.join();
    let wall_s = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let _ = sampler.join();
    // Both daemons exit when their frontend disconnects; make sure.
    let deadline = Instant::now() + Duration::from_secs(5);
    while daemon.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = daemon.kill();
    let _ = daemon.wait();
    if let Ok(Err(e)) = root_thread.join() {
        eprintln!("root daemon: {e}");
    }
    if !done {
        failures.push("guest did not reach BENCH-DONE".into());
    }
    let _ = std::fs::remove_dir_all(&run_dir);
    Ok(RunResult {
        metrics,
        rss_max_kib: rss_max.load(Ordering::Relaxed),
        wall_s,
        failures,
        notes,
    })
}

fn json_str(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

fn result_json(r: &Result<RunResult, String>) -> String {
    match r {
        Err(e) => format!("{{\"error\": {}}}", json_str(e)),
        Ok(r) => {
            let mut parts: Vec<String> = r
                .metrics
                .iter()
                .map(|(k, (v, u))| {
                    format!(
                        "{}: {{\"value\": {v}, \"unit\": {}}}",
                        json_str(k),
                        json_str(u)
                    )
                })
                .collect();
            parts.push(format!("\"daemon_rss_max_kib\": {}", r.rss_max_kib));
            parts.push(format!("\"run_wall_s\": {:.1}", r.wall_s));
            let f: Vec<String> = r.failures.iter().map(|f| json_str(f)).collect();
            parts.push(format!("\"failures\": [{}]", f.join(", ")));
            let n: Vec<String> = r.notes.iter().map(|n| json_str(n)).collect();
            parts.push(format!("\"notes\": [{}]", n.join(", ")));
            format!("{{\n    {}\n  }}", parts.join(",\n    "))
        }
    }
}

fn ratio_json(lite: &Result<RunResult, String>, vfsd: &Result<RunResult, String>) -> String {
    let (Ok(a), Ok(b)) = (lite, vfsd) else {
        return "{}".into();
    };
    let mut parts = Vec::new();
    for (k, (va, _)) in &a.metrics {
        if let Some((vb, _)) = b.metrics.get(k) {
            if *vb != 0.0 {
                parts.push(format!("{}: {:.3}", json_str(k), va / vb));
            }
        }
    }
    if b.rss_max_kib > 0 {
        let rss = a.rss_max_kib as f64 / b.rss_max_kib as f64;
        parts.push(format!("\"daemon_rss_max_kib\": {rss:.3}"));
    }
    format!("{{\n    {}\n  }}", parts.join(",\n    "))
}

fn main() {
    let exe = std::env::current_exe().unwrap_or_default();
    let default_lite = exe
        .parent()
        .and_then(Path::parent)
        .map(|p| p.join("virtiofsd-lite"))
        .unwrap_or_else(|| PathBuf::from("virtiofsd-lite"));
    let lite = std::env::var("VIRTIOFSD_LITE_BIN").map_or(default_lite, PathBuf::from);
    let vfsd = env_or("VIRTIOFSD_BIN", "/work/.cache-virtiofsd/bin/virtiofsd");
    let kernel = match guest_image::kernel::ensure_kernel() {
        Ok(k) => k.vmlinux,
        Err(e) => {
            eprintln!("no guest kernel: {e}");
            std::process::exit(1);
        }
    };
    let work = std::env::temp_dir().join(format!("vfsd-bench-{}", std::process::id()));
    let lite_cmd = vec![lite.display().to_string(), "--cache".into(), "auto".into()];
    let vfsd_cmd = vec![
        vfsd.clone(),
        "--cache".into(),
        "auto".into(),
        "--sandbox".into(),
        "none".into(),
    ];
    let r_lite = run_once("virtiofsd-lite", &kernel, &work, &lite_cmd);
    let r_vfsd = if Path::new(&vfsd).is_file() {
        run_once("virtiofsd-1.14", &kernel, &work, &vfsd_cmd)
    } else {
        Err(format!("{vfsd} not found: cargo install virtiofsd --version 1.14.0 --root /work/.cache-virtiofsd (needs libseccomp-dev libcap-ng-dev)"))
    };
    let _ = std::fs::remove_dir_all(&work);
    println!(
        "{{\n  \"frontend\": \"QEMU TCG (microvm, 1 vCPU, 512 MiB); guest-side emulation dominates, so ratios are coarse\",\n  \"ratio_is\": \"virtiofsd-lite / virtiofsd-1.14 (rates: higher is better; us per op and daemon_rss: lower is better)\",\n  \"virtiofsd-lite\": {},\n  \"virtiofsd-1.14\": {},\n  \"ratio\": {}\n}}",
        result_json(&r_lite),
        result_json(&r_vfsd),
        ratio_json(&r_lite, &r_vfsd)
    );
}
