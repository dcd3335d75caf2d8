//! One side of an agent conversation as a script: frames encoded with the
//! real encoder ([`write_frame`]), then broken the way a faulty or hostile
//! peer would break them (lengths past the cap or off by one, unknown
//! kinds, mangled JSON, control characters in strings, frames dropped,
//! repeated or cut short), for the agent protocol fuzz tests.

// Each test binary uses a part of the script.
#![allow(dead_code)]

use serde::Serialize;

use crate::fuzz_support::{mutate, Rng};
use keystone_guest_agent::protocol::{write_frame, Frame, FrameKind, MAX_PAYLOAD};

/// Every kind, and bytes that are none.
pub const KIND_BYTES: &[u8] = &[
    0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x10, 0x11, 0x12, 0x13, 0x14, 0x20, 0x21, 0x22, 0x23, 0x30,
    0x31, 0x32, 0xff,
];

/// Text a hostile peer puts where a terminal may show it.
pub const NASTY_TEXT: &[&str] = &[
    "\u{1b}[2J\u{1b}[31mrm -rf /\u{1b}[0m",
    "\u{1b}]0;owned\u{7}",
    "line\nkeystone: all good\r",
    "\u{9b}31m",
    "\u{0}\u{7f}",
];

/// Encoded frames in order, and where the byte stream is cut, if it is.
#[derive(Default)]
pub struct Script {
    frames: Vec<Vec<u8>>,
    cut: Option<usize>,
}

impl Script {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn frame(&mut self, frame: &Frame) -> &mut Self {
        let mut bytes = Vec::new();
        write_frame(&mut bytes, frame).unwrap();
        self.frames.push(bytes);
        self
    }

    pub fn json<T: Serialize>(&mut self, kind: FrameKind, value: &T) -> &mut Self {
        self.frame(&Frame::json(kind, value))
    }

    pub fn data(&mut self, kind: FrameKind, payload: Vec<u8>) -> &mut Self {
        self.frame(&Frame::new(kind, payload))
    }

    /// Bytes outside any frame (a relay's raw data, or garbage).
    pub fn raw(&mut self, bytes: Vec<u8>) -> &mut Self {
        self.frames.push(bytes);
        self
    }

    /// Breaks the script one to three ways, or not at all.
    pub fn mutate(&mut self, rng: &mut Rng) {
        for _ in 0..rng.below(4) {
            let n = self.frames.len();
            if n == 0 {
                return;
            }
            let i = rng.below(n);
            match rng.below(10) {
                0..=5 => mutate_frame(rng, &mut self.frames[i]),
                6 => {
                    let copy = self.frames[i].clone();
                    self.frames.insert(rng.below(n + 1), copy);
                }
                7 => drop(self.frames.remove(i)),
                8 => self.frames.swap(i, rng.below(n)),
                _ => self.cut = Some(rng.below(self.len() + 1)),
            }
        }
    }

    pub fn frames(&self) -> usize {
        self.frames.len()
    }

    pub fn len(&self) -> usize {
        self.frames.iter().map(Vec::len).sum()
    }

    pub fn bytes(&self) -> Vec<u8> {
        let mut all = self.frames.concat();
        if let Some(cut) = self.cut {
            all.truncate(cut);
        }
        all
    }
}

/// Breaks one encoded frame (header `len: u32 LE`, `kind: u8`, payload).
fn mutate_frame(rng: &mut Rng, f: &mut Vec<u8>) {
    if f.len() < 5 {
        mutate(rng, f);
        return;
    }
    let claimed = u32::from_le_bytes([f[0], f[1], f[2], f[3]]);
    let set_len = |f: &mut Vec<u8>, len: u32| f[..4].copy_from_slice(&len.to_le_bytes());
    match rng.below(6) {
        0 => {
            let cap = MAX_PAYLOAD as u32;
            let edges = [
                0,
                claimed.wrapping_sub(1),
                claimed.wrapping_add(1),
                cap,
                cap + 1,
                1 << 31,
                u32::MAX,
            ];
            set_len(f, rng.pick(&edges));
        }
        1 => f[4] = rng.pick(KIND_BYTES),
        2 | 3 => {
            // Mangled payload with a header that still matches it (half
            // the time): the decoder gets whole frames of bad content.
            let mut payload = f.split_off(5);
            mutate(rng, &mut payload);
            if let Some(at) = payload.iter().position(|&b| b == b'"') {
                if rng.one_in(2) {
                    // Inside a JSON string: escaped (valid JSON) or raw.
                    let nasty = rng.pick(NASTY_TEXT);
                    let text: String = if rng.one_in(2) {
                        nasty
                            .chars()
                            .map(|c| format!("\\u{:04x}", c as u32))
                            .collect()
                    } else {
                        nasty.to_string()
                    };
                    payload.splice(at + 1..at + 1, text.into_bytes());
                }
            }
            if rng.one_in(2) {
                set_len(f, payload.len() as u32);
            }
            f.extend_from_slice(&payload);
        }
        4 => f.truncate(rng.below(f.len())),
        _ => {
            let len = rng.pick(&[0usize, 1, 4, 1 << 16, 1 << 20]);
            f.truncate(5);
            f.resize(5 + len, rng.next() as u8);
            set_len(f, len as u32);
        }
    }
}
