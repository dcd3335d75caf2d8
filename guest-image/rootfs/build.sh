#!/usr/bin/env bash
# Builds the Keystone guest root file system: a Debian 12 (bookworm) root
# directory made with `debootstrap --variant=minbase` plus the packages listed
# in `packages` beside this script, trimmed and set up for a guest whose PID 1
# is the Keystone guest agent (no systemd). The guest gets it read-only over
# virtio-fs. Cached under ${XDG_CACHE_HOME:-$HOME/.cache}/keystone/rootfs/<recipe hash>/
# with the resolved package versions in <hash>.manifest beside it.
#
# The coding agents (Claude Code, Codex, Gemini CLI) and Node.js are in the
# image, at the versions pinned in agents.lock (installed by agents.sh; a
# copy of the lock is kept as <hash>.agents), with the Zellij configuration
# and session layouts in zellij/. Every file of the recipe is in the hash:
# changing a pin builds a new image at the next start.
#
# Prints the cache folder on stdout; progress goes to stderr. A second run
# with the same recipe is instant.
#
#   guest-image/rootfs/build.sh            build or reuse
#   guest-image/rootfs/build.sh --hash     print the recipe hash only
#
# Needs: root (debootstrap makes device nodes and chroots), debootstrap
# (installed with apt-get when missing), the Debian mirror, npm's registry.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
suite=bookworm
mirror=${KEYSTONE_DEBIAN_MIRROR:-http://deb.debian.org/debian}
cache_root=${XDG_CACHE_HOME:-$HOME/.cache}/keystone/rootfs

packages=$(sed -e 's/#.*//' -e 's/[[:space:]]//g' -e '/^$/d' "$here/packages" | paste -sd, -)

# The mirror is not part of the hash: any Debian mirror serves the same suite.
recipe_hash=$({
	echo "suite $suite"
	echo "packages $packages"
	cat "$here/build.sh" "$here/zellij.sh" "$here/agents.sh" "$here/agents.lock" \
		"$here"/zellij/*.kdl
} | sha256sum | cut -c1-16)

if [ "${1:-}" = "--hash" ]; then
	echo "$recipe_hash"
	exit 0
fi

out="$cache_root/$recipe_hash"
# The manifest is renamed into place last: its presence marks a finished build.
if [ -d "$out" ] && [ -f "$out.manifest" ]; then
	echo "$out"
	exit 0
fi

if [ "$(id -u)" != 0 ]; then
	echo "error: building the guest root file system needs root (debootstrap)" >&2
	exit 4
fi
if ! command -v debootstrap >/dev/null 2>&1; then
	echo "keystone: installing debootstrap" >&2
	if ! { apt-get install -y -q debootstrap || { apt-get update -q && apt-get install -y -q debootstrap; }; } >&2; then
		echo "error: debootstrap missing and apt-get install debootstrap failed" >&2
		exit 4
	fi
fi

zellij_bin=$("$here/zellij.sh")

mkdir -p "$cache_root"
# One build at a time per recipe; a second caller waits and reuses it.
exec 9>"$cache_root/.$recipe_hash.lock"
flock 9
if [ -d "$out" ] && [ -f "$out.manifest" ]; then
	echo "$out"
	exit 0
fi

work=$(mktemp -d "$cache_root/.build-$recipe_hash.XXXXXX")
cleanup() {
	# A failed debootstrap can leave proc/sys mounted inside the tree.
	for m in proc sys dev/pts; do
		mountpoint -q "$work/root/$m" 2>/dev/null && umount -l "$work/root/$m" || true
	done
	rm -rf "$work"
}
trap cleanup EXIT
root="$work/root"
start=$(date +%s)
echo "keystone: building guest rootfs $recipe_hash (debian $suite minbase + $packages) from $mirror; a few minutes" >&2
debootstrap --variant=minbase --include="$packages" "$suite" "$root" "$mirror" >&2 ||
	{ echo "error: debootstrap failed; see $root/debootstrap/debootstrap.log above" >&2; exit 3; }
echo "keystone: debootstrap done in $(($(date +%s) - start)) s; configuring" >&2

in_root() { chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 "$@"; }

# Resolved package versions, recorded before apt's state is trimmed.
in_root dpkg-query -W -f='${Package}\t${Version}\t${Architecture}\n' | sort > "$work/manifest"

# Users: root stays root; `agent` (uid 1000) is the unprivileged user, no password.
in_root useradd --create-home --uid 1000 --user-group --shell /bin/bash --home-dir /home/agent agent
in_root passwd --delete agent >/dev/null
# With nested virtualization the agent runs VMs of its own: the guest
# agent gives /dev/kvm to the kvm group at boot (there is no udev).
in_root sh -c 'getent group kvm >/dev/null || groupadd --system kvm'
in_root usermod --append --groups kvm agent

# Identity and name resolution (no host resolv.conf inside the image).
echo sandbox > "$root/etc/hostname"
cat > "$root/etc/hosts" <<'HOSTS'
127.0.0.1	localhost
127.0.1.1	sandbox
::1	localhost ip6-localhost ip6-loopback
ff02::1	ip6-allnodes
ff02::2	ip6-allrouters
HOSTS
# The root is read-only in the guest: resolv.conf points into /run (a
# tmpfs there), where the guest agent writes it when it sets up networking.
rm -f "$root/etc/resolv.conf"
ln -s /run/resolv.conf "$root/etc/resolv.conf"

# Mount points the guest agent uses: the workspace, the lower layer of an
# overlay, scratch tmpfs mounts on a read-only root.
mkdir -p "$root/workspace" "$root/run/lower" "$root/run/upper" "$root/mnt" "$root/tmp" "$root/var/tmp"
chmod 1777 "$root/tmp" "$root/var/tmp"

# direnv: hooked into every interactive bash, and /workspace allowed
# without `direnv allow` (the allow list would live on a read-only root).
# A project's bare .env is loaded too (load_dotenv), with or without an
# .envrc that calls dotenv.
mkdir -p "$root/etc/direnv" "$root/home/agent/.config/direnv" "$root/root/.config/direnv"
cat > "$root/etc/direnv/direnv.toml" <<'TOML'
[global]
warn_timeout = "30s"
load_dotenv = true

[whitelist]
prefix = ["/workspace"]
TOML
cp "$root/etc/direnv/direnv.toml" "$root/home/agent/.config/direnv/direnv.toml"
cp "$root/etc/direnv/direnv.toml" "$root/root/.config/direnv/direnv.toml"
in_root chown -R agent:agent /home/agent/.config
cat >> "$root/etc/bash.bashrc" <<'BASHRC'

# Keystone: direnv, configured in /etc/direnv (allows /workspace).
export DIRENV_CONFIG=/etc/direnv
if command -v direnv >/dev/null 2>&1; then
	eval "$(direnv hook bash)"
fi
BASHRC
echo "DIRENV_CONFIG=/etc/direnv" >> "$root/etc/environment"

# git: the workspace is owned by whoever owns it on the host.
cat > "$root/etc/gitconfig" <<'GIT'
[safe]
	directory = *
[init]
	defaultBranch = main
GIT

# sshd never runs as a service: `keystone agent open-vscode` starts
# `sshd -i` per connection over vsock. Host keys are made per sandbox on
# first use (they persist in its overlay), never shared through the image.
rm -f "$root"/etc/ssh/ssh_host_*
rm -f "$root"/etc/systemd/system/*/ssh.service "$root"/etc/systemd/system/*/sshd.service

# Zellij, the terminal workspace `keystone agent attach` opens (built from
# crates.io once and cached; Debian 12 does not package it). Its
# configuration goes where a user's own would be too: `attach` writes one
# there when it finds none, and Zellij then no longer reads /etc/zellij.
install -m 0755 "$zellij_bin" "$root/usr/local/bin/zellij"
for dir in etc/zellij etc/skel/.config/zellij home/agent/.config/zellij root/.config/zellij; do
	install -D -m 0644 "$here/zellij/config.kdl" "$root/$dir/config.kdl"
done
# One session layout per coding agent (`attach` picks the sandbox's).
for layout in "$here"/zellij/*.kdl; do
	[ "$(basename "$layout")" = config.kdl ] ||
		install -D -m 0644 "$layout" "$root/usr/local/share/keystone/zellij/$(basename "$layout")"
done

# The coding agents and Node.js, from npm's registry (agents.sh says how).
start_agents=$(date +%s)
"$here/agents.sh" "$root" "$work/agents" >&2
cp "$here/agents.lock" "$work/out.agents"
rm -rf "$work/agents"
echo "keystone: coding agents installed in $(($(date +%s) - start_agents)) s" >&2
in_root chown -R agent:agent /home/agent

# Shrink: apt caches and lists, docs, man pages, non-English locales, logs.
rm -rf "$root"/var/cache/apt/* "$root"/var/lib/apt/lists/* "$root"/var/cache/debconf/*-old \
	"$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* \
	"$root"/usr/share/lintian "$root"/usr/share/linda "$root"/var/log/*.log \
	"$root"/var/log/apt/* "$root"/debootstrap
find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name 'locale.alias' ! -name 'en*' -exec rm -rf {} + 2>/dev/null || true
# Keep dpkg from reinstalling what was removed, if someone runs apt in an overlay.
cat > "$root/etc/dpkg/dpkg.cfg.d/keystone-nodoc" <<'DPKG'
path-exclude /usr/share/doc/*
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
DPKG

mv "$work/manifest" "$work/out.manifest"
rm -rf "$out" "$out.manifest" "$out.agents"
mv "$root" "$out"
mv "$work/out.agents" "$out.agents"
mv "$work/out.manifest" "$out.manifest"
echo "keystone: guest rootfs ready in $out ($(du -sh "$out" | cut -f1), $(wc -l < "$out.manifest") packages, $(($(date +%s) - start)) s)" >&2
echo "$out"
