//! Benchmark: virtiofsd-lite against virtiofsd 1.14 behind the same
//! frontend and guest.
//!
//! Each boot runs our guest kernel under QEMU TCG (microvm, 1 vCPU) with an
//! initramfs whose `/init` is `bench_guest.c` (built here with
//! `gcc -static -O2`). The guest mounts three vhost-user-fs devices:
//! `root`, the Debian guest root (for `git`), served read-only by an
//! in-process virtiofsd-lite, and `bench0`/`bench1`, one per daemon under
//! test, each daemon its own process so its RSS and CPU time can be
//! sampled (the two swap devices on odd boots). Before each boot each
//! shared directory gets a fresh git repository of `BENCH_GIT_FILES` committed files for the
//! `git status` lines.
//!
//! Both daemons run with the same options, `--cache never --sandbox none`:
//! no guest page cache for file data (direct I/O) and zero entry and
//! attribute timeouts, so every line is served by the daemon rather than
//! by the guest's caches.
//!
//! Every line alternates between the two daemons inside one boot, in ABBA
//! segments, and each daemon's median segment is its figure for the boot:
//! on a shared host, load from elsewhere then lands on both alike. `--runs
//! N` boots (default 3); the JSON on stdout gives every boot's value, the
//! median, min and max over boots per line and daemon, and the ratio of
//! the medians; a table goes to stderr. Lines `cpu_<line>` give each
//! daemon's own CPU time (all its threads, from schedstat) over that line:
//! what the daemon costs per line whatever the guest's speed.
//!
//! ```text
//! cargo build -p virtiofsd-lite -p keystone-benches --release --bins
//! cargo run -p keystone-benches --release --bin bench-virtiofs-vs-virtiofsd -- --runs 3
//! ```
//! Environment: `VIRTIOFSD_BIN` (default
//! `/work/.cache-virtiofsd/bin/virtiofsd`), `VIRTIOFSD_LITE_BIN` (default:
//! `virtiofsd-lite` in this example's profile folder), `BENCH_SEQ_MIB` (1024),
//! `BENCH_RAND_OPS` (20000), `BENCH_FILES` (10000), `BENCH_GIT_FILES`
//! (10000), `BENCH_GIT_RUNS` (5), `BENCH_GIT_COLD_RUNS` (3), `BENCH_SEGMENTS`
//! (5), `KEYSTONE_KERNEL_DIR`,
//! `KEYSTONE_ROOTFS_DIR`.
//!
//! Under TCG every guest instruction is emulated, so the guest side takes
//! most of each request's time and the ratios understate the daemons'
//! own differences; the JSON says so.

mod support;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::{
    cpu_ns, json_str, lower_is_better, sampler, summary, Samples, DAEMON_OPTS, LITE, VFSD,
};
use virtiofsd_lite::{CacheMode, FsConfig};

const GUEST_SRC: &str = include_str!("bench_guest.c");
const RUN_TIMEOUT: Duration = Duration::from_secs(900);
/// Guest parameters (kernel command line -> the guest init's environment).
const PARAMS: [(&str, &str); 7] = [
    ("BENCH_SEQ_MIB", "1024"),
    ("BENCH_RAND_OPS", "20000"),
    ("BENCH_FILES", "10000"),
    ("BENCH_GIT_FILES", "10000"),
    ("BENCH_GIT_RUNS", "5"),
    ("BENCH_GIT_COLD_RUNS", "3"),
    ("BENCH_SEGMENTS", "5"),
];

/// Each daemon's figures from one boot, and the boot's wall time.
type BootResult = (Vec<(&'static str, RunResult)>, f64);

/// One daemon's figures from one boot.
#[derive(Default)]
struct RunResult {
    metrics: BTreeMap<String, (f64, String)>,
    rss_max_kib: u64,
    failures: Vec<String>,
}

/// What every boot shares.
struct Setup {
    kernel: PathBuf,
    initrd: PathBuf,
    rootfs: PathBuf,
    work: PathBuf,
    params: Vec<(String, String)>,
}

impl Setup {
    fn param(&self, name: &str) -> &str {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map_or("", |(_, v)| v.as_str())
    }
}

fn run_cmd(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Compiles the guest init and wraps it in an initramfs.
fn build_initrd(work: &Path) -> Result<PathBuf, String> {
    let (src, bin, initrd) = (
        work.join("bench_guest.c"),
        work.join("bench_guest"),
        work.join("initrd.cpio"),
    );
    std::fs::write(&src, GUEST_SRC).map_err(|e| e.to_string())?;
    run_cmd(
        Command::new("gcc")
            .args(["-static", "-O2", "-Wall", "-o"])
            .arg(&bin)
            .arg(&src),
    )?;
    guest_image::initramfs::write_agent_initramfs(&bin, &initrd).map_err(|e| e.to_string())?;
    Ok(initrd)
}

/// A committed repository of `files` small files in 100-file folders.
fn make_repo(dir: &Path, files: usize) -> Result<(), String> {
    for i in 0..files {
        let sub = dir.join(format!("d{:03}", i / 100));
        if i % 100 == 0 {
            std::fs::create_dir_all(&sub).map_err(|e| e.to_string())?;
        }
        let text = format!("file {i}\nsome content so that the blob is not empty\n");
        std::fs::write(sub.join(format!("f{i:05}.txt")), text).map_err(|e| e.to_string())?;
    }
    // Files older than the index are not "racily clean": git status
    // compares their stat data and does not re-read them.
    std::thread::sleep(Duration::from_millis(1100));
    let git = |args: &[&str]| {
        run_cmd(
            Command::new("git")
                .args(["-c", "user.name=bench", "-c", "user.email=bench@localhost"])
                .args(["-c", "init.defaultBranch=main"])
                .args(args)
                .current_dir(dir),
        )
    };
    git(&["init", "-q"])?;
    git(&["add", "-A"])?;
    git(&["commit", "-q", "-m", "10k files"])
}

fn qemu_args(setup: &Setup, devices: &[(PathBuf, String)]) -> Vec<String> {
    let mut append = String::from(
        "console=ttyS0 quiet lpj=5000000 tsc=reliable reboot=t panic=-1 nokaslr rdinit=/init",
    );
    for (k, v) in &setup.params {
        append.push_str(&format!(" {k}={v}"));
    }
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
    a.extend(["-append".into(), append]);
    a.extend(["-kernel".into(), setup.kernel.display().to_string()]);
    a.extend(["-initrd".into(), setup.initrd.display().to_string()]);
    for (i, (sock, tag)) in devices.iter().enumerate() {
        a.extend([
            "-chardev".into(),
            format!("socket,id=fs{i},path={}", sock.display()),
            "-device".into(),
            format!("vhost-user-fs-device,chardev=fs{i},tag={tag}"),
        ]);
    }
    a
}

/// Kills QEMU if it runs past [`RUN_TIMEOUT`]; stop it by setting the flag.
fn watchdog(pid: u32, finished: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let t = Instant::now();
        while !finished.load(Ordering::Relaxed) {
            if t.elapsed() > RUN_TIMEOUT {
                // SAFETY: signals the QEMU child this process spawned.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    })
}

/// `/proc` clock ticks per second.
fn clock_ticks_per_s() -> f64 {
    // SAFETY: sysconf only reads a system constant.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// One daemon under test, running as its own process.
struct UnderTest {
    label: &'static str,
    child: Child,
    samples: Arc<Samples>,
    sampler: Option<std::thread::JoinHandle<()>>,
}

/// Starts `cmd` on `sock` serving `shared`, and samples its RSS.
fn start_daemon(
    label: &'static str,
    cmd: &[String],
    sock: &Path,
    shared: &Path,
    stop: &Arc<AtomicBool>,
) -> Result<UnderTest, String> {
    let child = support::spawn_daemon(cmd, sock, shared, Stdio::inherit())?;
    let samples = Arc::new(Samples::default());
    let sampler = sampler(child.id(), stop.clone(), samples.clone());
    Ok(UnderTest {
        label,
        child,
        samples,
        sampler: Some(sampler),
    })
}

/// Waits a little for `d` to exit on its own (both do when the frontend
/// disconnects), then kills it.
fn stop_daemon(d: &mut UnderTest) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while d.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = d.child.kill();
    let _ = d.child.wait();
    if let Some(s) = d.sampler.take() {
        let _ = s.join();
    }
}

/// One boot with both daemons: `bench0` and `bench1` are served by
/// `daemons` in turn (swapped on odd boots), `root` by an in-process
/// virtiofsd-lite. Returns each daemon's result and the boot's wall time.
fn run_boot(
    boot: usize,
    setup: &Setup,
    daemons: &[(&'static str, Vec<String>); 2],
) -> Result<BootResult, String> {
    let run_dir = setup.work.join(format!("boot{boot}"));
    let _ = std::fs::remove_dir_all(&run_dir);
    let git_files = setup.param("BENCH_GIT_FILES").parse().unwrap_or(10_000);
    let stop = Arc::new(AtomicBool::new(false));
    let mut under_test = Vec::new();
    let mut devices = Vec::new();
    let root_sock = run_dir.join("root.sock");
    devices.push((root_sock.clone(), "root".to_string()));
    for dev in 0..2 {
        let (label, cmd) = &daemons[(dev + boot) % 2];
        let dir = run_dir.join(format!("bench{dev}"));
        let shared = dir.join("shared");
        std::fs::create_dir_all(&shared).map_err(|e| e.to_string())?;
        let t = Instant::now();
        make_repo(&shared.join("repo"), git_files)?;
        eprintln!(
            "[boot {boot}] bench{dev} = {label}; repository of {git_files} files in {:.1} s",
            t.elapsed().as_secs_f64()
        );
        let sock = dir.join("vhost.sock");
        under_test.push(start_daemon(label, cmd, &sock, &shared, &stop)?);
        devices.push((sock, format!("bench{dev}")));
    }

    let mut root_cfg = FsConfig::new(&setup.rootfs, "root");
    root_cfg.readonly = true;
    root_cfg.cache = CacheMode::Always;
    let rs = root_sock.clone();
    let root_thread = std::thread::spawn(move || virtiofsd_lite::serve_listener(&rs, root_cfg));
    while !root_sock.exists() {
        std::thread::sleep(Duration::from_millis(10));
    }

    let start = Instant::now();
    let mut qemu = Command::new("qemu-system-x86_64")
        .args(qemu_args(setup, &devices))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot run qemu-system-x86_64: {e}"))?;
    let stdout = qemu.stdout.take().ok_or("no qemu stdout")?;
    let finished = Arc::new(AtomicBool::new(false));
    let dog = watchdog(qemu.id(), finished.clone());
    let mut results: Vec<RunResult> = (0..2).map(|_| RunResult::default()).collect();
    let mut shared_failures = Vec::new();
    let mut done = false;
    // Each daemon's CPU time per line: sampled when a line's first result
    // arrives (the guest prints a line once both devices are done with it).
    let pids: Vec<u32> = under_test.iter().map(|d| d.child.id()).collect();
    let mut cpu_before: Vec<u64> = pids.iter().map(|p| cpu_ns(*p)).collect();
    let mut last_line = String::new();
    for line in BufReader::new(stdout).lines().map_while(Result::ok) {
        let line = line.trim_end_matches('\r');
        eprintln!(
            "[boot {boot} {:6.1}s] {line}",
            start.elapsed().as_secs_f64()
        );
        if let Some(rest) = line.strip_prefix("BENCH ") {
            let f: Vec<&str> = rest.split_whitespace().collect();
            if let [_, name, _, _] = f[..] {
                if name != last_line {
                    for (d, pid) in pids.iter().enumerate() {
                        let now = cpu_ns(*pid);
                        let ms = now.saturating_sub(cpu_before[d]) as f64 / 1e6;
                        cpu_before[d] = now;
                        results[d]
                            .metrics
                            .insert(format!("cpu_{name}"), (ms, "ms".into()));
                    }
                    last_line = name.to_string();
                }
            }
            if let [dev, name, value, unit] = f[..] {
                let r = dev.parse::<usize>().ok().and_then(|d| results.get_mut(d));
                if let (Some(r), Ok(v)) = (r, value.parse::<f64>()) {
                    r.metrics.insert(name.to_string(), (v, unit.to_string()));
                }
            }
        } else if let Some(rest) = line.strip_prefix("BENCH-FAIL ") {
            shared_failures.push(rest.to_string());
        } else if line.starts_with("BENCH-DONE") {
            done = true;
        }
    }
    let _ = qemu.wait();
    finished.store(true, Ordering::Relaxed);
    let _ = dog.join();
    let wall_s = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for d in &mut under_test {
        stop_daemon(d);
    }
    if let Ok(Err(e)) = root_thread.join() {
        eprintln!("root daemon: {e}");
    }
    if !done {
        shared_failures.push("guest did not reach BENCH-DONE".into());
    }
    let _ = std::fs::remove_dir_all(&run_dir);
    let mut out = Vec::new();
    for (d, mut r) in under_test.iter().zip(results) {
        let kib = d.samples.rss_max_kib.load(Ordering::Relaxed);
        r.rss_max_kib = kib;
        r.metrics
            .insert("daemon_rss_max".into(), (kib as f64 / 1024.0, "MiB".into()));
        let ticks = d.samples.cpu_ticks.load(Ordering::Relaxed) as f64;
        r.metrics.insert(
            "daemon_cpu".into(),
            (ticks / clock_ticks_per_s(), "s".into()),
        );
        r.failures = shared_failures.clone();
        out.push((d.label, r));
    }
    Ok((out, wall_s))
}

/// Every metric name with its unit, in the order the guest prints them.
const ORDER: [&str; 11] = [
    "seq_write_1MiB",
    "seq_read_1MiB_cold",
    "rand_read_4KiB",
    "rand_write_4KiB",
    "create_files",
    "stat_files_cold",
    "unlink_files",
    "git_status_cold",
    "git_status_warm",
    "daemon_rss_max",
    "daemon_cpu",
];

struct Line {
    name: String,
    unit: String,
    per_daemon: Vec<(&'static str, Vec<f64>)>,
}

fn collect_lines(results: &[(&'static str, RunResult)]) -> Vec<Line> {
    let mut names: Vec<String> = ORDER.iter().map(|s| s.to_string()).collect();
    for (_, r) in results {
        for k in r.metrics.keys() {
            if !names.contains(k) {
                names.push(k.clone());
            }
        }
    }
    let mut lines = Vec::new();
    for name in names {
        let mut unit = String::new();
        let mut per_daemon = Vec::new();
        for d in [LITE, VFSD] {
            let vals: Vec<f64> = results
                .iter()
                .filter(|(l, _)| *l == d)
                .filter_map(|(_, r)| r.metrics.get(&name))
                .map(|(v, u)| {
                    unit = u.clone();
                    *v
                })
                .collect();
            per_daemon.push((d, vals));
        }
        if per_daemon.iter().any(|(_, v)| !v.is_empty()) {
            lines.push(Line {
                name,
                unit,
                per_daemon,
            });
        }
    }
    lines
}

/// Ratio of medians lite / virtiofsd and whether lite is at least as good.
fn ratio(line: &Line) -> Option<(f64, bool)> {
    let med = |i: usize| {
        let v = &line.per_daemon[i].1;
        (!v.is_empty()).then(|| summary(v).0)
    };
    let (a, b) = (med(0)?, med(1)?);
    if b == 0.0 {
        return None;
    }
    let r = a / b;
    let ok = if lower_is_better(&line.unit) {
        r <= 1.0
    } else {
        r >= 1.0
    };
    Some((r, ok))
}

/// Per-boot ratios lite / virtiofsd (both measured in the same boot), in
/// boot order; empty unless every boot has both values.
fn paired_ratios(line: &Line) -> Vec<f64> {
    let (a, b) = (&line.per_daemon[0].1, &line.per_daemon[1].1);
    if a.len() != b.len() || b.contains(&0.0) {
        return Vec::new();
    }
    a.iter().zip(b).map(|(x, y)| x / y).collect()
}

fn print_table(lines: &[Line]) {
    eprintln!(
        "\n{:<22} {:>8} {:>26} {:>26} {:>7} {:>7}  ok",
        "line",
        "unit",
        "virtiofsd-lite med [min-max]",
        "virtiofsd 1.14 med [min-max]",
        "ratio",
        "paired"
    );
    for l in lines {
        let cell = |i: usize| {
            let v = &l.per_daemon[i].1;
            if v.is_empty() {
                return "-".to_string();
            }
            let (m, lo, hi) = summary(v);
            format!("{m:.1} [{lo:.1}-{hi:.1}]")
        };
        let (r, ok) = match ratio(l) {
            Some((r, ok)) => (format!("{r:.3}"), if ok { "yes" } else { "NO" }),
            None => ("-".into(), "-"),
        };
        let p = paired_ratios(l);
        let paired = if p.is_empty() {
            "-".to_string()
        } else {
            format!("{:.3}", summary(&p).0)
        };
        eprintln!(
            "{:<22} {:>8} {:>26} {:>26} {:>7} {:>7}  {ok}",
            l.name,
            l.unit,
            cell(0),
            cell(1),
            r,
            paired
        );
    }
}

fn lines_json(lines: &[Line]) -> String {
    let mut out = Vec::new();
    for l in lines {
        let mut parts = vec![
            format!("\"unit\": {}", json_str(&l.unit)),
            format!(
                "\"better\": {}",
                json_str(if lower_is_better(&l.unit) {
                    "lower"
                } else {
                    "higher"
                })
            ),
        ];
        for (d, v) in &l.per_daemon {
            if v.is_empty() {
                continue;
            }
            let (m, lo, hi) = summary(v);
            let vals: Vec<String> = v.iter().map(|x| format!("{x:.1}")).collect();
            parts.push(format!(
                "{}: {{\"median\": {m:.1}, \"min\": {lo:.1}, \"max\": {hi:.1}, \"values\": [{}]}}",
                json_str(d),
                vals.join(", ")
            ));
        }
        if let Some((r, ok)) = ratio(l) {
            parts.push(format!("\"ratio_of_medians\": {r:.3}"));
            parts.push(format!("\"at_least_virtiofsd\": {ok}"));
        }
        let p = paired_ratios(l);
        if !p.is_empty() {
            let vals: Vec<String> = p.iter().map(|x| format!("{x:.3}")).collect();
            parts.push(format!(
                "\"paired_ratios\": [{}], \"median_paired_ratio\": {:.3}",
                vals.join(", "),
                summary(&p).0
            ));
        }
        out.push(format!(
            "    {}: {{{}}}",
            json_str(&l.name),
            parts.join(", ")
        ));
    }
    format!("{{\n{}\n  }}", out.join(",\n"))
}

struct Args {
    runs: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args { runs: 3 };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--runs" => {
                a.runs = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|&n| n > 0)
                    .ok_or("--runs needs a positive number")?;
            }
            other => return Err(format!("unknown argument {other:?} (use --runs N)")),
        }
    }
    Ok(a)
}

fn setup() -> Result<(Setup, String, String), String> {
    let (lite, vfsd) = support::daemon_binaries()?;
    let kernel = guest_image::kernel::ensure_kernel()
        .map_err(|e| format!("no guest kernel: {e}"))?
        .vmlinux;
    let rootfs = guest_image::rootfs::ensure_rootfs()
        .map_err(|e| format!("no guest rootfs: {e}"))?
        .dir;
    let work = std::env::temp_dir().join(format!("vfsd-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work).map_err(|e| e.to_string())?;
    let initrd = build_initrd(&work)?;
    let params = PARAMS
        .iter()
        .map(|(k, d)| {
            (
                k.to_string(),
                std::env::var(k).unwrap_or_else(|_| d.to_string()),
            )
        })
        .collect();
    let setup = Setup {
        kernel,
        initrd,
        rootfs,
        work,
        params,
    };
    Ok((setup, lite, vfsd))
}

fn main() {
    let (args, (setup, lite, vfsd)) = match parse_args().and_then(|a| Ok((a, setup()?))) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("bench_vs_virtiofsd: {e}");
            std::process::exit(1);
        }
    };
    let daemons = support::daemon_commands(&lite, &vfsd);
    let mut results = Vec::new();
    let mut walls = Vec::new();
    let mut errors = Vec::new();
    for boot in 0..args.runs {
        match run_boot(boot, &setup, &daemons) {
            Ok((rs, wall_s)) => {
                walls.push(wall_s);
                for (label, r) in rs {
                    eprintln!("[boot {boot}] {label}: RSS max {} KiB", r.rss_max_kib);
                    if label == LITE {
                        errors.extend(r.failures.iter().map(|f| format!("boot {boot}: {f}")));
                    }
                    results.push((label, r));
                }
            }
            Err(e) => errors.push(format!("boot {boot}: {e}")),
        }
    }
    let _ = std::fs::remove_dir_all(&setup.work);
    let lines = collect_lines(&results);
    print_table(&lines);
    let params: Vec<String> = setup
        .params
        .iter()
        .map(|(k, v)| format!("{}: {}", json_str(k), json_str(v)))
        .collect();
    let walls: Vec<String> = walls.iter().map(|w| format!("{w:.1}")).collect();
    let errs: Vec<String> = errors.iter().map(|e| json_str(e)).collect();
    println!(
        "{{\n  \"frontend\": \"QEMU TCG (microvm, 1 vCPU, 512 MiB), same guest kernel and initramfs for both; guest-side emulation takes most of each request's time, so ratios understate daemon differences\",\n  \"daemon_options\": {},\n  \"boots\": {},\n  \"order\": \"both daemons in every boot (devices bench0 and bench1, swapped on odd boots); each line alternates between them in ABBA segments and each daemon's median segment is its figure for the boot; median/min/max are over boots\",\n  \"params\": {{{}}},\n  \"ratio_is\": \"median(virtiofsd-lite) / median(virtiofsd-1.14); paired_ratios: the same per boot (both daemons measured in that boot); see better\",\n  \"lines\": {},\n  \"boot_wall_s\": [{}],\n  \"failures\": [{}]\n}}",
        json_str(&DAEMON_OPTS.join(" ")),
        args.runs,
        params.join(", "),
        lines_json(&lines),
        walls.join(", "),
        errs.join(", ")
    );
}
