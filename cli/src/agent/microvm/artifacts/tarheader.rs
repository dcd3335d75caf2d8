//! The fields of one POSIX tar header block and of a pax extended header,
//! decoded without trusting them: every number is range-checked, every
//! header's checksum verified, and only the POSIX `ustar\000` magic (what
//! `tar --format=pax` writes) is accepted. `tarcheck.rs` drives these.

/// A tar block.
pub const BLOCK: u64 = 512;

/// The parts of a header the checks use.
#[derive(Debug, PartialEq, Eq)]
pub struct Header {
    /// `prefix/name` (or `name`), as stored: unchecked bytes.
    pub name: Vec<u8>,
    /// The data that follows, in bytes (before padding).
    pub size: u64,
    /// The entry type (`0` file, `5` directory, `x` pax header, ...).
    pub typeflag: u8,
}

/// Byte ranges of the ustar fields used.
const NAME: (usize, usize) = (0, 100);
const SIZE: (usize, usize) = (124, 136);
const CHECKSUM: (usize, usize) = (148, 156);
const TYPEFLAG: usize = 156;
const MAGIC: (usize, usize) = (257, 265);
const PREFIX: (usize, usize) = (345, 500);

impl Header {
    /// Decodes one header block; the error says what is wrong with it.
    pub fn parse(block: &[u8; BLOCK as usize]) -> Result<Header, &'static str> {
        let field = |(from, to): (usize, usize)| &block[from..to];
        let stored = octal(field(CHECKSUM)).ok_or("a bad checksum field")?;
        // The checksum counts its own field as spaces; some writers sum
        // signed bytes.
        let (mut unsigned, mut signed) = (0u64, 0i64);
        for (i, b) in block.iter().enumerate() {
            let b = if (CHECKSUM.0..CHECKSUM.1).contains(&i) {
                b' '
            } else {
                *b
            };
            unsigned += u64::from(b);
            signed += i64::from(b as i8);
        }
        if stored != unsigned && i64::try_from(stored).ok() != Some(signed) {
            return Err("a wrong checksum");
        }
        if field(MAGIC) != b"ustar\x0000" {
            return Err("not a POSIX ustar header");
        }
        let size = number(field(SIZE)).ok_or("a bad size field")?;
        let name = until_nul(field(NAME));
        let prefix = until_nul(field(PREFIX));
        let name = if prefix.is_empty() {
            name.to_vec()
        } else {
            [prefix, b"/", name].concat()
        };
        Ok(Header {
            name,
            size,
            typeflag: block[TYPEFLAG],
        })
    }
}

/// The bytes before the first NUL.
fn until_nul(field: &[u8]) -> &[u8] {
    let end = field.iter().position(|b| *b == 0).unwrap_or(field.len());
    &field[..end]
}

/// A numeric field: octal digits (leading spaces, then NUL or space to
/// the end; all empty is 0), or GNU's base-256 form for a positive
/// number.
fn number(field: &[u8]) -> Option<u64> {
    match field.first() {
        Some(0x80) => field[1..]
            .iter()
            .try_fold(0u64, |n, b| n.checked_mul(256)?.checked_add(u64::from(*b))),
        Some(b) if b & 0x80 != 0 => None,
        _ => octal(field),
    }
}

/// An octal field as tar writes it.
fn octal(field: &[u8]) -> Option<u64> {
    let start = field.iter().position(|b| *b != b' ')?;
    let digits = &field[start..];
    let end = digits
        .iter()
        .position(|b| *b == 0 || *b == b' ')
        .unwrap_or(digits.len());
    if !digits[end..].iter().all(|b| *b == 0 || *b == b' ') {
        return None;
    }
    digits[..end].iter().try_fold(0u64, |n, d| match d {
        b'0'..=b'7' => n.checked_mul(8)?.checked_add(u64::from(d - b'0')),
        _ => None,
    })
}

/// The records of one pax extended header that the checks apply.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Pax {
    /// `path`: replaces the header's name.
    pub path: Option<Vec<u8>>,
    /// `size`: replaces the header's size.
    pub size: Option<u64>,
    /// Any `GNU.sparse.*` record: the entry is a sparse file.
    pub sparse: bool,
}

impl Pax {
    /// Parses `LEN KEY=VALUE\n` records; anything malformed is an error.
    /// Records other than the ones above (times, owners) are ignored.
    pub fn parse(mut data: &[u8]) -> Result<Pax, &'static str> {
        let malformed = "a malformed pax record";
        let mut pax = Pax::default();
        while !data.is_empty() {
            let space = data
                .iter()
                .take(21)
                .position(|b| *b == b' ')
                .ok_or(malformed)?;
            let len = decimal(&data[..space]).ok_or(malformed)?;
            let len = usize::try_from(len).map_err(|_| malformed)?;
            if len <= space + 1 || len > data.len() {
                return Err(malformed);
            }
            let (record, rest) = data.split_at(len);
            let body = record[space + 1..].strip_suffix(b"\n").ok_or(malformed)?;
            let eq = body.iter().position(|b| *b == b'=').ok_or(malformed)?;
            let (key, value) = (&body[..eq], &body[eq + 1..]);
            match key {
                b"path" => pax.path = Some(value.to_vec()),
                b"size" => pax.size = Some(decimal(value).ok_or("a bad pax size")?),
                k if k.starts_with(b"GNU.sparse.") => pax.sparse = true,
                _ => {}
            }
            data = rest;
        }
        Ok(pax)
    }
}

/// A decimal number of ASCII digits (at least one), without overflow.
fn decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 20 {
        return None;
    }
    digits.iter().try_fold(0u64, |n, d| {
        if d.is_ascii_digit() {
            n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
        } else {
            None
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_octal_or_base_256_and_never_overflow() {
        assert_eq!(octal(b"00000001750\0"), Some(1000));
        assert_eq!(octal(b"  17 \0\0"), Some(15));
        assert_eq!(octal(b"\0\0\0"), Some(0));
        assert_eq!(octal(b"0008\0"), None);
        assert_eq!(octal(b"1 2\0"), None);
        assert_eq!(octal(b"7777777777777777777777777"), None);
        let mut big = [0u8; 12];
        big[0] = 0x80;
        big[11] = 5;
        assert_eq!(number(&big), Some(5));
        big[1] = 1;
        assert_eq!(number(&big), None, "2^80 does not fit");
        assert_eq!(number(&[0xff; 12]), None, "negative");
        assert_eq!(decimal(b"99999999999999999999"), None);
        assert_eq!(decimal(b"+1"), None);
    }

    #[test]
    fn pax_records_are_strict() {
        let p = Pax::parse(b"12 path=a/b\n11 size=42\n").unwrap();
        assert_eq!((p.path.as_deref(), p.size), (Some(&b"a/b"[..]), Some(42)));
        assert!(
            Pax::parse(b"30 mtime=1.5\n").is_err(),
            "length past the end"
        );
        assert!(Pax::parse(b"11 path=a/b\n").is_err(), "length one short");
        assert!(Pax::parse(b"9 pathab\n").is_err(), "no =");
        assert!(Pax::parse(b"0 \n").is_err());
        assert!(Pax::parse(b"x path=a\n").is_err());
        assert!(Pax::parse(b"22 GNU.sparse.major=1\n").unwrap().sparse);
        assert!(Pax::parse(b"14 size=-1000\n").is_err());
    }
}
