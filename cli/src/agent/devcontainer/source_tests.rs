//! Finding and reading the file: the order of the places, symbolic links
//! refused, the size cap, special files.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;

use keystone_test_kit::{write_file, ScratchDir};

use super::source::find_relative;
use super::{load, DevcontainerError, MAX_FILE_BYTES};

#[test]
fn a_project_without_the_file_has_no_plan() {
    let tmp = ScratchDir::new("devcontainer-none");
    assert!(find_relative(tmp.path()).unwrap().is_none());
    assert!(load(tmp.path(), "id").unwrap().is_none());
    // An empty .devcontainer folder is not one.
    fs::create_dir(tmp.path().join(".devcontainer")).unwrap();
    assert!(load(tmp.path(), "id").unwrap().is_none());
}

#[test]
fn the_folder_file_wins_over_the_top_level_file() {
    let tmp = ScratchDir::new("devcontainer-order");
    let project = tmp.path().join("my-app");
    write_file(
        &project.join(".devcontainer.json"),
        r#"{"remoteUser": "top"}"#,
    );
    let plan = load(&project, "id").unwrap().unwrap();
    assert_eq!(plan.source, ".devcontainer.json");
    assert_eq!(plan.remote_user.as_deref(), Some("top"));

    write_file(
        &project.join(".devcontainer/devcontainer.json"),
        "// folder\n{\"remoteUser\": \"folder\", \"postStartCommand\": \"echo ${localWorkspaceFolderBasename}\",}",
    );
    assert_eq!(
        find_relative(&project).unwrap().unwrap(),
        Path::new(".devcontainer/devcontainer.json")
    );
    let plan = load(&project, "id").unwrap().unwrap();
    assert_eq!(plan.source, ".devcontainer/devcontainer.json");
    assert_eq!(plan.remote_user.as_deref(), Some("folder"));
    assert_eq!(plan.post_start[0].argv[2], "echo my-app");
}

#[test]
fn a_symlinked_file_is_refused() {
    let tmp = ScratchDir::new("devcontainer-link-file");
    let outside = tmp.path().join("outside.json");
    write_file(&outside, r#"{"postStartCommand": "from outside"}"#);
    let project = tmp.path().join("p");
    fs::create_dir_all(project.join(".devcontainer")).unwrap();
    symlink(&outside, project.join(".devcontainer/devcontainer.json")).unwrap();
    let err = load(&project, "id").unwrap_err();
    assert!(matches!(err, DevcontainerError::Symlink { .. }), "{err:?}");
    assert!(err.to_string().contains("a symbolic link"), "{err}");
    assert!(find_relative(&project).is_err());

    let project = tmp.path().join("q");
    fs::create_dir_all(&project).unwrap();
    symlink(&outside, project.join(".devcontainer.json")).unwrap();
    let err = load(&project, "id").unwrap_err();
    assert!(matches!(err, DevcontainerError::Symlink { .. }), "{err:?}");
}

#[test]
fn a_symlinked_folder_is_refused() {
    let tmp = ScratchDir::new("devcontainer-link-dir");
    let outside = tmp.path().join("elsewhere");
    write_file(
        &outside.join("devcontainer.json"),
        r#"{"postStartCommand": "x"}"#,
    );
    let project = tmp.path().join("p");
    fs::create_dir_all(&project).unwrap();
    symlink(&outside, project.join(".devcontainer")).unwrap();
    let err = load(&project, "id").unwrap_err();
    assert!(
        matches!(err, DevcontainerError::Symlink { ref path } if path.ends_with(".devcontainer")),
        "{err:?}"
    );
}

#[test]
fn reading_refuses_a_link_swapped_in_after_the_look() {
    // `find` saw a plain folder; by the time of the read it is a link.
    let tmp = ScratchDir::new("devcontainer-swap");
    let outside = tmp.path().join("elsewhere");
    write_file(&outside.join("devcontainer.json"), "{}");
    let project = tmp.path().join("p");
    fs::create_dir_all(&project).unwrap();
    symlink(&outside, project.join(".devcontainer")).unwrap();
    let err =
        super::source::read(&project, Path::new(".devcontainer/devcontainer.json")).unwrap_err();
    assert!(matches!(err, DevcontainerError::Symlink { .. }), "{err:?}");
}

#[test]
fn reading_refuses_a_file_link_swapped_in_after_the_look() {
    let tmp = ScratchDir::new("devcontainer-swap-file");
    let outside = tmp.path().join("outside.json");
    write_file(&outside, "{}");
    let project = tmp.path().join("p");
    fs::create_dir_all(&project).unwrap();
    symlink(&outside, project.join(".devcontainer.json")).unwrap();
    let err = super::source::read(&project, Path::new(".devcontainer.json")).unwrap_err();
    assert!(matches!(err, DevcontainerError::Symlink { .. }), "{err:?}");
}

#[test]
fn a_file_over_one_mebibyte_is_refused() {
    let tmp = ScratchDir::new("devcontainer-big");
    let path = tmp.path().join(".devcontainer.json");
    let mut text = String::from("{\"name\": \"");
    text.push_str(&"x".repeat(MAX_FILE_BYTES as usize));
    text.push_str("\"}");
    write_file(&path, &text);
    let err = load(tmp.path(), "id").unwrap_err();
    assert!(matches!(err, DevcontainerError::TooLarge { .. }), "{err:?}");
    assert!(
        err.to_string().contains("(1 MiB)") && err.to_string().contains("shorten it"),
        "{err}"
    );

    // Exactly 1 MiB is read.
    let text = format!(
        "{{\"name\": \"{}\"}}",
        "x".repeat(MAX_FILE_BYTES as usize - 12)
    );
    assert_eq!(text.len() as u64, MAX_FILE_BYTES);
    write_file(&path, &text);
    assert!(load(tmp.path(), "id").unwrap().unwrap().is_empty());
}

#[test]
fn a_fifo_is_refused_without_waiting_for_a_writer() {
    let tmp = ScratchDir::new("devcontainer-fifo");
    let path = tmp.path().join(".devcontainer.json");
    let made = rustix::fs::mkfifoat(
        rustix::fs::CWD,
        &path,
        rustix::fs::Mode::from_raw_mode(0o600),
    );
    if let Err(e) = made {
        println!("SKIP: mkfifo failed: {}", std::io::Error::from(e));
        return;
    }
    let err = load(tmp.path(), "id").unwrap_err();
    assert!(matches!(err, DevcontainerError::NotAFile { .. }), "{err:?}");
}

#[test]
fn a_syntax_error_names_the_file() {
    let tmp = ScratchDir::new("devcontainer-syntax");
    write_file(
        &tmp.path().join(".devcontainer/devcontainer.json"),
        "{\n  // comment\n  \"a\": 1\n  \"b\": 2\n}\n",
    );
    let err = load(tmp.path(), "id").unwrap_err().to_string();
    let expected = format!(
        "{}:4:3: expected `,` or `}}`; fix the file or remove it",
        tmp.path().join(".devcontainer/devcontainer.json").display()
    );
    assert_eq!(err, expected);
}
