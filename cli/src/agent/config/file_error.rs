//! Where a problem in an `agent.toml` is, and what it is in the file's own
//! words: every [`ConfigError`] about a file starts `file:line:column:` and
//! names the dotted key it is about (`backend.microvm.engine`).
//!
//! serde's errors from `toml` carry the byte span of the offending key or
//! value but not the key's path, so on an error the text is read once more
//! into [`KeySpans`], where each key is written. The key an error is about
//! is the last one written at or before the error's span: an unknown key is
//! itself, and a value follows its own key with nothing but `=` between.

use std::fmt;
use std::ops::Range;
use std::path::Path;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use toml::value::Datetime;
use toml::Spanned;

use super::ConfigError;

/// One `agent.toml`: its path for messages and its text for positions.
pub(super) struct FileText<'a> {
    pub path: &'a Path,
    pub text: &'a str,
}

impl FileText<'_> {
    /// `1`-based line and column (in bytes) of a byte offset.
    fn line_col(&self, offset: usize) -> (usize, usize) {
        let before = self
            .text
            .get(..offset.min(self.text.len()))
            .unwrap_or(self.text);
        let line = before.matches('\n').count() + 1;
        let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
        (line, col)
    }

    fn error_at(&self, offset: usize, message: impl fmt::Display) -> ConfigError {
        let (line, col) = self.line_col(offset);
        ConfigError(format!("{}:{line}:{col}: {message}", self.path.display()))
    }

    /// A value of `key` at `span` that is not what the key takes.
    pub fn invalid_value(
        &self,
        key: &str,
        span: Range<usize>,
        wanted: impl fmt::Display,
        got: impl fmt::Display,
    ) -> ConfigError {
        self.error_at(
            span.start,
            format!("invalid value for `{key}`: expected {wanted}, got {got}"),
        )
    }

    /// A syntax error, an unknown key or a value of the wrong type or
    /// spelling, as reported by `toml` and serde.
    pub fn toml_error(&self, err: &toml::de::Error) -> ConfigError {
        let message = err.message().trim();
        let Some(span) = err.span() else {
            return ConfigError(format!("{}: {message}", self.path.display()));
        };
        let keys = KeySpans::of(self.text);
        let key = keys.key_at(span.start);
        if let Some(rest) = message.strip_prefix("unknown field `") {
            let (name, expected) = match rest.split_once('`') {
                Some((name, after)) => (name, after.strip_prefix(", expected ")),
                None => (rest, None),
            };
            let key = key
                .filter(|k| *k == name || k.ends_with(&format!(".{name}")))
                .unwrap_or(name);
            let hint = expected
                .map(|e| format!(" (expected {e})"))
                .unwrap_or_default();
            return self.error_at(span.start, format!("unknown key `{key}`{hint}"));
        }
        let mismatch = message
            .strip_prefix("invalid type: ")
            .or_else(|| message.strip_prefix("invalid value: "))
            .and_then(|m| m.rsplit_once(", expected "));
        let Some((got, wanted)) = mismatch else {
            return self.error_at(span.start, message);
        };
        let written = self.text.get(span.clone()).unwrap_or("");
        let got = if written.trim().parse::<Datetime>().is_ok() {
            "a date-time"
        } else {
            plain(got)
        };
        match key {
            Some(key) => self.invalid_value(key, span, plain(wanted), got),
            None => self.error_at(
                span.start,
                format!("invalid value: expected {}, got {got}", plain(wanted)),
            ),
        }
    }
}

/// serde's names for what it wanted or found, in the words of a TOML file.
fn plain(words: &str) -> &str {
    match words {
        "i64" => "a whole number",
        "a boolean" => "true or false",
        "a sequence" | "sequence" => "a list",
        "map" => "a table",
        w if w.starts_with("struct ") => "a table",
        w => w,
    }
}

/// How many date-time values [`KeySpans::of`] sets aside before it gives
/// up naming keys (no key of `agent.toml` takes one).
const MAX_DATETIMES: usize = 16;

/// Every key written in a TOML document: where it starts (a byte offset)
/// and its dotted path.
struct KeySpans(Vec<(usize, String)>);

impl KeySpans {
    /// The keys of `text`; none if it does not parse.
    fn of(text: &str) -> Self {
        let mut text = text.to_owned();
        for _ in 0..MAX_DATETIMES {
            let mut keys = Vec::new();
            let under = KeysUnder {
                prefix: "",
                out: &mut keys,
            };
            let Err(err) = under.deserialize(toml::Deserializer::new(&text)) else {
                return Self(keys);
            };
            // A date-time reads as a table whose one key is not written in
            // the file; a number of the same length in its place keeps
            // every other offset, and the keys read again.
            let Some(span) = err.span().filter(|s| {
                text.get(s.clone())
                    .is_some_and(|t| t.trim().parse::<Datetime>().is_ok())
            }) else {
                break;
            };
            let number = format!("{:<1$}", 0, span.len());
            text.replace_range(span, &number);
        }
        Self(Vec::new())
    }

    /// The path of the key written last at or before `offset`.
    fn key_at(&self, offset: usize) -> Option<&str> {
        self.0
            .iter()
            .filter(|(start, _)| *start <= offset)
            .max_by_key(|(start, _)| *start)
            .map(|(_, path)| path.as_str())
    }
}

/// Collects the keys of one value (a table's, an array's items', none of
/// a scalar's) under the path `prefix`.
struct KeysUnder<'a> {
    prefix: &'a str,
    out: &'a mut Vec<(usize, String)>,
}

impl<'de> DeserializeSeed<'de> for KeysUnder<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for KeysUnder<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a TOML value")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Ok(())
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Ok(())
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut items: A) -> Result<(), A::Error> {
        let out = self.out;
        while items
            .next_element_seed(KeysUnder {
                prefix: self.prefix,
                out: &mut *out,
            })?
            .is_some()
        {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut entries: A) -> Result<(), A::Error> {
        let out = self.out;
        while let Some(key) = entries.next_key::<Spanned<String>>()? {
            let path = match self.prefix {
                "" => key.get_ref().clone(),
                prefix => format!("{prefix}.{}", key.get_ref()),
            };
            out.push((key.span().start, path.clone()));
            entries.next_value_seed(KeysUnder {
                prefix: &path,
                out: &mut *out,
            })?;
        }
        Ok(())
    }
}
