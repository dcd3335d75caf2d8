//! Reading one `agent.toml` (the system-wide file or the user's): the raw
//! TOML tables, checked against the keys we know, and each value checked
//! and put over [`Settings`]. Every problem becomes a [`ConfigError`] that
//! names the file, the line, the column and the key.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use serde::Deserialize;
use toml::Spanned;

use super::{
    AgentKind, BackendKind, ConfigError, Engine, Network, Settings, ShareProto, SyncMode,
    MEMORY_MIB, VCPUS,
};

type Value = Option<Spanned<toml::Value>>;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawFile {
    defaults: Option<RawDefaults>,
    backend: Option<RawBackend>,
    proxy: Option<RawProxy>,
    network: Option<RawNetwork>,
    sync: Option<RawSync>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawSync {
    artifacts: Value,
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
    agent: Value,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    #[serde(rename = "type")]
    kind: Value,
    microvm: Option<RawMicroVm>,
    kubernetes: Option<RawKubernetes>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawKubernetes {
    context: Value,
    namespace: Value,
    storage_class: Value,
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
    port: Value,
    primary_port: Value,
    publish_same_port: Value,
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
                Some(text) => match text.parse::<crate::agent::netpolicy::Cidr>() {
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

    /// A Kubernetes name: `max` bytes at most, lowercase letters, digits
    /// and `-` (and `.` between labels when `dots`), each label starting
    /// and ending with a letter or digit (RFC 1123).
    fn k8s_name(
        &self,
        key: &str,
        v: &Spanned<toml::Value>,
        max: usize,
        dots: bool,
        wanted: &str,
    ) -> Result<String, ConfigError> {
        let label_ok = |l: &str| {
            let b = l.as_bytes();
            !b.is_empty()
                && b.iter()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
                && b[0] != b'-'
                && b[b.len() - 1] != b'-'
        };
        match v.get_ref().as_str() {
            Some(n)
                if n.len() <= max
                    && (if dots {
                        n.split('.').all(label_ok)
                    } else {
                        label_ok(n)
                    }) =>
            {
                Ok(n.to_string())
            }
            _ => Err(self.bad_value(key, v, wanted)),
        }
    }

    /// Project paths: relative, of plain components (no `.`, `..` or
    /// empty one, no control character), outside `.git`; a trailing `/`
    /// is dropped.
    fn project_paths(
        &self,
        key: &str,
        v: &Spanned<toml::Value>,
    ) -> Result<Vec<String>, ConfigError> {
        let what = "a list of folders in the project such as [\"dist\", \"build/out\"]";
        let list = v
            .get_ref()
            .as_array()
            .ok_or_else(|| self.bad_value(key, v, what))?;
        list.iter()
            .map(|item| {
                let path = item.as_str().map(|p| p.trim_end_matches('/')).unwrap_or("");
                let plain = !path.is_empty()
                    && !path.chars().any(char::is_control)
                    && path
                        .split('/')
                        .all(|c| !matches!(c, "" | "." | "..") && !c.eq_ignore_ascii_case(".git"));
                if plain {
                    Ok(path.to_string())
                } else {
                    Err(self.bad_value(key, v, &format!("{what}, relative and outside .git")))
                }
            })
            .collect()
    }

    /// A kubeconfig context name: any printable text up to 253 bytes.
    fn context(&self, key: &str, v: &Spanned<toml::Value>) -> Result<String, ConfigError> {
        match v.get_ref().as_str() {
            Some(c)
                if !c.trim().is_empty() && c.len() <= 253 && !c.chars().any(char::is_control) =>
            {
                Ok(c.to_string())
            }
            _ => Err(self.bad_value(key, v, "a kubeconfig context name such as \"prod\"")),
        }
    }
}

/// Puts the values of the file at `path` (its contents `text`) over `s`;
/// keys the file does not set keep what `s` has.
pub(super) fn apply_file(s: &mut Settings, path: &Path, text: &str) -> Result<(), ConfigError> {
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
        if let Some(v) = &d.agent {
            s.agent = r.choice("defaults.agent", v, AgentKind::CHOICES)?;
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
        if let Some(k) = b.kubernetes {
            let k8s = &mut s.kubernetes;
            if let Some(v) = &k.context {
                k8s.context = Some(r.context("backend.kubernetes.context", v)?);
            }
            if let Some(v) = &k.namespace {
                let wanted = "a Kubernetes namespace such as \"agents\" (lowercase letters, digits and '-', at most 63)";
                k8s.namespace =
                    Some(r.k8s_name("backend.kubernetes.namespace", v, 63, false, wanted)?);
            }
            if let Some(v) = &k.storage_class {
                let wanted = "a storage class name such as \"fast-ssd\" (lowercase letters, digits, '-' and '.')";
                k8s.storage_class =
                    Some(r.k8s_name("backend.kubernetes.storage_class", v, 253, true, wanted)?);
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
        if let Some(v) = &p.port {
            s.proxy_port = Some(r.u32_in("proxy.port", v, (1, 65535))? as u16);
        }
        if let Some(v) = &p.primary_port {
            s.proxy_primary_port = Some(r.u32_in("proxy.primary_port", v, (1, 65535))? as u16);
        }
        if let Some(v) = &p.publish_same_port {
            s.proxy_publish_same_port = r.bool("proxy.publish_same_port", v)?;
        }
    }
    if let Some(n) = raw.network {
        if let Some(v) = &n.allow {
            s.network_allow = r.cidrs("network.allow", v)?;
        }
    }
    if let Some(y) = raw.sync {
        if let Some(v) = &y.artifacts {
            s.sync_artifacts = r.project_paths("sync.artifacts", v)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from_file(text: &str) -> Result<Settings, ConfigError> {
        let mut s = Settings::default();
        apply_file(&mut s, Path::new("/cfg/agent.toml"), text)?;
        Ok(s)
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
port = 8080
primary_port = 5173
publish_same_port = true
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
        assert_eq!(s.proxy_port, Some(8080));
        assert_eq!(s.proxy_primary_port, Some(5173));
        assert!(s.proxy_publish_same_port);
    }

    #[test]
    fn proxy_ports_are_checked() {
        for (line, key) in [
            ("port = 0", "proxy.port"),
            ("port = 70000", "proxy.port"),
            ("port = \"80\"", "proxy.port"),
            ("primary_port = -1", "proxy.primary_port"),
            ("publish_same_port = 1", "proxy.publish_same_port"),
        ] {
            let err = from_file(&format!("[proxy]\n{line}\n"))
                .unwrap_err()
                .to_string();
            assert!(
                err.starts_with("/cfg/agent.toml:2:") && err.contains(&format!("`{key}`")),
                "{line}: {err}"
            );
        }
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
    fn sync_artifacts_takes_project_paths() {
        let s = from_file("[sync]\nartifacts = [\"dist\", \"build/out/\"]\n").unwrap();
        assert_eq!(s.sync_artifacts, ["dist", "build/out"]);
        for bad in [
            "\"/etc\"",
            "\"../x\"",
            "\"a//b\"",
            "\".git/hooks\"",
            "\"\"",
            "1",
        ] {
            let err = from_file(&format!("\n[sync]\nartifacts = [{bad}]\n"))
                .unwrap_err()
                .to_string();
            assert!(
                err.starts_with("/cfg/agent.toml:3:13: invalid value for `sync.artifacts`"),
                "{bad}: {err}"
            );
        }
        let err = from_file("[sync]\nartifact = []\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains(":2:1: unknown key `sync.artifact`"), "{err}");
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
    fn the_kubernetes_table_is_read() {
        let s = from_file(
            "[backend]\ntype = \"kubernetes\"\n\n[backend.kubernetes]\n\
             context = \"prod-eu\"\nnamespace = \"agents\"\nstorage_class = \"fast.ssd-1\"\n",
        )
        .unwrap();
        assert_eq!(s.backend, BackendKind::Kubernetes);
        assert_eq!(s.kubernetes.context.as_deref(), Some("prod-eu"));
        assert_eq!(s.kubernetes.namespace.as_deref(), Some("agents"));
        assert_eq!(s.kubernetes.storage_class.as_deref(), Some("fast.ssd-1"));
        // Unset keys stay unset.
        let s = from_file("[backend.kubernetes]\nnamespace = \"a-1\"\n").unwrap();
        assert_eq!(s.kubernetes.context, None);
        assert_eq!(s.kubernetes.storage_class, None);
    }

    #[test]
    fn bad_kubernetes_values_name_the_key() {
        for (line, key) in [
            ("namespace = \"Agents\"", "backend.kubernetes.namespace"),
            ("namespace = \"-a\"", "backend.kubernetes.namespace"),
            ("namespace = \"a.b\"", "backend.kubernetes.namespace"),
            (
                "storage_class = \"fast..ssd\"",
                "backend.kubernetes.storage_class",
            ),
            ("storage_class = 3", "backend.kubernetes.storage_class"),
            ("context = \"\"", "backend.kubernetes.context"),
            ("context = \"a\\u0007b\"", "backend.kubernetes.context"),
        ] {
            let err = from_file(&format!("[backend.kubernetes]\n{line}\n"))
                .unwrap_err()
                .to_string();
            assert!(
                err.starts_with("/cfg/agent.toml:2:") && err.contains(&format!("`{key}`")),
                "{line}: {err}"
            );
        }
        let err = from_file("[backend.kubernetes]\ncluster = \"x\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(":2:1: unknown key `backend.kubernetes.cluster`"),
            "{err}"
        );
    }
}
