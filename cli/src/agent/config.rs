//! Agent configuration: `agent.toml`, environment overrides, flags.
//!
//! The file is `$XDG_CONFIG_HOME/keystone/agent.toml` (or
//! `~/.config/keystone/agent.toml`):
//!
//! ```toml
//! [defaults]
//! memory = 8192          # MiB
//! vcpus = 4
//! nested_virt = true
//! network = "nat"        # nat | none | bridge
//! sync_mode = "manual"   # manual | auto-commit | auto-idle
//! persist = true         # keep the sandbox disk between starts
//!
//! [backend]
//! type = "microvm"       # microvm | kubernetes
//!
//! [backend.microvm]
//! share_proto = "virtiofs"
//! engine = "auto"        # auto | vmm | qemu
//!
//! [proxy]
//! enable = true
//! domain = "sandbox.local"
//!
//! [network]
//! allow = ["10.1.0.0/16"]  # private blocks outbound connections may reach
//! ```
//!
//! Precedence, lowest first: built-in defaults, the file,
//! `KEYSTONE_AGENT_BACKEND` / `KEYSTONE_AGENT_MEMORY` /
//! `KEYSTONE_AGENT_VCPUS` / `KEYSTONE_AGENT_SYNC_MODE`, then flags.
//!
//! That resolves the settings of a sandbox's first start (or a `--fresh`
//! one). A later start keeps what the sandbox saved in its `config.json`
//! (memory, vCPUs, nesting, network, sync mode) unless a flag overrides it
//! (and is saved in turn); see [`for_existing`].
//!
//! An unknown key or a bad value is an error naming the file, the line and
//! the key. SPEC.md has no exit code for an invalid configuration; it is
//! not "invalid state" (2, a sandbox's state) nor a failed operation, so it
//! exits 1, as a missing or unusable input does.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use toml::Spanned;

/// Declares a string-valued setting: an enum with its spellings.
macro_rules! choice {
    ($(#[$meta:meta])* $name:ident { $($variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
        pub enum $name {
            $(#[serde(rename = $text)] #[value(name = $text)] $variant),+
        }

        impl $name {
            /// Every accepted spelling, for messages.
            pub const CHOICES: &'static [&'static str] = &[$($text),+];

            pub fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $text),+ }
            }
        }

        impl FromStr for $name {
            type Err = ();
            fn from_str(s: &str) -> Result<Self, ()> {
                match s { $($text => Ok(Self::$variant),)+ _ => Err(()) }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

choice!(
    /// Guest networking.
    Network { Nat = "nat", None = "none", Bridge = "bridge" }
);
choice!(
    /// When the sandbox's commits move to the host.
    SyncMode { Manual = "manual", AutoCommit = "auto-commit", AutoIdle = "auto-idle" }
);
choice!(
    /// Which backend runs sandboxes.
    BackendKind { MicroVm = "microvm", Kubernetes = "kubernetes" }
);
choice!(
    /// How the workspace is shared with a micro-VM.
    ShareProto { VirtioFs = "virtiofs" }
);
choice!(
    /// Which engine runs a micro-VM: our VMM on KVM, QEMU's software
    /// emulation, or the best the host allows.
    Engine { Auto = "auto", Vmm = "vmm", Qemu = "qemu" }
);

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
    /// `[network] allow`: private address blocks the sandbox may reach
    /// (see `netpolicy`), as written (each parses as a `Cidr`).
    #[serde(default)]
    pub network_allow: Vec<String>,
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
            network_allow: Vec::new(),
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
}

/// A configuration that cannot be used. The message names the file, line
/// and key, or the environment variable.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// The default location of `agent.toml`.
pub fn default_path(var: &dyn Fn(&str) -> Option<String>) -> Option<PathBuf> {
    let nonempty = |k: &str| var(k).filter(|v| !v.is_empty());
    if let Some(dir) = nonempty("XDG_CONFIG_HOME") {
        return Some(PathBuf::from(dir).join("keystone/agent.toml"));
    }
    nonempty("HOME").map(|home| PathBuf::from(home).join(".config/keystone/agent.toml"))
}

/// Resolves settings from the process environment, the default file (if it
/// exists) and `flags`.
pub fn load(flags: &FlagOverrides) -> Result<Settings, ConfigError> {
    let var = |k: &str| std::env::var(k).ok();
    let file = match default_path(&var) {
        Some(path) => match std::fs::read_to_string(&path) {
            Ok(text) => Some((path, text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(ConfigError(format!("cannot read {}: {e}", path.display()))),
        },
        None => None,
    };
    let file = file.as_ref().map(|(p, t)| (p.as_path(), t.as_str()));
    resolve(file, &var, flags)
}

/// The pure core of [`load`]: defaults < `file` < environment < `flags`.
pub fn resolve(
    file: Option<(&Path, &str)>,
    var: &dyn Fn(&str) -> Option<String>,
    flags: &FlagOverrides,
) -> Result<Settings, ConfigError> {
    let mut s = Settings::default();
    if let Some((path, text)) = file {
        apply_file(&mut s, path, text)?;
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
    Ok(())
}

/// The settings of a later start of a sandbox that recorded `saved` in its
/// `config.json`: the sandbox's own settings (memory, vCPUs, nesting,
/// network, sync mode) are the saved ones unless a flag of this start
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

// ---- the file ----

type Value = Option<Spanned<toml::Value>>;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawFile {
    defaults: Option<RawDefaults>,
    backend: Option<RawBackend>,
    proxy: Option<RawProxy>,
    network: Option<RawNetwork>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawNetwork {
    allow: Value,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDefaults {
    memory: Value,
    vcpus: Value,
    nested_virt: Value,
    network: Value,
    sync_mode: Value,
    persist: Value,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    #[serde(rename = "type")]
    kind: Value,
    microvm: Option<RawMicroVm>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawMicroVm {
    share_proto: Value,
    engine: Value,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawProxy {
    enable: Value,
    domain: Value,
}

/// Reads values out of the file, turning problems into located errors.
struct FileReader<'a> {
    path: &'a Path,
    text: &'a str,
}

impl FileReader<'_> {
    /// `1`-based line and column of a byte offset.
    fn line_col(&self, offset: usize) -> (usize, usize) {
        let before = &self.text[..offset.min(self.text.len())];
        let line = before.matches('\n').count() + 1;
        let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
        (line, col)
    }

    fn error_at(&self, offset: usize, message: impl fmt::Display) -> ConfigError {
        let (line, col) = self.line_col(offset);
        ConfigError(format!("{}:{line}:{col}: {message}", self.path.display()))
    }

    /// The table path in force at `offset`, as `table.` (or ""): the part
    /// of a `[a.b]` header before the offset if the offset is in a header,
    /// else the last header above it.
    fn table_at(&self, offset: usize) -> String {
        let offset = offset.min(self.text.len());
        let line_start = self.text[..offset].rfind('\n').map_or(0, |i| i + 1);
        let this_line = self.text[line_start..offset].trim_start();
        if let Some(inside) = this_line.strip_prefix('[') {
            let inside = inside.trim_start_matches('[').trim();
            return inside.to_string();
        }
        self.text[..line_start]
            .lines()
            .rev()
            .map(str::trim)
            .find(|l| l.starts_with('['))
            .map(|l| {
                l.trim_start_matches('[')
                    .split(']')
                    .next()
                    .unwrap_or("")
                    .trim()
            })
            .map(|t| format!("{t}."))
            .unwrap_or_default()
    }

    /// Turns a serde/toml error into a located one naming the key.
    fn parse_error(&self, err: toml::de::Error) -> ConfigError {
        let message = err.message().trim().to_string();
        let Some(span) = err.span() else {
            return ConfigError(format!("{}: {message}", self.path.display()));
        };
        if let Some(rest) = message.strip_prefix("unknown field `") {
            let key = rest.split('`').next().unwrap_or(rest);
            let expected = rest.split_once(", expected ").map(|(_, e)| e);
            let key = format!("{}{key}", self.table_at(span.start));
            let hint = expected
                .map(|e| format!(" (expected {e})"))
                .unwrap_or_default();
            return self.error_at(span.start, format!("unknown key `{key}`{hint}"));
        }
        self.error_at(span.start, message)
    }

    fn bad_value(&self, key: &str, v: &Spanned<toml::Value>, wanted: &str) -> ConfigError {
        self.error_at(
            v.span().start,
            format!(
                "invalid value for `{key}`: expected {wanted}, got {}",
                v.get_ref()
            ),
        )
    }

    fn u32_in(
        &self,
        key: &str,
        v: &Spanned<toml::Value>,
        range: (u32, u32),
    ) -> Result<u32, ConfigError> {
        let wanted = format!("a whole number from {} to {}", range.0, range.1);
        match v.get_ref() {
            toml::Value::Integer(n) if (i64::from(range.0)..=i64::from(range.1)).contains(n) => {
                Ok(*n as u32)
            }
            _ => Err(self.bad_value(key, v, &wanted)),
        }
    }

    fn bool(&self, key: &str, v: &Spanned<toml::Value>) -> Result<bool, ConfigError> {
        v.get_ref()
            .as_bool()
            .ok_or_else(|| self.bad_value(key, v, "true or false"))
    }

    fn choice<T: FromStr>(
        &self,
        key: &str,
        v: &Spanned<toml::Value>,
        choices: &[&str],
    ) -> Result<T, ConfigError> {
        v.get_ref()
            .as_str()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| {
                let quoted: Vec<_> = choices.iter().map(|c| format!("\"{c}\"")).collect();
                self.bad_value(key, v, &format!("one of {}", quoted.join(", ")))
            })
    }

    fn cidrs(&self, key: &str, v: &Spanned<toml::Value>) -> Result<Vec<String>, ConfigError> {
        let what = "a list of IP addresses or CIDR blocks such as [\"10.1.0.0/16\"]";
        let list = v
            .get_ref()
            .as_array()
            .ok_or_else(|| self.bad_value(key, v, what))?;
        list.iter()
            .map(|item| match item.as_str() {
                Some(text) => match text.parse::<super::netpolicy::Cidr>() {
                    Ok(_) => Ok(text.trim().to_string()),
                    Err(e) => Err(self.bad_value(key, v, &format!("{what} ({e})"))),
                },
                None => Err(self.bad_value(key, v, what)),
            })
            .collect()
    }

    fn domain(&self, key: &str, v: &Spanned<toml::Value>) -> Result<String, ConfigError> {
        match v.get_ref().as_str() {
            Some(d)
                if !d.is_empty()
                    && d.split('.').all(|label| {
                        !label.is_empty()
                            && label
                                .bytes()
                                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    }) =>
            {
                Ok(d.to_ascii_lowercase())
            }
            _ => Err(self.bad_value(key, v, "a DNS domain such as \"sandbox.local\"")),
        }
    }
}

fn apply_file(s: &mut Settings, path: &Path, text: &str) -> Result<(), ConfigError> {
    let r = FileReader { path, text };
    let raw: RawFile = toml::from_str(text).map_err(|e| r.parse_error(e))?;
    if let Some(d) = raw.defaults {
        if let Some(v) = &d.memory {
            s.memory_mib = r.u32_in("defaults.memory", v, MEMORY_MIB)?;
        }
        if let Some(v) = &d.vcpus {
            s.vcpus = r.u32_in("defaults.vcpus", v, VCPUS)?;
        }
        if let Some(v) = &d.nested_virt {
            s.nested_virt = r.bool("defaults.nested_virt", v)?;
        }
        if let Some(v) = &d.network {
            s.network = r.choice("defaults.network", v, Network::CHOICES)?;
        }
        if let Some(v) = &d.sync_mode {
            s.sync_mode = r.choice("defaults.sync_mode", v, SyncMode::CHOICES)?;
        }
        if let Some(v) = &d.persist {
            s.persist = r.bool("defaults.persist", v)?;
        }
    }
    if let Some(b) = raw.backend {
        if let Some(v) = &b.kind {
            s.backend = r.choice("backend.type", v, BackendKind::CHOICES)?;
        }
        if let Some(m) = b.microvm {
            if let Some(v) = &m.share_proto {
                s.share_proto = r.choice("backend.microvm.share_proto", v, ShareProto::CHOICES)?;
            }
            if let Some(v) = &m.engine {
                s.engine = r.choice("backend.microvm.engine", v, Engine::CHOICES)?;
            }
        }
    }
    if let Some(p) = raw.proxy {
        if let Some(v) = &p.enable {
            s.proxy_enable = r.bool("proxy.enable", v)?;
        }
        if let Some(v) = &p.domain {
            s.proxy_domain = r.domain("proxy.domain", v)?;
        }
    }
    if let Some(n) = raw.network {
        if let Some(v) = &n.allow {
            s.network_allow = r.cidrs("network.allow", v)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    fn from_file(text: &str) -> Result<Settings, ConfigError> {
        resolve(
            Some((Path::new("/cfg/agent.toml"), text)),
            &env(&[]),
            &FlagOverrides::default(),
        )
    }

    #[test]
    fn defaults_match_the_spec() {
        let s = resolve(None, &env(&[]), &FlagOverrides::default()).unwrap();
        assert_eq!(s, Settings::default());
        assert_eq!(
            (s.memory_mib, s.vcpus, s.nested_virt, s.persist),
            (8192, 4, true, true)
        );
        assert_eq!(s.network, Network::Nat);
        assert_eq!(s.sync_mode, SyncMode::Manual);
        assert_eq!(s.backend, BackendKind::MicroVm);
        assert_eq!(s.engine, Engine::Auto);
        assert_eq!(s.proxy_domain, "sandbox.local");
    }

    #[test]
    fn a_full_file_is_read() {
        let s = from_file(
            r#"
[defaults]
memory = 4096
vcpus = 2
nested_virt = false
network = "none"
sync_mode = "auto-idle"
persist = false

[backend]
type = "kubernetes"

[backend.microvm]
share_proto = "virtiofs"
engine = "qemu"

[proxy]
enable = false
domain = "Dev.Test"
"#,
        )
        .unwrap();
        assert_eq!(
            (s.memory_mib, s.vcpus, s.nested_virt, s.persist),
            (4096, 2, false, false)
        );
        assert_eq!(s.network, Network::None);
        assert_eq!(s.sync_mode, SyncMode::AutoIdle);
        assert_eq!(s.backend, BackendKind::Kubernetes);
        assert_eq!(s.engine, Engine::Qemu);
        assert!(!s.proxy_enable);
        assert_eq!(s.proxy_domain, "dev.test");
    }

    #[test]
    fn precedence_is_file_then_env_then_flags() {
        let file = "[defaults]\nmemory = 1024\nvcpus = 2\nsync_mode = \"auto-commit\"\n";
        let path = Path::new("/cfg/agent.toml");
        let vars = env(&[
            ("KEYSTONE_AGENT_MEMORY", "2048"),
            ("KEYSTONE_AGENT_SYNC_MODE", "auto-idle"),
            ("KEYSTONE_AGENT_BACKEND", "kubernetes"),
        ]);
        let s = resolve(Some((path, file)), &vars, &FlagOverrides::default()).unwrap();
        assert_eq!((s.memory_mib, s.vcpus), (2048, 2));
        assert_eq!(s.sync_mode, SyncMode::AutoIdle);
        assert_eq!(s.backend, BackendKind::Kubernetes);

        let flags = FlagOverrides {
            memory_mib: Some(512),
            vcpus: Some(8),
            sync_mode: Some(SyncMode::Manual),
            nested_virt: Some(false),
            network: Some(Network::Bridge),
        };
        let s = resolve(Some((path, file)), &vars, &flags).unwrap();
        assert_eq!((s.memory_mib, s.vcpus, s.nested_virt), (512, 8, false));
        assert_eq!(s.sync_mode, SyncMode::Manual);
        assert_eq!(s.network, Network::Bridge);
    }

    #[test]
    fn empty_env_values_are_ignored_and_bad_ones_named() {
        let s = resolve(
            None,
            &env(&[("KEYSTONE_AGENT_VCPUS", "")]),
            &FlagOverrides::default(),
        );
        assert_eq!(s.unwrap().vcpus, 4);
        let err = resolve(
            None,
            &env(&[("KEYSTONE_AGENT_VCPUS", "many")]),
            &FlagOverrides::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("KEYSTONE_AGENT_VCPUS"), "{err}");
        let err = resolve(
            None,
            &env(&[("KEYSTONE_AGENT_BACKEND", "docker")]),
            &FlagOverrides::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("microvm, kubernetes"), "{err}");
    }

    #[test]
    fn unknown_keys_name_file_line_and_key() {
        let err = from_file("[defaults]\nmemory = 1024\nmemroy = 2048\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("/cfg/agent.toml:3:1: unknown key `defaults.memroy`"),
            "{err}"
        );
        let err = from_file("[backend.microvm]\nengine = \"vmm\"\nturbo = true\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(":3:1: unknown key `backend.microvm.turbo`"),
            "{err}"
        );
        let err = from_file("\n[netwrk]\nmode = 1\n").unwrap_err().to_string();
        assert!(
            err.contains("/cfg/agent.toml:2:2: unknown key `netwrk`"),
            "{err}"
        );
        let err = from_file("\n[network]\nmode = 1\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/cfg/agent.toml:3:1: unknown key `network.mode` (expected `allow`)"),
            "{err}"
        );
        let err = from_file("[backend]\ntype = \"microvm\"\n[defaults.extra]\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains(":3:11: unknown key `defaults.extra`"), "{err}");
    }

    #[test]
    fn network_allow_takes_address_blocks() {
        let s = from_file("[network]\nallow = [\"10.1.0.0/16\", \"fd00::/8\", \"192.168.1.5\"]\n")
            .unwrap();
        assert_eq!(s.network_allow, ["10.1.0.0/16", "fd00::/8", "192.168.1.5"]);
        for bad in [
            "allow = \"10.0.0.0/8\"",
            "allow = [\"10.0.0.0/40\"]",
            "allow = [\"lan\"]",
            "allow = [1]",
        ] {
            let err = from_file(&format!("[network]\n{bad}\n"))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("`network.allow`") && err.contains(":2:"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn bad_values_name_file_line_and_key() {
        let err = from_file("[defaults]\nvcpus = 4\nmemory = \"lots\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("/cfg/agent.toml:3:10: invalid value for `defaults.memory`"),
            "{err}"
        );
        let err = from_file("[backend]\ntype = \"docker\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(":2:8: invalid value for `backend.type`"),
            "{err}"
        );
        assert!(err.contains("\"microvm\", \"kubernetes\""), "{err}");
        let err = from_file("[defaults]\nvcpus = 0\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("`defaults.vcpus`"), "{err}");
        let err = from_file("[proxy]\ndomain = \"a..b\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("`proxy.domain`"), "{err}");
    }

    #[test]
    fn syntax_errors_are_located() {
        let err = from_file("[defaults]\nmemory = \n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("/cfg/agent.toml:2:"), "{err}");
    }

    #[test]
    fn a_later_start_keeps_saved_settings_unless_flagged() {
        let saved = Settings {
            memory_mib: 1024,
            vcpus: 1,
            network: Network::None,
            engine: Engine::Vmm,
            ..Settings::default()
        };
        let current = Settings {
            engine: Engine::Qemu,
            ..Settings::default()
        };
        let s = for_existing(&saved, &current, &FlagOverrides::default()).unwrap();
        assert_eq!((s.memory_mib, s.vcpus, s.network), (1024, 1, Network::None));
        assert_eq!(
            s.engine,
            Engine::Qemu,
            "host settings follow the current config"
        );
        let flags = FlagOverrides {
            vcpus: Some(2),
            ..FlagOverrides::default()
        };
        let s = for_existing(&saved, &current, &flags).unwrap();
        assert_eq!((s.memory_mib, s.vcpus), (1024, 2));
        let bad = FlagOverrides {
            memory_mib: Some(1),
            ..FlagOverrides::default()
        };
        assert!(for_existing(&saved, &current, &bad).is_err());
    }

    #[test]
    fn flags_are_range_checked() {
        let flags = FlagOverrides {
            vcpus: Some(0),
            ..Default::default()
        };
        let err = resolve(None, &env(&[]), &flags).unwrap_err().to_string();
        assert!(err.contains("--vcpus"), "{err}");
    }

    #[test]
    fn config_path_honours_xdg() {
        let p = default_path(&env(&[("XDG_CONFIG_HOME", "/x"), ("HOME", "/h")]));
        assert_eq!(p.unwrap(), PathBuf::from("/x/keystone/agent.toml"));
        let p = default_path(&env(&[("XDG_CONFIG_HOME", ""), ("HOME", "/h")]));
        assert_eq!(p.unwrap(), PathBuf::from("/h/.config/keystone/agent.toml"));
    }
}
