//! `attach --web`: serves the sandbox's Zellij session to a browser.
//!
//! In the guest, as the agent user: make sure Zellij's config lets
//! sessions be shared on the web (`web_sharing "on"`, added to the user's
//! `config.kdl` when it says nothing about it), create the session
//! `<sandbox>-<branch>` in the background if it does not exist, start
//! Zellij's web server on the guest's 127.0.0.1:[`WEB_PORT`] unless it is
//! online, and create a login token (Zellij's web client asks for one).
//! Once the supervisor's port watch lists the web server, the per-user
//! dev-server proxy reaches it at `http://8082.<sandbox>.localhost:<P>/`;
//! `attach --web` waits for that and prints the URL and the token. The
//! server keeps running (and the session with it) until the sandbox stops.

use std::time::{Duration, Instant};

use super::super::backend::{BackendError, BackendResult, SandboxSpec};
use super::engine::Layout;
use super::{forward, guest};
use crate::shown;

/// The guest port of Zellij's web server (Zellij's default).
pub const WEB_PORT: u16 = 8082;
/// How long to wait for the port watch to pick the web server up.
const FORWARD_WAIT: Duration = Duration::from_secs(20);

/// Exit codes of the guest script.
const NO_ZELLIJ: i32 = 90;
const NO_WEB_SUPPORT: i32 = 91;
const NO_SESSION: i32 = 92;
const NO_SERVER: i32 = 93;

/// Shell lines that let Zellij sessions be shared on the web: run before
/// a session is created (by `attach` too), since a session reads the
/// setting when it starts. A marker file makes the check after the first
/// time a shell built-in (attach latency).
pub fn web_sharing_config_script() -> &'static str {
    r#"zcfg="${ZELLIJ_CONFIG_DIR:-$HOME/.config/zellij}"; if [ ! -e "$zcfg/.keystone-web-sharing" ]; then mkdir -p "$zcfg" 2>/dev/null; if ! grep -qs '^[[:space:]]*web_sharing' "$zcfg/config.kdl"; then printf '\n// keystone: sessions can be opened in a browser (keystone agent attach --web)\nweb_sharing "on"\n' >> "$zcfg/config.kdl"; fi 2>/dev/null && : > "$zcfg/.keystone-web-sharing"; fi; "#
}

/// The guest script: prepares the session (with the Zellij layout
/// `layout` where the image has it) and the web server, then prints
/// Zellij's `--create-token` output (`<name>: <token>`).
fn guest_script(session: &str, layout: &str) -> String {
    let cfg = web_sharing_config_script();
    format!(
        r#"command -v zellij >/dev/null 2>&1 || exit {NO_ZELLIJ}
zellij web --help >/dev/null 2>&1 || exit {NO_WEB_SUPPORT}
{cfg}
if ! zellij list-sessions --short --no-formatting 2>/dev/null | grep -qxF '{session}'; then
  set --; [ -f '{layout}' ] && set -- options --default-layout '{layout}'
  zellij attach --create-background '{session}' "$@" </dev/null >/dev/null 2>&1 || exit {NO_SESSION}
fi
online() {{ zellij web --status --port {WEB_PORT} --timeout 5 2>/dev/null | grep -q 'online'; }}
if ! online; then
  mkdir -p "$HOME/.cache"
  log="$HOME/.cache/keystone-zellij-web.log"
  if ! zellij web --start --daemonize --port {WEB_PORT} </dev/null >"$log" 2>&1; then
    cat "$log" >&2; exit {NO_SERVER}
  fi
  for _ in $(seq 1 100); do online && break; sleep 0.2; done
  online || {{ cat "$log" >&2; exit {NO_SERVER}; }}
fi
zellij web --create-token
"#
    )
}

/// The token line of `zellij web --create-token`: (name, token).
fn parse_token(stdout: &str) -> Option<(String, String)> {
    stdout.lines().rev().find_map(|line| {
        let (name, token) = line.trim().split_once(": ")?;
        let token = token.trim();
        let plausible = !name.is_empty()
            && !name.contains(' ')
            && !token.is_empty()
            && token.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
        plausible.then(|| (name.to_string(), token.to_string()))
    })
}

/// Waits until the port watch lists `guest_port` as routable; its URL.
fn wait_routable(spec: &SandboxSpec, layout: &Layout, guest_port: u16) -> BackendResult<String> {
    let t0 = Instant::now();
    loop {
        match forward::read_forwards(layout) {
            None => {
                return Err(BackendError::Failed(
                    "this sandbox's supervisor does not watch guest ports (it was started \
                     by an older keystone): restart it with `keystone agent stop` and \
                     `keystone agent start`"
                        .into(),
                ))
            }
            Some(list) => {
                if let Some(f) = list.iter().find(|f| f.guest_port == guest_port) {
                    if let Some(host_port) = f.host_port {
                        if !spec.settings.proxy_enable {
                            return Ok(format!("http://127.0.0.1:{host_port}/"));
                        }
                    }
                    if forward::is_routable(f) {
                        if !spec.settings.proxy_enable {
                            return Err(BackendError::Failed(
                                "the browser reaches Zellij's web server through the \
                                 dev-server proxy, which `[proxy] enable = false` turns off"
                                    .into(),
                            ));
                        }
                        let port = crate::agent::proxy::listen_port(&spec.settings);
                        return Ok(crate::agent::proxy::url(&spec.name, Some(guest_port), port));
                    }
                    if let Some(note) = &f.note {
                        if t0.elapsed() > forward::POLL_INTERVAL * 3 {
                            return Err(BackendError::Failed(format!(
                                "Zellij's web server (guest port {guest_port}) is {}",
                                shown::line(note)
                            )));
                        }
                    }
                }
            }
        }
        if t0.elapsed() > FORWARD_WAIT {
            return Err(BackendError::Failed(format!(
                "Zellij's web server listens on guest port {guest_port}, but the port watch \
                 did not list it within {} s; see the supervisor log in the sandbox's logs \
                 folder",
                FORWARD_WAIT.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `attach --web` for the session `session`, created in `dir`.
pub fn attach_web(
    spec: &SandboxSpec,
    layout: &Layout,
    dir: &str,
    session: &str,
) -> BackendResult<i32> {
    let script = guest_script(session, &super::agents::layout_path(spec.settings.agent));
    let argv = vec!["bash".to_string(), "-c".into(), script];
    let out = guest::client(&layout.vsock)
        .exec_request_output(guest::request(argv, dir, None))
        .map_err(|e| guest::agent_err("attach --web", e))?;
    let stderr = shown::bytes(&out.stderr);
    match out.status.code_or_signal() {
        0 => {}
        NO_ZELLIJ => {
            return Err(BackendError::Requirements(
                "the guest image has no Zellij, so there is no web client to serve; rebuild \
                 the guest root file system (guest-image/rootfs/build.sh) or use \
                 `keystone agent attach` in a terminal"
                    .into(),
            ))
        }
        NO_WEB_SUPPORT => {
            return Err(BackendError::Requirements(
                "Zellij in the guest image was built without its web server (the \
                 `web_server_capability` feature); rebuild it with default features \
                 (guest-image/rootfs/zellij.sh) or use `keystone agent attach` in a terminal"
                    .into(),
            ))
        }
        NO_SESSION => {
            return Err(BackendError::Failed(format!(
                "cannot create the Zellij session {session} in the sandbox: {stderr}"
            )))
        }
        code => {
            return Err(BackendError::Failed(format!(
                "Zellij's web server did not start in the sandbox (exit {code}): {stderr}"
            )))
        }
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let Some((token_name, token)) = parse_token(&stdout) else {
        return Err(BackendError::Failed(format!(
            "Zellij did not print a login token: {}",
            shown::bytes(stdout.as_bytes())
        )));
    };
    let url = format!("{}{session}", wait_routable(spec, layout, WEB_PORT)?);
    println!("Zellij session {session} is served to your browser:");
    println!("  URL:    {url}");
    println!("  token:  {token}");
    println!(
        "Paste the token on the login page (it is shown only now; Zellij calls it {}).",
        shown::line(&token_name)
    );
    println!(
        "The session keeps running when the tab closes; `keystone agent attach` opens it in a terminal."
    );
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_lines_are_parsed() {
        let out = "Created token successfully\n\ntoken_3: 37cc6eb0-e1f2-434b-a23f-d94295d5d4a3\n";
        assert_eq!(
            parse_token(out),
            Some((
                "token_3".into(),
                "37cc6eb0-e1f2-434b-a23f-d94295d5d4a3".into()
            ))
        );
        assert_eq!(parse_token("Created token successfully\n"), None);
        assert_eq!(parse_token("error: something: went wrong badly\n"), None);
    }

    #[test]
    fn the_script_quotes_the_session_and_uses_the_web_port() {
        let s = guest_script("app-1-main", "/l/claude.kdl");
        assert!(s.contains("zellij attach --create-background 'app-1-main' \"$@\""));
        assert!(s.contains("set -- options --default-layout '/l/claude.kdl'"));
        assert!(s.contains("--port 8082"));
        assert!(s.contains(r#"web_sharing "on""#));
    }
}
