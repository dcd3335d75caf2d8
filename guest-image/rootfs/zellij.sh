#!/usr/bin/env bash
# Builds Zellij, the terminal workspace `keystone agent attach` opens in the
# guest, from crates.io, once per version, and prints the binary's path.
# Cached under ${XDG_CACHE_HOME:-$HOME/.cache}/keystone/zellij/<version>/;
# the first build takes 30 to 60 minutes on 2 cores. The binary links glibc,
# libgcc and zlib, all in the Debian 12 guest's minimal base.
set -euo pipefail
version=0.45.1
cache_root=${XDG_CACHE_HOME:-$HOME/.cache}/keystone/zellij
out="$cache_root/$version"
if [ -x "$out/bin/zellij" ]; then
	echo "$out/bin/zellij"
	exit 0
fi
mkdir -p "$cache_root"
exec 9>"$cache_root/.$version.lock"
flock 9
if [ -x "$out/bin/zellij" ]; then
	echo "$out/bin/zellij"
	exit 0
fi
echo "keystone: building Zellij $version from crates.io (once; 30-60 min on 2 cores)" >&2
rm -rf "$out.tmp"
# From / so that no project's .cargo/config.toml applies to this build.
(cd / && cargo install zellij --version "$version" --locked --root "$out.tmp" \
	--target-dir "$cache_root/target") >&2
mv "$out.tmp" "$out"
echo "$out/bin/zellij"
