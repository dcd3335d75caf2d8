//! From the parsed devcontainer.json to a [`DevcontainerPlan`]: the
//! environment, the user, the lifecycle commands, and what is refused or
//! ignored. Ports are in `ports.rs`, features in `features.rs`.
//!
//! The file is repository content: a value of the wrong type is a warning
//! and is skipped, never an error and never a panic; every list and
//! string the plan keeps is bounded; every piece of the file a warning
//! quotes goes through [`shown_short`].

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use super::model::{DevcontainerPlan, LifecycleCommand};
use super::vars::Expander;
use super::{features, ports};

/// The most warnings a plan keeps; one more line says how many were left out.
pub const MAX_WARNINGS: usize = 200;
/// The most ignored key names a plan lists.
pub const MAX_IGNORED: usize = 64;
/// The most environment variables.
pub const MAX_ENV_ENTRIES: usize = 256;
/// The most bytes of one environment value.
pub const MAX_ENV_VALUE_BYTES: usize = 32 * 1024;
/// The most commands of one lifecycle hook.
pub const MAX_COMMANDS_PER_HOOK: usize = 32;
/// The most arguments of one command.
pub const MAX_ARGV: usize = 1024;
/// The most characters of a command's name.
pub const MAX_COMMAND_NAME_CHARS: usize = 128;
/// The most characters of file text quoted in a warning.
const SHOWN_CHARS: usize = 80;

/// The lifecycle keys and where each goes in the plan.
const LIFECYCLE: [&str; 5] = [
    "onCreateCommand",
    "updateContentCommand",
    "postCreateCommand",
    "postStartCommand",
    "postAttachCommand",
];

/// Keys that would replace the sandbox's image.
const IMAGE_KEYS: [&str; 4] = ["image", "build", "dockerFile", "dockerComposeFile"];

/// Warnings, at most [`MAX_WARNINGS`].
#[derive(Debug, Default)]
pub struct Warnings {
    list: Vec<String>,
    left_out: usize,
}

impl Warnings {
    pub fn push(&mut self, warning: String) {
        if self.list.len() < MAX_WARNINGS {
            self.list.push(warning);
        } else {
            self.left_out += 1;
        }
    }

    pub fn into_vec(mut self) -> Vec<String> {
        if self.left_out > 0 {
            self.list
                .push(format!("{} more warnings left out", self.left_out));
        }
        self.list
    }
}

/// Text from the file as a warning quotes it: one line, escaped, at most
/// [`SHOWN_CHARS`] characters.
pub fn shown_short(text: &str) -> String {
    if text.chars().count() <= SHOWN_CHARS {
        return crate::shown::line(text);
    }
    let head: String = text.chars().take(SHOWN_CHARS).collect();
    format!("{}...", crate::shown::line(&head))
}

/// The plan of the top-level object `root`, read from `source`.
pub fn build(root: &Map<String, Value>, source: &str, vars: &mut Expander) -> DevcontainerPlan {
    let mut w = Warnings::default();
    let env = environment(root, vars, &mut w);
    let remote_user = user(root, vars, &env, &mut w);
    let mut hooks = LIFECYCLE.iter().map(|key| match root.get(*key) {
        Some(value) => commands(key, value, vars, &env, &mut w),
        None => Vec::new(),
    });
    let [on_create, update_content, post_create, post_start, post_attach] =
        std::array::from_fn(|_| hooks.next().unwrap_or_default());
    let (ports, port_labels) = ports::plan(root, &mut w);
    let features = features::plan(root, &mut w);
    let (refused, ignored) = refused_and_ignored(root);
    DevcontainerPlan {
        source: source.to_string(),
        env,
        remote_user,
        on_create,
        update_content,
        post_create,
        post_start,
        post_attach,
        ports,
        port_labels,
        features,
        refused,
        ignored,
        warnings: w.into_vec(),
    }
}

/// Whether `name` can be an environment variable's name.
pub fn is_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && name.len() <= 256
}

/// `containerEnv`, then `remoteEnv` over it. `${containerEnv:VAR}` in
/// `containerEnv` sees nothing (the image's environment is not known
/// here); in `remoteEnv` it sees `containerEnv`.
fn environment(
    root: &Map<String, Value>,
    vars: &mut Expander,
    w: &mut Warnings,
) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for key in ["containerEnv", "remoteEnv"] {
        let Some(value) = root.get(key) else { continue };
        let Some(map) = value.as_object() else {
            w.push(format!("`{key}` is not an object of strings; skipped"));
            continue;
        };
        let seen = if key == "remoteEnv" {
            env.clone()
        } else {
            BTreeMap::new()
        };
        for (name, value) in map {
            let what = format!("{key}.{}", shown_short(name));
            if !is_env_name(name) {
                w.push(format!("{what}: not a valid variable name; skipped"));
                continue;
            }
            let text = match value {
                Value::String(text) => text,
                Value::Null if key == "remoteEnv" => {
                    env.remove(name);
                    continue;
                }
                _ => {
                    w.push(format!("{what}: the value is not a string; skipped"));
                    continue;
                }
            };
            let value = match vars.expand(text, &seen, &what, w) {
                Ok(value) if value.len() <= MAX_ENV_VALUE_BYTES => value,
                Ok(_) => {
                    w.push(format!(
                        "{what}: longer than {MAX_ENV_VALUE_BYTES} bytes; skipped"
                    ));
                    continue;
                }
                Err(e) => {
                    w.push(format!("{what}: {e}; skipped"));
                    continue;
                }
            };
            if env.len() >= MAX_ENV_ENTRIES && !env.contains_key(name) {
                w.push(format!(
                    "{what}: more than {MAX_ENV_ENTRIES} variables; skipped"
                ));
                continue;
            }
            env.insert(name.clone(), value);
        }
    }
    env
}

/// `remoteUser`, else `containerUser`, if it looks like a user name.
fn user(
    root: &Map<String, Value>,
    vars: &mut Expander,
    env: &BTreeMap<String, String>,
    w: &mut Warnings,
) -> Option<String> {
    let key = ["remoteUser", "containerUser"]
        .into_iter()
        .find(|key| root.contains_key(*key))?;
    let Some(text) = root.get(key).and_then(Value::as_str) else {
        w.push(format!(
            "`{key}` is not a string; the sandbox's own user is used"
        ));
        return None;
    };
    match vars.expand(text, env, key, w) {
        Ok(name) if is_user_name(&name) => Some(name),
        Ok(name) => {
            w.push(format!(
                "`{key}`: `{}` is not a user name; the sandbox's own user is used",
                shown_short(&name)
            ));
            None
        }
        Err(e) => {
            w.push(format!("`{key}`: {e}; the sandbox's own user is used"));
            None
        }
    }
}

/// A plausible user name: 1 to 32 of letters, digits, `_`, `.` and `-`,
/// not starting with `-` or `.`, not all digits.
pub fn is_user_name(name: &str) -> bool {
    let first_ok = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
    first_ok
        && name.len() <= 32
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        && !name.chars().all(|c| c.is_ascii_digit())
}

/// The commands of the lifecycle key `key`.
fn commands(
    key: &str,
    value: &Value,
    vars: &mut Expander,
    env: &BTreeMap<String, String>,
    w: &mut Warnings,
) -> Vec<LifecycleCommand> {
    let mut out = Vec::new();
    match value {
        Value::Null => {}
        Value::Object(map) => {
            for (name, entry) in map {
                let what = format!("{key}.{}", shown_short(name));
                if name.chars().count() > MAX_COMMAND_NAME_CHARS {
                    w.push(format!(
                        "{what}: a name longer than {MAX_COMMAND_NAME_CHARS} characters; skipped"
                    ));
                    continue;
                }
                if out.len() >= MAX_COMMANDS_PER_HOOK {
                    w.push(format!(
                        "{what}: more than {MAX_COMMANDS_PER_HOOK} commands; skipped"
                    ));
                    continue;
                }
                if let Some(argv) = argv(entry, &what, vars, env, w) {
                    out.push(LifecycleCommand {
                        name: Some(name.clone()),
                        argv,
                    });
                }
            }
        }
        _ => {
            if let Some(argv) = argv(value, key, vars, env, w) {
                out.push(LifecycleCommand { name: None, argv });
            }
        }
    }
    out
}

/// The argv of a string or array command; `None` (with a warning where
/// something was skipped) when there is nothing to run.
fn argv(
    value: &Value,
    what: &str,
    vars: &mut Expander,
    env: &BTreeMap<String, String>,
    w: &mut Warnings,
) -> Option<Vec<String>> {
    let words: Vec<&str> = match value {
        Value::Null => return None,
        Value::String(text) if text.trim().is_empty() => return None,
        Value::String(text) => vec![text],
        Value::Array(items) if items.is_empty() => {
            w.push(format!("{what}: an empty array runs nothing; skipped"));
            return None;
        }
        Value::Array(items) if items.len() > MAX_ARGV => {
            w.push(format!("{what}: more than {MAX_ARGV} arguments; skipped"));
            return None;
        }
        Value::Array(items) => match items.iter().map(Value::as_str).collect::<Option<Vec<_>>>() {
            Some(words) => words,
            None => {
                w.push(format!("{what}: an argument is not a string; skipped"));
                return None;
            }
        },
        _ => {
            w.push(format!(
                "{what}: not a string, an array of strings or an object; skipped"
            ));
            return None;
        }
    };
    let mut expanded = Vec::with_capacity(words.len() + 2);
    for word in &words {
        match vars.expand(word, env, what, w) {
            Ok(word) => expanded.push(word),
            Err(e) => {
                w.push(format!("{what}: {e}; skipped"));
                return None;
            }
        }
    }
    if value.is_string() {
        let script = expanded.pop().unwrap_or_default();
        return Some(vec!["/bin/sh".to_string(), "-c".to_string(), script]);
    }
    Some(expanded)
}

/// The refused keys with their reasons, and the names of the ignored ones.
fn refused_and_ignored(root: &Map<String, Value>) -> (Vec<String>, Vec<String>) {
    let mut refused = Vec::new();
    let mut ignored = Vec::new();
    let mut ignored_left_out = 0usize;
    for (key, value) in root {
        let key = key.as_str();
        if key == "build" && value.get("dockerfile").is_some() {
            refused.push(
                "the sandbox uses its own image; `build` (with its `dockerfile`) is not used"
                    .to_string(),
            );
        } else if IMAGE_KEYS.contains(&key) {
            refused.push(format!(
                "the sandbox uses its own image; `{key}` is not used"
            ));
        } else if key == "initializeCommand" {
            refused.push(
                "`initializeCommand` is never run on the host: the sandbox runs nothing from \
                 the repository on the host"
                    .to_string(),
            );
        } else if is_applied(key, root) {
            continue;
        } else if ignored.len() < MAX_IGNORED {
            ignored.push(shown_short(key));
        } else {
            ignored_left_out += 1;
        }
    }
    if ignored_left_out > 0 {
        ignored.push(format!("{ignored_left_out} more keys left out"));
    }
    (refused, ignored)
}

/// Whether the plan applies the top-level key `key`.
fn is_applied(key: &str, root: &Map<String, Value>) -> bool {
    match key {
        "containerEnv" | "remoteEnv" | "remoteUser" | "forwardPorts" | "portsAttributes"
        | "features" => true,
        "containerUser" => !root.contains_key("remoteUser"),
        _ => LIFECYCLE.contains(&key),
    }
}
