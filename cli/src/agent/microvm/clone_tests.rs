//! The sandbox clone holds what the shared refs reach and nothing else:
//! checked with real git on host repositories (no guest needed, the clone
//! is made on the host).

use std::collections::BTreeSet;
use std::path::Path;

use super::super::sync::testrepo::{git_in, TempRepo};
use super::{private_clone, SANDBOX_ORIGIN};

const SECRETS: [&str; 5] = [
    "reset-away-8c1f",
    "stashed-env-4b2e",
    "dangling-blob-77d0",
    "note-text-19aa",
    "upstream-only-5e3c",
];
const TOKEN: &str = "ghp_tok3nSECRET";

/// Every object id in the repository at `dir`.
fn all_objects(dir: &Path) -> BTreeSet<String> {
    let out = git_in(
        dir,
        &[
            "cat-file",
            "--batch-all-objects",
            "--batch-check=%(objectname)",
        ],
    );
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// Every file under `dir`, recursively, with its bytes.
fn files_under(dir: &Path, out: &mut Vec<(String, Vec<u8>)>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let p = entry.path();
        if p.is_dir() {
            files_under(&p, out);
        } else if let Ok(bytes) = std::fs::read(&p) {
            out.push((p.display().to_string(), bytes));
        }
    }
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// A host repository with branches and a tag to share, and, not to share:
/// a commit reset away, a stash of an untracked `.env.local`, a dangling
/// blob, a note, a remote-tracking branch of another remote, and an
/// `origin` URL with a token in it. Returns the ids that must not reach
/// the sandbox.
fn host_with_secrets(host: &TempRepo) -> Vec<String> {
    host.commit("README", "hello\n", "base");
    host.git(&["tag", "-a", "v1", "-m", "release"]);
    host.git(&["checkout", "-q", "-b", "feature"]);
    host.commit("feature.txt", "feature\n", "feature work");
    host.git(&["checkout", "-q", "main"]);
    let mut hidden = Vec::new();

    let reset_away = host.commit("secret.txt", SECRETS[0], "oops");
    hidden.push(reset_away.clone());
    hidden.push(host.git(&["rev-parse", &format!("{reset_away}:secret.txt")]));
    host.git(&["reset", "-q", "--hard", "HEAD~1"]);

    std::fs::write(host.path(".env.local"), SECRETS[1]).unwrap();
    host.git(&["stash", "push", "-q", "--include-untracked"]);
    hidden.push(host.git(&["rev-parse", "refs/stash"]));
    hidden.push(host.git(&["rev-parse", "refs/stash^3:.env.local"]));

    std::fs::write(host.path("blob"), SECRETS[2]).unwrap();
    hidden.push(host.git(&["hash-object", "-w", "blob"]));
    std::fs::remove_file(host.path("blob")).unwrap();

    host.git(&["notes", "add", "-m", SECRETS[3], "HEAD"]);
    hidden.push(host.git(&["rev-parse", "refs/notes/commits"]));

    host.git(&["checkout", "-q", "-b", "tmp"]);
    let upstream = host.commit("up.txt", SECRETS[4], "upstream");
    host.git(&["checkout", "-q", "main"]);
    host.git(&["branch", "-q", "-D", "tmp"]);
    host.git(&["update-ref", "refs/remotes/upstream/x", &upstream]);
    hidden.push(upstream);

    host.git(&[
        "remote",
        "add",
        "origin",
        &format!("https://user:{TOKEN}@example.com/r.git"),
    ]);
    hidden
}

#[test]
fn the_clone_holds_what_branches_tags_and_head_reach_and_nothing_else() {
    let host = TempRepo::new("clone-host", true);
    let hidden = host_with_secrets(&host);
    let sandbox = TempRepo::new("clone-sandbox", false);
    let dest = sandbox.path("workspace");
    private_clone(&host.dir, &dest).unwrap();

    // None of the objects the shared refs do not reach is there.
    for id in &hidden {
        let out = git_in(&dest, &["cat-file", "-e", id]);
        assert!(!out.status.success(), "{id} reached the sandbox");
    }
    // The property: exactly the objects the shared refs reach.
    let listed = host.git(&["rev-list", "--objects", "--branches", "--tags", "HEAD"]);
    let reachable: BTreeSet<String> = listed
        .lines()
        .filter_map(|l| l.split(' ').next())
        .map(str::to_string)
        .collect();
    let tags = host.git(&["for-each-ref", "--format=%(objectname)", "refs/tags"]);
    let reachable: BTreeSet<String> = reachable
        .into_iter()
        .chain(tags.lines().map(str::to_string))
        .collect();
    assert_eq!(all_objects(&dest), reachable);

    // No secret nor the token, neither in any file under the clone (its
    // config, refs, logs) nor in any object once inflated.
    let mut files = Vec::new();
    files_under(&dest, &mut files);
    let dump = git_in(&dest, &["cat-file", "--batch-all-objects", "--batch"]);
    files.push(("the inflated objects".into(), dump.stdout));
    for needle in SECRETS.iter().chain([&TOKEN, &"example.com"]) {
        for (name, bytes) in &files {
            assert!(!contains(bytes, needle), "{needle:?} is in {name}");
        }
    }
    let clone = |args: &[&str]| {
        let out = git_in(&dest, args);
        assert!(out.status.success(), "git {args:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(clone(&["remote", "get-url", "origin"]), SANDBOX_ORIGIN);

    // What is shared is all there, checked out as on the host.
    assert_eq!(clone(&["branch", "--show-current"]), "main");
    assert_eq!(
        clone(&["rev-parse", "origin/feature"]),
        host.git(&["rev-parse", "feature"])
    );
    assert_eq!(
        clone(&["rev-parse", "v1^{commit}"]),
        host.git(&["rev-parse", "v1^{commit}"])
    );
    assert_eq!(
        std::fs::read_to_string(dest.join("README")).unwrap(),
        "hello\n"
    );
    assert!(!dest.join(".env.local").exists());
    let refs = clone(&["for-each-ref", "--format=%(refname)"]);
    assert!(
        refs.lines().all(|r| r.starts_with("refs/heads/")
            || r.starts_with("refs/remotes/origin/")
            || r.starts_with("refs/tags/")),
        "{refs}"
    );
    let exclude = std::fs::read_to_string(dest.join(".git/info/exclude")).unwrap();
    assert!(exclude.lines().any(|l| l == "/.worktrees/"), "{exclude}");
}

#[test]
fn a_detached_head_is_checked_out_and_an_empty_repository_clones() {
    let host = TempRepo::new("clone-detached", true);
    host.commit("a", "a\n", "a");
    host.git(&["checkout", "-q", "--detach"]);
    let detached = host.commit("b", "b\n", "on no branch");
    let sandbox = TempRepo::new("clone-detached-sandbox", false);
    let dest = sandbox.path("workspace");
    private_clone(&host.dir, &dest).unwrap();
    let out = git_in(&dest, &["rev-parse", "HEAD"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), detached);
    assert_eq!(std::fs::read_to_string(dest.join("b")).unwrap(), "b\n");

    let empty = TempRepo::new("clone-empty", true);
    let dest = sandbox.path("empty");
    private_clone(&empty.dir, &dest).unwrap();
    assert!(dest.join(".git").is_dir());
    assert!(all_objects(&dest).is_empty());
}
