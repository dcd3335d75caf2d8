#!/usr/bin/env bash
# Installs what Keystone needs on a Debian 12 host (run as root): the guest
# kernel's build dependencies and source, QEMU (the software-emulation
# engine and test peer), a static busybox for minimal guest roots,
# OpenSSH's client (`open-vscode`), iproute2 (the network test's
# namespace) and a Rust toolchain check. Safe to run again.
set -euo pipefail

packages=(
	linux-source-6.12 bc bison flex libelf-dev cpio lz4 xz-utils make gcc patch
	qemu-system-x86 busybox-static git ca-certificates debootstrap file
	openssh-client iproute2 nix-bin
)
missing=()
for p in "${packages[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
	echo "keystone setup: installing ${missing[*]}" >&2
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -q >&2
	apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
fi
if ! command -v cargo >/dev/null; then
	echo "keystone setup: cargo not found; install Rust (rustup) 1.85 or newer" >&2
	exit 4
fi
if [ ! -e /dev/kvm ]; then
	echo "keystone setup: warning: /dev/kvm is missing; VM boot tests will be skipped" >&2
fi
