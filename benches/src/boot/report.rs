//! The report: the schema version, date, host, guest and per-VMM run
//! records, medians, the SPEC.md targets with pass/fail computed from the
//! measurements, and a short table on stderr.

use std::process::Command;

use serde_json::{json, Value};

use super::runs::{self, AGENT_METHOD, MILESTONE_METHOD};
use super::sides::{Engine, Guest, Vmm};
use super::{cmdline, host, procmem};

/// The shape of the JSON; bumped whenever it changes.
pub const SCHEMA: u32 = 2;

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
    ("agent_ready_ms", "/agent_ready_ms"),
    ("vmm_rss_kib", "/memory/vmm_rss_kib"),
    ("rss_shmem_kib", "/memory/rss_shmem_kib"),
    ("wall_ms", "/exit/wall_ms"),
    ("vmm_exits", "/vmm_reported/exits_total/count"),
    (
        "vmm_exit_handling_ms",
        "/vmm_reported/exits_total/handling_ms",
    ),
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

fn first_line(program: &std::path::Path, arg: &str) -> Value {
    Command::new(program)
        .arg(arg)
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .find(|l| !l.trim().is_empty())
                .map(str::to_string)
        })
        .into()
}

fn engine_name(e: Engine) -> &'static str {
    match e {
        Engine::Keystone => "keystone",
        Engine::Qemu(_) => "qemu",
        Engine::Firecracker => "firecracker",
        Engine::CloudHypervisor => "cloud-hypervisor",
    }
}

fn column(vmm: &Vmm, runs: Vec<Value>) -> Value {
    let s = summary(&runs);
    let cmdline = runs.first().map(|r| r["cmdline_given"].clone());
    json!({
        "label": vmm.label,
        "engine": engine_name(vmm.engine),
        "program": vmm.program.display().to_string(),
        "version": first_line(&vmm.program, "--version"),
        "cmdline_given": cmdline,
        "targets": verdicts(&s),
        "summary": s,
        "runs": runs,
    })
}

/// What the report says about the run besides the records.
pub struct Setting<'a> {
    pub guest: &'a Guest,
    pub runs: u32,
    pub with_agent: bool,
    pub cmdline_source: &'a str,
    pub initrd_source: Option<&'a str>,
}

/// The whole report.
pub fn document(set: &Setting<'_>, columns: Vec<(Vmm, Vec<Value>)>) -> Value {
    let g = set.guest;
    let keystone_release = columns.iter().any(|(v, _)| {
        v.engine == Engine::Keystone && v.program.components().any(|c| c.as_os_str() == "release")
    });
    // Whether each guest kernel saw the same words as keystone's (device
    // entries aside), run by run.
    let ours = columns
        .iter()
        .find(|(v, _)| v.engine == Engine::Keystone)
        .and_then(|(_, r)| {
            r.first()?["kernel_cmdline_seen"]
                .as_str()
                .map(cmdline::comparable_words)
        });
    let mut vmms = serde_json::Map::new();
    for (vmm, mut records) in columns {
        for r in records.iter_mut() {
            let same = match (&ours, r["kernel_cmdline_seen"].as_str()) {
                (Some(o), Some(seen)) => json!(*o == cmdline::comparable_words(seen)),
                _ => json!(null),
            };
            r["kernel_cmdline_same_words_as_keystone"] = same;
        }
        vmms.insert(vmm.key.clone(), column(&vmm, records));
    }
    json!({
        "benchmark": "boot",
        "schema": SCHEMA,
        "date": host::utc_now(),
        "host": host::describe(),
        "guest": {
            "kernel": host::file_identity(&g.kernel),
            "root": match set.initrd_source {
                None => json!("busybox root from guest-image (init boot-check), on virtio-fs tag 'root' served by virtiofsd-lite (in-process for keystone, a separate process over vhost-user for QEMU and Cloud Hypervisor)"),
                Some(src) => json!({ "initramfs": g.initrd.as_deref().map(host::file_identity), "source": src }),
            },
            "vcpus": g.vcpus,
            "memory_mib": g.memory_mib,
            "base_cmdline": g.base_cmdline,
            "base_cmdline_source": set.cmdline_source,
        },
        "config": {
            "runs": set.runs,
            "agent_boots": set.with_agent,
            "timeout_s_per_boot": g.timeout_s,
            "keystone_profile": if keystone_release { "release" } else { "debug (unoptimized)" },
            "qemu_cpu": g.qemu_cpu,
            "qemu_cpu_note": "-cpu host on hardware KVM; on kvm_pvm qemu64 (AuthenticAMD, like this AMD host) + SSSE3/x2APIC/TSC-deadline as in keystone's CPUID template + XSAVEERPTR (without it the guest's FXSAVE-leak workaround executes fnclex, which kvm_pvm cannot emulate)",
            "order": "per run, per VMM in column order: strace probe, marker boot, agent boot (QEMU with TCG after QEMU with KVM when it ran)",
        },
        "methods": {
            "setup_strace_ms": runs::setup_method(),
            "setup_self_reported_ms": runs::self_method(),
            "milestones_ms": MILESTONE_METHOD,
            "agent_ready_ms": AGENT_METHOD,
            "memory": procmem::METHOD,
            "vmm_exits": "keystone only: its timings JSON's exits (vmm_reported.exits: per device and kind, count and the VMM's handling time); vmm_reported.exits_total adds them up, leaving out 'coalesced ...' entries (guest writes KVM queued without an exit)",
            "memory_when": "at the marker line (marker boot) / at the first answered ping (agent boot)",
            "cmdline": format!("every VMM gets guest.base_cmdline plus the root words (root=root rootfstype=virtiofs rw init=/init; rdinit=/init with an initramfs; keystone.root=root for the agent); each VMM adds its own device entries; keystone is given the line minus the words it adds itself (console=ttyS0 earlyprintk=ttyS0, {}), with --no-host-cmdline; kernel_cmdline_seen is what the guest kernel printed", vmm::host::COMMON_GUEST_CMDLINE),
            "exit": "clean = milestone reached and the VMM exited by itself with status 0, or was stopped at the milestone as planned (agent boots; Cloud Hypervisor, which boots the guest again on reboot); killed if still running 60 s after the marker or past the per-boot timeout",
        },
        "targets": {
            "source": "SPEC.md 'Numbers users will hold us to'",
            "setup_ms_max": SETUP_TARGET_MS,
            "vmm_rss_kib_max": RSS_TARGET_KIB,
            "note": "pass flags compare each VMM's median with the target; the targets are keystone's, the peers' flags are for reference",
        },
        "vmms": vmms,
        "rig": null,
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
    let head = [
        "setup/strc",
        "setup/own",
        "kernel ms",
        "init ms",
        "userspc ms",
        "agent ms",
        "rss KiB",
        "wall ms",
    ];
    let cols: [(&str, &str); 8] = [
        ("/setup/strace_ms", "ms"),
        ("/setup/self_reported_ms", "ms"),
        ("/kernel_start_ms", "ms"),
        ("/init_exec_ms", "ms"),
        ("/userspace_ms", "ms"),
        ("/agent_ready_ms", "ms"),
        ("/memory/vmm_rss_kib", "KiB"),
        ("/exit/wall_ms", "ms"),
    ];
    let mut line = format!("\n{:<18} {:>3}", "vmm", "run");
    for h in head {
        line.push_str(&format!(" {h:>10}"));
    }
    eprintln!("{line}  exit");
    let Some(vmms) = doc["vmms"].as_object() else {
        return;
    };
    for (name, side) in vmms {
        for r in side["runs"].as_array().into_iter().flatten() {
            let mut line = format!("{:<18} {:>3}", name, r["run"].as_u64().unwrap_or(0));
            for (ptr, unit) in cols {
                line.push_str(&format!(" {:>10}", cell(r, ptr, unit)));
            }
            let exit = if r["exit"]["clean"] == true {
                "clean".to_string()
            } else {
                format!("NOT clean: {}", r["exit"]["status"].as_str().unwrap_or("?"))
            };
            eprintln!("{line}  {exit}");
            if let Some(exits) = super::exits::line(r) {
                eprintln!("{:<22} {exits}", "");
            }
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
