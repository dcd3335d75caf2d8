//! Small file-system helpers the sandbox store is built on: atomic writes
//! (temporary file, fsync, rename, fsync of the directory) so a crash never
//! leaves a half-written `state.json`, `flock(2)` locks, UTC timestamps
//! in RFC 3339 form without a date crate, and [`remove_tree`] for the
//! trees a guest wrote (any depth, any names, any modes).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use rustix::fs::{flock, FlockOperation};
use rustix::io::Errno;
use rustix::process::{getegid, geteuid};

mod remove_tree;

pub use remove_tree::remove_tree;

/// Makes `dir` (created when missing) a folder of this user alone:
/// owned by this process's effective user and group, mode 0700. A path
/// that is not a folder (a symbolic link included) is refused.
pub fn private_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    fs::create_dir_all(dir)?;
    let meta = fs::symlink_metadata(dir)?;
    if !meta.is_dir() {
        return Err(io::Error::other(
            "is not a folder; remove it and start again",
        ));
    }
    let (uid, gid) = (geteuid().as_raw(), getegid().as_raw());
    if meta.uid() != uid || meta.gid() != gid {
        std::os::unix::fs::lchown(dir, Some(uid), Some(gid))?;
    }
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
}

/// Writes `bytes` to `path` atomically: readers see the old file or the new
/// one, never a mix, even across a crash or power loss.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_atomic_mode(path, bytes, 0o666)
}

/// [`write_atomic`] creating the file with permission bits `mode` (less
/// the umask), e.g. 0o600 for a file only its owner may read.
pub fn write_atomic_mode(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    fs::create_dir_all(dir)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".into());
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        // The rename is durable only once the directory entry is.
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Serializes `value` as pretty JSON (with a trailing newline) and writes it
/// atomically.
pub fn write_json_atomic<T: serde::Serialize>(path: &Path, value: &T) -> io::Result<()> {
    let mut bytes = serde_json::to_vec_pretty(value).map_err(io::Error::other)?;
    bytes.push(b'\n');
    write_atomic(path, &bytes)
}

/// An exclusive `flock(2)` lock on a file, released when dropped (or when
/// the process dies, so a crashed command never leaves a stale lock).
#[derive(Debug)]
pub struct FileLock {
    file: File,
}

impl FileLock {
    /// Takes the lock, waiting for it if another process holds it.
    pub fn acquire(path: &Path) -> io::Result<Self> {
        Self::lock(path, FlockOperation::LockExclusive)
            .map(|lock| lock.expect("blocking flock returned busy"))
    }

    /// Takes the lock if it is free; `Ok(None)` if another process holds it.
    pub fn try_acquire(path: &Path) -> io::Result<Option<Self>> {
        Self::lock(path, FlockOperation::NonBlockingLockExclusive)
    }

    fn lock(path: &Path, op: FlockOperation) -> io::Result<Option<Self>> {
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(path)?;
        loop {
            match flock(&file, op) {
                Ok(()) => return Ok(Some(Self { file })),
                Err(Errno::INTR) => continue,
                Err(Errno::WOULDBLOCK) => return Ok(None),
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl Drop for FileLock {
    fn drop(&mut self) {
        // Closing the descriptor would unlock too.
        let _ = flock(&self.file, FlockOperation::Unlock);
    }
}

/// Seconds since the Unix epoch, now.
pub fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// `2026-11-27T02:56:36Z` for a Unix time.
pub fn rfc3339(unix: i64) -> String {
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// The current time in RFC 3339 form.
pub fn now_rfc3339() -> String {
    rfc3339(now_unix())
}

#[cfg(test)]
mod tests {
    use super::*;
    use keystone_test_kit::ScratchDir;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_748_196), "2026-11-27T02:56:36Z");
    }

    #[test]
    fn atomic_write_replaces_and_leaves_no_temporary() {
        let dir = ScratchDir::new("atomic");
        let path = dir.path().join("sub/state.json");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        let names: Vec<_> = fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("state.json")]);
    }

    #[test]
    fn try_lock_is_exclusive_and_released_on_drop() {
        let dir = ScratchDir::new("lock");
        let path = dir.path().join("lock");
        let held = FileLock::try_acquire(&path).unwrap().expect("free");
        // flock locks belong to the open file description, so a second
        // open in the same process conflicts like another process would.
        assert!(FileLock::try_acquire(&path).unwrap().is_none());
        drop(held);
        assert!(FileLock::try_acquire(&path).unwrap().is_some());
    }
}
