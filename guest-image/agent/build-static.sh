#!/bin/sh
# Builds the guest agent as a statically linked x86_64 binary (glibc with
# crt-static; the agent uses no NSS, it reads /etc/passwd itself) and
# prints its path.
#
#   guest-image/agent/build-static.sh [TARGET_DIR]
#
# TARGET_DIR defaults to $CARGO_TARGET_DIR, then <workspace>/target. The
# binary lands in TARGET_DIR/x86_64-unknown-linux-gnu/release/keystone-guest-agent.
# The explicit --target keeps RUSTFLAGS away from build scripts and
# proc macros, which must stay dynamically linked.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
workspace=$(cd "$here/../.." && pwd)
target_dir=${1:-${CARGO_TARGET_DIR:-$workspace/target}}
triple=x86_64-unknown-linux-gnu

cd "$workspace"
RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
    cargo build --release -p keystone-guest-agent --target "$triple" \
    --target-dir "$target_dir" >&2

bin="$target_dir/$triple/release/keystone-guest-agent"
if command -v file >/dev/null 2>&1; then
    case $(file -L "$bin") in
        *"statically linked"* | *"static-pie linked"*) ;;
        *) echo "build-static.sh: $bin is not statically linked:" >&2; file -L "$bin" >&2; exit 1 ;;
    esac
fi
echo "$bin"
