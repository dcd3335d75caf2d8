//! What the fuzz tests share: a small deterministic PRNG, byte mutations,
//! and the run budget. The vsock tests here and the agent protocol tests
//! (`guest-image/agent/tests/`, which include this file) use it.
//!
//! Every run is reproducible from its seed. By default a run uses a fixed
//! seed and stops after a fixed number of iterations or a time cap,
//! whichever comes first, so `cargo test` stays fast on a small machine.
//! A longer run by hand:
//!
//! ```text
//! KEYSTONE_FUZZ_SEED=0x1234 KEYSTONE_FUZZ_ITERATIONS=1000000 \
//!     cargo test -p vsock-lite --release --test vsock_fuzz
//! ```
//!
//! Setting `KEYSTONE_FUZZ_ITERATIONS` lifts the time cap unless
//! `KEYSTONE_FUZZ_SECONDS` sets one.

// Each test binary uses a part of this.
#![allow(dead_code)]

use std::time::{Duration, Instant};

/// xorshift64*: small, deterministic, good enough to pick mutations.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        // xorshift must not start at zero.
        Self(seed.max(1))
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// A value in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    /// True once in `n` times.
    pub fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }
    pub fn pick<T: Copy>(&mut self, v: &[T]) -> T {
        v[self.below(v.len())]
    }
}

/// Values that tend to break length and counter arithmetic.
pub const EDGE_U32: &[u32] = &[
    0,
    1,
    43,
    44,
    45,
    0xffff,
    0x1_0000,
    0x1_0001,
    1 << 31,
    u32::MAX,
];

/// Applies zero to three byte-level mutations to `bytes`.
pub fn mutate(rng: &mut Rng, bytes: &mut Vec<u8>) {
    for _ in 0..rng.below(4) {
        match rng.below(6) {
            0 if !bytes.is_empty() => {
                let i = rng.below(bytes.len());
                bytes[i] ^= 1 << rng.below(8);
            }
            1 if !bytes.is_empty() => {
                let i = rng.below(bytes.len());
                bytes[i] = rng.next() as u8;
            }
            2 => bytes.truncate(rng.below(bytes.len() + 1)),
            3 => {
                let n = rng.below(64);
                bytes.extend((0..n).map(|_| rng.next() as u8));
            }
            4 if bytes.len() >= 4 => {
                let i = rng.below(bytes.len() - 3);
                let v = rng.pick(EDGE_U32);
                bytes[i..i + 4].copy_from_slice(&v.to_le_bytes());
            }
            _ => {}
        }
    }
}

/// How long a fuzz test runs and from which seed.
pub struct Budget {
    pub seed: u64,
    iterations: u64,
    deadline: Option<Instant>,
    started: Instant,
}

fn env_u64(name: &str) -> Option<u64> {
    let text = std::env::var(name).ok()?;
    let text = text.trim();
    let parsed = match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => text.parse(),
    };
    match parsed {
        Ok(v) => Some(v),
        Err(_) => panic!("{name}={text:?} is not a number"),
    }
}

impl Budget {
    /// The budget of test `name`: its default seed, iteration count and
    /// time cap, each overridable from the environment.
    pub fn from_env(name: &str, seed: u64, iterations: u64, cap: Duration) -> Self {
        let seed = env_u64("KEYSTONE_FUZZ_SEED").unwrap_or(seed);
        let env_iterations = env_u64("KEYSTONE_FUZZ_ITERATIONS");
        let cap = match (env_u64("KEYSTONE_FUZZ_SECONDS"), env_iterations) {
            (Some(s), _) => Some(Duration::from_secs(s)),
            (None, Some(_)) => None,
            (None, None) => Some(cap),
        };
        let iterations = env_iterations.unwrap_or(iterations);
        eprintln!(
            "{name}: seed {seed:#x}, up to {iterations} iterations, time cap {cap:?} \
             (KEYSTONE_FUZZ_SEED, KEYSTONE_FUZZ_ITERATIONS, KEYSTONE_FUZZ_SECONDS)"
        );
        let started = Instant::now();
        Self {
            seed,
            iterations,
            deadline: cap.map(|c| started + c),
            started,
        }
    }

    /// Whether iteration number `done` (counting from 0) should run.
    pub fn more(&self, done: u64) -> bool {
        done < self.iterations && self.deadline.is_none_or(|d| Instant::now() < d)
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }
}
