//! Tests of reading one `agent.toml`: every key, and where and how each
//! kind of mistake is reported.

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
        // Located at the entry itself, just inside the `[`.
        let err = from_file(&format!("\n[sync]\nartifacts = [{bad}]\n"))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("/cfg/agent.toml:3:14: invalid value for `sync.artifacts`"),
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
    let s =
        from_file("[network]\nallow = [\"10.1.0.0/16\", \"fd00::/8\", \"192.168.1.5\"]\n").unwrap();
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

#[test]
fn wrong_types_are_named_in_the_files_words() {
    for (text, says) in [
        (
            "[defaults]\nvcpus = \"two\"\n",
            "2:9: invalid value for `defaults.vcpus`: expected a whole number",
        ),
        (
            "[defaults]\nvcpus = -1\n",
            "2:9: invalid value for `defaults.vcpus`: expected a whole number from 1 to 255, got -1",
        ),
        (
            "[defaults]\nnested_virt = \"yes\"\n",
            "2:15: invalid value for `defaults.nested_virt`: expected true or false",
        ),
        (
            "[network]\nallow = \"10.0.0.0/8\"\n",
            "2:9: invalid value for `network.allow`: expected a list",
        ),
        (
            "defaults = 4\n",
            "1:12: invalid value for `defaults`: expected a table, got integer `4`",
        ),
    ] {
        let err = from_file(text).unwrap_err().to_string();
        // Not serde's names of Rust types (`i64`, `struct RawDefaults`).
        assert!(
            err.starts_with(&format!("/cfg/agent.toml:{says}"))
                && !err.contains("i64")
                && !err.contains("struct"),
            "{text:?}: {err}"
        );
    }
}

#[test]
fn a_choice_lists_its_spellings_whatever_the_wrong_value() {
    for value in ["\"firecracker\"", "3", "{ qemu = {} }", "[\"qemu\"]"] {
        let err = from_file(&format!("[backend.microvm]\nengine = {value}\n"))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("/cfg/agent.toml:2:10: invalid value for `backend.microvm.engine`")
                && err.contains("expected one of \"auto\", \"vmm\", \"qemu\""),
            "{value}: {err}"
        );
    }
    for (line, key) in [
        ("network = \"host\"", "defaults.network"),
        ("sync_mode = \"auto_commit\"", "defaults.sync_mode"),
        ("agent = \"Claude\"", "defaults.agent"),
    ] {
        let err = from_file(&format!("[defaults]\n{line}\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains(&format!("`{key}`: expected one of")), "{err}");
    }
}

#[test]
fn keys_in_inline_tables_and_dotted_keys_are_named_in_full() {
    for (text, says) in [
        (
            "backend = { microvm = { turbo = true } }\n",
            "1:25: unknown key `backend.microvm.turbo`",
        ),
        (
            "proxy = { port = \"x\" }\n",
            "1:18: invalid value for `proxy.port`",
        ),
        (
            "defaults.vcpus = true\n",
            "1:18: invalid value for `defaults.vcpus`",
        ),
        (
            "[backend]\nmicrovm.engine = \"vmm\"\nmicrovm.turbo = 1\n",
            "3:9: unknown key `backend.microvm.turbo`",
        ),
    ] {
        let err = from_file(text).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("/cfg/agent.toml:{says}")),
            "{text:?}: {err}"
        );
    }
}

#[test]
fn a_date_time_in_the_file_does_not_hide_the_key() {
    let err = from_file("[defaults]\nvcpus = 1979-05-27\n")
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with(
            "/cfg/agent.toml:2:9: invalid value for `defaults.vcpus`: \
             expected a whole number, got a date-time"
        ),
        "{err}"
    );
    let err = from_file("[backend.microvm]\nengine = \"vmm\"\nturbo = 1979-05-27T07:32:00Z\n")
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("/cfg/agent.toml:3:1: unknown key `backend.microvm.turbo`"),
        "{err}"
    );
}

#[test]
fn a_bad_entry_of_a_list_is_located_on_its_own_line() {
    let text = "[network]\nallow = [\n  \"10.1.0.0/16\",\n  \"lan\",\n]\n";
    let err = from_file(text).unwrap_err().to_string();
    assert!(
        err.starts_with("/cfg/agent.toml:4:3: invalid value for `network.allow`")
            && err.contains("got \"lan\""),
        "{err}"
    );
}
