//! `TrustCertificates`: adds the host's certificate authorities to the
//! guest's trust store, in the agent itself (a shell and its processes
//! cost a noticeable part of a start on an emulating KVM).
//!
//! The certificates are kept as `<dir>/<name>`, where
//! `update-ca-certificates` finds them on a later rebuild of the bundle,
//! and appended to the bundle that curl, git and OpenSSL read. The kept
//! file is written last: its presence says the bundle has them, so a
//! repeated request (every start of the same sandbox) writes nothing, and
//! one that failed half way is done again in full.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

/// Where the trusted certificates go.
#[derive(Debug, Clone)]
pub struct TrustStore {
    /// The folder of locally added authorities.
    pub dir: PathBuf,
    /// The bundle of every trusted authority.
    pub bundle: PathBuf,
}

impl TrustStore {
    /// Debian's store, as the guest image has it.
    pub fn system() -> Self {
        Self {
            dir: "/usr/local/share/ca-certificates".into(),
            bundle: "/etc/ssl/certs/ca-certificates.crt".into(),
        }
    }
}

/// Why the certificates were not added.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("refusing the certificate file name {0:?}: a plain name ending in .crt is expected")]
    BadName(String),
    #[error("refusing to trust what is not only PEM certificates")]
    NotCertificates,
    #[error("adding certificate authorities to {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
}

/// The longest PEM text taken (the host sends a few KiB).
const MAX_PEM: usize = 256 << 10;

/// Whether `name` is a plain file name for the store.
fn good_name(name: &str) -> bool {
    name.len() <= 128
        && name.ends_with(".crt")
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

/// Whether `pem` holds certificate blocks and nothing else that matters
/// (a key, say).
fn only_certificates(pem: &str) -> bool {
    pem.len() <= MAX_PEM
        && pem.contains("-----BEGIN CERTIFICATE-----")
        && pem
            .lines()
            .filter(|l| l.starts_with("-----BEGIN "))
            .all(|l| l.trim_end() == "-----BEGIN CERTIFICATE-----")
}

/// Adds `pem` to `store` under `name`, unless `name` is there already.
pub fn trust(store: &TrustStore, name: &str, pem: &str) -> Result<(), TrustError> {
    if !good_name(name) {
        return Err(TrustError::BadName(name.to_string()));
    }
    if !only_certificates(pem) {
        return Err(TrustError::NotCertificates);
    }
    let kept = store.dir.join(name);
    if fs::symlink_metadata(&kept).is_ok() {
        return Ok(());
    }
    let io_err = |path: &PathBuf| {
        let path = path.display().to_string();
        move |source| TrustError::Io { path, source }
    };
    let text = format!("{}\n", pem.trim_end());
    let mut bundle = fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&store.bundle)
        .map_err(io_err(&store.bundle))?;
    bundle
        .write_all(text.as_bytes())
        .map_err(io_err(&store.bundle))?;
    fs::create_dir_all(&store.dir).map_err(io_err(&store.dir))?;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(&kept)
        .map_err(io_err(&kept))?;
    f.write_all(text.as_bytes()).map_err(io_err(&kept))
}

#[cfg(test)]
mod tests {
    use super::*;
    use keystone_test_kit::ScratchDir;

    const CERT: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----";

    fn store(dir: &ScratchDir) -> TrustStore {
        TrustStore {
            dir: dir.path().join("local"),
            bundle: dir.path().join("bundle.crt"),
        }
    }

    #[test]
    fn certificates_reach_the_bundle_once_per_name() {
        let dir = ScratchDir::new("agent-certs");
        let store = store(&dir);
        fs::write(&store.bundle, "-----BEGIN CERTIFICATE-----\nOLD\n").unwrap();
        trust(&store, "keystone-host-1.crt", CERT).unwrap();
        trust(&store, "keystone-host-1.crt", CERT).unwrap();
        let bundle = fs::read_to_string(&store.bundle).unwrap();
        assert!(bundle.starts_with("-----BEGIN CERTIFICATE-----\nOLD\n"));
        assert_eq!(bundle.matches("MIIB").count(), 1, "{bundle}");
        let kept = fs::read_to_string(store.dir.join("keystone-host-1.crt")).unwrap();
        assert_eq!(kept, format!("{CERT}\n"));
        trust(&store, "keystone-host-2.crt", CERT).unwrap();
        let bundle = fs::read_to_string(&store.bundle).unwrap();
        assert_eq!(bundle.matches("MIIB").count(), 2, "{bundle}");
    }

    #[test]
    fn names_that_leave_the_folder_and_keys_are_refused() {
        let dir = ScratchDir::new("agent-certs-refused");
        let store = store(&dir);
        for name in ["../x.crt", "a/b.crt", ".hidden.crt", "x.pem", "", "x y.crt"] {
            assert!(
                matches!(trust(&store, name, CERT), Err(TrustError::BadName(_))),
                "{name:?}"
            );
        }
        let with_key = format!("{CERT}\n-----BEGIN PRIVATE KEY-----\nx\n-----END PRIVATE KEY-----");
        for pem in [with_key.as_str(), "", "not pem"] {
            assert!(
                matches!(
                    trust(&store, "k.crt", pem),
                    Err(TrustError::NotCertificates)
                ),
                "{pem:?}"
            );
        }
        assert!(!store.bundle.exists(), "nothing is written for a refusal");
    }

    #[test]
    fn a_bundle_that_is_a_symlink_is_not_followed() {
        let dir = ScratchDir::new("agent-certs-link");
        let store = store(&dir);
        let elsewhere = dir.path().join("elsewhere");
        fs::write(&elsewhere, "").unwrap();
        std::os::unix::fs::symlink(&elsewhere, &store.bundle).unwrap();
        assert!(matches!(
            trust(&store, "k.crt", CERT),
            Err(TrustError::Io { .. })
        ));
        assert_eq!(fs::read_to_string(&elsewhere).unwrap(), "");
    }
}
