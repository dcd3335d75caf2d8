//! No input makes the parser or the plan panic: every truncation of a
//! realistic file, random byte mutations of it, and random sequences of
//! JSON-with-comments tokens. Whatever is accepted has escaped warnings.

use std::path::Path;

use super::{plan_from_bytes, DevcontainerError, DevcontainerPlan};

const SAMPLE: &str = r#"// Dev container for the app.
{
  "name": "app ✓",
  /* the image is refused */
  "image": "mcr.microsoft.com/devcontainers/typescript-node:1-20",
  "features": {
    "ghcr.io/devcontainers/features/node:1": {"version": "20"},
    "ghcr.io/devcontainers/features/python:1": "3.12",
    "ghcr.io/devcontainers/features/docker-in-docker:2": {},
  },
  "containerEnv": {"A": "${containerWorkspaceFolder}/x", "B": "${localEnv:HOME}"},
  "remoteEnv": {"PATH": "${containerEnv:PATH}:/extra", "A": null},
  "remoteUser": "node",
  "forwardPorts": [3000, "localhost:5173", "db:5432"],
  "portsAttributes": {"3000": {"label": "Web // not a comment", "onAutoForward": "notify"},
                      "40000-40010": {"protocol": "https"}},
  "onCreateCommand": "npm ci",
  "postCreateCommand": {"a": ["echo", "${devcontainerId}"], "b": "echo \"x,}\""},
  "postStartCommand": ["./start.sh", "--port", "3000",],
  "initializeCommand": "echo host",
}
"#;

/// A small xorshift generator: the same sequence on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn check(bytes: &[u8]) -> Result<DevcontainerPlan, DevcontainerError> {
    let result = plan_from_bytes(
        bytes,
        ".devcontainer.json",
        Path::new("/p/.devcontainer.json"),
        "p",
        "id",
    );
    match &result {
        Ok(plan) => {
            for shown in plan
                .warnings
                .iter()
                .chain(&plan.ignored)
                .chain(&plan.refused)
            {
                assert!(crate::shown::terminal_safe(shown), "{shown:?}");
            }
            assert!(plan.warnings.len() <= super::plan::MAX_WARNINGS + 1);
        }
        Err(e) => assert!(crate::shown::terminal_safe(&e.to_string()), "{e}"),
    }
    result
}

#[test]
fn the_sample_itself_is_a_full_plan() {
    let plan = check(SAMPLE.as_bytes()).unwrap();
    assert_eq!(plan.features.len(), 3);
    assert_eq!(plan.ports.len(), 2);
    assert_eq!(plan.refused.len(), 2);
    assert_eq!(plan.post_create.len(), 2);
    assert_eq!(plan.env["PATH"], ":/extra");
}

#[test]
fn no_input_makes_the_parser_or_the_plan_panic() {
    let started = std::time::Instant::now();
    let sample = SAMPLE.as_bytes();
    // Every truncation.
    for end in 0..=sample.len() {
        let _ = check(&sample[..end]);
    }
    // Random mutations: replace, insert, delete, duplicate a slice.
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let interesting = b"{}[],:\"\\/*\n\r\t $0123456789nulltruefalse\xff\xc3\x1b";
    for _ in 0..1500 {
        let mut bytes = sample.to_vec();
        for _ in 0..1 + rng.below(4) {
            let at = rng.below(bytes.len() + 1);
            match rng.below(4) {
                0 if at < bytes.len() => bytes[at] = interesting[rng.below(interesting.len())],
                1 => bytes.insert(at, interesting[rng.below(interesting.len())]),
                2 if at < bytes.len() => {
                    bytes.remove(at);
                }
                _ => {
                    let len = rng.below(40).min(bytes.len() - at.min(bytes.len()));
                    let piece = bytes[at..at + len].to_vec();
                    bytes.splice(at..at, piece);
                }
            }
        }
        let _ = check(&bytes);
    }
    // Random token soup.
    let tokens: [&str; 16] = [
        "{",
        "}",
        "[",
        "]",
        ",",
        ":",
        "\"k\"",
        "\"${containerEnv:k}\"",
        "1",
        "null",
        "//c\n",
        "/*c*/",
        "\"forwardPorts\"",
        "\"features\"",
        "\"postStartCommand\"",
        "\"containerEnv\"",
    ];
    for _ in 0..1500 {
        let text: String = (0..rng.below(60))
            .map(|_| tokens[rng.below(tokens.len())])
            .collect();
        let _ = check(text.as_bytes());
    }
    // Deep nesting stops at serde_json's limit rather than the stack.
    let deep = format!("{{\"a\": {}{}}}", "[".repeat(100_000), "]".repeat(100_000));
    assert!(check(deep.as_bytes()).is_err());
    let elapsed = started.elapsed();
    assert!(elapsed.as_secs() < 5, "{elapsed:?}");
}
