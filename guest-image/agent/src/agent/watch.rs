//! `Watch` (protocol 1.1): inotify over the workspace, reported to the host
//! on the connection the host opened and keeps open.
//!
//! - Every directory under the watched paths gets an inotify watch
//!   (recursively, never following symbolic links, skipping
//!   `.git/objects`, whose churn says nothing a ref change does not); a
//!   directory created later is added (and walked, since files may appear
//!   in it before its watch exists).
//! - A watched path holding a `.git` directory is a repository: a loose
//!   ref under `.git/refs/heads/` renamed into place (git writes
//!   `<ref>.lock`, then renames it) or rewritten is read, and a new value
//!   becomes [`WatchEvent::Commit`]. Commits in worktrees under
//!   `/workspace/.worktrees/` move the same refs. A detached HEAD has no
//!   branch and reports nothing.
//! - Any event is a change; with `idle_ms > 0`, [`WatchEvent::Idle`]
//!   follows once no change arrived for `idle_ms` after the last one.
//!
//! The watch ends when the host closes the connection (a reader thread
//! notices end of stream) or a write to it fails.

use std::collections::HashMap;
use std::ffi::{CString, OsStr, OsString};
use std::io::{self, BufReader};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::AgentConfig;
use crate::protocol::{
    read_frame, write_frame, write_raw, Frame, FrameKind, ProtocolError, Response, WatchEvent,
};
use crate::transport::DuplexStream;

/// How often the loop looks at the host connection's state at least.
const TICK: Duration = Duration::from_millis(200);
/// What each directory watch reports.
const MASK: u32 = libc::IN_CREATE
    | libc::IN_DELETE
    | libc::IN_MODIFY
    | libc::IN_CLOSE_WRITE
    | libc::IN_MOVED_FROM
    | libc::IN_MOVED_TO
    | libc::IN_DELETE_SELF
    | libc::IN_MOVE_SELF;

/// One inotify event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawEvent {
    pub wd: i32,
    pub mask: u32,
    pub name: OsString,
}

/// Decodes a buffer of `struct inotify_event` records (wd i32, mask u32,
/// cookie u32, len u32, then `len` bytes of NUL-padded name); a truncated
/// tail is dropped.
pub fn parse_events(buf: &[u8]) -> Vec<RawEvent> {
    let mut out = Vec::new();
    let mut at = 0;
    let word = |b: &[u8], i: usize| [b[i], b[i + 1], b[i + 2], b[i + 3]];
    while at + 16 <= buf.len() {
        let wd = i32::from_ne_bytes(word(buf, at));
        let mask = u32::from_ne_bytes(word(buf, at + 4));
        let len = u32::from_ne_bytes(word(buf, at + 12)) as usize;
        let Some(raw) = buf.get(at + 16..at + 16 + len) else {
            break;
        };
        let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
        out.push(RawEvent {
            wd,
            mask,
            name: OsString::from_vec(raw[..end].to_vec()),
        });
        at += 16 + len;
    }
    out
}

/// An inotify instance (non-blocking, close-on-exec).
struct Inotify(OwnedFd);

impl Inotify {
    fn new() -> io::Result<Self> {
        // SAFETY: plain inotify_init1(2); the result is checked.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor nobody else owns.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Watches one directory (not following a symbolic link).
    fn add(&self, dir: &Path) -> io::Result<i32> {
        let c = CString::new(dir.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a path"))?;
        // SAFETY: c is a valid NUL-terminated path; the fd is ours.
        let wd = unsafe {
            libc::inotify_add_watch(
                self.0.as_raw_fd(),
                c.as_ptr(),
                MASK | libc::IN_ONLYDIR | libc::IN_DONT_FOLLOW,
            )
        };
        if wd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(wd)
    }

    /// Waits up to `timeout` for events; true when some are ready.
    fn wait(&self, timeout: Duration) -> io::Result<bool> {
        let mut pfd = libc::pollfd {
            fd: self.0.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
        // SAFETY: one valid pollfd, count 1.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(false)
            } else {
                Err(e)
            };
        }
        Ok(n > 0)
    }

    /// Reads every queued event.
    fn drain(&self) -> io::Result<Vec<RawEvent>> {
        let mut events = Vec::new();
        let mut buf = vec![0u8; 64 << 10];
        loop {
            // SAFETY: reads into a valid buffer of the given length.
            let n = unsafe { libc::read(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::WouldBlock => return Ok(events),
                    io::ErrorKind::Interrupted => continue,
                    _ => return Err(e),
                }
            }
            if n == 0 {
                return Ok(events);
            }
            events.extend(parse_events(&buf[..n as usize]));
        }
    }
}

/// True for a directory the watch skips: `.git/objects`.
pub fn excluded(dir: &Path) -> bool {
    dir.file_name() == Some(OsStr::new("objects"))
        && dir.parent().and_then(Path::file_name) == Some(OsStr::new(".git"))
}

/// The commit id a loose ref file holds, if it holds one.
fn read_ref(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let id = text.trim();
    let hex = id.bytes().all(|b| b.is_ascii_hexdigit());
    (hex && (id.len() == 40 || id.len() == 64)).then(|| id.to_string())
}

/// A repository whose branch refs are reported.
struct Repo {
    /// `<worktree>/.git/refs/heads`.
    heads: PathBuf,
    /// Branch name -> last commit reported (or found at the start).
    known: HashMap<String, String>,
}

impl Repo {
    fn new(heads: PathBuf) -> Self {
        let mut repo = Self {
            heads,
            known: HashMap::new(),
        };
        repo.rescan();
        repo
    }

    fn branch_of(&self, path: &Path) -> Option<String> {
        let rel = path.strip_prefix(&self.heads).ok()?;
        let name = rel.to_str()?;
        (!name.is_empty() && !name.ends_with(".lock")).then(|| name.to_string())
    }

    /// Looks at one ref file; a new value is a commit event.
    fn check(&mut self, path: &Path) -> Option<WatchEvent> {
        let branch = self.branch_of(path)?;
        let Some(head) = read_ref(path) else {
            if !path.exists() {
                self.known.remove(&branch);
            }
            return None;
        };
        if self.known.get(&branch) == Some(&head) {
            return None;
        }
        self.known.insert(branch.clone(), head.clone());
        Some(WatchEvent::Commit { branch, head })
    }

    /// Reads every loose ref; returns the ones that moved.
    fn rescan(&mut self) -> Vec<WatchEvent> {
        let mut events = Vec::new();
        let mut stack = vec![self.heads.clone()];
        while let Some(dir) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                match entry.file_type() {
                    Ok(t) if t.is_dir() => stack.push(path),
                    Ok(t) if t.is_file() => events.extend(self.check(&path)),
                    _ => {}
                }
            }
        }
        events
    }
}

/// The inotify watches and what they mean.
struct Watcher {
    inotify: Inotify,
    dirs: HashMap<i32, PathBuf>,
    repos: Vec<Repo>,
    limit_warned: bool,
}

impl Watcher {
    fn new(roots: &[PathBuf]) -> io::Result<Self> {
        let mut w = Self {
            inotify: Inotify::new()?,
            dirs: HashMap::new(),
            repos: Vec::new(),
            limit_warned: false,
        };
        for root in roots {
            let git = root.join(".git");
            if git.is_dir() {
                w.repos.push(Repo::new(git.join("refs").join("heads")));
            }
            w.add_tree(root);
        }
        Ok(w)
    }

    /// Watches `root` and every directory below it.
    fn add_tree(&mut self, root: &Path) {
        let mut stack = vec![root.to_path_buf()];
        while let Some(dir) = stack.pop() {
            if excluded(&dir) {
                continue;
            }
            match self.inotify.add(&dir) {
                Ok(wd) => {
                    self.dirs.insert(wd, dir.clone());
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {
                    if !self.limit_warned {
                        log::warn!(
                            "watch: inotify watch limit reached at {} (raise \
                             fs.inotify.max_user_watches): changes below unwatched \
                             directories go unnoticed",
                            dir.display()
                        );
                        self.limit_warned = true;
                    }
                    continue;
                }
                // Gone already, or not a directory after all.
                Err(_) => continue,
            }
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                // DirEntry::file_type does not follow symbolic links.
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(entry.path());
                }
            }
        }
    }

    /// Handles a batch of events: true when anything changed, plus the
    /// commits seen.
    fn handle(&mut self, events: Vec<RawEvent>) -> (bool, Vec<WatchEvent>) {
        let mut changed = false;
        let mut commits = Vec::new();
        for ev in events {
            if ev.mask & libc::IN_Q_OVERFLOW != 0 {
                // Events were lost: the refs tell what a commit did.
                changed = true;
                for repo in &mut self.repos {
                    commits.extend(repo.rescan());
                }
                continue;
            }
            if ev.mask & libc::IN_IGNORED != 0 {
                self.dirs.remove(&ev.wd);
                continue;
            }
            let Some(dir) = self.dirs.get(&ev.wd).cloned() else {
                continue;
            };
            changed = true;
            let path = if ev.name.is_empty() {
                dir.clone()
            } else {
                dir.join(&ev.name)
            };
            let is_dir = ev.mask & libc::IN_ISDIR != 0;
            let arrived = ev.mask & (libc::IN_CREATE | libc::IN_MOVED_TO) != 0;
            if is_dir && arrived {
                self.add_tree(&path);
            }
            for repo in &mut self.repos {
                if !dir.starts_with(&repo.heads) {
                    continue;
                }
                if is_dir && arrived {
                    // A new `refs/heads/feat/` may hold refs already.
                    commits.extend(repo.rescan());
                } else if !is_dir {
                    commits.extend(repo.check(&path));
                }
            }
        }
        (changed, commits)
    }
}

/// The watched roots: `paths` resolved against the workspace (the
/// workspace itself when empty); each must be a directory.
fn roots(paths: &[String], config: &AgentConfig) -> Result<Vec<PathBuf>, String> {
    if paths.is_empty() {
        return Ok(vec![config.workspace_root.clone()]);
    }
    let mut out = Vec::new();
    for p in paths {
        let path = config.workspace_root.join(p);
        if !path.is_dir() {
            return Err(format!("cannot watch {p:?}: not a directory in the guest"));
        }
        out.push(path);
    }
    Ok(out)
}

/// Serves a `Watch` request until the host closes the connection.
pub fn run_watch(
    mut reader: BufReader<Box<dyn DuplexStream>>,
    mut writer: Box<dyn DuplexStream>,
    paths: &[String],
    idle_ms: u64,
    config: &AgentConfig,
) -> Result<(), ProtocolError> {
    let roots = match roots(paths, config) {
        Ok(r) => r,
        Err(msg) => return write_raw(&mut writer, FrameKind::Error, msg.as_bytes()),
    };
    let mut watcher = match Watcher::new(&roots) {
        Ok(w) => w,
        Err(e) => {
            let msg = format!("cannot watch: inotify: {e}");
            return write_raw(&mut writer, FrameKind::Error, msg.as_bytes());
        }
    };
    log::info!(
        "watch: {} directories under {roots:?}, {} repositories, idle {idle_ms} ms",
        watcher.dirs.len(),
        watcher.repos.len()
    );
    write_frame(
        &mut writer,
        &Frame::json(
            FrameKind::Response,
            &Response::Watching {
                directories: watcher.dirs.len() as u64,
            },
        ),
    )?;

    // The host sends nothing more; end of stream means it is done.
    let closed = Arc::new(AtomicBool::new(false));
    {
        let closed = Arc::clone(&closed);
        std::thread::spawn(move || {
            while let Ok(Some(_)) = read_frame(&mut reader) {}
            closed.store(true, Ordering::SeqCst);
        });
    }

    let idle = (idle_ms > 0).then(|| Duration::from_millis(idle_ms));
    let mut last_change: Option<Instant> = None;
    while !closed.load(Ordering::SeqCst) {
        let timeout = match (idle, last_change) {
            (Some(d), Some(t)) => d.saturating_sub(t.elapsed()).min(TICK),
            _ => TICK,
        };
        if watcher.inotify.wait(timeout)? {
            let (changed, commits) = watcher.handle(watcher.inotify.drain()?);
            for ev in commits {
                write_frame(&mut writer, &Frame::json(FrameKind::Event, &ev))?;
            }
            if changed {
                last_change = Some(Instant::now());
            }
        }
        if let (Some(d), Some(t)) = (idle, last_change) {
            if t.elapsed() >= d {
                write_frame(
                    &mut writer,
                    &Frame::json(FrameKind::Event, &WatchEvent::Idle),
                )?;
                last_change = None;
            }
        }
    }
    let _ = writer.shutdown_both();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(wd: i32, mask: u32, name: &[u8], len: usize) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&wd.to_ne_bytes());
        v.extend_from_slice(&mask.to_ne_bytes());
        v.extend_from_slice(&0u32.to_ne_bytes());
        v.extend_from_slice(&(len as u32).to_ne_bytes());
        let mut n = name.to_vec();
        n.resize(len, 0);
        v.extend_from_slice(&n);
        v
    }

    #[test]
    fn inotify_records_parse_and_truncation_is_dropped() {
        let mut buf = record(3, libc::IN_MOVED_TO, b"main", 16);
        buf.extend(record(4, libc::IN_IGNORED, b"", 0));
        let evs = parse_events(&buf);
        assert_eq!(evs.len(), 2);
        assert_eq!(evs[0].wd, 3);
        assert_eq!(evs[0].name, OsString::from("main"));
        assert_eq!(evs[1].mask, libc::IN_IGNORED);
        // A record whose name runs past the end is not read.
        let mut short = record(5, libc::IN_CREATE, b"x", 16);
        short.truncate(20);
        assert!(parse_events(&short).is_empty());
        assert!(parse_events(&[1, 2, 3]).is_empty());
    }

    #[test]
    fn only_git_objects_is_excluded() {
        assert!(excluded(Path::new("/workspace/.git/objects")));
        assert!(!excluded(Path::new("/workspace/objects")));
        assert!(!excluded(Path::new("/workspace/.git/refs")));
    }
}
