//! The logs stay bounded and readable: a writer fed far more than its
//! limit, the supervisor's captured output (a child process writing to it
//! as QEMU does included), and QEMU's console socket.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use keystone_test_kit::ScratchDir;

use super::*;
use crate::shown::{terminal_safe, HOSTILE};

/// The most a log may hold on disk: the file and the one before.
const MAX_ON_DISK: u64 = 2 * ROTATE_AT;

/// Names the child process of the capture test, with its log's path.
const CAPTURE_CHILD: &str = "KEYSTONE_TEST_LOG_CAPTURE";

fn scratch(name: &str) -> ScratchDir {
    ScratchDir::new(&format!("logfile-{name}"))
}

/// The log's files on disk and their total size; each file's text must be
/// safe to `cat`.
fn on_disk(dir: &Path) -> (Vec<String>, u64) {
    let mut names = Vec::new();
    let mut total = 0;
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let meta = entry.metadata().unwrap();
        if !meta.is_file() {
            continue;
        }
        assert!(
            meta.len() <= ROTATE_AT,
            "{:?}: {}",
            entry.path(),
            meta.len()
        );
        let text = String::from_utf8(std::fs::read(entry.path()).unwrap()).unwrap();
        assert!(
            terminal_safe(&text.replace('\t', " ")),
            "{:?} holds raw control characters",
            entry.path()
        );
        names.push(entry.file_name().to_string_lossy().into_owned());
        total += meta.len();
    }
    names.sort();
    (names, total)
}

/// 20 MiB of hostile lines.
fn flood(mut w: impl Write) {
    let line = format!("[guest] {HOSTILE} {}\n", "x".repeat(100));
    let mut written = 0;
    while written < 20 << 20 {
        w.write_all(line.as_bytes()).unwrap();
        written += line.len();
    }
}

#[test]
fn a_log_fed_20_mib_keeps_at_most_its_cap_on_disk() {
    let dir = scratch("cap");
    let path = dir.join("console.log");
    flood(CappedLog::open(&path).unwrap());
    let (names, total) = on_disk(dir.path());
    assert_eq!(names, ["console.log", "console.log.1"]);
    assert!(total <= MAX_ON_DISK, "{total} bytes on disk");
    // The newest lines are there, whole.
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.ends_with("xxxx\n"), "{}", &text[text.len() - 50..]);

    // One write of 20 MiB, into a log left large by an older keystone.
    std::fs::write(&path, vec![b'o'; 3 * ROTATE_AT as usize]).unwrap();
    let mut log = CappedLog::open(&path).unwrap();
    log.write_all(&vec![b'y'; 20 << 20]).unwrap();
    drop(log);
    let (_, total) = on_disk(dir.path());
    assert!(total <= MAX_ON_DISK, "{total} bytes on disk");
}

/// The child of the capture test: its output is captured into the log at
/// `path`, floods it, and has a child process write an escape sequence
/// to the inherited descriptors, as QEMU would.
fn capture_child(path: &Path) {
    let capture = capture_output(path).unwrap();
    flood(std::io::stderr());
    let status = std::process::Command::new("sh")
        .args([
            "-c",
            r"printf 'child \033]52;c;eA==\007 done\n' >&2; echo stdout line",
        ])
        .status();
    println!("capture child done ({status:?})");
    drop(capture);
}

#[test]
fn the_supervisors_output_is_captured_bounded_and_escaped() {
    if let Some(path) = std::env::var_os(CAPTURE_CHILD) {
        return capture_child(Path::new(&path));
    }
    let dir = scratch("capture");
    let path = dir.join("supervisor.log");
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "agent::microvm::logfile::tests::the_supervisors_output_is_captured_bounded_and_escaped",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CAPTURE_CHILD, &path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let (names, total) = on_disk(dir.path());
    assert_eq!(names, ["supervisor.log", "supervisor.log.1"]);
    assert!(total <= MAX_ON_DISK, "{total} bytes on disk");
    let text = std::fs::read_to_string(&path).unwrap();
    if std::process::Command::new("sh")
        .arg("-c")
        .arg("true")
        .status()
        .is_ok()
    {
        assert!(text.contains(r"child \u{1b}]52;c;eA==\u{7} done"), "{text}");
        assert!(text.contains("stdout line\n"), "{text}");
    }
    assert!(
        text.contains("capture child done"),
        "the last lines reach the log"
    );
}

#[test]
fn the_console_socket_writes_a_bounded_escaped_log() {
    let dir = scratch("console");
    let (socket, log) = (dir.join("console.sock"), dir.join("logs"));
    std::fs::create_dir_all(&log).unwrap();
    let log_file = log.join("console.log");
    serve_console(&socket, &log_file).unwrap();
    let conn = UnixStream::connect(&socket).unwrap();
    flood(&conn);
    drop(conn);
    // The log thread finishes what it read.
    let t = Instant::now();
    let last = format!("{}\n", "x".repeat(100));
    while !std::fs::read_to_string(&log_file).is_ok_and(|t| t.ends_with(&last))
        && t.elapsed() < Duration::from_secs(10)
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    let (names, total) = on_disk(&log);
    assert_eq!(names, ["console.log", "console.log.1"]);
    assert!(total <= MAX_ON_DISK, "{total} bytes on disk");
}
