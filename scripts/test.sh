#!/usr/bin/env bash
# The test command (README, CI): installs dependencies, builds the guest
# kernel once per recipe (cached), checks formatting and lints, then runs
# every test. Tests that cannot run on this host print "SKIP: <reason>".
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
echo "== guest kernel (cached by recipe hash)"
kernel_dir=$(guest-image/kernel/build.sh)
echo "kernel: $kernel_dir"
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets -q -- -D warnings
echo "== cargo test"
KEYSTONE_KERNEL_DIR="$kernel_dir" cargo test --workspace -- --nocapture 2>&1 | tee target/test-output.log
echo "== skipped tests"
grep -h "^SKIP:" target/test-output.log | sort | uniq -c || echo "none"
