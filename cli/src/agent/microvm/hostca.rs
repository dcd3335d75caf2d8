//! The host's locally added certificate authorities, trusted in the
//! sandbox too: the certificates under `/usr/local/share/ca-certificates`
//! (where Debian and Ubuntu keep the ones an administrator added, such as
//! a TLS-inspecting corporate proxy's CA or mkcert's development CA). Where
//! the host's own HTTPS works only because it trusts such a CA, the
//! sandbox's outbound HTTPS (which leaves through the same network) needs
//! it as well. Only certificates travel: a file holding a private key is
//! skipped, and only with `--network nat`.

use std::path::Path;

use keystone_guest_agent::client::ClientError;
use keystone_guest_agent::protocol::{ExecRequest, UserSpec};

use super::super::naming;

/// Where the host's added authorities are.
pub const HOST_DIR: &str = "/usr/local/share/ca-certificates";
/// Bounds on what is carried (a real CA certificate is a few KiB).
const MAX_FILE: u64 = 64 << 10;
const MAX_TOTAL: usize = 96 << 10;

/// The PEM certificates under `dir` (one level of subfolders), by name.
pub fn host_certificates(dir: &Path) -> Vec<(String, String)> {
    let mut found = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    if let Ok(entries) = std::fs::read_dir(dir) {
        dirs.extend(
            entries
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path()),
        );
    }
    let mut total = 0;
    for d in dirs {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        let mut files: Vec<_> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "crt"))
            .collect();
        files.sort();
        for path in files {
            let small = path
                .metadata()
                .is_ok_and(|m| m.is_file() && m.len() <= MAX_FILE);
            let Some(text) = small.then(|| std::fs::read_to_string(&path).ok()).flatten() else {
                continue;
            };
            let only_certificates =
                text.contains("-----BEGIN CERTIFICATE-----") && !text.contains("PRIVATE KEY");
            if !only_certificates || total + text.len() > MAX_TOTAL {
                continue;
            }
            total += text.len();
            found.push((path.display().to_string(), text));
        }
    }
    found
}

/// For an agent before protocol 1.6: run as root in the guest with the
/// certificates as `$1` and their name as `$2`, it does what
/// `TrustCertificates` does, with shell built-ins only.
const SCRIPT: &str = r#"set -eu
f=/usr/local/share/ca-certificates/$2
[ -e "$f" ] && exit 0
printf '%s\n' "$1" >> /etc/ssl/certs/ca-certificates.crt
printf '%s\n' "$1" > "$f"
"#;

/// Why the certificates were not added.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The guest agent did not add them, or did not run the script to
    /// the end.
    #[error("{0}")]
    Agent(#[source] ClientError),
    /// The script failed; its standard error, shown as one escaped line.
    #[error("{}", crate::shown::bytes(.0))]
    Script(Vec<u8>),
}

/// Adds `certs` to the guest's trust store, once per distinct set (named
/// by its hash); returns how many.
pub fn import(
    client: &keystone_guest_agent::AgentClient,
    certs: &[(String, String)],
) -> Result<usize, ImportError> {
    if certs.is_empty() {
        return Ok(0);
    }
    let pem: String = certs
        .iter()
        .map(|(_, text)| text.trim())
        .collect::<Vec<_>>()
        .join("\n");
    let name = format!("keystone-host-{:016x}.crt", naming::fnv1a(pem.as_bytes()));
    match client.trust_certificates(&name, &pem) {
        Ok(()) => return Ok(certs.len()),
        Err(ClientError::Unsupported { .. }) => {}
        Err(e) => return Err(ImportError::Agent(e)),
    }
    let request = ExecRequest {
        user: Some(UserSpec::Uid(0)),
        cwd: Some("/".into()),
        ..ExecRequest::new(&["sh", "-c", SCRIPT, "sh", &pem, &name])
    };
    let out = client
        .exec_request_output(request)
        .map_err(ImportError::Agent)?;
    if !out.status.success() {
        return Err(ImportError::Script(out.stderr));
    }
    Ok(certs.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_certificates_are_carried() {
        let dir = std::env::temp_dir().join(format!("ks-hostca-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("corp")).unwrap();
        let cert = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        std::fs::write(dir.join("a.crt"), cert).unwrap();
        std::fs::write(dir.join("corp/b.crt"), cert).unwrap();
        std::fs::write(
            dir.join("with-key.crt"),
            format!("{cert}-----BEGIN PRIVATE KEY-----\nx\n-----END PRIVATE KEY-----\n"),
        )
        .unwrap();
        std::fs::write(dir.join("notes.txt"), cert).unwrap();
        std::fs::write(dir.join("empty.crt"), "").unwrap();
        let names: Vec<String> = host_certificates(&dir)
            .into_iter()
            .map(|(n, _)| n.rsplit('/').next().unwrap_or_default().to_string())
            .collect();
        assert_eq!(names, ["a.crt", "b.crt"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
