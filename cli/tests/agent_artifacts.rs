//! `keystone agent sync --artifacts` on a real guest (engine qemu): files
//! git does not track in the sandbox (an ignored build output, an
//! untracked generated file) come to the host byte for byte, into the
//! sandbox's staging folder, or in place under the path `[sync] artifacts`
//! lists, and never executable; a host file outside the listed paths is
//! never overwritten; tracked files (a README modified in the guest, a file
//! only staged there) and the `.env` the host pushed stay where they are;
//! links, a git hook and a nested `.env` are refused and reported;
//! `--dry-run` lists the files and where they would go, and changes
//! nothing.
//!
//! Skips (printing `SKIP: <reason>`) without /dev/kvm, qemu-system-x86_64
//! or a guest kernel and rootfs.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use common::*;

/// Every path under `dir` that is not a plain file of mode 0644 or a
/// folder of mode 0755.
fn not_plain(dir: &Path) -> Vec<(PathBuf, u32)> {
    let mut odd = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return odd;
    };
    for entry in entries.flatten() {
        let meta = std::fs::symlink_metadata(entry.path()).unwrap();
        let mode = meta.permissions().mode() & 0o7777;
        if meta.is_dir() && mode == 0o755 {
            odd.extend(not_plain(&entry.path()));
        } else if !(meta.is_file() && mode == 0o644) {
            odd.push((entry.path(), mode));
        }
    }
    odd
}

#[test]
fn artifacts_land_where_the_host_runs_nothing() {
    let Some(env) = setup("artifacts", "arts") else {
        return;
    };
    let repo = env.path("proj");
    std::fs::write(repo.join(".gitignore"), "build/\nnotes.txt\n").unwrap();
    git(&repo, &["add", ".gitignore"]);
    let mut commit = COMMIT.to_vec();
    commit.extend(["-qm", "ignore build"]);
    git(&repo, &commit);
    // The host's hooks run from .husky/_ (as husky sets it up).
    git(&repo, &["config", "core.hooksPath", ".husky/_"]);
    let config = env.path("config/keystone/agent.toml");
    let mut toml = std::fs::read_to_string(&config).unwrap();
    toml.push_str("\n[sync]\nartifacts = [\"dist\"]\n");
    std::fs::write(&config, toml).unwrap();

    env.start(&repo, &[]);
    // The host has its own untracked notes.txt (ignored), after the start.
    std::fs::write(repo.join("notes.txt"), "the host's notes\n").unwrap();

    // In the guest: an executable ignored build output, an untracked file
    // under the listed dist/, the guest's notes.txt, a changed tracked
    // README, a staged new file, a changed .env, links out of the tree and
    // into .git, a git hook and a nested .env.
    let out = env.run(
        &[
            "exec",
            "--",
            "sh",
            "-c",
            "set -e; mkdir -p build dist .husky/_ sub; head -c 70000 /dev/urandom > build/out.bin; \
             chmod 4755 build/out.bin; echo app > dist/app.txt; echo guest > notes.txt; \
             echo changed in the guest > README; echo staged > staged.txt; git add staged.txt; \
             echo TOKEN=guest > .env; ln -s /etc/passwd dist/escape; \
             ln -s ../.git/config dist/inner; printf '#!/bin/sh\\ntouch /tmp/pwned\\n' > .husky/_/pre-commit; \
             chmod +x .husky/_/pre-commit; echo TOKEN=x > sub/.env",
        ],
        &repo,
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let before = host_snapshot(&repo);
    let staging = env.path("state/keystone/sandboxes/arts/artifacts");

    // --dry-run lists the files and where they would go, and changes nothing.
    let out = env.run(&["sync", "--artifacts", "--dry-run"], &repo);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let listed = stdout(&out);
    for want in [
        "would sync artifact build/out.bin (staged)\n".to_string(),
        "would sync artifact notes.txt (staged)\n".into(),
        "would sync artifact dist/app.txt (in place)\n".into(),
        format!(
            "artifacts: 2 file(s), 70006 bytes would be copied to the staging folder {}",
            staging.display()
        ),
        "artifacts: 1 file(s), 4 bytes would be copied in place under dist".into(),
        "refused artifact dist/escape: a symbolic link".into(),
        "refused artifact dist/inner: a symbolic link".into(),
        "refused artifact .husky/_/pre-commit: inside .husky".into(),
        "refused artifact sub/.env: a .env file".into(),
    ] {
        assert!(listed.contains(&want), "{want}: {}", text(&out));
    }
    for never in [
        "README",
        "staged.txt",
        "artifact .env",
        ".git/",
        ".worktrees",
    ] {
        assert!(!listed.contains(never), "{never}: {}", text(&out));
    }
    assert_eq!(host_snapshot(&repo), before);
    assert!(!staging.exists());
    assert!(!repo.join("build").exists() && !repo.join("dist").exists());

    // The real thing.
    let out = env.run(&["sync", "--artifacts"], &repo);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let said = stdout(&out);
    assert!(
        said.contains(&format!(
            "artifacts: 2 file(s), 70006 bytes copied to the staging folder {}",
            staging.display()
        )),
        "{}",
        text(&out)
    );
    assert!(
        said.contains("artifacts: 1 file(s), 4 bytes copied in place under dist"),
        "{}",
        text(&out)
    );
    for (rel, host) in [
        ("build/out.bin", staging.join("build/out.bin")),
        ("notes.txt", staging.join("notes.txt")),
        ("dist/app.txt", repo.join("dist/app.txt")),
    ] {
        let guest = env.run(&["exec", "--", "cat", rel], &repo);
        assert_eq!(guest.status.code(), Some(0), "{}", text(&guest));
        assert!(
            std::fs::read(&host).unwrap() == guest.stdout,
            "{rel} differs"
        );
    }
    // Nothing executable, no link, no set-user-ID bit: in staging and in place.
    assert_eq!(not_plain(&staging), Vec::new());
    assert_eq!(not_plain(&repo.join("dist")), Vec::new());
    // The host's own files, and everything the rule keeps out.
    assert_eq!(
        std::fs::read_to_string(repo.join("notes.txt")).unwrap(),
        "the host's notes\n"
    );
    assert_eq!(
        std::fs::read_to_string(repo.join("README")).unwrap(),
        "hello\n"
    );
    assert_eq!(
        std::fs::read_to_string(repo.join(".env")).unwrap(),
        "TOKEN=from-host\n"
    );
    for never in [
        "build",
        "staged.txt",
        ".husky",
        "sub",
        "dist/escape",
        "dist/inner",
        ".worktrees",
    ] {
        assert!(
            std::fs::symlink_metadata(repo.join(never)).is_err(),
            "{never} in the project"
        );
    }
    for never in [".husky", "sub", "dist", ".env", "README"] {
        assert!(
            std::fs::symlink_metadata(staging.join(never)).is_err(),
            "{never} staged"
        );
    }
    // HEAD and README as they were (the commit sync adds only
    // refs/remotes/sandbox-arts/main).
    let after = host_snapshot(&repo);
    assert_eq!((&after.1, &after.3), (&before.1, &before.3));

    // Again: nothing left to move (exit 2, like a plain sync); the refused
    // entries are still named.
    let out = env.run(&["sync", "--artifacts"], &repo);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let err = stderr(&out);
    assert!(err.contains("no artifacts differ"), "{}", text(&out));
    assert!(
        err.contains("refused artifact dist/escape"),
        "{}",
        text(&out)
    );

    let out = env.run(&["stop"], &repo);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let out = env.run(&["destroy", "arts", "--force"], &repo);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
}
