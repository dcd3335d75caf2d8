//! Where artifacts land: a directory tree held by a descriptor and walked
//! one component at a time with `O_NOFOLLOW`, so no symbolic link on the
//! host is ever followed, and nothing is ever created but plain
//! directories (mode 0755) and plain files (mode 0644: no exec, set-user
//! or set-group bits).
//!
//! A file is written to a fresh temporary file (`O_CREAT | O_EXCL`) in its
//! directory and renamed over the old one only when the bytes differ: a
//! reader sees the old file or the new one, a hard link elsewhere keeps
//! the old bytes, and an unchanged file is left alone. A path whose host
//! side is a symbolic link, a directory where a file goes (or the other way
//! round) or a special file is refused, never replaced; nothing is deleted.

use std::ffi::CString;
use std::fs::{File, Permissions};
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::fs::{
    fchmod, mkdirat, openat, renameat, statat, unlinkat, AtFlags, FileType, Mode, OFlags,
};
use rustix::io::Errno;

/// What happened to one entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Landed {
    /// Written (or, in a dry run, would be).
    Written,
    /// The host already has these bytes (or this directory).
    Unchanged,
    /// Not written, for this reason.
    Refused(String),
}

/// A directory tree that artifacts land in.
pub struct Tree {
    /// `None`: the root does not exist yet (a dry run that creates nothing).
    root: Option<OwnedFd>,
    path: PathBuf,
}

/// How a walk to a file's directory ended.
enum Walk {
    At(OwnedFd),
    /// A directory on the way does not exist (dry run).
    Missing,
    Refused(String),
}

const DIR_MODE: Mode = Mode::from_raw_mode(0o755);
const FILE_MODE: Mode = Mode::from_raw_mode(0o644);

fn cstr(name: &str) -> io::Result<CString> {
    CString::new(name).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a name"))
}

/// `openat(dir, name, flags)`, always with `O_NOFOLLOW | O_CLOEXEC`.
fn open_at(dir: &OwnedFd, name: &str, flags: OFlags, mode: Mode) -> io::Result<OwnedFd> {
    let c = cstr(name)?;
    let flags = flags | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    Ok(openat(dir, c.as_c_str(), flags, mode)?)
}

/// The type of `name` in `dir`, without following a link; `None` if it
/// does not exist.
fn kind_at(dir: &OwnedFd, name: &str) -> io::Result<Option<FileType>> {
    let c = cstr(name)?;
    match statat(dir, c.as_c_str(), AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(FileType::from_raw_mode(st.st_mode))),
        Err(Errno::NOENT) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// What is at a host path, in words, for a refusal.
fn what_is(kind: FileType) -> &'static str {
    match kind {
        FileType::Symlink => "a symbolic link",
        FileType::Directory => "a directory",
        FileType::RegularFile => "a file",
        _ => "a special file",
    }
}

/// A name that stays in its directory: not empty, `.` or `..`, no `/`.
fn plain(name: &str) -> bool {
    !matches!(name, "" | "." | "..") && !name.contains('/')
}

/// Temporary files get unique names within this process.
static TEMP_SEQ: AtomicU64 = AtomicU64::new(0);

impl Tree {
    /// The tree at `path`, which must be a directory.
    pub fn open(path: &Path) -> io::Result<Tree> {
        let dir = File::open(path)?;
        if !dir.metadata()?.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a directory", path.display()),
            ));
        }
        Ok(Tree {
            root: Some(dir.into()),
            path: path.to_path_buf(),
        })
    }

    /// The subdirectory `name` of this tree (not a link), created unless
    /// `dry_run`; in a dry run a missing one gives a tree that holds
    /// nothing.
    pub fn subtree(&self, name: &str, dry_run: bool) -> io::Result<Tree> {
        let path = self.path.join(name);
        match self.walk(&[name], dry_run)? {
            Walk::At(fd) => Ok(Tree {
                root: Some(fd),
                path,
            }),
            Walk::Missing => Ok(Tree { root: None, path }),
            Walk::Refused(why) => Err(io::Error::other(why)),
        }
    }

    /// The tree's path, for messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opens (creating unless `dry_run`) the directories `parts` below the
    /// root, refusing any that is a link or not a directory on the host.
    fn walk(&self, parts: &[&str], dry_run: bool) -> io::Result<Walk> {
        if let Some(bad) = parts.iter().find(|p| !plain(p)) {
            return Ok(Walk::Refused(format!("{bad:?} is not a plain name")));
        }
        let Some(root) = &self.root else {
            return Ok(Walk::Missing);
        };
        let mut dir = root.try_clone()?;
        for (i, part) in parts.iter().enumerate() {
            let flags = OFlags::RDONLY | OFlags::DIRECTORY;
            let next = match open_at(&dir, part, flags, Mode::empty()) {
                Ok(fd) => fd,
                Err(e) if e.kind() == io::ErrorKind::NotFound && dry_run => {
                    return Ok(Walk::Missing)
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    mkdirat(&dir, cstr(part)?.as_c_str(), DIR_MODE)?;
                    let fd = open_at(&dir, part, flags, Mode::empty())?;
                    fchmod(&fd, DIR_MODE)?;
                    fd
                }
                Err(e) => {
                    let Some(kind) = kind_at(&dir, part)? else {
                        return Err(e);
                    };
                    return Ok(Walk::Refused(format!(
                        "{} is {} on the host",
                        parts[..=i].join("/"),
                        what_is(kind)
                    )));
                }
            };
            dir = next;
        }
        Ok(Walk::At(dir))
    }

    /// Makes sure the directory `rel` exists.
    pub fn put_dir(&self, rel: &str, dry_run: bool) -> io::Result<Landed> {
        let parts: Vec<&str> = rel.split('/').collect();
        let existed = matches!(self.walk(&parts, true)?, Walk::At(_));
        if existed {
            return Ok(Landed::Unchanged);
        }
        match self.walk(&parts, dry_run)? {
            Walk::Refused(why) => Ok(Landed::Refused(why)),
            Walk::At(_) | Walk::Missing => Ok(Landed::Written),
        }
    }

    /// Puts the `size` bytes from `data` at `rel` (replacing a file there
    /// whose bytes differ), or in a dry run only compares them.
    pub fn put_file(
        &self,
        rel: &str,
        size: u64,
        data: &mut dyn Read,
        dry_run: bool,
    ) -> io::Result<Landed> {
        let parts: Vec<&str> = rel.split('/').collect();
        let Some((name, dirs)) = parts.split_last().filter(|(name, _)| plain(name)) else {
            return Ok(Landed::Refused(format!("{rel:?} is not a plain path")));
        };
        let dir = match self.walk(dirs, dry_run)? {
            Walk::At(fd) => Some(fd),
            Walk::Missing => None,
            Walk::Refused(why) => return Ok(Landed::Refused(why)),
        };
        let old = match &dir {
            Some(dir) => match kind_at(dir, name)? {
                None => None,
                Some(FileType::RegularFile) => {
                    let flags = OFlags::RDONLY | OFlags::NONBLOCK;
                    let fd = open_at(dir, name, flags, Mode::empty())?;
                    let file = File::from(fd);
                    let meta = file.metadata()?;
                    // Compare only a plain file of the same size.
                    (meta.is_file() && meta.len() == size).then_some(file)
                }
                Some(kind) => {
                    return Ok(Landed::Refused(format!(
                        "{rel} is {} on the host",
                        what_is(kind)
                    )))
                }
            },
            None => None,
        };
        let same_size = old.is_some();
        let mut compare = Compare { old, same: true };
        let temp = match (&dir, dry_run) {
            (Some(dir), false) => Some(Temp::create(dir)?),
            _ => None,
        };
        let result = copy(data, temp.as_ref().map(|t| &t.file), &mut compare);
        let (dir, temp) = match (dir, temp) {
            (Some(dir), Some(temp)) => (dir, temp),
            _ => {
                result?;
                return Ok(if same_size && compare.same {
                    Landed::Unchanged
                } else {
                    Landed::Written
                });
            }
        };
        if let Err(e) = result {
            temp.remove(&dir);
            return Err(e);
        }
        if same_size && compare.same {
            temp.remove(&dir);
            return Ok(Landed::Unchanged);
        }
        let (from, to) = (cstr(&temp.name)?, cstr(name)?);
        if let Err(e) = renameat(&dir, from.as_c_str(), &dir, to.as_c_str()) {
            temp.remove(&dir);
            return Err(e.into());
        }
        Ok(Landed::Written)
    }
}

/// Compares the bytes copied with an old file of the same size.
struct Compare {
    old: Option<File>,
    same: bool,
}

impl Compare {
    fn chunk(&mut self, bytes: &[u8]) -> io::Result<()> {
        let Some(old) = &mut self.old else {
            return Ok(());
        };
        if !self.same {
            return Ok(());
        }
        let mut theirs = vec![0u8; bytes.len()];
        match old.read_exact(&mut theirs) {
            Ok(()) => self.same = theirs == bytes,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => self.same = false,
            Err(e) => return Err(e),
        }
        Ok(())
    }
}

/// Copies `data` to `out` (if any), feeding `compare`.
fn copy(data: &mut dyn Read, out: Option<&File>, compare: &mut Compare) -> io::Result<()> {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match data.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if let Some(mut out) = out {
            out.write_all(&buf[..n])?;
        }
        compare.chunk(&buf[..n])?;
    }
}

/// A temporary file next to its destination.
struct Temp {
    file: File,
    name: String,
}

impl Temp {
    fn create(dir: &OwnedFd) -> io::Result<Temp> {
        loop {
            let seq = TEMP_SEQ.fetch_add(1, Ordering::Relaxed);
            let name = format!(".keystone-artifact.{}.{seq}", std::process::id());
            let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL;
            match open_at(dir, &name, flags, FILE_MODE) {
                Ok(fd) => {
                    let temp = Temp {
                        file: File::from(fd),
                        name,
                    };
                    // The umask may have taken bits off 0644.
                    if let Err(e) = temp.file.set_permissions(Permissions::from_mode(0o644)) {
                        temp.remove(dir);
                        return Err(e);
                    }
                    return Ok(temp);
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn remove(self, dir: &OwnedFd) {
        if let Ok(c) = cstr(&self.name) {
            let _ = unlinkat(dir, c.as_c_str(), AtFlags::empty());
        }
    }
}
