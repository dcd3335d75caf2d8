//! `FsStats`: per-opcode request counters and the record of which files had
//! a READ served, shared between the server and its embedder.
//!
//! Counters are relaxed atomics (cheap on the request path). The read-path
//! record keeps the first [`MAX_PATHS_READ`] distinct paths, relative to the
//! shared directory; an integration test uses it to prove that the guest
//! kernel read `/init` through this daemon.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use crate::fuse::opcode;

/// How many distinct read paths are remembered.
pub const MAX_PATHS_READ: usize = 1024;

#[derive(Default)]
struct ReadRecord {
    inodes_seen: HashSet<u64>,
    paths: Vec<PathBuf>,
    path_set: HashSet<PathBuf>,
}

/// Request counters of one daemon.
pub struct FsStats {
    counts: [AtomicU64; opcode::MAX as usize],
    unknown: AtomicU64,
    errors: AtomicU64,
    read_record_full: AtomicBool,
    reads: Mutex<ReadRecord>,
}

impl Default for FsStats {
    fn default() -> Self {
        FsStats {
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            unknown: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            read_record_full: AtomicBool::new(false),
            reads: Mutex::new(ReadRecord::default()),
        }
    }
}

impl FsStats {
    /// New, zeroed counters.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many requests with this opcode were received.
    pub fn count(&self, opcode: u32) -> u64 {
        self.counts
            .get(opcode as usize)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// Requests whose opcode was out of range.
    pub fn unknown_count(&self) -> u64 {
        self.unknown.load(Ordering::Relaxed)
    }

    /// Requests answered with an error.
    pub fn error_count(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    /// The distinct files (relative to the shared directory) that had a READ
    /// served, in first-read order, at most [`MAX_PATHS_READ`].
    pub fn paths_read(&self) -> Vec<PathBuf> {
        match self.reads.lock() {
            Ok(r) => r.paths.clone(),
            Err(p) => p.into_inner().paths.clone(),
        }
    }

    pub(crate) fn record_request(&self, opcode: u32) {
        match self.counts.get(opcode as usize) {
            Some(c) => c.fetch_add(1, Ordering::Relaxed),
            None => self.unknown.fetch_add(1, Ordering::Relaxed),
        };
    }

    pub(crate) fn record_error(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
    }

    /// Remembers that `inode` was read; `path` is asked for only the first
    /// time an inode is seen, and not at all once the record is full.
    pub(crate) fn record_read(&self, inode: u64, path: impl FnOnce() -> Option<PathBuf>) {
        if self.read_record_full.load(Ordering::Relaxed) {
            return;
        }
        let Ok(mut rec) = self.reads.lock() else {
            return;
        };
        if !rec.inodes_seen.insert(inode) {
            return;
        }
        if let Some(p) = path() {
            if rec.path_set.insert(p.clone()) {
                rec.paths.push(p);
            }
        }
        if rec.paths.len() >= MAX_PATHS_READ || rec.inodes_seen.len() >= 64 * MAX_PATHS_READ {
            self.read_record_full.store(true, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_paths() {
        let s = FsStats::new();
        s.record_request(opcode::READ);
        s.record_request(opcode::READ);
        s.record_request(9999);
        assert_eq!(s.count(opcode::READ), 2);
        assert_eq!(s.count(9999), 0);
        assert_eq!(s.unknown_count(), 1);
        s.record_read(5, || Some(PathBuf::from("init")));
        s.record_read(5, || panic!("asked twice"));
        assert_eq!(s.paths_read(), vec![PathBuf::from("init")]);
    }
}
