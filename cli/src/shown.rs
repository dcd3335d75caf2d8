//! Text from outside keystone (the guest, files it can write, the
//! repository) as it may be shown on a terminal, or written to a log file
//! that users read with `cat` or `less`.
//!
//! A terminal acts on control characters: ESC starts sequences that move
//! the cursor, retitle the window or write the clipboard (OSC 52), BEL ends
//! some of them, and the C1 characters (U+0080 to U+009F, U+009B being a
//! CSI) do the same on many terminals; bidirectional overrides make a line
//! read other than it is. Everything the CLI prints that came from outside
//! goes through this module first, as one of:
//!
//! - [`line`]: one line: every control character escaped as Rust writes it
//!   (`\n`, `\t`, `\u{1b}`, `\u{9b}`), bidirectional controls too, at most
//!   [`MAX_SHOWN_TEXT`](keystone_guest_agent::protocol::MAX_SHOWN_TEXT)
//!   characters (this is [`keystone_guest_agent::protocol::printable`],
//!   which every error quoting the guest goes through too);
//! - [`bytes`]: the same for a guest program's output, with the white
//!   space around it trimmed;
//! - [`lines`]: text meant to be several lines (the tail of a log): each
//!   line as [`line`] gives it, joined by newlines;
//! - [`json`]: serialized JSON with DEL, the C1 characters and the
//!   bidirectional controls written as `\u` escapes (serde_json escapes
//!   only the C0 controls);
//! - [`LogText`]: a byte stream on its way to a log file: newlines and tabs
//!   kept, carriage returns dropped, anything else escaped.
//!
//! Tabs are escaped everywhere but in log files: a tab moves the cursor
//! only, but it breaks the columns of `list` and makes a field look empty.
//!
//! SECURITY: `keystone agent exec`, `ssh` and `attach` (and `vm run`'s
//! console) do not come through here: they pass the guest program's own
//! output and terminal byte for byte, which is what they are for (as
//! `ssh` and `docker exec` do). Whatever else the CLI prints about the
//! guest is text that keystone shows, and is escaped.

use keystone_guest_agent::protocol::{is_bidi_control, printable};

/// Whether a terminal may act on `c` (or read the text around it other
/// than it is).
fn is_active(c: char) -> bool {
    c.is_control() || is_bidi_control(c)
}

/// `text` as one line fit for a terminal (see the module documentation).
pub fn line(text: &str) -> String {
    printable(text.as_bytes())
}

/// A guest program's output (or any bytes from outside) as one line,
/// without the white space around it.
pub fn bytes(raw: &[u8]) -> String {
    printable(raw.trim_ascii())
}

/// Text meant to be several lines: each line as [`line`] gives it.
pub fn lines(text: &str) -> String {
    text.split('\n')
        .map(|l| line(l.strip_suffix('\r').unwrap_or(l)))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Serialized JSON with the characters a terminal acts on that JSON
/// allows raw (DEL, C1, bidirectional controls) written as `\u` escapes.
/// They can only stand inside strings, where the escape reads the same.
pub fn json(serialized: &str) -> String {
    let mut out = String::with_capacity(serialized.len());
    for c in serialized.chars() {
        if is_active(c) && !matches!(c, '\n' | '\t' | '\r') {
            out.push_str(&format!("\\u{:04x}", c as u32));
        } else {
            out.push(c);
        }
    }
    out
}

/// Whether `text` can be shown as it is: no character a terminal acts on
/// but the newline.
#[cfg(test)]
pub fn terminal_safe(text: &str) -> bool {
    text.chars().all(|c| c == '\n' || !is_active(c))
}

/// A byte stream on its way to a log file, made safe to `cat`: newlines
/// and tabs kept, carriage returns dropped (a console writes `\r\n`; a
/// lone one would let a line overwrite another), other control and
/// bidirectional characters escaped as [`line`] does, and bytes that are
/// not UTF-8 as `\xNN`. A character split between two pushes is kept
/// until the next one.
#[derive(Debug, Default)]
pub struct LogText {
    /// The start of a UTF-8 sequence the last push ended in (at most 3
    /// bytes).
    pending: Vec<u8>,
}

impl LogText {
    /// Appends what `raw` becomes to `out`.
    pub fn push(&mut self, raw: &[u8], out: &mut Vec<u8>) {
        let joined;
        let mut rest = if self.pending.is_empty() {
            raw
        } else {
            let mut v = std::mem::take(&mut self.pending);
            v.extend_from_slice(raw);
            joined = v;
            &joined[..]
        };
        loop {
            match std::str::from_utf8(rest) {
                Ok(text) => {
                    push_text(text, out);
                    return;
                }
                Err(e) => {
                    let (good, bad) = rest.split_at(e.valid_up_to());
                    push_text(std::str::from_utf8(good).unwrap_or_default(), out);
                    match e.error_len() {
                        None => {
                            self.pending = bad.to_vec();
                            return;
                        }
                        Some(n) => {
                            for b in &bad[..n] {
                                out.extend_from_slice(format!("\\x{b:02x}").as_bytes());
                            }
                            rest = &bad[n..];
                        }
                    }
                }
            }
        }
    }
}

fn push_text(text: &str, out: &mut Vec<u8>) {
    for c in text.chars() {
        match c {
            '\n' | '\t' => out.push(c as u8),
            '\r' => {}
            c if is_active(c) => out.extend(c.escape_default().to_string().bytes()),
            c => out.extend_from_slice(c.encode_utf8(&mut [0u8; 4]).as_bytes()),
        }
    }
}

/// What a hostile guest writes: an OSC 52 clipboard write, a title
/// change, a screen clear, a C1 CSI, DEL, a bidirectional override and a
/// forged second line.
#[cfg(test)]
pub const HOSTILE: &str = "ok\u{1b}]52;c;Y3VybCBldmlsIHwgc2g=\u{7}\u{1b}]0;title\u{7}\u{1b}[2J\u{9b}31m\u{7f}\u{202e}gpj.exe\nkeystone: fake line\r\tend";

#[cfg(test)]
mod tests {
    use super::*;
    use keystone_guest_agent::protocol::MAX_SHOWN_TEXT;

    #[test]
    fn one_line_has_nothing_a_terminal_acts_on() {
        let shown = line(HOSTILE);
        assert!(terminal_safe(&shown), "{shown:?}");
        assert!(!shown.contains('\n'), "{shown:?}");
        assert!(shown.contains(r"\u{1b}]52;c;"), "{shown}");
        assert!(
            shown.contains(r"\u{9b}") && shown.contains(r"\u{202e}"),
            "{shown}"
        );
        assert_eq!(line("feat/x é"), "feat/x é");
    }

    #[test]
    fn every_active_character_is_escaped_wherever_it_stands() {
        // Every C0, DEL, every C1 and each bidirectional control, alone
        // and between letters.
        let active = (0u32..0x20)
            .chain(0x7f..0xa0)
            .chain([0x61c, 0x200e, 0x200f, 0x202a, 0x202e, 0x2066, 0x2069])
            .filter_map(char::from_u32);
        for c in active {
            for text in [c.to_string(), format!("a{c}b"), format!("{c}{c}")] {
                let shown = line(&text);
                assert!(terminal_safe(&shown) && !shown.contains('\n'), "{text:?}");
                let many = lines(&text);
                assert!(terminal_safe(&many), "{text:?}: {many:?}");
                let as_json = json(&serde_json::to_string(&text).unwrap());
                assert!(terminal_safe(&as_json), "{as_json:?}");
                let back: String = serde_json::from_str(&as_json).unwrap();
                assert_eq!(back, text, "the JSON escape reads the same");
            }
        }
    }

    #[test]
    fn bytes_are_bounded_trimmed_and_need_not_be_utf8() {
        let mut raw = b"  fatal: \x1b[31m\xff\xfe bad\n".to_vec();
        raw.extend(std::iter::repeat_n(b'x', 100_000));
        let shown = bytes(&raw);
        assert!(terminal_safe(&shown) && !shown.contains('\n'));
        assert!(shown.starts_with(r"fatal: \u{1b}[31m"), "{shown}");
        assert!(
            shown.chars().count() < MAX_SHOWN_TEXT + 40,
            "{}",
            shown.len()
        );
        assert_eq!(bytes(b"\n  plain \n"), "plain");
    }

    #[test]
    fn lines_keep_only_their_newlines() {
        let shown = lines(HOSTILE);
        assert!(terminal_safe(&shown), "{shown:?}");
        assert_eq!(shown.lines().count(), 2);
        assert_eq!(lines("a\r\nb"), "a\nb");
    }

    #[test]
    fn log_text_survives_any_split_of_the_stream() {
        let raw = format!("{HOSTILE} ü€𝄞 done\r\n").into_bytes();
        let mut raw = raw;
        raw.extend_from_slice(b"\xff\xc3(\n");
        let mut whole = Vec::new();
        LogText::default().push(&raw, &mut whole);
        let whole = String::from_utf8(whole).unwrap();
        assert!(terminal_safe(&whole.replace('\t', " ")), "{whole:?}");
        assert!(whole.contains("ü€𝄞 done\n"), "{whole}");
        assert!(whole.contains(r"\xff\xc3("), "{whole}");
        assert!(whole.contains("\tend"), "tabs are kept in logs: {whole}");
        for size in 1..8 {
            let mut text = LogText::default();
            let mut out = Vec::new();
            for piece in raw.chunks(size) {
                text.push(piece, &mut out);
            }
            assert_eq!(String::from_utf8(out).unwrap(), whole, "pieces of {size}");
        }
    }
}
