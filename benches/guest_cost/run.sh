#!/bin/bash
# What the guest kernel costs on each engine, side by side in one run:
# builds probe.c statically, starts a sandbox per engine on a scratch
# project holding the probe, runs it with `keystone agent exec`, and prints
# one JSON object: {"host_kvm": ..., "engines": {"vmm": {...}, "qemu": {...}}}.
#
#   benches/guest_cost/run.sh [ENGINE...]      (default: vmm qemu)
#
# KEYSTONE_BIN picks the binary (default: the release build, else debug).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
engines=("$@")
[ ${#engines[@]} -gt 0 ] || engines=(vmm qemu)
target="${CARGO_TARGET_DIR:-$repo/target}/x86_64-unknown-linux-gnu"
ks=${KEYSTONE_BIN:-}
if [ -z "$ks" ]; then
	for p in "$target/release/keystone" "$target/debug/keystone"; do
		[ -x "$p" ] && ks=$p && break
	done
fi
[ -n "$ks" ] || { echo "guest_cost: build keystone first (cargo build --release -p keystone) or set KEYSTONE_BIN" >&2; exit 1; }
work=$(mktemp -d /tmp/keystone-guest-cost.XXXXXX)
cleanup() {
	for home in "$work"/*/; do
		[ -d "$home/proj" ] || continue
		(cd "$home/proj" && XDG_CONFIG_HOME="$home/config" XDG_STATE_HOME="$home/state" \
			"$ks" agent destroy "cost-$(basename "$home")" --force >/dev/null 2>&1) || true
	done
	rm -rf "$work"
}
trap cleanup EXIT
gcc -O1 -static -Wall -o "$work/probe" "$here/probe.c"

kvm=hardware
[ -d /sys/module/kvm_pvm ] && kvm=kvm_pvm
printf '{"host_kvm": "%s", "engines": {' "$kvm"
sep=
for engine in "${engines[@]}"; do
	home="$work/$engine"
	mkdir -p "$home/config/keystone" "$home/state" "$home/proj"
	printf '[backend.microvm]\nengine = "%s"\n' "$engine" >"$home/config/keystone/agent.toml"
	cp "$work/probe" "$home/proj/probe"
	git -C "$home/proj" init -q -b main
	git -C "$home/proj" add probe
	git -C "$home/proj" -c user.name=bench -c user.email=bench@localhost commit -qm probe
	run() { (cd "$home/proj" && XDG_CONFIG_HOME="$home/config" XDG_STATE_HOME="$home/state" "$ks" agent "$@"); }
	echo "guest_cost: $engine: starting a sandbox (on kvm_pvm our VMM takes a minute or two)" >&2
	t0=$(date +%s.%N)
	run start --name "cost-$engine" --no-attach --memory 512 --vcpus 1 >&2
	ready=$(echo "$(date +%s.%N) - $t0" | bc)
	echo "guest_cost: $engine: running the probe" >&2
	probe=$(run exec -- ./probe)
	run stop >&2 || true
	run destroy "cost-$engine" --force >&2 || true
	printf '%s"%s": {"start_to_ready_s": %.1f, "probe": %s}' "$sep" "$engine" "$ready" "$probe"
	sep=', '
done
printf '}}\n'
