//! The coding agents in the sandbox: Claude Code, Codex and Gemini CLI are
//! in the guest image (`guest-image/rootfs/agents.lock` pins them; the
//! image is built with them), each set for the agent user to work without
//! permission prompts. Nothing is downloaded at `start`.
//!
//! This module is the host's side of that:
//! - at `start`, [`record`] copies the lock kept beside the image the
//!   sandbox boots (`<rootfs>.agents`) into the sandbox's folder, and
//!   [`summary`] says which versions are there and which agent the
//!   session opens with;
//! - `status` reads that copy ([`recorded_versions`]): the versions come
//!   from the host's files, never from the guest;
//! - `attach` opens the Zellij session with the layout of the sandbox's
//!   agent ([`layout_path`]): the agent in the first pane, a shell in the
//!   second.
//!
//! The agent logs in inside the sandbox (its own login flow); no host
//! credential is copied in (security invariant 3).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use guest_image::agents::{self as lock, AgentPin};

use crate::agent::config::AgentKind;

/// Where the image keeps one Zellij layout per agent (`<name>.kdl`).
pub const LAYOUT_DIR: &str = "/usr/local/share/keystone/zellij";

/// The copy of the image's lock in a sandbox's folder.
const RECORD_FILE: &str = "agents.lock";

/// The Zellij layout the session of a sandbox whose agent is `kind` opens
/// with.
pub fn layout_path(kind: AgentKind) -> String {
    format!("{LAYOUT_DIR}/{}.kdl", kind.as_str())
}

/// What users call the agent.
fn title(kind: AgentKind) -> &'static str {
    match kind {
        AgentKind::Claude => "Claude Code",
        AgentKind::Codex => "Codex",
        AgentKind::Gemini => "Gemini CLI",
    }
}

/// Why the image's agents lock was not recorded.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The lock could not be read or does not parse.
    #[error(transparent)]
    Lock(#[from] lock::LockError),
    /// The copy into the sandbox's folder failed.
    #[error("{}: {source}", .path.display())]
    Copy {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Copies the agents lock kept beside the root directory `rootfs_dir`
/// into the sandbox folder `sandbox_dir` and returns its pins. An image
/// without one (a `KEYSTONE_ROOTFS_DIR` of another making) records
/// nothing and gives no pins; a lock that does not parse is an error.
pub fn record(rootfs_dir: &Path, sandbox_dir: &Path) -> Result<Vec<AgentPin>, RecordError> {
    let target = sandbox_dir.join(RECORD_FILE);
    let source = lock::image_lock_path(rootfs_dir);
    if !source.is_file() {
        let _ = std::fs::remove_file(&target);
        return Ok(Vec::new());
    }
    let pins = lock::read_lock(&source)?;
    std::fs::copy(&source, &target).map_err(|source| RecordError::Copy {
        path: target,
        source,
    })?;
    Ok(pins)
}

/// The agents' versions recorded at the sandbox's last start (`claude`,
/// `codex`, `gemini` -> version); `None` when none was recorded or the
/// record does not parse.
pub fn recorded_versions(sandbox_dir: &Path) -> Option<BTreeMap<String, String>> {
    let pins = lock::read_lock(&sandbox_dir.join(RECORD_FILE)).ok()?;
    Some(agent_versions(&pins))
}

/// The pins that are agents (not their runtime), by name.
fn agent_versions(pins: &[AgentPin]) -> BTreeMap<String, String> {
    pins.iter()
        .filter(|p| p.name.parse::<AgentKind>().is_ok())
        .map(|p| (p.name.clone(), p.release().to_string()))
        .collect()
}

/// The line `start` prints about the agents: their versions and the one
/// the session opens with, or a warning when the image lacks it.
pub fn summary(kind: AgentKind, pins: &[AgentPin]) -> String {
    let versions = agent_versions(pins);
    let Some(version) = versions.get(kind.as_str()) else {
        return format!(
            "warning: this guest image has no {} (its root file system lists no such agent); \
             the session opens with a shell. Rebuild the image with \
             guest-image/rootfs/build.sh, or unset KEYSTONE_ROOTFS_DIR",
            title(kind)
        );
    };
    let others: Vec<String> = AgentKind::CHOICES
        .iter()
        .filter(|name| **name != kind.as_str())
        .filter_map(|name| versions.get(*name).map(|v| format!("`{name}` {v}")))
        .collect();
    let also = if others.is_empty() {
        String::new()
    } else {
        format!("; also in the sandbox: {}", others.join(", "))
    };
    format!(
        "coding agent: {} {version} opens in the session (`{}`, no permission prompts; it \
         logs in inside the sandbox){also}",
        title(kind),
        kind.as_str()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pins() -> Vec<AgentPin> {
        lock::read_lock(&lock::lock_path()).unwrap()
    }

    fn temp(tag: &str) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("keystone-agents-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn every_agent_has_a_layout_of_its_own() {
        for name in AgentKind::CHOICES {
            let kind: AgentKind = name.parse().unwrap();
            let path = layout_path(kind);
            assert_eq!(path, format!("/usr/local/share/keystone/zellij/{name}.kdl"));
            let recipe = guest_image::recipe_dir().join(format!("rootfs/zellij/{name}.kdl"));
            let text = std::fs::read_to_string(&recipe).unwrap();
            assert!(text.contains(&format!("command=\"{name}\"")), "{text}");
            assert!(text.contains("pane name=\"shell\""), "{text}");
        }
    }

    #[test]
    fn start_records_the_image_lock_and_status_reads_it() {
        let dir = temp("record");
        let rootfs = dir.join("abc");
        let sandbox = dir.join("sandbox");
        std::fs::create_dir_all(&sandbox).unwrap();
        // An image without a lock records nothing.
        assert!(record(&rootfs, &sandbox).unwrap().is_empty());
        assert_eq!(recorded_versions(&sandbox), None);

        std::fs::copy(lock::lock_path(), dir.join("abc.agents")).unwrap();
        let recorded = record(&rootfs, &sandbox).unwrap();
        assert_eq!(recorded, pins());
        let versions = recorded_versions(&sandbox).unwrap();
        assert_eq!(
            versions.keys().collect::<Vec<_>>(),
            ["claude", "codex", "gemini"],
            "agents only, not their runtime"
        );
        assert!(!versions["codex"].ends_with("-linux-x64"), "{versions:?}");

        // A later start from an image without one drops the old record.
        std::fs::remove_file(dir.join("abc.agents")).unwrap();
        record(&rootfs, &sandbox).unwrap();
        assert_eq!(recorded_versions(&sandbox), None);

        std::fs::write(dir.join("abc.agents"), "claude x 1.0 bad\n").unwrap();
        assert!(record(&rootfs, &sandbox).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_summary_names_the_session_agent_or_warns() {
        let pins = pins();
        let line = summary(AgentKind::Gemini, &pins);
        assert!(line.starts_with("coding agent: Gemini CLI 0."), "{line}");
        assert!(line.contains("`claude` 2."), "{line}");
        assert!(line.contains("`codex` 0."), "{line}");
        let line = summary(AgentKind::Codex, &[]);
        assert!(
            line.starts_with("warning: this guest image has no Codex"),
            "{line}"
        );
    }
}
