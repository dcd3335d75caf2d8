//! What the host-side tests of `sync --artifacts` build on: tar streams
//! built header by header (hostile ones included), and a fixture that runs
//! a stream through the same checks, policy and landing as the sandbox's,
//! into a real project folder and staging folder.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::landing::Tree;
use super::policy::Policy;
use super::tarcheck::{self, Limits, TarError};
use super::{Outcome, Receiver, STAGING};

/// A tar header block, sealed with its checksum.
pub fn header(name: &[u8], typeflag: u8, size: u64, link: &[u8]) -> [u8; 512] {
    let mut h = [0u8; 512];
    let n = name.len().min(100);
    h[..n].copy_from_slice(&name[..n]);
    h[100..108].copy_from_slice(b"0004755\0");
    h[108..116].copy_from_slice(b"0001750\0");
    h[116..124].copy_from_slice(b"0001750\0");
    h[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
    h[136..148].copy_from_slice(b"14530526562\0");
    h[156] = typeflag;
    let l = link.len().min(100);
    h[157..157 + l].copy_from_slice(&link[..l]);
    h[257..265].copy_from_slice(b"ustar\x0000");
    seal(&mut h);
    h
}

/// Writes the checksum of `h`.
pub fn seal(h: &mut [u8; 512]) {
    h[148..156].fill(b' ');
    let sum: u64 = h.iter().map(|b| u64::from(*b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
}

/// An archive built entry by entry.
#[derive(Default)]
pub struct Ar(pub Vec<u8>);

impl Ar {
    pub fn block(&mut self, h: [u8; 512], data: &[u8]) -> &mut Self {
        self.0.extend_from_slice(&h);
        self.0.extend_from_slice(data);
        self.0.resize(self.0.len().next_multiple_of(512), 0);
        self
    }
    pub fn entry(&mut self, name: &str, typeflag: u8, data: &[u8], link: &str) -> &mut Self {
        let h = header(
            name.as_bytes(),
            typeflag,
            data.len() as u64,
            link.as_bytes(),
        );
        self.block(h, data)
    }
    pub fn file(&mut self, name: &str, data: &[u8]) -> &mut Self {
        self.entry(name, b'0', data, "")
    }
    /// A pax extended header with `records` for the next entry.
    pub fn pax(&mut self, records: &[(&str, &[u8])]) -> &mut Self {
        let mut data = Vec::new();
        for (key, value) in records {
            let body = [b" ", key.as_bytes(), b"=", value, b"\n"].concat();
            let mut len = body.len() + 1;
            while format!("{len}").len() + body.len() != len {
                len += 1;
            }
            data.extend_from_slice(format!("{len}").as_bytes());
            data.extend_from_slice(&body);
        }
        self.entry("PaxHeaders/x", b'x', &data, "")
    }
    pub fn end(&mut self) -> Vec<u8> {
        let mut out = self.0.clone();
        out.extend_from_slice(&[0u8; 1024]);
        out
    }
}

/// A project folder and a sandbox folder (holding the staging folder).
pub struct Fixture {
    pub root: PathBuf,
    pub project: PathBuf,
    pub sandbox: PathBuf,
}

impl Fixture {
    pub fn new(tag: &str) -> Fixture {
        let root = std::env::temp_dir().join(format!("ks-artifacts-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let (project, sandbox) = (root.join("project"), root.join("sandbox"));
        fs::create_dir_all(project.join(".git")).unwrap();
        fs::create_dir_all(&sandbox).unwrap();
        Fixture {
            root,
            project,
            sandbox,
        }
    }

    pub fn staged(&self, rel: &str) -> PathBuf {
        self.sandbox.join(STAGING).join(rel)
    }

    /// Runs `archive` through the checks as the sandbox's answer to a
    /// listing of `listed_by_guest`, with `in_place` as `[sync] artifacts`.
    pub fn receive(
        &self,
        archive: &[u8],
        in_place: &[&str],
        listed_by_guest: &[&str],
        dry_run: bool,
        limits: &Limits,
    ) -> (Result<u64, TarError>, Outcome) {
        let policy = Policy::new(
            in_place.iter().map(|s| s.to_string()).collect(),
            vec![".husky".into(), ".githooks".into()],
        );
        let project = Tree::open(&self.project).unwrap();
        let staging = Tree::open(&self.sandbox)
            .unwrap()
            .subtree(STAGING, dry_run)
            .unwrap();
        let mut receiver = Receiver::new(&policy, &staging, &project, dry_run);
        let listing: Vec<u8> = listed_by_guest
            .iter()
            .flat_map(|p| p.bytes().chain([0]))
            .collect();
        receiver.ask(&listing, limits).unwrap();
        let deadline = Instant::now() + limits.time;
        let result = tarcheck::read_archive(&mut &archive[..], limits, deadline, &mut receiver);
        (result, receiver.outcome)
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.root);
    }
}

pub fn mode(path: &Path) -> u32 {
    fs::symlink_metadata(path).unwrap().permissions().mode() & 0o7777
}

pub fn refused<'o>(outcome: &'o Outcome, name: &str) -> Vec<&'o str> {
    let prefix = format!("{name}: ");
    outcome
        .refused
        .iter()
        .filter_map(|r| r.strip_prefix(&prefix))
        .collect()
}
