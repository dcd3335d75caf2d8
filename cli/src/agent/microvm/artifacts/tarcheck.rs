//! The checks on the tar stream that `sync --artifacts` reads from the
//! sandbox.
//!
//! The host asks GNU tar in the guest for a POSIX pax archive, but the guest
//! may send anything, so this parser trusts nothing: it reads through a byte
//! cap and a deadline, verifies every header's checksum and magic, takes
//! only regular files and directories whose names are plain relative paths
//! (checked component by component), caps each file's size and the number
//! of entries, and hands each checked entry to a [`Sink`]. Links, devices,
//! FIFOs, sparse files and names that fail the checks are refused and
//! reported, and the stream goes on; GNU long-name and sparse headers,
//! global pax headers, a bad header or a stream that is too long, too slow
//! or cut short end it. PAX `path` and `size` records are applied, so the
//! name checked is the name a tar reader would use. No input panics.

use std::io::{self, Read};
use std::time::{Duration, Instant};

use super::tarheader::{Header, Pax, BLOCK};

/// What the stream may hold.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Bytes in one path.
    pub max_path: usize,
    /// Bytes in one file.
    pub max_file: u64,
    /// Bytes in the whole stream, headers and padding included.
    pub max_stream: u64,
    /// Headers in the stream.
    pub max_entries: u64,
    /// Bytes in one pax extended header.
    pub max_pax: u64,
    /// The whole transfer.
    pub time: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_path: 4096,
            max_file: 2 << 30,
            max_stream: 8 << 30,
            max_entries: 200_000,
            max_pax: 64 << 10,
            time: Duration::from_secs(20 * 60),
        }
    }
}

/// Longest name of one path component, as Linux allows.
const MAX_COMPONENT: usize = 255;

/// What a name may not be.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NameProblem {
    #[error("empty")]
    Empty,
    #[error("too long")]
    TooLong,
    #[error("not UTF-8")]
    NotUtf8,
    #[error("an absolute path")]
    Absolute,
    #[error("holds a control character")]
    Control,
    #[error("holds an empty component")]
    EmptyComponent,
    #[error("holds a `.` component")]
    Dot,
    #[error("holds a `..` component")]
    DotDot,
}

/// Why one entry was not taken (the stream goes on).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{0}: only regular files and directories are copied")]
    Type(&'static str),
    #[error("bad name: {0}")]
    Name(NameProblem),
    #[error("{size} bytes, more than the {max}-byte limit on one file")]
    TooBig { size: u64, max: u64 },
    #[error("a sparse file: only plain files are copied")]
    Sparse,
}

/// Why the stream was abandoned.
#[derive(Debug, thiserror::Error)]
pub enum TarError {
    #[error("the sandbox's tar stream ended early (it is truncated)")]
    Truncated,
    #[error("the transfer took longer than {0:?}: copy fewer files")]
    TimedOut(Duration),
    #[error("the sandbox sent more than {0} bytes: copy fewer or smaller files")]
    TooLarge(u64),
    #[error("the sandbox sent more than {0} entries: copy fewer files")]
    TooManyEntries(u64),
    #[error("bad tar header at byte {offset} of the sandbox's stream: {what}")]
    BadHeader { offset: u64, what: &'static str },
    #[error("reading from the sandbox: {0}")]
    Io(io::Error),
    #[error("writing an artifact on the host: {0}")]
    Write(io::Error),
}

/// Where checked entries go.
pub trait Sink {
    /// A regular file of `size` bytes; `data` gives exactly those bytes.
    /// What the sink does not read is skipped.
    fn file(&mut self, path: &str, size: u64, data: &mut dyn Read) -> io::Result<()>;
    /// A directory.
    fn dir(&mut self, path: &str) -> io::Result<()>;
    /// An entry the checks refused; `name` is the sandbox's, unchecked.
    fn refused(&mut self, name: &[u8], why: Refusal);
}

/// Checks a name the sandbox sent: a relative path of plain components.
pub fn check_name(name: &[u8], max: usize) -> Result<&str, NameProblem> {
    if name.is_empty() {
        return Err(NameProblem::Empty);
    }
    if name.len() > max {
        return Err(NameProblem::TooLong);
    }
    let text = std::str::from_utf8(name).map_err(|_| NameProblem::NotUtf8)?;
    if text.starts_with('/') {
        return Err(NameProblem::Absolute);
    }
    if text.chars().any(char::is_control) {
        return Err(NameProblem::Control);
    }
    for part in text.split('/') {
        match part {
            "" => return Err(NameProblem::EmptyComponent),
            "." => return Err(NameProblem::Dot),
            ".." => return Err(NameProblem::DotDot),
            p if p.len() > MAX_COMPONENT => return Err(NameProblem::TooLong),
            _ => {}
        }
    }
    Ok(text)
}

/// The stream under its cap and deadline.
struct Stream<'r, R> {
    inner: &'r mut R,
    read: u64,
    max: u64,
    deadline: Instant,
    time: Duration,
}

impl<R: Read> Stream<'_, R> {
    /// One read of at most `buf.len()` bytes; `Ok(0)` at the end.
    fn read_some(&mut self, buf: &mut [u8]) -> Result<usize, TarError> {
        if Instant::now() >= self.deadline {
            return Err(TarError::TimedOut(self.time));
        }
        let room = self.max.saturating_sub(self.read);
        // One byte past the cap tells "exactly full" from "too long".
        let want = buf
            .len()
            .min(usize::try_from(room).unwrap_or(usize::MAX).max(1));
        let result = loop {
            match self.inner.read(&mut buf[..want]) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                other => break other,
            }
        };
        if Instant::now() >= self.deadline {
            return Err(TarError::TimedOut(self.time));
        }
        let n = result.map_err(TarError::Io)?;
        self.read += n as u64;
        if self.read > self.max {
            return Err(TarError::TooLarge(self.max));
        }
        Ok(n)
    }

    /// Fills `buf`; false at a clean end before its first byte.
    fn fill(&mut self, buf: &mut [u8]) -> Result<bool, TarError> {
        let mut got = 0;
        while got < buf.len() {
            match self.read_some(&mut buf[got..])? {
                0 if got == 0 => return Ok(false),
                0 => return Err(TarError::Truncated),
                n => got += n,
            }
        }
        Ok(true)
    }

    /// Skips `n` bytes.
    fn skip(&mut self, mut n: u64) -> Result<(), TarError> {
        let mut buf = [0u8; 8192];
        while n > 0 {
            let want = buf.len().min(usize::try_from(n).unwrap_or(usize::MAX));
            match self.read_some(&mut buf[..want])? {
                0 => return Err(TarError::Truncated),
                got => n -= got as u64,
            }
        }
        Ok(())
    }

    /// Reads to the end (the end-of-archive padding).
    fn drain(&mut self) -> Result<(), TarError> {
        let mut buf = [0u8; 8192];
        while self.read_some(&mut buf)? > 0 {}
        Ok(())
    }

    /// True when `n` more bytes still fit under the cap.
    fn fits(&self, n: u64) -> bool {
        n <= self.max.saturating_sub(self.read)
    }
}

/// A file's bytes, for the sink; a stream failure is kept for the parser.
struct EntryData<'s, 'r, R> {
    stream: &'s mut Stream<'r, R>,
    left: u64,
    failed: Option<TarError>,
}

impl<R: Read> Read for EntryData<'_, '_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 || buf.is_empty() {
            return Ok(0);
        }
        let want = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        match self.stream.read_some(&mut buf[..want]) {
            Ok(0) => self.fail(TarError::Truncated),
            Ok(n) => {
                self.left -= n as u64;
                Ok(n)
            }
            Err(e) => self.fail(e),
        }
    }
}

impl<R> EntryData<'_, '_, R> {
    fn fail(&mut self, e: TarError) -> io::Result<usize> {
        let text = e.to_string();
        self.failed = Some(e);
        Err(io::Error::other(text))
    }
}

/// `size` rounded up to whole blocks.
fn padded(size: u64) -> Option<u64> {
    size.checked_next_multiple_of(BLOCK)
}

/// Reads a whole archive from `inner` into `sink`, then the rest of the
/// stream (the end-of-archive padding), all under `limits` and before
/// `deadline`. Returns the bytes read.
pub fn read_archive<R: Read>(
    inner: &mut R,
    limits: &Limits,
    deadline: Instant,
    sink: &mut dyn Sink,
) -> Result<u64, TarError> {
    let mut s = Stream {
        inner,
        read: 0,
        max: limits.max_stream,
        deadline,
        time: limits.time,
    };
    let mut headers = 0u64;
    let mut pax: Option<Pax> = None;
    loop {
        let offset = s.read;
        let bad = |what| TarError::BadHeader { offset, what };
        let mut block = [0u8; BLOCK as usize];
        if !s.fill(&mut block)? {
            return Err(TarError::Truncated);
        }
        if block.iter().all(|b| *b == 0) {
            if pax.is_some() {
                return Err(bad("a pax header with no entry after it"));
            }
            s.drain()?;
            return Ok(s.read);
        }
        headers += 1;
        if headers > limits.max_entries {
            return Err(TarError::TooManyEntries(limits.max_entries));
        }
        let header = Header::parse(&block).map_err(bad)?;
        match header.typeflag {
            b'x' => {
                if pax.is_some() {
                    return Err(bad("two pax headers in a row"));
                }
                if header.size > limits.max_pax {
                    return Err(bad("a pax header over the size limit"));
                }
                let len = padded(header.size).ok_or_else(|| bad("bad size"))?;
                let mut data = vec![0u8; usize::try_from(len).map_err(|_| bad("bad size"))?];
                if !s.fill(&mut data)? {
                    return Err(TarError::Truncated);
                }
                data.truncate(header.size as usize);
                pax = Some(Pax::parse(&data).map_err(bad)?);
                continue;
            }
            b'g' => return Err(bad("a global pax header (not accepted)")),
            b'L' | b'K' => return Err(bad("a GNU long-name header (not accepted)")),
            b'S' => return Err(bad("a GNU sparse header (not accepted)")),
            _ => {}
        }
        let ext = pax.take().unwrap_or_default();
        let name = ext.path.unwrap_or(header.name);
        let size = ext.size.unwrap_or(header.size);
        let span = padded(size).ok_or(TarError::TooLarge(limits.max_stream))?;
        if !s.fits(span) {
            return Err(TarError::TooLarge(limits.max_stream));
        }
        let kind = match header.typeflag {
            b'0' | 0 => Ok(false),
            b'5' => Ok(true),
            b'1' => Err(Refusal::Type("a hard link")),
            b'2' => Err(Refusal::Type("a symbolic link")),
            b'3' => Err(Refusal::Type("a character device")),
            b'4' => Err(Refusal::Type("a block device")),
            b'6' => Err(Refusal::Type("a FIFO")),
            b'7' => Err(Refusal::Type("a contiguous file")),
            _ => Err(Refusal::Type("an entry of an unknown type")),
        };
        let checked = kind.and_then(|is_dir| {
            if ext.sparse {
                return Err(Refusal::Sparse);
            }
            // tar writes a directory's name with one trailing slash.
            let bare = match name.strip_suffix(b"/") {
                Some(bare) if is_dir => bare,
                _ => &name[..],
            };
            let path = check_name(bare, limits.max_path).map_err(Refusal::Name)?;
            if !is_dir && size > limits.max_file {
                return Err(Refusal::TooBig {
                    size,
                    max: limits.max_file,
                });
            }
            Ok((is_dir, path))
        });
        let rest = match checked {
            Err(why) => {
                sink.refused(&name, why);
                span
            }
            Ok((true, path)) => {
                sink.dir(path).map_err(TarError::Write)?;
                span
            }
            Ok((false, path)) => {
                let mut data = EntryData {
                    stream: &mut s,
                    left: size,
                    failed: None,
                };
                let result = sink.file(path, size, &mut data);
                if let Some(e) = data.failed {
                    return Err(e);
                }
                result.map_err(TarError::Write)?;
                span - (size - data.left)
            }
        };
        s.skip(rest)?;
    }
}
