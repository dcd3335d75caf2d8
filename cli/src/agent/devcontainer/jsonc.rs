//! JSON with comments, as VS Code reads `devcontainer.json`: `//` line
//! comments, `/* */` block comments and trailing commas before `}` or `]`,
//! plus a UTF-8 byte order mark at the start.
//!
//! The pre-pass turns such text into plain JSON of exactly the same
//! length: every byte of a comment (its newlines aside), of a trailing
//! comma and of the byte order mark becomes a space. Lines and byte
//! offsets therefore stay where they were, so a position `serde_json`
//! reports in the plain text is the position in the original file; it
//! is then turned into a 1-based line and character column of the
//! original. Comment markers and commas inside strings are text: the
//! pre-pass follows strings and their backslash escapes.
//!
//! The pre-pass is linear in the input and never fails on its own except
//! for a block comment that does not end; `serde_json` then rejects
//! anything else that is not JSON (with its own nesting limit of 128).

use serde_json::Value;

/// Why the text is not JSON with comments, and where (1-based line and
/// character column in the original text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsoncError {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// Parses JSON with comments and trailing commas.
pub fn parse(text: &str) -> Result<Value, JsoncError> {
    let plain = to_plain_json(text)?;
    serde_json::from_str(&plain).map_err(|e| {
        let message = without_position(&e.to_string());
        let (line, column) = char_position(text, e.line(), e.column());
        JsoncError {
            line,
            column,
            message,
        }
    })
}

/// The plain JSON of the same byte length as `text` (see the module
/// documentation).
pub fn to_plain_json(text: &str) -> Result<String, JsoncError> {
    let src = text.as_bytes();
    let mut out = src.to_vec();
    let mut i = 0;
    if src.starts_with("\u{feff}".as_bytes()) {
        out[..3].fill(b' ');
        i = 3;
    }
    // Pass 1: blank the comments, following strings.
    while i < src.len() {
        match src[i] {
            b'"' => i = skip_string(src, i),
            b'/' if src.get(i + 1) == Some(&b'/') => {
                while i < src.len() && src[i] != b'\n' {
                    if src[i] != b'\r' {
                        out[i] = b' ';
                    }
                    i += 1;
                }
            }
            b'/' if src.get(i + 1) == Some(&b'*') => {
                let start = i;
                out[i] = b' ';
                out[i + 1] = b' ';
                i += 2;
                loop {
                    if i >= src.len() {
                        let (line, column) = byte_position(text, start);
                        return Err(JsoncError {
                            line,
                            column,
                            message: "a `/*` comment is not closed with `*/`".to_string(),
                        });
                    }
                    if src[i] == b'*' && src.get(i + 1) == Some(&b'/') {
                        out[i] = b' ';
                        out[i + 1] = b' ';
                        i += 2;
                        break;
                    }
                    if src[i] != b'\n' && src[i] != b'\r' {
                        out[i] = b' ';
                    }
                    i += 1;
                }
            }
            _ => i += 1,
        }
    }
    // Pass 2: blank the commas that only white space separates from a
    // closing bracket. Strings are unchanged by pass 1, so they are
    // followed the same way; each comma's look-ahead stops at the next
    // token, so the pass stays linear.
    let mut i = 0;
    while i < out.len() {
        match out[i] {
            b'"' => i = skip_string(&out, i),
            b',' => {
                let next = out[i + 1..]
                    .iter()
                    .position(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'));
                if let Some(n) = next {
                    if matches!(out[i + 1 + n], b'}' | b']') {
                        out[i] = b' ';
                    }
                }
                i += 1;
            }
            _ => i += 1,
        }
    }
    // Only ASCII bytes were replaced, and only whole characters: a
    // comment's multi-byte characters had every byte blanked, so the text
    // stays UTF-8; the fallback keeps a bug from becoming a panic.
    String::from_utf8(out).map_err(|_| JsoncError {
        line: 1,
        column: 1,
        message: "the text is not UTF-8 after its comments are removed".to_string(),
    })
}

/// The index just past the string that starts with the quote at `start`
/// (or the end of the input when it does not end).
fn skip_string(src: &[u8], start: usize) -> usize {
    let mut i = start + 1;
    while i < src.len() {
        match src[i] {
            b'\\' => i += 2,
            b'"' => return i + 1,
            _ => i += 1,
        }
    }
    src.len()
}

/// `serde_json`'s message without the " at line L column C" it appends.
fn without_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(at) => message[..at].to_string(),
        None => message.to_string(),
    }
}

/// The 1-based line and character column of byte `offset` in `text`.
fn byte_position(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |n| n + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

/// `serde_json` counts columns in bytes of the plain text (1-based, 0 at
/// the start of a line): the same line's character column in `text`.
fn char_position(text: &str, line: usize, byte_column: usize) -> (usize, usize) {
    let Some(line_text) = text.split('\n').nth(line.saturating_sub(1)) else {
        return (line, byte_column);
    };
    let mut end = byte_column.min(line_text.len());
    while !line_text.is_char_boundary(end) {
        end -= 1;
    }
    let chars = line_text[..end].chars().count();
    (line, chars.max(1))
}
