//! `list` and `status`: read-only views of sandboxes. Both apply the
//! liveness check, so a VM that died shows as `error`.
//!
//! JSON (`--json`) is a stable interface. `list --json` prints an array of
//! sandbox objects (`[]` when there are none); `status --json` prints one
//! object, or an array with `--all`. A sandbox object has these fields
//! (absent values are `null`, never missing):
//!
//! | field | type | meaning |
//! |---|---|---|
//! | `name` | string | sandbox name |
//! | `project` | string | absolute path of the host git repository |
//! | `state` | string | created, starting, running, stopping, stopped, error |
//! | `created_at` | string | RFC 3339 UTC |
//! | `started_at` | string? | last successful start |
//! | `updated_at` | string? | last state change |
//! | `last_sync` | string? | last sync to the host |
//! | `supervisor_pid` | number? | supervisor process while one runs |
//! | `backend` | string | microvm or kubernetes |
//! | `engine` | string? | engine of the last start (vmm, qemu) |
//! | `nested` | string? | enabled, disabled, unavailable |
//! | `nested_detail` | string? | why nesting is unavailable |
//! | `memory_mib`, `vcpus` | number | resources |
//! | `network`, `sync_mode` | string | settings of the last start (`network` is the configured value) |
//! | `network_available` | bool | whether the guest gets outbound connections (made by the host; `bridge` is not available and means nat) |
//! | `agent` | string | the coding agent the session opens with: claude, codex, gemini |
//! | `agents` | object? | the coding agents in the image of the last start and their versions, e.g. `{"claude": "2.1.337", "codex": "0.170.0", "gemini": "0.61.0"}` (from the host's copy of the image's lock; `null` before a start) |
//! | `last_error` | string? | why the state is error |
//! | `dir` | string | the sandbox's folder (config, state, logs, disk) |
//!
//! `status --json` adds two fields:
//!
//! | field | type | meaning |
//! |---|---|---|
//! | `proxy` | object? | the per-user dev-server proxy, `null` with `[proxy] enable = false` |
//! | `proxy.port` | number | its loopback port `P` |
//! | `proxy.running` | bool | whether it runs now |
//! | `proxy.url` | string | the sandbox's primary URL, `http://<name>.localhost:<P>/` |
//! | `proxy.primary_port` | number? | the guest port that URL reaches now (`[proxy] primary_port`, else devcontainer.json's first `forwardPorts`, else the lowest routable listening port; `null` when none listens) |
//! | `live` | object? | what the running backend reports; `null` when it is not running or cannot be asked |
//! | `live.ports[]` | array | the guest's listening TCP ports (see below) |
//! | `live.worktrees[]` | array | `{branch, path}` |
//! | `devcontainer` | object? | what the last start applied of the project's devcontainer.json (`null` without one): `source`, `env`, `user`, `primary_port`, `ports[]` (`{port, label, on_auto_forward, protocol}`), `port_labels[]`, `post_attach[]`, `features[]` (`{id, kind: provided, packages or unsupported, ...}`), `commands[]` (`{hook, name, argv, outcome: {state: waiting, running, succeeded, failed (why) or skipped (why)}}`), `refused[]`, `ignored[]`, `warnings[]` |
//!
//! Each `live.ports` entry is `{guest_port, guest_address, host_port, url,
//! note}`: `url` is the port's proxy URL `http://<port>.<name>.localhost:<P>/`
//! for a routable port (1024 and above, on the guest's loopback or all
//! addresses, not the agent's own), else `null`; `host_port` is `null`
//! unless the port is published on the host's 127.0.0.1 (`[proxy]
//! publish_same_port`); `note` says why a port is not routed or not
//! published.

use anyhow::Result;
use serde::Serialize;

use super::backend::{BackendStatus, SandboxSpec};
use super::config::Network;
use super::devcontainer::applied::{self, Applied};
use super::registry::RegistryEntry;
use super::state::{ProcProbe, StateRecord, SyncRecord};
use super::{store_err, Context, ListArgs, StatusArgs};
use crate::{exit_code, shown};

/// One sandbox as `list --json` and `status --json` print it.
#[derive(Debug, Serialize)]
pub struct SandboxView {
    pub name: String,
    pub project: String,
    pub state: String,
    pub created_at: String,
    pub started_at: Option<String>,
    pub updated_at: Option<String>,
    pub last_sync: Option<String>,
    pub supervisor_pid: Option<i32>,
    pub backend: String,
    pub engine: Option<String>,
    pub nested: Option<super::state::NestedStatus>,
    pub nested_detail: Option<String>,
    pub memory_mib: u32,
    pub vcpus: u32,
    pub network: String,
    pub network_available: bool,
    pub sync_mode: String,
    pub agent: String,
    pub agents: Option<std::collections::BTreeMap<String, String>>,
    pub last_error: Option<String>,
    pub dir: String,
}

#[derive(Serialize)]
struct StatusView {
    #[serde(flatten)]
    sandbox: SandboxView,
    proxy: Option<super::proxy::ProxyView>,
    live: Option<BackendStatus>,
    devcontainer: Option<Applied>,
}

fn view(
    ctx: &Context,
    name: &str,
    entry: &RegistryEntry,
) -> Result<(SandboxView, SandboxSpec, StateRecord)> {
    let spec = ctx.spec(name, entry)?;
    let record = StateRecord::load_checked(&spec.paths, name, &ProcProbe).map_err(store_err)?;
    let s = &spec.settings;
    let view = SandboxView {
        name: name.to_string(),
        project: entry.project.display().to_string(),
        state: record.state.to_string(),
        created_at: entry.created_at.clone(),
        started_at: record.started_at.clone(),
        updated_at: record.updated_at.clone(),
        last_sync: SyncRecord::load(&spec.paths).ok().and_then(|r| r.last_sync),
        supervisor_pid: record.supervisor_pid.filter(|_| record.is_active()),
        backend: s.backend.to_string(),
        engine: record.engine.clone(),
        nested: record.nested,
        nested_detail: record.nested_detail.as_deref().map(shown::line),
        memory_mib: s.memory_mib,
        vcpus: s.vcpus,
        network: s.network.to_string(),
        network_available: s.network != Network::None && ctx.backend.network_available(),
        sync_mode: s.sync_mode.to_string(),
        agent: s.agent.to_string(),
        agents: super::microvm::agent_versions(&spec.paths),
        // It quotes the guest's console and errors (several lines).
        last_error: record.last_error.as_deref().map(shown::lines),
        dir: spec.paths.dir.display().to_string(),
    };
    Ok((view, spec, record))
}

fn print_json<T: Serialize>(value: &T) -> Result<()> {
    println!("{}", shown::json(&serde_json::to_string_pretty(value)?));
    Ok(())
}

/// What the backend reports of a running sandbox, with the guest's text
/// in it (ports' addresses and notes, worktrees) escaped, each one line.
fn shown_live(mut live: BackendStatus) -> BackendStatus {
    for p in &mut live.ports {
        p.guest_address = shown::line(&p.guest_address);
        p.url = p.url.as_deref().map(shown::line);
        p.note = p.note.as_deref().map(shown::line);
    }
    for wt in &mut live.worktrees {
        wt.branch = shown::line(&wt.branch);
        wt.path = shown::line(&wt.path);
    }
    live
}

/// `keystone agent list`.
pub fn list(ctx: &Context, args: ListArgs) -> Result<i32> {
    let registry = ctx.store.registry().map_err(store_err)?;
    let mut views = Vec::new();
    for (name, entry) in &registry.sandboxes {
        let (v, _, record) = view(ctx, name, entry)?;
        if args.state.is_none_or(|want| want == record.state) {
            views.push(v);
        }
    }
    if args.json {
        print_json(&views)?;
        return Ok(exit_code::OK);
    }
    if views.is_empty() {
        match args.state {
            Some(state) => println!("No {state} sandboxes"),
            None => println!("No sandboxes (start one with `keystone agent start`)"),
        }
        return Ok(exit_code::OK);
    }
    let width = views.iter().map(|v| v.name.len()).max().unwrap_or(4).max(4);
    println!(
        "{:<width$}  {:<8}  {:<20}  PROJECT",
        "NAME", "STATE", "CREATED"
    );
    for v in &views {
        println!(
            "{:<width$}  {:<8}  {:<20}  {}",
            v.name, v.state, v.created_at, v.project
        );
    }
    Ok(exit_code::OK)
}

/// `keystone agent status`.
pub fn status(ctx: &Context, args: StatusArgs) -> Result<i32> {
    let targets: Vec<(String, RegistryEntry)> = if args.all {
        ctx.store
            .registry()
            .map_err(store_err)?
            .sandboxes
            .into_iter()
            .collect()
    } else {
        vec![ctx.resolve(args.name.as_deref())?]
    };
    let mut out = Vec::new();
    for (name, entry) in &targets {
        let (sandbox, spec, record) = view(ctx, name, entry)?;
        let live = if record.is_active() {
            match ctx.backend.status(&spec) {
                Ok(live) => Some(shown_live(live)),
                Err(e) => {
                    eprintln!(
                        "keystone: note: cannot ask sandbox {name} for live status: {}",
                        shown::line(&e.to_string())
                    );
                    None
                }
            }
        } else {
            None
        };
        let mut live = live;
        let mut no_ports = Vec::new();
        let ports = live.as_mut().map_or(&mut no_ports, |l| &mut l.ports);
        let devcontainer = applied::read(&spec.paths);
        let devcontainer_primary = devcontainer.as_ref().and_then(|d| d.primary_port);
        let proxy = super::proxy::describe(
            &ctx.store,
            &ctx.settings,
            name,
            spec.settings.proxy_primary_port.or(devcontainer_primary),
            ports,
        );
        out.push(StatusView {
            sandbox,
            proxy,
            live,
            devcontainer,
        });
    }
    if args.json {
        if args.all {
            print_json(&out)?;
        } else if let Some(one) = out.first() {
            print_json(one)?;
        }
        return Ok(exit_code::OK);
    }
    if out.is_empty() {
        println!("No sandboxes (start one with `keystone agent start`)");
    }
    for (i, s) in out.iter().enumerate() {
        if i > 0 {
            println!();
        }
        print_status(s);
    }
    Ok(exit_code::OK)
}

/// The devcontainer.json lines of `status`: what applied, and how its
/// commands went.
fn print_devcontainer(d: &Applied) {
    let mut parts = Vec::new();
    if !d.env.is_empty() {
        let n = d.env.len();
        parts.push(format!(
            "{n} environment variable{}",
            if n == 1 { "" } else { "s" }
        ));
    }
    if let Some(user) = &d.user {
        parts.push(format!("user {}", shown::line(user)));
    }
    if !d.ports.is_empty() {
        let ports: Vec<String> = d
            .ports
            .iter()
            .map(|p| match &p.label {
                Some(label) => format!("{} ({})", p.port, shown::line(label)),
                None => p.port.to_string(),
            })
            .collect();
        parts.push(format!("ports {}", ports.join(", ")));
    }
    if !d.features.is_empty() {
        let n = d.features.len();
        parts.push(format!("{n} feature{}", if n == 1 { "" } else { "s" }));
    }
    let applied = if parts.is_empty() {
        "nothing to apply".to_string()
    } else {
        parts.join(", ")
    };
    println!("Devcontainer: {} ({applied})", shown::line(&d.source));
    for c in &d.commands {
        let what = c.name.clone().unwrap_or_else(|| c.argv.join(" "));
        let outcome = match &c.outcome {
            applied::Outcome::Waiting => "waiting".to_string(),
            applied::Outcome::Running => "running".to_string(),
            applied::Outcome::Succeeded => "succeeded".to_string(),
            applied::Outcome::Failed { why } => format!("failed: {}", shown::line(why)),
            applied::Outcome::Skipped { why } => format!("skipped: {}", shown::line(why)),
        };
        println!("  {} `{}`: {outcome}", c.hook, shown::line(&what));
    }
}

fn print_status(s: &StatusView) {
    let v = &s.sandbox;
    let or_never = |o: &Option<String>| o.clone().unwrap_or_else(|| "never".into());
    println!("Sandbox:    {}", v.name);
    println!("Project:    {}", v.project);
    match v.supervisor_pid {
        Some(pid) => println!("State:      {} (supervisor pid {pid})", v.state),
        None => println!("State:      {}", v.state),
    }
    if let Some(err) = &v.last_error {
        println!("Error:      {err}");
    }
    match &v.engine {
        Some(engine) => println!("Backend:    {} (engine {engine})", v.backend),
        None => println!("Backend:    {}", v.backend),
    }
    println!(
        "Resources:  {} MiB, {} vCPUs, sync {}",
        v.memory_mib, v.vcpus, v.sync_mode
    );
    if v.network == Network::None.as_str() {
        println!("Network:    none (the guest's proxy answers that there is no network)");
    } else if v.network_available {
        let bridge = if v.network == Network::Bridge.as_str() {
            "bridge is not available; "
        } else {
            ""
        };
        println!(
            "Network:    {bridge}nat (outbound TCP made by the host through the guest's HTTP \
             proxy, 127.0.0.1:3128; no inbound)"
        );
    } else {
        println!(
            "Network:    not available (configured: {}; the guest has no network device)",
            v.network
        );
    }
    let nested = match (v.nested, &v.nested_detail) {
        (Some(n), Some(d)) => format!("{} ({d})", n.as_str()),
        (Some(n), None) => n.as_str().to_string(),
        (None, _) => "unknown (not started yet)".into(),
    };
    println!("Nested:     {nested}");
    let versions = v.agents.as_ref().map(|a| {
        a.iter()
            .map(|(name, version)| format!("{name} {version}"))
            .collect::<Vec<_>>()
            .join(", ")
    });
    match versions {
        Some(list) if !list.is_empty() => {
            println!("Agents:     {list} (the session opens with {})", v.agent)
        }
        _ => println!(
            "Agents:     none recorded yet (the session opens with {})",
            v.agent
        ),
    }
    println!("Created:    {}", v.created_at);
    println!("Started:    {}", or_never(&v.started_at));
    println!("Last sync:  {}", or_never(&v.last_sync));
    println!(
        "Folder:     {} (the sandbox's own files: its disk/workspace holds the guest's .git, \
         config and hooks included; do not open a shell or editor there)",
        v.dir
    );
    if let Some(proxy) = &s.proxy {
        let reaches = match (proxy.primary_port, &s.live) {
            (Some(port), _) => format!("guest port {port}"),
            (None, Some(_)) => "no server listens yet".to_string(),
            (None, None) => "the sandbox is not running".to_string(),
        };
        println!("Dev server: {} ({reaches})", proxy.url);
        if !proxy.running {
            println!(
                "Proxy:      not running on 127.0.0.1:{} (its log: proxy.log in the state \
                 folder)",
                proxy.port
            );
        }
    }
    if let Some(d) = &s.devcontainer {
        print_devcontainer(d);
    }
    if let Some(live) = &s.live {
        for p in &live.ports {
            let label = s
                .devcontainer
                .as_ref()
                .and_then(|d| d.label(p.guest_port))
                .map(|l| format!("{} ", shown::line(l)))
                .unwrap_or_default();
            let guest = format!("{label}guest {}:{}", p.guest_address, p.guest_port);
            let published = p
                .host_port
                .map(|h| format!("; published on 127.0.0.1:{h}"))
                .unwrap_or_default();
            match (&p.url, &p.note) {
                (Some(url), None) => println!("Port {}:  {url} ({guest}{published})", p.guest_port),
                (Some(url), Some(note)) => {
                    println!("Port {}:  {url} ({guest}; {note})", p.guest_port)
                }
                (None, Some(note)) => println!("Port {}:  {note} ({guest})", p.guest_port),
                (None, None) => println!("Port {}:  {guest}", p.guest_port),
            }
        }
        for wt in &live.worktrees {
            println!("Worktree:   {} at {}", wt.branch, wt.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::backend::{PortForward, WorktreeInfo};
    use crate::shown::{terminal_safe, HOSTILE};

    /// Every string in `value`, as `status` prints it or its JSON holds it.
    fn strings(value: &serde_json::Value, out: &mut Vec<String>) {
        match value {
            serde_json::Value::String(s) => out.push(s.clone()),
            serde_json::Value::Array(a) => a.iter().for_each(|v| strings(v, out)),
            serde_json::Value::Object(o) => o.values().for_each(|v| strings(v, out)),
            _ => {}
        }
    }

    #[test]
    fn what_a_hostile_guest_reports_is_shown_escaped() {
        let port = |note: Option<&str>, url: Option<&str>| PortForward {
            guest_port: 8080,
            guest_address: HOSTILE.into(),
            host_port: url.map(|_| 40000),
            url: url.map(str::to_string),
            note: note.map(str::to_string),
        };
        let live = shown_live(BackendStatus {
            state: None,
            ports: vec![port(Some(HOSTILE), None), port(None, Some(HOSTILE))],
            worktrees: vec![WorktreeInfo {
                branch: HOSTILE.into(),
                path: format!("/workspace/.worktrees/{HOSTILE}"),
            }],
            nested: None,
        });
        let value = serde_json::to_value(&live).unwrap();
        let mut all = Vec::new();
        strings(&value, &mut all);
        assert_eq!(all.len(), 6, "{all:?}");
        for s in &all {
            // One line each: the guest's newlines forge none in `status`.
            assert!(terminal_safe(s) && !s.contains('\n'), "{s:?}");
        }
        assert_eq!(live.worktrees[0].branch, shown::line(HOSTILE));
        let json = shown::json(&serde_json::to_string_pretty(&live).unwrap());
        assert!(terminal_safe(&json), "{json}");
    }
}
