//! The run loop: in each run, every VMM in turn (ours first, then QEMU,
//! then the peers in the order given), each with its strace probe, its
//! marker boot and its agent boot; QEMU with TCG joins a run when QEMU with
//! KVM did not reach user space in it (or with `--tcg`). Each record is a
//! JSON object.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::launch::{self, Ctx};
use super::sides::{self, Accel, Boot, Engine, Vmm};
use super::strace;

pub const MILESTONE_METHOD: &str = "harness: CLOCK_MONOTONIC read just before spawn, to the read() of the VMM's serial stdout that delivered the first byte / the line containing 'Run /init as init process' / the line 'KEYSTONE-USERSPACE-OK'";
pub const AGENT_METHOD: &str = "a separate boot of the guest agent as PID 1 (keystone's embedded agent initramfs; the root on virtio-fs, tag root): CLOCK_MONOTONIC before spawn to the first answered ping over vsock (hybrid socket: 'CONNECT <port>' then the agent's hello and Ping), tried every 5 ms; the VMM is stopped then";
const SELF_METHOD: &str = "keystone's own timings JSON: monotonic first_kvm_run minus the harness's CLOCK_MONOTONIC read just before spawn (no strace)";

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
        "exits": doc["exits"],
        "exits_total": super::exits::total(&doc["exits"]),
        "kvm": doc["kvm"],
        "cpu_template": doc["cpu_template"],
    })
}

/// keystone's "VM started: ..." line (its own words: KVM kind, CPU
/// template, nested state).
fn started_line(stderr_log: &Path) -> Option<String> {
    let text = std::fs::read_to_string(stderr_log).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("keystone: VM started: "))
        .map(str::to_string)
}

/// The agent initramfs keystone wrote under the cache it was given.
fn written_agent_initramfs(work: &Path) -> Option<PathBuf> {
    let dir = work.join("cache/keystone/agent");
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "cpio"))
}

/// The marker boot of `vmm` in `run`, with its probe.
fn marker(ctx: &Ctx<'_>, vmm: &Vmm, run: u32) -> anyhow::Result<Value> {
    let tag = format!("{}-{run}", vmm.key);
    let mut plan = sides::plan(vmm, ctx.guest, &Boot::Marker, ctx.work, &tag)
        .map_err(|why| anyhow::anyhow!("{}: {why}", vmm.key))?;
    let setup = match vmm.engine {
        Engine::Qemu(Accel::Tcg) => {
            json!({ "setup_ms": null, "error": "not applicable: TCG makes no KVM_RUN" })
        }
        _ => launch::probe(ctx, vmm, &plan, &tag),
    };
    let timings = ctx.work.join(format!("{tag}.timings.json"));
    if vmm.engine == Engine::Keystone {
        plan.args.push("--timings-json".into());
        plan.args.push(timings.clone().into());
    }
    eprintln!("keystone-benches: run {run}: booting {} ...", vmm.key);
    let o = launch::boot(ctx, vmm, &plan, &tag)?;
    let mut rec = launch::outcome_json(ctx, vmm, &plan, &o, &tag);
    rec["run"] = run.into();
    rec["setup"] = json!({
        "strace_ms": setup["setup_ms"],
        "strace_kvm_ioctls_before_first_run": setup["ioctls_before_run"],
        "strace_error": setup["error"],
    });
    if vmm.engine == Engine::Keystone {
        let own = self_reported(&timings, o.spawn_ns);
        rec["setup"]["self_reported_ms"] = own["ms_from_spawn"]["first_kvm_run"].clone();
        rec["setup"]["in_process_ms"] = own["ms_since_process_start"]["first_kvm_run"].clone();
        rec["vmm_reported"] = own;
        rec["vmm_reported"]["started"] =
            started_line(&ctx.work.join(format!("{tag}.stderr"))).into();
    }
    Ok(rec)
}

/// The agent boot of `vmm` in `run` (or why there is none).
fn agent(ctx: &Ctx<'_>, vmm: &Vmm, run: u32, initrd: Option<&Path>) -> anyhow::Result<Value> {
    if vmm.engine == Engine::Qemu(Accel::Tcg) {
        return Ok(json!({ "skipped": "the agent boot is measured with KVM only" }));
    }
    let tag = format!("{}-agent-{run}", vmm.key);
    let plan = match sides::plan(vmm, ctx.guest, &Boot::Agent { initrd }, ctx.work, &tag) {
        Ok(p) => p,
        Err(why) => return Ok(json!({ "skipped": why })),
    };
    eprintln!(
        "keystone-benches: run {run}: booting {} with the agent ...",
        vmm.key
    );
    let o = launch::boot(ctx, vmm, &plan, &tag)?;
    let mut rec = launch::outcome_json(ctx, vmm, &plan, &o, &tag);
    rec["agent_ready_ms"] = o.agent_ready_ms.into();
    rec["agent_version"] = o.agent_version.into();
    Ok(rec)
}

/// One VMM in one run: the marker record with the agent boot inside.
fn measure(
    ctx: &Ctx<'_>,
    vmm: &Vmm,
    run: u32,
    with_agent: bool,
    agent_initrd: &mut Option<PathBuf>,
) -> anyhow::Result<Value> {
    let mut rec = marker(ctx, vmm, run)?;
    let a = if !with_agent {
        json!({ "skipped": "--no-agent" })
    } else if !rec["userspace_ms"].is_number() {
        json!({ "skipped": "the marker boot did not reach user space" })
    } else {
        agent(ctx, vmm, run, agent_initrd.as_deref())?
    };
    if vmm.engine == Engine::Keystone && agent_initrd.is_none() {
        *agent_initrd = written_agent_initramfs(ctx.work);
    }
    rec["agent_ready_ms"] = a["agent_ready_ms"].clone();
    rec["agent"] = a;
    Ok(rec)
}

/// Every column's records, in column order (QEMU with TCG, when it ran,
/// right after QEMU with KVM).
pub fn all(
    ctx: &Ctx<'_>,
    vmms: &[Vmm],
    runs: u32,
    with_agent: bool,
    tcg: bool,
) -> anyhow::Result<Vec<(Vmm, Vec<Value>)>> {
    let mut columns: Vec<(Vmm, Vec<Value>)> = vmms.iter().map(|v| (v.clone(), vec![])).collect();
    let mut tcg_records = Vec::new();
    let mut agent_initrd: Option<PathBuf> = None;
    for run in 1..=runs {
        for (vmm, records) in columns.iter_mut() {
            let rec = measure(ctx, vmm, run, with_agent, &mut agent_initrd)?;
            let fell_short = !rec["userspace_ms"].is_number();
            records.push(rec);
            if vmm.engine == Engine::Qemu(Accel::Kvm) && vmm.key == QEMU_KEY && (fell_short || tcg)
            {
                let t = tcg_column(vmm);
                tcg_records.push(measure(ctx, &t, run, false, &mut agent_initrd)?);
            }
        }
    }
    if let Some(i) = columns.iter().position(|(v, _)| v.key == QEMU_KEY) {
        if !tcg_records.is_empty() {
            let t = tcg_column(&columns[i].0);
            columns.insert(i + 1, (t, tcg_records));
        }
    }
    Ok(columns)
}

/// The built-in QEMU column's key.
pub const QEMU_KEY: &str = "qemu_microvm_kvm";

fn tcg_column(qemu: &Vmm) -> Vmm {
    Vmm {
        key: "qemu_microvm_tcg".into(),
        label: "QEMU microvm, -accel tcg (software emulation; FALLBACK PEER when QEMU with KVM did not reach user space, or --tcg)".into(),
        engine: Engine::Qemu(Accel::Tcg),
        program: qemu.program.clone(),
    }
}

/// The probe's method, for the JSON.
pub fn setup_method() -> &'static str {
    strace::METHOD
}

/// keystone's self-reported setup method, for the JSON.
pub fn self_method() -> &'static str {
    SELF_METHOD
}
