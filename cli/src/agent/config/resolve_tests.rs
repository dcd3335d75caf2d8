//! Tests of resolving settings: defaults, the two files, the environment,
//! flags, and a later start of an existing sandbox.

use super::*;
use std::collections::HashMap;

fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let map: HashMap<String, String> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    move |k| map.get(k).cloned()
}

#[test]
fn defaults_match_the_spec() {
    let s = resolve(&[], &env(&[]), &FlagOverrides::default()).unwrap();
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
    assert_eq!(
        (
            s.proxy_port,
            s.proxy_primary_port,
            s.proxy_publish_same_port
        ),
        (None, None, false),
        "no guest port is published unless asked"
    );
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
    let s = resolve(&[(path, file)], &vars, &FlagOverrides::default()).unwrap();
    assert_eq!((s.memory_mib, s.vcpus), (2048, 2));
    assert_eq!(s.sync_mode, SyncMode::AutoIdle);
    assert_eq!(s.backend, BackendKind::Kubernetes);

    let flags = FlagOverrides {
        memory_mib: Some(512),
        vcpus: Some(8),
        sync_mode: Some(SyncMode::Manual),
        nested_virt: Some(false),
        network: Some(Network::Bridge),
        agent: Some(AgentKind::Gemini),
    };
    let s = resolve(&[(path, file)], &vars, &flags).unwrap();
    assert_eq!((s.memory_mib, s.vcpus, s.nested_virt), (512, 8, false));
    assert_eq!(s.sync_mode, SyncMode::Manual);
    assert_eq!(s.network, Network::Bridge);
    assert_eq!(s.agent, AgentKind::Gemini);
}

#[test]
fn the_agent_comes_from_the_file_the_flag_or_the_saved_sandbox() {
    let path = Path::new("/cfg/agent.toml");
    let none = FlagOverrides::default();
    assert_eq!(
        resolve(&[], &env(&[]), &none).unwrap().agent,
        AgentKind::Claude
    );
    let file = "[defaults]\nagent = \"codex\"\n";
    let s = resolve(&[(path, file)], &env(&[]), &none).unwrap();
    assert_eq!(s.agent, AgentKind::Codex);
    let flag = FlagOverrides {
        agent: Some(AgentKind::Gemini),
        ..FlagOverrides::default()
    };
    assert_eq!(
        resolve(&[(path, file)], &env(&[]), &flag).unwrap().agent,
        AgentKind::Gemini
    );
    // A later start keeps the sandbox's agent unless --agent is given.
    let saved = Settings {
        agent: AgentKind::Gemini,
        ..Settings::default()
    };
    assert_eq!(
        for_existing(&saved, &s, &none).unwrap().agent,
        AgentKind::Gemini
    );
    let codex = FlagOverrides {
        agent: Some(AgentKind::Codex),
        ..FlagOverrides::default()
    };
    assert_eq!(
        for_existing(&saved, &s, &codex).unwrap().agent,
        AgentKind::Codex
    );
    // A config.json written before the setting existed reads as claude.
    let mut old = serde_json::to_value(Settings::default()).unwrap();
    old.as_object_mut().unwrap().remove("agent");
    let old: Settings = serde_json::from_value(old).unwrap();
    assert_eq!(old.agent, AgentKind::Claude);
    let err = resolve(
        &[(path, "[defaults]\nagent = \"aider\"\n")],
        &env(&[]),
        &none,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("`defaults.agent`") && err.contains("\"gemini\""),
        "{err}"
    );
}

#[test]
fn empty_env_values_are_ignored_and_bad_ones_named() {
    let s = resolve(
        &[],
        &env(&[("KEYSTONE_AGENT_VCPUS", "")]),
        &FlagOverrides::default(),
    );
    assert_eq!(s.unwrap().vcpus, 4);
    let err = resolve(
        &[],
        &env(&[("KEYSTONE_AGENT_VCPUS", "many")]),
        &FlagOverrides::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("KEYSTONE_AGENT_VCPUS"), "{err}");
    let err = resolve(
        &[],
        &env(&[("KEYSTONE_AGENT_BACKEND", "docker")]),
        &FlagOverrides::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("microvm, kubernetes"), "{err}");
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
    let err = resolve(&[], &env(&[]), &flags).unwrap_err().to_string();
    assert!(err.contains("--vcpus"), "{err}");
}

#[test]
fn config_path_honours_xdg() {
    let p = default_path(&env(&[("XDG_CONFIG_HOME", "/x"), ("HOME", "/h")]));
    assert_eq!(p.unwrap(), PathBuf::from("/x/keystone/agent.toml"));
    let p = default_path(&env(&[("XDG_CONFIG_HOME", ""), ("HOME", "/h")]));
    assert_eq!(p.unwrap(), PathBuf::from("/h/.config/keystone/agent.toml"));
}

const SYSTEM: &str = "/etc/keystone/agent.toml";
const USER: &str = "/home/u/.config/keystone/agent.toml";

fn from_files(system: &str, user: Option<&str>) -> Result<Settings, ConfigError> {
    let mut files = vec![(Path::new(SYSTEM), system)];
    if let Some(user) = user {
        files.push((Path::new(USER), user));
    }
    resolve(&files, &env(&[]), &FlagOverrides::default())
}

#[test]
fn a_value_from_the_system_file_applies() {
    let s = from_files(
        "[defaults]\nmemory = 4096\nsync_mode = \"auto-commit\"\n\
         [backend.microvm]\nengine = \"qemu\"\n[network]\nallow = [\"10.1.0.0/16\"]\n",
        None,
    )
    .unwrap();
    assert_eq!(s.memory_mib, 4096);
    assert_eq!(s.sync_mode, SyncMode::AutoCommit);
    assert_eq!(s.engine, Engine::Qemu);
    assert_eq!(s.network_allow, ["10.1.0.0/16"]);
    assert_eq!(s.vcpus, 4, "keys the file leaves out keep the defaults");
}

#[test]
fn the_user_file_overrides_the_system_file() {
    let system = "[defaults]\nmemory = 4096\nvcpus = 2\n[backend.microvm]\nengine = \"qemu\"\n";
    let user = "[defaults]\nmemory = 1024\n[backend.microvm]\nengine = \"vmm\"\n";
    let s = from_files(system, Some(user)).unwrap();
    assert_eq!(s.memory_mib, 1024);
    assert_eq!(s.engine, Engine::Vmm);
    assert_eq!(
        s.vcpus, 2,
        "a key the user's file leaves out keeps the system value"
    );
    // The environment and flags still come above both files.
    let s = resolve(
        &[(Path::new(SYSTEM), system), (Path::new(USER), user)],
        &env(&[("KEYSTONE_AGENT_MEMORY", "2048")]),
        &FlagOverrides {
            vcpus: Some(3),
            ..FlagOverrides::default()
        },
    )
    .unwrap();
    assert_eq!((s.memory_mib, s.vcpus), (2048, 3));
}

#[test]
fn an_error_in_the_system_file_names_that_file() {
    let err = from_files("[defaults]\nvcpus = 2\nmemroy = 1\n", Some("[defaults]\n"))
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with(&format!("{SYSTEM}:3:1: unknown key `defaults.memroy`")),
        "{err}"
    );
    let err = from_files("[defaults]\n\nvcpus = \"two\"\n", None)
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with(&format!("{SYSTEM}:3:9: invalid value for `defaults.vcpus`")),
        "{err}"
    );
    let err = from_files("[defaults]\nvcpus = 2\n", Some("[defaults]\nvcpus = 0\n"))
        .unwrap_err()
        .to_string();
    assert!(err.starts_with(&format!("{USER}:2:9:")), "{err}");
}

#[test]
fn system_path_honours_its_variable() {
    assert_eq!(system_path(&env(&[])), PathBuf::from(SYSTEM_PATH));
    assert_eq!(
        system_path(&env(&[("KEYSTONE_SYSTEM_CONFIG", "")])),
        PathBuf::from("/etc/keystone/agent.toml")
    );
    assert_eq!(
        system_path(&env(&[("KEYSTONE_SYSTEM_CONFIG", "/t/agent.toml")])),
        PathBuf::from("/t/agent.toml")
    );
}

#[test]
fn kubernetes_target_describes_what_is_set() {
    assert_eq!(KubernetesTarget::default().describe(), None);
    let t = KubernetesTarget {
        context: Some("prod".into()),
        namespace: None,
        storage_class: Some("fast".into()),
    };
    assert_eq!(
        t.describe().unwrap(),
        "context = \"prod\", storage_class = \"fast\""
    );
}
