//! Features, ports, refused and ignored keys, and the plan as JSON.

use serde_json::json;

use super::features::short_id;
use super::model::{PortPlan, PortRangePlan};
use super::plan_tests::plan;
use super::{DevcontainerPlan, FeatureKind};

fn has_warning(plan: &DevcontainerPlan, part: &str) -> bool {
    plan.warnings.iter().any(|w| w.contains(part))
}

fn kind_of<'a>(plan: &'a DevcontainerPlan, id: &str) -> &'a FeatureKind {
    &plan.features.iter().find(|f| f.id == id).unwrap().kind
}

#[test]
fn feature_ids_are_normalised() {
    assert_eq!(
        short_id("ghcr.io/devcontainers/features/node:1"),
        Some("node")
    );
    assert_eq!(
        short_id("ghcr.io/devcontainers/features/node"),
        Some("node")
    );
    assert_eq!(short_id("node"), Some("node"));
    assert_eq!(
        short_id("ghcr.io/devcontainers/features/github-cli@sha256:abc"),
        Some("github-cli")
    );
    assert_eq!(short_id("ghcr.io/someone/features/node:1"), None);
    assert_eq!(short_id("docker.io/devcontainers/features/node:1"), None);
    assert_eq!(short_id("./local-feature"), None);
    assert_eq!(short_id(""), None);
}

#[test]
fn mapped_features_are_provided_or_packages() {
    let p = plan(
        r#"{"features": {
            "ghcr.io/devcontainers/features/node:1": {},
            "ghcr.io/devcontainers/features/common-utils:2": {"installZsh": true},
            "git": {}, "ghcr.io/devcontainers/features/sshd:1": {},
            "ghcr.io/devcontainers/features/python:1": {"version": "3.11"},
            "ghcr.io/devcontainers/features/go:1": {},
            "ghcr.io/devcontainers/features/rust:1": {},
            "ghcr.io/devcontainers/features/github-cli:1": {}
        }}"#,
    );
    assert_eq!(
        kind_of(&p, "ghcr.io/devcontainers/features/node:1"),
        &FeatureKind::Provided {
            by: "the image: Node.js 24 and npm".into()
        }
    );
    for id in [
        "ghcr.io/devcontainers/features/common-utils:2",
        "git",
        "ghcr.io/devcontainers/features/sshd:1",
    ] {
        assert!(
            matches!(kind_of(&p, id), FeatureKind::Provided { by } if by.contains("git")),
            "{id}"
        );
    }
    let apt = |id: &str| match kind_of(&p, id) {
        FeatureKind::Packages { apt } => apt.clone(),
        other => panic!("{id}: {other:?}"),
    };
    assert_eq!(
        apt("ghcr.io/devcontainers/features/python:1"),
        ["python3", "python3-pip", "python3-venv"]
    );
    assert_eq!(apt("ghcr.io/devcontainers/features/go:1"), ["golang-go"]);
    assert_eq!(
        apt("ghcr.io/devcontainers/features/rust:1"),
        ["rustc", "cargo"]
    );
    assert_eq!(apt("ghcr.io/devcontainers/features/github-cli:1"), ["gh"]);
    assert_eq!(
        p.apt_packages(),
        [
            "cargo",
            "gh",
            "golang-go",
            "python3",
            "python3-pip",
            "python3-venv",
            "rustc"
        ]
    );
    assert!(p.warnings.is_empty(), "{:?}", p.warnings);
}

#[test]
fn apt_packages_are_each_listed_once() {
    let p = plan(r#"{"features": {"python": {}, "ghcr.io/devcontainers/features/python:1": {}}}"#);
    assert_eq!(p.apt_packages(), ["python3", "python3-pip", "python3-venv"]);
}

#[test]
fn versions_the_sandbox_does_not_have_are_warnings() {
    let p = plan(
        r#"{"features": {
            "node": {"version": "20"}, "ghcr.io/devcontainers/features/node:1": {"version": "lts"},
            "python": {"version": "3.12"}, "ghcr.io/devcontainers/features/python": "3.11.2",
            "go": {"version": "1.22"}, "rust": {"version": "latest"},
            "ghcr.io/devcontainers/features/rust:1": {"version": "1.63"}
        }}"#,
    );
    for part in [
        "features.node: version 20 is asked for; the sandbox has Node.js 24",
        "features.python: version 3.12 is asked for; the sandbox has Debian 12's Python 3.11",
        "features.go: version 1.22 is asked for; the sandbox has Debian 12's Go 1.19",
        "features.rust: version latest is asked for; the sandbox has Debian 12's Rust 1.63",
    ] {
        assert!(has_warning(&p, part), "{part}: {:?}", p.warnings);
    }
    assert_eq!(p.warnings.len(), 4, "{:?}", p.warnings);
    assert!(matches!(kind_of(&p, "go"), FeatureKind::Packages { .. }));
}

#[test]
fn docker_and_unknown_features_are_unsupported_and_named() {
    let p = plan(
        r#"{"features": {
            "ghcr.io/devcontainers/features/docker-in-docker:2": {},
            "docker-outside-of-docker": {},
            "ghcr.io/devcontainers/features/terraform:1": {},
            "ghcr.io/someone/features/node:1": {}
        }}"#,
    );
    assert_eq!(p.features.len(), 4);
    for id in [
        "ghcr.io/devcontainers/features/docker-in-docker:2",
        "docker-outside-of-docker",
    ] {
        let FeatureKind::Unsupported { reason } = kind_of(&p, id) else {
            panic!("{id}")
        };
        assert!(
            reason.contains("no container networking") && reason.contains("--nested"),
            "{reason}"
        );
    }
    for id in [
        "ghcr.io/devcontainers/features/terraform:1",
        "ghcr.io/someone/features/node:1",
    ] {
        let FeatureKind::Unsupported { reason } = kind_of(&p, id) else {
            panic!("{id}")
        };
        assert!(
            reason.starts_with("unknown feature: the sandbox installs only the features it maps")
        );
    }
    assert!(p.apt_packages().is_empty());
}

#[test]
fn forwarded_ports_take_their_attributes() {
    let p = plan(
        r#"{"forwardPorts": [3000, "localhost:5173", "127.0.0.1:8080", "db:5432", 0, 70000, 3000, "x"],
            "portsAttributes": {
                "3000": {"label": "Web", "onAutoForward": "openBrowser", "protocol": "https",
                         "requireLocalPort": true},
                "9000": {"label": "Not forwarded"},
                "40000-40010": {"label": "Range", "onAutoForward": "silent"},
                ".+\\/server.js": {"label": "Pattern"},
                "5173": {"onAutoForward": "explode", "protocol": "gopher"}
            }}"#,
    );
    assert_eq!(
        p.ports,
        [
            PortPlan {
                port: 3000,
                label: Some("Web".into()),
                on_auto_forward: Some("openBrowser".into()),
                protocol: Some("https".into())
            },
            PortPlan {
                port: 5173,
                label: None,
                on_auto_forward: None,
                protocol: None
            },
            PortPlan {
                port: 8080,
                label: None,
                on_auto_forward: None,
                protocol: None
            },
        ]
    );
    let range = |from, to, label: &str, auto: Option<&str>| PortRangePlan {
        from,
        to,
        label: Some(label.into()),
        on_auto_forward: auto.map(Into::into),
        protocol: None,
    };
    let mut labels = p.port_labels.clone();
    labels.sort_by_key(|l| l.from);
    assert_eq!(
        labels,
        [
            range(9000, 9000, "Not forwarded", None),
            range(40000, 40010, "Range", Some("silent"))
        ]
    );
    for part in [
        "forwardPorts: `db:5432` names another host",
        "forwardPorts: 0 is not a port",
        "forwardPorts: 70000 is not a port",
        "forwardPorts: \"x\" is not a port",
        r"portsAttributes..+\/server.js: only a port",
        "portsAttributes.3000.requireLocalPort: not used",
        "portsAttributes.5173.onAutoForward: \"explode\" is not a value it takes",
        "portsAttributes.5173.protocol: \"gopher\" is not a value it takes",
    ] {
        assert!(has_warning(&p, part), "{part}: {:?}", p.warnings);
    }
}

#[test]
fn image_keys_are_refused_without_failing_the_plan() {
    let p = plan(
        r#"{"image": "mcr.microsoft.com/devcontainers/base", "build": {"dockerfile": "Dockerfile"},
            "dockerFile": "Dockerfile", "dockerComposeFile": ["a.yml"], "postStartCommand": "true"}"#,
    );
    let mut refused = p.refused.clone();
    refused.sort();
    assert_eq!(
        refused,
        [
            "the sandbox uses its own image; `build` (with its `dockerfile`) is not used",
            "the sandbox uses its own image; `dockerComposeFile` is not used",
            "the sandbox uses its own image; `dockerFile` is not used",
            "the sandbox uses its own image; `image` is not used",
        ]
    );
    assert_eq!(p.post_start.len(), 1);
    assert!(p.ignored.is_empty(), "{:?}", p.ignored);
}

#[test]
fn other_keys_are_ignored_by_name() {
    let p = plan(
        r#"{"name": "n", "customizations": {"vscode": {}}, "mounts": [], "runArgs": ["--privileged"],
            "privileged": true, "capAdd": ["SYS_ADMIN"], "workspaceFolder": "/w", "madeUpKey": 1,
            "remoteUser": "node", "containerUser": "root"}"#,
    );
    let mut ignored = p.ignored.clone();
    ignored.sort();
    assert_eq!(
        ignored,
        [
            "capAdd",
            "containerUser",
            "customizations",
            "madeUpKey",
            "mounts",
            "name",
            "privileged",
            "runArgs",
            "workspaceFolder"
        ]
    );
}

#[test]
fn hostile_key_names_are_escaped_and_bounded() {
    // The long HOSTILE text, and a short one, wherever a warning or the
    // ignored list quotes the file.
    let hostile = crate::shown::HOSTILE;
    let short = "\u{1b}]0;t\u{7}\u{9b}2J\u{202e}";
    let long = "k".repeat(10_000);
    let text = json!({
        hostile: 1, short: 1, long.clone(): 2,
        "containerEnv": { hostile: "x", short: "x" },
        "remoteUser": short,
        "forwardPorts": [format!("{short}:1"), short],
        "portsAttributes": { short: {}, "3000": { short: 1, "label": 7 } },
        "features": { short: {}, "node": { "version": short } },
        "postStartCommand": { short: 3, "a": format!("${{{short}}} ${{localEnv:{short}}}") },
    })
    .to_string();
    let p = plan(&text);
    assert!(p.warnings.len() >= 12, "{:?}", p.warnings);
    for shown in p.ignored.iter().chain(&p.warnings) {
        assert!(crate::shown::terminal_safe(shown), "{shown:?}");
        assert!(shown.chars().count() < 400, "{}", shown.len());
    }
    assert!(
        p.ignored
            .contains(&r"\u{1b}]0;t\u{7}\u{9b}2J\u{202e}".to_string()),
        "{:?}",
        p.ignored
    );
    assert!(
        p.ignored.iter().any(|k| k.starts_with(r"ok\u{1b}]52;c;")),
        "{:?}",
        p.ignored
    );
    assert!(p
        .ignored
        .iter()
        .any(|k| k.starts_with("kkk") && k.ends_with("...")));
    let many: serde_json::Map<_, _> = (0..1000).map(|i| (format!("k{i}"), json!(i))).collect();
    let p = plan(&serde_json::Value::Object(many).to_string());
    assert_eq!(p.ignored.len(), super::plan::MAX_IGNORED + 1);
    assert_eq!(p.ignored.last().unwrap(), "936 more keys left out");
}

#[test]
fn the_plan_serializes_for_status_json() {
    let p = plan(
        r#"{"features": {"go": {}, "node": {}, "x/y/z": {}}, "forwardPorts": [3000],
            "postStartCommand": {"web": "npm start"}}"#,
    );
    let value = serde_json::to_value(&p).unwrap();
    assert_eq!(value["source"], ".devcontainer/devcontainer.json");
    assert_eq!(
        value["features"][0],
        json!({"id": "go", "kind": "packages", "apt": ["golang-go"]})
    );
    assert_eq!(value["features"][1]["kind"], "provided");
    assert_eq!(value["features"][2]["kind"], "unsupported");
    assert_eq!(
        value["ports"][0],
        json!({"port": 3000, "label": null, "on_auto_forward": null, "protocol": null})
    );
    assert_eq!(
        value["post_start"][0],
        json!({"name": "web", "argv": ["/bin/sh", "-c", "npm start"]})
    );
    assert_eq!(value["remote_user"], serde_json::Value::Null);
}
