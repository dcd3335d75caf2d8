//! `forwardPorts` and `portsAttributes`.
//!
//! `forwardPorts` takes port numbers and `"host:port"` strings; the host
//! must be the guest itself (`localhost` or `127.0.0.1`): the sandbox has
//! no other container to reach, so any other host is skipped with a
//! warning. `portsAttributes` keys are a port (`"3000"`) or a range
//! (`"40000-55000"`); the pattern keys the spec also allows are not
//! supported (a warning says so). Their `label`, `onAutoForward` and
//! `protocol` are kept; other attributes are listed as ignored in the
//! warnings.
//!
//! SECURITY: none of this binds a host port. A guest port is reached by
//! name through the per-user dev-server proxy
//! (`http://<port>.<sandbox>.localhost:P/`); the repository does not
//! choose host ports.

use serde_json::{Map, Value};

use super::model::{PortPlan, PortRangePlan};
use super::plan::{shown_short, Warnings};

/// The most forwarded ports, and the most port attribute entries.
pub const MAX_PORTS: usize = 256;
/// The most characters of a port's label.
pub const MAX_LABEL_CHARS: usize = 128;

const ON_AUTO_FORWARD: [&str; 6] = [
    "notify",
    "openBrowser",
    "openBrowserOnce",
    "openPreview",
    "silent",
    "ignore",
];
const PROTOCOLS: [&str; 2] = ["http", "https"];

/// The forwarded ports with their attributes, and the attributes of
/// ranges and of ports that are not forwarded.
pub fn plan(root: &Map<String, Value>, w: &mut Warnings) -> (Vec<PortPlan>, Vec<PortRangePlan>) {
    let mut ports: Vec<PortPlan> = Vec::new();
    match root.get("forwardPorts") {
        None | Some(Value::Null) => {}
        Some(Value::Array(items)) => {
            for item in items {
                let Some(port) = forwarded_port(item, w) else {
                    continue;
                };
                if ports.iter().any(|p| p.port == port) {
                    continue;
                }
                if ports.len() >= MAX_PORTS {
                    w.push(format!(
                        "forwardPorts: more than {MAX_PORTS} ports; {port} skipped"
                    ));
                    continue;
                }
                ports.push(PortPlan {
                    port,
                    label: None,
                    on_auto_forward: None,
                    protocol: None,
                });
            }
        }
        Some(_) => w.push("`forwardPorts` is not an array; skipped".to_string()),
    }
    let mut labels = Vec::new();
    match root.get("portsAttributes") {
        None | Some(Value::Null) => {}
        Some(Value::Object(map)) => {
            for (key, attributes) in map {
                let what = format!("portsAttributes.{}", shown_short(key));
                let Some((from, to)) = port_key(key) else {
                    w.push(format!(
                        "{what}: only a port (\"3000\") or a range (\"40000-55000\") is \
                         supported; skipped"
                    ));
                    continue;
                };
                let Some(attributes) = attributes.as_object() else {
                    w.push(format!("{what}: not an object; skipped"));
                    continue;
                };
                let (label, on_auto_forward, protocol) = read_attributes(attributes, &what, w);
                match ports.iter_mut().find(|p| from == to && p.port == from) {
                    Some(port) => {
                        port.label = label;
                        port.on_auto_forward = on_auto_forward;
                        port.protocol = protocol;
                    }
                    None if labels.len() >= MAX_PORTS => {
                        w.push(format!("{what}: more than {MAX_PORTS} entries; skipped"));
                    }
                    None => labels.push(PortRangePlan {
                        from,
                        to,
                        label,
                        on_auto_forward,
                        protocol,
                    }),
                }
            }
        }
        Some(_) => w.push("`portsAttributes` is not an object; skipped".to_string()),
    }
    (ports, labels)
}

/// One `forwardPorts` entry as a guest port.
fn forwarded_port(item: &Value, w: &mut Warnings) -> Option<u16> {
    let port = match item {
        Value::Number(n) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
        Value::String(text) => {
            let (host, port) = match text.rsplit_once(':') {
                Some((host, port)) => (Some(host), port),
                None => (None, text.as_str()),
            };
            if let Some(host) = host {
                if !matches!(host, "localhost" | "127.0.0.1") {
                    w.push(format!(
                        "forwardPorts: `{}` names another host; only the sandbox's own ports \
                         (localhost) are reached; skipped",
                        shown_short(text)
                    ));
                    return None;
                }
            }
            port.parse::<u16>().ok()
        }
        _ => None,
    };
    match port {
        Some(port) if port > 0 => Some(port),
        _ => {
            let shown = serde_json::to_string(item).unwrap_or_default();
            w.push(format!(
                "forwardPorts: {} is not a port (1 to 65535); skipped",
                shown_short(&shown)
            ));
            None
        }
    }
}

/// A `portsAttributes` key as the ports `from..=to`.
fn port_key(key: &str) -> Option<(u16, u16)> {
    let one = |text: &str| {
        if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        text.parse::<u16>().ok().filter(|p| *p > 0)
    };
    match key.split_once('-') {
        Some((from, to)) => {
            let (from, to) = (one(from)?, one(to)?);
            (from <= to).then_some((from, to))
        }
        None => one(key).map(|port| (port, port)),
    }
}

/// `label`, `onAutoForward` and `protocol` of one attributes object.
fn read_attributes(
    attributes: &Map<String, Value>,
    what: &str,
    w: &mut Warnings,
) -> (Option<String>, Option<String>, Option<String>) {
    let mut label = None;
    let mut on_auto_forward = None;
    let mut protocol = None;
    for (name, value) in attributes {
        let text = value.as_str();
        match (name.as_str(), text) {
            ("label", Some(text)) if text.chars().count() <= MAX_LABEL_CHARS => {
                label = Some(text.to_string());
            }
            ("label", Some(_)) => w.push(format!(
                "{what}.label: longer than {MAX_LABEL_CHARS} characters; skipped"
            )),
            ("onAutoForward", Some(text)) if ON_AUTO_FORWARD.contains(&text) => {
                on_auto_forward = Some(text.to_string());
            }
            ("protocol", Some(text)) if PROTOCOLS.contains(&text) => {
                protocol = Some(text.to_string());
            }
            ("label" | "onAutoForward" | "protocol", _) => w.push(format!(
                "{what}.{name}: {} is not a value it takes; skipped",
                shown_short(&serde_json::to_string(value).unwrap_or_default())
            )),
            _ => w.push(format!(
                "{what}.{}: not used (ports are reached by name through the dev-server proxy)",
                shown_short(name)
            )),
        }
    }
    (label, on_auto_forward, protocol)
}
