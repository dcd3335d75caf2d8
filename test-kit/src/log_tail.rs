//! The end of a log or a console, for a failure message: [`log_tail`]
//! reads at most [`TAIL_BYTES`] from the end of a file, [`last_lines`]
//! takes the last lines of text already read.
//!
//! What a guest printed reaches the terminal of whoever runs the tests,
//! so every line comes out with its control characters (ESC, BEL, the C1
//! set) and the bidirectional controls escaped as Rust writes them
//! (`\u{1b}`): a guest's console cannot retitle the window, move the
//! cursor or write the clipboard. Invalid UTF-8 is replaced, not dropped.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

/// The most of a file's end that [`log_tail`] reads.
pub const TAIL_BYTES: u64 = 64 << 10;

/// The last `lines` lines of the file at `path`, read from its last
/// [`TAIL_BYTES`] only, escaped and joined by newlines; empty when the
/// file cannot be read. A line cut by the read's start is left out
/// unless it is all there is.
pub fn log_tail(path: &Path, lines: usize) -> String {
    let mut raw = Vec::new();
    let mut cut = false;
    if let Ok(mut file) = std::fs::File::open(path) {
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        let start = len.saturating_sub(TAIL_BYTES);
        cut = start > 0 && file.seek(SeekFrom::Start(start)).is_ok();
        let _ = file.take(TAIL_BYTES).read_to_end(&mut raw);
    }
    let text = String::from_utf8_lossy(&raw);
    let whole = match text.split_once('\n') {
        Some((_, rest)) if cut && !rest.is_empty() => rest,
        _ => &text,
    };
    last_lines(whole, lines)
}

/// The last `lines` lines of `text`, each escaped (see the module
/// documentation), joined by newlines.
pub fn last_lines(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..]
        .iter()
        .map(|line| escaped(line))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Characters that reorder the text around them (explicit directional
/// formatting characters and marks).
fn is_bidi_control(c: char) -> bool {
    matches!(
        c,
        '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
    )
}

/// `line` with every character a terminal acts on but the tab escaped.
fn escaped(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    for c in line.chars() {
        if c != '\t' && (c.is_control() || is_bidi_control(c)) {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ScratchDir;

    fn numbered(n: usize) -> String {
        (1..=n).map(|i| format!("line {i}\n")).collect()
    }

    #[test]
    fn a_file_shorter_than_asked_comes_whole() {
        let dir = ScratchDir::new("kit-tail-short");
        let path = dir.join("log");
        std::fs::write(&path, numbered(3)).unwrap();
        assert_eq!(log_tail(&path, 10), "line 1\nline 2\nline 3");
        std::fs::write(&path, "").unwrap();
        assert_eq!(log_tail(&path, 10), "");
        assert_eq!(log_tail(&dir.join("missing"), 10), "");
    }

    #[test]
    fn a_longer_file_gives_its_last_lines() {
        let dir = ScratchDir::new("kit-tail-long");
        let path = dir.join("log");
        std::fs::write(&path, numbered(100)).unwrap();
        assert_eq!(log_tail(&path, 3), "line 98\nline 99\nline 100");
        assert_eq!(log_tail(&path, 0), "");
        // No newline at the end: the last line still counts.
        std::fs::write(&path, "a\nb\nc").unwrap();
        assert_eq!(log_tail(&path, 2), "b\nc");
    }

    #[test]
    fn a_file_larger_than_the_bound_is_read_from_its_end_only() {
        let dir = ScratchDir::new("kit-tail-big");
        let path = dir.join("log");
        let mut text = "x".repeat(3 * TAIL_BYTES as usize);
        text.push('\n');
        text.push_str(&numbered(5));
        std::fs::write(&path, &text).unwrap();
        let tail = log_tail(&path, 1000);
        assert!(tail.len() as u64 <= TAIL_BYTES, "{} bytes", tail.len());
        assert!(tail.ends_with("line 4\nline 5"), "{tail}");
        assert!(
            tail.starts_with("line 1"),
            "the cut line was kept: {tail:.40}"
        );
        // One line longer than the bound: its end is all there is.
        std::fs::write(&path, "y".repeat(2 * TAIL_BYTES as usize)).unwrap();
        assert_eq!(log_tail(&path, 5).len() as u64, TAIL_BYTES);
    }

    #[test]
    fn what_a_terminal_acts_on_comes_escaped() {
        let console = "ok\n\u{1b}]52;c;ZXZpbA==\u{7}\nbell\u{9b}2J\r\nrtl\u{202e}txt\n\ttab\n";
        assert_eq!(
            last_lines(console, 4),
            "\\u{1b}]52;c;ZXZpbA==\\u{7}\nbell\\u{9b}2J\nrtl\\u{202e}txt\n\ttab"
        );
        let dir = ScratchDir::new("kit-tail-escape");
        let path = dir.join("log");
        std::fs::write(&path, b"raw \xff byte \x1b[2J\n").unwrap();
        assert_eq!(log_tail(&path, 1), "raw \u{fffd} byte \\u{1b}[2J");
    }
}
