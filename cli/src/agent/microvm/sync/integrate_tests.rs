//! `sync`'s integration step on real host repositories, with the fetched
//! `refs/remotes/sandbox-s/*` made by a plain fetch from a second
//! repository standing in for the sandbox (no guest needed): the filters
//! and merge drivers of the host's config never run on the sandbox's
//! content, and branches are created only when the user names them, under
//! names that pass the branch rules.

use std::path::Path;

use super::super::super::backend::{BackendError, SyncOptions};
use super::content::{attribute_drivers, configured_drivers, parse_version, ContentGit};
use super::integrate;
use super::testrepo::TempRepo;

const NS: &str = "refs/remotes/sandbox-s";

/// A host repository on `main` and a sandbox cloned from it.
fn host_and_sandbox(tag: &str) -> (TempRepo, TempRepo) {
    let host = TempRepo::new(&format!("{tag}-host"), true);
    host.commit("f", "a\nb\nc\nd\ne\n", "base");
    let sandbox = TempRepo::new(&format!("{tag}-sandbox"), false);
    host.git(&["clone", "-q", ".", &sandbox.dir.to_string_lossy()]);
    (host, sandbox)
}

/// What `keystone agent sync`'s fetch leaves: the sandbox's branches at
/// `refs/remotes/sandbox-s/*`.
fn fetch(host: &TempRepo, sandbox: &TempRepo) {
    host.git(&[
        "fetch",
        "-q",
        &sandbox.dir.to_string_lossy(),
        &format!("+refs/heads/*:{NS}/*"),
    ]);
}

/// Defines, in the host's config, filters, a merge driver and diff
/// drivers that each leave a file in `marks` when they run (and change
/// the bytes they pass on).
fn arm(host: &TempRepo, marks: &Path) {
    let m = |what: &str| format!("touch '{}/{what}'", marks.display());
    let settings = [
        (
            "filter.evil.smudge",
            format!("{}; sed s/b/SMUDGED/", m("smudge")),
        ),
        (
            "filter.evil.clean",
            format!("{}; sed s/b/CLEANED/", m("clean")),
        ),
        ("filter.evil.required", "true".into()),
        ("filter.evilp.process", format!("{}; exit 1", m("process"))),
        ("filter.evilp.required", "true".into()),
        ("merge.evil.driver", format!("{}; exit 0", m("merge"))),
        ("diff.evil.textconv", format!("{}; cat", m("textconv"))),
        ("diff.evil.command", m("diff-command")),
    ];
    for (key, value) in settings {
        host.git(&["config", key, &value]);
    }
}

fn disarm(host: &TempRepo) {
    for section in ["filter.evil", "filter.evilp", "merge.evil", "diff.evil"] {
        host.git(&["config", "--remove-section", section]);
    }
}

fn marks_left(marks: &Path) -> Vec<String> {
    std::fs::read_dir(marks)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

/// The bytes of `path` in the commit `rev`.
fn committed(repo: &TempRepo, rev: &str, path: &str) -> Vec<u8> {
    repo.git_output(&["cat-file", "blob", &format!("{rev}:{path}")])
        .stdout
}

#[test]
fn no_filter_or_merge_driver_runs_on_a_fast_forward_or_a_merge() {
    let (host, sandbox) = host_and_sandbox("sync-filters");
    let marks = TempRepo::new("sync-filters-marks", false);
    // The sandbox's commit brings the attributes that name the drivers.
    std::fs::write(
        sandbox.path(".gitattributes"),
        "* filter=evil merge=evil diff=evil\n*.p filter=evilp\nid.txt ident\n",
    )
    .unwrap();
    std::fs::write(sandbox.path("x.p"), "b in a process-filtered file\n").unwrap();
    std::fs::write(sandbox.path("id.txt"), "$Id$\n").unwrap();
    sandbox.git(&["add", ".gitattributes", "x.p", "id.txt"]);
    let tip = sandbox.commit("f", "a\nb\nc\nd\ne\nf\n", "attributes");
    fetch(&host, &sandbox);

    arm(&host, &marks.dir);
    let report = integrate(&host.dir, "s", &SyncOptions::default(), NS).unwrap();
    assert!(report.refs[0].contains("fast-forward"), "{:?}", report.refs);
    assert_eq!(marks_left(&marks.dir), Vec::<String>::new());
    assert_eq!(host.git(&["rev-parse", "HEAD"]), tip);
    // Not even the attributes that run nothing (`ident`) apply: the
    // host's, from before the sync, do.
    for path in ["f", "x.p", "id.txt", ".gitattributes"] {
        assert_eq!(
            std::fs::read(host.path(path)).unwrap(),
            committed(&host, &tip, path),
            "{path} has its committed bytes"
        );
    }
    disarm(&host);

    // Both sides change f; the attributes are now in the host's tree too.
    let theirs = sandbox.commit("f", "a\nb\nc\nd\nE\nf\n", "sandbox line 5");
    host.commit("f", "a\nb\nC\nd\ne\nf\n", "host line 3");
    fetch(&host, &sandbox);
    arm(&host, &marks.dir);
    let report = integrate(&host.dir, "s", &SyncOptions::default(), NS).unwrap();
    assert!(report.refs[0].contains("merge"), "{:?}", report.refs);
    assert_eq!(marks_left(&marks.dir), Vec::<String>::new());
    let merged = host.git(&["rev-parse", "HEAD"]);
    assert_eq!(host.git(&["rev-parse", "HEAD^2"]), theirs);
    assert_eq!(committed(&host, &merged, "f"), b"a\nb\nC\nd\nE\nf\n");
    assert_eq!(
        std::fs::read(host.path("f")).unwrap(),
        b"a\nb\nC\nd\nE\nf\n"
    );
    disarm(&host);
}

#[test]
fn a_conflict_names_the_files_and_changes_nothing() {
    let (host, sandbox) = host_and_sandbox("sync-conflict");
    sandbox.commit("f", "a\nSANDBOX\nc\nd\ne\n", "sandbox");
    let host_tip = host.commit("f", "a\nHOST\nc\nd\ne\n", "host");
    fetch(&host, &sandbox);
    let err = integrate(&host.dir, "s", &SyncOptions::default(), NS).unwrap_err();
    assert!(
        matches!(&err, BackendError::Conflict(m) if m.contains("  f\n")),
        "{err}"
    );
    assert_eq!(host.git(&["rev-parse", "HEAD"]), host_tip);
    assert_eq!(host.git(&["status", "--porcelain"]), "");
}

#[test]
fn the_drivers_to_disable_come_from_config_and_the_sandbox_attributes() {
    let (host, sandbox) = host_and_sandbox("sync-drivers");
    host.git(&["config", "filter.lfs.process", "git-lfs filter-process"]);
    host.git(&["config", "filter.a.b.smudge", "x"]);
    host.git(&["config", "merge.npm.driver", "npm-merge %A"]);
    host.git(&["config", "merge.renormalize", "true"]);
    let configured = configured_drivers(&host.dir).unwrap();
    assert!(configured.filters.contains("lfs") && configured.filters.contains("a.b"));
    assert!(configured.merges.contains("npm"));
    assert!(!configured.merges.contains("renormalize"));

    std::fs::create_dir_all(sandbox.path("deep/er")).unwrap();
    std::fs::write(
        sandbox.path("deep/er/.gitattributes"),
        "*.x filter=only-here merge=mine\n*.y merge=union filter=bad=name\n",
    )
    .unwrap();
    sandbox.git(&["add", "deep"]);
    let tip = sandbox.commit("f", "z\n", "nested attributes");
    fetch(&host, &sandbox);
    let named = attribute_drivers(&host.dir, &tip).unwrap();
    assert!(named.filters.contains("only-here"), "{named:?}");
    assert!(named.merges.contains("mine"), "{named:?}");
    assert!(!named.merges.contains("union"), "built-in drivers stay");
    assert!(!named.filters.iter().any(|n| n.contains('=')), "{named:?}");

    let content = ContentGit::new(&host.dir, &[&tip]).unwrap();
    let config = content.config();
    for want in [
        "filter.only-here.smudge=",
        "filter.lfs.process=",
        "filter.a.b.clean=",
        "filter.lfs.required=false",
    ] {
        assert!(config.iter().any(|c| c == want), "{want} in {config:?}");
    }
    assert!(config
        .iter()
        .any(|c| c.starts_with("merge.npm.driver=git merge-file")));

    host.git(&["config", "filter.x=y.smudge", "evil"]);
    assert!(ContentGit::new(&host.dir, &[&tip]).is_err());
}

#[test]
fn git_versions_parse() {
    assert_eq!(parse_version("git version 2.47.3\n"), Some((2, 47)));
    assert_eq!(
        parse_version("git version 2.39.5 (Apple Git-154)"),
        Some((2, 39))
    );
    assert_eq!(parse_version("git version 2.45.1.windows.1"), Some((2, 45)));
    assert_eq!(parse_version("nonsense"), None);
}

/// Sets `refs/remotes/sandbox-s/<branch>` to `id`.
fn set_sandbox(host: &TempRepo, branch: &str, id: &str) {
    host.git(&["update-ref", &format!("{NS}/{branch}"), id]);
}

fn named(branch: &str) -> SyncOptions {
    SyncOptions {
        branch: Some(branch.into()),
        ..SyncOptions::default()
    }
}

#[test]
fn sync_creates_a_branch_only_when_named_and_never_under_a_refused_name() {
    let host = TempRepo::new("sync-branches", true);
    let base = host.commit("f", "a\n", "base");
    host.git(&["remote", "add", "origin", "https://example.com/r.git"]);
    host.git(&["tag", "v1"]);
    let ahead = host.commit("g", "b\n", "ahead");
    host.git(&["reset", "-q", "--hard", &base]);
    for b in ["main", "feature", "origin/main", "v1", "tags/x"] {
        set_sandbox(&host, b, &ahead);
    }

    // The checked-out branch moves; the others are listed, not created.
    let report = integrate(&host.dir, "s", &SyncOptions::default(), NS).unwrap();
    assert_eq!(host.git(&["rev-parse", "main"]), ahead);
    let details = report.details.join("\n");
    assert!(
        details.contains("branch feature is not on the host")
            && details.contains("`keystone agent sync s --branch feature` takes it"),
        "{details}"
    );
    assert!(
        details.contains("origin/main is not on the host") && details.contains("cannot be"),
        "{details}"
    );
    assert!(!host
        .git_output(&["rev-parse", "--verify", "refs/heads/feature"])
        .status
        .success());
    // Nothing new on main: one line, which still names the sandbox-only
    // branch that can be taken.
    let err = integrate(&host.dir, "s", &SyncOptions::default(), NS).unwrap_err();
    let BackendError::InvalidState(msg) = err else {
        panic!("{err}");
    };
    assert!(!msg.contains('\n'), "{msg}");
    assert!(msg.contains("also has feature,"), "{msg}");
    assert!(!msg.contains("origin/main"), "{msg}");

    // The user names it: created, with no checkout.
    integrate(&host.dir, "s", &named("feature"), NS).unwrap();
    assert_eq!(host.git(&["rev-parse", "refs/heads/feature"]), ahead);
    assert_eq!(host.git(&["branch", "--show-current"]), "main");

    // Names that would hide a remote-tracking branch, a tag or a ref
    // folder are refused even when the user names them.
    for b in ["origin/main", "v1", "tags/x"] {
        let err = integrate(&host.dir, "s", &named(b), NS).unwrap_err();
        assert!(
            matches!(err, BackendError::Failed(ref m) if m.contains("is not synced")),
            "{err}"
        );
        let out = host.git_output(&["rev-parse", "--verify", &format!("refs/heads/{b}")]);
        assert!(!out.status.success(), "refs/heads/{b} was created");
    }
    let err = integrate(&host.dir, "s", &named("nope"), NS).unwrap_err();
    assert!(matches!(err, BackendError::NotFound(_)), "{err}");
}

#[test]
fn a_long_history_is_counted_whole_and_shown_in_part() {
    let host = TempRepo::new("sync-long", true);
    let base = host.commit("f", "a\n", "base");
    let tree = host.git(&["rev-parse", "HEAD^{tree}"]);
    let mut tip = base;
    for i in 0..205 {
        tip = host.git(&["commit-tree", &tree, "-p", &tip, "-m", &format!("c{i}")]);
    }
    set_sandbox(&host, "main", &tip);
    let report = integrate(&host.dir, "s", &named("main"), NS).unwrap();
    assert!(
        report.refs[0].contains("205 commit(s)"),
        "{:?}",
        report.refs
    );
    assert_eq!(report.details.len(), 201, "{:?}", report.details.last());
    assert_eq!(report.details[200], "  ... and 5 more");
}
