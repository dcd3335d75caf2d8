//! The guest root file system: a Debian 12 (bookworm) root directory built
//! by `rootfs/build.sh` with `debootstrap --variant=minbase` and the
//! packages in `rootfs/packages`, cached by recipe hash under
//! `${XDG_CACHE_HOME:-~/.cache}/keystone/rootfs/<hash>/` with the resolved
//! package versions in `<hash>.manifest` beside it. The VMM serves the
//! folder to the guest read-only over virtio-fs.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The build script's exit status when this host cannot build the rootfs
/// (not root, or debootstrap missing and not installable).
const EXIT_UNAVAILABLE: i32 = 4;

/// Errors finding or building the root file system.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("cannot run {script}: {source}")]
    Spawn {
        script: String,
        source: std::io::Error,
    },
    #[error("the guest rootfs cannot be built on this host (needs root and debootstrap); see the output above, or set KEYSTONE_ROOTFS_DIR")]
    Unavailable,
    #[error("the guest rootfs build failed (exit {code:?}); see the output above. Needs root, debootstrap and http://deb.debian.org/debian")]
    Build { code: Option<i32> },
    #[error("the rootfs build printed no usable folder: {0:?}")]
    Output(String),
    #[error("KEYSTONE_ROOTFS_DIR={0} is not a root file system (no bin/sh)")]
    NotARoot(PathBuf),
}

/// A built (or given) guest root directory.
#[derive(Debug, Clone)]
pub struct GuestRootfs {
    /// The root directory the guest mounts as `/`.
    pub dir: PathBuf,
    /// `<dir>.manifest`: one `package<TAB>version<TAB>arch` line per
    /// installed package. `None` for a `KEYSTONE_ROOTFS_DIR` without one.
    pub manifest: Option<PathBuf>,
}

impl GuestRootfs {
    fn in_dir(dir: PathBuf) -> Self {
        let manifest = manifest_path(&dir);
        Self {
            manifest: manifest.is_file().then_some(manifest),
            dir,
        }
    }

    /// The recorded packages and versions, `(name, version)`; empty when
    /// there is no manifest.
    pub fn packages(&self) -> Vec<(String, String)> {
        let Some(m) = &self.manifest else {
            return Vec::new();
        };
        std::fs::read_to_string(m)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let mut f = l.split('\t');
                Some((f.next()?.to_string(), f.next()?.to_string()))
            })
            .collect()
    }
}

/// `<dir>.manifest`, next to the root directory.
fn manifest_path(dir: &Path) -> PathBuf {
    let mut name = dir.as_os_str().to_os_string();
    name.push(".manifest");
    PathBuf::from(name)
}

/// The path of the build script.
pub fn build_script() -> PathBuf {
    crate::recipe_dir().join("rootfs").join("build.sh")
}

/// Returns the cached root file system, building it first if needed (a few
/// minutes; needs root; the build's progress goes to this process's
/// stderr). `KEYSTONE_ROOTFS_DIR` overrides the recipe with a ready root
/// directory.
pub fn ensure_rootfs() -> Result<GuestRootfs, RootfsError> {
    if let Some(dir) = std::env::var_os("KEYSTONE_ROOTFS_DIR").filter(|d| !d.is_empty()) {
        let dir = PathBuf::from(dir);
        if !dir.join("bin/sh").exists() {
            return Err(RootfsError::NotARoot(dir));
        }
        return Ok(GuestRootfs::in_dir(dir));
    }
    let script = build_script();
    let out = Command::new("bash")
        .arg(&script)
        .stderr(Stdio::inherit())
        .output()
        .map_err(|source| RootfsError::Spawn {
            script: script.display().to_string(),
            source,
        })?;
    match out.status.code() {
        Some(0) => {}
        Some(EXIT_UNAVAILABLE) => return Err(RootfsError::Unavailable),
        code => return Err(RootfsError::Build { code }),
    }
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let dir = PathBuf::from(text.lines().last().unwrap_or_default());
    let rootfs = GuestRootfs::in_dir(dir);
    if rootfs.dir.join("bin/sh").exists() && rootfs.manifest.is_some() {
        Ok(rootfs)
    } else {
        Err(RootfsError::Output(text))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_sits_beside_the_folder() {
        assert_eq!(
            manifest_path(Path::new("/c/keystone/rootfs/abc")),
            PathBuf::from("/c/keystone/rootfs/abc.manifest")
        );
    }

    #[test]
    fn build_script_exists_and_hashes() {
        assert!(build_script().is_file());
        let out = Command::new("bash")
            .arg(build_script())
            .arg("--hash")
            .output()
            .unwrap();
        assert!(out.status.success());
        let hash = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert_eq!(hash.len(), 16, "{hash:?}");
        assert!(hash.chars().all(|c| c.is_ascii_hexdigit()), "{hash:?}");
    }
}
