#!/usr/bin/env bash
# Agent benchmarks (exec latency, throughput, connect latency) on a real VM; prints a table.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
"$root/scripts/build-guest.sh" >/dev/null
export SUPERMACHINE_IMAGES="$(python3 scripts/make-test-images.py)"
cargo run --quiet --release --example agent_bench
