//! Reading one `agent.toml` (the system-wide file or the user's) over
//! [`Settings`].
//!
//! serde reads the file into the `Raw*` tables below: each refuses a key
//! it does not know, and each key has its type (a whole number, `true` or
//! `false`, a string, a list of strings, or one of a setting's spellings),
//! so a wrong type or an unknown spelling is serde's error. What a type
//! cannot say is checked here, at the value's span: the ranges of sizes and
//! ports, domain and Kubernetes names, address blocks, project paths.
//! `file_error.rs` turns every problem into a [`ConfigError`] naming the
//! file, the line, the column and the key.

use std::fmt;
use std::path::Path;

use serde::Deserialize;
use toml::Spanned;

use super::file_error::FileText;
use super::{
    AgentKind, BackendKind, ConfigError, Engine, Network, Settings, ShareProto, SyncMode,
    MEMORY_MIB, VCPUS,
};

/// A key whose value is checked beyond its type, with where it is written.
type Checked<T> = Option<Spanned<T>>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    defaults: Option<RawDefaults>,
    backend: Option<RawBackend>,
    proxy: Option<RawProxy>,
    network: Option<RawNetwork>,
    sync: Option<RawSync>,
}

/// Whole numbers are read as TOML's own integers (`i64`), so that a
/// negative or huge one gets the same range message as any other.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDefaults {
    memory: Checked<i64>,
    vcpus: Checked<i64>,
    nested_virt: Option<bool>,
    network: Option<Network>,
    sync_mode: Option<SyncMode>,
    persist: Option<bool>,
    agent: Option<AgentKind>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    #[serde(rename = "type")]
    kind: Option<BackendKind>,
    microvm: Option<RawMicroVm>,
    kubernetes: Option<RawKubernetes>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMicroVm {
    share_proto: Option<ShareProto>,
    engine: Option<Engine>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKubernetes {
    context: Checked<String>,
    namespace: Checked<String>,
    storage_class: Checked<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProxy {
    enable: Option<bool>,
    domain: Checked<String>,
    port: Checked<i64>,
    primary_port: Checked<i64>,
    publish_same_port: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNetwork {
    allow: Option<Vec<Spanned<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSync {
    artifacts: Option<Vec<Spanned<String>>>,
}

/// Puts the values of the file at `path` (its contents `text`) over `s`;
/// keys the file does not set keep what `s` has.
pub(super) fn apply_file(s: &mut Settings, path: &Path, text: &str) -> Result<(), ConfigError> {
    let f = FileText { path, text };
    let raw: RawFile = toml::from_str(text).map_err(|e| f.toml_error(&e))?;
    if let Some(d) = raw.defaults {
        if let Some(v) = &d.memory {
            s.memory_mib = whole_number(&f, "defaults.memory", v, MEMORY_MIB)?;
        }
        if let Some(v) = &d.vcpus {
            s.vcpus = whole_number(&f, "defaults.vcpus", v, VCPUS)?;
        }
        set(&mut s.nested_virt, d.nested_virt);
        set(&mut s.network, d.network);
        set(&mut s.sync_mode, d.sync_mode);
        set(&mut s.persist, d.persist);
        set(&mut s.agent, d.agent);
    }
    if let Some(b) = raw.backend {
        set(&mut s.backend, b.kind);
        if let Some(m) = b.microvm {
            set(&mut s.share_proto, m.share_proto);
            set(&mut s.engine, m.engine);
        }
        if let Some(k) = b.kubernetes {
            let k8s = &mut s.kubernetes;
            if let Some(v) = &k.context {
                k8s.context = Some(context(&f, "backend.kubernetes.context", v)?);
            }
            if let Some(v) = &k.namespace {
                let wanted = "a Kubernetes namespace such as \"agents\" (lowercase letters, digits and '-', at most 63)";
                let key = "backend.kubernetes.namespace";
                k8s.namespace = Some(k8s_name(&f, key, v, 63, false, wanted)?);
            }
            if let Some(v) = &k.storage_class {
                let wanted = "a storage class name such as \"fast-ssd\" (lowercase letters, digits, '-' and '.')";
                let key = "backend.kubernetes.storage_class";
                k8s.storage_class = Some(k8s_name(&f, key, v, 253, true, wanted)?);
            }
        }
    }
    if let Some(p) = raw.proxy {
        set(&mut s.proxy_enable, p.enable);
        if let Some(v) = &p.domain {
            s.proxy_domain = domain(&f, "proxy.domain", v)?;
        }
        if let Some(v) = &p.port {
            s.proxy_port = Some(port(&f, "proxy.port", v)?);
        }
        if let Some(v) = &p.primary_port {
            s.proxy_primary_port = Some(port(&f, "proxy.primary_port", v)?);
        }
        set(&mut s.proxy_publish_same_port, p.publish_same_port);
    }
    if let Some(allow) = raw.network.and_then(|n| n.allow) {
        s.network_allow = cidrs(&f, "network.allow", &allow)?;
    }
    if let Some(artifacts) = raw.sync.and_then(|y| y.artifacts) {
        s.sync_artifacts = project_paths(&f, "sync.artifacts", &artifacts)?;
    }
    Ok(())
}

/// Puts `value` in `slot` if the file sets it.
fn set<T>(slot: &mut T, value: Option<T>) {
    if let Some(value) = value {
        *slot = value;
    }
}

fn whole_number(
    f: &FileText,
    key: &str,
    v: &Spanned<i64>,
    (lo, hi): (u32, u32),
) -> Result<u32, ConfigError> {
    u32::try_from(*v.get_ref())
        .ok()
        .filter(|n| (lo..=hi).contains(n))
        .ok_or_else(|| {
            let wanted = format!("a whole number from {lo} to {hi}");
            f.invalid_value(key, v.span(), wanted, v.get_ref())
        })
}

fn port(f: &FileText, key: &str, v: &Spanned<i64>) -> Result<u16, ConfigError> {
    // From 1 to 65535, so the cast keeps it whole.
    Ok(whole_number(f, key, v, (1, u32::from(u16::MAX)))? as u16)
}

/// Rejects `v` unless `ok` holds for its text.
fn check(
    f: &FileText,
    key: &str,
    v: &Spanned<String>,
    ok: bool,
    wanted: impl fmt::Display,
) -> Result<(), ConfigError> {
    if ok {
        Ok(())
    } else {
        Err(f.invalid_value(key, v.span(), wanted, format!("{:?}", v.get_ref())))
    }
}

/// A DNS domain, lowercased.
fn domain(f: &FileText, key: &str, v: &Spanned<String>) -> Result<String, ConfigError> {
    let d = v.get_ref();
    let ok = !d.is_empty()
        && d.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    check(f, key, v, ok, "a DNS domain such as \"sandbox.local\"")?;
    Ok(d.to_ascii_lowercase())
}

/// A Kubernetes name: `max` bytes at most, lowercase letters, digits and
/// `-` (and `.` between labels when `dots`), each label starting and
/// ending with a letter or digit (RFC 1123).
fn k8s_name(
    f: &FileText,
    key: &str,
    v: &Spanned<String>,
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
    let n = v.get_ref();
    let ok = n.len() <= max
        && if dots {
            n.split('.').all(label_ok)
        } else {
            label_ok(n)
        };
    check(f, key, v, ok, wanted)?;
    Ok(n.clone())
}

/// A kubeconfig context name: any printable text up to 253 bytes.
fn context(f: &FileText, key: &str, v: &Spanned<String>) -> Result<String, ConfigError> {
    let c = v.get_ref();
    let ok = !c.trim().is_empty() && c.len() <= 253 && !c.chars().any(char::is_control);
    check(f, key, v, ok, "a kubeconfig context name such as \"prod\"")?;
    Ok(c.clone())
}

/// Address blocks (each parses as a `Cidr`), as written but trimmed.
fn cidrs(f: &FileText, key: &str, list: &[Spanned<String>]) -> Result<Vec<String>, ConfigError> {
    let what = "an IP address or CIDR block such as \"10.1.0.0/16\"";
    list.iter()
        .map(|v| {
            let parsed = v.get_ref().parse::<crate::agent::netpolicy::Cidr>();
            let why = parsed.as_ref().err().map(|e| format!(" ({e})"));
            check(
                f,
                key,
                v,
                parsed.is_ok(),
                format!("{what}{}", why.unwrap_or_default()),
            )?;
            Ok(v.get_ref().trim().to_string())
        })
        .collect()
}

/// Project paths: relative, of plain components (no `.`, `..` or empty
/// one, no control character), outside `.git`; a trailing `/` is dropped.
fn project_paths(
    f: &FileText,
    key: &str,
    list: &[Spanned<String>],
) -> Result<Vec<String>, ConfigError> {
    let what =
        "a folder in the project such as \"dist\" or \"build/out\", relative and outside .git";
    list.iter()
        .map(|v| {
            let path = v.get_ref().trim_end_matches('/');
            let plain = !path.is_empty()
                && !path.chars().any(char::is_control)
                && path
                    .split('/')
                    .all(|c| !matches!(c, "" | "." | "..") && !c.eq_ignore_ascii_case(".git"));
            check(f, key, v, plain, what)?;
            Ok(path.to_string())
        })
        .collect()
}

#[cfg(test)]
#[path = "file_tests.rs"]
mod tests;
