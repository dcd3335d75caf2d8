//! The report: per-VMM run records, medians, the SPEC.md targets with
//! pass/fail computed from the measurements, and a short table on stderr.

use std::process::Command;

use serde_json::{json, Value};

use super::runs::{MEMORY_METHOD, MILESTONE_METHOD};
use super::sides::Inputs;
use super::BootArgs;

/// SPEC.md "Numbers": VMM setup, exec to first KVM_RUN.
const SETUP_TARGET_MS: f64 = 10.0;
/// SPEC.md "Numbers": the VMM's own RSS, guest RAM excluded (4 MiB).
const RSS_TARGET_KIB: f64 = 4096.0;

/// (summary key, JSON pointer into a run record)
const FIELDS: &[(&str, &str)] = &[
    ("setup_strace_ms", "/setup/strace_ms"),
    ("setup_self_reported_ms", "/setup/self_reported_ms"),
    ("kernel_start_ms", "/kernel_start_ms"),
    ("init_exec_ms", "/init_exec_ms"),
    ("userspace_ms", "/userspace_ms"),
    ("vmm_rss_kib", "/memory/vmm_rss_kib"),
    ("rss_shmem_kib", "/memory/rss_shmem_kib"),
    ("wall_ms", "/exit/wall_ms"),
];

fn stats(runs: &[Value], pointer: &str) -> Value {
    let mut v: Vec<f64> = runs
        .iter()
        .filter_map(|r| r.pointer(pointer)?.as_f64())
        .collect();
    if v.is_empty() {
        return Value::Null;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    json!({ "median": median, "min": v[0], "max": v[n - 1], "n": n })
}

fn summary(runs: &[Value]) -> Value {
    let mut s = serde_json::Map::new();
    for (key, ptr) in FIELDS {
        s.insert((*key).into(), stats(runs, ptr));
    }
    let clean = runs.iter().filter(|r| r["exit"]["clean"] == true).count();
    s.insert(
        "clean_exits".into(),
        format!("{clean}/{}", runs.len()).into(),
    );
    Value::Object(s)
}

fn pass(summary: &Value, key: &str, limit: f64) -> Value {
    match summary[key]["median"].as_f64() {
        Some(m) => json!({ "median": m, "target": limit, "pass": m <= limit }),
        None => json!({ "median": null, "target": limit, "pass": null }),
    }
}

fn verdicts(summary: &Value) -> Value {
    json!({
        "setup_strace": pass(summary, "setup_strace_ms", SETUP_TARGET_MS),
        "setup_self_reported": pass(summary, "setup_self_reported_ms", SETUP_TARGET_MS),
        "vmm_rss": pass(summary, "vmm_rss_kib", RSS_TARGET_KIB),
    })
}

fn side(label: &str, runs: Vec<Value>) -> Value {
    let s = summary(&runs);
    json!({ "label": label, "targets": verdicts(&s), "summary": s, "runs": runs })
}

fn first_line(program: &std::path::Path, arg: &str) -> Value {
    Command::new(program)
        .arg(arg)
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_string)
        })
        .into()
}

/// The whole report.
pub fn document(
    i: &Inputs,
    args: &BootArgs,
    cmdline: &str,
    cmdline_source: &str,
    keystone: Vec<Value>,
    qemu_kvm: Vec<Value>,
    qemu_tcg: Vec<Value>,
) -> Value {
    let pvm = std::path::Path::new("/sys/module/kvm_pvm").exists();
    let qemu_kvm_failed = qemu_kvm.iter().any(|r| !r["userspace_ms"].is_number());
    let mut vmms = serde_json::Map::new();
    vmms.insert(
        "keystone".into(),
        side("keystone vm run (our VMM, KVM)", keystone),
    );
    vmms.insert(
        "qemu_microvm_kvm".into(),
        side("QEMU microvm, -accel kvm", qemu_kvm),
    );
    if !qemu_tcg.is_empty() {
        let why = if qemu_kvm_failed {
            "QEMU microvm, -accel tcg: FALLBACK PEER because QEMU with KVM did not reach user space here"
        } else {
            "QEMU microvm, -accel tcg (extra peer, --tcg)"
        };
        vmms.insert("qemu_microvm_tcg".into(), side(why, qemu_tcg));
    }
    json!({
        "benchmark": "boot",
        "host": {
            "kvm": if pvm { "kvm_pvm (paravirtual KVM: guest kernel code is emulated, 50-100x slower)" } else { "kvm" },
            "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
            "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        },
        "config": {
            "runs": args.runs,
            "memory_mib": i.memory_mib,
            "vcpus": 1,
            "timeout_s_per_boot": i.timeout_s,
            "kernel": i.kernel.display().to_string(),
            "root": "busybox root from guest-image (init boot-check), on virtio-fs tag 'root' served by virtiofsd-lite (in-process for keystone, a separate process over vhost-user for QEMU)",
            "keystone": i.keystone.display().to_string(),
            "keystone_profile": if i.keystone.components().any(|c| c.as_os_str() == "release") { "release" } else { "debug (unoptimized)" },
            "qemu": i.qemu.display().to_string(),
            "qemu_version": first_line(&i.qemu, "--version"),
            "qemu_cpu": i.qemu_cpu,
            "qemu_cpu_note": "qemu64 (vendor AuthenticAMD, like this AMD host) + SSSE3/x2APIC/TSC-deadline as in keystone's CPUID template + XSAVEERPTR (without it the guest's FXSAVE-leak workaround executes fnclex, which this KVM cannot emulate: KVM internal error). This KVM filters pni and ssse3 out (QEMU warns). No XSAVE/POPCNT/BMI2/AVX in qemu64; cx16 etc. cleared on the command line.",
            "kernel_cmdline": cmdline,
            "kernel_cmdline_source": cmdline_source,
            "order": "per run: keystone strace probe, keystone boot, QEMU-KVM strace probe, QEMU-KVM boot (then QEMU-TCG if needed)",
        },
        "methods": {
            "setup_strace_ms": super::strace::METHOD,
            "milestones_ms": MILESTONE_METHOD,
            "memory": MEMORY_METHOD,
            "exit": "clean = marker seen and the VMM exited by itself with status 0; killed if still running 60 s after the marker or 300 s after spawn",
        },
        "targets": {
            "source": "SPEC.md 'Numbers users will hold us to'",
            "setup_ms_max": SETUP_TARGET_MS,
            "vmm_rss_kib_max": RSS_TARGET_KIB,
            "note": "pass flags compare each VMM's median with the target; the targets are keystone's, QEMU's flags are for reference",
        },
        "vmms": vmms,
    })
}

fn cell(v: &Value, ptr: &str, unit: &str) -> String {
    match v.pointer(ptr).and_then(Value::as_f64) {
        Some(x) if unit == "KiB" => format!("{x:.0}"),
        Some(x) => format!("{x:.1}"),
        None => "-".into(),
    }
}

/// The human table, on stderr.
pub fn print_table(doc: &Value) {
    eprintln!(
        "\n{:<18} {:>3} {:>11} {:>10} {:>10} {:>10} {:>11} {:>9} {:>9} {:>10}  exit",
        "vmm",
        "run",
        "setup/strc",
        "setup/own",
        "kernel ms",
        "init ms",
        "userspc ms",
        "rss KiB",
        "shm KiB",
        "wall ms"
    );
    let Some(vmms) = doc["vmms"].as_object() else {
        return;
    };
    for (name, side) in vmms {
        for r in side["runs"].as_array().into_iter().flatten() {
            eprintln!(
                "{:<18} {:>3} {:>11} {:>10} {:>10} {:>10} {:>11} {:>9} {:>9} {:>10}  {}",
                name,
                r["run"],
                cell(r, "/setup/strace_ms", "ms"),
                cell(r, "/setup/self_reported_ms", "ms"),
                cell(r, "/kernel_start_ms", "ms"),
                cell(r, "/init_exec_ms", "ms"),
                cell(r, "/userspace_ms", "ms"),
                cell(r, "/memory/vmm_rss_kib", "KiB"),
                cell(r, "/memory/rss_shmem_kib", "KiB"),
                cell(r, "/exit/wall_ms", "ms"),
                if r["exit"]["clean"] == true {
                    "clean".to_string()
                } else {
                    format!("NOT clean: {}", r["exit"]["status"].as_str().unwrap_or("?"))
                },
            );
        }
        let t = &side["targets"];
        let flag = |k: &str| match t[k]["pass"].as_bool() {
            Some(true) => "pass",
            Some(false) => "FAIL",
            None => "n/a",
        };
        eprintln!(
            "{:<18} targets (median): setup<=10 ms strace {} / own {}; rss<=4 MiB {}",
            "",
            flag("setup_strace"),
            flag("setup_self_reported"),
            flag("vmm_rss")
        );
    }
}
