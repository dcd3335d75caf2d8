//! The Nix files (`flake.nix`, `nix/`) checked with `nix-instantiate`
//! alone, since nixpkgs cannot be fetched here: every file parses; the
//! kernel recipe read from guest-image/kernel/ matches `keystone.config`
//! line by line and `patches/*.patch`; the NixOS module's options have the
//! names, types and defaults the README lists; and the
//! /etc/keystone/agent.toml it writes is read by the built `keystone`
//! through `KEYSTONE_SYSTEM_CONFIG`. nixpkgs' `lib` and `pkgs` are stood in
//! for by `tests/nix/stand-in.nix`.
//!
//! Without `nix-instantiate` (Debian: `apt-get install nix-bin`) each test
//! prints SKIP and returns.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use keystone_test_kit::{skip, ScratchDir};
use serde_json::{json, Value};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// `nix-instantiate` with a store that accepts nothing: evaluating must
/// neither build nor copy anything (no import from derivation).
fn nix() -> Option<Command> {
    match Command::new("nix-instantiate").arg("--version").output() {
        Ok(out) if out.status.success() => {}
        _ => skip!(None; "nix-instantiate not found (apt-get install nix-bin)"),
    }
    let mut cmd = Command::new("nix-instantiate");
    cmd.args(["--store", "dummy://"]);
    Some(cmd)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Evaluates attribute `attr` of the stand-in evaluation with the module's
/// options set to `overrides` over their defaults.
fn eval(mut cmd: Command, attr: &str, overrides: &Value) -> Value {
    let repo = repo();
    let out = cmd
        .args(["--eval", "--strict", "--json"])
        .arg(repo.join("cli/tests/nix/stand-in.nix"))
        .args(["--argstr", "repo"])
        .arg(&repo)
        .args(["--argstr", "overridesJson", &overrides.to_string()])
        .args(["-A", attr])
        .output()
        .unwrap();
    assert!(out.status.success(), "{attr}: {}", text(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn every_nix_file_parses() {
    let Some(_) = nix() else { return };
    let mut files = vec![repo().join("flake.nix")];
    for dir in ["nix", "cli/tests/nix"] {
        for entry in std::fs::read_dir(repo().join(dir)).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "nix") {
                files.push(path);
            }
        }
    }
    for name in [
        "module.nix",
        "kernel-recipe.nix",
        "guest-kernel.nix",
        "keystone.nix",
    ] {
        assert!(
            files.iter().any(|f| f.ends_with(format!("nix/{name}"))),
            "nix/{name} is missing"
        );
    }
    for file in &files {
        let out = nix().unwrap().arg("--parse").arg(file).output().unwrap();
        assert!(
            out.status.success(),
            "{}: {}",
            file.display(),
            text(&out.stderr)
        );
    }
}

/// `keystone.config` read the way merge_config.sh reads it: option name
/// (without CONFIG_) and value, `n` for "is not set".
fn fragment_lines() -> Vec<(String, String)> {
    let fragment =
        std::fs::read_to_string(repo().join("guest-image/kernel/keystone.config")).unwrap();
    fragment
        .lines()
        .filter_map(|line| {
            if let Some(rest) = line.strip_prefix("CONFIG_") {
                let (name, value) = rest.split_once('=').unwrap();
                Some((name.to_string(), value.to_string()))
            } else {
                let name = line
                    .strip_prefix("# CONFIG_")?
                    .strip_suffix(" is not set")?;
                Some((name.to_string(), "n".to_string()))
            }
        })
        .collect()
}

#[test]
fn the_kernel_recipe_is_keystone_config_line_by_line() {
    let Some(cmd) = nix() else { return };
    let kernel = eval(cmd, "kernel", &json!({}));
    let lines = fragment_lines();
    assert!(lines.len() > 100, "{} lines", lines.len());
    let structured = kernel["structuredConfig"].as_object().unwrap();
    let flat = kernel["kconfig"].as_object().unwrap();
    assert_eq!(
        structured.len(),
        lines.len(),
        "extra or missing options: {structured:?}"
    );
    assert_eq!(flat.len(), lines.len());
    for (name, value) in &lines {
        let expected = match value.as_str() {
            "y" | "n" | "m" => json!({ "tristate": value, "optional": false }),
            _ => json!({ "freeform": value, "optional": false }),
        };
        assert_eq!(
            structured.get(name),
            Some(&expected),
            "CONFIG_{name}={value}"
        );
        assert_eq!(
            flat.get(&format!("CONFIG_{name}")),
            Some(&json!(value)),
            "CONFIG_{name}"
        );
    }
    // Spot checks that the reading above is the file's.
    assert_eq!(
        structured["NR_CPUS"],
        json!({ "freeform": "64", "optional": false })
    );
    assert_eq!(structured["MODULES"]["tristate"], "n");
    assert_eq!(structured["LOCALVERSION"]["freeform"], "\"-keystone\"");
    assert_eq!(kernel["localVersion"], "-keystone");
}

#[test]
fn the_kernel_patches_are_the_patch_files_in_order() {
    let Some(cmd) = nix() else { return };
    let kernel = eval(cmd, "kernel", &json!({}));
    let mut files: Vec<String> = std::fs::read_dir(repo().join("guest-image/kernel/patches"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".patch"))
        .collect();
    files.sort();
    assert!(files.len() >= 4, "the recipe has lost patches: {files:?}");
    let expected: Vec<Value> = files
        .iter()
        .map(|f| json!({ "name": f.trim_end_matches(".patch"), "file": f }))
        .collect();
    assert_eq!(kernel["patches"], Value::Array(expected));
}

#[test]
fn the_kernel_recipe_refuses_lines_it_cannot_read() {
    let Some(_) = nix() else { return };
    let parse = |fragment: &str| -> Output {
        let stand_in = repo().join("cli/tests/nix/stand-in.nix");
        let expr = format!(
            "{{ text }}: (import {} {{ repo = \"{}\"; }}).parseFragment text",
            stand_in.display(),
            repo().display()
        );
        nix()
            .unwrap()
            .args([
                "--eval", "--strict", "--json", "--expr", &expr, "--argstr", "text", fragment,
            ])
            .output()
            .unwrap()
    };
    let ok = parse("# c\n\nCONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=\"x y\"\n");
    assert!(ok.status.success(), "{}", text(&ok.stderr));
    let value: Value = serde_json::from_slice(&ok.stdout).unwrap();
    assert_eq!(value["C"]["freeform"], "\"x y\"");
    assert_eq!(value["B"]["tristate"], "n");
    let bad = parse("CONFIG_A = y\n");
    assert!(!bad.status.success());
    assert!(
        text(&bad.stderr).contains("cannot read the line 'CONFIG_A = y'"),
        "{}",
        text(&bad.stderr)
    );
    let twice = parse("CONFIG_A=y\n# CONFIG_A is not set\n");
    assert!(!twice.status.success());
    assert!(
        text(&twice.stderr).contains("CONFIG_A is set twice"),
        "{}",
        text(&twice.stderr)
    );
}

/// The check the kernel's config derivation runs after olddefconfig.
#[test]
fn the_kernel_config_check_catches_a_lost_line() {
    let Some(cmd) = nix() else { return };
    let script = eval(cmd, "kernel.checkScript", &json!({}));
    let script = script.as_str().unwrap();
    let dir = ScratchDir::new("nix-kcheck");
    let survived: Vec<String> = fragment_lines()
        .into_iter()
        .map(|(n, v)| {
            if v == "n" {
                format!("# CONFIG_{n} is not set")
            } else {
                format!("CONFIG_{n}={v}")
            }
        })
        .collect();
    let run = |config: &str| {
        std::fs::write(dir.join(".config"), config).unwrap();
        Command::new("bash")
            .arg("-c")
            .arg(script)
            .current_dir(dir.path())
            .output()
            .unwrap()
    };
    let out = run(&(survived.join("\n") + "\nCONFIG_EXTRA_DEFAULT=y\n"));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let lost: Vec<&str> = survived
        .iter()
        .map(String::as_str)
        .filter(|l| *l != "CONFIG_HZ_100=y")
        .collect();
    let out = run(&lost.join("\n"));
    assert_eq!(out.status.code(), Some(3));
    assert!(
        text(&out.stderr).contains("lost 'CONFIG_HZ_100=y'"),
        "{}",
        text(&out.stderr)
    );
    let out = run(&(survived.join("\n") + "\nCONFIG_MODULES=y\n"));
    assert_eq!(out.status.code(), Some(3));
    assert!(
        text(&out.stderr).contains("kept CONFIG_MODULES on"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn the_module_declares_its_options_with_types_and_defaults() {
    let Some(cmd) = nix() else { return };
    let options = eval(cmd, "options", &json!({}));
    let expected = [
        ("enable", "bool", json!(false)),
        ("engine", r#"enum ["auto","vmm","qemu"]"#, json!("auto")),
        ("memory", "ints.between 128 1048576", json!(8192)),
        ("nested", "bool", json!(true)),
        ("networkAllow", "listOf str", json!([])),
        ("package", "package", json!({ "name": "keystone" })),
        ("settings", "toml value", json!({})),
        (
            "syncMode",
            r#"enum ["manual","auto-commit","auto-idle"]"#,
            json!("manual"),
        ),
        ("users", "listOf str", json!([])),
        ("vcpus", "ints.between 1 255", json!(4)),
    ];
    let options = options.as_array().unwrap();
    assert_eq!(options.len(), expected.len(), "{options:#?}");
    for (option, (name, ty, default)) in options.iter().zip(expected) {
        assert_eq!(option["path"], format!("keystone.agent.{name}"));
        assert_eq!(option["type"], ty, "{name}");
        assert_eq!(option["default"], default, "{name}");
        assert_eq!(option["described"], true, "{name} has no description");
        assert_eq!(
            option["defaultTypeChecks"], true,
            "{name}'s default is not a {ty}"
        );
    }
}

#[test]
fn the_module_sets_up_the_host() {
    let Some(_) = nix() else { return };
    let config = eval(
        nix().unwrap(),
        "config",
        &json!({ "users": ["alice", "bob"] }),
    );
    let packages: Vec<&str> = config["environment"]["systemPackages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(packages, ["keystone", "git", "openssh", "qemu"]);
    assert_eq!(
        config["boot"]["extraModprobeConfig"],
        "options kvm_intel nested=1\noptions kvm_amd nested=1\n"
    );
    for user in ["alice", "bob"] {
        assert_eq!(
            config["users"]["users"][user]["extraGroups"],
            json!(["kvm"]),
            "{user}"
        );
    }
    let file = &config["environment"]["etc"]["keystone/agent.toml"]["source"];
    assert_eq!(file["_type"], "toml-file");

    let config = eval(nix().unwrap(), "config", &json!({ "nested": false }));
    assert_eq!(config["boot"]["extraModprobeConfig"], Value::Null);
    let config = eval(nix().unwrap(), "config", &json!({ "enable": false }));
    assert_eq!(config, Value::Null, "a disabled module sets nothing");
}

/// A host with its own XDG folders, a user file and a system file.
struct Host {
    root: ScratchDir,
}

impl Host {
    fn new(tag: &str) -> Self {
        let root = ScratchDir::new(&format!("nix-{tag}"));
        for dir in ["home", "config/keystone", "state", "etc"] {
            std::fs::create_dir_all(root.join(dir)).unwrap();
        }
        Self { root }
    }

    fn system_file(&self) -> PathBuf {
        self.root.join("etc/agent.toml")
    }

    /// `keystone agent list` with `system` as the system-wide file and
    /// `user` as the user's (absent when `None`).
    fn list(&self, system: Option<&str>, user: Option<&str>) -> Output {
        let user_file = self.root.join("config/keystone/agent.toml");
        for (path, content) in [(self.system_file(), system), (user_file, user)] {
            match content {
                Some(c) => std::fs::write(path, c).unwrap(),
                None => {
                    let _ = std::fs::remove_file(path);
                }
            }
        }
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_keystone"));
        for (key, _) in std::env::vars() {
            if key.starts_with("KEYSTONE_") || key.starts_with("XDG_") {
                cmd.env_remove(key);
            }
        }
        cmd.args(["agent", "list"])
            .env("HOME", self.root.join("home"))
            .env("XDG_CONFIG_HOME", self.root.join("config"))
            .env("XDG_STATE_HOME", self.root.join("state"))
            .env("KEYSTONE_SYSTEM_CONFIG", self.system_file())
            .output()
            .unwrap()
    }
}

/// The TOML the module writes with `overrides`, and whether the module's
/// types accept the values.
fn module_toml(overrides: &Value) -> (String, bool) {
    let value = eval(
        nix().unwrap(),
        "config.environment.etc.\"keystone/agent.toml\".source.value",
        overrides,
    );
    let checks = eval(nix().unwrap(), "valuesTypeCheck", overrides);
    let accepted = checks.as_object().unwrap().values().all(|v| v == true);
    let toml = toml::to_string(&toml::Value::try_from(value).unwrap()).unwrap();
    (toml, accepted)
}

#[test]
fn the_agent_toml_the_module_writes_is_read_by_keystone() {
    let Some(_) = nix() else { return };
    let host = Host::new("module-toml");
    // Defaults, the ends of each range, each choice.
    let mut good = vec![json!({})];
    for (memory, vcpus) in [(128, 1), (1_048_576, 255)] {
        good.push(json!({ "memory": memory, "vcpus": vcpus, "nested": false }));
    }
    for mode in ["manual", "auto-commit", "auto-idle"] {
        good.push(json!({ "syncMode": mode }));
    }
    for engine in ["auto", "vmm", "qemu"] {
        good.push(json!({ "engine": engine, "networkAllow": ["10.1.0.0/16", "fd00::/8"] }));
    }
    for overrides in &good {
        let (toml, accepted) = module_toml(overrides);
        assert!(accepted, "the module's types refuse {overrides}");
        let out = host.list(Some(&toml), None);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{overrides}:\n{toml}\n{}",
            text(&out.stderr)
        );
    }
    // Just outside: the module's types and keystone both refuse, keystone
    // naming the system file and the key (not an unknown key).
    for (overrides, key) in [
        (json!({ "memory": 127 }), "defaults.memory"),
        (json!({ "memory": 1_048_577 }), "defaults.memory"),
        (json!({ "vcpus": 0 }), "defaults.vcpus"),
        (json!({ "vcpus": 256 }), "defaults.vcpus"),
        (json!({ "syncMode": "never" }), "defaults.sync_mode"),
        (json!({ "engine": "firecracker" }), "backend.microvm.engine"),
        (json!({ "nested": "yes" }), "defaults.nested_virt"),
    ] {
        let (toml, accepted) = module_toml(&overrides);
        assert!(!accepted, "the module's types accept {overrides}");
        let out = host.list(Some(&toml), None);
        assert_eq!(out.status.code(), Some(1), "{overrides}");
        let err = text(&out.stderr);
        let prefix = format!("{}:", host.system_file().display());
        assert!(
            err.contains(&prefix) && err.contains(&format!("invalid value for `{key}`")),
            "{overrides}: {err}"
        );
    }
    // The CIDR list is a plain list of strings to the module; keystone
    // checks each entry.
    let (toml, _) = module_toml(&json!({ "networkAllow": ["lan"] }));
    let err = text(&host.list(Some(&toml), None).stderr);
    assert!(err.contains("invalid value for `network.allow`"), "{err}");
}

#[test]
fn module_settings_reach_keystone_below_the_users_file() {
    let Some(_) = nix() else { return };
    let host = Host::new("module-settings");
    let (toml, accepted) = module_toml(&json!({ "settings": {
        "backend": { "type": "kubernetes", "kubernetes": { "namespace": "agents", "context": "prod" } },
        "proxy": { "domain": "sandbox.test" },
    }}));
    assert!(accepted);
    assert!(
        toml.contains("engine = \"auto\""),
        "typed options stay beside settings:\n{toml}"
    );
    let out = host.list(Some(&toml), None);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains("[backend.kubernetes] context = \"prod\", namespace = \"agents\""),
        "{err}"
    );
    // The user's file comes above the system-wide one.
    let out = host.list(Some(&toml), Some("[backend]\ntype = \"microvm\"\n"));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    // A missing system file is no error.
    let out = host.list(None, None);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}

/// The Nix builds read the workspace through `nix/source.nix`: every
/// workspace member's top folder must be in it, or cargo cannot load the
/// workspace there (plain text, so it needs no nix).
#[test]
fn the_nix_source_holds_every_workspace_member() {
    let repo = repo();
    let manifest: toml::Value =
        toml::from_str(&std::fs::read_to_string(repo.join("Cargo.toml")).unwrap()).unwrap();
    let source = std::fs::read_to_string(repo.join("nix/source.nix")).unwrap();
    let listed: Vec<&str> = source
        .lines()
        .filter_map(|l| l.trim().strip_prefix("../"))
        .collect();
    for member in manifest["workspace"]["members"].as_array().unwrap() {
        let top = member.as_str().unwrap().split('/').next().unwrap();
        assert!(
            listed.contains(&top),
            "nix/source.nix lacks ../{top} (a workspace member): {listed:?}"
        );
    }
}
