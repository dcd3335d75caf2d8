//! The settings that take one word out of a fixed few (network, sync mode,
//! backend, share protocol, engine, agent): one enum each, with the
//! spellings `agent.toml`, `config.json`, the environment and the flags
//! all use.
//!
//! Each reads only from a string: `engine = "qemu"` is an engine, while
//! `engine = 3` or a table such as `engine = { qemu = {} }` is refused, and
//! the error lists every accepted spelling (`one of "auto", "vmm", "qemu"`).

use std::fmt;
use std::marker::PhantomData;
use std::str::FromStr;

use serde::de::{self, Deserializer, Unexpected, Visitor};
use serde::{Deserialize, Serialize};

/// Declares a string-valued setting: an enum with its spellings.
macro_rules! choice {
    ($(#[$meta:meta])* $name:ident { $($variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
        pub enum $name {
            $(#[serde(rename = $text)] #[value(name = $text)] $variant),+
        }

        impl $name {
            /// Every accepted spelling, for messages.
            pub const CHOICES: &'static [&'static str] = &[$($text),+];

            pub fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $text),+ }
            }
        }

        impl FromStr for $name {
            type Err = ();
            fn from_str(s: &str) -> Result<Self, ()> {
                match s { $($text => Ok(Self::$variant),)+ _ => Err(()) }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                d.deserialize_str(OneOf { choices: Self::CHOICES, of: PhantomData })
            }
        }
    };
}

choice!(
    /// Guest networking.
    Network { Nat = "nat", None = "none", Bridge = "bridge" }
);
choice!(
    /// When the sandbox's commits move to the host.
    SyncMode { Manual = "manual", AutoCommit = "auto-commit", AutoIdle = "auto-idle" }
);
choice!(
    /// Which backend runs sandboxes.
    BackendKind { MicroVm = "microvm", Kubernetes = "kubernetes" }
);
choice!(
    /// How the workspace is shared with a micro-VM.
    ShareProto { VirtioFs = "virtiofs" }
);
choice!(
    /// Which engine runs a micro-VM: our VMM on KVM, QEMU's software
    /// emulation, or the best the host allows.
    Engine { Auto = "auto", Vmm = "vmm", Qemu = "qemu" }
);
choice!(
    /// The coding agent the sandbox's terminal session opens with (all
    /// three are in the guest image).
    AgentKind { Claude = "claude", Codex = "codex", Gemini = "gemini" }
);

/// Reads a `T` from a string that is one of `choices`; anything else is
/// serde's "invalid type" or "invalid value", expecting those spellings.
struct OneOf<T> {
    choices: &'static [&'static str],
    of: PhantomData<T>,
}

impl<T: FromStr> Visitor<'_> for OneOf<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("one of ")?;
        for (i, choice) in self.choices.iter().enumerate() {
            let comma = if i == 0 { "" } else { ", " };
            write!(f, "{comma}\"{choice}\"")?;
        }
        Ok(())
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        v.parse()
            .map_err(|_| E::invalid_value(Unexpected::Str(v), &self))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_spelling_reads_back_and_nothing_else_does() {
        for name in SyncMode::CHOICES {
            let json = format!("\"{name}\"");
            let mode: SyncMode = serde_json::from_str(&json).unwrap();
            assert_eq!(mode.as_str(), *name);
            assert_eq!(serde_json::to_string(&mode).unwrap(), json);
        }
        let err = serde_json::from_str::<SyncMode>("\"auto_commit\"")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("one of \"manual\", \"auto-commit\", \"auto-idle\""),
            "{err}"
        );
        // Only the string form: not serde's `{"variant": null}` one.
        assert!(serde_json::from_str::<Engine>("{\"qemu\": null}").is_err());
        assert!(serde_json::from_str::<Engine>("3").is_err());
    }
}
