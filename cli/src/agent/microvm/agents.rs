//! `start --agent claude|codex|gemini`: the coding agent made ready in
//! the sandbox, set to work without permission prompts (the sandbox is
//! the boundary that those prompts stand in for elsewhere).
//!
//! Claude Code and Codex are installed from their native Linux x86-64
//! builds, which npm's registry serves as platform packages
//! (`@anthropic-ai/claude-code-linux-x64`, `@openai/codex@<v>-linux-x64`):
//! the guest fetches the package metadata and streams the tarball through
//! its proxy (so the host's network policy applies, and nothing needs
//! Node.js), keeps only the binary under `/usr/local/lib/keystone-agents`
//! and links it into `/usr/local/bin`. The root's writable layer keeps it
//! across `stop`/`start`, so this happens once per sandbox. Then the agent
//! user's configuration turns the prompts off, unless the user already has
//! a configuration there. Gemini CLI needs Node.js 20, which the guest
//! image does not carry: it is refused with that reason.
//!
//! The agent logs in inside the sandbox (its own login flow); no host
//! credential is copied in (security invariant 3).

use keystone_guest_agent::protocol::{ExecRequest, UserSpec};

use super::super::backend::AgentKind;

/// What the install script needs to know about one agent.
struct Recipe {
    /// The command's name in the guest.
    command: &'static str,
    /// What users call it.
    title: &'static str,
    /// Shell that prints the tarball URL (metadata fetched with `meta`).
    tarball: &'static str,
    /// The binary's path inside the tarball.
    member: &'static str,
    /// The agent user's configuration file and its contents.
    config: (&'static str, &'static str),
}

const CLAUDE: Recipe = Recipe {
    command: "claude",
    title: "Claude Code",
    tarball: r#"meta "$reg/@anthropic-ai%2fclaude-code-linux-x64/latest" && field dist tarball"#,
    member: "package/claude",
    config: (
        ".claude/settings.json",
        r#"{
  "permissions": { "defaultMode": "bypassPermissions" },
  "skipDangerousModePermissionPrompt": true
}
"#,
    ),
};

const CODEX: Recipe = Recipe {
    command: "codex",
    title: "Codex",
    tarball: r#"meta "$reg/@openai%2fcodex" && v=$(field dist-tags latest) && meta "$reg/@openai%2fcodex/$v-linux-x64" && field dist tarball"#,
    member: "package/vendor/x86_64-unknown-linux-musl/bin/codex",
    config: (
        ".codex/config.toml",
        "approval_policy = \"never\"\nsandbox_mode = \"danger-full-access\"\n",
    ),
};

/// The guest script: `sh -c SCRIPT sh COMMAND TITLE MEMBER CONFIG_PATH
/// CONFIG_TEXT`, with the recipe's tarball lookup spliced in. Prints the
/// installed version on its last line.
fn script(recipe: &Recipe) -> String {
    format!(
        r#"set -eu
command=$1 title=$2 member=$3 config=$4 text=$5
reg=https://registry.npmjs.org
dir=/usr/local/lib/keystone-agents/$command
# One registry document into /var/tmp/ks-meta.json; the proxy may take a
# few seconds to be offered after boot (503), so that is retried.
meta() {{
	i=0
	while :; do
		codes=$(curl -sS --max-time 120 -o /var/tmp/ks-meta.json -w '%{{http_code}} %{{http_connect}}' "$1" 2>/var/tmp/ks-meta.err || true)
		[ "${{codes% *}}" = 200 ] && return 0
		i=$((i + 1))
		if [ "${{codes#* }}" = 503 ] && [ $i -lt 30 ]; then sleep 1; continue; fi
		echo "fetching $1 through the sandbox's proxy failed (HTTP $codes): $(head -c 300 /var/tmp/ks-meta.err)" >&2
		exit 3
	done
}}
field() {{
	perl -MJSON::PP -e 'local $/; my $d = decode_json(<STDIN>); for my $k (@ARGV) {{ $d = $d->{{$k}} }} print $d' "$@" < /var/tmp/ks-meta.json
}}
if [ ! -x "$dir/$command" ]; then
	url=$({tarball})
	case $url in https://registry.npmjs.org/*) ;; *) echo "unexpected tarball URL: $url" >&2; exit 3 ;; esac
	rm -rf "$dir.new" && mkdir -p "$dir.new"
	curl -sS --fail --max-time 1800 "$url" | tar -xzf - -C "$dir.new" "$member"
	mv "$dir.new/$member" "$dir.new/$command.bin" && rm -rf "$dir.new/package"
	mv "$dir.new/$command.bin" "$dir.new/$command"
	rm -rf "$dir" && mv "$dir.new" "$dir"
	rm -f /var/tmp/ks-meta.json
fi
ln -sf "$dir/$command" "/usr/local/bin/$command"
home=$(getent passwd agent | cut -d: -f6)
if [ ! -e "$home/$config" ]; then
	install -d -o agent -g agent "$home/$(dirname "$config")"
	printf '%s' "$text" > "$home/$config"
	chown agent:agent "$home/$config"
fi
"/usr/local/bin/$command" --version 2>&1 | tail -n 1
"#,
        tarball = recipe.tarball
    )
}

/// Installs and configures `kind` in the running sandbox; returns the
/// line to show (its version), or why it could not.
pub fn prepare(
    client: &keystone_guest_agent::AgentClient,
    kind: AgentKind,
) -> Result<String, String> {
    let recipe = match kind {
        AgentKind::Claude => &CLAUDE,
        AgentKind::Codex => &CODEX,
        AgentKind::Gemini => {
            return Err(
                "Gemini CLI needs Node.js 20 or newer, which the guest image does not \
                        carry yet; install it in the sandbox yourself (`npm install -g \
                        @google/gemini-cli` after installing Node.js) and run `gemini --yolo`"
                    .into(),
            )
        }
    };
    let argv: Vec<String> = [
        "sh",
        "-c",
        &script(recipe),
        "sh",
        recipe.command,
        recipe.title,
        recipe.member,
        recipe.config.0,
        recipe.config.1,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let request = ExecRequest {
        user: Some(UserSpec::Name("root".into())),
        cwd: Some("/".into()),
        ..ExecRequest::new(&argv)
    };
    let out = client
        .exec_request_output(request)
        .map_err(|e| format!("installing {}: {e}", recipe.title))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
        let tail = lines[lines.len().saturating_sub(4)..].join(" | ");
        return Err(format!(
            "installing {} failed (exit {:?}): {}",
            recipe.title,
            out.status.code,
            if tail.is_empty() {
                "no message"
            } else {
                tail.as_str()
            }
        ));
    }
    let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
    Ok(format!(
        "{} is ready ({version}): run `{}` in the session; it works without permission prompts",
        recipe.title, recipe.command
    ))
}

/// The one-line notice shown while it runs.
pub fn notice(kind: AgentKind) -> &'static str {
    match kind {
        AgentKind::Claude => {
            "installing Claude Code in the sandbox (the first time it downloads ~190 MB through the sandbox's proxy)..."
        }
        AgentKind::Codex => {
            "installing Codex in the sandbox (the first time it downloads ~170 MB through the sandbox's proxy)..."
        }
        AgentKind::Gemini => "installing Gemini CLI in the sandbox...",
    }
}
