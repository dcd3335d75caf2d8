//! `${...}` variables in devcontainer.json strings.
//!
//! What each becomes in the sandbox:
//! - `${containerWorkspaceFolder}`: `/workspace`;
//! - `${containerWorkspaceFolderBasename}`: `workspace`;
//! - `${localWorkspaceFolderBasename}`: the project folder's name;
//! - `${devcontainerId}`: the stable id the caller passes;
//! - `${containerEnv:VAR}` (or `${containerEnv:VAR:default}`): the plan's
//!   own value of VAR, else the default, else an empty string with a
//!   warning (the image's own environment is not known here);
//! - `${localEnv:VAR}` and `${localWorkspaceFolder}`: an empty string (the
//!   default of `${localEnv:VAR:default}` is not used either) and a
//!   warning. SECURITY: host environment variables and host paths never
//!   reach the guest; forwarding tokens through `${localEnv:GITHUB_TOKEN}`
//!   is a common devcontainer pattern, and exactly what must not happen.
//! - anything else is left as written, with a warning.
//!
//! Expansion is bounded: each string to [`MAX_EXPANDED_BYTES`], and all
//! strings of one file together to [`TOTAL_EXPANDED_BYTES`] (a small file
//! of many `${containerEnv:BIG}` would otherwise grow without limit).

use std::collections::BTreeMap;

use super::plan::Warnings;

/// The workspace folder in the guest.
pub const CONTAINER_WORKSPACE: &str = "/workspace";
/// The most bytes one string may have once its variables are expanded.
pub const MAX_EXPANDED_BYTES: usize = 64 * 1024;
/// The most bytes all expanded strings of one file may have together.
pub const TOTAL_EXPANDED_BYTES: usize = 4 * 1024 * 1024;

/// What the variables of one file expand to, and the budget left.
#[derive(Debug)]
pub struct Expander {
    project_basename: String,
    devcontainer_id: String,
    budget: usize,
}

/// Why a string was not expanded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TooLong {
    /// The string alone would pass [`MAX_EXPANDED_BYTES`].
    String,
    /// The file's strings together would pass [`TOTAL_EXPANDED_BYTES`].
    Total,
}

impl std::fmt::Display for TooLong {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TooLong::String => write!(f, "longer than {MAX_EXPANDED_BYTES} bytes once expanded"),
            TooLong::Total => write!(
                f,
                "past the {TOTAL_EXPANDED_BYTES} bytes all expanded strings of the file may have"
            ),
        }
    }
}

impl Expander {
    pub fn new(project_basename: &str, devcontainer_id: &str) -> Self {
        Self {
            project_basename: project_basename.to_string(),
            devcontainer_id: devcontainer_id.to_string(),
            budget: TOTAL_EXPANDED_BYTES,
        }
    }

    /// `text` with its variables expanded against `env` (the plan's
    /// environment so far); `what` names the string in warnings.
    pub fn expand(
        &mut self,
        text: &str,
        env: &BTreeMap<String, String>,
        what: &str,
        warnings: &mut Warnings,
    ) -> Result<String, TooLong> {
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        while let Some(start) = rest.find("${") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            let Some(end) = after.find('}') else {
                out.push_str(&rest[start..]);
                rest = "";
                break;
            };
            let body = &after[..end];
            match self.value_of(body, env, what, warnings) {
                Some(value) => out.push_str(&value),
                None => out.push_str(&rest[start..start + 2 + end + 1]),
            }
            rest = &after[end + 1..];
            if out.len() > MAX_EXPANDED_BYTES {
                return Err(TooLong::String);
            }
        }
        out.push_str(rest);
        if out.len() > MAX_EXPANDED_BYTES {
            return Err(TooLong::String);
        }
        if out.len() > self.budget {
            return Err(TooLong::Total);
        }
        self.budget -= out.len();
        Ok(out)
    }

    /// What `${body}` becomes; `None` leaves it as written.
    fn value_of(
        &self,
        body: &str,
        env: &BTreeMap<String, String>,
        what: &str,
        warnings: &mut Warnings,
    ) -> Option<String> {
        let (name, arg) = match body.split_once(':') {
            Some((name, arg)) => (name, Some(arg)),
            None => (body, None),
        };
        match (name, arg) {
            ("containerWorkspaceFolder", None) => Some(CONTAINER_WORKSPACE.to_string()),
            ("containerWorkspaceFolderBasename", None) => Some("workspace".to_string()),
            ("localWorkspaceFolderBasename", None) => Some(self.project_basename.clone()),
            ("devcontainerId", None) => Some(self.devcontainer_id.clone()),
            ("containerEnv", Some(arg)) => {
                let (var, default) = match arg.split_once(':') {
                    Some((var, default)) => (var, Some(default)),
                    None => (arg, None),
                };
                if let Some(value) = env.get(var) {
                    return Some(value.clone());
                }
                if let Some(default) = default {
                    return Some(default.to_string());
                }
                warnings.push(format!(
                    "{what}: `${{containerEnv:{}}}` is not set by devcontainer.json and \
                     becomes an empty string (the image's own environment is not read here)",
                    super::plan::shown_short(var)
                ));
                Some(String::new())
            }
            ("localEnv", Some(_)) | ("localWorkspaceFolder", None) => {
                warnings.push(format!(
                    "{what}: `${{{}}}` becomes an empty string: not passed: host environment \
                     variables and paths stay on the host",
                    super::plan::shown_short(body)
                ));
                Some(String::new())
            }
            _ => {
                warnings.push(format!(
                    "{what}: unknown variable `${{{}}}` is left as written",
                    super::plan::shown_short(body)
                ));
                None
            }
        }
    }
}
