//! Agent configuration: two `agent.toml` files, environment overrides,
//! flags.
//!
//! The system-wide file is `/etc/keystone/agent.toml` (`KEYSTONE_SYSTEM_CONFIG`
//! names another one, e.g. for tests; the NixOS module writes this file). The
//! user's own file is `$XDG_CONFIG_HOME/keystone/agent.toml` (or
//! `~/.config/keystone/agent.toml`). A missing file is skipped. Both take the
//! same keys:
//!
//! ```toml
//! [defaults]
//! memory = 8192          # MiB
//! vcpus = 4
//! nested_virt = true
//! network = "nat"        # nat | none | bridge
//! sync_mode = "manual"   # manual | auto-commit | auto-idle
//! persist = true         # keep the sandbox disk between starts
//! agent = "claude"       # claude | codex | gemini: the agent the session opens with
//!
//! [backend]
//! type = "microvm"       # microvm | kubernetes
//!
//! [backend.microvm]
//! share_proto = "virtiofs"
//! engine = "auto"        # auto | vmm | qemu
//!
//! [backend.kubernetes]   # accepted; the backend reports "not implemented"
//! context = "prod"       # kubeconfig context
//! namespace = "agents"
//! storage_class = "fast-ssd"
//!
//! [proxy]
//! enable = true          # the per-user dev-server proxy
//! domain = "sandbox.local"
//! port = 7300            # its loopback port [default: 80 where this user
//!                        # may bind it, else 7300]
//! primary_port = 3000    # what http://<sandbox>.localhost:<port>/ reaches
//!                        # [default: the lowest listening guest port]
//! publish_same_port = false  # also listen on 127.0.0.1:<guest port>
//!
//! [network]
//! allow = ["10.1.0.0/16"]  # private blocks outbound connections may reach
//!
//! [sync]
//! artifacts = ["dist"]   # `sync --artifacts` writes these in place
//! ```
//!
//! Precedence, lowest first: built-in defaults, the system-wide file, the
//! user's file, `KEYSTONE_AGENT_BACKEND` / `KEYSTONE_AGENT_MEMORY` /
//! `KEYSTONE_AGENT_VCPUS` / `KEYSTONE_AGENT_SYNC_MODE`, then flags. A key
//! the user's file leaves out keeps the system-wide file's value.
//!
//! That resolves the settings of a sandbox's first start (or a `--fresh`
//! one). A later start keeps what the sandbox saved in its `config.json`
//! (memory, vCPUs, nesting, network, sync mode, agent) unless a flag overrides it
//! (and is saved in turn); see [`for_existing`].
//!
//! An unknown key or a bad value, in either file, is an error naming that
//! file, the line and the key (`file.rs` reads a file with serde,
//! `file_error.rs` locates its errors, `choice.rs` has the settings that
//! take one of a few words). SPEC.md has no exit code for an invalid
//! configuration; it is not "invalid state" (2, a sandbox's state) nor a
//! failed operation, so it exits 1, as a missing or unusable input does.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

mod choice;
mod file;
mod file_error;

pub use choice::{AgentKind, BackendKind, Engine, Network, ShareProto, SyncMode};

/// The agent of a sandbox whose `config.json` predates the setting.
fn default_agent() -> AgentKind {
    AgentKind::Claude
}

/// Fully resolved settings for one sandbox (what `config.json` records).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settings {
    pub memory_mib: u32,
    pub vcpus: u32,
    pub nested_virt: bool,
    pub network: Network,
    pub sync_mode: SyncMode,
    pub persist: bool,
    pub backend: BackendKind,
    pub share_proto: ShareProto,
    pub engine: Engine,
    pub proxy_enable: bool,
    pub proxy_domain: String,
    /// `[proxy] port`: the dev-server proxy's loopback port; `None` takes
    /// the default (`proxy::listen_port`).
    #[serde(default)]
    pub proxy_port: Option<u16>,
    /// `[proxy] primary_port`: the guest port a sandbox's own name reaches
    /// (`http://<sandbox>.localhost:<P>/`); `None`: its lowest listening one.
    #[serde(default)]
    pub proxy_primary_port: Option<u16>,
    /// `[proxy] publish_same_port`: the supervisor also listens on the
    /// host's 127.0.0.1 at each listening guest port's own number.
    #[serde(default)]
    pub proxy_publish_same_port: bool,
    /// `[network] allow`: private address blocks the sandbox may reach
    /// (see `netpolicy`), as written (each parses as a `Cidr`).
    #[serde(default)]
    pub network_allow: Vec<String>,
    /// `[backend.kubernetes]`: where the Kubernetes backend would run.
    #[serde(default)]
    pub kubernetes: KubernetesTarget,
    /// `[sync] artifacts`: project paths (plain relative components) that
    /// `sync --artifacts` writes in place; other artifacts are staged.
    #[serde(default)]
    pub sync_artifacts: Vec<String>,
    /// `[defaults] agent` / `--agent`: the coding agent `attach` opens.
    #[serde(default = "default_agent")]
    pub agent: AgentKind,
}

/// `[backend.kubernetes]`: the cluster, namespace and storage class the
/// Kubernetes backend is to use; each is unset unless a file sets it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KubernetesTarget {
    pub context: Option<String>,
    pub namespace: Option<String>,
    pub storage_class: Option<String>,
}

impl KubernetesTarget {
    /// The keys that are set, as `key = "value"` joined by ", "; `None`
    /// when none is.
    pub fn describe(&self) -> Option<String> {
        let set: Vec<String> = [
            ("context", &self.context),
            ("namespace", &self.namespace),
            ("storage_class", &self.storage_class),
        ]
        .into_iter()
        .filter_map(|(key, v)| v.as_ref().map(|v| format!("{key} = {v:?}")))
        .collect();
        (!set.is_empty()).then(|| set.join(", "))
    }
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            memory_mib: 8192,
            vcpus: 4,
            nested_virt: true,
            network: Network::Nat,
            sync_mode: SyncMode::Manual,
            persist: true,
            backend: BackendKind::MicroVm,
            share_proto: ShareProto::VirtioFs,
            engine: Engine::Auto,
            proxy_enable: true,
            proxy_domain: "sandbox.local".into(),
            proxy_port: None,
            proxy_primary_port: None,
            proxy_publish_same_port: false,
            network_allow: Vec::new(),
            kubernetes: KubernetesTarget::default(),
            sync_artifacts: Vec::new(),
            agent: default_agent(),
        }
    }
}

/// Bounds on sizes, checked wherever a size comes from.
pub const MEMORY_MIB: (u32, u32) = (128, 1 << 20);
pub const VCPUS: (u32, u32) = (1, 255);

/// Settings given on the command line (the highest layer).
#[derive(Clone, Debug, Default)]
pub struct FlagOverrides {
    pub memory_mib: Option<u32>,
    pub vcpus: Option<u32>,
    pub nested_virt: Option<bool>,
    pub network: Option<Network>,
    pub sync_mode: Option<SyncMode>,
    pub agent: Option<AgentKind>,
}

/// A configuration that cannot be used. The message names the file, line
/// and key, or the environment variable.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// Where the system-wide file is unless `KEYSTONE_SYSTEM_CONFIG` says.
pub const SYSTEM_PATH: &str = "/etc/keystone/agent.toml";

/// The location of the system-wide `agent.toml`: `KEYSTONE_SYSTEM_CONFIG`
/// when set and not empty, else [`SYSTEM_PATH`].
pub fn system_path(var: &dyn Fn(&str) -> Option<String>) -> PathBuf {
    var("KEYSTONE_SYSTEM_CONFIG")
        .filter(|v| !v.is_empty())
        .map_or_else(|| PathBuf::from(SYSTEM_PATH), PathBuf::from)
}

/// The default location of the user's `agent.toml`.
pub fn default_path(var: &dyn Fn(&str) -> Option<String>) -> Option<PathBuf> {
    let nonempty = |k: &str| var(k).filter(|v| !v.is_empty());
    if let Some(dir) = nonempty("XDG_CONFIG_HOME") {
        return Some(PathBuf::from(dir).join("keystone/agent.toml"));
    }
    nonempty("HOME").map(|home| PathBuf::from(home).join(".config/keystone/agent.toml"))
}

/// The contents of the file at `path`, or `None` if there is none.
fn read_if_present(path: PathBuf) -> Result<Option<(PathBuf, String)>, ConfigError> {
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(Some((path, text))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ConfigError(format!(
            "cannot read {}: {e}; fix its permissions or remove it",
            path.display()
        ))),
    }
}

/// Resolves settings from the process environment, the system-wide and
/// user files (those that exist) and `flags`.
pub fn load(flags: &FlagOverrides) -> Result<Settings, ConfigError> {
    let var = |k: &str| std::env::var(k).ok();
    let mut files = Vec::new();
    if let Some(found) = read_if_present(system_path(&var))? {
        files.push(found);
    }
    if let Some(path) = default_path(&var) {
        if let Some(found) = read_if_present(path)? {
            files.push(found);
        }
    }
    let files: Vec<(&Path, &str)> = files
        .iter()
        .map(|(p, t)| (p.as_path(), t.as_str()))
        .collect();
    resolve(&files, &var, flags)
}

/// The pure core of [`load`]: defaults < each of `files` in order (the
/// system-wide file, then the user's) < environment < `flags`.
pub fn resolve(
    files: &[(&Path, &str)],
    var: &dyn Fn(&str) -> Option<String>,
    flags: &FlagOverrides,
) -> Result<Settings, ConfigError> {
    let mut s = Settings::default();
    for (path, text) in files {
        file::apply_file(&mut s, path, text)?;
    }
    apply_env(&mut s, var)?;
    apply_flags(&mut s, flags)?;
    Ok(s)
}

/// Puts the flags given on the command line over `s`.
fn apply_flags(s: &mut Settings, flags: &FlagOverrides) -> Result<(), ConfigError> {
    if let Some(v) = flags.memory_mib {
        s.memory_mib = check_range("--memory", v, MEMORY_MIB)?;
    }
    if let Some(v) = flags.vcpus {
        s.vcpus = check_range("--vcpus", v, VCPUS)?;
    }
    if let Some(v) = flags.nested_virt {
        s.nested_virt = v;
    }
    if let Some(v) = flags.network {
        s.network = v;
    }
    if let Some(v) = flags.sync_mode {
        s.sync_mode = v;
    }
    if let Some(v) = flags.agent {
        s.agent = v;
    }
    Ok(())
}

/// The settings of a later start of a sandbox that recorded `saved` in its
/// `config.json`: the sandbox's own settings (memory, vCPUs, nesting,
/// network, sync mode, agent) are the saved ones unless a flag of this start
/// overrides them; the host's settings (backend, engine, share protocol,
/// proxy, persist) follow `current` (the file and environment of this
/// run). The result is saved again, so a flag given once sticks.
pub fn for_existing(
    saved: &Settings,
    current: &Settings,
    flags: &FlagOverrides,
) -> Result<Settings, ConfigError> {
    let mut s = Settings {
        memory_mib: saved.memory_mib,
        vcpus: saved.vcpus,
        nested_virt: saved.nested_virt,
        network: saved.network,
        sync_mode: saved.sync_mode,
        agent: saved.agent,
        ..current.clone()
    };
    apply_flags(&mut s, flags)?;
    Ok(s)
}

fn check_range(what: &str, v: u32, (lo, hi): (u32, u32)) -> Result<u32, ConfigError> {
    if (lo..=hi).contains(&v) {
        Ok(v)
    } else {
        Err(ConfigError(format!(
            "{what} must be between {lo} and {hi}, got {v}"
        )))
    }
}

fn apply_env(s: &mut Settings, var: &dyn Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
    let get = |k: &str| var(k).filter(|v| !v.trim().is_empty());
    fn choice<T: FromStr>(key: &str, v: &str, choices: &[&str]) -> Result<T, ConfigError> {
        v.trim().parse().map_err(|_| {
            ConfigError(format!(
                "environment variable {key}={v:?} is not one of {}",
                choices.join(", ")
            ))
        })
    }
    let number = |key: &str, v: &str, range: (u32, u32)| -> Result<u32, ConfigError> {
        let n: u32 = v.trim().parse().map_err(|_| {
            ConfigError(format!(
                "environment variable {key}={v:?} is not a whole number"
            ))
        })?;
        check_range(&format!("environment variable {key}"), n, range)
    };
    if let Some(v) = get("KEYSTONE_AGENT_BACKEND") {
        s.backend = choice("KEYSTONE_AGENT_BACKEND", &v, BackendKind::CHOICES)?;
    }
    if let Some(v) = get("KEYSTONE_AGENT_MEMORY") {
        s.memory_mib = number("KEYSTONE_AGENT_MEMORY", &v, MEMORY_MIB)?;
    }
    if let Some(v) = get("KEYSTONE_AGENT_VCPUS") {
        s.vcpus = number("KEYSTONE_AGENT_VCPUS", &v, VCPUS)?;
    }
    if let Some(v) = get("KEYSTONE_AGENT_SYNC_MODE") {
        s.sync_mode = choice("KEYSTONE_AGENT_SYNC_MODE", &v, SyncMode::CHOICES)?;
    }
    Ok(())
}

#[cfg(test)]
#[path = "config/resolve_tests.rs"]
mod tests;
