//! The sandbox store on disk and its registry.
//!
//! Everything lives under the XDG state directory
//! (`$XDG_STATE_HOME/keystone`, or `~/.local/state/keystone`):
//!
//! ```text
//! sandboxes.json          registry: name -> project path, creation time
//! sandboxes.lock          flock held while the registry is rewritten
//! sandboxes/<name>/
//!     config.json         the settings the last start resolved
//!     state.json          lifecycle state (see state.rs)
//!     lock                flock held by a command changing this sandbox
//!     logs/               supervisor, VMM and guest logs
//!     disk/               the persistent sandbox disk
//! ```
//!
//! Every JSON file is written atomically (temporary file and rename).

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::fsutil::{self, FileLock};

/// Version written to `sandboxes.json`.
const REGISTRY_VERSION: u32 = 1;

/// Where sandboxes live.
#[derive(Clone, Debug)]
pub struct SandboxStore {
    root: PathBuf,
}

/// One sandbox's files.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SandboxPaths {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub state: PathBuf,
    pub lock: PathBuf,
    pub logs: PathBuf,
    pub disk: PathBuf,
}

/// A registry entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistryEntry {
    /// Absolute path of the project's git top-level directory.
    pub project: PathBuf,
    /// RFC 3339 UTC time the sandbox was created.
    pub created_at: String,
}

/// `sandboxes.json`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxRegistry {
    #[serde(default)]
    pub version: u32,
    #[serde(default)]
    pub sandboxes: BTreeMap<String, RegistryEntry>,
}

impl SandboxRegistry {
    /// The sandbox registered for a project directory, if any.
    pub fn find_by_project(&self, project: &Path) -> Option<&str> {
        self.sandboxes
            .iter()
            .find(|(_, e)| e.project == project)
            .map(|(name, _)| name.as_str())
    }
}

/// A store that cannot be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot find the state directory: set XDG_STATE_HOME or HOME")]
    NoHome,
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path} is corrupt ({source}); repair or remove it")]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Reads a JSON file; `Ok(None)` if it does not exist.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>, StoreError> {
    match std::fs::read(path) {
        Ok(bytes) => {
            serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| StoreError::Corrupt {
                    path: path.to_path_buf(),
                    source,
                })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(path)(e)),
    }
}

/// Writes a JSON file atomically.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), StoreError> {
    fsutil::write_json_atomic(path, value).map_err(io_err(path))
}

impl SandboxStore {
    /// A store rooted at `root`.
    pub fn at(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The store for this process's environment.
    pub fn from_env() -> Result<Self, StoreError> {
        Self::from_vars(&|k| std::env::var(k).ok())
    }

    /// The store named by `XDG_STATE_HOME` or `HOME` as `var` reports them.
    pub fn from_vars(var: &dyn Fn(&str) -> Option<String>) -> Result<Self, StoreError> {
        let nonempty = |k: &str| var(k).filter(|v| !v.is_empty());
        if let Some(dir) = nonempty("XDG_STATE_HOME") {
            return Ok(Self::at(PathBuf::from(dir).join("keystone")));
        }
        nonempty("HOME")
            .map(|home| Self::at(PathBuf::from(home).join(".local/state/keystone")))
            .ok_or(StoreError::NoHome)
    }

    /// The state folder (the registry, the proxy's files, the sandboxes).
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn registry_path(&self) -> PathBuf {
        self.root.join("sandboxes.json")
    }

    /// The files of sandbox `name`.
    pub fn paths(&self, name: &str) -> SandboxPaths {
        let dir = self.root.join("sandboxes").join(name);
        SandboxPaths {
            config: dir.join("config.json"),
            state: dir.join("state.json"),
            lock: dir.join("lock"),
            logs: dir.join("logs"),
            disk: dir.join("disk"),
            dir,
        }
    }

    /// Reads the registry (empty if there is none yet).
    pub fn registry(&self) -> Result<SandboxRegistry, StoreError> {
        Ok(read_json(&self.registry_path())?.unwrap_or_default())
    }

    /// Reads, changes and writes back the registry under its lock, so two
    /// commands never lose each other's entries.
    pub fn update_registry<R>(
        &self,
        change: impl FnOnce(&mut SandboxRegistry) -> R,
    ) -> Result<R, StoreError> {
        let lock_path = self.root.join("sandboxes.lock");
        let _lock = FileLock::acquire(&lock_path).map_err(io_err(&lock_path))?;
        let mut registry = self.registry()?;
        let result = change(&mut registry);
        registry.version = REGISTRY_VERSION;
        write_json(&self.registry_path(), &registry)?;
        Ok(result)
    }

    /// Creates the sandbox's folders.
    pub fn create_dirs(&self, name: &str) -> Result<SandboxPaths, StoreError> {
        let paths = self.paths(name);
        for dir in [&paths.dir, &paths.logs, &paths.disk] {
            std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        }
        Ok(paths)
    }

    /// Removes the sandbox's folder; with `keep_disk`, everything but `disk/`.
    /// The guest wrote much of it: [`fsutil::remove_tree`] takes any depth,
    /// name or mode it left there.
    pub fn remove_dirs(&self, name: &str, keep_disk: bool) -> Result<(), StoreError> {
        let paths = self.paths(name);
        if !keep_disk {
            return match fsutil::remove_tree(&paths.dir) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err(&paths.dir)(e)),
                _ => Ok(()),
            };
        }
        let entries = match std::fs::read_dir(&paths.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_err(&paths.dir)(e)),
        };
        for entry in entries {
            let entry = entry.map_err(io_err(&paths.dir))?;
            let path = entry.path();
            if path == paths.disk {
                continue;
            }
            let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
            let removed = if is_dir {
                fsutil::remove_tree(&path)
            } else {
                std::fs::remove_file(&path)
            };
            removed.map_err(io_err(&path))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keystone_test_kit::ScratchDir;

    #[test]
    fn store_location_follows_xdg() {
        let s = SandboxStore::from_vars(&|k| (k == "XDG_STATE_HOME").then(|| "/s".into())).unwrap();
        assert_eq!(s.root(), Path::new("/s/keystone"));
        let s = SandboxStore::from_vars(&|k| (k == "HOME").then(|| "/h".into())).unwrap();
        assert_eq!(s.root(), Path::new("/h/.local/state/keystone"));
        assert!(SandboxStore::from_vars(&|_| None).is_err());
    }

    #[test]
    fn registry_round_trips() {
        let dir = ScratchDir::new("registry");
        let store = SandboxStore::at(dir.path());
        assert!(store.registry().unwrap().sandboxes.is_empty());
        let entry = RegistryEntry {
            project: "/src/app".into(),
            created_at: "2026-01-01T00:00:00Z".into(),
        };
        store
            .update_registry(|r| r.sandboxes.insert("app-123456".into(), entry.clone()))
            .unwrap();
        let read = store.registry().unwrap();
        assert_eq!(read.version, REGISTRY_VERSION);
        assert_eq!(read.sandboxes["app-123456"], entry);
        assert_eq!(
            read.find_by_project(Path::new("/src/app")),
            Some("app-123456")
        );
        assert_eq!(read.find_by_project(Path::new("/src/other")), None);
        store
            .update_registry(|r| r.sandboxes.remove("app-123456"))
            .unwrap();
        assert!(store.registry().unwrap().sandboxes.is_empty());
    }

    #[test]
    fn a_corrupt_registry_is_reported_not_overwritten() {
        let dir = ScratchDir::new("corrupt");
        let store = SandboxStore::at(dir.path());
        std::fs::write(dir.path().join("sandboxes.json"), "{not json").unwrap();
        let err = store.registry().unwrap_err().to_string();
        assert!(err.contains("sandboxes.json is corrupt"), "{err}");
        assert!(store.update_registry(|_| ()).is_err());
        assert_eq!(
            std::fs::read_to_string(dir.path().join("sandboxes.json")).unwrap(),
            "{not json"
        );
    }

    #[test]
    fn removal_can_keep_the_disk() {
        let dir = ScratchDir::new("remove");
        let store = SandboxStore::at(dir.path());
        let paths = store.create_dirs("s").unwrap();
        std::fs::write(paths.disk.join("root.img"), "disk").unwrap();
        std::fs::write(&paths.state, "{}").unwrap();
        std::fs::write(paths.logs.join("vm.log"), "log").unwrap();
        store.remove_dirs("s", true).unwrap();
        assert!(paths.disk.join("root.img").exists());
        assert!(!paths.state.exists() && !paths.logs.exists());
        store.remove_dirs("s", false).unwrap();
        assert!(!paths.dir.exists());
        store.remove_dirs("s", false).unwrap();
    }
}
