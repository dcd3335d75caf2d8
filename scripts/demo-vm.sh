#!/usr/bin/env bash
# Low-level demo: build (or reuse) the guest kernel, lay out a busybox root
# directory, and boot it with the Keystone VMM into a guest shell on this
# terminal, root file system served over virtio-fs by virtiofsd-lite.
# Ctrl-A x stops the VM; `exit` in the guest shell reboots it.
set -euo pipefail
cd "$(dirname "$0")/.."
kernel_dir=$(guest-image/kernel/build.sh)
cargo build --release -q -p keystone
root=${KEYSTONE_DEMO_ROOT:-${XDG_CACHE_HOME:-$HOME/.cache}/keystone/demo-root}
keystone=./target/x86_64-unknown-linux-gnu/release/keystone
"$keystone" vm make-root "$root" --init shell
exec "$keystone" vm run --kernel "$kernel_dir/vmlinux" --root-dir "$root" --vcpus 2 --memory 256 "$@"
