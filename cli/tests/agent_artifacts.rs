//! `keystone agent sync --artifacts` on a real guest (engine qemu): files
//! git does not track in the sandbox (an ignored build output, an
//! untracked generated file) come to the host byte for byte; tracked files
//! (a README modified in the guest, a file only staged there), the `.env`
//! the host pushed, and a link out of the tree stay where they are;
//! `--dry-run` lists the files and changes nothing; without rsync on the
//! host the command exits 4.
//!
//! Skips (printing `SKIP: <reason>`) without /dev/kvm, qemu-system-x86_64
//! or a guest kernel and rootfs.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

/// A folder whose only program is git: a PATH without rsync.
fn path_without_rsync(env: &Env) -> std::path::PathBuf {
    let out = Command::new("sh")
        .args(["-c", "command -v git"])
        .output()
        .unwrap();
    let git = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let bin = env.path("bin-no-rsync");
    std::fs::create_dir_all(&bin).unwrap();
    std::os::unix::fs::symlink(git, bin.join("git")).unwrap();
    bin
}

#[test]
fn artifacts_come_to_the_host_and_tracked_files_do_not() {
    let _one = ONE_GUEST_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let Some(env) = setup("artifacts", "arts") else {
        return;
    };
    if Command::new("rsync").arg("--version").output().is_err() {
        eprintln!("SKIP: no rsync on the host (apt-get install rsync)");
        return;
    }
    let repo = env.path("proj");
    std::fs::write(repo.join(".gitignore"), "build/\n").unwrap();
    git(&repo, &["add", ".gitignore"]);
    let mut commit = COMMIT.to_vec();
    commit.extend(["-qm", "ignore build"]);
    git(&repo, &commit);

    env.start(&repo, &[]);

    // In the guest: an ignored build output, an untracked generated file,
    // a changed tracked README, a staged new file, a changed .env and a
    // link that points out of the tree.
    let out = env.run(
        &[
            "exec",
            "--",
            "sh",
            "-c",
            "set -e; mkdir -p build dist; head -c 70000 /dev/urandom > build/out.bin; \
             echo app > dist/app.txt; echo changed in the guest > README; \
             echo staged > staged.txt; git add staged.txt; echo TOKEN=guest > .env; \
             ln -s /etc/passwd dist/escape",
        ],
        &repo,
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let before = host_snapshot(&repo);

    // Without rsync on the host: exit 4, "install rsync".
    let out = env
        .command(&["sync", "--artifacts"], &repo)
        .env("PATH", path_without_rsync(&env))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    assert!(stderr(&out).contains("install rsync"), "{}", text(&out));

    // --dry-run lists the two files and changes nothing.
    let out = env.run(&["sync", "--artifacts", "--dry-run"], &repo);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let listed = stdout(&out);
    assert!(
        listed.contains("would sync artifact build/out.bin\n"),
        "{}",
        text(&out)
    );
    assert!(
        listed.contains("would sync artifact dist/app.txt\n"),
        "{}",
        text(&out)
    );
    assert!(
        listed.contains("artifacts: 2 file(s), 70004 bytes would be copied"),
        "{}",
        text(&out)
    );
    for never in ["README", "staged.txt", ".env", "escape", ".git"] {
        assert!(!listed.contains(never), "{never}: {}", text(&out));
    }
    assert_eq!(host_snapshot(&repo), before);
    assert!(!repo.join("build").exists());
    assert!(!repo.join("dist").exists());

    // The real thing.
    let out = env.run(&["sync", "--artifacts"], &repo);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        stdout(&out).contains("artifacts: 2 file(s), 70004 bytes copied"),
        "{}",
        text(&out)
    );
    for rel in ["build/out.bin", "dist/app.txt"] {
        let guest = env.run(&["exec", "--", "cat", rel], &repo);
        assert_eq!(guest.status.code(), Some(0), "{}", text(&guest));
        let host = std::fs::read(repo.join(rel)).unwrap();
        assert!(host == guest.stdout, "{rel} differs from the guest's");
    }
    assert_eq!(
        std::fs::read_to_string(repo.join("README")).unwrap(),
        "hello\n"
    );
    assert_eq!(
        std::fs::read_to_string(repo.join(".env")).unwrap(),
        "TOKEN=from-host\n"
    );
    assert!(!repo.join("staged.txt").exists());
    assert!(std::fs::symlink_metadata(repo.join("dist/escape")).is_err());
    assert!(!Path::new(&repo.join(".worktrees")).exists());
    // HEAD and README as they were (the commit sync adds only
    // refs/remotes/sandbox-arts/main).
    let after = host_snapshot(&repo);
    assert_eq!((&after.1, &after.3), (&before.1, &before.3));

    // Again: nothing left to move (exit 2, like a plain sync).
    let out = env.run(&["sync", "--artifacts"], &repo);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        stderr(&out).contains("no artifacts differ"),
        "{}",
        text(&out)
    );

    let out = env.run(&["stop"], &repo);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let out = env.run(&["destroy", "arts", "--force"], &repo);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
}
