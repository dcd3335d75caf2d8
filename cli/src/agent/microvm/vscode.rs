//! `keystone agent open-vscode`: VS Code's Remote-SSH reaches the sandbox
//! with no SSH service in the guest and no network interface between the
//! two.
//!
//! Each connection is one `sshd -i` in the guest, speaking SSH on its
//! standard input and output, which the hidden `__ssh-proxy` subcommand
//! relays over the agent's vsock stream: the sandbox's ssh host entry
//! names that subcommand as its `ProxyCommand`. The keys are the
//! sandbox's own: a client key pair made on the host in the sandbox
//! folder (its public half is handed to sshd for each connection; it
//! opens this sandbox and nothing else) and a host key made in the guest
//! on first use, which persists in the sandbox's root overlay and is
//! pinned in a known-hosts file beside the client key. Nothing of the
//! host's own SSH keys or agent is used or forwarded.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use keystone_guest_agent::protocol::{RawStreamRequest, UserSpec};

use super::super::backend::{BackendError, BackendResult, SandboxSpec, VscodeTarget};
use super::super::fsutil;
use super::engine::{Layout, GUEST_USER, GUEST_WORKSPACE};
use super::guest;

/// The hidden subcommand an ssh `ProxyCommand` runs.
pub const SSH_PROXY_SUBCOMMAND: &str = "__ssh-proxy";

/// The ssh host name of a sandbox.
pub fn ssh_host(name: &str) -> String {
    format!("keystone-{name}")
}

/// Where a sandbox keeps its ssh files (client key, host entry, known host).
fn ssh_dir(spec: &SandboxSpec) -> PathBuf {
    spec.paths.dir.join("ssh")
}

/// Run in the guest as root for each connection, with the client's public
/// key as `$1`: makes the sandbox's host key once (under a lock, so two
/// first connections agree on it), then becomes `sshd -i`.
const SSHD_SCRIPT: &str = r#"set -e
umask 022
mkdir -p /run/sshd /run/keystone-ssh
printf '%s\n' "$1" > /run/keystone-ssh/authorized_keys
k=/etc/ssh/ssh_host_ed25519_key
exec 9>/run/keystone-ssh/lock
flock 9
if [ ! -s "$k" ]; then
	rm -f "$k.new" "$k.new.pub"
	ssh-keygen -q -t ed25519 -N '' -C "$(hostname)" -f "$k.new"
	mv "$k.new.pub" "$k.pub"
	mv "$k.new" "$k"
fi
exec 9>&-
exec /usr/sbin/sshd -i -e -h "$k" \
	-o AuthorizedKeysFile=/run/keystone-ssh/authorized_keys \
	-o PasswordAuthentication=no -o KbdInteractiveAuthentication=no \
	-o PermitRootLogin=prohibit-password -o UsePAM=no -o LogLevel=ERROR
"#;

/// Makes the sandbox an ssh host (keys and host entry) and tries to
/// include the sandboxes' entries in `~/.ssh/config`.
pub fn prepare(spec: &SandboxSpec) -> BackendResult<VscodeTarget> {
    let dir = ssh_dir(spec);
    let failed =
        |what: &str, e: io::Error| BackendError::Failed(format!("{what} {}: {e}", dir.display()));
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(|e| failed("cannot create", e))?;
    let key = dir.join("id_ed25519");
    if !key.exists() {
        make_client_key(&key, &spec.name)?;
    }
    let entry = host_entry(spec, &dir, &key)?;
    fsutil::write_atomic_mode(&dir.join("config"), entry.as_bytes(), 0o600)
        .map_err(|e| failed("cannot write the ssh host entry in", e))?;

    let mut notes = Vec::new();
    let pattern = include_pattern(spec);
    match home_ssh_config() {
        Some(user_config) => match ensure_include(&user_config, &pattern) {
            Ok(true) => notes.push(format!(
                "added `Include {pattern}` to {} (once, for every sandbox)",
                user_config.display()
            )),
            Ok(false) => {}
            Err(e) => notes.push(format!(
                "could not add `Include {pattern}` to {} ({e}); add that line at its top \
                 (home-manager: programs.ssh.includes) so that VS Code finds {}",
                user_config.display(),
                ssh_host(&spec.name)
            )),
        },
        None => notes.push(format!(
            "HOME is not set: add `Include {pattern}` to your ssh config so that VS Code finds {}",
            ssh_host(&spec.name)
        )),
    }
    notes.push(
        "set \"remote.SSH.localServerDownload\": \"always\" in VS Code so that it copies its \
         server into the sandbox over SSH (the sandbox reaches the network only through its \
         HTTP proxy)"
            .into(),
    );
    Ok(VscodeTarget {
        ssh_host: ssh_host(&spec.name),
        ssh_config: dir.join("config"),
        folder: GUEST_WORKSPACE.into(),
        notes,
    })
}

fn make_client_key(key: &Path, name: &str) -> BackendResult<()> {
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", ""])
        .arg("-C")
        .arg(format!("keystone sandbox {name}"))
        .arg("-f")
        .arg(key)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => BackendError::Requirements(
                "ssh-keygen is not installed: install OpenSSH's client (Debian: apt-get install \
                 openssh-client) for open-vscode"
                    .into(),
            ),
            _ => BackendError::Failed(format!("cannot run ssh-keygen: {e}")),
        })?;
    if !out.status.success() {
        return Err(BackendError::Failed(format!(
            "ssh-keygen failed ({}): {}",
            out.status,
            crate::shown::bytes(&out.stderr)
        )));
    }
    Ok(())
}

/// The `Include` pattern that names every sandbox's host entry.
fn include_pattern(spec: &SandboxSpec) -> String {
    let sandboxes = spec.paths.dir.parent().unwrap_or(&spec.paths.dir);
    config_path(&sandboxes.join("*").join("ssh").join("config"))
}

fn home_ssh_config() -> Option<PathBuf> {
    let home = std::env::var_os("HOME").filter(|h| !h.is_empty())?;
    Some(PathBuf::from(home).join(".ssh").join("config"))
}

/// A path as ssh_config reads it: quoted when it has blanks, `%` doubled
/// (ssh expands `%` tokens in the keywords used here).
fn config_path(path: &Path) -> String {
    let text = path.display().to_string().replace('%', "%%");
    if text.contains(char::is_whitespace) {
        format!("\"{text}\"")
    } else {
        text
    }
}

/// A word for the shell that runs a `ProxyCommand`.
fn shell_word(word: &str) -> String {
    if !word.is_empty()
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-+=:,@".contains(&b))
    {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

fn host_entry(spec: &SandboxSpec, dir: &Path, key: &Path) -> BackendResult<String> {
    let exe = std::env::current_exe()
        .map_err(|e| BackendError::Failed(format!("cannot find the keystone binary: {e}")))?;
    // The proxy finds the sandbox through the same state and config
    // directories as this command, whatever environment ssh is run from.
    let mut proxy = String::new();
    let vars: Vec<String> = ["XDG_STATE_HOME", "XDG_CONFIG_HOME"]
        .iter()
        .filter_map(|k| {
            let v = std::env::var(k).ok().filter(|v| !v.is_empty())?;
            Some(shell_word(&format!("{k}={v}")))
        })
        .collect();
    if !vars.is_empty() {
        proxy.push_str("env ");
        proxy.push_str(&vars.join(" "));
        proxy.push(' ');
    }
    proxy.push_str(&format!(
        "{} agent {SSH_PROXY_SUBCOMMAND} {}",
        shell_word(&exe.display().to_string()),
        shell_word(&spec.name)
    ));
    let host = ssh_host(&spec.name);
    Ok(format!(
        "# Written by `keystone agent open-vscode`; removed with the sandbox.\n\
         Host {host}\n\
         \tUser {GUEST_USER}\n\
         \tProxyCommand {}\n\
         \tIdentityFile {}\n\
         \tIdentitiesOnly yes\n\
         \tIdentityAgent none\n\
         \tForwardAgent no\n\
         \tHostKeyAlias {host}\n\
         \tUserKnownHostsFile {}\n\
         \tStrictHostKeyChecking accept-new\n",
        proxy.replace('%', "%%"),
        config_path(key),
        config_path(&dir.join("known_hosts")),
    ))
}

/// Puts `Include PATTERN` at the top of the user's ssh config unless a line
/// says so already; true when it was added.
fn ensure_include(config: &Path, pattern: &str) -> io::Result<bool> {
    let line = format!("Include {pattern}");
    let old = match fs::read_to_string(config) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e),
    };
    if old.lines().any(|l| l.trim() == line) {
        return Ok(false);
    }
    if let Some(parent) = config.parent() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)?;
    }
    // At the top: an Include after a `Host` line would belong to that host.
    let text = format!(
        "# Keystone sandboxes as ssh hosts keystone-<name> (keystone agent open-vscode)\n{line}\n\n{old}"
    );
    // Rewritten in place (not replaced), so a symlinked config keeps its
    // link and mode.
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(config)?;
    f.write_all(text.as_bytes())?;
    f.set_len(text.len() as u64)?;
    f.sync_all()?;
    Ok(true)
}

/// `keystone agent __ssh-proxy NAME`: one `sshd -i` in the guest on our
/// standard input and output.
pub fn ssh_proxy(spec: &SandboxSpec) -> anyhow::Result<i32> {
    let name = &spec.name;
    let public = ssh_dir(spec).join("id_ed25519.pub");
    let key = fs::read_to_string(&public).map_err(|e| {
        BackendError::NotFound(format!(
            "{}: {e}; run `keystone agent open-vscode {name}` first",
            public.display()
        ))
        .coded()
    })?;
    let request = RawStreamRequest {
        argv: vec![
            "sh".into(),
            "-c".into(),
            SSHD_SCRIPT.into(),
            "sh".into(),
            key.trim().into(),
        ],
        cwd: Some("/".into()),
        env: Vec::new(),
        user: Some(UserSpec::Name("root".into())),
    };
    // An interactive session (VS Code's server, a shell): no byte limit
    // and no idle deadline; the user ends it.
    guest::pipe_stdio(
        &Layout::new(&spec.paths).vsock,
        request,
        "sshd in the sandbox",
        None,
    )
    .map_err(BackendError::coded)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_words_survive_the_shell() {
        assert_eq!(shell_word("/usr/bin/keystone"), "/usr/bin/keystone");
        assert_eq!(shell_word("my app"), "'my app'");
        assert_eq!(shell_word("it's"), r"'it'\''s'");
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!("printf %s {}", shell_word("a 'b' $c \"d\"")))
            .output()
            .unwrap();
        assert_eq!(out.stdout, b"a 'b' $c \"d\"");
    }

    #[test]
    fn config_paths_are_quoted_and_escaped() {
        assert_eq!(config_path(Path::new("/a/b")), "/a/b");
        assert_eq!(config_path(Path::new("/a b/c")), "\"/a b/c\"");
        assert_eq!(config_path(Path::new("/a%b")), "/a%%b");
    }

    #[test]
    fn the_include_goes_on_top_once_and_keeps_the_rest() {
        let dir = std::env::temp_dir().join(format!("ks-vscode-{}", std::process::id()));
        let config = dir.join(".ssh").join("config");
        assert!(ensure_include(&config, "/s/*/ssh/config").unwrap());
        assert!(!ensure_include(&config, "/s/*/ssh/config").unwrap());
        let first = fs::read_to_string(&config).unwrap();
        assert_eq!(first.matches("Include /s/*/ssh/config").count(), 1);

        fs::write(&config, "Host old\n\tUser me\n").unwrap();
        assert!(ensure_include(&config, "/s/*/ssh/config").unwrap());
        let text = fs::read_to_string(&config).unwrap();
        let include = text.find("Include /s/").unwrap();
        let host = text.find("Host old").unwrap();
        assert!(include < host, "{text}");
        assert!(text.ends_with("Host old\n\tUser me\n"), "{text}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
