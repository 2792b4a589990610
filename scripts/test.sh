#!/usr/bin/env bash
# The test command: set up (idempotent, cached), check formatting and lints, run every test.
# Tests boot real VMs (QEMU; TCG on machines without hardware virtualization).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
"$root/scripts/setup.sh"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
cargo build --quiet --bin supermachine
cargo test --workspace --no-fail-fast -- --test-threads=2 2>&1
