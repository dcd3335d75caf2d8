//! A project's `devcontainer.json`, turned into a typed plan that the
//! sandbox applies.
//!
//! [`load`] finds the file (`.devcontainer/devcontainer.json`, then
//! `.devcontainer.json`), reads it as hostile repository content
//! (no symbolic links, at most 1 MiB: `source.rs`), parses it as JSON with
//! comments and trailing commas (`jsonc.rs`) and builds a
//! [`DevcontainerPlan`] (`plan.rs`, `ports.rs`, `features.rs`, with the
//! `${...}` variables of `vars.rs`; the types are in `model.rs`).
//!
//! What the sandbox applies: `containerEnv` and `remoteEnv`, `remoteUser`
//! (else `containerUser`), the lifecycle commands `onCreateCommand`,
//! `updateContentCommand` and `postCreateCommand` (first start),
//! `postStartCommand` (every start) and `postAttachCommand` (every
//! attach), `forwardPorts` and `portsAttributes` (shown by name through
//! the dev-server proxy, never bound on the host by number), and the
//! `features` it maps to the image or to Debian packages.
//!
//! What it does not, and says so: `image`, `build`, `dockerFile` and
//! `dockerComposeFile` (the sandbox uses its own image) and
//! `initializeCommand` (nothing from the repository runs on the host) are
//! `refused`; every other key is listed as `ignored`; anything skipped or
//! changed inside a key is a warning. None of these makes loading fail:
//! only a file that cannot be read or parsed does, with an error that
//! says where and what to do.
//!
//! SECURITY: host environment variables and host paths never reach the
//! plan (`${localEnv:...}` and `${localWorkspaceFolder}` become empty
//! strings, with a warning).

pub mod applied;
mod features;
mod jsonc;
mod model;
mod plan;
mod ports;
mod source;
mod vars;

#[cfg(test)]
mod features_tests;
#[cfg(test)]
mod fuzz_tests;
#[cfg(test)]
mod jsonc_tests;
#[cfg(test)]
mod plan_tests;
#[cfg(test)]
mod source_tests;

use std::path::{Path, PathBuf};

pub use model::{DevcontainerPlan, FeatureKind, LifecycleCommand};
pub use source::MAX_FILE_BYTES;

/// Why a project's devcontainer.json could not be turned into a plan.
#[derive(Debug, thiserror::Error)]
pub enum DevcontainerError {
    #[error(
        "{}: a symbolic link; devcontainer.json is read only as a plain file inside the \
         project: replace the link with the file or remove it",
        shown_path(.path)
    )]
    Symlink { path: PathBuf },
    #[error("{}: not a regular file; replace it with the file or remove it", shown_path(.path))]
    NotAFile { path: PathBuf },
    #[error("cannot read {}: {source}; make it readable or remove it", shown_path(.path))]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{}: {size} bytes, more than the {MAX_FILE_BYTES} bytes (1 MiB) a devcontainer.json \
         may have; shorten it or remove it",
        shown_path(.path)
    )]
    TooLarge { path: PathBuf, size: u64 },
    #[error(
        "{}:{line}:{column}: not UTF-8 text; fix the file or remove it",
        shown_path(.path)
    )]
    NotUtf8 {
        path: PathBuf,
        line: usize,
        column: usize,
    },
    #[error("{}:{line}:{column}: {message}; fix the file or remove it", shown_path(.path))]
    Syntax {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error(
        "{}: the top level is not an object (`{{ ... }}`); fix the file or remove it",
        shown_path(.path)
    )]
    NotAnObject { path: PathBuf },
}

fn shown_path(path: &Path) -> String {
    crate::shown::line(&path.display().to_string())
}

/// The plan of `project`'s devcontainer.json, or `None` when it has none.
/// `devcontainer_id` is what `${devcontainerId}` becomes: stable for the
/// sandbox.
pub fn load(
    project: &Path,
    devcontainer_id: &str,
) -> Result<Option<DevcontainerPlan>, DevcontainerError> {
    let Some(relative) = source::find_relative(project)? else {
        return Ok(None);
    };
    let bytes = source::read(project, &relative)?;
    let basename = project
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .or_else(|| {
            let full = project.canonicalize().ok()?;
            Some(full.file_name()?.to_string_lossy().into_owned())
        })
        .unwrap_or_default();
    let source = relative.to_string_lossy();
    let path = project.join(&relative);
    plan_from_bytes(&bytes, &source, &path, &basename, devcontainer_id).map(Some)
}

/// The plan of the file `bytes`, read from `path` (`source` relative to
/// the project), in the project folder named `basename`.
pub(crate) fn plan_from_bytes(
    bytes: &[u8],
    source: &str,
    path: &Path,
    basename: &str,
    devcontainer_id: &str,
) -> Result<DevcontainerPlan, DevcontainerError> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        let good = std::str::from_utf8(&bytes[..e.valid_up_to()]).unwrap_or_default();
        let line = good.matches('\n').count() + 1;
        let column = good.rsplit('\n').next().unwrap_or_default().chars().count() + 1;
        DevcontainerError::NotUtf8 {
            path: path.to_path_buf(),
            line,
            column,
        }
    })?;
    let value = jsonc::parse(text).map_err(|e| DevcontainerError::Syntax {
        path: path.to_path_buf(),
        line: e.line,
        column: e.column,
        message: crate::shown::line(&e.message),
    })?;
    let serde_json::Value::Object(root) = value else {
        return Err(DevcontainerError::NotAnObject {
            path: path.to_path_buf(),
        });
    };
    let mut vars = vars::Expander::new(basename, devcontainer_id);
    Ok(plan::build(&root, source, &mut vars))
}
