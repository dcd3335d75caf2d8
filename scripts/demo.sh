#!/usr/bin/env bash
# The main job: builds keystone, the guest kernel and root file system
# (cached after the first time), makes a sample git project, and starts a
# sandbox on it. On a terminal you land in the sandbox's Zellij session
# (detach with Ctrl-O d); otherwise the script runs a few commands in the
# sandbox, syncs a commit back and stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
guest-image/kernel/build.sh >/dev/null
guest-image/rootfs/build.sh >/dev/null
cargo build --release -q -p keystone
keystone=${CARGO_TARGET_DIR:-$PWD/target}/x86_64-unknown-linux-gnu/release/keystone

sample=${KEYSTONE_SAMPLE_PROJECT:-$HOME/keystone-sample}
if [ ! -d "$sample/.git" ]; then
	mkdir -p "$sample"
	git -C "$sample" init -q
	printf '# Sample project\n' > "$sample/README.md"
	printf 'GREETING=hello-from-the-host\n' > "$sample/.env"
	printf '.env\n' > "$sample/.gitignore"
	git -C "$sample" add README.md .gitignore
	git -C "$sample" -c user.name=keystone -c user.email=keystone@localhost commit -qm "Sample project"
fi
cd "$sample"
if [ -t 0 ] && [ -t 1 ]; then
	exec "$keystone" agent start "$@"
fi
"$keystone" agent start --no-attach "$@"
"$keystone" agent exec -- sh -c 'uname -r; cat .env; git log --oneline'
"$keystone" agent exec -- sh -c 'echo "written in the sandbox" > NOTES.md && git add NOTES.md && git -c user.name=agent -c user.email=agent@sandbox commit -qm "Notes from the agent"'
"$keystone" agent sync
git log --oneline -n 3
"$keystone" agent status
"$keystone" agent stop
