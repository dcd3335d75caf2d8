//! `features`: each Dev Container Feature mapped to what the sandbox's
//! image (Debian 12) already has, to Debian packages, or to the reason it
//! is not supported. Feature install scripts are never fetched or run.
//!
//! Ids are those of the `devcontainers/features` collection, written as
//! `ghcr.io/devcontainers/features/node:1`, without the tag, or bare
//! (`node`); an id from any other registry or owner is unknown. The
//! mapping:
//!
//! | feature | in the sandbox |
//! |---|---|
//! | node | the image's Node.js 24 and npm |
//! | common-utils, git, sshd | the image (bash, curl, git, openssh) |
//! | python | apt: python3, python3-pip, python3-venv (Python 3.11) |
//! | go | apt: golang-go (Go 1.19) |
//! | rust | apt: rustc, cargo (Rust 1.63) |
//! | github-cli | apt: gh |
//! | docker-in-docker, docker-outside-of-docker | unsupported |
//! | anything else | unsupported, named |
//!
//! A `version` option the image or Debian 12 does not match is a warning:
//! the version the sandbox has is installed, not the one asked for.

use serde_json::{Map, Value};

use super::model::{FeatureKind, FeaturePlan};
use super::plan::{shown_short, Warnings};

/// The most features a plan lists.
pub const MAX_FEATURES: usize = 64;
/// The most characters of a feature id the plan keeps.
pub const MAX_ID_CHARS: usize = 256;

const COLLECTION: &str = "ghcr.io/devcontainers/features/";

const IMAGE_TOOLS: &str =
    "the image: bash, curl, git, openssh (client, and sshd run per connection) and the usual utilities";
const NO_DOCKER: &str = "the sandbox's kernel has no container networking (veth, bridge, \
     netfilter); with --nested the sandbox can run virtual machines instead";
const UNKNOWN: &str = "unknown feature: the sandbox installs only the features it maps (node, \
     python, go, rust, github-cli, common-utils, git, sshd); install what it needs in \
     postCreateCommand instead";

/// The features of the file, in the file's order.
pub fn plan(root: &Map<String, Value>, w: &mut Warnings) -> Vec<FeaturePlan> {
    let map = match root.get("features") {
        None | Some(Value::Null) => return Vec::new(),
        Some(Value::Object(map)) => map,
        Some(_) => {
            w.push("`features` is not an object; skipped".to_string());
            return Vec::new();
        }
    };
    let mut out = Vec::new();
    for (id, options) in map {
        if out.len() >= MAX_FEATURES {
            w.push(format!(
                "features: more than {MAX_FEATURES}; {} and those after it skipped",
                shown_short(id)
            ));
            break;
        }
        let kind = map_feature(id, options, w);
        let id: String = id.chars().take(MAX_ID_CHARS).collect();
        out.push(FeaturePlan { id, kind });
    }
    out
}

/// The short id of a feature of the `devcontainers/features` collection
/// (`node` for `ghcr.io/devcontainers/features/node:1`), or `None`.
pub fn short_id(id: &str) -> Option<&str> {
    let rest = match id.strip_prefix(COLLECTION) {
        Some(rest) => rest,
        None if !id.contains('/') => id,
        None => return None,
    };
    let rest = rest.split_once('@').map_or(rest, |(name, _digest)| name);
    let name = rest.split_once(':').map_or(rest, |(name, _tag)| name);
    let valid = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    valid.then_some(name)
}

/// The `version` option: `{"version": "3.12"}`, or the old string form
/// (`"python": "3.12"`).
fn version_option(options: &Value) -> Option<String> {
    let version = match options {
        Value::String(text) => return Some(text.clone()),
        Value::Object(map) => map.get("version")?,
        _ => return None,
    };
    match version {
        Value::String(text) => Some(text.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Whether `version` asks for `have` (or is one of the `fine` words).
fn version_matches(version: &str, have: &str, fine: &[&str]) -> bool {
    let version = version.trim();
    fine.contains(&version)
        || version == have
        || version
            .strip_prefix(have)
            .is_some_and(|rest| rest.starts_with('.'))
}

fn map_feature(id: &str, options: &Value, w: &mut Warnings) -> FeatureKind {
    let version = version_option(options);
    let mut check = |have: &str, fine: &[&str], what: &str| {
        if let Some(version) = &version {
            if !version_matches(version, have, fine) {
                w.push(format!(
                    "features.{}: version {} is asked for; the sandbox has {what}",
                    shown_short(id),
                    shown_short(version)
                ));
            }
        }
    };
    let packages = |names: &[&str]| FeatureKind::Packages {
        apt: names.iter().map(|n| n.to_string()).collect(),
    };
    match short_id(id) {
        Some("node") => {
            check(
                "24",
                &["lts", "latest", "none", "os-provided", ""],
                "Node.js 24",
            );
            FeatureKind::Provided {
                by: "the image: Node.js 24 and npm".to_string(),
            }
        }
        Some("common-utils" | "git" | "sshd") => FeatureKind::Provided {
            by: IMAGE_TOOLS.to_string(),
        },
        Some("python") => {
            check(
                "3.11",
                &["latest", "os-provided", "none", ""],
                "Debian 12's Python 3.11",
            );
            packages(&["python3", "python3-pip", "python3-venv"])
        }
        Some("go") => {
            check("1.19", &["os-provided", "none", ""], "Debian 12's Go 1.19");
            packages(&["golang-go"])
        }
        Some("rust") => {
            check(
                "1.63",
                &["os-provided", "none", ""],
                "Debian 12's Rust 1.63",
            );
            packages(&["rustc", "cargo"])
        }
        Some("github-cli") => packages(&["gh"]),
        Some("docker-in-docker" | "docker-outside-of-docker") => FeatureKind::Unsupported {
            reason: NO_DOCKER.to_string(),
        },
        _ => FeatureKind::Unsupported {
            reason: UNKNOWN.to_string(),
        },
    }
}
