//! The run loop: in each run, ours first (its console gives the exact
//! kernel command line QEMU then gets), then QEMU with KVM, then QEMU with
//! TCG if KVM failed (or `--tcg`). Each side's record is a JSON object.

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

use super::fsd::FsDaemon;
use super::session::{self, BootOutcome, BootSpec};
use super::sides::{self, Accel, Inputs};
use super::{report, strace, BootArgs};

const MARKER: &str = guest_image::busybox::BOOT_CHECK_MARKER;
/// Time allowed between the marker and the VMM's exit (reboot under emulation).
const EXIT_GRACE: Duration = Duration::from_secs(60);

pub const MILESTONE_METHOD: &str = "harness: CLOCK_MONOTONIC read just before spawn, to the read() of the VMM's serial stdout that delivered the first byte / the line containing 'Run /init as init process' / the line 'KEYSTONE-USERSPACE-OK'";
pub const MEMORY_METHOD: &str = "/proc/PID/status of the VMM process read by the harness when the marker line arrives; vmm_rss_kib = RssAnon + RssFile (guest RAM, a shared memfd, is RssShmem and excluded)";
const SELF_METHOD: &str = "keystone's own timings JSON: monotonic first_kvm_run minus the harness's CLOCK_MONOTONIC read just before spawn (no strace)";

fn probe(i: &Inputs, work: &Path, program: &Path, args: &[std::ffi::OsString], tag: &str) -> Value {
    match &i.strace {
        None => json!({ "setup_ms": null, "error": "strace not found (apt-get install strace)" }),
        Some(st) => json!(strace::probe(
            st,
            program,
            args,
            &work.join(format!("{tag}.strace"))
        )),
    }
}

fn outcome_json(o: &BootOutcome) -> Value {
    json!({
        "kernel_start_ms": o.kernel_start_ms,
        "init_exec_ms": o.init_exec_ms,
        "userspace_ms": o.userspace_ms,
        "memory": o.memory,
        "exit": o.exit,
        "serial_bytes": o.serial_bytes,
        "kernel_cmdline_seen": o.kernel_cmdline,
        "error": o.error,
    })
}

/// Events from keystone's timings JSON as ms from the harness's spawn.
fn self_reported(path: &Path, spawn_ns: u64) -> Value {
    let Ok(text) = std::fs::read_to_string(path) else {
        return json!({ "error": format!("no timings JSON at {}", path.display()) });
    };
    let Ok(doc) = serde_json::from_str::<Value>(&text) else {
        return json!({ "error": "unparsable timings JSON" });
    };
    let mut from_spawn = serde_json::Map::new();
    if let Some(ns) = doc["monotonic_ns"].as_object() {
        for (event, at) in ns {
            if let Some(at) = at.as_u64() {
                from_spawn.insert(event.clone(), ((at as f64 - spawn_ns as f64) / 1e6).into());
            }
        }
    }
    json!({
        "ms_from_spawn": from_spawn,
        "ms_since_process_start": doc["ms_since_process_start"],
        "memory_at_exit": doc["memory"],
        "exit": doc["exit"],
        "clean_exit": doc["clean_exit"],
        "kvm": doc["kvm"],
        "cpu_template": doc["cpu_template"],
    })
}

fn ours(i: &Inputs, work: &Path, run: u32) -> anyhow::Result<(Value, Option<String>)> {
    let probe_args = sides::keystone_args(i, None);
    let setup = probe(
        i,
        work,
        &i.keystone,
        &probe_args,
        &format!("keystone-{run}"),
    );
    let timings = work.join(format!("keystone-{run}.timings.json"));
    let args = sides::keystone_args(i, Some(&timings));
    let command = sides::display(&i.keystone, &args);
    eprintln!("keystone-benches: run {run}: booting keystone ...");
    let o = session::boot(BootSpec {
        name: "keystone",
        program: &i.keystone,
        args,
        marker: MARKER,
        extra_pids: vec![],
        stderr_log: work.join(format!("keystone-{run}.stderr")),
        limit: Duration::from_secs(i.timeout_s),
        exit_grace: EXIT_GRACE,
        fatal_stderr: &[],
    })?;
    let own = self_reported(&timings, o.spawn_ns);
    let self_ms = own["ms_from_spawn"]["first_kvm_run"].as_f64();
    let in_process = own["ms_since_process_start"]["first_kvm_run"].as_f64();
    let mut rec = outcome_json(&o);
    rec["run"] = run.into();
    rec["command"] = command.into();
    rec["setup"] = json!({
        "strace_ms": setup["setup_ms"],
        "strace_method": strace::METHOD,
        "strace_kvm_ioctls_before_first_run": setup["ioctls_before_run"],
        "strace_error": setup["error"],
        "self_reported_ms": self_ms,
        "self_reported_method": SELF_METHOD,
        "in_process_ms": in_process,
        "in_process_method": "keystone's own first_kvm_run minus its process_start (top of main; excludes exec and dynamic loading)",
    });
    rec["vmm_reported"] = own;
    Ok((rec, o.kernel_cmdline.clone()))
}

fn qemu(i: &Inputs, work: &Path, run: u32, accel: Accel, cmdline: &str) -> anyhow::Result<Value> {
    let tag = format!("qemu-{}-{run}", accel.name());
    let socket = work.join(format!("{tag}.sock"));
    let args = sides::qemu_args(i, accel, cmdline, &socket);
    let setup = if accel == Accel::Kvm {
        let d = FsDaemon::start(
            &i.virtiofsd,
            &i.root_dir,
            socket.clone(),
            &work.join(format!("{tag}-probe.fsd.log")),
        )?;
        let p = probe(i, work, &i.qemu, &args, &tag);
        d.stop();
        p
    } else {
        json!({ "setup_ms": null, "error": "not applicable: TCG makes no KVM_RUN" })
    };
    let daemon = FsDaemon::start(
        &i.virtiofsd,
        &i.root_dir,
        socket,
        &work.join(format!("{tag}.fsd.log")),
    )?;
    eprintln!(
        "keystone-benches: run {run}: booting QEMU microvm ({}) ...",
        accel.name()
    );
    let o = session::boot(BootSpec {
        name: "qemu",
        program: &i.qemu,
        args: args.clone(),
        marker: MARKER,
        extra_pids: vec![daemon.child.pid()],
        stderr_log: work.join(format!("{tag}.stderr")),
        limit: Duration::from_secs(i.timeout_s),
        exit_grace: EXIT_GRACE,
        fatal_stderr: &["KVM internal error", "emulation failure"],
    });
    daemon.stop();
    let o = o?;
    let mut rec = outcome_json(&o);
    rec["run"] = run.into();
    rec["command"] = sides::display(&i.qemu, &args).into();
    rec["setup"] = json!({
        "strace_ms": setup["setup_ms"],
        "strace_method": strace::METHOD,
        "strace_kvm_ioctls_before_first_run": setup["ioctls_before_run"],
        "strace_error": setup["error"],
    });
    rec["fs_daemon_memory"] = json!(o.extra_memory.first().copied().flatten());
    rec["stderr_tail"] = std::fs::read_to_string(work.join(format!("{tag}.stderr")))
        .unwrap_or_default()
        .lines()
        .rev()
        .take(8)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect::<Vec<_>>()
        .join("\n")
        .into();
    Ok(rec)
}

fn reached_userspace(rec: &Value) -> bool {
    rec["userspace_ms"].is_number()
}

/// All runs; returns the report document.
pub fn all(i: &Inputs, args: &BootArgs, work: &Path) -> anyhow::Result<Value> {
    let (mut k, mut q, mut t) = (vec![], vec![], vec![]);
    let mut cmdline: Option<(String, &str)> = None;
    for run in 1..=args.runs {
        let (rec, seen) = ours(i, work, run)?;
        k.push(rec);
        if cmdline.is_none() {
            cmdline = seen.map(|c| (sides::without_device_args(&c), "keystone's boot log ('Kernel command line:'), virtio_mmio.device= entries removed (QEMU adds its own)"));
        }
        let (line, _) = cmdline.get_or_insert_with(|| {
            (
                sides::fallback_cmdline(),
                "rebuilt from vmm's constants: keystone's boot printed no command line",
            )
        });
        let line = line.clone();
        let rec = qemu(i, work, run, Accel::Kvm, &line)?;
        let kvm_ok = reached_userspace(&rec);
        q.push(rec);
        if !kvm_ok || args.tcg {
            t.push(qemu(i, work, run, Accel::Tcg, &line)?);
        }
    }
    let (line, source) = cmdline.unwrap_or_default();
    Ok(report::document(i, args, &line, source, k, q, t))
}
