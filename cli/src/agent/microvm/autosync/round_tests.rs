//! Auto-sync rounds on real host repositories, with the fetched
//! `refs/remotes/sandbox-s/*` set by hand (no guest needed).

use std::collections::BTreeSet;

use super::super::super::super::backend::SyncOptions;
use super::super::super::super::config::SyncMode;
use super::super::super::sync::branches::HostRefs;
use super::super::super::sync::integrate;
use super::super::super::sync::testrepo::TempRepo;
use super::super::Target;
use super::{fast_forward, sync_round, NotSynced, Reported};

/// The supervisor log's lines of this test thread since the last call.
fn take_log() -> Vec<String> {
    crate::logging::capture::take()
}

fn set_sandbox(host: &TempRepo, branch: &str, id: &str) {
    host.git(&[
        "update-ref",
        &format!("refs/remotes/sandbox-s/{branch}"),
        id,
    ]);
}

fn has(host: &TempRepo, r: &str) -> bool {
    host.git_output(&["rev-parse", "--verify", "--quiet", r])
        .status
        .success()
}

fn ff(host: &TempRepo, branch: &str) -> Result<Option<String>, NotSynced> {
    let refs = HostRefs::read(&host.dir).unwrap();
    let current = host.git(&["branch", "--show-current"]);
    fast_forward(&host.dir, "s", branch, Some(&current), &refs)
}

#[test]
fn only_fast_forwards_of_branches_the_host_has_move_it() {
    crate::logging::capture::this_thread();
    let host = TempRepo::new("autosync-ff", true);
    let base = host.commit("a", "a", "a");
    // The sandbox is one commit ahead on main (checked out here).
    let ahead = host.commit("b", "b", "b");
    host.git(&["reset", "-q", "--hard", &base]);
    set_sandbox(&host, "main", &ahead);
    let line = ff(&host, "main").unwrap().unwrap();
    assert!(line.contains("fast-forward; 1 commit(s)"), "{line}");
    assert_eq!(host.git(&["rev-parse", "HEAD"]), ahead);
    assert!(host.path("b").exists(), "the checkout moved along");
    assert!(ff(&host, "main").unwrap().is_none());

    // A branch the host lacks is not created; one it has, not checked
    // out, moves.
    set_sandbox(&host, "feat", &ahead);
    assert!(matches!(ff(&host, "feat"), Err(NotSynced::SandboxOnly { ref tip }) if *tip == ahead));
    assert!(!has(&host, "refs/heads/feat"));
    host.git(&["branch", "feat", &base]);
    ff(&host, "feat").unwrap().unwrap();
    assert_eq!(host.git(&["rev-parse", "feat"]), ahead);

    // Diverged: nothing moves, no merge commit.
    let host_tip = host.commit("h", "h", "h");
    host.git(&["checkout", "-q", "-b", "side", &ahead]);
    let sandbox = host.commit("s", "s", "s");
    host.git(&["checkout", "-q", "main"]);
    set_sandbox(&host, "main", &sandbox);
    let err = ff(&host, "main").unwrap_err();
    assert!(
        matches!(err, NotSynced::Diverged { ref tip } if *tip == sandbox),
        "{err:?}"
    );
    assert_eq!(host.git(&["rev-parse", "HEAD"]), host_tip);
    assert_eq!(host.git(&["log", "--merges", "--oneline"]), "");
    assert!(matches!(ff(&host, "nope"), Err(NotSynced::Failed(_))));
}

#[test]
fn auto_commit_creates_no_branch_and_moves_none_under_a_refused_name() {
    crate::logging::capture::this_thread();
    let host = TempRepo::new("autosync-names", true);
    let base = host.commit("a", "a\n", "base");
    host.git(&["remote", "add", "origin", "https://example.com/r.git"]);
    host.git(&["tag", "v1"]);
    let ahead = host.commit("b", "b\n", "ahead");
    host.git(&["reset", "-q", "--hard", &base]);
    let guest_names = ["main", "origin/main", "feature", "v1", "tags/v2"];
    for b in guest_names {
        set_sandbox(&host, b, &ahead);
    }
    let mut targets: BTreeSet<Target> = guest_names
        .iter()
        .map(|b| Target::Branch(b.to_string()))
        .collect();
    targets.insert(Target::Branch("x\u{1b}]0;owned\u{7}".into()));
    targets.insert(Target::Branch("HEAD".into()));
    targets.insert(Target::CatchUp);
    let mut reported = Reported::default();
    sync_round(
        &host.dir,
        "s",
        SyncMode::AutoCommit,
        targets.clone(),
        &mut reported,
    );
    let lines = take_log();
    let all = lines.join("\n");
    assert_eq!(host.git(&["rev-parse", "main"]), ahead, "{all}");
    for b in ["origin/main", "feature", "v1", "tags/v2", "HEAD"] {
        assert!(
            !has(&host, &format!("refs/heads/{b}")),
            "{b} was created: {all}"
        );
    }
    assert!(
        all.contains("branch feature is not on the host, and auto-sync creates no branch")
            && all.contains("`keystone agent sync s --branch feature` takes it"),
        "{all}"
    );
    assert!(all.contains("origin/main is not synced"), "{all}");
    assert!(all.contains("a tag has that name"), "{all}");
    assert!(all.contains("ignored the sandbox's branch HEAD"), "{all}");
    assert!(
        !all.contains('\u{1b}') && !all.contains('\u{7}'),
        "control characters reached the log: {all:?}"
    );

    // The same tips again: nothing new to say.
    set_sandbox(&host, "main", &ahead);
    sync_round(&host.dir, "s", SyncMode::AutoCommit, targets, &mut reported);
    let again = take_log();
    assert!(
        again
            .iter()
            .all(|l| !l.contains("feature") && !l.contains("origin/main")),
        "{again:?}"
    );

    // The user takes the sandbox-only branch by naming it.
    let opts = SyncOptions {
        branch: Some("feature".into()),
        ..SyncOptions::default()
    };
    integrate(&host.dir, "s", &opts, "refs/remotes/sandbox-s").unwrap();
    assert_eq!(host.git(&["rev-parse", "refs/heads/feature"]), ahead);
}

#[test]
fn auto_idle_fills_the_checked_out_branch_before_its_first_commit() {
    crate::logging::capture::this_thread();
    let host = TempRepo::new("autosync-unborn", true);
    let donor = TempRepo::new("autosync-unborn-donor", true);
    let tip = donor.commit("f", "from the sandbox\n", "first");
    host.git(&[
        "fetch",
        "-q",
        &donor.dir.to_string_lossy(),
        "main:refs/remotes/sandbox-s/main",
    ]);
    let mut reported = Reported::default();
    let targets = BTreeSet::from([Target::HostHead]);
    sync_round(&host.dir, "s", SyncMode::AutoIdle, targets, &mut reported);
    let all = take_log().join("\n");
    assert_eq!(host.git(&["rev-parse", "HEAD"]), tip, "{all}");
    assert_eq!(
        std::fs::read_to_string(host.path("f")).unwrap(),
        "from the sandbox\n"
    );
    assert_eq!(host.git(&["status", "--porcelain"]), "");
}
