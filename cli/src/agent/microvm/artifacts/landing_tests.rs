//! Host-side tests of where `sync --artifacts` writes: the staging folder
//! by default, in place only under listed paths, as mode 0644, never
//! through a symbolic link, never outside the tree, and only what the
//! listing allowed.

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};

use super::landing::{Landed, Tree};
use super::policy::Policy;
use super::tarcheck::Limits;
use super::testkit::{mode, refused, Ar, Fixture};
use super::{Receiver, STAGING};

#[test]
fn files_land_in_staging_as_0644_and_nothing_in_the_project() {
    let f = Fixture::new("staging");
    let archive = Ar::default()
        .file("build/out.bin", b"\x7fELF binary")
        .entry("build", b'5', b"", "")
        .file("node_modules/.bin/tsc", b"#!/bin/sh\necho guest\n")
        .end();
    let listed = ["build/out.bin", "build", "node_modules/.bin/tsc"];
    let (result, outcome) = f.receive(&archive, &[], &listed, false, &Limits::default());
    result.unwrap();
    assert_eq!(outcome.staged, ["build/out.bin", "node_modules/.bin/tsc"]);
    assert!(outcome.refused.is_empty(), "{:?}", outcome.refused);
    assert_eq!(
        fs::read(f.staged("build/out.bin")).unwrap(),
        b"\x7fELF binary"
    );
    for rel in ["build/out.bin", "node_modules/.bin/tsc"] {
        assert_eq!(mode(&f.staged(rel)), 0o644, "{rel} (sent as 04755)");
    }
    assert_eq!(mode(&f.staged("node_modules/.bin")), 0o755);
    assert!(!f.project.join("build").exists());
    assert!(!f.project.join("node_modules").exists());
}

#[test]
fn a_listed_path_behind_a_symlink_is_never_written_through() {
    let f = Fixture::new("symlink");
    let outside = f.root.join("outside");
    fs::create_dir_all(&outside).unwrap();
    fs::write(outside.join("victim"), "host\n").unwrap();
    symlink(&outside, f.project.join("build")).unwrap();
    fs::create_dir_all(f.project.join("dist")).unwrap();
    symlink(outside.join("victim"), f.project.join("dist/app.js")).unwrap();
    let archive = Ar::default()
        .file("build/x", b"guest")
        .file("build/victim", b"guest")
        .file("dist/app.js", b"guest")
        .end();
    let listed = ["build/x", "build/victim", "dist/app.js"];
    let (result, outcome) = f.receive(
        &archive,
        &["build", "dist"],
        &listed,
        false,
        &Limits::default(),
    );
    result.unwrap();
    assert!(
        outcome.in_place.is_empty() && outcome.staged.is_empty(),
        "{outcome:?}"
    );
    assert!(refused(&outcome, "build/x")[0].starts_with("build is a symbolic link on the host"));
    assert!(refused(&outcome, "dist/app.js")[0]
        .starts_with("dist/app.js is a symbolic link on the host"));
    assert_eq!(fs::read_dir(&outside).unwrap().count(), 1);
    assert_eq!(
        fs::read_to_string(outside.join("victim")).unwrap(),
        "host\n"
    );
}

#[test]
fn in_place_only_under_listed_paths_as_0644_and_unchanged_files_stay() {
    let f = Fixture::new("inplace");
    fs::write(f.project.join("notes.txt"), "the host's\n").unwrap();
    fs::create_dir_all(f.project.join("dist")).unwrap();
    fs::write(f.project.join("dist/app.js"), "old\n").unwrap();
    fs::set_permissions(
        f.project.join("dist/app.js"),
        fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let archive = Ar::default()
        .file("notes.txt", b"the guest's\n")
        .file("dist/app.js", b"new\n")
        .file("dist/sub/run.sh", b"#!/bin/sh\n")
        .end();
    let listed = ["notes.txt", "dist/app.js", "dist/sub/run.sh"];
    let (result, outcome) = f.receive(&archive, &["dist"], &listed, true, &Limits::default());
    result.unwrap();
    assert_eq!(
        (outcome.staged.len(), outcome.in_place.len()),
        (1, 2),
        "dry run lists"
    );
    assert_eq!(
        fs::read_to_string(f.project.join("dist/app.js")).unwrap(),
        "old\n"
    );
    assert!(!f.sandbox.join(STAGING).exists() && !f.project.join("dist/sub").exists());

    let (result, outcome) = f.receive(&archive, &["dist"], &listed, false, &Limits::default());
    result.unwrap();
    assert_eq!(outcome.in_place, ["dist/app.js", "dist/sub/run.sh"]);
    assert_eq!(outcome.staged, ["notes.txt"]);
    assert_eq!(
        fs::read_to_string(f.project.join("notes.txt")).unwrap(),
        "the host's\n"
    );
    assert_eq!(
        fs::read_to_string(f.staged("notes.txt")).unwrap(),
        "the guest's\n"
    );
    assert_eq!(
        fs::read_to_string(f.project.join("dist/app.js")).unwrap(),
        "new\n"
    );
    assert_eq!(mode(&f.project.join("dist/app.js")), 0o644);
    assert_eq!(mode(&f.project.join("dist/sub/run.sh")), 0o644);

    let (result, outcome) = f.receive(&archive, &["dist"], &listed, false, &Limits::default());
    result.unwrap();
    assert!(
        !outcome.changed(),
        "the same bytes again move nothing: {outcome:?}"
    );
}

#[test]
fn the_listing_is_judged_before_anything_is_asked_for() {
    let f = Fixture::new("listing");
    let mut policy = Policy::new(vec!["dist".into()], vec![".husky".into()]);
    policy.add_tracked(b"README\0src/main.rs\0");
    let project = Tree::open(&f.project).unwrap();
    let staging = Tree::open(&f.sandbox)
        .unwrap()
        .subtree(STAGING, true)
        .unwrap();
    let mut r = Receiver::new(&policy, &staging, &project, true);
    let listing = b".env\0.envrc\0.worktrees/main/\0README\0sub/.env.local\0vendor/lib/\0bad\nname\0dist/a\0b\0";
    let asked = r.ask(listing, &Limits::default()).unwrap();
    assert_eq!(asked, ["dist/a", "b"]);
    assert_eq!(
        r.outcome.refused,
        [
            "sub/.env.local: a .env file: these never come to the host",
            "vendor/lib/: a nested git repository",
            "bad\\u{a}name: bad name: holds a control character",
        ]
    );
}

#[test]
fn the_writer_itself_never_leaves_its_tree() {
    let f = Fixture::new("escape");
    let tree = Tree::open(&f.project).unwrap();
    for rel in ["../x", "a/../../x", "./x", "a//x", "", "x/.."] {
        let landed = tree.put_file(rel, 1, &mut &b"x"[..], false).unwrap();
        assert!(matches!(landed, Landed::Refused(_)), "{rel}: {landed:?}");
        let landed = tree.put_dir(rel, false).unwrap();
        assert!(matches!(landed, Landed::Refused(_)), "{rel}: {landed:?}");
    }
    assert!(!f.root.join("x").exists() && !f.project.join("x").exists());
}
