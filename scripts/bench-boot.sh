#!/usr/bin/env bash
# Measures the boot-time split of `supermachine boot` (N runs of `true` in the busybox test
# image) and prints a markdown table of medians: backend start -> kernel -> init -> workload.
# Usage: scripts/bench-boot.sh [N]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
n="${1:-10}"
cd "$root"
cargo build --quiet --release --bin supermachine
images="$(python3 scripts/make-test-images.py)"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
for i in $(seq 1 "$n"); do
  ./target/release/supermachine boot --timings-json "$out/$i.json" "oci-layout:$images/busybox" -- /bin/true
done
python3 - "$out" "$n" <<'PY'
import json, os, statistics, sys
d, n = sys.argv[1], int(sys.argv[2])
runs = [json.load(open(os.path.join(d, f))) for f in sorted(os.listdir(d))]
keys = ["backend_start_ms", "kernel_ms", "init_ms", "workload_ms", "total_ms", "guest_uptime_at_init_ms"]
print(f"backend: {runs[0]['backend']}, runs: {n}, cpu: {open('/proc/cpuinfo').read().split('model name')[1].split(':')[1].splitlines()[0].strip()}")
print("| phase | median ms | min ms | max ms |")
print("|---|---|---|---|")
for k in keys:
    v = [r[k] for r in runs if r[k] is not None]
    print(f"| {k[:-3]} | {statistics.median(v):.1f} | {min(v):.1f} | {max(v):.1f} |")
PY
