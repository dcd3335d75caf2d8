#!/usr/bin/env bash
# Builds pjdfstest (the POSIX file system conformance suite, Rust edition,
# from crates.io) once per version and prints the binary's path. The guest
# tests run it on /workspace inside a Debian 12 guest, so it is linked
# dynamically against this Debian 12 host's glibc, like the guest's own
# programs. Cached under ${XDG_CACHE_HOME:-$HOME/.cache}/keystone/.
set -euo pipefail
version=0.2.0
root=${XDG_CACHE_HOME:-$HOME/.cache}/keystone/pjdfstest-$version
bin=$root/bin/pjdfstest
if [ ! -x "$bin" ]; then
	echo "keystone: building pjdfstest $version (about a minute, once)" >&2
	# Outside the workspace: its static-linking flags are not wanted here.
	(cd / && cargo install pjdfstest --version "$version" --locked --root "$root" \
		--target-dir "$root/build" --quiet >&2)
	rm -rf "$root/build"
fi
echo "$bin"
